//! What a send through the server API costs: Redis, three nodes with an
//! access key and the balancer on loopback, N idle WebSocket clients through
//! the balancer (spread over the nodes by load), and a backend that signs a
//! token as Azure's SDKs do and `POST`s `/api/hubs/chathub/:send` through
//! the balancer. Two phases: closed loop (C senders back to back: requests
//! per second, every client's deliveries counted, and every process's CPU
//! per send), then a fixed rate (each message's delivery latency to every
//! client, from just before its request was sent).

use crate::contenders;
use crate::signalr;
use crate::stats::{histogram, record, summarize};
use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "benchmark-access-key-of-thirty-two-bytes-or-more";

pub struct Options {
    pub clients: usize,
    pub senders: usize,
    pub closed_secs: u64,
    pub rate: u64,
    pub rate_secs: u64,
}

/// An HS256 JWT for `claims`, signed with `key`.
fn jwt(claims: &Value, key: &str) -> String {
    use base64::Engine;
    use hmac::Mac;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signing_input = format!("{}.{}", b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#), b64.encode(claims.to_string()));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64.encode(mac.finalize().into_bytes()))
}

/// What the clients saw: deliveries, and each one's latency from its send.
struct Seen {
    deliveries: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    /// When each message (by sequence number) was sent, from `origin`.
    sent_at: Mutex<Vec<Option<Duration>>>,
    origin: Instant,
}

fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| {
            let (u, s) = crate::rss::tree_user_system_ticks(*p);
            u + s
        })
        .sum()
}

