//! The measurements. Each runs against URLs it is given (nodes, the balancer
//! or another proxy on loopback), bounded in count and time, and returns a
//! JSON value that the report generator stores alongside the printed line.

use crate::contenders::free_port;
use crate::failover::negotiate_owner;
use crate::rss::tree_rss_kib;
use crate::signalr::{self, HubSocket};
use crate::stats::{histogram, median, record, summarize};
use anyhow::{bail, Context, Result};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Opens `count` SignalR WebSocket connections to `url`, keeps them alive
/// with pings, and reports how much resident memory each process in `pids`
/// gained per connection, and how much it kept after the clients left.
pub async fn idle(url: &str, count: usize, pids: &[u32], settle: Duration, stateful: bool) -> Result<Value> {
    let before: Vec<u64> = pids.iter().map(|&p| tree_rss_kib(p).unwrap_or(0)).collect();
    let http = reqwest::Client::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    let mut sockets = stream::iter(0..count)
        .map(|_| {
            let http = http.clone();
            async move { signalr::connect_with(&http, url, stateful).await }
        })
        .buffer_unordered(128);
    while let Some(s) = sockets.next().await {
        match s {
            Ok(sock) => tasks.push(tokio::spawn(keep_alive(sock, stop_rx.clone()))),
            Err(e) => {
                if failures.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("connect failed: {e:#}");
                }
            }
        }
    }
    let open = tasks.len();
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let loaded: Vec<u64> = pids.iter().map(|&p| tree_rss_kib(p).unwrap_or(0)).collect();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    tokio::time::sleep(settle).await;
    let after: Vec<u64> = pids.iter().map(|&p| tree_rss_kib(p).unwrap_or(0)).collect();
    let per_process: Vec<Value> = pids
        .iter()
        .enumerate()
        .map(|(i, pid)| {
            let per_conn = (loaded[i] as f64 - before[i] as f64) * 1024.0 / open.max(1) as f64;
            json!({
                "pid": pid,
                "rss_before_kib": before[i],
                "rss_loaded_kib": loaded[i],
                "rss_after_close_kib": after[i],
                "bytes_per_connection": per_conn.round(),
                "kept_after_close_kib": after[i] as i64 - before[i] as i64,
            })
        })
        .collect();
    Ok(
        json!({ "url": url, "requested": count, "open": open, "failed": failures.load(Ordering::Relaxed), "connect_secs": connect_secs, "processes": per_process }),
    )
}

pub(crate) async fn keep_alive(mut sock: HubSocket, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => if sock.ping().await.is_err() { break },
            msg = sock.ws.next() => if !matches!(msg, Some(Ok(_))) { break },
        }
    }
    let _ = sock.ws.close(None).await;
}

/// Round trips of `Echo` with a `payload_bytes` string, each connection
/// sending at `rate / connections` per second for `duration`.
pub async fn echo_latency(
    url: &str,
    connections: usize,
    rate: f64,
    duration: Duration,
    payload_bytes: usize,
) -> Result<Value> {
    let http = reqwest::Client::new();
    let payload = "x".repeat(payload_bytes);
    let interval = Duration::from_secs_f64(connections as f64 / rate.max(1.0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut sock = signalr::connect(&http, url).await?;
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let end = Instant::now() + duration;
            // Warm-up: the first round trips include lazy allocations.
            for _ in 0..20 {
                sock.invoke("Echo", json!([payload])).await?;
            }
            while Instant::now() < end {
                tick.tick().await;
                let t = Instant::now();
                sock.invoke("Echo", json!([payload])).await?;
                record(&mut h, t.elapsed());
            }
            anyhow::Ok(h)
        }));
    }
    let mut all = histogram();
    for t in tasks {
        all.add(t.await??).context("merge histograms")?;
    }
    Ok(json!({ "url": url, "connections": connections, "rate": rate, "latency": summarize(&all) }))
}

