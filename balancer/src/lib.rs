//! `switchboard-balancer`: a Pingora proxy that replaces Traefik in front of
//! Switchboard chat nodes. The map:
//!
//! ```text
//! front        every public connection from accept to close: connection cap,
//!              head limits, HTTPS redirect; a WebSocket upgrade goes to
//!              `tunnel`, any other request to the Pingora proxy in `proxy`
//! tls          the HTTPS listener's rustls handshake and certificate reloads
//! tunnel/      WebSocket tunnels the balancer relays itself (head, connect,
//!              relay)
//! proxy        Pingora ProxyHttp hooks for negotiates, long polls, SSE,
//!              sends, the page and /health
//! request      a request's facts, taken once from its head
//! routing      token -> cookie -> least loaded; `Cluster::route` applies it
//! admission    the connection cap, per-IP rate and forwarded headers;
//! node_admission  each node's rate of new connections, queue and slow start
//! refusal      the answers the balancer gives itself
//! public_surface  which node paths the public port forwards
//! discovery    the Redis registry watcher; `health` the active checks
//! cluster      the shared state: the routing table (`table`), health, metrics
//! history      the dashboard's last five minutes; `admin` the admin port
//!              (dashboard, /api/backends, /metrics from `metrics`)
//! access_log   one line per request, when enabled; `config` the settings
//! ```
//!
//! `run` is the whole program; the binary adds the command line and the
//! process's signals, and tests run it in-process with their own shutdown
//! signal. "The seed", in comments here and in the docs, is the pair of
//! articles this project re-creates (a SignalR + Traefik + Redis chat
//! cluster on Docker Compose): its `/nodes` shape, its Traefik settings and
//! its dashboard port are kept where they still make sense.

mod access_log;
mod admin;
mod admission;
mod cluster;
pub mod config;
mod connect;
mod discovery;
mod forward;
mod front;
mod health;
mod history;
mod metrics;
mod node_admission;
mod proxy;
mod public_surface;
mod refusal;
mod request;
mod routing;
mod table;
mod tls;
mod tunnel;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use config::BalancerConfig;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A shutdown that comes from a future instead of a signal (tests).
struct FutureSignal(Mutex<Option<Stop>>);

