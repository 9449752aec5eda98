//! One SignalR connection as the node sees it, independent of transport: its
//! public id and the `?id=` key it is registered under, the outbox, the
//! inbound record reader, which transport claimed it, the hub protocol its
//! handshake chose, its stateful-reconnect state when it asked for that, and
//! the clocks the keep-alive sweeper reads, all behind methods that keep its
//! invariants. `ConnectionTable` maps `?id=` values to
//! connections. Everything here is sized for tens of thousands of idle
//! connections: atomics instead of per-connection timers, no buffers until data
//! flows.

use crate::history::{ChatMessage, Replay, Scope};
use crate::outbox::{OutFrame, Outbox, PushError};
use crate::protocol::{HubProtocol, Outgoing, RecordReader};
use crate::stateful::Stateful;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;
use tokio::sync::Notify;

/// Whether the hub's `on_data` (or a replay, `replay::continue_replay`)
/// processed everything it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Done,
    /// The connection's outbox is full of replies: the rest waits in the
    /// reader until the transport has sent some (then call again with no data).
    Paused,
}

/// Milliseconds since the process started; cheap and monotonic.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Transport {
    WebSockets = 1,
    ServerSentEvents = 2,
    LongPolling = 3,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::WebSockets, Transport::ServerSentEvents, Transport::LongPolling];

    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSockets => "websockets",
            Transport::ServerSentEvents => "sse",
            Transport::LongPolling => "longpolling",
        }
    }

    /// Whether binary frames (MessagePack) travel on it: not on Server-Sent
    /// Events, which carry text lines.
    pub fn carries_binary(self) -> bool {
        !matches!(self, Transport::ServerSentEvents)
    }

    /// Whether SignalR's stateful reconnect works on it (a new socket takes
    /// the connection over): only WebSockets, as in the official server.
    pub fn can_be_stateful(self) -> bool {
        matches!(self, Transport::WebSockets)
    }

    /// Whether the client sends with `POST /chathub` (the server-to-client
    /// half is a stream or a poll); a WebSocket sends on itself.
    pub fn takes_posts(self) -> bool {
        !matches!(self, Transport::WebSockets)
    }

    /// Whether the client fetches with polls, which it may stop making (the
    /// keep-alive sweeper then forgets it) and may end with `DELETE`.
    pub fn is_polled(self) -> bool {
        matches!(self, Transport::LongPolling)
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Transport::WebSockets),
            2 => Some(Transport::ServerSentEvents),
            3 => Some(Transport::LongPolling),
            _ => None,
        }
    }
}

/// Why a transport request may not use a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum AttachError {
    /// A second WebSocket or event stream for the same id (409).
    AlreadyConnected,
    /// A different transport than the one the connection started with (400).
    WrongTransport,
}

/// Long-polling bookkeeping: a newer poll supersedes the older one.
#[derive(Default)]
struct LongPoll {
    started: AtomicBool,
    generation: AtomicU64,
    superseded: Notify,
    active: AtomicU32,
    last_poll_ms: AtomicU64,
}

/// Size limits of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest incoming hub message.
    pub max_message: usize,
    /// Frames and bytes the outbox holds for a client.
    pub max_frames: usize,
    pub max_bytes: usize,
}

