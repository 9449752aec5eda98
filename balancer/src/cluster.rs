//! What the balancer knows about the chat nodes, shared by every service:
//! the routing table (`table`, an `ArcSwap` snapshot that request handlers
//! read without locks, replaced whole by discovery), the pingora-load-balancing
//! `Backends` that own active health state, passive failure marks, and
//! per-node counters that survive table rebuilds. `Cluster::ready` is the one
//! definition of "this node can take traffic"; `Cluster::route` applies the
//! pure `routing` decision to the live table and counts it.

use crate::access_log::AccessLog;
use crate::admission::Admission;
use crate::config::BalancerConfig;
use crate::history::{self, History, NodeSample, Totals};
use crate::metrics::Metrics;
use crate::node_admission::{now_ms, Policy};
use crate::request::Request;
use crate::routing::{self, Readiness, RouteDecision, RouteKind};
use crate::table::{NodeStats, RouteNode, RoutingTable};
use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use switchboard_common::redis_state::RedisState;
use switchboard_common::registry::NodeStatus;

/// Other nodes a request is retried on after connect failures, at most.
pub const MAX_RETRIES: usize = 3;
/// Connect attempts a token route makes to its own node before the client
/// gets a 502, and the wait before the second (doubled for each after it):
/// a node that refuses connections for a moment loses none of its clients.
pub const TOKEN_CONNECT_TRIES: usize = 3;
const TOKEN_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

pub struct Cluster {
    pub cfg: BalancerConfig,
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub backends: pingora_load_balancing::Backends,
    pub metrics: Metrics,
    pub admission: Admission,
    /// The access log, when it is on.
    pub access_log: Option<AccessLog>,
    /// The dashboard's last minutes (see `history`).
    pub history: History,
    stats: Mutex<HashMap<String, Arc<NodeStats>>>,
    redis: RedisState,
    /// Discovery has loaded the registry once: nodes added from then on
    /// are new to the cluster and start slowly.
    pub table_loaded: std::sync::atomic::AtomicBool,
}

