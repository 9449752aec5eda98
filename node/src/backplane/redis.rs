//! The Redis backplane that fans chat messages out to every node, in the
//! order history stores them, and keeps that history.
//!
//! Channels (see `layout`): one for broadcasts, one per group (a node
//! subscribes only while it has local members) and one per user (while it
//! has one of the user's connections), which carries the user's direct
//! messages, sent and received. Sending a
//! message means storing and publishing it in one atomic, idempotent step
//! (`history::store_and_publish`); every node, the sender included, delivers
//! it to its clients when it arrives on the backplane, so every client sees
//! messages in id order, each exactly once (a node ignores ids it has already
//! passed).
//!
//! Publishing goes through a bounded queue drained by one task, which batches
//! what is waiting into one pipeline and, while Redis is unreachable, retries
//! the batch with backoff instead of dropping it. While a batch cannot be
//! stored, the sender's own clients get it at once, without an id, and the
//! node remembers its uid so that the stored copy is not delivered to them
//! again. Only a queue overflow drops messages, and that is counted.
//!
//! The subscriber task reconnects with backoff, resubscribes to the broadcast
//! channel and every current group, and then catches up from history on
//! everything stored after the last id it delivered, so a Redis outage or a
//! lost subscription costs no remote client a message. A subscription that
//! goes silent without closing (a partition drops packets; TCP retries for
//! minutes) is found by a PING every `SUBSCRIPTION_PING` that must be
//! answered within `SUBSCRIPTION_DEADLINE`, and replaced the same way. The
//! backplane is `live` only while a subscription is proven: the node's
//! `/health` reports `degraded` otherwise, and the balancer then sends new
//! clients to other nodes.
//!
//! On a Redis Cluster each group is a scope of its own (`Layout::per_group`):
//! its own stream, ids and shard channel on the slot of its name, so a
//! group's messages load only the master that owns that slot, and only the
//! nodes with members subscribe (`SPUBLISH`/`SSUBSCRIBE`, see
//! `subscription`); broadcasts and presence stay on the prefix's slot. The
//! publisher sends one pipeline per slot, and the subscriber keeps the last
//! id it delivered per scope and catches each up. It proves with messages
//! of its own that every master it listens to still delivers to it (after a
//! failover the promoted replica does not, until subscribed again).
//!
//! The server API rides along too (see `control`): every node listens on a
//! channel of its own, which carries stored messages for one of its
//! connections, commands about one of its connections (`ctl <json>`) and the
//! answers to its own commands (`ans <request> <0|1>`); commands about a user
//! go over the user's channel to every node that holds one of the user's
//! connections. Which groups the server API put a user in is a sorted set
//! per user, scored by expiry.
//!
//! Presence rides along: a node's changes go into a sorted set of expiring
//! (node, user) entries and out on the presence channel in one pipeline
//! (`write_presence`), and the subscriber hands the changes it hears to the
//! sink as typed `PresenceChange`s.

use super::layout::{self, Layout};
use super::subscription::{self, Subscription};
use super::{BackplaneMetrics, Deliver, HistoryError, PresenceChange, PresenceWrite, Sink};
use crate::command::{Command, Envelope, Reply, Target};
use crate::history::{self, cmp_ids, Address, ChatMessage, ResumeError};
use crate::redis_link::{RedisLink, CONNECT_TIMEOUT};
use redis::cluster_routing::Slot;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard_common::redis_state::Failure;
use switchboard_common::redis_target::RedisConn;
use tokio::sync::{mpsc, oneshot};

const QUEUE_CAPACITY: usize = 10_000;
const BATCH: usize = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often a quiet subscription is asked to prove it is alive, and how
/// long it has to answer.
const SUBSCRIPTION_PING: Duration = Duration::from_secs(1);
const SUBSCRIPTION_DEADLINE: Duration = Duration::from_secs(2);
/// Uids of messages delivered locally before they could be stored.
const MAX_EARLY_UIDS: usize = 100_000;
/// How long a group's own history stream (on a Redis Cluster) outlives its
/// last message: every message renews it. Group names come from clients, so
/// streams of groups used once must not pile up for ever; a client's
/// position in an expired stream has nothing after it to miss.
pub const GROUP_HISTORY_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct Publication {
    /// Where it is published: one channel, or a direct message's two users'
    /// separated by `\n` (see `history::store_and_publish`).
    channels: String,
    message: ChatMessage,
}

/// What a node follows beside the broadcasts: a group's or a user's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Follow {
    Group(String),
    User(String),
}