/// One connection. Its state changes only through the methods below, each
/// of which keeps an invariant: a transport attaches once (long polling
/// repeatedly), the handshake completes once, a connection is forgotten
/// once, a newer poll supersedes an older one, live chat messages wait while
/// a replay runs and never repeat one.
pub struct Connection {
    /// The public id: shown to other clients, never a key to a transport.
    pub connection_id: String,
    /// The `?id=` value: the secret token (told to a negotiate-v0 client as
    /// its `connectionId`). Never shown to anyone but this connection's client.
    pub key: String,
    pub outbox: Outbox,
    /// Held while a batch of client bytes is processed, which also serialises
    /// concurrent long-polling sends, as the official server's write lock does.
    reader: tokio::sync::Mutex<RecordReader>,
    handshaken: AtomicBool,
    protocol: AtomicU8,
    options: ConnectionOptions,
    /// Live chat messages held while `Resume` replays, and how far it replayed.
    live_gate: Mutex<LiveGate>,
    /// A `Resume` replay paused for a full outbox (see `replay`).
    replay: Mutex<Option<Box<Replay>>>,
    /// Id of the first chat message delivered live (in the broadcast, or
    /// the only, scope): live delivery is in id order, so `Resume` need
    /// replay only what is older than it.
    first_live_id: OnceLock<String>,
    /// The same for each group scope (when groups have their own ids),
    /// while the connection is in the group (see `left_group`).
    first_live_in_groups: Mutex<Vec<(String, String)>>,
    /// Groups joined after live delivery began, with the first id of each
    /// that then reached this connection live (see `missed_before_join`).
    late_joins: Mutex<Vec<LateJoin>>,
    has_late_joins: AtomicBool,
    stateful: OnceLock<Box<Stateful>>,
    created_ms: u64,
    last_sent_ms: AtomicU64,
    last_received_ms: AtomicU64,
    long_poll: LongPoll,
    removed: AtomicBool,
    transport: AtomicU8,
    /// The signed-in user (from the token at negotiate), and when the newest
    /// token shown for this connection expires (Unix seconds; 0 = never).
    user: OnceLock<Box<str>>,
    auth_expires: AtomicU64,
    /// The name this connection is online as (see `App::go_online_as`).
    presence: Mutex<Option<Box<str>>>,
    /// How often it may rename itself; made at its first rename.
    renames: OnceLock<Box<governor::DefaultDirectRateLimiter>>,
}

/// Renames a connection may make at once, then one per second.
const RENAME_BURST: u32 = 5;

/// Marks a long poll as running for its lifetime, however it ends.
pub struct PollGuard<'a>(&'a Connection);

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        let lp = &self.0.long_poll;
        lp.last_poll_ms.store(now_ms(), Ordering::Release);
        lp.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A group joined after live delivery began, and the id of its first
/// message that then reached the connection live.
type LateJoin = (String, Option<(u64, u64)>);

impl Connection {
    /// A connection as negotiated. A client that tracks message ids may
    /// resume, so its live chat messages are held from the start until it
    /// calls `Resume` (or reads history, or a moment passes): the replay
    /// then comes before anything newer and its last id is always its newest.
    pub fn new(connection_id: String, key: String, limits: Limits, options: ConnectionOptions) -> Self {
        let now = now_ms();
        let held = options.message_ids.then(Vec::new);
        Connection {
            connection_id,
            key,
            outbox: Outbox::new(limits.max_frames, limits.max_bytes),
            reader: tokio::sync::Mutex::new(RecordReader::new(limits.max_message)),
            handshaken: AtomicBool::new(false),
            protocol: AtomicU8::new(HubProtocol::Json as u8),
            options,
            live_gate: Mutex::new(LiveGate { held, ..LiveGate::default() }),
            replay: Mutex::new(None),
            first_live_id: OnceLock::new(),
            first_live_in_groups: Mutex::new(Vec::new()),
            late_joins: Mutex::new(Vec::new()),
            has_late_joins: AtomicBool::new(false),
            stateful: OnceLock::new(),
            created_ms: now,
            last_sent_ms: AtomicU64::new(now),
            last_received_ms: AtomicU64::new(now),
            long_poll: LongPoll::default(),
            removed: AtomicBool::new(false),
            transport: AtomicU8::new(0),
            user: OnceLock::new(),
            auth_expires: AtomicU64::new(0),
            presence: Mutex::new(None),
            renames: OnceLock::new(),
        }
    }

    /// Marks the connection as `identity`'s, once, when it is created.
    pub fn sign_in(&self, identity: &crate::auth::Identity) {
        let _ = self.user.set(identity.name.clone().into_boxed_str());
        self.auth_expires.store(identity.expires.unwrap_or(0), Ordering::Release);
    }

    /// The signed-in user's name, if the connection was opened with a token.
    pub fn user(&self) -> Option<&str> {
        self.user.get().map(|u| &**u)
    }

