//! Who is online across the cluster. A connection is online as a user once
//! it has one: from its sign-in token when it completes its handshake, or,
//! for an anonymous connection, from `SetUser(name)`. A user is online while
//! at least one of their connections, on any node, is.
//!
//! The backplane holds the truth (`Backplane::write_presence`; in Redis a
//! sorted set of (node, user) entries, see `backplane::layout`): an entry per
//! node a user is connected to, expiring a TTL after it was last written
//! (Unix ms, the node's clock). Each node rewrites its own entries every
//! heartbeat, so the users of a node that dies go offline within its TTL
//! (plus one heartbeat for the other nodes to look). Changes are also
//! published, and reach the other nodes at once as `PresenceChange`s
//! (`apply_remote`); the periodic read of every entry (`resync`) repairs
//! anything a lost publication or a Redis restart left wrong.
//!
//! Each node keeps the cluster's view in memory. `GetOnlineUsers()` answers
//! from it, and the connection then receives `UserJoined(user)` and
//! `UserLeft(user)` for every later change of that view (a user's first
//! connection anywhere, their last one gone). Events carry a sequence
//! number, and a watcher gets only those after the view it was given, so
//! the answer and the events that follow it never overlap or leave a gap.
//!
//! This module is the view alone; the tasks that write it through the
//! backplane and tell watchers of its changes are `presence_sync`'s.

use crate::connection::Connection;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, Weak};
use tokio::sync::{mpsc, oneshot};

/// A change of the cluster's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Joined(String),
    Left(String),
}

impl Event {
    pub fn target_and_user(&self) -> (&'static str, &str) {
        match self {
            Event::Joined(u) => ("UserJoined", u),
            Event::Left(u) => ("UserLeft", u),
        }
    }
}

/// What the presence writer does, in order.
#[derive(Debug)]
pub enum Write {
    /// This node's first connection of `user` opened (true) or its last closed.
    Change { user: String, online: bool },
    /// Rewrite this node's members with a fresh expiry and read everyone's.
    Refresh,
    /// Answer once everything before it is written (used when draining).
    Flush(oneshot::Sender<()>),
}

#[derive(Default)]
struct State {
    /// This node's users and how many of their connections are here.
    local: HashMap<String, usize>,
    /// Other nodes' users: user → node → the change number that last set it.
    remote: HashMap<String, HashMap<String, u64>>,
    /// Remote entries removed by a publication: (node, user) → change number,
    /// so a resync that read Redis before the removal does not bring them back.
    removed: HashMap<(String, String), u64>,
    /// Counts remote changes; a resync ignores entries changed after it began.
    changes: u64,
    /// Counts events; a watcher gets those after the one it started at.
    seq: u64,
    watchers: Vec<(Weak<Connection>, u64)>,
}

impl State {
    fn online(&self, user: &str) -> bool {
        self.local.contains_key(user) || self.remote.get(user).is_some_and(|n| !n.is_empty())
    }

    fn users(&self) -> BTreeSet<String> {
        self.local.keys().chain(self.remote.iter().filter(|(_, n)| !n.is_empty()).map(|(u, _)| u)).cloned().collect()
    }
}

pub struct Presence {
    node_id: String,
    state: Mutex<State>,
    writes: mpsc::UnboundedSender<Write>,
    events: mpsc::UnboundedSender<(u64, Event)>,
}

/// The receiving ends, for the tasks `lifecycle` starts.
pub struct PresenceTasks {
    pub writes: mpsc::UnboundedReceiver<Write>,
    pub events: mpsc::UnboundedReceiver<(u64, Event)>,
}

