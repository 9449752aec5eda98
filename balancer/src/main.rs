//! `switchboard-balancer`: a Pingora proxy that replaces Traefik in front of
//! Switchboard chat nodes. It discovers nodes by watching the Redis registry
//! (`discovery`), checks them (`health`), routes every request by connection
//! token, affinity cookie or least load (`routing`) through the Pingora hooks
//! in `proxy`, and reports on a separate admin port (`admin`, `metrics`).
//! `cluster` holds the shared state; `config` the settings.

mod admin;
mod admission;
mod cluster;
mod config;
mod discovery;
mod front;
mod health;
mod metrics;
mod proxy;
mod public_surface;
mod refusal;
mod routing;
mod table;
mod tunnel;

use arc_swap::ArcSwap;
use clap::Parser;
use config::Cli;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::process::ExitCode;
use std::sync::Arc;
use switchboard_common::config::init_logging;

/// jemalloc with background purging returns the memory of closed connections
/// to the OS within seconds; glibc malloc kept ~80 MB after 10,000 clients left.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let upgrade = cli.upgrade;
    let mut cfg = match cli.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard-balancer: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.log_format);
    if cfg.cookie_secret.is_empty() {
        let key: [u8; 32] = rand::random();
        cfg.cookie_secret = key.iter().map(|b| format!("{b:02x}")).collect();
        tracing::info!("no cookie_secret set: affinity cookies use a random key and work with this process only");
    }

    let conf = ServerConf {
        threads: cfg.threads,
        grace_period_seconds: Some(cfg.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(cfg.shutdown_timeout_secs),
        pid_file: cfg.pid_file.clone(),
        upgrade_sock: cfg.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    let opt = Opt { upgrade, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let table = Arc::new(ArcSwap::from_pointee(table::RoutingTable::default()));
    let metrics = metrics::Metrics::new();
    let mut backends =
        pingora_load_balancing::Backends::new(Box::new(discovery::RegistryDiscovery::new(table.clone())));
    backends.set_health_check(health::NodeHealthCheck::new(&cfg, table.clone(), metrics.backend_healthy.clone()));
    let (listen, admin_listen) = (cfg.listen, cfg.admin_listen);
    let open_files = admission::open_file_limit();
    let cap = open_files
        .map_or(cfg.max_connections, |l| cfg.max_connections.min(admission::descriptor_cap(l, cfg.fd_reserve)));
    tracing::info!(open_file_limit = ?open_files, connection_cap = cap, fd_reserve = cfg.fd_reserve, "client connections capped");
    if cfg.admin_token.is_empty() && !admin_listen.ip().is_loopback() {
        tracing::info!(%admin_listen, "no admin_token: the admin port serves /dashboard, /api and /metrics to loopback clients only");
    }
    let admission = admission::Admission::new(cfg.rate_limit_per_ip, cap);
    let cluster = Arc::new(cluster::Cluster::new(cfg, table, backends, metrics, admission));

    let watcher = match discovery::RegistryWatcher::new(cluster.clone()) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("switchboard-balancer: invalid redis URL: {e}");
            return ExitCode::from(2);
        }
    };
    let http_proxy =
        Arc::new(pingora::proxy::http_proxy(&server.configuration, proxy::SwitchboardProxy::new(cluster.clone())));
    let front_app = front::FrontApp { cluster: cluster.clone(), proxy: http_proxy };
    let mut proxy = Service::new("switchboard proxy".to_string(), front_app);
    proxy.add_tcp(&listen.to_string());
    let mut admin = Service::new("switchboard admin".to_string(), admin::AdminApp { cluster: cluster.clone() });
    admin.add_tcp(&admin_listen.to_string());

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(background_service("registry watcher", watcher));
    server.add_service(background_service("health checks", health::HealthChecker { cluster }));
    tracing::info!(%listen, %admin_listen, "switchboard-balancer starting");
    server.run_forever();
}
