//! The programs a benchmark run starts on loopback: a `redis-server`, the
//! Switchboard nodes, and each contender in front of them — Switchboard's
//! balancer (discovering nodes from Redis), Traefik (file provider, sticky
//! cookie, health check on `/health`, as in the seed article), nginx
//! (`ip_hash`, WebSocket upgrade headers, no buffering, as in Microsoft's
//! SignalR hosting article) and HAProxy (inserted cookie, `httpchk /health`).
//! Every process is killed when its handle drops; configs and logs go to the
//! run's work directory.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Health-check settings shared by every proxy that checks, so failover is
/// compared on equal terms (the seed's Traefik used 30 s).
pub const CHECK_INTERVAL_MS: u64 = 1000;
pub const CHECK_TIMEOUT_MS: u64 = 500;

/// A child process. `kill` is SIGKILL (a node dying); dropping it stops it
/// properly (SIGTERM, then SIGKILL after 3 s), because SIGKILL of nginx's
/// master would leave its workers running.
pub struct Proc {
    child: Child,
}

impl Proc {
    pub fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        Ok(Proc { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a node drains, a proxy shuts down), without waiting.
    pub fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Whether the process has exited (reaping it if so).
    pub fn try_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

/// This process's open-files limit (the proxies inherit it).
pub fn fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit on a local struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Two different free ports. Each listener is held until both are chosen:
/// two separate `free_port` calls can return the same port.
pub fn two_free_ports() -> Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// Polls `GET url` until it answers 200, for at most `limit`.
pub async fn wait_ok(url: &str, limit: Duration) -> Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} did not answer 200 within {limit:?}")
}

/// First line a program prints for `args` (on stdout or stderr).
pub fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("?").to_string()
        }
        Err(e) => format!("unavailable ({e})"),
    }
}

pub fn redis(dir: &Path) -> Result<(Proc, String)> {
    let port = free_port()?;
    let args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let p = Proc::spawn(Path::new("redis-server"), &args, &dir.join("redis.log"))?;
    Ok((p, format!("redis://127.0.0.1:{port}")))
}