/// Sequential `Echo` round trips (64 bytes) over one WebSocket per target,
/// the targets taken in turn for `rounds` rounds of `per_round` each, so a
/// machine that gets busier or quieter during the run affects them alike.
/// Returns one result per target, in the order given.
pub async fn echo_sequential(targets: &[String], rounds: usize, per_round: usize) -> Result<Vec<Value>> {
    let http = reqwest::Client::new();
    let mut socks = Vec::new();
    for url in targets {
        let mut sock = signalr::connect(&http, url).await?;
        for _ in 0..20 {
            sock.invoke("Echo", json!(["x".repeat(64)])).await?;
        }
        socks.push(sock);
    }
    let mut hists: Vec<_> = targets.iter().map(|_| histogram()).collect();
    let payload = json!(["x".repeat(64)]);
    for _ in 0..rounds {
        for (sock, h) in socks.iter_mut().zip(hists.iter_mut()) {
            for _ in 0..per_round {
                let t = Instant::now();
                sock.invoke("Echo", payload.clone()).await?;
                record(h, t.elapsed());
            }
        }
    }
    Ok(targets
        .iter()
        .zip(hists)
        .map(|(url, h)| json!({ "url": url, "rounds": rounds, "per_round": per_round, "latency": summarize(&h) }))
        .collect())
}

/// Closed-loop `Echo` throughput: every connection sends its next request as
/// soon as the previous completes.
pub async fn echo_throughput(url: &str, connections: usize, duration: Duration) -> Result<Value> {
    let http = reqwest::Client::new();
    let done = Arc::new(AtomicU64::new(0));
    let mut socks = Vec::new();
    for _ in 0..connections {
        socks.push(signalr::connect(&http, url).await?);
    }
    let end = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut sock in socks {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                sock.invoke("Echo", json!(["x".repeat(64)])).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let n = done.load(Ordering::Relaxed);
    Ok(
        json!({ "url": url, "connections": connections, "messages": n, "messages_per_sec": (n as f64 / started.elapsed().as_secs_f64()).round() }),
    )
}

/// What the senders of a fan-out send to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Audience {
    /// Everyone: `SendMessage`.
    All,
    /// This many groups (`g0`, `g1`, …): receiver `i` joins group `i mod n`,
    /// and each sender sends `SendMessageToGroup` to the groups in turn,
    /// starting at its own index.
    Groups(usize),
}

impl Audience {
    pub fn label(self) -> String {
        match self {
            Audience::All => "broadcast".into(),
            Audience::Groups(n) => format!("{n} groups"),
        }
    }
}

