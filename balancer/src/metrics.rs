//! The balancer's Prometheus metrics, served on the admin port. The labels
//! every request touches (its status class, its route kind) are resolved to
//! counter handles once, here, rather than looked up per request (a label
//! lookup hashes the values and takes a lock).

use crate::routing::RouteKind;
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
    /// `requests` for each of `STATUS_CLASSES`.
    by_status: [IntCounter; 6],
    /// `routing_decisions` for `token`, `cookie` and `new`.
    by_route: [IntCounter; 3],
}

/// The `status` label's values, in the order `status_index` gives.
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// The status class a response is counted under: its index in `STATUS_CLASSES`.
fn status_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => STATUS_CLASSES.len() - 1,
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let buckets = vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
        let requests = counter_vec(
            &r,
            "switchboard_balancer_requests_total",
            "Client requests by response status class",
            &["status"],
        );
        let routing_decisions = counter_vec(
            &r,
            "switchboard_balancer_routing_decisions_total",
            "Routing decisions by kind: token, cookie, new, unknown_connection, no_node",
            &["kind"],
        );
        Metrics {
            by_status: STATUS_CLASSES.map(|c| requests.with_label_values(&[c])),
            by_route: [RouteKind::Token, RouteKind::Cookie, RouteKind::New]
                .map(|k| routing_decisions.with_label_values(&[k.label()])),
            requests,
            routing_decisions,
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

    /// Counts a request answered with `status` (0: none was written).
    pub fn count_request(&self, status: u16) {
        self.by_status[status_index(status)].inc();
    }

    /// Counts a request routed to a node by `kind`.
    pub fn count_routed(&self, kind: RouteKind) {
        self.by_route[kind as usize].inc();
    }

    pub fn render(&self) -> String {
        switchboard_common::metrics::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_routes_are_counted_under_their_labels() {
        let m = Metrics::new();
        for status in [101, 204, 302, 404, 503, 0, 600] {
            m.count_request(status);
        }
        m.count_routed(RouteKind::Cookie);
        let text = m.render();
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            assert!(text.contains(&format!("switchboard_balancer_requests_total{{status=\"{class}\"}} 1")), "{text}");
        }
        assert!(text.contains("switchboard_balancer_requests_total{status=\"none\"} 2"), "{text}");
        assert!(text.contains("switchboard_balancer_routing_decisions_total{kind=\"cookie\"} 1"), "{text}");
        assert!(text.contains("switchboard_balancer_routing_decisions_total{kind=\"token\"} 0"), "{text}");
    }
}
