//! Starting the project's programs for a test: `TestNode` runs a
//! `switchboard-node` on a free loopback port against the test's Redis, with
//! short registry timings (0.3 s heartbeat, 1.5 s TTL, 1 s drain, closes spread over 0.5 s) so a test
//! can watch a node appear, drain and expire within seconds. `InProcessNode`
//! runs the same node inside the test (`switchboard_node::run` on port 0),
//! for tests that need no process of its own to signal or kill.

use crate::process::{free_port, free_ports, Process};
use crate::{eventually, wait_for_status, RedisServer};
use std::time::Duration;

pub struct TestNode {
    pub id: String,
    pub port: u16,
    pub base: String,
    pub process: Process,
}

/// The flags every test node gets, then `extra`.
fn node_args(listen: &str, redis_url: &str, id: &str, base: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--listen",
        listen,
        "--redis",
        redis_url,
        "--node-id",
        id,
        "--advertise-url",
        base,
        "--heartbeat-secs",
        "0.3",
        "--ttl-secs",
        "1.5",
        "--drain-secs",
        "1",
        "--drain-spread-secs",
        "0.5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A node running inside the test's own runtime; stopped (drained) when
/// dropped or by `stop`.
pub struct InProcessNode {
    pub id: String,
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl InProcessNode {
    pub async fn start(redis: &RedisServer, id: &str, extra: &[&str]) -> Self {
        Self::start_with_redis_url(&redis.url(), id, extra).await
    }

    pub async fn start_with_redis_url(redis_url: &str, id: &str, extra: &[&str]) -> Self {
        use clap::Parser;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a free port");
        let addr = listener.local_addr().expect("local address");
        let base = format!("http://{addr}");
        let mut args = vec!["switchboard-node".to_string()];
        args.extend(node_args(&addr.to_string(), redis_url, id, &base, extra));
        let cfg = switchboard_node::config::Cli::parse_from(args).resolve().expect("node settings");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(switchboard_node::run(listener, cfg, async move {
            let _ = stopped.await;
        }));
        // Started means answering and connected to Redis (a process takes
        // long enough to start that this held by itself; in-process it must
        // be waited for).
        let health = format!("{base}/health");
        eventually(Duration::from_secs(15), &format!("node {id} to answer with Redis up"), || {
            let health = health.clone();
            async move {
                let v: serde_json::Value = reqwest::get(&health).await.ok()?.json().await.ok()?;
                (v["redis"] == "up").then_some(())
            }
        })
        .await;
        InProcessNode { id: id.to_string(), base, stop: Some(stop), task: Some(task) }
    }

    /// Drains the node as SIGTERM would and waits until it has stopped.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

impl Drop for InProcessNode {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl TestNode {
    pub async fn start(redis: &RedisServer, id: &str, extra: &[&str]) -> Self {
        Self::start_with_redis_url(&redis.url(), id, extra).await
    }

    pub async fn start_with_redis_url(redis_url: &str, id: &str, extra: &[&str]) -> Self {
        Self::start_on_port(redis_url, id, free_port(), extra).await
    }

    /// A node listening on `port` (a test that puts something in front of it).
    pub async fn start_on_port(redis_url: &str, id: &str, port: u16, extra: &[&str]) -> Self {
        let base = format!("http://127.0.0.1:{port}");
        let args = node_args(&format!("127.0.0.1:{port}"), redis_url, id, &base, extra);
        let process = Process::spawn("switchboard-node", &format!("node-{id}"), &args);
        wait_for_status(
            &format!("{base}/health"),
            200,
            Duration::from_secs(15),
            &format!("node {id} to answer /health"),
        )
        .await;
        TestNode { id: id.to_string(), port, base, process }
    }
}

/// The flags every test balancer gets (fast discovery and health checks:
/// 0.5 s registry re-read, 0.2 s checks, 2 s missing grace), then `extra`.
fn balancer_args(redis: &RedisServer, port: u16, admin_port: u16, extra: &[&str]) -> Vec<String> {
    let dir = std::env::temp_dir();
    let mut args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin-listen",
        &format!("127.0.0.1:{admin_port}"),
        "--redis",
        &redis.url(),
        "--health-interval-ms",
        "200",
        "--health-timeout-ms",
        "300",
        "--discovery-interval-ms",
        "500",
        "--missing-grace-ms",
        "2000",
        "--grace-period-secs",
        "0",
        "--shutdown-timeout-secs",
        "2",
        "--pid-file",
        &dir.join(format!("sb-balancer-{port}.pid")).to_string_lossy(),
        "--upgrade-sock",
        &dir.join(format!("sb-balancer-{port}.sock")).to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A balancer running inside the test process (`switchboard_balancer::run`
/// on a thread of its own, as Pingora runs its own runtimes); told to stop
/// when dropped.
pub struct InProcessBalancer {
    pub base: String,
    pub admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InProcessBalancer {
    pub async fn start(redis: &RedisServer, extra: &[&str]) -> Self {
        use clap::Parser;
        let [port, admin_port] = free_ports();
        let mut args = vec!["switchboard-balancer".to_string()];
        args.extend(balancer_args(redis, port, admin_port, extra));
        let cfg = switchboard_balancer::config::Cli::parse_from(args).resolve().expect("balancer settings");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let when: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(async move {
            let _ = stopped.await;
        });
        std::thread::spawn(move || switchboard_balancer::run(cfg, false, switchboard_balancer::Shutdown::When(when)));
        let admin = format!("http://127.0.0.1:{admin_port}");
        wait_for_status(&format!("{admin}/health"), 200, Duration::from_secs(15), "balancer admin to answer").await;
        InProcessBalancer { base: format!("http://127.0.0.1:{port}"), admin, stop: Some(stop) }
    }
}

impl InProcessBalancer {
    pub async fn backends(&self) -> serde_json::Value {
        backends_at(&self.admin, None).await
    }

    /// Waits until the nodes accepting new clients are exactly `ids`.
    pub async fn wait_accepting(&self, ids: &[&str]) {
        wait_accepting_at(ids, || self.backends()).await
    }
}

/// `/api/backends` of the admin port at `admin`, parsed.
async fn backends_at(admin: &str, token: Option<&str>) -> serde_json::Value {
    let mut req = reqwest::Client::new().get(format!("{admin}/api/backends"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

/// Waits until the nodes `backends` says accept new clients are exactly `ids`.
async fn wait_accepting_at<F, Fut>(ids: &[&str], backends: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = serde_json::Value>,
{
    let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    want.sort();
    eventually(Duration::from_secs(15), &format!("balancer to route new clients to {want:?}"), || {
        let (want, v) = (want.clone(), backends());
        async move {
            let v = v.await;
            let mut got: Vec<String> = v["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["acceptsNewClients"] == true)
                .filter_map(|n| n["nodeId"].as_str().map(String::from))
                .collect();
            got.sort();
            (got == want).then_some(())
        }
    })
    .await;
}

impl Drop for InProcessBalancer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A `switchboard-balancer` process on free loopback ports (see `balancer_args`).
pub struct TestBalancer {
    pub base: String,
    pub admin: String,
    pub process: Process,
    args: Vec<String>,
}

impl TestBalancer {
    pub async fn start(redis: &RedisServer, extra: &[&str]) -> Self {
        Self::start_limited(redis, extra, None).await
    }

    /// Starts it under `prlimit --nofile=N:N` when `open_files` is given, as
    /// an operator's lower open-file limit would.
    pub async fn start_limited(redis: &RedisServer, extra: &[&str], open_files: Option<u64>) -> Self {
        let [port, admin_port] = free_ports();
        let args = balancer_args(redis, port, admin_port, extra);
        let process = match open_files {
            None => Process::spawn("switchboard-balancer", "balancer", &args),
            Some(n) => {
                let mut wrapped = vec![format!("--nofile={n}:{n}"), "--".to_string()];
                wrapped.push(crate::process::binary("switchboard-balancer").to_string_lossy().into_owned());
                wrapped.extend(args.iter().cloned());
                Process::spawn_program(std::path::Path::new("prlimit"), "balancer-limited", &wrapped)
            }
        };
        let admin = format!("http://127.0.0.1:{admin_port}");
        wait_for_status(&format!("{admin}/health"), 200, Duration::from_secs(15), "balancer admin to answer").await;
        TestBalancer { base: format!("http://127.0.0.1:{port}"), admin, process, args }
    }

    /// Pingora's graceful upgrade: a new process with the same settings and
    /// `--upgrade` takes the listening sockets from this one after SIGQUIT;
    /// the old process finishes (and then drops) its open connections.
    /// Returns the old process, so the test can watch it exit.
    pub async fn upgrade(&mut self) -> Process {
        let mut args = self.args.clone();
        args.push("--upgrade".into());
        let new = Process::spawn("switchboard-balancer", "balancer-upgraded", &args);
        // The new process waits on the upgrade socket; give it a moment to listen there.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.process.signal(libc::SIGQUIT);
        let old = std::mem::replace(&mut self.process, new);
        wait_for_status(&format!("{}/health", self.admin), 200, Duration::from_secs(15), "upgraded balancer").await;
        old
    }

    /// `/api/backends`, parsed (with the `--admin-token` it was started with, if any).
    pub async fn backends(&self) -> serde_json::Value {
        let token = self.args.iter().position(|a| a == "--admin-token").and_then(|i| self.args.get(i + 1));
        backends_at(&self.admin, token.map(String::as_str)).await
    }

    /// Waits until the nodes accepting new clients are exactly `ids`.
    pub async fn wait_accepting(&self, ids: &[&str]) {
        wait_accepting_at(ids, || self.backends()).await
    }
}