/// `senders` clients each send at `rate` for `duration` to `receivers`
/// clients (everyone, or the members of a group: `audience`); both are
/// spread over `urls` in turn. Reports deliveries per second and delivery
/// latency (send → receive, same clock), and the CPU each process in
/// `watch` spent while the senders were sending.
pub async fn fanout(
    urls: &[String],
    receivers: usize,
    senders: usize,
    rate: f64,
    duration: Duration,
    audience: Audience,
    watch: &[(String, u32)],
) -> Result<Value> {
    if urls.is_empty() || senders == 0 || audience == Audience::Groups(0) {
        bail!("fanout needs at least one URL, one sender and one group");
    }
    let group = |i: usize| match audience {
        Audience::All => None,
        Audience::Groups(n) => Some(format!("g{}", i % n)),
    };
    let http = reqwest::Client::new();
    let epoch = Instant::now();
    let hist = Arc::new(Mutex::new(histogram()));
    let delivered = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut per_node = std::collections::BTreeMap::<String, u64>::new();
    let mut opened = stream::iter(0..receivers)
        .map(|i| {
            let (http, url, group) = (http.clone(), urls[i % urls.len()].clone(), group(i));
            async move {
                let mut sock = signalr::connect(&http, &url).await?;
                if let Some(g) = group {
                    sock.invoke("JoinGroup", json!([g])).await?;
                }
                Ok::<_, anyhow::Error>(sock)
            }
        })
        .buffer_unordered(32);
    let mut tasks = Vec::new();
    while let Some(sock) = opened.next().await {
        let mut sock = sock?;
        *per_node.entry(sock.node.clone().unwrap_or_else(|| "?".into())).or_default() += 1;
        let (hist, delivered, mut stop) = (hist.clone(), delivered.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = histogram();
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    text = sock.read_text() => {
                        let Ok(text) = text else { break };
                        let now = epoch.elapsed().as_micros() as u64;
                        for sent in sent_stamps(&text) {
                            record(&mut local, Duration::from_micros(now.saturating_sub(sent)));
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            if let Ok(mut h) = hist.lock() {
                let _ = h.add(local);
            }
        }));
    }
    drop(opened);
    let mut senders_socks = Vec::new();
    for i in 0..senders {
        senders_socks.push(signalr::connect(&http, &urls[i % urls.len()]).await?);
    }
    // Let every node's backplane subscription settle before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = crate::rss::CpuWindow::start(watch);
    let end = Instant::now() + duration;
    let sending: Vec<_> = senders_socks
        .into_iter()
        .enumerate()
        .map(|(j, mut sender)| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let (mut sent, mut owed) = (0u64, 0u64);
                while Instant::now() < end {
                    tick.tick().await;
                    let text = format!("t:{}", epoch.elapsed().as_micros());
                    let msg = match audience {
                        Audience::All => json!({"type": 1, "target": "SendMessage", "arguments": ["bench", text]}),
                        Audience::Groups(n) => {
                            let g = (j + sent as usize) % n;
                            // Receiver i is in group i mod n.
                            owed += (receivers / n + usize::from(g < receivers % n)) as u64;
                            json!({"type": 1, "target": "SendMessageToGroup", "arguments": [format!("g{g}"), "bench", text]})
                        }
                    };
                    if sender.send_record(&msg).await.is_err() {
                        break;
                    }
                    sent += 1;
                }
                if audience == Audience::All {
                    owed = sent * receivers as u64;
                }
                // Kept open until counting ends: a socket dropped with unread
                // bytes is reset, and a reset can discard the last message
                // before the node has read it.
                (sent, owed, sender)
            })
        })
        .collect();
    let (mut sent, mut expected) = (0u64, 0u64);
    let mut open_senders = Vec::new();
    for s in sending {
        if let Ok((n, owed, sender)) = s.await {
            sent += n;
            expected += owed;
            open_senders.push(sender);
        }
    }
    let cpu = cpu.finish();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    for mut sender in open_senders {
        let _ = sender.ws.close(None).await;
    }
    let n = delivered.load(Ordering::Relaxed);
    let summary = hist.lock().map(|h| summarize(&h)).ok();
    Ok(json!({
        "urls": urls, "receivers": receivers, "senders": senders, "rate_per_sender": rate,
        "audience": audience.label(),
        "receivers_per_node": per_node, "sent": sent, "expected_deliveries": expected,
        "delivered": n, "deliveries_per_sec": (n as f64 / duration.as_secs_f64()).round(), "latency": summary,
        "cpu_percent_of_one_core": cpu,
    }))
}

/// The send times (`t:<µs>`) carried by the `ReceiveMessage` and
/// `ReceiveGroupMessage` records of a text frame, found without parsing each
/// record as JSON: at hundreds of thousands of deliveries a second the load
/// generator's own parsing would otherwise be what is measured.
fn sent_stamps(text: &str) -> impl Iterator<Item = u64> + '_ {
    let chat = |r: &&str| r.contains("\"ReceiveMessage\"") || r.contains("\"ReceiveGroupMessage\"");
    text.split(signalr::RS).filter(chat).filter_map(|r| {
        let at = r.find("\"t:")? + 3;
        let digits: &str = &r[at..];
        let len = digits.bytes().take_while(u8::is_ascii_digit).count();
        digits[..len].parse().ok()
    })
}