#[async_trait]
impl ShutdownSignalWatch for FutureSignal {
    async fn recv(&self) -> ShutdownSignal {
        let stop = self.0.lock().ok().and_then(|mut s| s.take());
        match stop {
            Some(f) => f.await,
            None => std::future::pending().await,
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// How the balancer learns it should stop.
pub enum Shutdown {
    /// The process's signals: SIGTERM graceful, SIGINT fast, SIGQUIT graceful upgrade.
    Signals,
    /// A future; when it resolves the balancer stops gracefully.
    When(Stop),
}

/// Checks what the settings name on disk: the certificate and key load (the
/// balancer would refuse to start otherwise).
pub fn check_files(cfg: &BalancerConfig) -> Result<(), String> {
    if cfg.tls_addr().map_err(|e| e.to_string())?.is_some() {
        let store = tls::CertStore::open(cfg.tls_cert.as_ref(), cfg.tls_key.as_ref())?;
        store.server_config()?;
    }
    Ok(())
}

/// Runs the balancer until it is told to stop; blocks the calling thread
/// (Pingora runs its own runtimes). `upgrade` takes the listening sockets
/// of a running balancer (Pingora's graceful upgrade).
pub fn run(mut cfg: BalancerConfig, upgrade: bool, shutdown: Shutdown) -> Result<(), String> {
    if cfg.cookie_secret.is_empty() {
        let key: [u8; 32] = rand::random();
        cfg.cookie_secret = key.iter().map(|b| format!("{b:02x}")).collect();
        tracing::info!("no cookie_secret set: affinity cookies use a random key and work with this process only");
    }

    let conf = ServerConf {
        threads: cfg.threads,
        work_stealing: cfg.work_stealing,
        grace_period_seconds: Some(cfg.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(cfg.shutdown_timeout_secs),
        pid_file: cfg.pid_file.clone(),
        upgrade_sock: cfg.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    // A certificate that does not load stops the balancer before it listens.
    let tls = match cfg.tls_addr().map_err(|e| e.to_string())? {
        Some(addr) => {
            let store = tls::CertStore::open(cfg.tls_cert.as_ref(), cfg.tls_key.as_ref())?;
            Some((addr, store.server_config()?, store))
        }
        None => None,
    };
    let opt = Opt { upgrade, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let table = Arc::new(ArcSwap::from_pointee(table::RoutingTable::default()));
    let metrics = metrics::Metrics::new();
    let mut backends =
        pingora_load_balancing::Backends::new(Box::new(discovery::RegistryDiscovery::new(table.clone())));
    backends.set_health_check(health::NodeHealthCheck::new(&cfg, table.clone(), metrics.health_failures.clone()));
    let (listen, admin_listen) = (cfg.listen, cfg.admin_listen);
    let open_files = admission::raise_open_file_limit();
    // The admin port's connections have descriptors of their own, beside the reserve.
    let reserve = cfg.fd_reserve.saturating_add(cfg.admin_max_connections as u64);
    let cap =
        open_files.map_or(cfg.max_connections, |l| cfg.max_connections.min(admission::descriptor_cap(l, reserve)));
    tracing::info!(open_file_limit = ?open_files, connection_cap = cap, fd_reserve = cfg.fd_reserve, "client connections capped");
    if cfg.admin_token.is_empty() && !admin_listen.ip().is_loopback() {
        tracing::info!(%admin_listen, "no admin_token: the admin port serves /dashboard, /api and /metrics to loopback clients only");
    }
    let admission = admission::Admission::new(cfg.rate_limit_per_ip, cap);
    let access_log =
        access_log::AccessLog::open(&cfg.access_log, cfg.access_log_format, metrics.access_log_dropped.clone())?;
    let mut cluster = cluster::Cluster::new(cfg, table, backends, metrics, admission);
    cluster.access_log = access_log;
    let cluster = Arc::new(cluster);

    let watcher = discovery::RegistryWatcher::new(cluster.clone()).map_err(|e| format!("invalid redis URL: {e}"))?;
    // Per-core (the default): one single-threaded service per thread, each
    // with its own listening socket (`SO_REUSEPORT`, the kernel spreads
    // connections), its own Pingora proxy and so its own node pool, so a
    // connection and everything it wakes stay on one thread. Work-stealing:
    // one service on one multi-threaded runtime.
    let per_core = !cluster.cfg.work_stealing;
    let services = if per_core { cluster.cfg.threads.max(1) } else { 1 };
    let tls = tls.map(|(addr, config, store)| {
        server.add_service(background_service("certificate reload", tls::Reloader(store)));
        tracing::info!(%addr, "HTTPS listener");
        (addr, tokio_rustls::TlsAcceptor::from(config))
    });
    for i in 0..services {
        let http_proxy =
            Arc::new(pingora::proxy::http_proxy(&server.configuration, proxy::SwitchboardProxy::new(cluster.clone())));
        let front = |name: &str, addr: std::net::SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>| {
            let app = front::FrontApp { cluster: cluster.clone(), proxy: http_proxy.clone(), tls };
            let mut service = Service::new(format!("switchboard {name} {i}"), app);
            service.add_listener(front::listener(addr, per_core.then_some(i)));
            if per_core {
                service.threads = Some(1);
            }
            service
        };
        server.add_service(front("proxy", listen, None));
        if let Some((addr, acceptor)) = &tls {
            server.add_service(front("https", *addr, Some(acceptor.clone())));
        }
    }
    let mut admin = Service::new("switchboard admin".to_string(), admin::AdminFront::new(cluster.clone()));
    admin.add_listener(front::listener(admin_listen, None));

    server.add_service(admin);
    server.add_service(background_service("registry watcher", watcher));
    server.add_service(background_service("dashboard history", cluster::HistorySampler { cluster: cluster.clone() }));
    server.add_service(background_service("health checks", health::HealthChecker { cluster }));
    tracing::info!(%listen, %admin_listen, "switchboard-balancer starting");
    let run_args = match shutdown {
        Shutdown::Signals => RunArgs::default(),
        Shutdown::When(f) => RunArgs { shutdown_signal: Box::new(FutureSignal(Mutex::new(Some(f)))) },
    };
    server.run(run_args);
    Ok(())
}
