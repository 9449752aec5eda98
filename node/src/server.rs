//! The node's HTTP listener: accepts connections and serves each with
//! hyper's HTTP/1.1 server (upgrades enabled for WebSockets), the router from
//! `http` as the service. It exists instead of `axum::serve` for the limits a
//! server facing untrusted clients needs, which `axum::serve` does not set:
//! every request head, a kept-alive connection's later ones included, must
//! arrive within `request_head_timeout_secs` (a connection that never sends
//! is closed after it too) and fit in `max_request_head_bytes` (431 past it).
//! On shutdown it stops accepting, lets requests in progress finish and
//! closes idle connections; upgraded WebSockets belong to the hub by then
//! and are drained by `lifecycle`.

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub struct Limits {
    pub head_timeout: Duration,
    pub max_head_bytes: usize,
}

/// Serves `router` on `listener` until `stop` resolves, then waits up to
/// `grace` for connections in progress.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    stop: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    // HTTP/1.1 only (hyper-util's auto builder first waits, with no time
    // limit, for bytes to tell HTTP/2 from 1.1, so a silent connection would
    // never reach the head timeout).
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_header_size(limits.max_head_bytes)
        .keep_alive(true);
    // Every connection task holds a sender; when all are gone, all are done.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::pin!(stop);
    loop {
        let (socket, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or memory: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = socket.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection(TokioIo::new(socket), service).with_upgrades();
        let (done, mut shutdown) = (done_tx.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            let _done = done;
            tokio::pin!(conn);
            // Timeouts, resets and malformed requests end here; hyper has
            // already answered what deserved an answer.
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = shutdown.changed() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = shutdown_tx.send(true);
    drop(done_tx);
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        tracing::warn!("HTTP connections did not finish in time; exiting anyway");
    }
}
