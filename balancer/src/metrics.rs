//! The balancer's Prometheus metrics, served on the admin port.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub routing_decisions: IntCounterVec,
    pub upgrades: IntCounter,
    pub retries: IntCounter,
    pub refused: IntCounterVec,
    pub open_connections: IntGaugeVec,
    pub backend_healthy: IntGaugeVec,
    pub discovery_events: IntCounterVec,
    pub upstream_latency: Histogram,
    pub redis_up: IntGauge,
    pub nodes: IntGauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Names are static and distinct, so registration cannot collide.
    let _ = r.register(Box::new(m.clone()));
    m
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable!("{name}")))
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable!("{name}")))
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let buckets = vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
        Metrics {
            requests: counter_vec(
                &r,
                "switchboard_balancer_requests_total",
                "Client requests by response status class",
                &["status"],
            ),
            routing_decisions: counter_vec(
                &r,
                "switchboard_balancer_routing_decisions_total",
                "Routing decisions by kind: token, cookie, new, unknown_connection, no_node",
                &["kind"],
            ),
            upgrades: register(
                &r,
                IntCounter::new("switchboard_balancer_upgrades_total", "Connections upgraded to WebSocket")
                    .unwrap_or_else(|_| unreachable!()),
            ),
            retries: register(
                &r,
                IntCounter::new(
                    "switchboard_balancer_retries_total",
                    "Requests retried on another node after a connect failure",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            refused: counter_vec(
                &r,
                "switchboard_balancer_refused_total",
                "Requests refused by protection, by reason",
                &["reason"],
            ),
            open_connections: gauge_vec(
                &r,
                "switchboard_balancer_open_connections",
                "Requests in flight per backend, open WebSockets included",
                &["backend"],
            ),
            backend_healthy: gauge_vec(
                &r,
                "switchboard_balancer_backend_healthy",
                "1 while a backend passes health checks",
                &["backend"],
            ),
            discovery_events: counter_vec(
                &r,
                "switchboard_balancer_discovery_events_total",
                "Registry announcements and table changes by event",
                &["event"],
            ),
            upstream_latency: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "switchboard_balancer_upstream_latency_seconds",
                        "Time from choosing a backend to its response header",
                    )
                    .buckets(buckets),
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            redis_up: register(
                &r,
                IntGauge::new("switchboard_balancer_redis_up", "1 while the registry is reachable")
                    .unwrap_or_else(|_| unreachable!()),
            ),
            nodes: register(
                &r,
                IntGauge::new("switchboard_balancer_nodes", "Nodes in the routing table")
                    .unwrap_or_else(|_| unreachable!()),
            ),
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