    /// Whether a later request's identity may use this connection: a
    /// signed-in connection only with a token for the same user, whose
    /// expiry then extends the connection's (long polling refreshes tokens).
    pub fn admits(&self, identity: Option<&crate::auth::Identity>) -> Result<(), crate::auth::AuthError> {
        use crate::auth::AuthError;
        match (self.user(), identity) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(AuthError::Missing),
            (Some(user), Some(who)) if who.name != user => Err(AuthError::OtherUser),
            (Some(_), Some(who)) => {
                if let Some(exp) = who.expires {
                    self.auth_expires.fetch_max(exp, Ordering::AcqRel);
                }
                Ok(())
            }
        }
    }

    /// Whether the sign-in has run out at `now_secs`; true once only.
    pub fn take_auth_expiry(&self, now_secs: u64) -> bool {
        self.auth_expires
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |exp| (exp != 0 && now_secs >= exp).then_some(0))
            .is_ok()
    }

    /// The client asked for stateful reconnect at negotiate (and the node allows it).
    pub fn wants_stateful(&self) -> bool {
        self.options.stateful_reconnect
    }

    /// The client opted in with `?messageIds=true`: chat events carry the id.
    pub fn message_ids(&self) -> bool {
        self.options.message_ids
    }

    /// The record reader, locked while one batch of client bytes is processed.
    pub async fn reader(&self) -> tokio::sync::MutexGuard<'_, RecordReader> {
        self.reader.lock().await
    }

    /// Records a completed handshake; true the first time.
    pub fn complete_handshake(&self) -> bool {
        !self.handshaken.swap(true, Ordering::AcqRel)
    }

    /// Whether `SetUser` may rename this connection now: a burst of
    /// `RENAME_BURST`, then one a second.
    pub fn may_rename(&self) -> bool {
        use governor::{Quota, RateLimiter};
        use std::num::NonZeroU32;
        let limiter = self.renames.get_or_init(|| {
            let burst = NonZeroU32::new(RENAME_BURST).unwrap_or(NonZeroU32::MIN);
            Box::new(RateLimiter::direct(Quota::per_second(NonZeroU32::MIN).allow_burst(burst)))
        });
        limiter.check().is_ok()
    }

    /// The name this connection is online as, if any.
    pub fn presence_slot(&self) -> &Mutex<Option<Box<str>>> {
        &self.presence
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Marks the connection forgotten; true only the first time, so its
    /// cleanup runs once.
    pub fn mark_removed(&self) -> bool {
        !self.removed.swap(true, Ordering::AcqRel)
    }

    pub fn age_ms(&self, now: u64) -> u64 {
        now.saturating_sub(self.created_ms)
    }

    pub fn silent_for_ms(&self, now: u64) -> u64 {
        now.saturating_sub(self.last_received_ms.load(Ordering::Relaxed))
    }

    pub fn unsent_for_ms(&self, now: u64) -> u64 {
        now.saturating_sub(self.last_sent_ms.load(Ordering::Relaxed))
    }

    /// Starts a long poll; true when it is the connection's first (which
    /// answers at once). The guard counts it as running until dropped.
    pub fn start_poll(&self) -> (PollGuard<'_>, bool) {
        self.long_poll.active.fetch_add(1, Ordering::AcqRel);
        let first = !self.long_poll.started.swap(true, Ordering::AcqRel);
        (PollGuard(self), first)
    }

    /// Supersedes every poll waiting now; returns the new poll generation.
    pub fn supersede_polls(&self) -> u64 {
        let generation = self.long_poll.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.long_poll.superseded.notify_waiters();
        generation
    }

    /// Resolves once a poll newer than `generation` has started.
    pub async fn superseded(&self, generation: u64) {
        loop {
            let notified = self.long_poll.superseded.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.long_poll.generation.load(Ordering::Acquire) != generation {
                return;
            }
            notified.await;
        }
    }

    /// No poll is running and none has for `limit_ms`.
    pub fn unpolled_for(&self, now: u64, limit_ms: u64) -> bool {
        self.long_poll.active.load(Ordering::Acquire) == 0
            && now.saturating_sub(self.long_poll.last_poll_ms.load(Ordering::Acquire)) >= limit_ms
    }

    pub fn transport(&self) -> Option<Transport> {
        Transport::from_u8(self.transport.load(Ordering::Acquire))
    }

    /// Claims the connection for `t`. Long polling may poll many times; a
    /// WebSocket or event stream may attach once.
    pub fn attach(&self, t: Transport) -> Result<(), AttachError> {
        match self.transport.compare_exchange(0, t as u8, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(()),
            Err(cur) if cur == t as u8 && t == Transport::LongPolling => Ok(()),
            Err(cur) if cur == t as u8 => Err(AttachError::AlreadyConnected),
            Err(_) => Err(AttachError::WrongTransport),
        }
    }

    /// Queues a frame for the client; `sequenced` frames are numbered and
    /// kept for resending when stateful reconnect is on. A `reply` (to the
    /// client's own request) is never refused for a full outbox.
    pub fn send(&self, frame: Bytes, sequenced: bool, reply: bool) -> Result<(), PushError> {
        match self.stateful() {
            Some(st) if sequenced => st.push(&self.outbox, frame, reply)?,
            _ if reply => self.outbox.push_reply(OutFrame::plain(frame))?,
            _ => self.outbox.push(OutFrame::plain(frame))?,
        }
        self.last_sent_ms.store(now_ms(), Ordering::Relaxed);
        Ok(())
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, LiveGate> {
        self.live_gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns `d` to deliver now; keeps it while a `Resume` replays; or
    /// drops it when a replay already sent it (the replay read history after
    /// the message was stored, but the backplane handed it to this node
    /// only later).
    pub fn gate_live<'a>(&self, d: &'a Arc<ChatDelivery>) -> Option<&'a Arc<ChatDelivery>> {
        let mut gate = self.gate();
        if let Some(held) = gate.held.as_mut() {
            held.push(d.clone());
            return None;
        }
        (!gate.replayed(d)).then_some(d)
    }

    /// Whether a replay of this connection already sent `d`.
    pub fn already_replayed(&self, d: &ChatDelivery) -> bool {
        self.gate().replayed(d)
    }

    /// Records that a chat message was delivered live.
    pub fn note_live(&self, d: &ChatDelivery) {
        let (Some(id), group) = (d.message.id.as_deref(), d.message.group.as_deref()) else { return };
        match d.scope.as_deref() {
            None => {
                let _ = self.first_live_id.get_or_init(|| id.to_string());
            }
            Some(scope) => {
                let mut firsts = self.first_live_in_groups.lock().unwrap_or_else(|p| p.into_inner());
                if !firsts.iter().any(|(g, _)| g == scope) {
                    firsts.push((scope.to_string(), id.to_string()));
                }
            }
        }
        if let (true, Some(group)) = (self.has_late_joins(), group) {
            let mut joins = self.late_joins.lock().unwrap_or_else(|p| p.into_inner());
            for (g, first_live) in joins.iter_mut() {
                if g == group && first_live.is_none() {
                    *first_live = crate::history::parse_id(id);
                }
            }
        }
    }

    /// The connection left `group`: what reached it live there says
    /// nothing of what it misses until it joins again.
    pub fn left_group(&self, group: &str) {
        let mut firsts = self.first_live_in_groups.lock().unwrap_or_else(|p| p.into_inner());
        firsts.retain(|(g, _)| g != group);
    }

    /// The first id delivered live in `scope`.
    pub fn first_live_id(&self, scope: Option<&str>) -> Option<String> {
        match scope {
            None => self.first_live_id.get().cloned(),
            Some(scope) => {
                let firsts = self.first_live_in_groups.lock().unwrap_or_else(|p| p.into_inner());
                firsts.iter().find(|(g, _)| g == scope).map(|(_, id)| id.clone())
            }
        }
    }

    /// Records that `group` was joined after live delivery to this
    /// connection began: until its first message reaches the connection
    /// live, none of the group's messages did.
    pub fn note_late_join(&self, group: &str) {
        let mut joins = self.late_joins.lock().unwrap_or_else(|p| p.into_inner());
        if !joins.iter().any(|(g, _)| g == group) {
            joins.push((group.to_string(), None));
        }
        self.has_late_joins.store(true, Ordering::Release);
    }

    pub fn has_late_joins(&self) -> bool {
        self.has_late_joins.load(Ordering::Acquire)
    }

    /// Whether a message of `group` with `id`, though newer than the first
    /// live one, did not reach this connection live: its group was joined
    /// later, and it is older than the group's first live message here.
    pub fn missed_before_join(&self, group: Option<&str>, id: &str) -> bool {
        let (Some(group), Some(id)) = (group, crate::history::parse_id(id)) else { return false };
        if !self.has_late_joins() {
            return false;
        }
        let joins = self.late_joins.lock().unwrap_or_else(|p| p.into_inner());
        joins.iter().any(|(g, first_live)| g == group && first_live.is_none_or(|f| id < f))
    }

    /// Starts holding live chat messages: a `Resume` began.
    pub fn begin_resume(&self) {
        let mut gate = self.gate();
        gate.held.get_or_insert_with(Vec::new);
        gate.replaying = true;
    }

    /// Keeps a paused replay until the outbox has room again.
    pub fn set_replay(&self, replay: Replay) {
        *self.replay.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(replay));
    }

    pub fn take_replay(&self) -> Option<Replay> {
        self.replay.lock().unwrap_or_else(|p| p.into_inner()).take().map(|b| *b)
    }

    pub fn is_holding(&self) -> bool {
        self.gate().held.is_some()
    }

    /// Holding for a client that has neither resumed nor read history
    /// within `grace_ms` of connecting (and is not replaying now).
    pub fn hold_outlived(&self, now: u64, grace_ms: u64) -> bool {
        let gate = self.gate();
        gate.held.is_some() && !gate.replaying && self.age_ms(now) >= grace_ms
    }

    /// Stops holding and returns what arrived meanwhile, in arrival order.
    /// `replayed` has the newest id the replay passed in each scope: live
    /// messages up to it that arrive from now on are repeats and are dropped.
    pub fn end_resume(&self, replayed: &[(Scope, String)]) -> Vec<Arc<ChatDelivery>> {
        let mut gate = self.gate();
        gate.replaying = false;
        for (scope, id) in replayed {
            let Some(id) = crate::history::parse_id(id) else { continue };
            match gate.replayed_through.iter_mut().find(|(s, _)| s == scope) {
                Some((_, through)) => *through = (*through).max(id),
                None => gate.replayed_through.push((scope.clone(), id)),
            }
        }
        gate.held.take().unwrap_or_default()
    }

    pub fn protocol(&self) -> HubProtocol {
        HubProtocol::from_u8(self.protocol.load(Ordering::Acquire))
    }

    pub fn set_protocol(&self, p: HubProtocol) {
        self.protocol.store(p as u8, Ordering::Release);
    }

    pub fn stateful(&self) -> Option<&Stateful> {
        self.stateful.get().map(|b| &**b)
    }

    /// Turns stateful reconnect on (once, at the handshake).
    pub fn enable_stateful(&self, st: Stateful) {
        let _ = self.stateful.set(Box::new(st));
    }

    pub fn touch_received(&self) {
        self.last_received_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn is_handshaken(&self) -> bool {
        self.handshaken.load(Ordering::Acquire)
    }
}

