//! A backplane inside one process, modelled on centrifuge's memory broker:
//! backplanes attached to the same `MemoryBus` are the nodes of a cluster.
//! Sending stores the message in the bus's capped history under the next id
//! and hands it, in id order, to every attached node (the sender included),
//! at once and under the bus's lock, so every node sees one order. Group
//! messages go to every node; a node's delivery picks the members. Presence
//! is a map of expiring (node, user) entries on the bus, and its changes go
//! to every attached node the same way. A bus made `per_group` keeps a
//! history per group beside the broadcasts', each with ids of its own, as
//! the Redis backplane does on a Redis Cluster.

use super::{Deliver, PresenceChange, PresenceWrite, Sink};
use crate::history::{cmp_ids, parse_id, ChatMessage, ResumeError, Scope};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

/// What the attached backplanes share.
pub struct MemoryBus {
    state: Mutex<BusState>,
}

/// One scope's history.
#[derive(Default)]
struct Stream {
    next: u64,
    /// Messages ever added (to tell a trimmed history from a short one).
    added: u64,
    history: VecDeque<ChatMessage>,
}

struct BusState {
    per_group: bool,
    streams: HashMap<Scope, Stream>,
    cap: usize,
    nodes: Vec<Weak<MemoryBackplane>>,
    /// (node, user) → when the entry expires (Unix ms).
    presence: HashMap<(String, String), i64>,
    /// user → group → when the membership expires (Unix ms).
    user_groups: HashMap<String, HashMap<String, i64>>,
}

impl BusState {
    fn stream(&self, scope: Option<&str>) -> Option<&Stream> {
        self.streams.get(&crate::history::scope_of(scope, self.per_group).map(String::from))
    }

    fn nodes(&mut self) -> Vec<Arc<MemoryBackplane>> {
        self.nodes.retain(|n| n.strong_count() > 0);
        self.nodes.iter().filter_map(Weak::upgrade).collect()
    }
}

impl MemoryBus {
    /// A bus keeping the newest `history_len` messages.
    pub fn new(history_len: usize) -> Arc<Self> {
        Self::with_layout(history_len, false)
    }

    /// A bus with a history per group (see `layout`'s `per_group`).
    pub fn per_group(history_len: usize) -> Arc<Self> {
        Self::with_layout(history_len, true)
    }