impl Presence {
    pub fn new(node_id: String) -> (Self, PresenceTasks) {
        let (writes, writes_rx) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let p = Presence { node_id, state: Mutex::new(State::default()), writes, events };
        (p, PresenceTasks { writes: writes_rx, events: events_rx })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `event` if the user's being online changed; under the lock, so
    /// events leave in the order the view changed.
    fn emit_if_changed(&self, st: &mut State, user: &str, was: bool) {
        let now = st.online(user);
        if now != was {
            st.seq += 1;
            let e = if now { Event::Joined(user.to_string()) } else { Event::Left(user.to_string()) };
            let _ = self.events.send((st.seq, e));
        }
    }

    /// A local connection of `user` opened.
    pub fn add(&self, user: &str) {
        let mut st = self.state();
        let was = st.online(user);
        let count = st.local.entry(user.to_string()).or_insert(0);
        *count += 1;
        if *count == 1 {
            let _ = self.writes.send(Write::Change { user: user.to_string(), online: true });
        }
        self.emit_if_changed(&mut st, user, was);
    }

    /// A local connection of `user` closed (or stopped going by that name).
    pub fn remove(&self, user: &str) {
        let mut st = self.state();
        let was = st.online(user);
        let Some(count) = st.local.get_mut(user) else { return };
        *count -= 1;
        if *count == 0 {
            st.local.remove(user);
            let _ = self.writes.send(Write::Change { user: user.to_string(), online: false });
        }
        self.emit_if_changed(&mut st, user, was);
    }

    /// A publication from another node.
    pub fn apply_remote(&self, node: &str, user: &str, online: bool) {
        if node == self.node_id {
            return;
        }
        let mut st = self.state();
        let was = st.online(user);
        st.changes += 1;
        let change = st.changes;
        if online {
            st.remote.entry(user.to_string()).or_default().insert(node.to_string(), change);
            st.removed.remove(&(node.to_string(), user.to_string()));
        } else {
            if let Some(nodes) = st.remote.get_mut(user) {
                nodes.remove(node);
                if nodes.is_empty() {
                    st.remote.remove(user);
                }
            }
            st.removed.insert((node.to_string(), user.to_string()), change);
        }
        self.emit_if_changed(&mut st, user, was);
    }

    /// The change number a resync starts from (call before reading Redis).
    pub fn resync_start(&self) -> u64 {
        self.state().changes
    }

    /// Makes the other nodes' part of the view what Redis says (`members`:
    /// every unexpired (node, user), read after `resync_start` returned
    /// `since`), except entries publications changed since.
    pub fn resync(&self, since: u64, members: &[(String, String)]) {
        let mut st = self.state();
        let mut fresh: HashMap<String, HashMap<String, u64>> = HashMap::new();
        for (node, user) in members {
            if node == &self.node_id || st.removed.get(&(node.clone(), user.clone())).is_some_and(|c| *c > since) {
                continue;
            }
            fresh.entry(user.clone()).or_default().insert(node.clone(), 0);
        }
        // Entries a publication set after the read began stay.
        for (user, nodes) in &st.remote {
            for (node, change) in nodes {
                if *change > since {
                    fresh.entry(user.clone()).or_default().insert(node.clone(), *change);
                }
            }
        }
        st.removed.retain(|_, c| *c > since);
        let before = st.users();
        st.remote = fresh;
        let after = st.users();
        for user in before.symmetric_difference(&after) {
            let was = before.contains(user);
            self.emit_if_changed(&mut st, user, was);
        }
    }

    /// Who is online now, handed to `answer`, and makes `conn` a watcher
    /// from here on. `answer` runs under the lock `notify` queues events
    /// under, so a change is either in what it is given or queued after
    /// whatever it queues; it must not call back into presence.
    pub fn watch<R>(&self, conn: Weak<Connection>, answer: impl FnOnce(Vec<String>) -> R) -> R {
        let mut st = self.state();
        let seq = st.seq;
        st.watchers.retain(|(w, _)| w.strong_count() > 0);
        match st.watchers.iter_mut().find(|(w, _)| w.ptr_eq(&conn)) {
            Some(entry) => entry.1 = seq,
            None => st.watchers.push((conn, seq)),
        }
        answer(st.users().into_iter().collect())
    }

    /// Hands event number `seq` to `send` for each live watcher that should
    /// get it (one whose snapshot is older), under the lock `watch` answers
    /// under; returns the watchers `send` refused.
    pub fn notify(&self, seq: u64, mut send: impl FnMut(&Connection) -> bool) -> Vec<std::sync::Arc<Connection>> {
        let mut st = self.state();
        st.watchers.retain(|(w, _)| w.strong_count() > 0);
        let due = st.watchers.iter().filter(|(_, since)| *since < seq).filter_map(|(w, _)| w.upgrade());
        due.filter(|conn| !send(conn)).collect()
    }

    /// This node's users, for a refresh.
    pub fn local_users(&self) -> Vec<String> {
        self.state().local.keys().cloned().collect()
    }

    /// How many are online (tests).
    #[cfg(test)]
    pub fn online_count(&self) -> usize {
        self.state().users().len()
    }

    /// Waits until every change queued so far has been written (or failed).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.writes.send(Write::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(rx: &mut mpsc::UnboundedReceiver<(u64, Event)>) -> Vec<Event> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|(_, e)| e)).collect()
    }

