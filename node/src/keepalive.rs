//! One sweeper task for all connections instead of timers per connection:
//! it sends a Ping to clients the node has not written to for the keep-alive
//! interval, closes clients silent for the client timeout, drops connections
//! whose handshake never came, forgets long-polling connections nobody has
//! polled for the long-poll idle time, acknowledges what stateful-reconnect
//! clients sent (so about once a second, like the official server), and drops
//! stateful connections whose client did not come back within the reconnect
//! window, and closes connections whose sign-in token has expired.

use crate::app::App;
use crate::connection::{now_ms, Transport};
use crate::protocol::{HubMessage, Outgoing};
use std::sync::Arc;
use std::time::Duration;

/// How long a connection with message ids holds live chat messages while
/// waiting for its `Resume` (or `GetHistory`).
const RESUME_GRACE_MS: u64 = 2000;

pub async fn sweep_forever(app: Arc<App>) {
    let cfg = &app.cfg;
    let ms = |secs: f64| (secs * 1000.0) as u64;
    let (keepalive, client_timeout) = (ms(cfg.keepalive_secs), ms(cfg.client_timeout_secs));
    let (handshake_timeout, poll_idle) = (ms(cfg.handshake_timeout_secs), ms(cfg.long_poll_idle_secs));
    let reconnect_window = ms(cfg.reconnect_window_secs);
    let period = Duration::from_millis(
        (keepalive.min(client_timeout).min(handshake_timeout).min(poll_idle).min(reconnect_window) / 4).clamp(50, 1000),
    );
    let ping = Outgoing::new(HubMessage::Ping);
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let now = now_ms();
        // Token expiry is wall-clock time, unlike the monotonic `now`.
        let unix_secs = jsonwebtoken::get_current_timestamp();
        for conn in app.connections.all() {
            if conn.take_auth_expiry(unix_secs) {
                // As the official server with CloseOnAuthenticationExpiration;
                // a client may reconnect with a fresh token.
                tracing::info!(connection = %conn.connection_id, "sign-in token expired; closing");
                app.metrics.auth_expired.inc();
                app.close(&conn, Some("The connection's authentication token expired.".into()), true);
                continue;
            }
            if let Some(st) = conn.stateful() {
                if let Some(since) = st.disconnected_since() {
                    if now.saturating_sub(since) >= reconnect_window {
                        tracing::info!(connection = %conn.connection_id, "client did not resume within the reconnect window");
                        app.metrics.stateful_expired.inc();
                        app.disconnect(&conn);
                    }
                    continue;
                }
                if let Some(id) = st.ack_due() {
                    app.send_message(&conn, HubMessage::Ack { sequence_id: id });
                }
            }
            // A message-id client that neither resumed nor read history
            // within a moment gets its live messages.
            if conn.hold_outlived(now, RESUME_GRACE_MS) {
                app.release_held(&conn, &[]);
            }
            if conn.transport().is_some_and(Transport::is_polled) && conn.unpolled_for(now, poll_idle) {
                tracing::debug!(connection = %conn.connection_id, "long-polling client stopped polling");
                app.disconnect(&conn);
            } else if !conn.is_handshaken() {
                if conn.age_ms(now) >= handshake_timeout {
                    tracing::info!(connection = %conn.connection_id, "no handshake in time; closing");
                    app.metrics.protocol_errors.with_label_values(&["handshake_timeout"]).inc();
                    app.close(&conn, None, false);
                }
            } else if conn.silent_for_ms(now) >= client_timeout {
                tracing::info!(connection = %conn.connection_id, "client timed out");
                app.close(
                    &conn,
                    Some("Server timeout elapsed without receiving a message from the client.".into()),
                    false,
                );
            } else if conn.unsent_for_ms(now) >= keepalive {
                app.send_to(&conn, &ping);
            }
        }
    }
}