    fn with_layout(history_len: usize, per_group: bool) -> Arc<Self> {
        let state = BusState {
            per_group,
            streams: HashMap::new(),
            cap: history_len.max(1),
            nodes: Vec::new(),
            presence: HashMap::new(),
            user_groups: HashMap::new(),
        };
        Arc::new(MemoryBus { state: Mutex::new(state) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BusState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct MemoryBackplane {
    bus: Arc<MemoryBus>,
    sink: Sink,
    /// The bus's layout, kept here: delivery asks for it under the bus's lock.
    per_group: bool,
}

impl MemoryBackplane {
    /// A node's backplane on `bus`.
    pub fn attach(bus: &Arc<MemoryBus>) -> Arc<Self> {
        let per_group = bus.state().per_group;
        let b = Arc::new(MemoryBackplane { bus: bus.clone(), sink: Sink::default(), per_group });
        bus.state().nodes.push(Arc::downgrade(&b));
        b
    }

    pub fn start(&self, sink: Weak<dyn Deliver>) {
        self.sink.set(sink);
    }

    pub fn per_group(&self) -> bool {
        self.per_group
    }

    pub fn send(&self, mut message: ChatMessage) {
        let mut state = self.bus.state();
        let (cap, per_group) = (state.cap, state.per_group);
        let scope = crate::history::scope_of(message.group.as_deref(), per_group).map(String::from);
        let stream = state.streams.entry(scope).or_default();
        stream.next += 1;
        message.id = Some(format!("1-{}", stream.next));
        stream.added += 1;
        stream.history.push_back(message.clone());
        while stream.history.len() > cap {
            stream.history.pop_front();
        }
        for node in state.nodes() {
            node.sink.deliver(&message);
        }
    }

    /// Runs `command` on every attached node, as the Redis backplane reaches
    /// the node (or the nodes) it names: whether one found its connection.
    pub async fn command(&self, command: crate::command::Command) -> Option<bool> {
        let nodes = self.bus.state().nodes();
        let mut found = false;
        for node in nodes {
            if let Some(run) = node.sink.control(command.clone()) {
                found |= run.await;
            }
        }
        matches!(command.target(), crate::command::Target::Connection(_)).then_some(found)
    }

    /// Whether `f` holds for any attached node's handler.
    pub fn anyone(&self, f: impl Fn(&dyn Deliver) -> bool) -> bool {
        let nodes = self.bus.state().nodes();
        nodes.iter().any(|n| n.sink.0.get().and_then(Weak::upgrade).is_some_and(|d| f(d.as_ref())))
    }

    pub fn user_groups(&self, user: &str) -> Vec<String> {
        let now = super::unix_ms();
        let state = self.bus.state();
        let groups = state.user_groups.get(user).into_iter().flatten();
        groups.filter(|(_, expires)| **expires > now).map(|(g, _)| g.clone()).collect()
    }

    pub fn add_user_group(&self, user: &str, group: &str, ttl: std::time::Duration) {
        let expires = super::unix_ms().saturating_add(ttl.as_millis() as i64);
        self.bus.state().user_groups.entry(user.into()).or_default().insert(group.into(), expires);
    }

    pub fn remove_user_groups(&self, user: &str, group: Option<&str>) -> Vec<String> {
        let mut state = self.bus.state();
        let Some(groups) = state.user_groups.get_mut(user) else { return Vec::new() };
        match group {
            Some(g) => groups.remove(g).map(|_| vec![g.to_string()]).unwrap_or_default(),
            None => groups.drain().map(|(g, _)| g).collect(),
        }
    }

    /// As `RedisBackplane::write_presence` does it in Redis.
    pub fn write_presence(&self, w: PresenceWrite) -> Vec<(String, String)> {
        let now = super::unix_ms();
        let mut state = self.bus.state();
        let nodes = state.nodes();
        for (user, online) in w.changes {
            let entry = (w.node.clone(), user.clone());
            if online {
                state.presence.insert(entry, now + w.ttl_ms);
            } else {
                state.presence.remove(&entry);
            }
            let change = PresenceChange { node: w.node.clone(), user, online };
            for node in &nodes {
                node.sink.presence(&change);
            }
        }
        let Some(users) = w.refresh else { return Vec::new() };
        for user in users {
            state.presence.insert((w.node.clone(), user), now + w.ttl_ms);
        }
        state.presence.retain(|_, expires| *expires > now);
        state.presence.keys().cloned().collect()
    }

    pub fn older(&self, scope: Option<&str>, before: Option<&str>, count: usize) -> Vec<ChatMessage> {
        let state = self.bus.state();
        let before_ok =
            |m: &ChatMessage| before.is_none_or(|b| m.id.as_deref().is_some_and(|id| cmp_ids(id, b).is_lt()));
        let Some(stream) = state.stream(scope) else { return Vec::new() };
        stream.history.iter().rev().filter(|m| before_ok(m)).take(count).cloned().collect()
    }

    /// As `history::check_resume` decides it for Redis.
    pub fn resume_point(&self, scope: Option<&str>, last: &str) -> Result<String, ResumeError> {
        if parse_id(last).is_none() {
            return Err(ResumeError::Malformed);
        }
        let state = self.bus.state();
        let empty = Stream::default();
        let stream = state.stream(scope).unwrap_or(&empty);
        let newest = stream.history.back().and_then(|m| m.id.clone()).unwrap_or_else(|| "0-0".into());
        if cmp_ids(last, &newest).is_gt() {
            return Err(ResumeError::Future);
        }
        let trimmed = stream.added > stream.history.len() as u64;
        let oldest = stream.history.front().and_then(|m| m.id.as_deref());
        if trimmed && oldest.is_some_and(|o| cmp_ids(last, o).is_lt()) {
            return Err(ResumeError::Gone);
        }
        Ok(newest)
    }

    pub fn range(&self, scope: Option<&str>, after: &str, through: &str, count: usize) -> Vec<ChatMessage> {
        let state = self.bus.state();
        let within = |id: &str| cmp_ids(id, after).is_gt() && cmp_ids(id, through).is_le();
        let Some(stream) = state.stream(scope) else { return Vec::new() };
        stream.history.iter().filter(|m| m.id.as_deref().is_some_and(within)).take(count).cloned().collect()
    }
}
