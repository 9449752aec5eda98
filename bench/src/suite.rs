//! The whole comparison in one run: start Redis, three Switchboard nodes and
//! every contender on loopback, run each workload through each contender in
//! turn (direct = straight to a node), and return one JSON document with the
//! machine, the versions, the settings and every result. `report` turns it
//! into Markdown and SVG.

use crate::contenders::{self, Running};
use crate::failover::{self, Membership};
use crate::{ceiling, rss, scenarios, setup};
use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Options {
    pub quick: bool,
    pub bin_dir: PathBuf,
    pub traefik: PathBuf,
    pub command_line: String,
}

const FANOUT_RECEIVERS_PER_STEP: usize = 200;
const FANOUT_RATE_PER_SENDER: f64 = 20.0;
const FANOUT_MAX_STEPS: usize = 12;

/// How much of each workload to run.
struct Plan {
    latency: Duration,
    throughput: Duration,
    short: Duration,
    fanout: Duration,
    fanout_receivers: usize,
    idle_counts: Vec<usize>,
    sticky_sessions: usize,
    failover_runs: usize,
    ceiling_step: Duration,
    /// Rounds of 300 sequential Echoes per contender.
    sequential_rounds: usize,
    /// Idle connections held on one node and through one balancer (the last
    /// checkpoint is the most asked for).
    node_checkpoints: Vec<usize>,
    balancer_checkpoints: Vec<usize>,
}

impl Plan {
    fn new(quick: bool) -> Self {
        let s = Duration::from_secs;
        if quick {
            Plan {
                latency: s(4),
                throughput: s(4),
                short: s(3),
                fanout: s(4),
                fanout_receivers: 150,
                idle_counts: vec![1000, 3000],
                sticky_sessions: 30,
                failover_runs: 1,
                ceiling_step: s(2),
                sequential_rounds: 4,
                node_checkpoints: vec![1000, 3000],
                balancer_checkpoints: vec![1000, 3000],
            }
        } else {
            Plan {
                latency: s(10),
                throughput: s(10),
                short: s(8),
                fanout: s(10),
                fanout_receivers: 300,
                idle_counts: vec![1000, 5000, 9000],
                sticky_sessions: 90,
                failover_runs: 5,
                ceiling_step: s(5),
                sequential_rounds: 10,
                // As many as the open-file limit (20,000 here) allows: one
                // descriptor per client on a node, two through a balancer.
                node_checkpoints: vec![1000, 5000, 10000, 19000],
                balancer_checkpoints: vec![1000, 5000, 9500],
            }
        }
    }
}

/// One contender: its name, where clients connect ("direct" is node-1), and
/// the process whose CPU (its own and its descendants') each operation costs.
struct Contender {
    name: &'static str,
    url: String,
    pid: u32,
}

/// Runs `workload` and adds to its result the CPU the contender's processes
/// spent per operation (the count at `ops` in the result, such as
/// `/requests`), split into user and system time. On a shared machine whose
/// speed drifts, this explains a throughput ratio better than the rate does:
/// the kernel's share is much the same for every proxy, the user share is
/// the proxy's own code.
async fn with_cpu(pid: u32, ops: &str, workload: impl std::future::Future<Output = Result<Value>>) -> Result<Value> {
    let before = rss::tree_user_system_ticks(pid);
    let mut result = workload.await?;
    let after = rss::tree_user_system_ticks(pid);
    if let Some(n) = result.pointer(ops).and_then(Value::as_f64).filter(|&n| n > 0.0) {
        let per_op = |ticks: u64| (ticks as f64 / rss::ticks_per_sec() * 1e6 / n * 10.0).round() / 10.0;
        let (user, system) = (after.0.saturating_sub(before.0), after.1.saturating_sub(before.1));
        result["cpu"] = json!({
            "user_us_per_op": per_op(user), "system_us_per_op": per_op(system), "us_per_op": per_op(user + system),
        });
    }
    Ok(result)
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).map(str::trim);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory": mem,
        "kernel": contenders::version_of("uname", &["-sr"]),
        "open_files_limit": contenders::fd_limit(),
    })
}