/// How fast the balancer notices nodes: start a node, then count the time
/// until the balancer routes a new client to it; `kill -9` it, then count the
/// time until the balancer stops offering it (`/api/backends`), with a client
/// negotiating through the balancer all along. Repeated `runs` times.
pub async fn discovery(balancer: &str, admin: &str, redis: &str, node_bin: &str, runs: usize) -> Result<Value> {
    let http = reqwest::Client::new();
    let mut to_routed = Vec::new();
    let mut to_removed = Vec::new();
    for run in 0..runs {
        let port = free_port()?;
        let id = format!("bench-late-{run}-{port}");
        let base = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        let mut child = std::process::Command::new(node_bin)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--redis",
                redis,
                "--node-id",
                &id,
                "--advertise-url",
                &base,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("start node")?;
        let routed = async {
            loop {
                if negotiate_owner(&http, balancer).await.as_deref() == Some(id.as_str()) {
                    return t0.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        let routed = tokio::time::timeout(Duration::from_secs(30), routed).await.context("new node never routed")?;
        to_routed.push(routed.as_secs_f64() * 1000.0);

        let t1 = Instant::now();
        let _ = child.kill();
        let _ = child.wait();
        let removed = async {
            loop {
                let _ = http.post(format!("{balancer}/chathub/negotiate?negotiateVersion=1")).send().await;
                if let Ok(r) = http.get(format!("{admin}/api/backends")).send().await {
                    if let Ok(v) = r.json::<Value>().await {
                        let offered = v["nodes"].as_array().is_some_and(|ns| {
                            ns.iter().any(|n| n["nodeId"] == id.as_str() && n["acceptsNewClients"] == true)
                        });
                        if !offered {
                            return t1.elapsed();
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        let removed =
            tokio::time::timeout(Duration::from_secs(60), removed).await.context("dead node never removed")?;
        to_removed.push(removed.as_secs_f64() * 1000.0);
        eprintln!(
            "run {run}: start→routed {:.0} ms, kill→out of rotation {:.0} ms",
            routed.as_secs_f64() * 1000.0,
            removed.as_secs_f64() * 1000.0
        );
        // Let the registry forget the dead node before the next run.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(json!({
        "runs": runs,
        "start_to_routed_ms": to_routed, "median_start_to_routed_ms": median(&mut to_routed.clone()),
        "kill_to_out_of_rotation_ms": to_removed, "median_kill_to_out_of_rotation_ms": median(&mut to_removed.clone()),
    }))
}

/// New connections per second for `duration`: each connects (with a full
/// TLS handshake for an `https://` URL), asks `GET /health`, reads the whole
/// answer and closes.
pub async fn new_connections(url: &str, concurrency: usize, duration: Duration) -> Result<Value> {
    let deadline = Instant::now() + duration;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tls = url.starts_with("https://");
    let health = format!("{}/health", url.trim_end_matches('/'));
    let host_port = crate::tls::authority(url)?.to_string();
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (ok, failed, health, host_port) = (ok.clone(), failed.clone(), health.clone(), host_port.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let result = if tls {
                        crate::tls::request(&health, "GET").await.map(|(status, ..)| status)
                    } else {
                        plain_get(&host_port).await
                    };
                    match result {
                        Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let done = ok.load(Ordering::Relaxed);
    Ok(json!({
        "url": url,
        "tls": tls,
        "concurrency": concurrency,
        "connections": done,
        "failed": failed.load(Ordering::Relaxed),
        "per_second": (done as f64 / secs).round(),
    }))
}

/// `GET /health` on a new plain TCP connection, `Connection: close`.
async fn plain_get(host_port: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(host_port).await?;
    let _ = s.set_nodelay(true);
    let head = format!("GET /health HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow::anyhow!("no status line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_times_are_read_from_chat_message_records_only() {
        let rs = signalr::RS;
        let text = format!(
            "{{\"type\":1,\"target\":\"ReceiveMessage\",\"arguments\":[\"bench\",\"t:123\"]}}{rs}{{\"type\":6}}{rs}{{\"type\":1,\"target\":\"ReceiveMessage\",\"arguments\":[\"bench\",\"t:45\",{{}}]}}{rs}{{\"type\":1,\"target\":\"Other\",\"arguments\":[\"t:9\"]}}{rs}{{\"type\":1,\"target\":\"ReceiveMessage\",\"arguments\":[\"bench\",\"hello\"]}}{rs}"
        );
        assert_eq!(sent_stamps(&text).collect::<Vec<_>>(), vec![123, 45]);
        let group =
            format!("{{\"type\":1,\"target\":\"ReceiveGroupMessage\",\"arguments\":[\"g1\",\"bench\",\"t:77\"]}}{rs}");
        assert_eq!(sent_stamps(&group).collect::<Vec<_>>(), vec![77]);
    }
}
