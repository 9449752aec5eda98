//! The client side of `switchboard-bench storm`: one process holding
//! thousands of idle SignalR WebSockets from one source address, each behaving
//! like Microsoft's official client with automatic reconnect. A client opts in
//! to message ids, joins its group, and when its connection ends it tries
//! again at once, then after 2 s, 10 s and 30 s (no jitter, a new negotiate
//! each time) and gives up after the fourth failure; once back it rejoins its
//! group and calls `Resume` from the last id it saw. It records when it went
//! down, when and where it came back, and the sequence numbers of the chat
//! messages it received. The parent talks to it over stdin and stdout:
//! `ready <open> <failed>` once every client has connected (or failed for a
//! minute), `status` → `status <up> <gave_up>`, and `stop <last seq>` → one
//! JSON line per client (what it lost and received twice, from the
//! deterministic targets in `target`) and then `done`.

use crate::signalr::{self, HubSocket};
use anyhow::{bail, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

/// The official client's delays before its second, third and fourth
/// attempt (the first is at once); it gives up when the fourth fails.
pub const RETRY_DELAYS: [Duration; 3] = [Duration::from_secs(2), Duration::from_secs(10), Duration::from_secs(30)];
/// Longest one attempt (negotiate, upgrade, handshake) may take, as the
/// official client's handshake timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// The official client's keep-alive interval.
const PING_EVERY: Duration = Duration::from_secs(15);

/// One message in this many goes to everyone (at 10 a second, one every
/// 5 s: a broadcast to 15,000 clients is a burst this machine takes a few
/// hundred milliseconds to deliver, which would otherwise set every latency
/// figure).
pub const BROADCAST_EVERY: u64 = 50;

/// Where message `seq` of the storm's sender goes: every
/// `BROADCAST_EVERY`th to everyone, the rest to the groups in turn. The
/// sender and every client derive what was meant for whom from this alone.
pub fn target(seq: u64, groups: usize) -> Option<usize> {
    if seq.is_multiple_of(BROADCAST_EVERY) {
        None
    } else {
        Some(((seq - seq / BROADCAST_EVERY - 1) % groups.max(1) as u64) as usize)
    }
}

/// A failed attempt's kind, for the report: the negotiate's status, or what
/// went wrong.
fn failure_kind(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    if let Some(rest) = text.split("negotiate answered ").nth(1) {
        return format!("negotiate {}", rest.chars().take(3).collect::<String>());
    }
    if let Some(rest) = text.split("HTTP error: ").nth(1) {
        return format!("upgrade {}", rest.chars().take(3).collect::<String>());
    }
    for (needle, kind) in
        [("timed out", "timeout"), ("Connection refused", "refused"), ("reset", "reset"), ("handshake", "handshake")]
    {
        if text.contains(needle) {
            return kind.to_string();
        }
    }
    text.chars().take(60).collect()
}

/// The text the sender sends as message `seq`, and back.
pub fn text_of(seq: u64) -> String {
    format!("s{seq}")
}

fn seq_of(text: &str) -> Option<u64> {
    text.strip_prefix('s')?.parse().ok()
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What one client saw.
#[derive(Default)]
struct Log {
    /// When it connected (unix ms) and to which node.
    ups: Vec<(u64, String)>,
    downs: Vec<u64>,
    gave_up: bool,
    failed_start: bool,
    seqs: Vec<u64>,
    /// Failed reconnect attempts: when, and why.
    failures: Vec<(u64, String)>,
    last_id: Option<String>,
    resume_errors: u32,
}

struct Shared {
    http: reqwest::Client,
    source: IpAddr,
    balancers: Vec<String>,
    groups: usize,
    up: AtomicUsize,
    gave_up: AtomicUsize,
    started: AtomicUsize,
    /// Bounds the first connects (the start is not what is measured).
    start_gate: Semaphore,
}

impl Shared {
    async fn attempt(&self, base: &str) -> Result<HubSocket> {
        match tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            signalr::connect_from(&self.http, base, false, true, Some(self.source)),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => bail!("attempt timed out"),
        }
    }
}

/// The record of every `ReceiveMessage` / `ReceiveGroupMessage` in a frame:
/// (sequence number, message id).
fn chat_records(text: &str) -> Vec<(Option<u64>, Option<String>)> {
    let mut out = Vec::new();
    for v in signalr::records(text) {
        let (text_at, id_at) = match v["target"].as_str() {
            Some("ReceiveMessage") if v["type"] == 1 => (1, 4),
            Some("ReceiveGroupMessage") if v["type"] == 1 => (2, 5),
            _ => continue,
        };
        let args = &v["arguments"];
        out.push((args[text_at].as_str().and_then(seq_of), args[id_at].as_str().map(String::from)));
    }
    out
}

fn resume_failed(text: &str) -> bool {
    signalr::records(text).iter().any(|v| v["type"] == 3 && v["invocationId"] == "resume" && v.get("error").is_some())
}

enum Ended {
    Stopped,
    Lost,
}

/// Joins the group (and resumes), then reads until the connection ends or
/// the run stops.
async fn live(sock: &mut HubSocket, group: usize, log: &Mutex<Log>, stop: &mut watch::Receiver<bool>) -> Ended {
    let last = log.lock().map(|l| l.last_id.clone()).unwrap_or_default();
    let join = json!({"type":1,"invocationId":"join","target":"JoinGroup","arguments":[format!("g{group}")]});
    if sock.send_record(&join).await.is_err() {
        return Ended::Lost;
    }
    if let Some(last) = last {
        let resume = json!({"type":1,"invocationId":"resume","target":"Resume","arguments":[last]});
        if sock.send_record(&resume).await.is_err() {
            return Ended::Lost;
        }
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => return Ended::Stopped,
            _ = ping.tick() => {
                if sock.ping().await.is_err() { return Ended::Lost }
                continue;
            }
            m = sock.ws.next() => m,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ended::Lost,
            Some(Ok(_)) => continue,
        };
        let records = chat_records(text.as_str());
        let Ok(mut l) = log.lock() else { return Ended::Lost };
        for (seq, id) in records {
            if let Some(seq) = seq {
                l.seqs.push(seq);
            }
            if id.is_some() {
                l.last_id = id;
            }
        }
        if resume_failed(text.as_str()) {
            l.resume_errors += 1;
        }
        // A Close message (type 7) is followed by the socket's end.
    }
}

