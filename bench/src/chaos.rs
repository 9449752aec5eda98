//! `switchboard-bench chaos`: a cluster under load while its parts fail, and
//! a count of what every client received. Redis, four nodes and the balancer
//! run on loopback; a sender straight on node n1 (never disturbed) sends
//! numbered chat messages at a steady rate, tagged with the event under way;
//! clients through the balancer receive them: "resuming" clients (message ids
//! and `Resume` after every reconnect, rejoining nothing since they use no
//! groups) and "plain" clients (reconnect, no resume), for contrast. In turn:
//! a node drains (SIGTERM, then comes back), a node is killed (`kill -9`,
//! then comes back), the balancer is killed and restarted, Redis is stopped
//! and started again, Redis is paused (`CLIENT PAUSE`), and a node is scaled
//! in. At the end every client's messages are checked against what was sent:
//! per event and client kind, how many were lost and duplicated, and the
//! longest reconnect. It fails when a resuming client lost or repeated
//! anything, or any client lost or repeated a message to a Redis outage or
//! pause. Every wait is bounded.

use crate::contenders::{free_port, switchboard_on, two_free_ports, wait_ok, Proc};
use crate::signalr;
use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

const RS: char = '\u{1e}';
const EVENTS: [&str; 6] = ["drain node", "kill node", "restart balancer", "stop redis", "pause redis", "scale in"];

pub struct Options {
    pub quick: bool,
    pub bin_dir: PathBuf,
    pub clients: usize,
    pub rate: f64,
    /// Announce the balancer's URL and wait this long before sending, so
    /// clients from outside (browsers in the end-to-end test) can join.
    pub hold: Duration,
}

struct Timing {
    settle: Duration,
    redis_down: Duration,
    pause: Duration,
}

/// What one client saw.
#[derive(Default)]
struct Log {
    received: Vec<String>,
    /// Longest time from losing the connection to receiving again.
    worst_reconnect: HashMap<String, Duration>,
    resume_errors: Vec<String>,
}

type Phase = Arc<Mutex<String>>;

fn phase_now(p: &Phase) -> String {
    p.lock().map(|g| g.clone()).unwrap_or_default()
}

fn spawn_redis(dir: &Path, port: u16) -> Result<Proc> {
    let args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    Proc::spawn(Path::new("redis-server"), &args, &dir.join(format!("redis-{}.log", now_tag())))
}

fn spawn_node(bin: &Path, dir: &Path, redis: &str, id: &str, port: u16) -> Result<Proc> {
    let base = format!("http://127.0.0.1:{port}");
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--redis",
        redis,
        "--node-id",
        id,
        "--advertise-url",
        &base,
        "--heartbeat-secs",
        "0.5",
        "--ttl-secs",
        "2",
        "--drain-secs",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Proc::spawn(&bin.join("switchboard-node"), &args, &dir.join(format!("node-{id}-{}.log", now_tag())))
}

fn spawn_balancer(bin: &Path, dir: &Path, redis: &str, port: u16, admin: u16) -> Result<Proc> {
    // Fast health checks, as the end-to-end tests use.
    switchboard_on(bin, dir, redis, port, admin, (200, 300), &[])
}

fn now_tag() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Negotiates through `base`, opens the WebSocket and shakes hands.
async fn open(http: &reqwest::Client, base: &str, message_ids: bool) -> Result<Ws> {
    Ok(signalr::connect_opts(http, base, false, message_ids).await?.ws)
}

fn records(m: &Message) -> Vec<Value> {
    signalr::records(m.to_text().unwrap_or_default())
}

