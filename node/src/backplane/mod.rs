//! The seam between this node's hub and the other nodes. A backplane takes
//! chat messages to store and fan out (`send`), follows the groups this node
//! has members in and the users it has connections of, keeps the history that `GetHistory` and `Resume` read, and
//! hands every message that arrives, in id order and once, to a `Deliver`
//! (the node's delivery to its local connections). Presence crosses the same
//! seam both ways: `write_presence` records and publishes this node's
//! changes (and refreshes its entries), and other nodes' changes arrive as
//! typed `PresenceChange`s. It knows nothing else of the node and keeps its
//! own metric handles; where things live in Redis is `layout`'s alone.
//!
//! Two implementations: `redis` (Redis Streams and publish/subscribe; what
//! the node runs) and, for unit tests, `memory` (one process; several
//! backplanes attached to one `MemoryBus` behave as a cluster), so hub and
//! delivery logic are tested without Redis. An enum rather than a trait object keeps the async
//! methods plain.

pub mod layout;
#[cfg(test)]
pub mod memory;
pub mod redis;
mod subscription;

use crate::command::Command;
use crate::history::{ChatMessage, ResumeError};
use futures_util::future::BoxFuture;
use prometheus::IntCounter;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// Where a backplane hands what arrives.
pub trait Deliver: Send + Sync {
    /// Delivers a chat message to the local connections that should see it.
    fn deliver(&self, message: &ChatMessage);
    /// The groups with local members (subscribed again after a reconnect).
    fn local_groups(&self) -> Vec<String>;
    /// The users with local connections (subscribed again after a reconnect).
    fn local_users(&self) -> Vec<String>;
    /// A presence change a node published (see `presence`); this node's own
    /// may come back too.
    fn presence(&self, change: &PresenceChange);
    /// Carries out a server API command (see `control`) on this node's
    /// connections; resolves to whether it found the connection it names.
    fn control(self: Arc<Self>, command: Command) -> BoxFuture<'static, bool>;
}

/// `user`'s first connection on `node` opened (`online`) or its last closed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PresenceChange {
    pub node: String,
    pub user: String,
    pub online: bool,
}

/// One batch of a node's presence writes, in order (see `presence_sync::write_forever`).
#[derive(Debug, Default)]
pub struct PresenceWrite {
    pub node: String,
    /// (user, online): recorded (expiring after `ttl_ms`) and published.
    pub changes: Vec<(String, bool)>,
    /// This node's users now, for a refresh: their entries get a fresh
    /// expiry, expired entries of any node go, and the write answers every
    /// unexpired (node, user). `None`: no refresh, and it answers nothing.
    pub refresh: Option<Vec<String>>,
    pub ttl_ms: i64,
}

/// Wall-clock Unix milliseconds (presence expiries are compared across nodes).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The handler, set when the backplane starts; a weak reference, since the
/// node's state owns the backplane.
#[derive(Default)]
pub struct Sink(OnceLock<Weak<dyn Deliver>>);

impl Sink {
    fn set(&self, sink: Weak<dyn Deliver>) {
        let _ = self.0.set(sink);
    }

    fn deliver(&self, message: &ChatMessage) {
        if let Some(s) = self.0.get().and_then(Weak::upgrade) {
            s.deliver(message);
        }
    }

    fn local_groups(&self) -> Vec<String> {
        self.0.get().and_then(Weak::upgrade).map(|s| s.local_groups()).unwrap_or_default()
    }

    fn local_users(&self) -> Vec<String> {
        self.0.get().and_then(Weak::upgrade).map(|s| s.local_users()).unwrap_or_default()
    }

    fn presence(&self, change: &PresenceChange) {
        if let Some(s) = self.0.get().and_then(Weak::upgrade) {
            s.presence(change);
        }
    }

    /// The handler's `control`, when it is still there.
    fn control(&self, command: Command) -> Option<BoxFuture<'static, bool>> {
        self.0.get().and_then(Weak::upgrade).map(|s| s.control(command))
    }
}

