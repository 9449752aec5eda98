//! Rates of short things: SignalR connection setup (negotiate + WebSocket
//! upgrade + handshake, then close) per second, and plain `GET /health` over
//! keep-alive connections per second, each with a latency histogram. Closed
//! loops of `concurrency` workers for a fixed duration.

use crate::signalr;
use crate::stats::{histogram, record, summarize};
use anyhow::Result;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::future::Future;
use std::time::{Duration, Instant};

/// Runs `concurrency` workers, each with its own `client()`, repeating `step`
/// until `duration` is over. A step returns its latency, or `None` when it
/// failed. Returns the merged latencies, the failures and the elapsed seconds.
async fn closed_loop<C, F, Fut>(
    concurrency: usize,
    duration: Duration,
    client: impl Fn() -> Result<C>,
    step: F,
) -> Result<(Histogram<u64>, u64, f64)>
where
    C: Clone + Send + 'static,
    F: Fn(C) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Option<Duration>> + Send,
{
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (c, step) = (client()?, step.clone());
        tasks.push(tokio::spawn(async move {
            let (mut h, mut failed) = (histogram(), 0u64);
            while Instant::now() < end {
                match step(c.clone()).await {
                    Some(latency) => record(&mut h, latency),
                    None => failed += 1,
                }
            }
            (h, failed)
        }));
    }
    let (mut all, mut failed) = (histogram(), 0);
    for t in tasks {
        let (h, f) = t.await?;
        all.add(h)?;
        failed += f;
    }
    Ok((all, failed, started.elapsed().as_secs_f64()))
}

/// Connections set up per second; each worker connects, handshakes, closes,
/// and starts over.
pub async fn connect_rate(url: &str, concurrency: usize, duration: Duration) -> Result<Value> {
    let target = url.to_string();
    let (all, failed, secs) = closed_loop(
        concurrency,
        duration,
        || Ok(reqwest::Client::new()),
        move |http| {
            let url = target.clone();
            async move {
                let t = Instant::now();
                let mut sock = signalr::connect(&http, &url).await.ok()?;
                let latency = t.elapsed();
                let _ = sock.ws.close(None).await;
                Some(latency)
            }
        },
    )
    .await?;
    Ok(json!({
        "url": url, "concurrency": concurrency, "connections": all.len(), "failed": failed,
        "connections_per_sec": (all.len() as f64 / secs).round(), "setup_latency": summarize(&all),
    }))
}

/// `GET {url}/health` requests per second over `concurrency` keep-alive
/// connections (one HTTP client, and so one pooled connection, per worker).
pub async fn http_rate(url: &str, concurrency: usize, duration: Duration) -> Result<Value> {
    let target = format!("{url}/health");
    let (all, failed, secs) = closed_loop(
        concurrency,
        duration,
        || Ok(reqwest::Client::builder().pool_max_idle_per_host(1).build()?),
        move |http| {
            let target = target.clone();
            async move {
                let t = Instant::now();
                let r = http.get(&target).send().await.ok().filter(|r| r.status().is_success())?;
                let _ = r.bytes().await;
                Some(t.elapsed())
            }
        },
    )
    .await?;
    Ok(json!({
        "url": url, "concurrency": concurrency, "requests": all.len(), "failed": failed,
        "requests_per_sec": (all.len() as f64 / secs).round(), "latency": summarize(&all),
    }))
}

/// The sticky-session check: `sessions` cookie-less long-polling clients
/// (negotiate v1 and v0 alternately), `concurrency` at a time; the share that
/// completed, and which nodes served them.
pub async fn sticky_longpolling(url: &str, sessions: usize, concurrency: usize) -> Result<Value> {
    use futures_util::stream::{self, StreamExt};
    let results: Vec<Result<Option<String>>> = stream::iter(0..sessions)
        .map(|i| {
            let url = url.to_string();
            async move {
                // A fresh client per session: distinct third-party clients.
                let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
                signalr::longpoll_echo(&http, &url, if i % 2 == 0 { 1 } else { 0 }).await
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut per_node = std::collections::BTreeMap::<String, u64>::new();
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    for r in &results {
        match r {
            Ok(node) => *per_node.entry(node.clone().unwrap_or_else(|| "?".into())).or_default() += 1,
            Err(e) => *errors.entry(first_words(&format!("{e:#}"))).or_default() += 1,
        }
    }
    let ok: u64 = per_node.values().sum();
    Ok(json!({
        "url": url, "sessions": sessions, "succeeded": ok,
        "success_share": ok as f64 / sessions.max(1) as f64,
        "nodes_used": per_node, "errors": errors,
    }))
}

/// The start of an error message, for grouping similar failures.
fn first_words(e: &str) -> String {
    e.chars().take(60).collect()
}
