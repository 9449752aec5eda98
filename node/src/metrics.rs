//! The node's Prometheus metrics, named by the conventions (`_total` counters,
//! base units) and exported as text at `GET /metrics`.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use switchboard_common::metrics::{counter, counter_vec, gauge, gauge_vec};

pub struct Metrics {
    registry: Registry,
    pub connections: IntGaugeVec,
    pub connections_opened: IntCounterVec,
    pub messages_received: IntCounter,
    pub messages_sent: IntCounter,
    pub invocations: IntCounterVec,
    /// Server API requests by operation and status code (see `api`).
    pub api_requests: IntCounterVec,
    /// Messages the server API accepted for delivery, by address kind.
    pub api_messages: IntCounterVec,
    /// Upstream calls by category and outcome (see `upstream`).
    pub upstream_calls: IntCounterVec,
    pub protocol_errors: IntCounterVec,
    pub auth_refused: IntCounterVec,
    pub auth_expired: IntCounter,
    pub origin_refused: IntCounter,
    pub slow_client_disconnects: IntCounter,
    pub backplane_published: IntCounter,
    pub backplane_publish_failures: IntCounter,
    pub backplane_dropped: IntCounter,
    pub backplane_received: IntCounter,
    pub backplane_invalid: IntCounter,
    pub stateful_buffer_bytes: IntGauge,
    pub stateful_resumes: IntCounter,
    pub history_reads_shared: IntCounter,
    pub stateful_resent: IntCounter,
    pub stateful_expired: IntCounter,
    pub redis_up: IntGauge,
    pub draining: IntGauge,
    /// Set at scrape from the backplane (`http::metrics`).
    pub backplane_live: IntGauge,
    pub registry_written: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        Metrics {
            connections: gauge_vec(
                &r,
                "switchboard_node_connections",
                "Open SignalR connections by transport",
                &["transport"],
            ),
            connections_opened: counter_vec(
                &r,
                "switchboard_node_connections_opened_total",
                "SignalR connections opened, by transport",
                &["transport"],
            ),
            messages_received: counter(
                &r,
                "switchboard_node_messages_received_total",
                "Hub messages received from clients",
            ),
            messages_sent: counter(&r, "switchboard_node_messages_sent_total", "Frames queued to clients"),
            invocations: counter_vec(
                &r,
                "switchboard_node_invocations_total",
                "Hub method invocations by method and outcome",
                &["method", "outcome"],
            ),
            api_requests: counter_vec(
                &r,
                "switchboard_node_api_requests_total",
                "Server API requests by operation and status code",
                &["operation", "status"],
            ),
            api_messages: counter_vec(
                &r,
                "switchboard_node_api_messages_total",
                "Messages the server API accepted for delivery, by address (all, user, group, connection)",
                &["address"],
            ),
            upstream_calls: counter_vec(
                &r,
                "switchboard_node_upstream_calls_total",
                "Calls to the application backend's upstream URL, by category (connections, messages) and outcome (ok, timeout, unreachable, status, not_json, dropped)",
                &["category", "outcome"],
            ),
            protocol_errors: counter_vec(
                &r,
                "switchboard_node_protocol_errors_total",
                "Connections closed or requests refused for a protocol error, by kind",
                &["kind"],
            ),
            auth_refused: counter_vec(
                &r,
                "switchboard_node_auth_refused_total",
                "Requests refused for their bearer token: missing, invalid, other_user",
                &["reason"],
            ),
            auth_expired: counter(
                &r,
                "switchboard_node_auth_expired_total",
                "Connections closed because their sign-in token expired",
            ),
            origin_refused: counter(
                &r,
                "switchboard_node_origin_refused_total",
                "Hub requests refused for a cross-origin Origin not in allowed_origins",
            ),
            slow_client_disconnects: counter(
                &r,
                "switchboard_node_slow_client_disconnects_total",
                "Clients disconnected because their outgoing buffer was full",
            ),
            backplane_published: counter(
                &r,
                "switchboard_node_backplane_published_total",
                "Messages published to the Redis backplane",
            ),
            backplane_publish_failures: counter(
                &r,
                "switchboard_node_backplane_publish_failures_total",
                "Failed publish attempts (retried)",
            ),
            backplane_dropped: counter(
                &r,
                "switchboard_node_backplane_dropped_total",
                "Messages not stored or published (queue full or refused by Redis); delivered to this node's clients only",
            ),
            backplane_received: counter(
                &r,
                "switchboard_node_backplane_received_total",
                "Chat messages delivered from the backplane (this node's own included: every message is delivered as it comes back from Redis)",
            ),
            backplane_invalid: counter(
                &r,
                "switchboard_node_backplane_invalid_total",
                "Backplane payloads rejected as malformed",
            ),
            stateful_buffer_bytes: gauge(
                &r,
                "switchboard_node_stateful_buffer_bytes",
                "Bytes kept for stateful-reconnect clients until they acknowledge them",
            ),
            history_reads_shared: counter(
                &r,
                "switchboard_node_history_reads_shared_total",
                "History reads (Resume, GetHistory) answered by an identical read already in flight",
            ),
            stateful_resumes: counter(
                &r,
                "switchboard_node_stateful_resumes_total",
                "Stateful connections resumed on a new WebSocket",
            ),
            stateful_resent: counter(
                &r,
                "switchboard_node_stateful_resent_messages_total",
                "Unacknowledged messages resent after a resume",
            ),
            stateful_expired: counter(
                &r,
                "switchboard_node_stateful_expired_total",
                "Stateful connections dropped because no new socket came within the reconnect window",
            ),
            redis_up: gauge(&r, "switchboard_node_redis_up", "1 while Redis answers, 0 while it does not"),
            draining: gauge(&r, "switchboard_node_draining", "1 while the node drains before exit"),
            backplane_live: gauge(
                &r,
                "switchboard_node_backplane_live",
                "1 while messages from other nodes reach this one (subscribed, caught up, answering PINGs)",
            ),
            registry_written: gauge(
                &r,
                "switchboard_node_registry_last_write_timestamp_seconds",
                "When this node last wrote its registry entry (Unix seconds; 0 before the first write)",
            ),
            registry: r,
        }
    }

    /// Creates every series whose label values are known up front, at 0,
    /// so that dashboards and alerts see them before the first event: the
    /// connection gauges and counters per transport (`transports`), and the
    /// protocol errors of every kind `hub` and `keepalive` count.
    pub fn preset(&self, transports: &[&str]) {
        for t in transports {
            self.connections.with_label_values(&[t]);
            self.connections_opened.with_label_values(&[t]);
        }
        for kind in ["too_large", "invalid_json", "invalid_message", "handshake", "handshake_timeout"] {
            self.protocol_errors.with_label_values(&[kind]);
        }
    }

    /// Handles for the backplane's own counters.
    pub fn backplane(&self) -> crate::backplane::BackplaneMetrics {
        crate::backplane::BackplaneMetrics {
            published: self.backplane_published.clone(),
            publish_failures: self.backplane_publish_failures.clone(),
            dropped: self.backplane_dropped.clone(),
            received: self.backplane_received.clone(),
            invalid: self.backplane_invalid.clone(),
        }
    }

    pub fn render(&self) -> String {
        switchboard_common::metrics::render(&self.registry)
    }
}
