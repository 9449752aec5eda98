//! The node's shared state, one `Arc<App>` passed to every handler and task:
//! configuration, identity, the connection table, local groups, the Redis link
//! and backplane, metrics and the draining flag. It also owns the operations
//! every layer needs: queueing a message for a connection (a reply the client
//! asked for, or traffic it did not), delivering a chat message to the local
//! connections its address names (everyone, a group's members, or a direct
//! message's two users), and forgetting a connection exactly once.

use crate::backplane::{Backplane, BackplaneMetrics};
use crate::config::NodeConfig;
use crate::connection::{ChatDelivery, Connection, ConnectionOptions, ConnectionTable, Limits};
use crate::groups::LocalGroups;
use crate::history::{Address, ChatMessage};
use crate::metrics::Metrics;
use crate::outbox::{OutFrame, PushError};
use crate::presence::{Presence, PresenceTasks};
use crate::protocol::{HubMessage, Outgoing};
use crate::redis_link::RedisLink;
use crate::users::LocalUsers;
use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct App {
    pub cfg: NodeConfig,
    pub node_id: String,
    pub url: String,
    pub name: String,
    pub started_at: DateTime<Utc>,
    pub connections: ConnectionTable,
    pub groups: LocalGroups,
    /// Which local connections belong to which user (see `users`).
    pub users: LocalUsers,
    pub redis: Arc<RedisLink>,
    pub backplane: Backplane,
    pub metrics: Metrics,
    pub auth: crate::auth::Auth,
    pub origins: crate::cors::AllowedOrigins,
    /// Who is online across the cluster (see `presence`).
    pub presence: Presence,
    /// The receiving ends of presence's queues, until `lifecycle` starts its tasks.
    pub presence_tasks: std::sync::Mutex<Option<PresenceTasks>>,
    /// History reads, bounded and shared (see `history_reads`).
    pub history_reads: crate::history_reads::HistoryReads,
    /// The server API's access key; no server API without one.
    pub api_key: Option<crate::api::auth::AccessKey>,
    /// Where upstream events go, if anywhere (see `upstream`).
    pub upstream: Option<Arc<crate::upstream::Upstream>>,
    draining: AtomicBool,
}

impl App {
    /// The node's state with the Redis backplane.
    pub fn new(cfg: NodeConfig) -> Result<Arc<Self>, String> {
        Self::with_backplane(cfg, |cfg, link, metrics| {
            let b = crate::backplane::redis::RedisBackplane::new(
                link,
                metrics,
                &cfg.key_prefix,
                cfg.history_len,
                &cfg.node_id(),
            );
            Backplane::Redis(Arc::new(b))
        })
    }

    /// The node's state with the backplane `make` builds (tests use the
    /// in-memory one). The Redis link is made either way; it connects only
    /// when first used.
    pub fn with_backplane(
        cfg: NodeConfig,
        make: impl FnOnce(&NodeConfig, Arc<RedisLink>, BackplaneMetrics) -> Backplane,
    ) -> Result<Arc<Self>, String> {
        let metrics = Metrics::new();
        metrics.preset(&crate::connection::Transport::ALL.map(|t| t.label()));
        let target = switchboard_common::redis_target::RedisTarget::open(cfg.redis.as_str())
            .map_err(|e| format!("invalid redis URL: {e}"))?;
        // Every key and channel is named from the prefix as written in
        // Redis: hash-tagged in a Redis Cluster (see `RedisTarget::key_prefix`).
        let mut cfg = cfg;
        cfg.key_prefix = target.key_prefix(&cfg.key_prefix);
        let auth = crate::auth::Auth::from_config(&cfg)?;
        let api_key = match cfg.api_access_key.as_str() {
            "" => None,
            key => Some(crate::api::auth::AccessKey::parse(key).map_err(|e| format!("api_access_key: {e}"))?),
        };
        let node_id = cfg.node_id();
        let redis = Arc::new(RedisLink::new(target, metrics.redis_up.clone()));
        let backplane = make(&cfg, redis.clone(), metrics.backplane());
        let (presence, presence_tasks) = Presence::new(node_id.clone());
        let history_reads = crate::history_reads::HistoryReads::new(metrics.history_reads_shared.clone());
        let upstream = crate::upstream::Upstream::new(&cfg, metrics.upstream_calls.clone())?;
        Ok(Arc::new(App {
            presence,
            presence_tasks: std::sync::Mutex::new(Some(presence_tasks)),
            url: cfg.advertise_url(),
            name: cfg.name.clone().unwrap_or_else(|| format!("Node {node_id}")),
            node_id,
            started_at: Utc::now(),
            connections: ConnectionTable::default(),
            groups: LocalGroups::default(),
            users: LocalUsers::default(),
            redis,
            backplane,
            metrics,
            auth,
            origins: crate::cors::AllowedOrigins::new(&cfg.allowed_origins),
            history_reads,
            api_key,
            upstream,
            draining: AtomicBool::new(false),
            cfg,
        }))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.metrics.draining.set(1);
    }

