//! One small harness for the end-to-end tests. Everything is stopped when
//! dropped, and every wait is bounded.
//!
//! - Redis: `redis_server::RedisServer`, a real `redis-server` (or Sentinel)
//!   on a free loopback port; `redis_cluster::RedisCluster`, a real Redis
//!   Cluster of three masters and three replicas.
//! - The programs: `process::Process` runs `switchboard-node` and
//!   `switchboard-balancer` binaries from `target/<profile>`;
//!   `cluster::{TestNode, TestBalancer}` start them against a test's Redis,
//!   and `cluster::{InProcessNode, InProcessBalancer}` run them inside the
//!   test process.
//! - Clients: `client::HubClient`, a SignalR client written from the spec
//!   (negotiate v0 and v1; WebSockets, Server-Sent Events and long polling;
//!   JSON, or MessagePack from `msgpack`); `official` serves Microsoft's
//!   unmodified browser client to a test page; `browser` drives headless
//!   Chromium over WebDriver; `tls` makes test certificates and a TLS client.

pub mod browser;
pub mod client;
pub mod cluster;
pub mod msgpack;
pub mod official;
pub mod process;
pub mod redis_cluster;
pub mod redis_server;
pub mod tls;

pub use client::{ConnectOptions, HubClient, Protocol, TransportKind, ALL_TRANSPORTS, WAIT};
pub use cluster::{InProcessBalancer, InProcessNode, TestBalancer, TestNode};
pub use process::{free_port, free_ports, Process};
pub use redis_cluster::RedisCluster;
pub use redis_server::RedisServer;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// Signs tokens the way nodes started with `--auth required --auth-secret
/// SECRET` check them.
pub fn token_signer(secret: &str) -> switchboard_node::auth::Auth {
    use clap::Parser;
    let cli = switchboard_node::config::Cli::parse_from(["n", "--auth", "required", "--auth-secret", secret]);
    switchboard_node::auth::Auth::from_config(&cli.resolve().expect("auth settings")).expect("auth")
}

/// The interpreter of the virtual environment scripts/test.sh fills from
/// tests/python/requirements.txt (PyPI SignalR clients, kubernetes-validate);
/// `None` (with a note) only when SWITCHBOARD_SKIP_PYTHON_CLIENTS is set.
pub fn py_env_python() -> Option<PathBuf> {
    let path = std::env::var_os("SWITCHBOARD_PY_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py-clients/bin/python")));
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("SWITCHBOARD_SKIP_PYTHON_CLIENTS").is_some() {
        eprintln!("SKIPPING: no {} and SWITCHBOARD_SKIP_PYTHON_CLIENTS is set", path.display());
        return None;
    }
    panic!(
        "{} is missing: scripts/test.sh creates it (python3 -m venv target/py-clients; \
         pip install -r tests/python/requirements.txt), or set SWITCHBOARD_SKIP_PYTHON_CLIENTS=1",
        path.display()
    );
}

/// Polls `check` every 50 ms until it yields `Some`, or panics after `limit`
/// with `what` in the message. Waiting is bounded; nothing here asserts speed.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `GET url` answers `status`, or panics after `limit`.
pub async fn wait_for_status(url: &str, status: u16, limit: Duration, what: &str) {
    let http = reqwest::Client::new();
    eventually(limit, what, || {
        let (http, url) = (http.clone(), url.to_string());
        async move { http.get(url).send().await.ok().filter(|r| r.status() == status).map(|_| ()) }
    })
    .await;
}

/// GET `url` and return the body as text; panics when unreachable.
pub async fn get_text(url: &str) -> String {
    let resp = reqwest::get(url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.text().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// The value of the sample `series` (a name, with its labels as exposed:
/// `name{label="v"}`) in a Prometheus text exposition; 0 when absent.
pub fn metric_value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Whether a Prometheus text exposition has a sample of `name` whose value is not zero.
pub fn metric_nonzero(exposition: &str, name: &str) -> bool {
    exposition.lines().any(|l| l.starts_with(name) && !l.starts_with('#') && !l.ends_with(" 0"))
}

/// Kills every TCP socket on this machine whose destination is 127.0.0.1:`port`
/// (`ss -K`, iproute2), as a network cut would: the client side of each gets
/// an abort, the server side a reset.
pub fn cut_connections_to(port: u16) {
    ss(&["-K", "dst", "127.0.0.1", "dport", "=", &format!(":{port}")]);
}

/// How many TCP sockets on this machine listen on `port` (`ss -ltn`): one
/// per process or thread that bound it with `SO_REUSEPORT`.
pub fn listening_sockets(port: u16) -> usize {
    ss(&["-ltnH", "sport", "=", &format!(":{port}")]).lines().filter(|l| !l.trim().is_empty()).count()
}

/// Runs `ss` (iproute2) and returns what it printed.
fn ss(args: &[&str]) -> String {
    let out =
        std::process::Command::new("ss").args(args).output().expect("ss (iproute2) is installed by scripts/test.sh");
    assert!(out.status.success(), "ss {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GET `url` and parse JSON; `None` on any failure.
pub async fn get_json(http: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    let resp = http.get(url).send().await.ok()?;
    resp.json().await.ok()
}
