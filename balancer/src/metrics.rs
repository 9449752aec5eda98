//! The balancer's Prometheus metrics, served on the admin port.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use switchboard_common::metrics::{counter, counter_vec, gauge, gauge_vec, histogram};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub routing_decisions: IntCounterVec,
    pub upgrades: IntCounter,
    pub retries: IntCounter,
    pub admission_moved: IntCounter,
    pub admission_waited: IntCounter,
    pub admission_waiting: IntGaugeVec,
    pub refused: IntCounterVec,
    pub open_connections: IntGaugeVec,
    pub backend_healthy: IntGaugeVec,
    pub discovery_events: IntCounterVec,
    pub upstream_latency: Histogram,
    pub redis_up: IntGauge,
    pub nodes: IntGauge,
    pub access_log_dropped: IntCounter,
    pub health_failures: IntCounterVec,
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
            upgrades: counter(&r, "switchboard_balancer_upgrades_total", "Connections upgraded to WebSocket"),
            retries: counter(
                &r,
                "switchboard_balancer_retries_total",
                "Requests retried on another node after a connect failure",
            ),
            admission_moved: counter(
                &r,
                "switchboard_balancer_admission_moved_total",
                "New connections sent to another node because theirs had no admission token",
            ),
            admission_waited: counter(
                &r,
                "switchboard_balancer_admission_waited_total",
                "New connections that waited for their node's admission turn",
            ),
            admission_waiting: gauge_vec(
                &r,
                "switchboard_balancer_admission_waiting",
                "New connections waiting for their node's admission turn now",
                &["backend"],
            ),
            refused: counter_vec(
                &r,
                "switchboard_balancer_refused_total",
                "Requests and connections refused by admission, by reason",
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
            upstream_latency: histogram(
                &r,
                "switchboard_balancer_upstream_latency_seconds",
                "Time from choosing a backend to its response header",
                buckets,
            ),
            redis_up: gauge(&r, "switchboard_balancer_redis_up", "1 while the registry is reachable"),
            nodes: gauge(&r, "switchboard_balancer_nodes", "Nodes in the routing table"),
            access_log_dropped: counter(
                &r,
                "switchboard_balancer_access_log_dropped_total",
                "Access log lines dropped because the writer fell behind",
            ),
            health_failures: counter_vec(
                &r,
                "switchboard_balancer_health_check_failures_total",
                "Active health checks that failed, per backend",
                &["backend"],
            ),
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        switchboard_common::metrics::render(&self.registry)
    }
}