enum SubCommand {
    /// Subscribe to a channel; answer once Redis confirmed it.
    Subscribe(Follow, Option<oneshot::Sender<()>>),
    Unsubscribe(Follow),
    /// Answered once every command before it is done.
    Barrier(oneshot::Sender<()>),
}

/// Messages this node delivered to its own clients before storing them.
#[derive(Default)]
struct EarlyDeliveries {
    order: VecDeque<String>,
    uids: HashSet<String>,
}

pub struct RedisBackplane {
    link: Arc<RedisLink>,
    metrics: BackplaneMetrics,
    sink: Sink,
    history_len: usize,
    layout: Layout,
    /// On a Redis Cluster: chat and presence go over sharded pub/sub.
    sharded: bool,
    queue: mpsc::Sender<Publication>,
    queue_rx: Mutex<Option<mpsc::Receiver<Publication>>>,
    subs: mpsc::UnboundedSender<SubCommand>,
    subs_rx: Mutex<Option<mpsc::UnboundedReceiver<SubCommand>>>,
    pending: AtomicUsize,
    /// Subscribed, caught up, and answering its PINGs.
    live: AtomicBool,
    /// The newest id delivered from the backplane in each scope followed
    /// (see `history::Scope`); later arrivals at or below it are repeats.
    last_ids: Mutex<LastIds>,
    early: Mutex<EarlyDeliveries>,
    /// This node's id (its own channel's name).
    node_id: String,
    /// Commands this node sent and awaits an answer to, by request number.
    asked: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
    next_request: AtomicU64,
}

/// How long a command waits for the node it went to.
const COMMAND_DEADLINE: Duration = Duration::from_secs(3);

/// The newest id delivered per scope, looked up without allocating (it is
/// asked for every message that arrives).
#[derive(Default)]
struct LastIds {
    all: Option<String>,
    groups: HashMap<String, String>,
}

impl LastIds {
    fn get_mut(&mut self, scope: Option<&str>) -> Option<&mut String> {
        match scope {
            None => self.all.as_mut(),
            Some(g) => self.groups.get_mut(g),
        }
    }

    /// Sets where `scope` starts, unless it is followed already.
    fn start(&mut self, scope: Option<&str>, id: String) {
        match scope {
            None => {
                self.all.get_or_insert(id);
            }
            Some(g) => {
                self.groups.entry(g.to_string()).or_insert(id);
            }
        }
    }
}

fn backoff(current: Duration) -> Duration {
    (current * 2).min(MAX_BACKOFF)
}

impl RedisBackplane {
    pub fn new(
        link: Arc<RedisLink>,
        metrics: BackplaneMetrics,
        prefix: &str,
        history_len: usize,
        node_id: &str,
    ) -> Self {
        let (queue, queue_rx) = mpsc::channel(QUEUE_CAPACITY);
        let (subs, subs_rx) = mpsc::unbounded_channel();
        let layout = Layout::new(prefix, link.is_cluster());
        RedisBackplane {
            sharded: link.is_cluster(),
            link,
            metrics,
            sink: Sink::default(),
            history_len,
            layout,
            queue,
            queue_rx: Mutex::new(Some(queue_rx)),
            subs,
            subs_rx: Mutex::new(Some(subs_rx)),
            pending: AtomicUsize::new(0),
            live: AtomicBool::new(false),
            last_ids: Mutex::new(LastIds::default()),
            early: Mutex::new(EarlyDeliveries::default()),
            node_id: node_id.to_string(),
            asked: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
        }
    }

    /// Queues a chat message for storing and delivery on every node,
    /// this one included.
    pub fn send(&self, message: ChatMessage) {
        let channels = match message.address() {
            Address::All => self.layout.all_channel().to_string(),
            Address::Group(g) => self.layout.group_channel(g),
            Address::User { to, from } if to == from || from.is_empty() => self.layout.user_channel(to),
            Address::User { to, from } => {
                format!("{}\n{}", self.layout.user_channel(from), self.layout.user_channel(to))
            }
            Address::Connection(id) => match switchboard_common::token::owner_of(id) {
                Some(node) => self.layout.node_channel(&node),
                None => return, // no node's: nobody to deliver it to (the API checks first)
            },
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.queue.try_send(Publication { channels, message }) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.dropped.inc();
            tracing::error!("backplane publish queue is full; message delivered to this node only");
            let message = match e {
                mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p.message,
            };
            self.sink.deliver(&message);
        }
    }

    /// After a connection joined `group` (`first`: the node's first member
    /// of it): returns once messages to the group reach this node, so a
    /// client that joins and then resumes cannot miss one published between
    /// its replay's end and the subscription. Waits at most a PING's
    /// deadline, and not at all while the subscription is down (it is
    /// made again with every local group when Redis is back).
    pub async fn joined_group(&self, group: &str, first: bool) {
        self.follow(Follow::Group(group.to_string()), first).await;
    }