async fn client(shared: Arc<Shared>, index: usize, log: Arc<Mutex<Log>>, mut stop: watch::Receiver<bool>) {
    let base = shared.balancers[index % shared.balancers.len()].clone();
    let group = index % shared.groups.max(1);
    let note = |f: &dyn Fn(&mut Log)| {
        if let Ok(mut l) = log.lock() {
            f(&mut l)
        }
    };
    // The first connection, retried for a minute: starting is not measured.
    let first_deadline = Instant::now() + Duration::from_secs(60);
    let mut sock = loop {
        let attempt = {
            let _permit = shared.start_gate.acquire().await;
            shared.attempt(&base).await
        };
        match attempt {
            Ok(s) => break s,
            Err(_) if Instant::now() < first_deadline && !*stop.borrow() => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(_) => {
                note(&|l| l.failed_start = true);
                shared.started.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    };
    shared.started.fetch_add(1, Ordering::SeqCst);
    loop {
        let node = sock.node.clone().unwrap_or_default();
        note(&|l| l.ups.push((unix_ms(), node.clone())));
        shared.up.fetch_add(1, Ordering::SeqCst);
        let ended = live(&mut sock, group, &log, &mut stop).await;
        shared.up.fetch_sub(1, Ordering::SeqCst);
        if let Ended::Stopped = ended {
            let _ = sock.ws.close(None).await;
            return;
        }
        note(&|l| l.downs.push(unix_ms()));
        drop(sock);
        let mut delays = RETRY_DELAYS.iter();
        sock = loop {
            if *stop.borrow() {
                return;
            }
            match shared.attempt(&base).await {
                Ok(s) => break s,
                Err(e) => {
                    let kind = failure_kind(&e);
                    note(&|l| l.failures.push((unix_ms(), kind.clone())));
                }
            }
            let Some(delay) = delays.next() else {
                note(&|l| l.gave_up = true);
                shared.gave_up.fetch_add(1, Ordering::SeqCst);
                return;
            };
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(*delay) => {}
            }
        };
    }
}

/// One client's line for the parent: its timeline and what it lost and
/// received twice of the messages `0..=last` meant for it.
fn summary(index: usize, groups: usize, last: Option<u64>, l: &Log) -> Value {
    let group = index % groups.max(1);
    let mut counts: HashMap<u64, u32> = HashMap::new();
    for s in &l.seqs {
        *counts.entry(*s).or_default() += 1;
    }
    let meant = |s: &u64| target(*s, groups).is_none_or(|g| g == group);
    let mut lost = Vec::new();
    if let Some(last) = last {
        lost = (0..=last).filter(meant).filter(|s| !counts.contains_key(s)).collect();
    }
    let dup: u32 = counts.values().filter(|n| **n > 1).map(|n| n - 1).sum();
    let stray = counts.keys().filter(|s| !meant(s)).count();
    json!({
        "i": index,
        "ups": l.ups.iter().map(|(t, n)| json!([t, n])).collect::<Vec<_>>(),
        "downs": l.downs,
        "gave_up": l.gave_up,
        "failed_start": l.failed_start,
        "lost": lost.len(),
        "lost_seqs": lost.iter().take(20).collect::<Vec<_>>(),
        "duplicated": dup,
        "stray": stray,
        "resume_errors": l.resume_errors,
        "failures": l.failures.iter().map(|(t, k)| json!([t, k])).collect::<Vec<_>>(),
    })
}

/// The worker: `count` clients numbered from `first`, spread over
/// `balancers` by number, connecting from `source`.
pub async fn run(balancers: Vec<String>, count: usize, first: usize, source: IpAddr, groups: usize) -> Result<()> {
    crate::contenders::raise_fd_limit();
    let http = reqwest::Client::builder().local_address(source).pool_max_idle_per_host(64).build()?;
    let shared = Arc::new(Shared {
        http,
        source,
        balancers,
        groups,
        up: AtomicUsize::new(0),
        gave_up: AtomicUsize::new(0),
        started: AtomicUsize::new(0),
        start_gate: Semaphore::new(64),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut logs = Vec::new();
    let mut tasks = Vec::new();
    for index in first..first + count {
        let log = Arc::new(Mutex::new(Log::default()));
        logs.push((index, log.clone()));
        tasks.push(tokio::spawn(client(shared.clone(), index, log, stop_rx.clone())));
    }
    let mut out = tokio::io::stdout();
    let started_by = Instant::now() + Duration::from_secs(120);
    while shared.started.load(Ordering::SeqCst) < count && Instant::now() < started_by {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let up = shared.up.load(Ordering::SeqCst);
    out.write_all(format!("ready {up} {}\n", count - up).as_bytes()).await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("status") => {
                let (up, gave_up) = (shared.up.load(Ordering::SeqCst), shared.gave_up.load(Ordering::SeqCst));
                out.write_all(format!("status {up} {gave_up}\n").as_bytes()).await?;
                out.flush().await?;
            }
            Some("stop") => {
                let last = words.next().and_then(|w| w.parse::<u64>().ok());
                let _ = stop_tx.send(true);
                for t in tasks.drain(..) {
                    let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
                }
                for (index, log) in &logs {
                    let line = match log.lock() {
                        Ok(l) => summary(*index, groups, last, &l),
                        Err(_) => json!({"i": index, "error": "log poisoned"}),
                    };
                    out.write_all(format!("{line}\n").as_bytes()).await?;
                }
                out.write_all(b"done\n").await?;
                out.flush().await?;
                return Ok(());
            }
            _ => bail!("storm-clients: unknown command {line:?}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tenth_message_goes_to_everyone_and_the_rest_to_each_group_in_turn() {
        let targets: Vec<Option<usize>> = (0..6).map(|s| target(s, 4)).collect();
        assert_eq!(targets, [None, Some(0), Some(1), Some(2), Some(3), Some(0)]);
        let e = BROADCAST_EVERY;
        assert_eq!(target(e - 1, 4), Some((e as usize - 2) % 4));
        assert_eq!(target(e, 4), None);
        assert_eq!(target(e + 1, 4), Some((e as usize - 1) % 4), "the groups' turn goes on past a broadcast");
    }

    #[test]
    fn a_client_counts_what_was_meant_for_it_lost_and_repeated() {
        let l = Log { seqs: vec![0, 1, 1, 3, 8], ..Log::default() };
        // Client 1 of 2 groups is in group 1: meant 0 (to everyone), 2, 4,
        // 6, 8; it got 0 and 8, plus 1 and 3 that were not for it.
        let s = summary(1, 2, Some(8), &l);
        assert_eq!(s["lost"], 3);
        assert_eq!(s["lost_seqs"], json!([2, 4, 6]));
        assert_eq!(s["duplicated"], 1);
        assert_eq!(s["stray"], 2);
        assert_eq!(chat_records("{\"type\":1,\"target\":\"ReceiveGroupMessage\",\"arguments\":[\"g1\",\"u\",\"s7\",\"c\",\"n\",\"5-1\"]}\u{1e}"),
            vec![(Some(7), Some("5-1".to_string()))]);
    }
}
