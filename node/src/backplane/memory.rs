//! A backplane inside one process, modelled on centrifuge's memory broker:
//! backplanes attached to the same `MemoryBus` are the nodes of a cluster.
//! Sending stores the message in the bus's capped history under the next id
//! and hands it, in id order, to every attached node (the sender included),
//! at once and under the bus's lock, so every node sees one order. Group
//! messages go to every node; a node's delivery picks the members. Presence
//! is a map of expiring (node, user) entries on the bus, and its changes go
//! to every attached node the same way.

use super::{Deliver, PresenceChange, PresenceWrite, Sink};
use crate::history::{cmp_ids, parse_id, ChatMessage, ResumeError};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

/// What the attached backplanes share.
pub struct MemoryBus {
    state: Mutex<BusState>,
}

struct BusState {
    next: u64,
    /// Messages ever added (to tell a trimmed history from a short one).
    added: u64,
    history: VecDeque<ChatMessage>,
    cap: usize,
    nodes: Vec<Weak<MemoryBackplane>>,
    /// (node, user) → when the entry expires (Unix ms).
    presence: HashMap<(String, String), i64>,
}

impl BusState {
    fn nodes(&mut self) -> Vec<Arc<MemoryBackplane>> {
        self.nodes.retain(|n| n.strong_count() > 0);
        self.nodes.iter().filter_map(Weak::upgrade).collect()
    }
}

impl MemoryBus {
    /// A bus keeping the newest `history_len` messages.
    pub fn new(history_len: usize) -> Arc<Self> {
        let state = BusState {
            next: 1,
            added: 0,
            history: VecDeque::new(),
            cap: history_len.max(1),
            nodes: Vec::new(),
            presence: HashMap::new(),
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
}

impl MemoryBackplane {
    /// A node's backplane on `bus`.
    pub fn attach(bus: &Arc<MemoryBus>) -> Arc<Self> {
        let b = Arc::new(MemoryBackplane { bus: bus.clone(), sink: Sink::default() });
        bus.state().nodes.push(Arc::downgrade(&b));
        b
    }

    pub fn start(&self, sink: Weak<dyn Deliver>) {
        self.sink.set(sink);
    }

    pub fn send(&self, mut message: ChatMessage) {
        let mut state = self.bus.state();
        message.id = Some(format!("1-{}", state.next));
        state.next += 1;
        state.added += 1;
        state.history.push_back(message.clone());
        while state.history.len() > state.cap {
            state.history.pop_front();
        }
        for node in state.nodes() {
            node.sink.deliver(&message);
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

    pub fn older(&self, before: Option<&str>, count: usize) -> Vec<ChatMessage> {
        let state = self.bus.state();
        let before_ok =
            |m: &ChatMessage| before.is_none_or(|b| m.id.as_deref().is_some_and(|id| cmp_ids(id, b).is_lt()));
        state.history.iter().rev().filter(|m| before_ok(m)).take(count).cloned().collect()
    }

    /// As `history::check_resume` decides it for Redis.
    pub fn resume_point(&self, last: &str) -> Result<String, ResumeError> {
        if parse_id(last).is_none() {
            return Err(ResumeError::Malformed);
        }
        let state = self.bus.state();
        let newest = state.history.back().and_then(|m| m.id.clone()).unwrap_or_else(|| "0-0".into());
        if cmp_ids(last, &newest).is_gt() {
            return Err(ResumeError::Future);
        }
        let trimmed = state.added > state.history.len() as u64;
        let oldest = state.history.front().and_then(|m| m.id.as_deref());
        if trimmed && oldest.is_some_and(|o| cmp_ids(last, o).is_lt()) {
            return Err(ResumeError::Gone);
        }
        Ok(newest)
    }

    pub fn range(&self, after: &str, through: &str, count: usize) -> Vec<ChatMessage> {
        let state = self.bus.state();
        let within = |id: &str| cmp_ids(id, after).is_gt() && cmp_ids(id, through).is_le();
        state.history.iter().filter(|m| m.id.as_deref().is_some_and(within)).take(count).cloned().collect()
    }
}