pub async fn run(opts: &Options) -> Result<Value> {
    contenders::raise_fd_limit();
    let plan = Plan::new(opts.quick);
    let work = std::env::temp_dir().join(format!("switchboard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let (_redis, redis) = contenders::redis(&work)?;
    contenders::wait_redis(&redis).await?;

    let mut nodes: Vec<Running> = Vec::new();
    for i in 1..=3 {
        let node = contenders::node(&opts.bin_dir, &work, &redis, &format!("node-{i}"))?;
        contenders::wait_ok(&format!("{}/health", node.url), Duration::from_secs(20)).await?;
        nodes.push(node);
    }
    let node_urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();

    let switchboard = contenders::switchboard(&opts.bin_dir, &work, &redis)?;
    let traefik_dir = work.join("traefik");
    std::fs::create_dir_all(&traefik_dir)?;
    let traefik = contenders::traefik(&opts.traefik, &traefik_dir, &node_urls)?;
    let nginx = contenders::nginx(&work, &node_urls)?;
    let haproxy = contenders::haproxy(&work, &node_urls)?;
    let proxies: [(&'static str, &Running); 4] =
        [("switchboard", &switchboard), ("traefik", &traefik), ("nginx", &nginx), ("haproxy", &haproxy)];
    for (name, p) in &proxies {
        contenders::wait_ok(&format!("{}/health", p.url), Duration::from_secs(30))
            .await
            .with_context(|| format!("{name} did not come up (logs in {})", work.display()))?;
    }
    // Let health checks see every node before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut contenders = vec![Contender { name: "direct", url: node_urls[0].clone(), pid: nodes[0].process.pid() }];
    contenders.extend(proxies.iter().map(|(name, p)| Contender { name, url: p.url.clone(), pid: p.process.pid() }));

    let mut results = Map::new();
    let r = &mut results;
    eprintln!("1/10 Echo latency at a fixed rate");
    each(r, "echo_latency", &contenders, async |c| scenarios::echo_latency(&c.url, 10, 2000.0, plan.latency, 64).await)
        .await;
    eprintln!("   sequential Echo over one WebSocket each, contenders in turn");
    let urls: Vec<String> = contenders.iter().map(|c| c.url.clone()).collect();
    match scenarios::echo_sequential(&urls, plan.sequential_rounds, 300).await {
        Ok(each) => {
            for (c, v) in contenders.iter().zip(each) {
                put(r, "echo_sequential", c.name, Ok(v));
            }
        }
        Err(e) => {
            for c in &contenders {
                put(r, "echo_sequential", c.name, Err(anyhow::anyhow!("{e:#}")));
            }
        }
    }
    eprintln!("2/10 saturated Echo throughput");
    each(r, "echo_throughput", &contenders, async |c| {
        with_cpu(c.pid, "/messages", scenarios::echo_throughput(&c.url, 32, plan.throughput)).await
    })
    .await;
    eprintln!("4/10 connection setup rate");
    each(r, "connect_rate", &contenders, async |c| {
        with_cpu(c.pid, "/connections", setup::connect_rate(&c.url, 8, plan.short)).await
    })
    .await;
    eprintln!("5/10 plain HTTP GET /health");
    each(r, "http_health", &contenders, async |c| {
        with_cpu(c.pid, "/requests", setup::http_rate(&c.url, 16, plan.short)).await
    })
    .await;
    eprintln!("6/10 broadcast fan-out over three nodes");
    each(r, "fanout", &contenders, async |c| {
        let urls = if c.name == "direct" { node_urls.clone() } else { vec![c.url.clone()] };
        scenarios::fanout(&urls, plan.fanout_receivers, 1, 50.0, plan.fanout, scenarios::Audience::All, &[]).await
    })
    .await;
    eprintln!("8/10 sticky sessions: cookie-less long-polling clients");
    each(r, "sticky_longpolling", &contenders, async |c| {
        setup::sticky_longpolling(&c.url, plan.sticky_sessions, 8).await
    })
    .await;
    eprintln!("3/10 idle connections: resident memory per open WebSocket (a fresh process each time)");
    for &count in &plan.idle_counts {
        each(r, &format!("idle_{count}"), &contenders, async |c| {
            let fresh = fresh_instance(c.name, opts, &work, &redis, &node_urls).await?;
            scenarios::idle(&fresh.url, count, &[fresh.process.pid()], Duration::from_secs(2), false).await
        })
        .await;
    }
    eprintln!("7/10 discovery and failover: Switchboard (Redis registry) and Traefik (file provider)");
    let observe = Duration::from_millis(4 * contenders::CHECK_INTERVAL_MS);
    let sb = failover::Setup {
        proxy_url: &switchboard.url,
        membership: Membership::Registry,
        bin_dir: &opts.bin_dir,
        work_dir: &work,
        redis: &redis,
    };
    put(r, "failover", "switchboard", failover::failover(&sb, plan.failover_runs, observe).await);
    let tf = failover::Setup {
        proxy_url: &traefik.url,
        membership: Membership::TraefikFile { dir: &traefik_dir, nodes: &node_urls },
        bin_dir: &opts.bin_dir,
        work_dir: &work,
        redis: &redis,
    };
    put(r, "failover", "traefik", failover::failover(&tf, plan.failover_runs, observe).await);
    // The ceilings run on clusters of their own, with the contenders stopped.
    drop((switchboard, traefik, nginx, haproxy, nodes));

    eprintln!("9/10 fan-out ceiling: three nodes behind the balancer, load raised until delivery p99 passes 100 ms");
    let fan = ceiling::FanoutCeiling {
        bin_dir: opts.bin_dir.clone(),
        step: plan.ceiling_step,
        max_steps: FANOUT_MAX_STEPS,
        p99_limit: Duration::from_millis(100),
        via_balancer: true,
        receivers_per_step: FANOUT_RECEIVERS_PER_STEP,
        senders_per_step: 1,
        rate_per_sender: FANOUT_RATE_PER_SENDER,
        audience: scenarios::Audience::All,
        redis_cluster: None,
    };
    r.insert("fanout_ceiling".into(), report_line("switchboard", ceiling::fanout_ceiling(&fan).await));
    eprintln!("10/10 idle connections at scale: one node, then one balancer");
    for (key, via_balancer, checkpoints) in [
        ("connections_node", false, &plan.node_checkpoints),
        ("connections_balancer", true, &plan.balancer_checkpoints),
    ] {
        let (max, below) = checkpoints.split_last().map_or((0, &[][..]), |(m, b)| (*m, b));
        let o = ceiling::Connections {
            bin_dir: opts.bin_dir.clone(),
            via_balancer,
            checkpoints: below.to_vec(),
            max,
            clients: 4,
            settle: Duration::from_secs(2),
            step_timeout: Duration::from_secs(240),
        };
        r.insert(key.into(), report_line(key, ceiling::connections(&o).await));
    }

    let versions = json!({
        "switchboard": env!("CARGO_PKG_VERSION"),
        "traefik": contenders::version_of(&opts.traefik.to_string_lossy(), &["version"]).replace("Version:", "").trim().to_string(),
        "nginx": contenders::version_of(&contenders::which("nginx")?.to_string_lossy(), &["-v"]),
        "haproxy": contenders::version_of(&contenders::which("haproxy")?.to_string_lossy(), &["-v"]),
        "redis": contenders::version_of("redis-server", &["--version"]),
    });
    let doc = json!({
        "mode": if opts.quick { "quick" } else { "full" },
        "date": utc_now(),
        "command": opts.command_line,
        "machine": machine(),
        "versions": versions,
        "settings": {
            "nodes": 3,
            "health_check_interval_ms": contenders::CHECK_INTERVAL_MS,
            "health_check_timeout_ms": contenders::CHECK_TIMEOUT_MS,
            "proxy_threads": "2 for every proxy (nginx worker_processes 2, HAProxy nbthread 2, Traefik GOMAXPROCS = 2 cores, Switchboard default)",
            "echo_latency": { "connections": 10, "rate_per_sec": 2000, "payload_bytes": 64, "secs": plan.latency.as_secs() },
            "echo_sequential": { "payload_bytes": 64, "rounds": plan.sequential_rounds, "per_round": 300 },
            "echo_throughput": { "connections": 32, "secs": plan.throughput.as_secs() },
            "connect_rate": { "concurrency": 8, "secs": plan.short.as_secs() },
            "http_health": { "concurrency": 16, "secs": plan.short.as_secs() },
            "fanout": { "receivers": plan.fanout_receivers, "rate_per_sec": 50, "secs": plan.fanout.as_secs() },
            "sticky_longpolling": { "sessions": plan.sticky_sessions, "concurrency": 8 },
            "idle_counts": plan.idle_counts,
            "failover": { "runs": plan.failover_runs, "observe_ms": observe.as_millis() as u64 },
            "fanout_ceiling": { "step_secs": plan.ceiling_step.as_secs(), "receivers_per_step": FANOUT_RECEIVERS_PER_STEP,
                                "rate_per_sender": FANOUT_RATE_PER_SENDER, "max_steps": FANOUT_MAX_STEPS, "p99_limit_ms": 100 },
            "connections": { "node_checkpoints": plan.node_checkpoints, "balancer_checkpoints": plan.balancer_checkpoints, "client_processes": 4 },
        },
        "results": Value::Object(results),
    });
    let _ = std::fs::remove_dir_all(&work);
    Ok(doc)
}

/// A newly started instance of a contender (for "direct", a new node), ready
/// and health-checked, so memory is measured from a clean baseline rather
/// than after pools grown by earlier workloads.
async fn fresh_instance(name: &str, opts: &Options, work: &Path, redis: &str, node_urls: &[String]) -> Result<Running> {
    let fresh = match name {
        "direct" => contenders::node(&opts.bin_dir, work, redis, &format!("fresh-{}", contenders::free_port()?))?,
        "switchboard" => contenders::switchboard(&opts.bin_dir, work, redis)?,
        "traefik" => {
            let dir = work.join(format!("traefik-{}", contenders::free_port()?));
            std::fs::create_dir_all(&dir)?;
            contenders::traefik(&opts.traefik, &dir, node_urls)?
        }
        "nginx" => contenders::nginx(work, node_urls)?,
        "haproxy" => contenders::haproxy(work, node_urls)?,
        other => anyhow::bail!("unknown contender {other}"),
    };
    contenders::wait_ok(&format!("{}/health", fresh.url), Duration::from_secs(30)).await?;
    // One health-check interval, so every node is in rotation.
    tokio::time::sleep(Duration::from_millis(contenders::CHECK_INTERVAL_MS + 200)).await;
    Ok(fresh)
}

/// Runs `workload` through every contender in turn, pausing between them.
async fn each(
    results: &mut Map<String, Value>,
    workload: &str,
    contenders: &[Contender],
    run: impl AsyncFn(&Contender) -> Result<Value>,
) {
    for c in contenders {
        let v = run(c).await;
        put(results, workload, c.name, v);
        settle().await;
    }
}

/// Stores one contender's result of a workload (see `report_line`).
fn put(results: &mut Map<String, Value>, workload: &str, contender: &str, v: Result<Value>) {
    let entry = results.entry(workload.to_string()).or_insert_with(|| json!({}));
    entry[contender] = report_line(contender, v);
}

/// A workload's JSON, or its error as `{ "error": … }` so one failing
/// contender does not lose the others' results; prints a line either way.
fn report_line(name: &str, v: Result<Value>) -> Value {
    match v {
        Ok(v) => {
            eprintln!("  {name:<12} {}", crate::report::one_line(&v));
            v
        }
        Err(e) => {
            eprintln!("  {name:<12} FAILED: {e:#}");
            json!({ "error": format!("{e:#}") })
        }
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(700)).await;
}

/// The date in UTC as YYYY-MM-DD HH:MM:SS, from `date` to avoid a clock crate.
fn utc_now() -> String {
    contenders::version_of("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
}

/// Where a run's report goes: `bench/results/<date>-<mode>/`.
pub fn results_dir(root: &Path, doc: &Value) -> PathBuf {
    let date = doc["date"].as_str().unwrap_or("undated").split(' ').next().unwrap_or("undated").to_string();
    root.join(format!("{date}-{}", doc["mode"].as_str().unwrap_or("run")))
}