    pub fn unsubscribe_group(&self, group: &str) {
        let _ = self.subs.send(SubCommand::Unsubscribe(Follow::Group(group.to_string())));
    }

    /// After a user's first local connection: returns once the user's
    /// direct messages reach this node (as `joined_group`).
    pub async fn follow_user(&self, user: &str) {
        self.follow(Follow::User(user.to_string()), true).await;
    }

    pub fn unfollow_user(&self, user: &str) {
        let _ = self.subs.send(SubCommand::Unsubscribe(Follow::User(user.to_string())));
    }

    /// Subscribes to what `what` names when `first`, else waits for the
    /// subscriptions already asked for; see `joined_group`.
    async fn follow(&self, what: Follow, first: bool) {
        if !self.is_live() {
            if first {
                let _ = self.subs.send(SubCommand::Subscribe(what, None));
            }
            return;
        }
        let (done, confirmed) = oneshot::channel();
        let command = if first { SubCommand::Subscribe(what, Some(done)) } else { SubCommand::Barrier(done) };
        if self.subs.send(command).is_ok() {
            let _ = tokio::time::timeout(SUBSCRIPTION_DEADLINE, confirmed).await;
        }
    }

    /// Waits until every accepted publication reached Redis, or `limit` passes.
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pending.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Whether messages from other nodes reach this one now: a subscription
    /// is in place, caught up, and answered its last PING.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Starts the publisher and subscriber tasks, which hand what arrives to `sink`.
    pub fn start(self: &Arc<Self>, sink: std::sync::Weak<dyn Deliver>) {
        self.sink.set(sink);
        let queue_rx = self.queue_rx.lock().ok().and_then(|mut g| g.take());
        let subs_rx = self.subs_rx.lock().ok().and_then(|mut g| g.take());
        if let (Some(q), Some(s)) = (queue_rx, subs_rx) {
            tokio::spawn(publisher(self.clone(), q));
            tokio::spawn(subscriber(self.clone(), s));
        }
    }

    /// Whether each group has its own stream and ids (see `layout`).
    pub fn per_group(&self) -> bool {
        self.layout.per_group()
    }

    /// Up to `count` stored messages of `scope` older than `before` (the
    /// newest when `None`), newest first.
    pub async fn older(
        &self,
        scope: Option<&str>,
        before: Option<&str>,
        count: usize,
    ) -> Result<Vec<ChatMessage>, HistoryError> {
        let key = self.layout.history(scope);
        let read = async { history::older(&mut self.link.conn().await?, &key, before, count).await };
        self.observed(read.await)
    }

    /// Whether a replay of `scope` after `last` is possible; if so, the
    /// newest stored id, where it ends.
    pub async fn resume_point(
        &self,
        scope: Option<&str>,
        last: &str,
    ) -> Result<Result<String, ResumeError>, HistoryError> {
        let key = self.layout.history(scope);
        let read = async { history::check_resume(&mut self.link.conn().await?, &key, last).await };
        self.observed(read.await)
    }

    /// Up to `count` stored messages of `scope` after `after` through `through`, oldest first.
    pub async fn range(
        &self,
        scope: Option<&str>,
        after: &str,
        through: &str,
        count: usize,
    ) -> Result<Vec<ChatMessage>, HistoryError> {
        let key = self.layout.history(scope);
        let read = async { history::after(&mut self.link.conn().await?, &key, after, through, count).await };
        self.observed(read.await)
    }