    pub fn new_connection(&self, connection_id: String, key: String, options: ConnectionOptions) -> Arc<Connection> {
        let cfg = &self.cfg;
        let limits = Limits {
            max_message: cfg.max_message_bytes,
            max_frames: cfg.max_buffered_frames,
            max_bytes: cfg.max_buffered_bytes,
        };
        let conn = Arc::new(Connection::new(connection_id, key, limits, options));
        self.connections.insert(conn.clone());
        conn
    }

    /// Queues `out`, in the connection's protocol, for `conn`; a client too
    /// slow to keep up is disconnected.
    pub fn send_to(&self, conn: &Connection, out: &Outgoing) {
        self.queue(conn, out, false);
    }

    /// Queues the answer to something `conn` asked for: never refused for a
    /// full outbox (the transports stop reading instead).
    pub fn reply(&self, conn: &Connection, message: HubMessage) {
        self.reply_to(conn, &Outgoing::new(message));
    }

    /// `reply` for a message already encoded for many (a replayed or held
    /// chat message the client's `Resume` asked for).
    pub fn reply_to(&self, conn: &Connection, out: &Outgoing) {
        self.queue(conn, out, true);
    }

    fn queue(&self, conn: &Connection, out: &Outgoing, reply: bool) {
        if !self.push(conn, out, reply) {
            self.too_slow(conn);
        }
    }

    /// `send_to` for a caller holding a lock that `close` may need: false
    /// when `conn`'s outbox is full, and the caller then calls `too_slow`.
    pub fn try_send_to(&self, conn: &Connection, out: &Outgoing) -> bool {
        self.push(conn, out, false)
    }

    fn push(&self, conn: &Connection, out: &Outgoing, reply: bool) -> bool {
        match conn.send(out.bytes(conn.protocol()), out.is_sequenced(), reply) {
            Ok(()) => self.metrics.messages_sent.inc(),
            Err(PushError::Closed) => {}
            Err(PushError::Full) => return false,
        }
        true
    }

    /// Disconnects a client that cannot keep up with what it is sent.
    pub fn too_slow(&self, conn: &Connection) {
        tracing::warn!(connection = %conn.connection_id, "client cannot keep up; disconnecting");
        self.metrics.slow_client_disconnects.inc();
        self.close(
            conn,
            Some("Connection closed with an error: the client is too slow to receive messages.".into()),
            false,
        );
    }

    /// Queues one message for one connection.
    pub fn send_message(&self, conn: &Connection, message: HubMessage) {
        self.send_to(conn, &Outgoing::new(message));
    }

    /// Delivers a chat message to every local connection that should see
    /// it (everyone, the group's members, or a direct message's sender's
    /// and recipient's connections but the one that sent it), encoded once
    /// per protocol and per form (with the message id for connections that
    /// asked for it). A connection in the middle of `Resume` holds it until
    /// the replay is done.
    pub fn deliver_chat(&self, message: &ChatMessage) {
        let delivery = Arc::new(ChatDelivery::new(message.clone(), self.backplane.per_group()));
        let offer = |c: &Arc<Connection>| {
            if !message.excluded.is_empty() && message.excluded.contains(&c.connection_id) {
                return;
            }
            if let Some(d) = c.gate_live(&delivery) {
                c.note_live(d);
                self.send_to(c, d.for_connection(c));
            }
        };
        // `but`: a connection left out (a direct message's sender has its Completion instead).
        let offer_keys = |keys: Vec<String>, but: Option<&str>| {
            for c in keys.iter().filter_map(|k| self.connections.get(k)) {
                if Some(c.connection_id.as_str()) != but {
                    offer(&c);
                }
            }
        };
        match message.address() {
            Address::All => self.connections.handshaken().iter().for_each(offer),
            Address::Group(g) => offer_keys(self.groups.members(g), None),
            Address::User { to, from } => {
                let mut keys = self.users.connections(to);
                if to != from && !from.is_empty() {
                    keys.extend(self.users.connections(from));
                }
                offer_keys(keys, Some(&message.connection_id));
            }
            Address::Connection(id) => {
                if let Some(c) = self.connections.by_id(id).filter(|c| c.is_handshaken()) {
                    offer(&c);
                }
            }
        }
    }

    /// Delivers the live chat messages held for `conn` newer than what a
    /// replay passed (`replayed`: the newest id in each scope it replayed)
    /// and stops holding. They continue a replay the client asked for, so,
    /// like it, they are not refused for a full outbox; the hold's short
    /// window bounds them.
    pub fn release_held(&self, conn: &Connection, replayed: &[(crate::history::Scope, String)]) {
        for d in conn.end_resume(replayed) {
            if !conn.already_replayed(&d) {
                conn.note_live(&d);
                self.reply_to(conn, d.for_connection(conn));
            }
        }
    }

