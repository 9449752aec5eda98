//! What the balancer knows about the chat nodes, shared by every service:
//! the routing table (an `ArcSwap` snapshot that request handlers read without
//! locks, replaced whole by discovery), the pingora-load-balancing `Backends`
//! that own active health state, passive failure marks, and per-node counters
//! that survive table rebuilds. `Cluster::ready` is the one definition of
//! "this node can take traffic".

use crate::config::BalancerConfig;
use crate::metrics::Metrics;
use crate::protection::Protection;
use arc_swap::ArcSwap;
use pingora_load_balancing::Backend;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use switchboard_common::redis_state::RedisState;
use switchboard_common::registry::{NodeRecord, NodeStatus};

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

pub struct Cluster {
    pub cfg: BalancerConfig,
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub backends: pingora_load_balancing::Backends,
    pub metrics: Metrics,
    pub protection: Protection,
    stats: Mutex<HashMap<String, Arc<NodeStats>>>,
    redis: RedisState,
}

impl Cluster {
    pub fn new(
        cfg: BalancerConfig,
        table: Arc<ArcSwap<RoutingTable>>,
        backends: pingora_load_balancing::Backends,
        metrics: Metrics,
        protection: Protection,
    ) -> Self {
        Cluster {
            protection,
            cfg,
            table,
            backends,
            metrics,
            stats: Mutex::new(HashMap::new()),
            redis: RedisState::new("routing to the nodes already known"),
        }
    }

    /// Alive: passing active checks and not refusing connections.
    pub fn ready(&self, node: &RouteNode) -> bool {
        self.backends.ready(&node.backend) && !node.stats.unreachable.load(Ordering::Acquire)
    }

    /// May receive new clients: alive and not draining.
    pub fn accepts_new(&self, node: &RouteNode) -> bool {
        node.record.status == NodeStatus::Healthy && self.ready(node)
    }

    /// The counters of `node_id`, created on first use.
    pub fn stats_for(&self, node_id: &str) -> Arc<NodeStats> {
        let mut map = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(node_id.to_string()).or_default().clone()
    }

    /// Drops counters of nodes no longer in the table.
    pub fn forget_stats_except(&self, keep: &HashSet<String>) {
        let mut map = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|id, s| keep.contains(id) || s.open.load(Ordering::Relaxed) > 0);
    }

    /// Records that `node` was chosen for a request by `kind`.
    pub fn count_route(&self, node: &RouteNode, kind: crate::routing::RouteKind) {
        use crate::routing::RouteKind;
        let s = &node.stats;
        let counter = match kind {
            RouteKind::Token => &s.routed_token,
            RouteKind::Cookie => &s.routed_cookie,
            RouteKind::New => {
                s.assigned_since_record.fetch_add(1, Ordering::Relaxed);
                &s.routed_new
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.metrics.routing_decisions.with_label_values(&[kind.label()]).inc();
    }

    pub fn set_redis_up(&self, up: bool, err: Option<&redis::RedisError>) {
        self.metrics.redis_up.set(self.redis.record(up, err) as i64);
    }

    pub fn redis_up(&self) -> bool {
        self.redis.is_up()
    }
}
