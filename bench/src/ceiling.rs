//! How far the cluster goes on this machine. `fanout_ceiling` starts Redis,
//! three nodes and the balancer and raises broadcast load step by step
//! (more receivers, more senders) until delivery p99 passes a limit or
//! deliveries go missing, recording each process's CPU at every step.
//! `connections` holds idle SignalR WebSockets on one node or through one
//! balancer, as many as the open-file limit allows, opened by several
//! client processes (`hold`) from different 127.0.0.x source addresses so
//! that neither their descriptors nor their ephemeral ports run out, and
//! records resident memory per connection at each checkpoint.

use crate::contenders::{self, Proc, Running};
use crate::rss::rss_kib;
use crate::scenarios;
use crate::signalr;
use anyhow::{anyhow, bail, Context, Result};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;

/// Redis, three nodes and a balancer on loopback, stopped when dropped.
struct Cluster {
    _redis: Vec<Proc>,
    redis_pids: Vec<u32>,
    nodes: Vec<Running>,
    balancer: Running,
    work: PathBuf,
}

impl Cluster {
    /// With `redis_masters`, on a Redis Cluster of that many masters
    /// instead of one Redis.
    async fn start(bin_dir: &Path, nodes: usize, redis_masters: Option<usize>) -> Result<Self> {
        let work = std::env::temp_dir().join(format!("switchboard-ceiling-{}", std::process::id()));
        std::fs::create_dir_all(&work)?;
        let (redis, url) = match redis_masters {
            Some(n) => contenders::redis_cluster(&work, n)?,
            None => {
                let (redis, url) = contenders::redis(&work)?;
                crate::contenders::wait_redis(&url).await?;
                (vec![redis], url)
            }
        };
        let redis_pids = redis.iter().map(Proc::pid).collect();
        let mut running = Vec::new();
        for i in 1..=nodes {
            let node = contenders::node(bin_dir, &work, &url, &format!("node-{i}"))?;
            contenders::wait_ok(&format!("{}/health", node.url), Duration::from_secs(20)).await?;
            running.push(node);
        }
        let balancer = contenders::switchboard(bin_dir, &work, &url)?;
        contenders::wait_ok(&format!("{}/health", balancer.url), Duration::from_secs(30)).await?;
        // One health-check round, so every node is in rotation.
        tokio::time::sleep(Duration::from_millis(contenders::CHECK_INTERVAL_MS + 300)).await;
        Ok(Cluster { _redis: redis, redis_pids, nodes: running, balancer, work })
    }