    /// One batch of presence writes in one pipeline: each change recorded
    /// in the presence set (an entry that expires `ttl_ms` from now) or
    /// removed, and published; with a refresh, this node's entries rewritten
    /// with a fresh expiry, expired ones dropped and everyone's read.
    pub async fn write_presence(&self, w: PresenceWrite) -> Result<Vec<(String, String)>, HistoryError> {
        if w.changes.is_empty() && w.refresh.is_none() {
            return Ok(Vec::new());
        }
        let (key, channel) = (self.layout.presence(), self.layout.presence_changes());
        let now = super::unix_ms();
        let mut pipe = redis::pipe();
        for (user, online) in w.changes {
            let m = layout::presence_member(&w.node, &user);
            if online {
                pipe.zadd(key, &m, now + w.ttl_ms).ignore();
            } else {
                pipe.zrem(key, &m).ignore();
            }
            let change = PresenceChange { node: w.node.clone(), user, online };
            if let Ok(text) = serde_json::to_string(&change) {
                let publish = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
                pipe.cmd(publish).arg(channel).arg(text).ignore();
            }
        }
        let refresh = w.refresh.is_some();
        if let Some(users) = w.refresh {
            let mine: Vec<(i64, String)> =
                users.iter().map(|u| (now + w.ttl_ms, layout::presence_member(&w.node, u))).collect();
            if !mine.is_empty() {
                pipe.zadd_multiple(key, &mine).ignore();
            }
            pipe.zrembyscore(key, "-inf", now).ignore();
            pipe.pexpire(key, w.ttl_ms.max(60_000)).ignore();
            pipe.zrangebyscore(key, format!("({now}"), "+inf");
        }
        let write = async { pipe.query_async::<Vec<Vec<String>>>(&mut self.link.conn().await?).await };
        let read = self.observed(write.await)?;
        Ok(if refresh {
            read.iter()
                .flatten()
                .filter_map(|m| layout::parse_presence_member(m))
                .map(|(n, u)| (n.to_string(), u.to_string()))
                .collect()
        } else {
            Vec::new()
        })
    }

    /// A history read's outcome, recorded as Redis's state.
    fn observed<T>(&self, result: redis::RedisResult<T>) -> Result<T, HistoryError> {
        self.link.observe(&result);
        result.map_err(|e| HistoryError(e.to_string()))
    }

    fn early(&self) -> std::sync::MutexGuard<'_, EarlyDeliveries> {
        self.early.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers to this node's clients now, before the message is stored.
    fn deliver_early(&self, message: &ChatMessage) {
        {
            let mut early = self.early();
            if !early.uids.insert(message.uid.clone()) {
                return; // already delivered early
            }
            early.order.push_back(message.uid.clone());
            while early.order.len() > MAX_EARLY_UIDS {
                if let Some(old) = early.order.pop_front() {
                    early.uids.remove(&old);
                }
            }
        }
        self.sink.deliver(message);
    }

    /// Delivers a stored message once: not at or below the last id passed
    /// in its scope, and not to this node's clients again if they had it early.
    fn deliver_stored(&self, message: &ChatMessage) {
        let Some(id) = message.id.as_deref() else { return };
        {
            let scope = self.layout.scope_of(message.group.as_deref());
            let mut last = self.last_ids();
            match last.get_mut(scope) {
                Some(l) if cmp_ids(id, l) != std::cmp::Ordering::Greater => return,
                Some(l) => {
                    l.clear();
                    l.push_str(id);
                }
                // A scope not followed (a group just left; its position is
                // read again before it is followed again).
                None => return,
            }
        }
        if self.early().uids.remove(&message.uid) {
            return;
        }
        self.metrics.received.inc();
        self.sink.deliver(message);
    }

    /// `PUBLISH` (or `SPUBLISH` on a cluster) of `payload` on `channel`;
    /// answers how many subscribers got it.
    async fn publish(&self, channel: &str, payload: String) -> Result<i64, HistoryError> {
        let mut cmd = redis::cmd(if self.sharded { "SPUBLISH" } else { "PUBLISH" });
        cmd.arg(channel).arg(payload);
        let sent = async { self.link.conn().await?.query_at::<i64>(&cmd, channel).await };
        self.observed(sent.await)
    }

    /// Sends `command` where it goes (see `Backplane::command`).
    pub async fn command(&self, command: Command) -> Result<Option<bool>, HistoryError> {
        // A command for many nodes goes over the channel they all follow,
        // and nobody answers it.
        let many = match command.target() {
            Target::User(user) => Some(self.layout.user_channel(user)),
            Target::Group(group) => Some(self.layout.group_channel(group)),
            Target::All => Some(self.layout.all_channel().to_string()),
            Target::Connection(_) => None,
        };
        if let Some(channel) = many {
            let text = serde_json::to_string(&Envelope { command, reply: None }).unwrap_or_default();
            self.publish(&channel, format!("ctl {text}")).await?;
            return Ok(None);
        }
        let channel = match command.target() {
            Target::Connection(id) => match switchboard_common::token::owner_of(id) {
                Some(node) => self.layout.node_channel(&node),
                None => return Ok(Some(false)),
            },
            _ => return Ok(None),
        };
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.asked().insert(request, tx);
        let reply = Some(Reply { node: self.node_id.clone(), request });
        let text = serde_json::to_string(&Envelope { command, reply }).unwrap_or_default();
        let outcome = match self.publish(&channel, format!("ctl {text}")).await {
            // Nobody listens on that node's channel: the node is gone.
            Ok(0) => Ok(Some(false)),
            Ok(_) => match tokio::time::timeout(COMMAND_DEADLINE, rx).await {
                Ok(Ok(found)) => Ok(Some(found)),
                _ => Err(HistoryError("the connection's node did not answer in time".into())),
            },
            Err(e) => Err(e),
        };
        self.asked().remove(&request);
        outcome
    }