    /// Ends a connection from the server side: a Close message (when the
    /// client completed its handshake) and then the transport finishes.
    pub fn close(&self, conn: &Connection, error: Option<String>, allow_reconnect: bool) {
        let last = conn.is_handshaken().then(|| {
            let close = HubMessage::Close { error, allow_reconnect };
            OutFrame::plain(conn.protocol().encode(&close).into())
        });
        conn.outbox.close(last);
        if conn.transport().is_none() {
            // No transport will ever drain it.
            self.disconnect(conn);
        }
    }

    /// Forgets a connection: table, groups, metrics. Safe to call repeatedly.
    pub fn disconnect(&self, conn: &Connection) {
        if !conn.mark_removed() {
            return;
        }
        conn.outbox.close(None);
        if let Some(user) = conn.presence_slot().lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.presence.remove(&user);
        }
        let user = self.users.remove(&conn.key);
        if let Some(upstream) = &self.upstream {
            if conn.is_handshaken() {
                upstream.disconnected(conn.connection_id.clone(), user.as_ref().map(|(u, _)| u.clone()));
            }
        }
        if let Some((user, true)) = user {
            self.backplane.unfollow_user(&user);
        }
        self.connections.remove(&conn.key);
        for group in self.groups.leave_all(&conn.key) {
            self.backplane.unsubscribe_group(&group);
        }
        if let Some(t) = conn.transport() {
            self.metrics.connections.with_label_values(&[t.label()]).dec();
        }
        tracing::debug!(connection = %conn.connection_id, "disconnected");
    }
}

impl App {
    /// Makes `conn` online as `user` (instead of any name it had); nothing
    /// once it is gone. The slot's lock is held across the check, so a
    /// connection that `disconnect` removes at the same moment is never left
    /// online. A signed-in connection, or any with `auth = "off"`, becomes
    /// one of `user`'s addresses too (see `users`): answers the user when it
    /// is the node's first connection of it, whose channel the caller then
    /// follows (`Backplane::follow_user`) before telling the client it is in.
    #[must_use = "a user's first local connection must follow the user's channel"]
    pub fn go_online_as(&self, conn: &Connection, user: &str) -> Option<String> {
        let mut slot = conn.presence_slot().lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_removed() || slot.as_deref() == Some(user) {
            return None;
        }
        if let Some(old) = slot.take() {
            self.presence.remove(&old);
        }
        self.presence.add(user);
        *slot = Some(user.into());
        if conn.user().is_none() && self.auth.mode != crate::config::AuthMode::Off {
            return None; // anonymous beside signed-in users: not an address
        }
        let change = self.users.set(&conn.key, user);
        if let Some(left) = change.last {
            self.backplane.unfollow_user(&left);
        }
        change.first
    }

    /// The user `conn` is an address of, if any.
    pub fn user_of(&self, conn: &Connection) -> Option<String> {
        self.users.user_of(&conn.key)
    }

    /// `go_online_as`, then, when `conn` became an address of `user`, what
    /// that takes before the client is told it is in: this node follows the
    /// user's channel (the first local connection of it), and the connection
    /// joins the groups the server API put the user in.
    pub async fn become_user(&self, conn: &Connection, user: &str) {
        if let Some(first) = self.go_online_as(conn, user) {
            self.backplane.follow_user(&first).await;
        }
        if !self.api_enabled() || self.user_of(conn).as_deref() != Some(user) {
            return; // only the server API puts users in groups
        }
        match self.backplane.user_groups(user).await {
            Ok(groups) => {
                for group in groups {
                    if let Err(e) = self.join_group(conn, &group).await {
                        tracing::info!(connection = %conn.connection_id, error = %e, "could not join one of its user's groups");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read a user's groups; the connection joins none of them"),
        }
    }

    /// Whether the server API is served (an access key is configured).
    pub fn api_enabled(&self) -> bool {
        self.api_key.is_some()
    }

    /// Puts `conn` in `group`; returns once the group's messages reach this
    /// node. The error says why not (a bad name, too many groups).
    pub async fn join_group(&self, conn: &Connection, group: &str) -> Result<(), String> {
        crate::groups::validate_name(group)?;
        if conn.first_live_id(None).is_some() {
            // Live delivery began before the join: a Resume still to
            // come must replay what the group had before it.
            conn.note_late_join(group);
        }
        let first =
            self.groups.join(group, &conn.key, self.cfg.max_groups_per_connection).map_err(|e| format!("{e}."))?;
        self.backplane.joined_group(group, first).await;
        Ok(())
    }

    /// Takes `conn` out of `group` (nothing if it was not in it).
    pub fn leave_group(&self, conn: &Connection, group: &str) {
        if self.groups.leave(group, &conn.key) {
            self.backplane.unsubscribe_group(group);
        }
        conn.left_group(group);
    }
}
