//! Discovery and failover as a client sees them, the same way for every
//! proxy: start a node and time until a new client is routed to it; then
//! `kill -9` it and, with clients negotiating all along, time until the last
//! client that failed (was routed to the dead node). Switchboard learns of the
//! node from the Redis registry by itself; Traefik's file provider learns of it
//! when the file is rewritten (done at the moment the node starts, as instant
//! automation would) and of its death only from health checks.

use crate::contenders::{self, Proc};
use crate::stats::median;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard_common::token::owner_of;

/// How a proxy learns about nodes.
pub enum Membership<'a> {
    /// Switchboard: the node registers itself in Redis.
    Registry,
    /// Traefik's file provider: the file lists the nodes.
    TraefikFile { dir: &'a Path, nodes: &'a [String] },
}

impl Membership<'_> {
    fn set(&self, extra: Option<&str>) -> Result<()> {
        if let Membership::TraefikFile { dir, nodes } = self {
            let mut all = nodes.to_vec();
            all.extend(extra.map(String::from));
            contenders::traefik_dynamic(dir, &all)?;
        }
        Ok(())
    }
}

pub async fn negotiate_owner(http: &reqwest::Client, url: &str) -> Option<String> {
    let r = http.post(format!("{url}/chathub/negotiate?negotiateVersion=1")).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    v["connectionToken"].as_str().and_then(owner_of)
}

pub struct Setup<'a> {
    pub proxy_url: &'a str,
    pub membership: Membership<'a>,
    pub bin_dir: &'a Path,
    pub work_dir: &'a Path,
    pub redis: &'a str,
}

pub async fn failover(setup: &Setup<'_>, runs: usize, observe: Duration) -> Result<Value> {
    let http = reqwest::Client::new();
    let (mut to_routed, mut last_errors, mut error_counts, mut requests) = (vec![], vec![], vec![], 0u64);
    for run in 0..runs {
        let id = format!("late-{run}-{}", contenders::free_port()?);
        let t0 = Instant::now();
        let mut node = contenders::node(setup.bin_dir, setup.work_dir, setup.redis, &id)?;
        setup.membership.set(Some(&node.url))?;
        let routed = async {
            loop {
                if negotiate_owner(&http, setup.proxy_url).await.as_deref() == Some(id.as_str()) {
                    return t0.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        let routed = tokio::time::timeout(Duration::from_secs(30), routed).await.context("new node never routed")?;
        to_routed.push(routed.as_secs_f64() * 1000.0);
        // Let the node settle into rotation before killing it.
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let (last_error, errors, sent) = kill_and_watch(&mut node.process, setup.proxy_url, observe).await;
        requests += sent;
        last_errors.push(last_error.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0));
        error_counts.push(errors);
        eprintln!(
            "  run {run}: start→routed {:.1} ms; after kill -9: {errors} failed of {sent} new clients, last at {:.0} ms",
            routed.as_secs_f64() * 1000.0,
            last_error.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
        );
        setup.membership.set(None)?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    Ok(json!({
        "runs": runs,
        "start_to_routed_ms": to_routed,
        "median_start_to_routed_ms": median(&mut to_routed.clone()),
        "kill_to_last_failed_client_ms": last_errors,
        "median_kill_to_last_failed_client_ms": median(&mut last_errors.clone()),
        "failed_clients_after_kill": error_counts,
        "clients_after_kill": requests,
        "observe_ms": observe.as_millis() as u64,
    }))
}

/// Kills the node, then runs four clients negotiating in a loop for
/// `observe`; returns when the last one failed, how many failed, and how many
/// were tried.
async fn kill_and_watch(node: &mut Proc, url: &str, observe: Duration) -> (Option<Duration>, u64, u64) {
    let t1 = Instant::now();
    node.kill();
    let last = Arc::new(Mutex::new(None::<Duration>));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (url, last) = (url.to_string(), last.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap_or_default();
            let (mut failed, mut sent) = (0u64, 0u64);
            while t1.elapsed() < observe {
                sent += 1;
                if negotiate_owner(&http, &url).await.is_none() {
                    failed += 1;
                    if let Ok(mut l) = last.lock() {
                        *l = Some(l.map_or(t1.elapsed(), |p| p.max(t1.elapsed())));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (failed, sent)
        }));
    }
    let (mut failed, mut sent) = (0, 0);
    for t in tasks {
        if let Ok((f, s)) = t.await {
            failed += f;
            sent += s;
        }
    }
    let last = last.lock().ok().and_then(|l| *l);
    (last, failed, sent)
}
