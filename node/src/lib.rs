//! `switchboard-node`: a chat server speaking the ASP.NET Core SignalR
//! protocol, sharing messages with other nodes through a Redis backplane and
//! announcing itself in the Redis node registry the balancer watches.
//!
//! Layers: `protocol` (pure SignalR framing and messages) → `transport`
//! (WebSockets, Server-Sent Events, long polling) → `hub` (what messages mean)
//! → `backplane` (between nodes, in `history` order; the hub reaches it
//! only through its seam, and it hands arrivals back through `Deliver`).
//! `stateful` is SignalR 8's stateful reconnect for one connection;
//! `replay` answers `Resume` and `GetHistory` from history in pages, read
//! through `history_reads` (bounded, identical reads shared).
//! `registry` keeps the node discoverable, `lifecycle` starts and drains it,
//! `server` accepts HTTP connections with limits on request heads. `presence`
//! is the cluster's view of who is online and `presence_sync` the tasks that
//! write and announce it. The modules import one another without a circle:
//! `config` reads settings and key files and knows nothing of `auth`, which
//! builds on it; `cors` judges origins and `http` applies the judgement.

mod api;
mod app;
pub mod auth;
mod backplane;
mod command;
pub mod config;
mod connection;
mod control;
mod cors;
mod groups;
mod history;
mod history_reads;
mod http;
mod hub;
mod keepalive;
mod lifecycle;
mod metrics;
mod outbox;
mod presence;
mod presence_sync;
mod protocol;
mod redis_link;
mod registry;
mod replay;
mod server;
mod stateful;
mod transport;
mod upstream;
mod user_name;
mod users;

pub use lifecycle::shutdown_signal;

use config::NodeConfig;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;

/// Runs a node on `listener` with `cfg` until `shutdown` resolves, then
/// drains it (see `lifecycle`) and returns. The binary passes the process's
/// signals; tests start nodes in-process on port 0 and pass their own.
pub async fn run(listener: TcpListener, cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    let app = app::App::new(cfg)?;
    tracing::info!(node = %app.node_id, %listen, url = %app.url, "switchboard-node started");
    let background = lifecycle::start_background_tasks(&app);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = server::Limits {
        head_timeout: app.cfg.duration(app.cfg.request_head_timeout_secs),
        max_head_bytes: app.cfg.max_request_head_bytes,
    };
    let stop = async move {
        let _ = stop_rx.await;
    };
    let server = tokio::spawn(server::serve(listener, http::router(app.clone()), limits, stop, Duration::from_secs(5)));

    shutdown.await;
    lifecycle::drain(&app, background).await;
    let _ = stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(6), server).await.is_err() {
        tracing::warn!("HTTP server did not finish in time; exiting anyway");
    }
    tracing::info!("stopped");
    Ok(())
}