/// The backplane's own metric handles.
#[derive(Clone)]
pub struct BackplaneMetrics {
    pub published: IntCounter,
    pub publish_failures: IntCounter,
    pub dropped: IntCounter,
    pub received: IntCounter,
    pub invalid: IntCounter,
}

/// History or presence could not be read or written (Redis unreachable,
/// say); the text says why.
#[derive(Debug)]
pub struct HistoryError(pub String);

impl std::fmt::Display for HistoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone)]
pub enum Backplane {
    Redis(Arc<redis::RedisBackplane>),
    #[cfg(test)]
    Memory(Arc<memory::MemoryBackplane>),
}

impl Backplane {
    /// Starts moving messages; what arrives goes to `sink`.
    pub fn start(&self, sink: Weak<dyn Deliver>) {
        match self {
            Backplane::Redis(b) => b.start(sink),
            #[cfg(test)]
            Backplane::Memory(b) => b.start(sink),
        }
    }

    /// Whether messages from other nodes reach this one now.
    pub fn is_live(&self) -> bool {
        match self {
            Backplane::Redis(b) => b.is_live(),
            #[cfg(test)]
            Backplane::Memory(_) => true,
        }
    }

    /// Queues a chat message for storing and delivery on every node, this one included.
    pub fn send(&self, message: ChatMessage) {
        match self {
            Backplane::Redis(b) => b.send(message),
            #[cfg(test)]
            Backplane::Memory(b) => b.send(message),
        }
    }

    /// Follows `group` (this node has a member in it now).
    /// See `RedisBackplane::joined_group`.
    pub async fn joined_group(&self, group: &str, first: bool) {
        match self {
            Backplane::Redis(b) => b.joined_group(group, first).await,
            #[cfg(test)]
            Backplane::Memory(_) => {} // every node gets every message
        }
    }

    pub fn unsubscribe_group(&self, group: &str) {
        match self {
            Backplane::Redis(b) => b.unsubscribe_group(group),
            #[cfg(test)]
            Backplane::Memory(_) => {}
        }
    }

    /// Follows `user`'s direct messages (this node has its first connection
    /// of the user now); returns once they reach this node, as `joined_group`.
    pub async fn follow_user(&self, user: &str) {
        match self {
            Backplane::Redis(b) => b.follow_user(user).await,
            #[cfg(test)]
            Backplane::Memory(_) => {} // every node gets every message
        }
    }

    /// Stops following `user` (its last local connection is gone).
    pub fn unfollow_user(&self, user: &str) {
        match self {
            Backplane::Redis(b) => b.unfollow_user(user),
            #[cfg(test)]
            Backplane::Memory(_) => {}
        }
    }

    /// Waits until every accepted message is stored, or `limit` passes.
    pub async fn flush(&self, limit: Duration) -> bool {
        match self {
            Backplane::Redis(b) => b.flush(limit).await,
            #[cfg(test)]
            Backplane::Memory(_) => true,
        }
    }

    /// Whether each group is a history scope of its own, with its own ids
    /// (on a Redis Cluster; see `layout`), rather than one stream for all.
    pub fn per_group(&self) -> bool {
        match self {
            Backplane::Redis(b) => b.per_group(),
            #[cfg(test)]
            Backplane::Memory(b) => b.per_group(),
        }
    }

    /// Up to `count` stored messages of `scope` (see `history::Scope`)
    /// older than `before` (the newest when `None`), newest first: one page
    /// of a backwards walk.
    pub async fn older(
        &self,
        scope: Option<&str>,
        before: Option<&str>,
        count: usize,
    ) -> Result<Vec<ChatMessage>, HistoryError> {
        match self {
            Backplane::Redis(b) => b.older(scope, before, count).await,
            #[cfg(test)]
            Backplane::Memory(b) => Ok(b.older(scope, before, count)),
        }
    }