    fn joined(u: &str) -> Event {
        Event::Joined(u.into())
    }

    fn left(u: &str) -> Event {
        Event::Left(u.into())
    }

    #[test]
    fn a_user_is_online_while_any_connection_anywhere_is() {
        let (p, mut t) = Presence::new("a".into());
        p.add("ann");
        p.add("ann"); // a second tab
        p.apply_remote("b", "ann", true); // and a phone on node b
        assert_eq!(drain(&mut t.events), [joined("ann")]);
        p.remove("ann");
        p.remove("ann");
        assert_eq!(drain(&mut t.events), [], "still online on node b");
        p.apply_remote("b", "ann", false);
        assert_eq!(drain(&mut t.events), [left("ann")]);
        // Redis hears of the first and last local connection only.
        let writes: Vec<_> = std::iter::from_fn(|| t.writes.try_recv().ok()).map(|w| format!("{w:?}")).collect();
        assert_eq!(writes.len(), 2, "{writes:?}");
    }

    #[test]
    fn a_resync_drops_expired_nodes_but_keeps_what_publications_changed_since() {
        let (p, mut t) = Presence::new("a".into());
        p.apply_remote("b", "bob", true);
        p.apply_remote("c", "cat", true);
        drain(&mut t.events);
        let since = p.resync_start();
        // Read from Redis: node c expired; meanwhile dan joined on c by publication.
        p.apply_remote("c", "dan", true);
        p.resync(since, &[("b".into(), "bob".into()), ("a".into(), "ghost-of-mine".into())]);
        assert_eq!(drain(&mut t.events), [joined("dan"), left("cat")]);
        assert_eq!(
            p.watch(Weak::new(), |users| users),
            ["bob", "dan"],
            "this node's own entries come from its connections"
        );
        // A removal published after a read began is not undone by that read.
        let since = p.resync_start();
        p.apply_remote("b", "bob", false);
        p.resync(since, &[("b".into(), "bob".into()), ("c".into(), "dan".into())]);
        assert_eq!(drain(&mut t.events), [left("bob")]);
        assert_eq!(p.online_count(), 1);
    }

    #[test]
    fn a_watcher_gets_only_events_after_its_snapshot() {
        let (p, mut t) = Presence::new("a".into());
        p.add("ann");
        let conn = std::sync::Arc::new(Connection::new(
            "c".into(),
            "k".into(),
            crate::connection::Limits { max_message: 1024, max_frames: 8, max_bytes: 4096 },
            Default::default(),
        ));
        let watch = || p.watch(std::sync::Arc::downgrade(&conn), |users| users);
        let sent = |seq| p.notify(seq, |_| false).len();
        assert_eq!(watch(), ["ann"]);
        let (seq, _) = t.events.try_recv().unwrap();
        assert_eq!(sent(seq), 0, "ann's join is in the snapshot already");
        p.add("bob");
        let (seq, e) = t.events.try_recv().unwrap();
        assert_eq!((e, sent(seq)), (joined("bob"), 1));
        // Asked again before bob's leaving is handed out: the answer has it.
        p.remove("bob");
        let (seq, e) = t.events.try_recv().unwrap();
        assert_eq!((e, watch()), (left("bob"), vec!["ann".to_string()]));
        assert_eq!(sent(seq), 0, "bob's leaving is in the newer snapshot");
        p.add("cy");
        let (seq, _) = t.events.try_recv().unwrap();
        drop(conn);
        assert_eq!(sent(seq), 0, "a closed connection is forgotten");
    }
}
