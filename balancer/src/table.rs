//! The routing table: every known node with its registry record, its
//! pingora-load-balancing `Backend` (the key of its health state), its address,
//! its affinity cookie value and the counters that outlive table rebuilds,
//! indexed by node id and by cookie. Plain data; discovery builds a new table
//! and swaps it in whole.

use pingora_load_balancing::Backend;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
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
    /// Set when a connection to the node failed; cleared by its next passing check.
    pub unreachable: AtomicBool,
}

impl NodeStats {
    /// Marks the node unreachable; true when it was not already.
    pub fn mark_unreachable(&self) -> bool {
        !self.unreachable.swap(true, Ordering::AcqRel)
    }

    /// Clears the mark; true when it was set.
    pub fn clear_unreachable(&self) -> bool {
        self.unreachable.swap(false, Ordering::AcqRel)
    }
}

#[derive(Clone)]
pub struct RouteNode {
    pub record: NodeRecord,
    pub backend: Backend,
    pub addr: SocketAddr,
    pub cookie: String,
    pub stats: Arc<NodeStats>,
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