    /// Whether a replay of `scope` after `last` is possible (a well-formed
    /// id, not in the future, nothing after it trimmed away); if so, the
    /// newest stored id, where the replay ends.
    pub async fn resume_point(
        &self,
        scope: Option<&str>,
        last: &str,
    ) -> Result<Result<String, ResumeError>, HistoryError> {
        match self {
            Backplane::Redis(b) => b.resume_point(scope, last).await,
            #[cfg(test)]
            Backplane::Memory(b) => Ok(b.resume_point(scope, last)),
        }
    }

    /// Up to `count` stored messages of `scope` after `after` (exclusive)
    /// through `through` (inclusive), oldest first: one page of a replay.
    pub async fn range(
        &self,
        scope: Option<&str>,
        after: &str,
        through: &str,
        count: usize,
    ) -> Result<Vec<ChatMessage>, HistoryError> {
        match self {
            Backplane::Redis(b) => b.range(scope, after, through, count).await,
            #[cfg(test)]
            Backplane::Memory(b) => Ok(b.range(scope, after, through, count)),
        }
    }

    /// Sends a server API command to the node that holds the connection it
    /// names (`Some(found)`), or to every node that holds one of the user's
    /// connections (`None`: nobody answers for a user). See `control`.
    pub async fn command(&self, command: Command) -> Result<Option<bool>, HistoryError> {
        match self {
            Backplane::Redis(b) => b.command(command).await,
            #[cfg(test)]
            Backplane::Memory(b) => Ok(b.command(command).await),
        }
    }

    /// Whether any node has a member of `group` (it follows the group's channel).
    pub async fn group_has_members(&self, group: &str) -> Result<bool, HistoryError> {
        match self {
            Backplane::Redis(b) => b.group_has_members(group).await,
            #[cfg(test)]
            Backplane::Memory(b) => Ok(b.anyone(|d| d.local_groups().iter().any(|g| g == group))),
        }
    }

    /// Whether any node has a connection of `user` (it follows the user's channel).
    pub async fn user_is_connected(&self, user: &str) -> Result<bool, HistoryError> {
        match self {
            Backplane::Redis(b) => b.user_is_connected(user).await,
            #[cfg(test)]
            Backplane::Memory(b) => Ok(b.anyone(|d| d.local_users().iter().any(|u| u == user))),
        }
    }

    /// The groups the server API put `user` in (unexpired).
    pub async fn user_groups(&self, user: &str) -> Result<Vec<String>, HistoryError> {
        match self {
            Backplane::Redis(b) => b.user_groups(user).await,
            #[cfg(test)]
            Backplane::Memory(b) => Ok(b.user_groups(user)),
        }
    }

    /// Records that `user` is in `group` for `ttl` (every connection of the
    /// user, now and later, joins it).
    pub async fn add_user_group(&self, user: &str, group: &str, ttl: Duration) -> Result<(), HistoryError> {
        match self {
            Backplane::Redis(b) => b.add_user_group(user, group, ttl).await,
            #[cfg(test)]
            Backplane::Memory(b) => {
                b.add_user_group(user, group, ttl);
                Ok(())
            }
        }
    }

    /// Forgets `user`'s membership of `group` (of every group when `None`);
    /// answers the groups it was in.
    pub async fn remove_user_groups(&self, user: &str, group: Option<&str>) -> Result<Vec<String>, HistoryError> {
        match self {
            Backplane::Redis(b) => b.remove_user_groups(user, group).await,
            #[cfg(test)]
            Backplane::Memory(b) => Ok(b.remove_user_groups(user, group)),
        }
    }

    /// Records and publishes one batch of this node's presence writes; with
    /// a refresh, answers every unexpired (node, user).
    pub async fn write_presence(&self, write: PresenceWrite) -> Result<Vec<(String, String)>, HistoryError> {
        match self {
            Backplane::Redis(b) => b.write_presence(write).await,
            #[cfg(test)]
            Backplane::Memory(b) => Ok(b.write_presence(write)),
        }
    }
}