/// A Redis Cluster of `masters` masters and no replicas (the bench measures
/// capacity; replicas only add replication work on the same cores), each
/// on a free port whose bus port (+10000) is free too, joined with
/// `redis-cli --cluster create`. Its processes and `redis+cluster://` URL.
pub fn redis_cluster(dir: &Path, masters: usize) -> Result<(Vec<Proc>, String)> {
    let mut ports = Vec::new();
    let mut held = Vec::new();
    for _ in 0..1000 {
        if ports.len() == masters {
            break;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let Some(bus) = port.checked_add(10_000) else { continue };
        let Ok(b) = std::net::TcpListener::bind(("127.0.0.1", bus)) else { continue };
        ports.push(port);
        held.push((l, b));
    }
    anyhow::ensure!(ports.len() == masters, "free ports for a Redis Cluster");
    drop(held);
    let mut procs = Vec::new();
    for port in &ports {
        let conf = dir.join(format!("nodes-{port}.conf"));
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &conf.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        procs.push(Proc::spawn(Path::new("redis-server"), &args, &dir.join(format!("redis-{port}.log")))?);
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for _ in 0..200 {
        if addrs.iter().all(|a| std::net::TcpStream::connect(a).is_ok()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()?;
    anyhow::ensure!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
    // Every member agrees the cluster is ok.
    for _ in 0..400 {
        let ok = addrs.iter().all(|a| {
            let (host, port) = a.split_once(':').unwrap_or((a, "6379"));
            std::process::Command::new("redis-cli")
                .args(["-h", host, "-p", port, "cluster", "info"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        });
        if ok {
            return Ok((procs, format!("redis+cluster://{}", addrs.join(","))));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("the Redis Cluster did not become ok")
}

/// A chat node on a free port.
pub fn node(bin_dir: &Path, dir: &Path, redis: &str, id: &str) -> Result<Running> {
    node_with(bin_dir, dir, redis, id, &[])
}

/// A chat node on a free port, with `extra` arguments.
pub fn node_with(bin_dir: &Path, dir: &Path, redis: &str, id: &str, extra: &[&str]) -> Result<Running> {
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let args: Vec<String> =
        ["--listen", &format!("127.0.0.1:{port}"), "--redis", redis, "--node-id", id, "--advertise-url", &base]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
    let process = Proc::spawn(&bin_dir.join("switchboard-node"), &args, &dir.join(format!("node-{id}.log")))?;
    Ok(Running { url: base, process })
}

/// A started node or proxy: where clients go, and the process whose memory
/// counts.
pub struct Running {
    pub url: String,
    pub process: Proc,
}

/// Switchboard's balancer for the suite and the ceiling, which measure what
/// the proxy can do: its per-node admission, which paces new connections at
/// 1,000 a second per node by design, is off (the storm, which is what it is
/// for, runs with it on), or the setup workload would measure the setting.
pub fn switchboard(bin_dir: &Path, dir: &Path, redis: &str) -> Result<Running> {
    let (port, admin) = two_free_ports()?;
    let checks = (CHECK_INTERVAL_MS, CHECK_TIMEOUT_MS);
    let process = switchboard_on(bin_dir, dir, redis, port, admin, checks, &["--node-admission-rate", "0"])?;
    Ok(Running { url: format!("http://127.0.0.1:{port}"), process })
}

/// Switchboard's balancer on given ports (the chaos run restarts it on the
/// same ones) with the given health-check interval and timeout (ms) and
/// `extra` arguments.
pub fn switchboard_on(
    bin_dir: &Path,
    dir: &Path,
    redis: &str,
    port: u16,
    admin: u16,
    (check_interval_ms, check_timeout_ms): (u64, u64),
    extra: &[&str],
) -> Result<Proc> {
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin-listen",
        &format!("127.0.0.1:{admin}"),
        "--redis",
        redis,
        "--health-interval-ms",
        &check_interval_ms.to_string(),
        "--health-timeout-ms",
        &check_timeout_ms.to_string(),
        // The benchmark stops contenders often; nothing measures shutdown.
        "--grace-period-secs",
        "0",
        "--shutdown-timeout-secs",
        "1",
        "--pid-file",
        &dir.join(format!("switchboard-{port}.pid")).to_string_lossy(),
        "--upgrade-sock",
        &dir.join(format!("switchboard-{port}.sock")).to_string_lossy(),
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    let log = dir.join(format!("switchboard-{port}-{}.log", std::process::id()));
    Proc::spawn(&bin_dir.join("switchboard-balancer"), &args, &log)
}

/// Traefik's dynamic configuration: one service over `nodes`, the seed's
/// sticky cookie and health check. Written atomically (rename) because
/// Traefik watches the file.
pub fn traefik_dynamic(dir: &Path, nodes: &[String]) -> Result<()> {
    let servers: String = nodes.iter().map(|u| format!("          - url: \"{u}\"\n")).collect();
    let yaml = format!(
        "http:\n  routers:\n    signalr:\n      rule: \"PathPrefix(`/`)\"\n      entryPoints: [web]\n      service: signalr\n  \
         services:\n    signalr:\n      loadBalancer:\n        sticky:\n          cookie:\n            name: signalr-server\n        \
         healthCheck:\n          path: /health\n          interval: {CHECK_INTERVAL_MS}ms\n          timeout: {CHECK_TIMEOUT_MS}ms\n        \
         servers:\n{servers}"
    );
    let tmp = dir.join("dynamic.yml.tmp");
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, dir.join("dynamic").join("dynamic.yml"))?;
    Ok(())
}

pub fn traefik(program: &Path, dir: &Path, nodes: &[String]) -> Result<Running> {
    let port = free_port()?;
    std::fs::create_dir_all(dir.join("dynamic"))?;
    traefik_dynamic(dir, nodes)?;
    let args: Vec<String> = vec![
        format!("--entryPoints.web.address=127.0.0.1:{port}"),
        format!("--providers.file.directory={}", dir.join("dynamic").display()),
        "--providers.file.watch=true".into(),
        "--log.level=ERROR".into(),
        // Long polls and idle sockets must not be cut by Traefik's 60 s default.
        "--entryPoints.web.transport.respondingTimeouts.readTimeout=0".into(),
        "--global.checkNewVersion=false".into(),
        "--entryPoints.web.transport.lifeCycle.graceTimeOut=1s".into(),
        "--global.sendAnonymousUsage=false".into(),
    ];
    let process = Proc::spawn(program, &args, &dir.join("traefik.log"))?;
    Ok(Running { url: format!("http://127.0.0.1:{port}"), process })
}

pub fn nginx(dir: &Path, nodes: &[String]) -> Result<Running> {
    let port = free_port()?;
    let servers: String = nodes.iter().map(|u| format!("    server {};\n", u.trim_start_matches("http://"))).collect();
    let d = dir.display();
    let files = fd_limit();
    let conf = format!(
        "worker_processes 2;\nuser root;\ndaemon off;\npid {d}/nginx-{port}.pid;\nerror_log {d}/nginx-{port}-error.log error;\n\
         worker_rlimit_nofile {files};\nevents {{ worker_connections {files}; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
         \x20 map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
         \x20 upstream signalr {{\n    ip_hash;\n{servers}  }}\n\
         \x20 server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://signalr;\n\
         \x20     proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n\
         \x20     proxy_set_header Connection $connection_upgrade;\n      proxy_set_header Host $host;\n\
         \x20     proxy_buffering off;\n      proxy_cache off;\n      proxy_read_timeout 120s;\n    }}\n  }}\n}}\n"
    );
    let path = dir.join(format!("nginx-{port}.conf"));
    std::fs::write(&path, conf)?;
    let args = vec!["-p".to_string(), dir.display().to_string(), "-c".to_string(), path.display().to_string()];
    let process = Proc::spawn(&which("nginx")?, &args, &dir.join(format!("nginx-{port}.log")))?;
    Ok(Running { url: format!("http://127.0.0.1:{port}"), process })
}

pub fn haproxy(dir: &Path, nodes: &[String]) -> Result<Running> {
    let port = free_port()?;
    let servers: String = nodes
        .iter()
        .enumerate()
        .map(|(i, u)| {
            format!(
                "  server n{i} {} check inter {CHECK_INTERVAL_MS}ms fall 2 rise 1 cookie n{i}\n",
                u.trim_start_matches("http://")
            )
        })
        .collect();
    let conf = format!(
        "global\n  maxconn {}\n  nbthread 2\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n  \
         timeout server 120s\n  timeout tunnel 1h\n  timeout check {CHECK_TIMEOUT_MS}ms\n\n\
         frontend web\n  bind 127.0.0.1:{port}\n  default_backend signalr\n\n\
         backend signalr\n  balance roundrobin\n  cookie SERVERID insert indirect nocache\n  \
         option httpchk GET /health\n  http-check expect status 200\n{servers}",
        // Two sockets per proxied connection, and some to spare.
        fd_limit() / 2 - 100
    );
    let path = dir.join(format!("haproxy-{port}.cfg"));
    std::fs::write(&path, conf)?;
    let args = vec!["-db".to_string(), "-f".to_string(), path.display().to_string()];
    let process = Proc::spawn(&which("haproxy")?, &args, &dir.join(format!("haproxy-{port}.log")))?;
    Ok(Running { url: format!("http://127.0.0.1:{port}"), process })
}

/// A program on PATH or in /usr/sbin (where Debian puts nginx and haproxy).
pub fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not installed (scripts/bench.sh installs it)"))
}

/// Lets this process (and the proxies it starts) hold as many sockets as the
/// hard limit allows; idle tests open thousands.
pub(crate) fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Waits until the `redis-server` at `url` accepts connections.
pub(crate) async fn wait_redis(url: &str) -> Result<()> {
    let addr = url.trim_start_matches("redis://").to_string();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("redis-server did not start on {addr}")
}
