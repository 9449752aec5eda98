//! Whether nodes are alive. Active checks are pingora-load-balancing's
//! `HttpHealthCheck` against `GET /health` with the configured timeout and
//! rise/fall thresholds; a draining node answers 503 there but is alive (its
//! own clients still need it), so 503 counts as passing and draining is taken
//! from the registry instead. A node that answers 200 but says it is
//! `degraded` (its `X-Switchboard-Status`: cut off from Redis, or its
//! backplane subscription not proven live) passes too, and is marked so that
//! new clients go to the other nodes while any is not degraded. Failed
//! connects (`Cluster::reroute`) are forgotten at the node's next passing
//! check.

use crate::cluster::Cluster;
use crate::table::{RouteNode, RoutingTable};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck};
use pingora_load_balancing::Backend;
use prometheus::IntCounterVec;
use std::sync::Arc;
use std::time::Duration;

/// The validator's verdict for a node that answers but is degraded: a pass
/// (`NodeHealthCheck::check` turns it into one) that marks the node.
const DEGRADED: &str = "degraded";

pub struct NodeHealthCheck {
    inner: HttpHealthCheck,
    /// Whole-check deadline: connect, request and response together.
    timeout: Duration,
    table: Arc<ArcSwap<RoutingTable>>,
    failures: IntCounterVec,
}

impl NodeHealthCheck {
    pub fn new(
        cfg: &crate::config::BalancerConfig,
        table: Arc<ArcSwap<RoutingTable>>,
        failures: IntCounterVec,
    ) -> Box<Self> {
        let mut inner = HttpHealthCheck::new("switchboard-health", false);
        if let Ok(mut req) = pingora::http::RequestHeader::build("GET", b"/health", None) {
            let _ = req.append_header("Host", "switchboard-health");
            let _ = req.append_header("User-Agent", "switchboard-balancer");
            inner.req = req;
        }
        let timeout = Duration::from_millis(cfg.health_timeout_ms);
        inner.peer_template.options.connection_timeout = Some(timeout);
        inner.peer_template.options.read_timeout = Some(timeout);
        inner.consecutive_success = cfg.health_rise;
        inner.consecutive_failure = cfg.health_fall;
        inner.reuse_connection = true;
        inner.validator = Some(Box::new(|resp: &pingora::http::ResponseHeader| match resp.status.as_u16() {
            200 if resp.headers.get("x-switchboard-status").is_some_and(|v| v.as_bytes() == b"degraded") => {
                Err(pingora::Error::explain(pingora::ErrorType::CustomCode(DEGRADED, 200), "node is degraded"))
            }
            200 | 503 => Ok(()),
            code => Err(pingora::Error::explain(
                pingora::ErrorType::CustomCode("health", code),
                "unexpected /health status",
            )),
        }));
        Box::new(NodeHealthCheck { inner, timeout, table, failures })
    }

    fn node(&self, target: &Backend) -> Option<Arc<RouteNode>> {
        let addr = target.addr.as_inet().copied();
        self.table.load().nodes.iter().find(|n| Some(n.addr) == addr).cloned()
    }

    fn node_id(&self, target: &Backend) -> String {
        self.node(target).map(|n| n.record.node_id.clone()).unwrap_or_else(|| target.addr.to_string())
    }
}

#[async_trait]
impl HealthCheck for NodeHealthCheck {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        // Pingora bounds each step, not the whole; a stalled check would hold up
        // the pass for every node (seen after nodes were killed mid-check).
        let result = match tokio::time::timeout(self.timeout, self.inner.check(target)).await {
            Ok(r) => r,
            Err(_) => Err(pingora::Error::explain(pingora::ErrorType::ConnectTimedout, "health check timed out")),
        };
        let degraded = matches!(&result, Err(e) if e.etype() == &pingora::ErrorType::CustomCode(DEGRADED, 200));
        let result = if degraded { Ok(()) } else { result };
        if result.is_ok() {
            let node = self.node(target);
            if let Some(n) = &node {
                if n.stats.set_degraded(degraded) {
                    let id = &n.record.node_id;
                    match degraded {
                        true => {
                            tracing::warn!(node = %id, "node is degraded (cut off from Redis); new clients go elsewhere")
                        }
                        false => tracing::info!(node = %id, "node is no longer degraded"),
                    }
                }
            }
            let id = node.as_ref().map(|n| n.record.node_id.clone()).unwrap_or_else(|| target.addr.to_string());
            if node.is_some_and(|n| n.stats.clear_connect_failures()) {
                tracing::info!(node = %id, "node answers health checks again");
            }
        } else {
            self.failures.with_label_values(&[&self.node_id(target)]).inc();
        }
        result
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        let node = self.node_id(target);
        if healthy {
            // Back from failing its checks: it takes new clients slowly at first.
            if let Some(n) = self.node(target) {
                n.stats.gate.restart_slowly(crate::node_admission::now_ms());
            }
            tracing::info!(%node, "node healthy");
        } else {
            tracing::warn!(%node, "node failed health checks; no longer routed to");
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.inner.health_threshold(success)
    }
}

/// Runs a check pass over every node each `health_interval_ms`.
pub struct HealthChecker {
    pub cluster: Arc<Cluster>,
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let cfg = &self.cluster.cfg;
        let interval = Duration::from_millis(cfg.health_interval_ms);
        // A pass never outlives its checks by much; dropping it cancels what is left.
        let pass_limit = Duration::from_millis(cfg.health_timeout_ms * 2 + 100);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = async {
                    if tokio::time::timeout(pass_limit, self.cluster.backends.run_health_check(true)).await.is_err() {
                        tracing::warn!("a health check pass overran its time limit and was cut short");
                    }
                    tokio::time::sleep(interval).await;
                } => {}
            }
        }
    }
}
