//! `switchboard-bench storm`: the moment that defines running at scale. Redis,
//! three nodes and two balancers run on loopback; N idle WebSocket clients per
//! node connect through the two balancers (split between them, as behind two
//! load balancers), from several client processes on 127.0.0.x source
//! addresses (`storm_clients`: each behaves like Microsoft's official client
//! with automatic reconnect, and resumes). A sender straight on node n2 sends
//! numbered chat messages throughout, one in fifty to everyone and the rest
//! to the clients' groups in turn; four probe clients on n2 through the
//! balancers Echo every 20 ms. Then, in turn: `kill -9` of n3; n3 comes back;
//! SIGTERM (drain) of n1, whose clients mostly land on the n3 that just came
//! back. For each event it reports how long until 50 %, 99 % and 100 % of the
//! clients that lost their connection had one again, how many gave up, the
//! probes' Echo latency during the storm against before it, and the CPU and
//! memory of every process each second; at the end, what every client lost
//! and received twice. It exits non-zero when a client gave up, lost or
//! repeated a message, or was not back when its event ended.

use crate::contenders::{self, free_port, two_free_ports, wait_ok, Proc, CHECK_INTERVAL_MS, CHECK_TIMEOUT_MS};
use crate::rss;
use crate::signalr;
use crate::storm_clients::{target, text_of, unix_ms};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;

const NODES: [&str; 3] = ["n1", "n2", "n3"];
const KILLED: &str = "n3";
const DRAINED: &str = "n1";
const UNDISTURBED: &str = "n2";
/// Clients per client process: each holds one descriptor per client, under
/// the 20,000 open files every process here is held to.
const PER_WORKER: usize = 4000;
const PROBES: usize = 4;
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Longest an event may take to be absorbed: the official client's retries
/// span 42 s (0 + 2 + 10 + 30), plus the drain's own window.
const EVENT_LIMIT: Duration = Duration::from_secs(60);

pub struct Options {
    pub quick: bool,
    pub bin_dir: PathBuf,
    pub per_node: usize,
    pub groups: usize,
    /// Messages per second from the sender.
    pub rate: f64,
    /// The nodes' drain_spread_secs (their default when `None`).
    pub drain_spread_secs: Option<f64>,
    pub command_line: String,
}

/// A client process and its pipes.
struct Worker {
    child: Child,
    to: ChildStdin,
    from: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Worker {
    fn spawn(balancers: &[String], count: usize, first: usize, source: IpAddr, groups: usize) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["storm-clients", "--balancers", &balancers.join(","), "--count", &count.to_string()])
            .args(["--first", &first.to_string(), "--source", &source.to_string(), "--groups", &groups.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start a storm client process")?;
        let to = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let from = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?).lines();
        Ok(Worker { child, to, from })
    }

    async fn tell(&mut self, line: &str) -> Result<()> {
        self.to.write_all(format!("{line}\n").as_bytes()).await?;
        self.to.flush().await?;
        Ok(())
    }

    async fn line(&mut self) -> Result<String> {
        let line = tokio::time::timeout(Duration::from_secs(180), self.from.next_line())
            .await
            .map_err(|_| anyhow!("a storm client process stopped answering"))??;
        line.ok_or_else(|| anyhow!("a storm client process exited"))
    }

    /// Two numbers after `word` in the next line.
    async fn pair(&mut self, word: &str) -> Result<(usize, usize)> {
        let line = self.line().await?;
        let mut w = line.split_whitespace();
        if w.next() != Some(word) {
            bail!("expected {word}, got {line:?}");
        }
        let mut n = || w.next().and_then(|n| n.parse().ok()).ok_or_else(|| anyhow!("bad line {line:?}"));
        Ok((n()?, n()?))
    }
}

/// Up and gave up over every client process.
async fn status(workers: &mut [Worker]) -> Result<(usize, usize)> {
    let (mut up, mut gave_up) = (0, 0);
    for w in workers.iter_mut() {
        w.tell("status").await?;
    }
    for w in workers.iter_mut() {
        let (u, g) = w.pair("status").await?;
        up += u;
        gave_up += g;
    }
    Ok((up, gave_up))
}