pub async fn run(bin_dir: &Path, opts: &Options) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("sb-api-send-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (redis_proc, redis) = contenders::redis(&dir)?;
    let mut nodes = Vec::new();
    for id in ["api-a", "api-b", "api-c"] {
        nodes.push(contenders::node_with(bin_dir, &dir, &redis, id, &["--api-access-key", KEY])?);
    }
    for n in &nodes {
        contenders::wait_ok(&format!("{}/health", n.url), Duration::from_secs(20)).await?;
    }
    let balancer = contenders::switchboard(bin_dir, &dir, &redis)?;
    // Until the balancer routes to all three (placement by load spreads the clients).
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut owners = std::collections::HashSet::new();
        for _ in 0..12 {
            if let Some(o) = crate::failover::negotiate_owner(&http, &balancer.url).await {
                owners.insert(o);
            }
        }
        if owners.len() == 3 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the balancer never routed to all three nodes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let seen = Arc::new(Seen {
        deliveries: AtomicU64::new(0),
        latency: Mutex::new(histogram()),
        sent_at: Mutex::new(Vec::new()),
        origin: Instant::now(),
    });
    let mut per_node: std::collections::BTreeMap<String, usize> = Default::default();
    let mut readers = Vec::new();
    for _ in 0..opts.clients {
        let socket = signalr::connect(&http, &balancer.url).await.context("a client")?;
        *per_node.entry(socket.node.clone().unwrap_or_default()).or_default() += 1;
        let seen = seen.clone();
        readers.push(tokio::spawn(async move {
            let mut ws = socket.ws;
            while let Some(Ok(msg)) = ws.next().await {
                let Ok(text) = msg.to_text() else { continue };
                for r in signalr::records(text) {
                    if r["target"] != "Notice" {
                        continue;
                    }
                    let now = seen.origin.elapsed();
                    seen.deliveries.fetch_add(1, Ordering::Relaxed);
                    let Some(seq) = r["arguments"][0].as_u64() else { continue };
                    let sent = seen.sent_at.lock().ok().and_then(|s| s.get(seq as usize).copied().flatten());
                    if let (Some(sent), Ok(mut h)) = (sent, seen.latency.lock()) {
                        record(&mut h, now.saturating_sub(sent));
                    }
                }
            }
        }));
    }
    eprintln!("api-send: {} clients connected: {per_node:?}", opts.clients);

    let url = format!("{}/api/hubs/chathub/:send", balancer.url);
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3600;
    let token = jwt(&json!({"aud": url, "exp": exp}), KEY);
    let seq = Arc::new(AtomicU64::new(u64::MAX / 2)); // closed-loop messages: no latency kept
    let send_one = {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        move |n: u64| {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            async move {
                let body = json!({"target": "Notice", "arguments": [n, "x".repeat(32)]});
                let r = http.post(&url).bearer_auth(&token).json(&body).send().await;
                r.ok().is_some_and(|r| r.status().as_u16() == 202)
            }
        }
    };

    // Closed loop.
    let pids: Vec<u32> =
        nodes.iter().map(|n| n.process.pid()).chain([balancer.process.pid(), redis_proc.pid()]).collect();
    let ticks_before: Vec<u64> = pids.iter().map(|p| cpu_ticks(&[*p])).collect();
    let delivered_before = seen.deliveries.load(Ordering::Relaxed);
    let started = Instant::now();
    let accepted = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..opts.senders {
        let (send_one, seq, accepted) = (send_one.clone(), seq.clone(), accepted.clone());
        let limit = Duration::from_secs(opts.closed_secs);
        senders.push(tokio::spawn(async move {
            while started.elapsed() < limit {
                if send_one(seq.fetch_add(1, Ordering::Relaxed)).await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for s in senders {
        s.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sends = accepted.load(Ordering::Relaxed);
    // Let the fan-out finish before counting it.
    let want = delivered_before + sends * opts.clients as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while seen.deliveries.load(Ordering::Relaxed) < want && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = started.elapsed().as_secs_f64();
    let delivered = seen.deliveries.load(Ordering::Relaxed) - delivered_before;
    let tick_us = 1_000_000.0 / crate::rss::ticks_per_sec();
    let labels = ["node-a", "node-b", "node-c", "balancer", "redis"];
    let cpu: serde_json::Map<String, Value> = pids
        .iter()
        .zip(&ticks_before)
        .zip(labels)
        .map(|((p, before), label)| {
            let used = cpu_ticks(&[*p]).saturating_sub(*before) as f64 * tick_us;
            (label.to_string(), json!(if sends > 0 { used / sends as f64 } else { 0.0 }))
        })
        .collect();
    eprintln!(
        "api-send closed loop: {sends} sends in {elapsed:.1} s ({:.0}/s), {delivered} deliveries of {} (all in {drained:.1} s); CPU µs per send: {cpu:?}",
        sends as f64 / elapsed,
        sends * opts.clients as u64
    );

    // Fixed rate: latency from send to each delivery.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let count = opts.rate * opts.rate_secs;
    if let Ok(mut s) = seen.sent_at.lock() {
        *s = vec![None; count as usize];
    }
    if let Ok(mut h) = seen.latency.lock() {
        h.reset();
    }
    let fixed_before = seen.deliveries.load(Ordering::Relaxed);
    let interval = Duration::from_secs_f64(1.0 / opts.rate as f64);
    let mut tick = tokio::time::interval(interval);
    let mut in_flight = Vec::new();
    for n in 0..count {
        tick.tick().await;
        if let Ok(mut s) = seen.sent_at.lock() {
            s[n as usize] = Some(seen.origin.elapsed());
        }
        in_flight.push(tokio::spawn(send_one(n)));
    }
    let mut ok = 0;
    for f in in_flight {
        ok += u64::from(f.await.unwrap_or(false));
    }
    let want = fixed_before + ok * opts.clients as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.deliveries.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fixed_delivered = seen.deliveries.load(Ordering::Relaxed) - fixed_before;
    let latency = seen.latency.lock().map(|h| summarize(&h)).map_err(|_| anyhow::anyhow!("latency lock"))?;
    eprintln!("api-send at {} sends/s: {ok} accepted, {fixed_delivered} deliveries; latency {latency:?}", opts.rate);

    for r in readers {
        r.abort();
    }
    drop(balancer);
    drop(nodes);
    drop(redis_proc);
    Ok(json!({
        "clients": opts.clients,
        "clients_per_node": per_node,
        "closed_loop": {
            "senders": opts.senders,
            "seconds": elapsed,
            "sends_accepted": sends,
            "sends_per_second": sends as f64 / elapsed,
            "deliveries": delivered,
            "deliveries_expected": sends * opts.clients as u64,
            "deliveries_per_second": delivered as f64 / drained,
            "cpu_us_per_send": cpu,
        },
        "fixed_rate": {
            "sends_per_second": opts.rate,
            "sends": count,
            "sends_accepted": ok,
            "deliveries": fixed_delivered,
            "deliveries_expected": ok * opts.clients as u64,
            "latency": latency,
        },
    }))
}
