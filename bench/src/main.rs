//! `switchboard-bench`: measurements of Switchboard on loopback. `suite` runs
//! the whole comparison (direct, Switchboard, Traefik, nginx, HAProxy) and
//! writes the report; the other subcommands run one workload against URLs
//! you give, printing a human line on stderr and JSON on stdout.

mod api_send;
mod ceiling;
mod chaos;
mod contenders;
mod failover;
mod report;
mod rss;
mod scenarios;
mod setup;
mod signalr;
mod stats;
mod store_cost;
mod storm;
mod storm_clients;
mod suite;
mod svg;
mod tls;

use clap::{Parser, Subcommand};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "switchboard-bench", version, about = "Measure Switchboard nodes and proxies on loopback")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every workload through every contender, started here on loopback; writes
    /// results.json, report.md and SVG plots under --out/<date>-<mode>/
    Suite {
        /// Short durations and counts (finishes in a few minutes)
        #[arg(long)]
        quick: bool,
        /// Where switchboard-node and switchboard-balancer are (default: next to this program)
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// The traefik binary (scripts/bench.sh installs the pinned one in a venv)
        #[arg(long)]
        traefik: std::path::PathBuf,
        #[arg(long, default_value = "bench/results")]
        out: std::path::PathBuf,
        /// The command line to record in the report (scripts/bench.sh passes its own)
        #[arg(long)]
        command_line: Option<String>,
    },
    /// Redis, four nodes and the balancer on loopback while parts fail in turn
    /// (drain, kill -9, balancer restart, Redis stop, Redis pause, scale-in);
    /// counts what every client lost and received twice. Exits non-zero when a
    /// resuming client lost or repeated anything, or anyone did to Redis.
    Chaos {
        /// Short outages and pauses (about a minute in all)
        #[arg(long)]
        quick: bool,
        /// Where switchboard-node and switchboard-balancer are (default: next to this program)
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// Clients of each kind (resuming, plain) through the balancer
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Messages per second from the sender
        #[arg(long, default_value_t = 40.0)]
        rate: f64,
        /// Print the balancer's URL and wait this long before sending (for outside clients)
        #[arg(long, default_value_t = 0.0)]
        hold_secs: f64,
    },
    /// A node holding thousands of clients is killed, comes back, and another
    /// drains: Redis, three nodes and two balancers on loopback, N idle
    /// WebSocket clients per node that reconnect like the official client and
    /// resume; how long until they are back, who gave up, what was lost, the
    /// Echo latency of undisturbed clients and every process's CPU. Exits
    /// non-zero when a client gave up, was not back, or lost or repeated a message.
    Storm {
        /// A few hundred clients and short drains (about a minute in all)
        #[arg(long)]
        quick: bool,
        /// Where switchboard-node and switchboard-balancer are (default: next to this program)
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// Clients per node [default: 5000, or 100 with --quick]
        #[arg(long)]
        per_node: Option<usize>,
        /// Groups the clients are spread over
        #[arg(long, default_value_t = 50)]
        groups: usize,
        /// Messages per second from the sender
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// The nodes' drain_spread_secs [default: theirs]
        #[arg(long)]
        drain_spread_secs: Option<f64>,
        /// Write report.md, results.json and plots under OUT/<date>-storm[-quick]/
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// The command line to record in the report
        #[arg(long)]
        command_line: Option<String>,
    },
    /// (Used by `storm`.) Clients that reconnect like the official client, driven over stdin
    #[command(hide = true)]
    StormClients {
        #[arg(long, value_delimiter = ',')]
        balancers: Vec<String>,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        source: std::net::IpAddr,
        #[arg(long)]
        groups: usize,
    },
    /// Messages per second Redis stores and publishes: the old PUBLISH+XADD
    /// pipeline against the atomic store-and-publish script
    StoreCost {
        #[arg(long)]
        redis: String,
        #[arg(long, default_value_t = 100_000)]
        count: usize,
    },
    /// What a send through the server API costs: Redis, three nodes with an
    /// access key and the balancer on loopback, N WebSocket clients, and a
    /// backend POSTing /api/hubs/chathub/:send through the balancer: sends per
    /// second closed loop (and CPU per send of every process), then delivery
    /// latency to every client at a fixed rate. Prints JSON.
    ApiSend {
        /// Where switchboard-node and switchboard-balancer are (default: next to this program)
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Concurrent senders in the closed loop
        #[arg(long, default_value_t = 8)]
        senders: usize,
        #[arg(long, default_value_t = 10)]
        closed_secs: u64,
        /// Sends per second in the fixed-rate phase
        #[arg(long, default_value_t = 20)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        rate_secs: u64,
    },
    /// Rewrite report.md and the plots of an earlier run from its results.json
    Report { results: std::path::PathBuf },
    /// Open N idle SignalR WebSockets to URL; report RSS gained per connection by each PID
    Idle {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Processes to measure (node, proxy…)
        #[arg(long = "pid")]
        pids: Vec<u32>,
        #[arg(long, default_value_t = 3.0)]
        settle_secs: f64,
        /// Ask for stateful reconnect (SignalR 8) on every connection
        #[arg(long)]
        stateful: bool,
    },
    /// Echo round-trip latency at a fixed total rate
    Latency {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10)]
        connections: usize,
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration_secs: f64,
        #[arg(long, default_value_t = 64)]
        payload_bytes: usize,
    },
    /// Saturated closed-loop Echo throughput
    Throughput {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 10.0)]
        duration_secs: f64,
    },
    /// New connections per second, each one `GET /health` and closed: over
    /// TLS (a full handshake each, no resumption) for https:// URLs, plain TCP for http://
    Handshakes {
        /// Repeat to measure several URLs in one run
        #[arg(long = "url")]
        urls: Vec<String>,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        duration_secs: f64,
    },
    /// Keep-alive `GET /health` requests per second and latency
    Http {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        duration_secs: f64,
    },
    /// SignalR connections set up per second (negotiate, WebSocket, handshake,
    /// close), as the suite's connection setup rate
    Setups {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        duration_secs: f64,
    },
    /// Sequential Echo over one WebSocket per URL, the URLs taken in turn
    Sequential {
        /// Repeat to measure several URLs in one run
        #[arg(long = "url")]
        urls: Vec<String>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 300)]
        per_round: usize,
    },
    /// Broadcast fan-out across nodes: deliveries per second and latency
    Fanout {
        /// Comma-separated base URLs (receivers and senders are spread over them in turn)
        #[arg(long, value_delimiter = ',')]
        urls: Vec<String>,
        #[arg(long, default_value_t = 300)]
        receivers: usize,
        #[arg(long, default_value_t = 1)]
        senders: usize,
        /// Messages per second from each sender
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration_secs: f64,
    },
    /// Redis, three nodes and the balancer on loopback under growing broadcast
    /// or group load (step k: k × receivers-per-step receivers, k ×
    /// senders-per-step senders) until delivery p99 passes the limit or
    /// deliveries go missing; CPU of every process per step
    FanoutCeiling {
        /// Where switchboard-node and switchboard-balancer are (default: next to this program)
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 5.0)]
        step_secs: f64,
        #[arg(long, default_value_t = 12)]
        max_steps: usize,
        #[arg(long, default_value_t = 100)]
        p99_limit_ms: u64,
        #[arg(long, default_value_t = 200)]
        receivers_per_step: usize,
        /// Messages per second from each sender
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Senders added at each step
        #[arg(long, default_value_t = 1)]
        senders_per_step: usize,
        /// Send to this many groups (receiver i joins group i mod N) instead of broadcasting
        #[arg(long)]
        groups: Option<usize>,
        /// Connect straight to the nodes instead of through the balancer
        #[arg(long)]
        direct: bool,
        /// Run on a Redis Cluster of this many masters (no replicas) instead of one Redis
        #[arg(long)]
        redis_cluster: Option<usize>,
    },
    /// As many idle SignalR WebSockets as the open-file limit allows, on one
    /// node or through one balancer, opened by several client processes from
    /// 127.0.0.2, .3, …; resident memory per connection at each checkpoint
    Connections {
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// Through a balancer (in front of two nodes) instead of on one node
        #[arg(long)]
        balancer: bool,
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
        checkpoints: Vec<usize>,
        /// The last checkpoint: stops earlier if no more connections open
        #[arg(long, default_value_t = 19000)]
        max: usize,
        /// Client processes (each from its own source address)
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long, default_value_t = 3.0)]
        settle_secs: f64,
    },
    /// (Used by `connections`.) Holds idle connections from one source address as told on stdin
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        url: String,
        #[arg(long)]
        source: std::net::IpAddr,
    },
    /// Node start → first routed client, and kill -9 → out of rotation, through a balancer
    Discovery {
        #[arg(long)]
        balancer: String,
        #[arg(long)]
        admin: String,
        #[arg(long)]
        redis: String,
        #[arg(long)]
        node_bin: String,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64;
    let result = match Cli::parse().command {
        Command::Suite { quick, bin_dir, traefik, out, command_line } => {
            let bin_dir = bin_dir_or_default(bin_dir)?;
            let command_line = command_line.unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
            let doc = suite::run(&suite::Options { quick, bin_dir, traefik, command_line }).await?;
            let dir = suite::results_dir(&out, &doc);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&doc)?)?;
            write_report(&dir, &doc)?;
            eprintln!("report written to {}", dir.join("report.md").display());
            return Ok(());
        }
        Command::Chaos { quick, bin_dir, clients, rate, hold_secs } => {
            let bin_dir = bin_dir_or_default(bin_dir)?;
            let hold = secs(hold_secs);
            let result = chaos::run(&chaos::Options { quick, bin_dir, clients, rate, hold }).await?;
            eprintln!("{}", chaos::table(&result));
            println!("{}", serde_json::to_string_pretty(&result)?);
            let failures = result["failures"].as_array().map_or(0, |f| f.len());
            if failures > 0 {
                eprintln!("chaos: FAILED: {}", result["failures"]);
                std::process::exit(1);
            }
            return Ok(());
        }
        Command::Storm { quick, bin_dir, per_node, groups, rate, drain_spread_secs, out, command_line } => {
            let bin_dir = bin_dir_or_default(bin_dir)?;
            let command_line = command_line.unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
            let per_node = per_node.unwrap_or(if quick { 100 } else { 5000 });
            let o = storm::Options { quick, bin_dir, per_node, groups, rate, drain_spread_secs, command_line };
            let result = storm::run(&o).await?;
            let report = storm::markdown(&result);
            eprintln!("{report}");
            if let Some(out) = out {
                let date = result["date"].as_str().unwrap_or("undated");
                let dir = out.join(format!("{date}-storm{}", if quick { "-quick" } else { "" }));
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&result)?)?;
                std::fs::write(dir.join("report.md"), report)?;
                for (name, svg) in storm::plots(&result) {
                    std::fs::write(dir.join(name), svg)?;
                }
                eprintln!("report written to {}", dir.join("report.md").display());
            }
            println!("{}", serde_json::to_string(&result)?);
            if result["failures"].as_array().is_some_and(|f| !f.is_empty()) {
                eprintln!("storm: FAILED: {}", result["failures"]);
                std::process::exit(1);
            }
            return Ok(());
        }
        Command::StormClients { balancers, count, first, source, groups } => {
            storm_clients::run(balancers, count, first, source, groups).await?;
            return Ok(());
        }
        Command::StoreCost { redis, count } => store_cost::run(&redis, count).await?,
        Command::ApiSend { bin_dir, clients, senders, closed_secs, rate, rate_secs } => {
            let opts = api_send::Options { clients, senders, closed_secs, rate, rate_secs };
            api_send::run(&bin_dir_or_default(bin_dir)?, &opts).await?
        }
        Command::Report { results } => {
            let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&results)?)?;
            let dir = results.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            write_report(&dir, &doc)?;
            return Ok(());
        }
        Command::Idle { url, count, pids, settle_secs, stateful } => {
            scenarios::idle(&url, count, &pids, secs(settle_secs), stateful).await?
        }
        Command::Latency { url, connections, rate, duration_secs, payload_bytes } => {
            scenarios::echo_latency(&url, connections, rate, secs(duration_secs), payload_bytes).await?
        }
        Command::Throughput { url, connections, duration_secs } => {
            scenarios::echo_throughput(&url, connections, secs(duration_secs)).await?
        }
        Command::Handshakes { urls, concurrency, duration_secs } => {
            let mut each = Vec::new();
            for url in &urls {
                each.push(scenarios::new_connections(url, concurrency, secs(duration_secs)).await?);
            }
            serde_json::Value::Array(each)
        }
        Command::Http { url, concurrency, duration_secs } => {
            setup::http_rate(&url, concurrency, secs(duration_secs)).await?
        }
        Command::Setups { url, concurrency, duration_secs } => {
            setup::connect_rate(&url, concurrency, secs(duration_secs)).await?
        }
        Command::Sequential { urls, rounds, per_round } => {
            serde_json::Value::Array(scenarios::echo_sequential(&urls, rounds, per_round).await?)
        }
        Command::Fanout { urls, receivers, senders, rate, duration_secs } => {
            scenarios::fanout(&urls, receivers, senders, rate, secs(duration_secs), scenarios::Audience::All, &[])
                .await?
        }
        Command::FanoutCeiling {
            bin_dir,
            step_secs,
            max_steps,
            p99_limit_ms,
            receivers_per_step,
            rate,
            senders_per_step,
            groups,
            direct,
            redis_cluster,
        } => {
            let o = ceiling::FanoutCeiling {
                bin_dir: bin_dir_or_default(bin_dir)?,
                step: secs(step_secs),
                max_steps,
                p99_limit: Duration::from_millis(p99_limit_ms),
                via_balancer: !direct,
                receivers_per_step,
                senders_per_step,
                rate_per_sender: rate,
                audience: groups.map_or(scenarios::Audience::All, scenarios::Audience::Groups),
                redis_cluster,
            };
            ceiling::fanout_ceiling(&o).await?
        }
        Command::Connections { bin_dir, balancer, checkpoints, max, clients, settle_secs } => {
            let o = ceiling::Connections {
                bin_dir: bin_dir_or_default(bin_dir)?,
                via_balancer: balancer,
                checkpoints,
                max,
                clients,
                settle: secs(settle_secs),
                step_timeout: Duration::from_secs(300),
            };
            ceiling::connections(&o).await?
        }
        Command::Hold { url, source } => {
            ceiling::hold(&url, source).await?;
            return Ok(());
        }
        Command::Discovery { balancer, admin, redis, node_bin, runs } => {
            scenarios::discovery(&balancer, &admin, &redis, &node_bin, runs).await?
        }
    };
    println!("{result}");
    Ok(())
}

/// `--bin-dir`, or the directory of this program (where cargo puts the
/// node and the balancer too).
fn bin_dir_or_default(bin_dir: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    match bin_dir {
        Some(d) => Ok(d),
        None => Ok(std::env::current_exe()?.parent().map(|p| p.to_path_buf()).unwrap_or_default()),
    }
}

/// report.md, latency.svg and memory.svg next to results.json.
fn write_report(dir: &std::path::Path, doc: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(dir.join("report.md"), report::markdown(doc))?;
    for (name, svg) in report::plots(doc) {
        std::fs::write(dir.join(name), svg)?;
    }
    Ok(())
}
