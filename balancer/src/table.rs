//! The routing table: every known node with its registry record, its
//! pingora-load-balancing `Backend` (the key of its health state), its address,
//! its affinity cookie value and the counters that outlive table rebuilds,
//! indexed by node id and by cookie. Plain data; discovery builds a new table
//! and swaps it in whole.

use pingora_load_balancing::Backend;
use prometheus::IntGauge;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use switchboard_common::registry::NodeRecord;

/// Counters that belong to a node id and outlive table rebuilds.
#[derive(Default)]
pub struct NodeStats {
    /// Requests in flight through this balancer, including open WebSockets.
    pub open: AtomicI64,
    pub routed_token: AtomicU64,
    pub routed_cookie: AtomicU64,
    pub routed_new: AtomicU64,
    /// New clients sent here since the registry count was last refreshed.
    pub assigned_since_record: AtomicU64,
    /// Connects to the node that failed since it last passed a health check.
    pub connect_failures: AtomicU32,
    /// Its last check said it is degraded (see `health`).
    pub degraded: AtomicBool,
    /// Its admission of new connections (see `node_admission`).
    pub gate: crate::node_admission::NodeGate,
}

/// Failed connects (since the node's last passing check) after which it gets
/// no new clients until it passes one again: one failure is a blip under a
/// burst, not a verdict.
pub const PASSIVE_FALL: u32 = 2;

impl NodeStats {
    /// Counts a failed connect; true when this one takes the node out of
    /// rotation for new clients.
    pub fn note_connect_failure(&self) -> bool {
        self.connect_failures.fetch_add(1, Ordering::AcqRel) + 1 == PASSIVE_FALL
    }

    /// Whether failed connects keep new clients away from the node. Its own
    /// connections still go to it while it passes its health checks.
    pub fn passively_down(&self) -> bool {
        self.connect_failures.load(Ordering::Acquire) >= PASSIVE_FALL
    }

    /// Records what the node's last check said; true when that changed.
    pub fn set_degraded(&self, degraded: bool) -> bool {
        self.degraded.swap(degraded, Ordering::AcqRel) != degraded
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Forgets failed connects after a passing check; true when they had
    /// taken the node out of rotation.
    pub fn clear_connect_failures(&self) -> bool {
        self.connect_failures.swap(0, Ordering::AcqRel) >= PASSIVE_FALL
    }
}

#[derive(Clone)]
pub struct RouteNode {
    pub record: NodeRecord,
    pub backend: Backend,
    pub addr: SocketAddr,
    pub cookie: String,
    pub stats: Arc<NodeStats>,
    /// Its `open_connections` gauge, resolved when the table was built.
    pub open_gauge: IntGauge,
    /// Set when the node's registry key vanished without a `down` announcement.
    pub missing_since: Option<Instant>,
}

impl RouteNode {
    /// Load estimate for least-loaded selection.
    pub fn load(&self) -> u64 {
        let open = self.stats.open.load(Ordering::Relaxed).max(0) as u64;
        self.record.connections.max(open) + self.stats.assigned_since_record.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct RoutingTable {
    pub nodes: Vec<Arc<RouteNode>>,
    by_id: HashMap<String, usize>,
    by_cookie: HashMap<String, usize>,
}

impl RoutingTable {
    pub fn new(nodes: Vec<Arc<RouteNode>>) -> Self {
        let by_id = nodes.iter().enumerate().map(|(i, n)| (n.record.node_id.clone(), i)).collect();
        let by_cookie = nodes.iter().enumerate().map(|(i, n)| (n.cookie.clone(), i)).collect();
        RoutingTable { nodes, by_id, by_cookie }
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<RouteNode>> {
        self.by_id.get(id).map(|&i| &self.nodes[i])
    }

    pub fn by_cookie(&self, value: &str) -> Option<&Arc<RouteNode>> {
        self.by_cookie.get(value).map(|&i| &self.nodes[i])
    }
}