/// A client through the balancer that reconnects forever (until `stop`),
/// resuming from its last message id when `resuming`.
async fn client(base: String, resuming: bool, phase: Phase, log: Arc<Mutex<Log>>, mut stop: watch::Receiver<bool>) {
    let http = reqwest::Client::new();
    let mut last_id: Option<String> = None;
    let mut lost_at: Option<(Instant, String)> = None;
    while !*stop.borrow() {
        let mut ws = match open(&http, &base, resuming).await {
            Ok(ws) => ws,
            Err(_) => {
                lost_at.get_or_insert_with(|| (Instant::now(), phase_now(&phase)));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let (true, Some(id)) = (resuming, &last_id) {
            let resume = json!({"type":1,"invocationId":"resume","target":"Resume","arguments":[id]});
            if ws.send(Message::Text(format!("{resume}{RS}").into())).await.is_err() {
                continue;
            }
        }
        let mut ping = tokio::time::interval(Duration::from_secs(5));
        loop {
            let msg = tokio::select! {
                _ = stop.changed() => return,
                _ = ping.tick() => {
                    if ws.send(Message::Text(format!("{{\"type\":6}}{RS}").into())).await.is_err() { break }
                    continue;
                }
                m = ws.next() => match m {
                    Some(Ok(m)) => m,
                    _ => break,
                },
            };
            for v in records(&msg) {
                match v["type"].as_u64() {
                    Some(1) if v["target"] == "ReceiveMessage" => {
                        let args = v["arguments"].as_array().cloned().unwrap_or_default();
                        let Some(text) = args.get(1).and_then(Value::as_str) else { continue };
                        if let Some(id) = args.get(4).and_then(Value::as_str) {
                            last_id = Some(id.to_string());
                        }
                        let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                        l.received.push(text.to_string());
                        if let Some((at, during)) = lost_at.take() {
                            let took = at.elapsed();
                            let worst = l.worst_reconnect.entry(during).or_default();
                            *worst = (*worst).max(took);
                        }
                    }
                    Some(3) if v["invocationId"] == "resume" => {
                        if let Some(e) = v["error"].as_str() {
                            log.lock().unwrap_or_else(|p| p.into_inner()).resume_errors.push(e.to_string());
                        }
                    }
                    Some(7) => {}
                    _ => {}
                }
            }
        }
        lost_at.get_or_insert_with(|| (Instant::now(), phase_now(&phase)));
    }
}

/// Sends numbered messages straight to `base` at `rate` per second until
/// stopped; returns every text whose invocation completed, by phase.
async fn sender(
    base: String,
    rate: f64,
    phase: Phase,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<(String, String)>> {
    let http = reqwest::Client::new();
    let mut ws = open(&http, &base, false).await.context("sender connects to n1")?;
    let mut sent = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(sent),
            _ = tick.tick() => {}
        }
        let during = phase_now(&phase);
        let text = format!("{n:06} {during}");
        n += 1;
        let inv_id = n.to_string();
        let inv = json!({"type":1,"invocationId":inv_id,"target":"SendMessage","arguments":["sender", text]});
        ws.send(Message::Text(format!("{inv}{RS}").into())).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        'wait: loop {
            let m = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), ws.next())
                .await
                .map_err(|_| anyhow!("no completion for message {n}"))?
                .ok_or_else(|| anyhow!("sender's connection closed"))??;
            for v in records(&m) {
                if v["type"] == 3 && v["invocationId"] == inv_id.as_str() {
                    if v.get("error").is_none() {
                        sent.push((during.clone(), text.clone()));
                    }
                    break 'wait;
                }
            }
        }
    }
}

fn set_phase(p: &Phase, name: &str) {
    if let Ok(mut g) = p.lock() {
        *g = name.to_string();
    }
    eprintln!("chaos: {name}");
}

async fn wait_exit(p: &mut Proc, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if p.try_exited() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.kill();
}