/// Waits until every client is up again or has given up, for at most `limit`.
async fn until_settled(workers: &mut [Worker], total: usize, limit: Duration) -> Result<bool> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let (up, gave_up) = status(workers).await?;
        if up + gave_up >= total {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(false)
}

fn spawn_node(o: &Options, dir: &Path, redis: &str, id: &str, port: u16) -> Result<Proc> {
    let base = format!("http://127.0.0.1:{port}");
    let mut args: Vec<String> =
        ["--listen", &format!("127.0.0.1:{port}"), "--redis", redis, "--node-id", id, "--advertise-url", &base]
            .iter()
            .map(|s| s.to_string())
            .collect();
    if o.quick {
        // The defaults (10 s, then 5 s) would make the short run mostly waiting.
        args.extend(["--drain-secs", "2", "--drain-spread-secs", "2"].map(String::from));
    }
    if let Some(spread) = o.drain_spread_secs {
        args.extend(["--drain-spread-secs".to_string(), spread.to_string()]);
    }
    let log = dir.join(format!("node-{id}-{}.log", unix_ms()));
    Proc::spawn(&o.bin_dir.join("switchboard-node"), &args, &log)
}

/// Samples every process's CPU (percent of one core) and resident memory,
/// and each node's connection count, once a second.
/// Processes by name (a name may stand for several, or for a restarted one).
type Watched = Arc<Mutex<Vec<(String, Vec<u32>)>>>;

struct Sampler {
    pids: Watched,
    samples: Arc<Mutex<Vec<Value>>>,
}

impl Sampler {
    fn set(&self, name: &str, pids: Vec<u32>) {
        if let Ok(mut p) = self.pids.lock() {
            match p.iter_mut().find(|(n, _)| n == name) {
                Some(entry) => entry.1 = pids,
                None => p.push((name.to_string(), pids)),
            }
        }
    }

    fn start(node_ports: HashMap<&'static str, u16>, t0: u64, stop: watch::Receiver<bool>) -> Self {
        let pids: Watched = Arc::default();
        let samples: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (p, s) = (pids.clone(), samples.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_millis(800)).build().unwrap_or_default();
            let hz = rss::ticks_per_sec();
            let mut before: HashMap<u32, (u64, Instant)> = HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !*stop.borrow() {
                tick.tick().await;
                let watched = p.lock().map(|p| p.clone()).unwrap_or_default();
                let mut cpu = serde_json::Map::new();
                let mut mem = serde_json::Map::new();
                for (name, pids) in watched {
                    let (mut pct, mut kib) = (0.0, 0u64);
                    for pid in pids {
                        let (Some(ticks), now) = (rss::cpu_ticks(pid), Instant::now()) else { continue };
                        if let Some((t, at)) = before.insert(pid, (ticks, now)) {
                            pct += (ticks.saturating_sub(t)) as f64 / hz / now.duration_since(at).as_secs_f64() * 100.0;
                        }
                        kib += rss::rss_kib(pid).unwrap_or(0);
                    }
                    cpu.insert(name.clone(), json!((pct * 10.0).round() / 10.0));
                    mem.insert(name, json!(kib / 1024));
                }
                let mut conns = serde_json::Map::new();
                for (id, port) in &node_ports {
                    let health = http.get(format!("http://127.0.0.1:{port}/health")).send().await;
                    let n = match health {
                        Ok(r) => r.json::<Value>().await.ok().and_then(|v| v["connections"].as_u64()),
                        Err(_) => None,
                    };
                    conns.insert(id.to_string(), json!(n));
                }
                let t = (unix_ms().saturating_sub(t0)) as f64 / 1000.0;
                if let Ok(mut s) = s.lock() {
                    s.push(
                        json!({"t": (t * 10.0).round() / 10.0, "cpu_pct": cpu, "rss_mib": mem, "connections": conns}),
                    );
                }
            }
        });
        Sampler { pids, samples }
    }
}