    /// Every process whose CPU counts, with this load generator.
    fn processes(&self) -> Vec<(String, u32)> {
        let mut all: Vec<(String, u32)> =
            self.nodes.iter().enumerate().map(|(i, n)| (format!("node-{}", i + 1), n.process.pid())).collect();
        all.push(("balancer".into(), self.balancer.process.pid()));
        if let [one] = self.redis_pids[..] {
            all.push(("redis".into(), one));
        } else {
            all.extend(self.redis_pids.iter().enumerate().map(|(i, p)| (format!("redis-{}", i + 1), *p)));
        }
        all.push(("load generator".into(), std::process::id()));
        all
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

pub struct FanoutCeiling {
    pub bin_dir: PathBuf,
    pub step: Duration,
    pub max_steps: usize,
    pub p99_limit: Duration,
    /// Receivers and senders connect through the balancer (else straight to the nodes).
    pub via_balancer: bool,
    pub receivers_per_step: usize,
    pub senders_per_step: usize,
    pub rate_per_sender: f64,
    /// Broadcasts, or messages to many groups (see `scenarios::Audience`).
    pub audience: scenarios::Audience,
    /// On a Redis Cluster of this many masters instead of one Redis.
    pub redis_cluster: Option<usize>,
}

/// Step `k` has `k × receivers_per_step` receivers and `k ×
/// senders_per_step` senders, so the deliveries asked for grow with k².
/// Stops after the first step whose p99 passes the limit or that missed more
/// than 1 % of its deliveries.
pub async fn fanout_ceiling(o: &FanoutCeiling) -> Result<Value> {
    let cluster = Cluster::start(&o.bin_dir, 3, o.redis_cluster).await?;
    let urls: Vec<String> = if o.via_balancer {
        vec![cluster.balancer.url.clone()]
    } else {
        cluster.nodes.iter().map(|n| n.url.clone()).collect()
    };
    let watch = cluster.processes();
    let limit_us = o.p99_limit.as_micros() as f64;
    let mut steps = Vec::new();
    let mut within: Option<Value> = None;
    let mut past: Option<Value> = None;
    for k in 1..=o.max_steps {
        let (receivers, senders) = (k * o.receivers_per_step, k * o.senders_per_step.max(1));
        let reach = match o.audience {
            scenarios::Audience::All => receivers as f64,
            scenarios::Audience::Groups(n) => receivers as f64 / n.max(1) as f64,
        };
        eprintln!(
            "step {k}: {receivers} receivers, {senders} senders × {}/s to {} = {} deliveries/s asked",
            o.rate_per_sender,
            o.audience.label(),
            (reach * senders as f64 * o.rate_per_sender).round()
        );
        let r = scenarios::fanout(&urls, receivers, senders, o.rate_per_sender, o.step, o.audience, &watch).await?;
        let p99 = r["latency"]["p99_us"].as_f64().unwrap_or(f64::INFINITY);
        let expected = r["expected_deliveries"].as_f64().unwrap_or(0.0);
        let delivered = r["delivered"].as_f64().unwrap_or(0.0);
        eprintln!(
            "  delivered {delivered}/{expected} ({}/s), p99 {:.1} ms, cpu % {}",
            r["deliveries_per_sec"],
            p99 / 1000.0,
            r["cpu_percent_of_one_core"]
        );
        let ok = p99 <= limit_us && delivered >= expected * 0.99;
        steps.push(r.clone());
        if ok {
            within = Some(r);
        } else {
            past = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(json!({
        "via": if o.via_balancer { "balancer" } else { "nodes" },
        "p99_limit_ms": o.p99_limit.as_millis() as u64,
        "rate_per_sender": o.rate_per_sender,
        "senders_per_step": o.senders_per_step,
        "audience": o.audience.label(),
        "redis": match o.redis_cluster { Some(n) => format!("cluster of {n} masters"), None => "one server".to_string() },
        "steps": steps,
        "last_within_limit": within,
        "first_past_limit": past,
    }))
}

pub struct Connections {
    pub bin_dir: PathBuf,
    /// Hold them through the balancer (else on one node).
    pub via_balancer: bool,
    pub checkpoints: Vec<usize>,
    pub max: usize,
    pub clients: usize,
    pub settle: Duration,
    /// The longest any checkpoint may take to open its connections.
    pub step_timeout: Duration,
}

/// One `hold` child process and the pipe to it.
struct Holder {
    child: Child,
    to: ChildStdin,
    from: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Holder {
    fn spawn(url: &str, source: IpAddr) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["hold", "--url", url, "--source", &source.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start a hold client")?;
        let to = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let from = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?).lines();
        Ok(Holder { child, to, from })
    }

    async fn tell(&mut self, line: &str) -> Result<()> {
        self.to.write_all(format!("{line}\n").as_bytes()).await?;
        self.to.flush().await?;
        Ok(())
    }

    /// The answer to `hold N`: how many it holds.
    async fn held(&mut self) -> Result<usize> {
        let line = self.from.next_line().await?.ok_or_else(|| anyhow!("a hold client exited"))?;
        line.strip_prefix("held ")
            .and_then(|n| n.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("unexpected answer from a hold client: {line}"))
    }
}

/// Opens connections up to each checkpoint and then to `max`, stopping early
/// when the clients cannot open more (the target refuses or runs out of
/// descriptors); reports the target's resident memory per connection at
/// each point.
pub async fn connections(o: &Connections) -> Result<Value> {
    let cluster = Cluster::start(&o.bin_dir, if o.via_balancer { 2 } else { 1 }, None).await?;
    let (url, pid) = if o.via_balancer {
        (cluster.balancer.url.clone(), cluster.balancer.process.pid())
    } else {
        (cluster.nodes[0].url.clone(), cluster.nodes[0].process.pid())
    };
    let base_kib = rss_kib(pid).ok_or_else(|| anyhow!("no process {pid}"))?;
    let base_slab = slab_kib();
    let clients = o.clients.clamp(1, 200);
    let mut holders = Vec::new();
    for i in 0..clients {
        holders.push(Holder::spawn(&url, IpAddr::from([127, 0, 0, 2 + i as u8]))?);
    }
    let mut targets: Vec<usize> = o.checkpoints.iter().copied().filter(|&c| c < o.max).collect();
    targets.push(o.max);
    let mut points = Vec::new();
    let started = Instant::now();
    let mut reached_max = true;
    for target in targets {
        let share = target.div_ceil(clients);
        for h in &mut holders {
            h.tell(&format!("hold {share}")).await?;
        }
        let mut open = 0;
        for h in &mut holders {
            open +=
                tokio::time::timeout(o.step_timeout, h.held()).await.context("opening connections took too long")??;
        }
        tokio::time::sleep(o.settle).await;
        let kib = rss_kib(pid).ok_or_else(|| anyhow!("the measured process {pid} exited"))?;
        let per_conn = (kib as f64 - base_kib as f64) * 1024.0 / open.max(1) as f64;
        // The kernel's slab memory, machine-wide: both ends of every
        // connection live on this machine, so this is an upper bound on
        // what one end costs the kernel.
        let slab =
            slab_kib().zip(base_slab).map(|(now, base)| (now as f64 - base as f64) * 1024.0 / open.max(1) as f64);
        let slab_text = slab.map_or("?".to_string(), |b| format!("{b:.0}"));
        eprintln!(
            "  {open} open (asked {target}): RSS {kib} KiB, {per_conn:.0} B per connection; \
             kernel slab {slab_text} B per connection (machine-wide)"
        );
        points.push(json!({ "asked": target, "open": open, "rss_kib": kib, "bytes_per_connection": per_conn.round(),
            "kernel_slab_bytes_per_connection": slab.map(f64::round), "elapsed_secs": started.elapsed().as_secs() }));
        if open < target * 99 / 100 {
            reached_max = false;
            break;
        }
    }
    for h in &mut holders {
        let _ = h.tell("quit").await;
    }
    for h in &mut holders {
        let _ = tokio::time::timeout(Duration::from_secs(30), h.child.wait()).await;
    }
    tokio::time::sleep(o.settle).await;
    let after = rss_kib(pid).unwrap_or(0);
    Ok(json!({
        "via": if o.via_balancer { "balancer" } else { "node" },
        "clients": clients,
        "rss_base_kib": base_kib,
        "points": points,
        "reached_max": reached_max,
        "rss_after_close_kib": after,
        "open_files_limit": contenders::fd_limit(),
    }))
}

/// `Slab:` of `/proc/meminfo`, in KiB: the kernel's object caches, where
/// sockets, their files and epoll entries live.
fn slab_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find_map(|l| l.strip_prefix("Slab:"))?.split_whitespace().next()?.parse().ok()
}

/// The child side of `connections`: reads `hold N` and `quit` lines on
/// stdin, opens (or keeps) N idle connections from `source`, answers
/// `held <open> failed <n>`. Gives up on a step after 200 failures in a row.
pub async fn hold(url: &str, source: IpAddr) -> Result<()> {
    crate::contenders::raise_fd_limit();
    let http = reqwest::Client::builder().local_address(source).build()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut held = Vec::new();
    let mut failed = 0u64;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match (words.next(), words.next().and_then(|n| n.parse::<usize>().ok())) {
            (Some("hold"), Some(n)) => {
                let mut in_a_row = 0;
                while held.len() < n && in_a_row < 200 {
                    let want = (n - held.len()).min(256);
                    let mut opened = stream::iter(0..want)
                        .map(|_| {
                            let http = http.clone();
                            async move { signalr::connect_from(&http, url, false, false, Some(source)).await }
                        })
                        .buffer_unordered(32);
                    while let Some(sock) = opened.next().await {
                        match sock {
                            Ok(sock) => {
                                in_a_row = 0;
                                held.push(tokio::spawn(scenarios::keep_alive(sock, stop_rx.clone())));
                            }
                            Err(e) => {
                                failed += 1;
                                in_a_row += 1;
                                if failed <= 3 {
                                    eprintln!("hold {source}: connect failed: {e:#}");
                                }
                            }
                        }
                    }
                }
                // Connections the target closed meanwhile do not count.
                held.retain(|t| !t.is_finished());
                out.write_all(format!("held {} failed {failed}\n", held.len()).as_bytes()).await?;
                out.flush().await?;
            }
            (Some("quit"), _) => break,
            _ => bail!("hold: unknown command {line:?}"),
        }
    }
    let _ = stop_tx.send(true);
    for t in held {
        let _ = t.await;
    }
    Ok(())
}