impl Cluster {
    pub fn new(
        cfg: BalancerConfig,
        table: Arc<ArcSwap<RoutingTable>>,
        backends: pingora_load_balancing::Backends,
        metrics: Metrics,
        admission: Admission,
    ) -> Self {
        Cluster {
            admission,
            cfg,
            table,
            backends,
            metrics,
            access_log: None,
            history: History::default(),
            stats: Mutex::new(HashMap::new()),
            redis: RedisState::new("routing to the nodes already known"),
            table_loaded: std::sync::atomic::AtomicBool::new(false),
        }
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

    /// Routes a request by the live table (see `routing::decide`) and counts
    /// the decision; a retry elsewhere is counted by `reroute`.
    pub fn route(&self, request: &Request<'_>) -> RouteDecision {
        let table = self.table.load();
        let cookie = request.cookie.as_deref();
        let decision = routing::decide(&table, self, request.id(), cookie, &mut rand::random::<u32>);
        match &decision {
            RouteDecision::Node { node, kind } => self.count_route(node, *kind),
            RouteDecision::UnknownConnection => {
                self.metrics.routing_decisions.with_label_values(&["unknown_connection"]).inc()
            }
            RouteDecision::NoNodeAvailable => self.metrics.routing_decisions.with_label_values(&["no_node"]).inc(),
        }
        decision
    }

    /// The least-loaded node accepting new clients, other than `exclude`.
    pub fn least_loaded(&self, exclude: &[String]) -> Option<Arc<RouteNode>> {
        routing::least_loaded(&self.table.load(), self, exclude, &mut rand::random::<u32>)
    }

    /// The per-node admission settings (see `node_admission`).
    pub fn admission_policy(&self) -> Policy {
        Policy {
            rate: self.cfg.node_admission_rate,
            slow_start_ms: self.cfg.slow_start_secs.saturating_mul(1000),
            max_wait_ms: self.cfg.admission_wait_ms,
        }
    }

    /// Admits a new SignalR connection routed to `node` (see
    /// `node_admission`): at once when the node has a token; else on the
    /// least-loaded other node that has one (as a new client); else after
    /// waiting for the node's turn, if that comes within `admission_wait_ms`
    /// and the queue is not full. `None`: answer 503 (counted).
    pub async fn admit(&self, node: Arc<RouteNode>, kind: RouteKind) -> Option<(Arc<RouteNode>, RouteKind)> {
        let policy = self.admission_policy();
        if node.stats.gate.take(&policy, now_ms()).is_ok() {
            return Some((node, kind));
        }
        let mut tried = vec![node.record.node_id.clone()];
        while let Some(other) = self.least_loaded(&tried) {
            if other.stats.gate.take(&policy, now_ms()).is_ok() {
                self.metrics.admission_moved.inc();
                self.count_route(&other, RouteKind::New);
                return Some((other, RouteKind::New));
            }
            tried.push(other.record.node_id.clone());
        }
        let gate = &node.stats.gate;
        let (rate, _, _) = gate.state(&policy, now_ms());
        let refused = || {
            self.metrics.refused.with_label_values(&["node_busy"]).inc();
            None
        };
        let Some(_waiting) = gate.enqueue(policy.max_waiting(rate)) else { return refused() };
        self.metrics.admission_waited.inc();
        let deadline = now_ms() + policy.max_wait_ms;
        loop {
            match gate.take(&policy, now_ms()) {
                Ok(()) => return Some((node.clone(), kind)),
                Err(wait) if now_ms() + wait <= deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(wait.max(1))).await
                }
                Err(_) => return refused(),
            }
        }
    }

    /// Sets the per-node gauges read from state elsewhere, as `/metrics` is
    /// scraped: admission waiters from each node's gate, and
    /// `backend_healthy` from Pingora's own verdict (its one writer, so a
    /// node that passed one check of `health_rise` is not reported healthy
    /// before Pingora counts it so, and a removed node's series goes with it).
    pub fn refresh_gauges(&self) {
        self.metrics.backend_healthy.reset();
        for n in self.table.load().nodes.iter() {
            let id = n.record.node_id.as_str();
            let waiting = n.stats.gate.waiting.load(Ordering::Relaxed) as i64;
            self.metrics.admission_waiting.with_label_values(&[id]).set(waiting);
            self.metrics.backend_healthy.with_label_values(&[id]).set(self.ready(n) as i64);
            // A node with no failure yet shows 0, not nothing.
            self.metrics.health_failures.with_label_values(&[id]);
        }
    }

    /// Whether a new SignalR connection from `ip` is within the per-IP rate;
    /// a refusal is counted.
    pub fn admit_new_connection(&self, ip: Option<std::net::IpAddr>) -> bool {
        let ok = ip.is_none_or(|ip| self.admission.allow_new(ip));
        if !ok {
            self.metrics.refused.with_label_values(&["rate_limit"]).inc();
        }
        ok
    }

    /// After a failed connect to `failed`: the node to try next and how long
    /// to wait first, if any. A token route stays with its node (the
    /// connection lives there): it tries again after a short wait, up to
    /// `TOKEN_CONNECT_TRIES` in all, while the node passes its health checks,
    /// and then the client gets a 502, never a 404. Any other request tries
    /// up to `MAX_RETRIES` more nodes at once, least loaded first, as a new
    /// client. The failure is counted against the node: at `PASSIVE_FALL`
    /// it gets no new clients until it passes a check.
    pub fn reroute(
        &self,
        failed: &Arc<RouteNode>,
        kind: RouteKind,
        tried: &mut Vec<String>,
    ) -> Option<(Arc<RouteNode>, std::time::Duration)> {
        if failed.stats.note_connect_failure() {
            tracing::warn!(node = %failed.record.node_id, "connects failed; no new clients for it until it passes a check");
        }
        tried.push(failed.record.node_id.clone());
        if kind == RouteKind::Token {
            let attempts = tried.len();
            if attempts >= TOKEN_CONNECT_TRIES || !self.ready(failed) {
                return None;
            }
            self.metrics.retries.inc();
            return Some((failed.clone(), TOKEN_RETRY_WAIT * (1 << (attempts - 1))));
        }
        if tried.len() > MAX_RETRIES {
            return None;
        }
        let next = self.least_loaded(tried)?;
        self.metrics.retries.inc();
        self.count_route(&next, RouteKind::New);
        Some((next, std::time::Duration::ZERO))
    }

    /// Records that `node` was chosen for a request by `kind`.
    fn count_route(&self, node: &RouteNode, kind: RouteKind) {
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
        self.metrics.count_routed(kind);
    }

    pub fn set_redis_up(&self, up: bool, err: Option<&redis::RedisError>) {
        self.metrics.redis_up.set(self.redis.record(up, err) as i64);
    }

    pub fn redis_up(&self) -> bool {
        self.redis.is_up()
    }

    /// Adds this second to the dashboard's history (`Unix ms` `t`).
    pub fn sample_history(&self, t: i64) {
        let table = self.table.load();
        let nodes = table
            .nodes
            .iter()
            .map(|n| NodeSample {
                id: n.record.node_id.clone(),
                name: n.record.name.clone(),
                open: n.stats.open.load(Ordering::Relaxed),
                on_node: n.record.connections,
                state: history::state_of(self.ready(n), n.record.status),
            })
            .collect();
        self.history.record(t, Totals::of(&self.metrics), nodes);
    }
}

/// Samples the cluster for the dashboard once a second until shutdown.
pub struct HistorySampler {
    pub cluster: Arc<Cluster>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for HistorySampler {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut tick = tokio::time::interval(history::INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.sample_history_now(),
            }
        }
    }
}

impl HistorySampler {
    fn sample_history_now(&self) {
        self.cluster.sample_history(chrono::Utc::now().timestamp_millis());
    }
}

impl Readiness for Cluster {
    /// Alive: passing active checks. A connect that failed does not make a
    /// node's own connections unknown (see `reroute`).
    fn ready(&self, node: &RouteNode) -> bool {
        self.backends.ready(&node.backend)
    }

    /// May receive new clients: alive, not draining, and not refusing connects.
    fn accepts_new(&self, node: &RouteNode) -> bool {
        node.record.status == NodeStatus::Healthy && self.ready(node) && !node.stats.passively_down()
    }

    /// Its last health check said it is cut off from Redis.
    fn degraded(&self, node: &RouteNode) -> bool {
        node.stats.is_degraded()
    }
}