/// Live delivery's gate for one connection during and after `Resume`.
#[derive(Default)]
struct LiveGate {
    /// `Some` while a replay runs (or the client has yet to resume).
    held: Option<Vec<Arc<ChatDelivery>>>,
    /// A `Resume` is replaying now (the sweeper must not release the hold).
    replaying: bool,
    /// The newest id replays passed, per scope.
    replayed_through: Vec<(Scope, (u64, u64))>,
}

impl LiveGate {
    fn replayed(&self, d: &ChatDelivery) -> bool {
        let Some(id) = d.id else { return false };
        self.replayed_through.iter().any(|(scope, through)| *scope == d.scope && id <= *through)
    }
}

/// What a client chose when it connected.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectionOptions {
    pub stateful_reconnect: bool,
    pub message_ids: bool,
}

/// A chat message on its way to this node's connections: the event without
/// the id and, for connections that asked for ids, with it; each encoded at
/// most once per protocol.
pub struct ChatDelivery {
    /// The message id, parsed once for every connection's gate.
    id: Option<(u64, u64)>,
    /// The history its id belongs to.
    pub scope: Scope,
    pub message: ChatMessage,
    plain: Outgoing,
    with_id: OnceLock<Outgoing>,
}

impl ChatDelivery {
    /// `per_group`: each group has its own ids (see `Backplane::per_group`).
    pub fn new(message: ChatMessage, per_group: bool) -> Self {
        let id = message.id.as_deref().and_then(crate::history::parse_id);
        let scope = crate::history::scope_of(message.group.as_deref(), per_group).map(String::from);
        ChatDelivery { id, scope, plain: Outgoing::new(message.event(false)), with_id: OnceLock::new(), message }
    }