fn redis_cli(port: u16, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output()?;
    if !out.status.success() {
        bail!("redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub async fn run(opts: &Options) -> Result<Value> {
    let t = if opts.quick {
        Timing { settle: Duration::from_secs(2), redis_down: Duration::from_secs(4), pause: Duration::from_secs(3) }
    } else {
        Timing { settle: Duration::from_secs(5), redis_down: Duration::from_secs(20), pause: Duration::from_secs(10) }
    };
    let dir = std::env::temp_dir().join(format!("switchboard-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bin = &opts.bin_dir;
    let redis_port = free_port()?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let mut redis = spawn_redis(&dir, redis_port)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = ["n1", "n2", "n3", "n4"];
    let mut ports = HashMap::new();
    let mut nodes: HashMap<&str, Proc> = HashMap::new();
    for id in ids {
        let port = free_port()?;
        ports.insert(id, port);
        nodes.insert(id, spawn_node(bin, &dir, &redis_url, id, port)?);
    }
    for id in ids {
        wait_ok(&format!("http://127.0.0.1:{}/health", ports[id]), Duration::from_secs(15)).await?;
    }
    let (lb_port, admin_port) = two_free_ports()?;
    let mut balancer = spawn_balancer(bin, &dir, &redis_url, lb_port, admin_port)?;
    let lb = format!("http://127.0.0.1:{lb_port}");
    wait_ok(&format!("http://127.0.0.1:{admin_port}/health"), Duration::from_secs(15)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // discovery and first health checks

    let phase: Phase = Arc::new(Mutex::new("steady".into()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (stop_sender_tx, stop_sender_rx) = watch::channel(false);
    let mut logs = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..opts.clients * 2 {
        let resuming = i % 2 == 0;
        let log = Arc::new(Mutex::new(Log::default()));
        logs.push((resuming, log.clone()));
        tasks.push(tokio::spawn(client(lb.clone(), resuming, phase.clone(), log, stop_rx.clone())));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    if !opts.hold.is_zero() {
        eprintln!("chaos: balancer {lb}");
        tokio::time::sleep(opts.hold).await;
    }
    let sending =
        tokio::spawn(sender(format!("http://127.0.0.1:{}", ports["n1"]), opts.rate, phase.clone(), stop_sender_rx));
    tokio::time::sleep(t.settle).await;

    for event in EVENTS {
        set_phase(&phase, event);
        match event {
            "drain node" => {
                if let Some(p) = nodes.get_mut("n2") {
                    p.terminate();
                    wait_exit(p, Duration::from_secs(15)).await;
                }
                nodes.insert("n2", spawn_node(bin, &dir, &redis_url, "n2", ports["n2"])?);
            }
            "kill node" => {
                if let Some(p) = nodes.get_mut("n3") {
                    p.kill();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                nodes.insert("n3", spawn_node(bin, &dir, &redis_url, "n3", ports["n3"])?);
            }
            "restart balancer" => {
                balancer.kill();
                tokio::time::sleep(Duration::from_millis(500)).await;
                balancer = spawn_balancer(bin, &dir, &redis_url, lb_port, admin_port)?;
                wait_ok(&format!("http://127.0.0.1:{admin_port}/health"), Duration::from_secs(15)).await?;
            }
            "stop redis" => {
                redis.kill();
                tokio::time::sleep(t.redis_down).await;
                redis = spawn_redis(&dir, redis_port)?;
            }
            "pause redis" => {
                redis_cli(redis_port, &["CLIENT", "PAUSE", &t.pause.as_millis().to_string(), "WRITE"])?;
                tokio::time::sleep(t.pause).await;
            }
            "scale in" => {
                if let Some(p) = nodes.get_mut("n4") {
                    p.terminate();
                    wait_exit(p, Duration::from_secs(15)).await;
                }
            }
            _ => {}
        }
        tokio::time::sleep(t.settle).await;
    }
    set_phase(&phase, "steady");
    tokio::time::sleep(t.settle).await;
    let _ = stop_sender_tx.send(true);
    let sent = sending.await.map_err(|e| anyhow!("sender task: {e}"))??;
    // Let the last deliveries land, then stop the clients.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        t.abort();
    }
    drop(balancer);
    drop(nodes);
    drop(redis);
    Ok(tally(&sent, &logs))
}

/// Lost and duplicated per phase and client kind, and the verdict.
fn tally(sent: &[(String, String)], logs: &[(bool, Arc<Mutex<Log>>)]) -> Value {
    let phase_of: HashMap<&str, &str> = sent.iter().map(|(p, t)| (t.as_str(), p.as_str())).collect();
    let mut phases: Vec<&str> = vec!["steady"];
    phases.extend(EVENTS);
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let mut details = Vec::new();
    for kind in ["resuming", "plain"] {
        for phase in &phases {
            let want: Vec<&str> = sent.iter().filter(|(p, _)| p == phase).map(|(_, t)| t.as_str()).collect();
            let (mut lost, mut dup, mut worst) = (0usize, 0usize, Duration::ZERO);
            let mut clients = 0;
            for (resuming, log) in logs {
                if (kind == "resuming") != *resuming {
                    continue;
                }
                clients += 1;
                let l = log.lock().unwrap_or_else(|p| p.into_inner());
                let mut counts: HashMap<&str, usize> = HashMap::new();
                for t in &l.received {
                    if phase_of.get(t.as_str()) == Some(phase) {
                        *counts.entry(t.as_str()).or_default() += 1;
                    }
                }
                let missing: Vec<&str> = want.iter().filter(|w| !counts.contains_key(*w)).copied().collect();
                if !missing.is_empty() && kind == "resuming" {
                    // What a failure needs to be understood: which messages,
                    // and what this client received around them.
                    let around: Vec<&str> =
                        l.received.iter().map(String::as_str).filter(|t| phase_of.get(*t) == Some(phase)).collect();
                    details.push(format!("client {clients} missed {missing:?}; received in this phase: {around:?}"));
                }
                lost += missing.len();
                dup += counts.values().filter(|n| **n > 1).map(|n| n - 1).sum::<usize>();
                worst = worst.max(l.worst_reconnect.get(*phase).copied().unwrap_or_default());
            }
            let redis_event = phase.contains("redis");
            if (kind == "resuming" || redis_event) && (lost > 0 || dup > 0) {
                failures.push(format!("{kind} clients, {phase}: {lost} lost, {dup} duplicated"));
            }
            rows.push(json!({
                "event": phase, "clients": kind, "client_count": clients, "sent": want.len(),
                "lost": lost, "duplicated": dup, "worst_reconnect_ms": worst.as_millis() as u64,
            }));
        }
    }
    let resume_errors: Vec<String> =
        logs.iter().flat_map(|(_, l)| l.lock().map(|l| l.resume_errors.clone()).unwrap_or_default()).collect();
    let sent_texts: Vec<Value> = sent.iter().map(|(p, t)| json!([p, t])).collect();
    if !failures.is_empty() {
        failures.extend(details);
        failures.extend(resume_errors.iter().map(|e| format!("resume error: {e}")));
    }
    json!({ "sent": sent.len(), "rows": rows, "resume_errors": resume_errors, "failures": failures, "sent_texts": sent_texts })
}

/// The table for a person.
pub fn table(result: &Value) -> String {
    let mut out =
        String::from("| event | clients | sent | lost | duplicated | longest reconnect |\n|---|---|---|---|---|---|\n");
    for r in result["rows"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| {} | {} ×{} | {} | {} | {} | {} ms |\n",
            r["event"].as_str().unwrap_or(""),
            r["clients"].as_str().unwrap_or(""),
            r["client_count"],
            r["sent"],
            r["lost"],
            r["duplicated"],
            r["worst_reconnect_ms"]
        ));
    }
    out
}