    fn asked(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<bool>>> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a command that arrived, and answers it when asked to.
    fn run_command(self: &Arc<Self>, payload: &[u8]) {
        let Ok(envelope) = serde_json::from_slice::<Envelope>(payload) else {
            self.metrics.invalid.inc();
            tracing::warn!("ignoring a malformed command");
            return;
        };
        let Some(run) = self.sink.control(envelope.command) else { return };
        let bp = self.clone();
        tokio::spawn(async move {
            let found = run.await;
            if let Some(Reply { node, request }) = envelope.reply {
                let answer = format!("ans {request} {}", u8::from(found));
                if let Err(e) = bp.publish(&bp.layout.node_channel(&node), answer).await {
                    tracing::warn!(error = %e, "could not answer a command");
                }
            }
        });
    }

    /// An answer to one of this node's commands.
    fn answered(&self, payload: &[u8]) {
        let text = std::str::from_utf8(payload).unwrap_or_default();
        let parsed = text.split_once(' ').and_then(|(r, f)| Some((r.parse::<u64>().ok()?, f == "1")));
        match parsed {
            Some((request, found)) => {
                if let Some(tx) = self.asked().remove(&request) {
                    let _ = tx.send(found);
                }
            }
            None => {
                self.metrics.invalid.inc();
                tracing::warn!("ignoring a malformed answer");
            }
        }
    }

    /// How many subscribers `channel` has (on a cluster, its slot's master's shard subscribers).
    async fn subscribers(&self, channel: &str) -> Result<i64, HistoryError> {
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg(if self.sharded { "SHARDNUMSUB" } else { "NUMSUB" }).arg(channel);
        let read = async { self.link.conn().await?.query_at::<(String, i64)>(&cmd, channel).await };
        self.observed(read.await).map(|(_, n)| n)
    }

    pub async fn group_has_members(&self, group: &str) -> Result<bool, HistoryError> {
        Ok(self.subscribers(&self.layout.group_channel(group)).await? > 0)
    }

    pub async fn user_is_connected(&self, user: &str) -> Result<bool, HistoryError> {
        Ok(self.subscribers(&self.layout.user_channel(user)).await? > 0)
    }

    pub async fn user_groups(&self, user: &str) -> Result<Vec<String>, HistoryError> {
        let key = self.layout.user_groups(user);
        let now = super::unix_ms();
        let read = async {
            let mut conn = self.link.conn().await?;
            redis::cmd("ZRANGE")
                .arg(&key)
                .arg(format!("({now}"))
                .arg("+inf")
                .arg("BYSCORE")
                .query_async(&mut conn)
                .await
        };
        self.observed(read.await)
    }

    pub async fn add_user_group(&self, user: &str, group: &str, ttl: Duration) -> Result<(), HistoryError> {
        let key = self.layout.user_groups(user);
        let now = super::unix_ms();
        let expires = now.saturating_add(ttl.as_millis() as i64);
        let mut pipe = redis::pipe();
        pipe.zadd(&key, group, expires).ignore();
        pipe.zrembyscore(&key, "-inf", now).ignore();
        // The set lives as long as its longest membership.
        pipe.cmd("PEXPIREAT").arg(&key).arg(expires).arg("GT").ignore();
        pipe.cmd("PEXPIREAT").arg(&key).arg(expires).arg("NX").ignore();
        let write = async { pipe.query_async::<()>(&mut self.link.conn().await?).await };
        self.observed(write.await)
    }

    pub async fn remove_user_groups(&self, user: &str, group: Option<&str>) -> Result<Vec<String>, HistoryError> {
        let key = self.layout.user_groups(user);
        let write = async {
            let mut conn = self.link.conn().await?;
            match group {
                Some(g) => {
                    let removed: i64 = redis::cmd("ZREM").arg(&key).arg(g).query_async(&mut conn).await?;
                    Ok(if removed > 0 { vec![g.to_string()] } else { Vec::new() })
                }
                None => {
                    let (groups, _): (Vec<String>, i64) =
                        redis::pipe().zrange(&key, 0, -1).del(&key).query_async(&mut conn).await?;
                    Ok(groups)
                }
            }
        };
        self.observed(write.await)
    }

    /// A payload received from Redis.
    fn receive(self: &Arc<Self>, channel: &str, payload: &[u8]) {
        if channel == self.layout.presence_changes() {
            match serde_json::from_slice::<PresenceChange>(payload) {
                Ok(change) => self.sink.presence(&change),
                Err(_) => {
                    self.metrics.invalid.inc();
                    tracing::warn!("ignoring a malformed presence change");
                }
            }
            return;
        }
        // Commands (on any chat channel: a node's, a user's, a group's or the
        // broadcasts') and answers (on this node's) are not chat messages.
        if let Some(command) = payload.strip_prefix(b"ctl ") {
            self.run_command(command);
            return;
        }
        if let Some(answer) = payload.strip_prefix(b"ans ") {
            if self.layout.is_node_channel(channel) {
                self.answered(answer);
            }
            return;
        }
        // What each kind of channel may carry: a broadcast, a group's
        // message, a user's, or one for a connection of this node's.
        let kind: fn(&ChatMessage) -> bool = if channel == self.layout.all_channel() {
            |m: &ChatMessage| m.address() == Address::All
        } else if self.layout.group_of(channel).is_some() {
            |m: &ChatMessage| matches!(m.address(), Address::Group(_))
        } else if self.layout.user_of(channel).is_some() {
            |m: &ChatMessage| matches!(m.address(), Address::User { .. })
        } else if self.layout.is_node_channel(channel) {
            |m: &ChatMessage| matches!(m.address(), Address::Connection(_))
        } else {
            return;
        };
        match history::parse_published(payload) {
            // A direct message between two users this node both has comes
            // on both users' channels: the first is delivered to both, and
            // the second is a repeat of its id.
            Some(m) if kind(&m) => self.deliver_stored(&m),
            _ => {
                self.metrics.invalid.inc();
                tracing::warn!(?channel, "ignoring malformed backplane payload");
            }
        }
    }

    fn last_ids(&self) -> std::sync::MutexGuard<'_, LastIds> {
        self.last_ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scopes this node follows: the broadcast (or only) stream, and
    /// with `per_group` each group with local members.
    fn followed(&self) -> Vec<history::Scope> {
        let mut scopes = vec![None];
        if self.layout.per_group() {
            scopes.extend(self.sink.local_groups().into_iter().map(Some));
        }
        scopes
    }

    /// Before subscribing to `scopes`: where delivery starts in each one
    /// not followed yet, its newest stored id. Read before subscribing (not
    /// after), so a message published in between is caught up from history
    /// rather than taken for one already passed when its publication arrives.
    async fn start_points(&self, scopes: &[history::Scope]) -> redis::RedisResult<()> {
        let new: Vec<&history::Scope> = {
            let mut last = self.last_ids();
            scopes.iter().filter(|s| last.get_mut(s.as_deref()).is_none()).collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        let mut conn = self.link.conn().await?;
        for scope in new {
            let newest = history::last_id(&mut conn, &self.layout.history(scope.as_deref())).await?;
            self.last_ids().start(scope.as_deref(), newest);
        }
        Ok(())
    }

    /// After (re)subscribing: everything stored after the last id passed,
    /// in every scope followed.
    async fn catch_up(&self) -> redis::RedisResult<usize> {
        let mut conn = self.link.conn().await?;
        let mut n = 0;
        for scope in self.followed() {
            let last = self.last_ids().get_mut(scope.as_deref()).cloned();
            let Some(last) = last else { continue };
            let key = self.layout.history(scope.as_deref());
            let missed = history::after(&mut conn, &key, &last, "+", self.history_len).await?;
            n += missed.len();
            for m in &missed {
                self.deliver_stored(m);
            }
        }
        Ok(n)
    }

    /// A group's channel is subscribed for its first local member: on
    /// `per_group`, where its delivery starts is read first. A user's
    /// messages are in the broadcast scope, followed from the start.
    async fn subscribe_to(&self, sub: &mut Subscription, what: &Follow) -> redis::RedisResult<()> {
        match what {
            Follow::Group(group) => {
                if self.layout.per_group() {
                    self.start_points(&[Some(group.to_string())]).await?;
                }
                sub.subscribe(&[self.layout.group_channel(group)]).await
            }
            Follow::User(user) => sub.subscribe(&[self.layout.user_channel(user)]).await,
        }
    }

    /// A group no longer followed: on `per_group` its position is
    /// forgotten, so that following it again later starts from then, not
    /// with what its new members never joined for.
    async fn unsubscribe_from(&self, sub: &mut Subscription, what: &Follow) -> redis::RedisResult<()> {
        match what {
            Follow::Group(group) => {
                if self.layout.per_group() {
                    self.last_ids().groups.remove(group);
                }
                sub.unsubscribe(&self.layout.group_channel(group)).await
            }
            Follow::User(user) => sub.unsubscribe(&self.layout.user_channel(user)).await,
        }
    }
}

/// Stores and publishes `batch` (one pipeline, or one per slot on a
/// cluster, all sent at once), loading the script first on every slot not
/// in `loaded` (once per slot: a master must have it before `EVALSHA`; all
/// answer the same SHA1, kept in `sha`). Stores are idempotent, so a batch
/// that fails anywhere is retried whole.
async fn store_batch(
    bp: &RedisBackplane,
    conn: &mut RedisConn,
    batch: &[Publication],
    sha: &mut Option<String>,
    loaded: &mut HashSet<Slot>,
) -> redis::RedisResult<()> {
    let mut slots: Vec<(String, Vec<&Publication>)> = Vec::new();
    let mut index: HashMap<Slot, usize> = HashMap::new();
    for p in batch {
        let key = bp.layout.history(bp.layout.scope_of(p.message.group.as_deref())).into_owned();
        let i = *index.entry(Slot::for_key(&key)).or_insert_with(|| {
            slots.push((key, Vec::new()));
            slots.len() - 1
        });
        slots[i].1.push(p);
    }
    for (slot, i) in &index {
        if sha.is_none() || !loaded.contains(slot) {
            *sha = Some(history::load_script(conn, &slots[*i].0, bp.sharded).await?);
            loaded.insert(*slot);
        }
    }
    let Some(s) = sha.as_deref() else { return Ok(()) };
    let sends = slots.iter().map(|(_, publications)| {
        let mut pipe = redis::pipe();
        let mut renewed: HashSet<&str> = HashSet::new();
        for p in publications {
            history::store_and_publish(&mut pipe, s, &bp.layout, bp.history_len, &p.channels, &p.message);
            if let Some(group) = bp.layout.scope_of(p.message.group.as_deref()) {
                if renewed.insert(group) {
                    let idle_ms = GROUP_HISTORY_IDLE.as_millis() as i64;
                    pipe.pexpire(bp.layout.history(Some(group)).as_ref(), idle_ms).ignore();
                }
            }
        }
        let mut c = conn.clone();
        async move { pipe.query_async::<Vec<String>>(&mut c).await }
    });
    for result in futures_util::future::join_all(sends).await {
        result?;
    }
    Ok(())
}

async fn publisher(bp: Arc<RedisBackplane>, mut rx: mpsc::Receiver<Publication>) {
    let mut batch: Vec<Publication> = Vec::with_capacity(BATCH);
    let mut delay = Duration::from_millis(100);
    // The script's SHA1 once loaded; loaded again after Redis forgot it.
    let mut sha: Option<String> = None;
    let mut loaded: HashSet<Slot> = HashSet::new();
    loop {
        if batch.is_empty() && rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let result = match bp.link.conn().await {
            Ok(mut c) => store_batch(&bp, &mut c, &batch, &mut sha, &mut loaded).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            if e.code() == Some("NOSCRIPT") {
                // Redis restarted and lost its script cache (or, on a
                // cluster, a replica promoted since took a slot): load it
                // again and retry at once (stored messages are not stored
                // again). Redis answered, so this says nothing of its state.
                sha = None;
                loaded.clear();
                continue;
            }
        }
        bp.link.observe(&result);
        match result {
            Ok(_) => {
                bp.metrics.published.inc_by(batch.len() as u64);
                delay = Duration::from_millis(100);
            }
            Err(e) if Failure::of(&e).retryable() => {
                bp.metrics.publish_failures.inc();
                tracing::debug!(error = %e, queued = batch.len(), "store and publish failed; retrying");
                // The sender's own clients should not wait for Redis: what is
                // queued now, and what is sent until the next attempt, reaches
                // them at once (without an id) and is stored later.
                for p in &batch {
                    bp.deliver_early(&p.message);
                }
                let retry_at = tokio::time::Instant::now() + delay;
                loop {
                    let mut more = Vec::new();
                    tokio::select! {
                        () = tokio::time::sleep_until(retry_at) => break,
                        n = rx.recv_many(&mut more, BATCH) => {
                            if n == 0 {
                                break;
                            }
                            for p in &more {
                                bp.deliver_early(&p.message);
                            }
                            batch.extend(more);
                        }
                    }
                }
                delay = backoff(delay);
                continue;
            }
            Err(e) => {
                bp.metrics.dropped.inc_by(batch.len() as u64);
                tracing::error!(error = %e, "redis refused a publish batch; delivered to this node only");
                for p in &batch {
                    bp.deliver_early(&p.message);
                }
            }
        }
        bp.pending.fetch_sub(batch.len(), Ordering::AcqRel);
        batch.clear();
    }
}

/// A new subscription connection: sharded on a Redis Cluster, else classic.
async fn subscription(bp: &RedisBackplane) -> redis::RedisResult<Subscription> {
    if let Some((conn, pushes)) = bp.link.shard_subscriber().await? {
        let tag = format!("{:016x}", rand::random::<u64>());
        return Ok(Subscription::Sharded(subscription::Sharded::new(conn, pushes, tag)));
    }
    let (sink, stream) = bp.link.client().await?.get_async_pubsub().await?.split();
    Ok(Subscription::Classic(sink, stream))
}

async fn subscriber(bp: Arc<RedisBackplane>, mut cmds: mpsc::UnboundedReceiver<SubCommand>) {
    let mut delay = Duration::from_millis(100);
    loop {
        if let Err(e) = bp.start_points(&bp.followed()).await {
            bp.link.set_up(false, Some(&e));
            tokio::time::sleep(delay).await;
            delay = backoff(delay);
            continue;
        }
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, subscription(&bp)).await;
        if let Ok(Ok(mut sub)) = connected {
            let mut channels = vec![
                bp.layout.all_channel().to_string(),
                bp.layout.presence_changes().to_string(),
                bp.layout.node_channel(&bp.node_id),
            ];
            channels.extend(bp.sink.local_groups().iter().map(|g| bp.layout.group_channel(g)));
            channels.extend(bp.sink.local_users().iter().map(|u| bp.layout.user_channel(u)));
            let subscribed = tokio::time::timeout(SUBSCRIPTION_DEADLINE, sub.subscribe(&channels)).await;
            match subscribed {
                Ok(Ok(())) => {
                    bp.link.set_up(true, None);
                    tracing::info!(channels = channels.len(), sharded = bp.sharded, "backplane subscribed");
                    delay = Duration::from_millis(100);
                    // Subscribed first, then read history: nothing falls between.
                    // Live only once caught up: a subscription with a gap
                    // behind it is dropped and made again.
                    let caught_up = match bp.catch_up().await {
                        Ok(0) => true,
                        Ok(n) => {
                            tracing::info!(messages = n, "caught up from history after resubscribing");
                            true
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not catch up from history; subscribing again");
                            false
                        }
                    };
                    bp.live.store(caught_up, Ordering::Release);
                    let mut ping = tokio::time::interval(SUBSCRIPTION_PING);
                    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    if caught_up {
                        loop {
                            tokio::select! {
                                msg = sub.next() => match msg {
                                    Some(m) => bp.receive(m.channel(), m.payload()),
                                    None => break,
                                },
                                _ = ping.tick() => {
                                    let probe = sub.probe(|m| bp.receive(m.channel(), m.payload()));
                                    if !tokio::time::timeout(SUBSCRIPTION_DEADLINE, probe).await.unwrap_or(false) {
                                        tracing::warn!("backplane subscription stopped answering");
                                        break;
                                    }
                                }
                                cmd = cmds.recv() => {
                                    let change = async {
                                        match cmd {
                                            Some(SubCommand::Subscribe(what, done)) => {
                                                let ok = bp.subscribe_to(&mut sub, &what).await.is_ok();
                                                if let (true, Some(done)) = (ok, done) {
                                                    let _ = done.send(());
                                                }
                                                ok
                                            }
                                            Some(SubCommand::Barrier(done)) => {
                                                let _ = done.send(());
                                                true
                                            }
                                            Some(SubCommand::Unsubscribe(what)) => bp.unsubscribe_from(&mut sub, &what).await.is_ok(),
                                            None => false,
                                        }
                                    };
                                    // Bounded like a PING: a silent connection must not hold the loop.
                                    if !tokio::time::timeout(SUBSCRIPTION_DEADLINE, change).await.unwrap_or(false) {
                                        if cmds.is_closed() {
                                            return;
                                        }
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    bp.live.store(false, Ordering::Release);
                    bp.link.set_up(false, None);
                    tracing::warn!("backplane subscription lost; reconnecting");
                }
                Ok(Err(e)) => bp.link.set_up(false, Some(&e)),
                Err(_) => bp.link.set_up(false, None),
            }
        } else if let Ok(Err(e)) = connected {
            bp.link.set_up(false, Some(&e));
        } else {
            bp.link.set_up(false, None);
        }
        tokio::time::sleep(delay).await;
        delay = backoff(delay);
    }
}