    pub fn for_connection(&self, c: &Connection) -> &Outgoing {
        if c.message_ids() {
            self.with_id.get_or_init(|| Outgoing::new(self.message.event(true)))
        } else {
            &self.plain
        }
    }
}

/// The node's connections by key (what transports name them by), with the
/// ids others know them by (the server API) mapped to keys.
#[derive(Default)]
pub struct ConnectionTable {
    map: RwLock<Tables>,
}

#[derive(Default)]
struct Tables {
    by_key: HashMap<String, Arc<Connection>>,
    key_of_id: HashMap<String, String>,
}

impl ConnectionTable {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, conn: Arc<Connection>) {
        let mut t = self.write();
        t.key_of_id.insert(conn.connection_id.clone(), conn.key.clone());
        t.by_key.insert(conn.key.clone(), conn);
    }

    pub fn get(&self, key: &str) -> Option<Arc<Connection>> {
        self.read().by_key.get(key).cloned()
    }

    /// The connection whose id (not key) is `id`.
    pub fn by_id(&self, id: &str) -> Option<Arc<Connection>> {
        let t = self.read();
        t.key_of_id.get(id).and_then(|k| t.by_key.get(k)).cloned()
    }

    pub fn remove(&self, key: &str) -> Option<Arc<Connection>> {
        let mut t = self.write();
        let conn = t.by_key.remove(key)?;
        if t.key_of_id.get(&conn.connection_id).is_some_and(|k| k == key) {
            t.key_of_id.remove(&conn.connection_id);
        }
        Some(conn)
    }

    pub fn len(&self) -> usize {
        self.read().by_key.len()
    }

    /// Every connection, copied out so callers never hold the lock across work.
    pub fn all(&self) -> Vec<Arc<Connection>> {
        self.read().by_key.values().cloned().collect()
    }

    /// The connections that have completed their handshake, copied out:
    /// a broadcast then sends without holding the table's lock, so new
    /// connections never wait for it.
    pub fn handshaken(&self) -> Vec<Arc<Connection>> {
        self.read().by_key.values().filter(|c| c.is_handshaken()).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_message: 100, max_frames: 10, max_bytes: 1000 };

    fn conn() -> Connection {
        Connection::new("c".into(), "k".into(), LIMITS, ConnectionOptions::default())
    }

    #[test]
    fn websocket_attaches_once() {
        let c = conn();
        assert_eq!(c.attach(Transport::WebSockets), Ok(()));
        assert_eq!(c.attach(Transport::WebSockets), Err(AttachError::AlreadyConnected));
        assert_eq!(c.attach(Transport::LongPolling), Err(AttachError::WrongTransport));
    }

    #[test]
    fn long_polling_attaches_repeatedly() {
        let c = conn();
        assert_eq!(c.attach(Transport::LongPolling), Ok(()));
        assert_eq!(c.attach(Transport::LongPolling), Ok(()));
        assert_eq!(c.attach(Transport::ServerSentEvents), Err(AttachError::WrongTransport));
        assert_eq!(c.transport(), Some(Transport::LongPolling));
    }

    fn delivery(id: &str) -> Arc<ChatDelivery> {
        delivery_in(id, None, false)
    }

    fn delivery_in(id: &str, group: Option<&str>, per_group: bool) -> Arc<ChatDelivery> {
        let message = crate::history::ChatMessage {
            id: Some(id.into()),
            uid: id.into(),
            group: group.map(String::from),
            user: "u".into(),
            message: "m".into(),
            connection_id: "c".into(),
            node_id: "n".into(),
            timestamp: String::new(),
            ..Default::default()
        };
        Arc::new(ChatDelivery::new(message, per_group))
    }

    #[test]
    fn a_message_id_client_has_its_live_messages_held_until_it_resumes_or_the_grace_passes() {
        let opts = ConnectionOptions { message_ids: true, ..ConnectionOptions::default() };
        let c = Connection::new("c".into(), "k".into(), LIMITS, opts);
        assert!(c.gate_live(&delivery("1-0")).is_none(), "held from the start");
        let now = now_ms();
        assert!(!c.hold_outlived(now, 60_000));
        assert!(c.hold_outlived(now + 60_000, 60_000));
        c.begin_resume();
        assert!(!c.hold_outlived(now + 60_000, 60_000), "never released under a running replay");
        assert_eq!(c.end_resume(&[]).len(), 1);
        assert!(!c.is_holding());
        assert!(conn().gate_live(&delivery("1-0")).is_some(), "other clients get them at once");
    }

    #[test]
    fn polls_supersede_each_other_and_are_counted() {
        let c = conn();
        let (first, is_first) = c.start_poll();
        assert!(is_first);
        let g = c.supersede_polls();
        assert!(!c.unpolled_for(now_ms() + 1_000_000, 10), "a poll is running");
        drop(first);
        assert!(c.unpolled_for(now_ms() + 1_000_000, 10));
        let (_second, is_first) = c.start_poll();
        assert!(!is_first);
        c.supersede_polls();
        // Resolves at once: a newer generation exists.
        futures_util::FutureExt::now_or_never(c.superseded(g)).expect("superseded");
        assert!(c.mark_removed() && !c.mark_removed(), "removed once");
        assert!(c.complete_handshake() && !c.complete_handshake());
    }

    #[test]
    fn live_messages_wait_for_the_replay_and_never_repeat_it() {
        let c = conn();
        c.begin_resume();
        assert!(c.gate_live(&delivery("5-0")).is_none(), "held while replaying");
        assert!(c.gate_live(&delivery("7-0")).is_none());
        // The replay sent up to 6-0: of the held ones only 7-0 is new, and
        // 6-0 (stored before the replay read it, but handed to this node by
        // the backplane only afterwards) must not go out a second time.
        let through = [(None, "6-0".to_string())];
        let held: Vec<_> = c.end_resume(&through).into_iter().map(|d| d.message.id.clone()).collect();
        assert_eq!(held, [Some("5-0".to_string()), Some("7-0".to_string())]);
        assert!(c.gate_live(&delivery("6-0")).is_none(), "replayed already");
        assert!(c.gate_live(&delivery("6-1")).is_some());
        // A later, shorter replay does not move the floor back.
        c.begin_resume();
        let _ = c.end_resume(&[(None, "2-0".to_string())]);
        assert!(c.gate_live(&delivery("6-0")).is_none());
    }

    /// With a stream per group, ids count in their own scope: what a replay
    /// passed in one says nothing of another, and first live ids are kept
    /// per scope.
    #[test]
    fn per_group_the_gate_and_first_live_ids_keep_to_each_scope() {
        let c = conn();
        c.begin_resume();
        let _ = c.end_resume(&[(Some("ops".to_string()), "6-0".to_string())]);
        assert!(c.gate_live(&delivery_in("5-0", Some("ops"), true)).is_none(), "replayed in ops");
        let dev = delivery_in("5-0", Some("dev"), true);
        assert!(c.gate_live(&dev).is_some(), "another group's ids are its own");
        assert!(c.gate_live(&delivery_in("5-0", None, true)).is_some(), "and the broadcasts' too");
        c.note_live(&dev);
        c.note_live(&delivery_in("9-0", Some("dev"), true));
        c.note_live(&delivery_in("2-0", None, true));
        assert_eq!(c.first_live_id(Some("dev")).as_deref(), Some("5-0"));
        assert_eq!(c.first_live_id(None).as_deref(), Some("2-0"));
        assert_eq!(c.first_live_id(Some("ops")), None);
        c.left_group("dev");
        assert_eq!(c.first_live_id(Some("dev")), None, "a group left starts afresh");
        // One stream: a group message's id is the broadcasts' scope's.
        let one = conn();
        one.note_live(&delivery_in("3-0", Some("ops"), false));
        assert_eq!(one.first_live_id(None).as_deref(), Some("3-0"));
    }
}