/// A probe: a client on n2 through a balancer that Echoes every 20 ms and
/// records (unix ms, round trip in µs); it reconnects if it must.
async fn probe(base: String, rtts: Arc<Mutex<Vec<(u64, u64)>>>, mut stop: watch::Receiver<bool>) {
    let http = reqwest::Client::new();
    'connect: while !*stop.borrow() {
        let mut sock = None;
        for _ in 0..100 {
            match signalr::connect(&http, &base).await {
                Ok(s) if s.node.as_deref() == Some(UNDISTURBED) => {
                    sock = Some(s);
                    break;
                }
                Ok(mut other) => {
                    let _ = other.ws.close(None).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let Some(mut sock) = sock else { return };
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            let at = Instant::now();
            let sent = unix_ms();
            match tokio::time::timeout(Duration::from_secs(10), sock.invoke("Echo", json!(["x".repeat(64)]))).await {
                Ok(Ok(_)) => {
                    if let Ok(mut r) = rtts.lock() {
                        r.push((sent, at.elapsed().as_micros() as u64));
                    }
                }
                _ => continue 'connect,
            }
        }
    }
}

/// Sends message after message straight to `base` at `rate`, each awaited;
/// returns the last sequence number sent. A failed send fails the run: the
/// sender's node is never disturbed.
async fn sender(base: String, rate: f64, groups: usize, mut stop: watch::Receiver<bool>) -> Result<Option<u64>> {
    let http = reqwest::Client::new();
    let mut sock = signalr::connect(&http, &base).await.context("the sender connects to n2")?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    for seq in 0u64.. {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        let (method, args) = match target(seq, groups) {
            None => ("SendMessage", json!(["sender", text_of(seq)])),
            Some(g) => ("SendMessageToGroup", json!([format!("g{g}"), "sender", text_of(seq)])),
        };
        tokio::time::timeout(Duration::from_secs(10), sock.invoke(method, args))
            .await
            .map_err(|_| anyhow!("message {seq}: no completion within 10 s"))?
            .with_context(|| format!("message {seq}"))?;
        last = Some(seq);
    }
    Ok(last)
}

/// The value at quantile `q` of sorted values (nearest rank).
fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn latency(rtts: &[(u64, u64)], from: u64, to: u64) -> Value {
    let mut v: Vec<u64> = rtts.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, r)| *r).collect();
    v.sort_unstable();
    let ms = |q| quantile(&v, q).map(|us| (us as f64 / 10.0).round() / 100.0);
    json!({"count": v.len(), "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999)})
}

/// What a run recorded, for the figures of each event.
struct Recorded {
    clients: Vec<Value>,
    /// The probes' (unix ms, round trip µs).
    rtts: Vec<(u64, u64)>,
    /// The probes' latency before the first event.
    baseline: Value,
    samples: Vec<Value>,
    /// Each process's mean CPU (% of a core) before the first event.
    baseline_cpu: BTreeMap<String, f64>,
    /// Unix ms of the run's start.
    t0: u64,
}

/// One event's figures from every client's timeline: the clients that lost
/// their connection in `[at, end)`, how soon they were back (from the event
/// and from their own disconnect), where they went, and who gave up.
fn absorb(name: &str, at: u64, end: u64, run: &Recorded) -> Value {
    let Recorded { clients, rtts, baseline, samples, baseline_cpu, t0 } = run;
    let t0 = *t0;
    let (mut since_event, mut reconnect, mut not_back, mut gave_up) = (Vec::new(), Vec::new(), 0usize, 0usize);
    let mut moved_to: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    let mut attempts_failed: Vec<u64> = Vec::new();
    let (mut first_down, mut last_up) = (u64::MAX, 0u64);
    for c in clients {
        let downs: Vec<u64> = c["downs"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
        let Some(down) = downs.iter().copied().find(|d| *d >= at && *d < end) else { continue };
        first_down = first_down.min(down);
        let mut mine = 0;
        for f in c["failures"].as_array().into_iter().flatten() {
            if f[0].as_u64().is_some_and(|t| t >= down && t < end) {
                *failed.entry(f[1].as_str().unwrap_or("?").to_string()).or_default() += 1;
                mine += 1;
            }
        }
        attempts_failed.push(mine);
        let ups = c["ups"].as_array().into_iter().flatten();
        let back = ups.filter_map(|u| Some((u[0].as_u64()?, u[1].as_str()?.to_string()))).find(|(t, _)| *t >= down);
        match back {
            Some((t, node)) => {
                since_event.push(t - at);
                reconnect.push(t - down);
                last_up = last_up.max(t);
                *moved_to.entry(node).or_default() += 1;
            }
            None if c["gave_up"] == true => gave_up += 1,
            None => not_back += 1,
        }
    }
    since_event.sort_unstable();
    reconnect.sort_unstable();
    let affected = since_event.len() + gave_up + not_back;
    let all_back = gave_up == 0 && not_back == 0;
    // The storm: from the first disconnect to the last reconnect (at least 1 s).
    let (from, to) = if affected == 0 { (at, at + 1000) } else { (first_down, last_up.max(first_down + 1000)) };
    let during = latency(rtts, from, to);
    let mut peak_cpu = serde_json::Map::new();
    let mut mean_cpu: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    // CPU seconds above each process's steady level, over the storm.
    let mut extra_cpu: BTreeMap<String, f64> = BTreeMap::new();
    for s in samples {
        let t = t0 + (s["t"].as_f64().unwrap_or(0.0) * 1000.0) as u64;
        if t < from || t > to + 1000 {
            continue;
        }
        for (proc_name, pct) in s["cpu_pct"].as_object().into_iter().flatten() {
            let pct = pct.as_f64().unwrap_or(0.0);
            let peak = peak_cpu.entry(proc_name.clone()).or_insert(json!(0.0));
            if pct > peak.as_f64().unwrap_or(0.0) {
                *peak = json!(pct);
            }
            let m = mean_cpu.entry(proc_name.clone()).or_default();
            m.0 += pct;
            m.1 += 1;
            let base = baseline_cpu.get(proc_name).copied().unwrap_or(0.0);
            *extra_cpu.entry(proc_name.clone()).or_default() += (pct - base) / 100.0;
        }
    }
    let mean_cpu: serde_json::Map<String, Value> =
        mean_cpu.into_iter().map(|(k, (sum, n))| (k, json!((sum / n.max(1) as f64 * 10.0).round() / 10.0))).collect();
    let mut per_reconnect: serde_json::Map<String, Value> = extra_cpu
        .iter()
        .map(|(k, secs)| (k.clone(), json!((secs.max(0.0) / affected.max(1) as f64 * 1e6).round())))
        .collect();
    // A process that died (the killed node) did no negative work.
    let total: f64 = extra_cpu.values().map(|s| s.max(0.0)).sum();
    per_reconnect.insert("total".into(), json!((total / affected.max(1) as f64 * 1e6).round()));
    json!({
        "event": name,
        "cpu_us_per_reconnect": if affected > 0 { Value::Object(per_reconnect) } else { Value::Null },
        "at_ms": at - t0,
        "affected": affected,
        "back_ms": {"p50": quantile(&since_event, 0.5), "p99": quantile(&since_event, 0.99),
                    "p100": if all_back { since_event.last().copied() } else { None }},
        "reconnect_ms": {"p50": quantile(&reconnect, 0.5), "p99": quantile(&reconnect, 0.99), "p100": reconnect.last()},
        "gave_up": gave_up,
        "not_back": not_back,
        "moved_to": moved_to,
        "failed_attempts": failed,
        "clients_with_a_failed_attempt": attempts_failed.iter().filter(|n| **n > 0).count(),
        "storm_ms": [from.saturating_sub(t0), to.saturating_sub(t0)],
        "echo_before": baseline,
        "echo_during": during,
        "peak_cpu_pct": peak_cpu,
        "mean_cpu_pct": mean_cpu,
    })
}

pub async fn run(o: &Options) -> Result<Value> {
    crate::contenders::raise_fd_limit();
    let dir = std::env::temp_dir().join(format!("switchboard-storm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let t0 = unix_ms();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut node_ports: HashMap<&'static str, u16> = HashMap::new();
    for id in NODES {
        node_ports.insert(id, free_port()?);
    }
    let sampler = Sampler::start(node_ports.clone(), t0, stop_rx.clone());
    let (redis, redis_url) = contenders::redis(&dir)?;
    sampler.set("redis", vec![redis.pid()]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut nodes: HashMap<&str, Proc> = HashMap::new();
    for id in NODES {
        let p = spawn_node(o, &dir, &redis_url, id, node_ports[id])?;
        sampler.set(id, vec![p.pid()]);
        nodes.insert(id, p);
    }
    for id in NODES {
        wait_ok(&format!("http://127.0.0.1:{}/health", node_ports[id]), Duration::from_secs(30)).await?;
    }
    let mut balancers = Vec::new();
    let mut urls = Vec::new();
    for name in ["b1", "b2"] {
        let (port, admin) = two_free_ports()?;
        let p = contenders::switchboard_on(
            &o.bin_dir,
            &dir,
            &redis_url,
            port,
            admin,
            (CHECK_INTERVAL_MS, CHECK_TIMEOUT_MS),
            &[],
        )?;
        sampler.set(name, vec![p.pid()]);
        balancers.push(p);
        urls.push(format!("http://127.0.0.1:{port}"));
        wait_ok(&format!("http://127.0.0.1:{admin}/health"), Duration::from_secs(30)).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // discovery and the first health checks

    let total_wanted = o.per_node * NODES.len();
    let worker_count = total_wanted.div_ceil(PER_WORKER).max(1);
    let mut workers = Vec::new();
    let mut first = 0;
    for k in 0..worker_count {
        let count = (total_wanted - first).min(total_wanted.div_ceil(worker_count));
        workers.push(Worker::spawn(&urls, count, first, IpAddr::from([127, 0, 0, 20 + k as u8]), o.groups)?);
        first += count;
    }
    sampler.set("clients", workers.iter().filter_map(|w| w.child.id()).collect());
    let connect_started = Instant::now();
    let mut total = 0;
    for w in &mut workers {
        let (up, failed) = w.pair("ready").await?;
        if failed > 0 {
            bail!("{failed} clients could not connect in the first place");
        }
        total += up;
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!("storm: {total} clients connected in {connect_secs:.1} s through two balancers");

    let rtts: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let mut probes = Vec::new();
    for i in 0..PROBES {
        probes.push(tokio::spawn(probe(urls[i % urls.len()].clone(), rtts.clone(), stop_rx.clone())));
    }
    let (stop_sender_tx, stop_sender_rx) = watch::channel(false);
    let n2 = format!("http://127.0.0.1:{}", node_ports[UNDISTURBED]);
    let sending = tokio::spawn(sender(n2, o.rate, o.groups, stop_sender_rx));
    let steady = if o.quick { Duration::from_secs(3) } else { Duration::from_secs(10) };
    let settle = if o.quick { Duration::from_secs(1) } else { Duration::from_secs(3) };
    tokio::time::sleep(Duration::from_secs(1)).await; // the probes find n2
    let steady_from = unix_ms();
    tokio::time::sleep(steady).await;

    let mut events: Vec<(&str, u64)> = Vec::new();
    let mut unsettled = Vec::new();
    // kill -9 of one node.
    eprintln!("storm: kill -9 {KILLED}");
    events.push(("kill -9", unix_ms()));
    if let Some(p) = nodes.get_mut(KILLED) {
        p.kill();
    }
    if !until_settled(&mut workers, total, EVENT_LIMIT).await? {
        unsettled.push("kill -9");
    }
    tokio::time::sleep(settle).await;
    // The killed node comes back.
    eprintln!("storm: {KILLED} comes back");
    events.push(("comes back", unix_ms()));
    let p = spawn_node(o, &dir, &redis_url, KILLED, node_ports[KILLED])?;
    sampler.set(KILLED, vec![p.pid()]);
    nodes.insert(KILLED, p);
    wait_ok(&format!("http://127.0.0.1:{}/health", node_ports[KILLED]), Duration::from_secs(30)).await?;
    tokio::time::sleep(settle + Duration::from_secs(2)).await; // discovery, health checks
                                                               // A drain.
    eprintln!("storm: SIGTERM {DRAINED} (drain)");
    events.push(("drain", unix_ms()));
    if let Some(p) = nodes.get_mut(DRAINED) {
        p.terminate();
        let deadline = Instant::now() + EVENT_LIMIT;
        while !p.try_exited() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if !until_settled(&mut workers, total, EVENT_LIMIT).await? {
        unsettled.push("drain");
    }
    tokio::time::sleep(settle).await;
    let end = unix_ms();

    let _ = stop_sender_tx.send(true);
    let last = sending.await.map_err(|e| anyhow!("sender task: {e}"))??;
    tokio::time::sleep(Duration::from_secs(2)).await; // the last deliveries land
    let _ = stop_tx.send(true);
    for p in probes {
        p.abort();
    }
    let last_text = last.map_or("none".to_string(), |l| l.to_string());
    for w in &mut workers {
        w.tell(&format!("stop {last_text}")).await?;
    }
    let mut clients = Vec::new();
    for w in &mut workers {
        loop {
            let line = w.line().await?;
            if line == "done" {
                break;
            }
            clients.push(serde_json::from_str::<Value>(&line).with_context(|| format!("a client's line: {line}"))?);
        }
    }
    for mut w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await;
    }
    let samples = sampler.samples.lock().map(|s| s.clone()).unwrap_or_default();
    drop(balancers);
    drop(nodes);
    drop(redis);

    let rtts = rtts.lock().map(|r| r.clone()).unwrap_or_default();
    let baseline = latency(&rtts, steady_from, events[0].1);
    let mut baseline_cpu: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for s in &samples {
        let t = t0 + (s["t"].as_f64().unwrap_or(0.0) * 1000.0) as u64;
        if t >= steady_from && t < events[0].1 {
            for (name, pct) in s["cpu_pct"].as_object().into_iter().flatten() {
                let e = baseline_cpu.entry(name.clone()).or_default();
                e.0 += pct.as_f64().unwrap_or(0.0);
                e.1 += 1;
            }
        }
    }
    let baseline_cpu = baseline_cpu.into_iter().map(|(k, (sum, n))| (k, sum / n.max(1) as f64)).collect();
    let run = Recorded { clients, rtts, baseline, samples, baseline_cpu, t0 };
    let mut rows = Vec::new();
    for (i, (name, at)) in events.iter().enumerate() {
        let next = events.get(i + 1).map_or(end, |e| e.1);
        rows.push(absorb(name, *at, next, &run));
    }
    let Recorded { clients, baseline, samples, .. } = run;
    let sum = |k: &str| clients.iter().map(|c| c[k].as_u64().unwrap_or(0)).sum::<u64>();
    let count = |k: &str| clients.iter().filter(|c| c[k] == true).count();
    let messages = json!({
        "sent": last.map_or(0, |l| l + 1), "groups": o.groups, "rate": o.rate,
        "lost": sum("lost"), "duplicated": sum("duplicated"), "stray": sum("stray"),
        "resume_errors": sum("resume_errors"),
        "clients_losing": clients.iter().filter(|c| c["lost"].as_u64().unwrap_or(0) > 0).count(),
        "example_lost": clients.iter().find(|c| c["lost"].as_u64().unwrap_or(0) > 0).map(|c| json!({"client": c["i"], "seqs": c["lost_seqs"]})),
    });
    let mut failures = Vec::new();
    for e in &unsettled {
        failures.push(format!("{e}: not every client was back within {} s", EVENT_LIMIT.as_secs()));
    }
    for r in &rows {
        if r["gave_up"].as_u64() != Some(0) || r["not_back"].as_u64() != Some(0) {
            failures.push(format!("{}: {} gave up, {} not back", r["event"], r["gave_up"], r["not_back"]));
        }
    }
    for k in ["lost", "duplicated", "stray", "resume_errors"] {
        if messages[k].as_u64() != Some(0) {
            failures.push(format!("messages {k}: {}", messages[k]));
        }
    }
    if count("failed_start") > 0 || count("gave_up") > 0 {
        failures.push(format!("{} failed to start, {} gave up", count("failed_start"), count("gave_up")));
    }
    let date = {
        let out = std::process::Command::new("date").arg("+%Y-%m-%d").output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
    };
    Ok(json!({
        "date": date,
        "command": o.command_line,
        "quick": o.quick,
        "clients": total,
        "per_node": o.per_node,
        "client_processes": worker_count,
        "connect_secs": (connect_secs * 10.0).round() / 10.0,
        "open_files_limit": contenders::fd_limit(),
        "balancer_settings": "defaults (node_admission_rate 1000/s per node per balancer, slow_start_secs 10, admission_wait_ms 2000); health checks every 1 s",
        "node_settings": match (o.quick, o.drain_spread_secs) {
            (_, Some(s)) => format!("drain_secs {}, drain_spread_secs {s}, otherwise defaults", if o.quick { 2 } else { 10 }),
            (true, None) => "drain_secs 2, drain_spread_secs 2, otherwise defaults".to_string(),
            (false, None) => "defaults (drain_secs 10, drain_spread_secs 15)".to_string(),
        },
        "events": rows,
        "messages": messages,
        "echo_steady": baseline,
        "samples": samples,
        "failures": failures,
    }))
}

/// The tables for a person.
pub fn markdown(r: &Value) -> String {
    let mut s = format!(
        "# Storm: {} idle WebSocket clients ({} per node) through two balancers\n\n\
         Command: `{}` ({}). Redis, three nodes and two Switchboard balancers on loopback; \
         {} client processes from 127.0.0.x, each client reconnecting like Microsoft's official \
         client (at once, then 2 s, 10 s, 30 s; a new negotiate each time), rejoining its group and \
         calling `Resume`. A sender straight on n2 sends {} messages/s (one in fifty to everyone, the rest \
         to {} groups in turn); four probe clients on n2, through the balancers, Echo every 20 ms.\n\n\
         Balancers: {}. Nodes: {}. Open-files limit of every process: {}.\n\n",
        r["clients"],
        r["per_node"],
        r["command"].as_str().unwrap_or(""),
        r["date"].as_str().unwrap_or(""),
        r["client_processes"],
        r["messages"]["rate"],
        r["messages"]["groups"],
        r["balancer_settings"].as_str().unwrap_or(""),
        r["node_settings"].as_str().unwrap_or(""),
        r["open_files_limit"],
    );
    let ms = |v: &Value| v.as_u64().map_or("—".to_string(), |n| format!("{n}"));
    let f = |v: &Value| v.as_f64().map_or("—".to_string(), |n| format!("{n:.2}"));
    s.push_str(
        "| event | affected | back 50 % | 99 % | 100 % | own reconnect p99 | gave up | failed attempts | moved to | \
         Echo p99 before → during (ms) | Redis CPU peak / mean | balancer CPU peak |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for e in r["events"].as_array().into_iter().flatten() {
        let moved: Vec<String> =
            e["moved_to"].as_object().into_iter().flatten().map(|(k, v)| format!("{k} {v}")).collect();
        let peak = &e["peak_cpu_pct"];
        let failed: Vec<String> =
            e["failed_attempts"].as_object().into_iter().flatten().map(|(k, v)| format!("{v} {k}")).collect();
        s.push_str(&format!(
            "| {} (at {:.1} s) | {} | {} ms | {} ms | {} ms | {} ms | {} | {} | {} | {} → {} | {} % / {} % | b1 {} %, b2 {} % |\n",
            e["event"].as_str().unwrap_or(""),
            e["at_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            e["affected"],
            ms(&e["back_ms"]["p50"]),
            ms(&e["back_ms"]["p99"]),
            ms(&e["back_ms"]["p100"]),
            ms(&e["reconnect_ms"]["p99"]),
            e["gave_up"],
            if failed.is_empty() { "none".to_string() } else { format!("{} by {} clients", failed.join(", "), e["clients_with_a_failed_attempt"]) },
            if moved.is_empty() { "—".to_string() } else { moved.join(", ") },
            f(&e["echo_before"]["p99_ms"]),
            f(&e["echo_during"]["p99_ms"]),
            peak["redis"],
            e["mean_cpu_pct"]["redis"],
            peak["b1"],
            peak["b2"],
        ));
    }
    let m = &r["messages"];
    s.push_str(&format!(
        "\nMessages: {} sent; over every client, {} lost, {} received twice, {} received that were not meant \
         for the client, {} failed `Resume` calls.\n\nEcho (probes on n2) in the steady state: p50 {} ms, p99 {} ms, \
         p99.9 {} ms.\n\n",
        m["sent"],
        m["lost"],
        m["duplicated"],
        m["stray"],
        m["resume_errors"],
        f(&r["echo_steady"]["p50_ms"]),
        f(&r["echo_steady"]["p99_ms"]),
        f(&r["echo_steady"]["p999_ms"]),
    ));
    s.push_str("Peak CPU of every process during each storm (percent of one core):\n\n| event | ");
    let names = ["redis", "n1", "n2", "n3", "b1", "b2", "clients"];
    s.push_str(&names.join(" | "));
    s.push_str(" |\n|---|");
    s.push_str(&"---|".repeat(names.len()));
    s.push('\n');
    for e in r["events"].as_array().into_iter().flatten() {
        s.push_str(&format!("| {} |", e["event"].as_str().unwrap_or("")));
        for n in names {
            s.push_str(&format!(" {} |", e["peak_cpu_pct"][n].as_f64().map_or("—".into(), |v| format!("{v:.0}"))));
        }
        s.push('\n');
    }
    s.push_str(
        "\nCPU per reconnect (µs, each process's CPU above its steady level over the storm, divided by the clients \
         that reconnected; the `clients` processes are the load generator):\n\n| event | ",
    );
    s.push_str(&names.join(" | "));
    s.push_str(" | total |\n|---|");
    s.push_str(&"---|".repeat(names.len() + 1));
    s.push('\n');
    for e in r["events"].as_array().into_iter().flatten() {
        let per = &e["cpu_us_per_reconnect"];
        if per.is_null() {
            continue;
        }
        s.push_str(&format!("| {} |", e["event"].as_str().unwrap_or("")));
        for n in names.iter().chain(std::iter::once(&"total")) {
            s.push_str(&format!(" {} |", per[*n].as_f64().map_or("—".into(), |v| format!("{v:.0}"))));
        }
        s.push('\n');
    }
    let failures = r["failures"].as_array().map_or(0, |f| f.len());
    s.push_str(&format!(
        "\n![CPU per process](storm-cpu.svg)\n\n![Connections per node](storm-connections.svg)\n\n\
         Verdict: {}.\n",
        if failures == 0 {
            "every client came back, none gave up, nothing lost or repeated".to_string()
        } else {
            format!("FAILED: {}", r["failures"])
        }
    ));
    s
}

/// CPU per process and connections per node over the run.
pub fn plots(r: &Value) -> Vec<(&'static str, String)> {
    let samples: Vec<&Value> = r["samples"].as_array().into_iter().flatten().collect();
    let series = |field: &str, names: &[&str]| -> Vec<(String, Vec<(f64, f64)>)> {
        names
            .iter()
            .map(|n| {
                let points = samples.iter().filter_map(|s| Some((s["t"].as_f64()?, s[field][*n].as_f64()?))).collect();
                (n.to_string(), points)
            })
            .collect()
    };
    let events: Vec<String> = r["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            format!("{} at {:.0} s", e["event"].as_str().unwrap_or(""), e["at_ms"].as_f64().unwrap_or(0.0) / 1000.0)
        })
        .collect();
    let cpu = series("cpu_pct", &["redis", "n1", "n2", "n3", "b1", "b2", "clients"]);
    let conns = series("connections", &NODES);
    let draw = |title: &str, y: &str, v: Vec<(String, Vec<(f64, f64)>)>| {
        let refs: Vec<(&str, Vec<(f64, f64)>)> = v.iter().map(|(n, p)| (n.as_str(), p.clone())).collect();
        crate::svg::line_chart(title, "seconds since start", y, &refs)
    };
    vec![
        ("storm-cpu.svg", draw(&format!("CPU per process ({})", events.join(", ")), "% of one core", cpu)),
        ("storm-connections.svg", draw("Connections per node", "connections", conns)),
    ]
}
