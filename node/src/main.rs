//! `switchboard-node`: a chat server speaking the ASP.NET Core SignalR
//! protocol, sharing messages with other nodes through a Redis backplane and
//! announcing itself in the Redis node registry the balancer watches.
//!
//! Layers: `protocol` (pure SignalR framing and messages) → `transport`
//! (WebSockets, Server-Sent Events, long polling) → `hub` (what messages mean)
//! → `backplane` (between nodes, in `history` order; the hub reaches it
//! only through its seam, and it hands arrivals back through `Deliver`).
//! `stateful` is SignalR 8's stateful reconnect for one connection.
//! `registry` keeps the node discoverable, `lifecycle` starts and drains it,
//! `server` accepts HTTP connections with limits on request heads.

mod app;
mod backplane;
mod config;
mod connection;
mod groups;
mod history;
mod http;
mod hub;
mod keepalive;
mod lifecycle;
mod metrics;
mod outbox;
mod protocol;
mod redis_link;
mod registry;
mod server;
mod stateful;
mod transport;

use clap::Parser;
use config::Cli;
use std::process::ExitCode;
use std::time::Duration;
use switchboard_common::config::init_logging;

/// jemalloc with background purging returns the memory of closed connections
/// to the OS within seconds; glibc malloc kept ~80 MB after 10,000 clients left.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = match Cli::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard-node: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.log_format);
    let listen = cfg.listen;
    let app = match app::App::new(cfg) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("switchboard-node: invalid redis URL: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("switchboard-node: cannot listen on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(node = %app.node_id, %listen, url = %app.url, "switchboard-node started");
    let heartbeat = lifecycle::start_background_tasks(&app);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = server::Limits {
        head_timeout: app.cfg.duration(app.cfg.request_head_timeout_secs),
        max_head_bytes: app.cfg.max_request_head_bytes,
    };
    let stop = async move {
        let _ = stop_rx.await;
    };
    let server = tokio::spawn(server::serve(listener, http::router(app.clone()), limits, stop, Duration::from_secs(5)));

    lifecycle::shutdown_signal().await;
    lifecycle::drain(&app, heartbeat).await;
    let _ = stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(6), server).await.is_err() {
        tracing::warn!("HTTP server did not finish in time; exiting anyway");
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
