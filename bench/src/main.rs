//! `switchboard-bench`: measurements of Switchboard on loopback. `suite` runs
//! the whole comparison (direct, Switchboard, Traefik, nginx, HAProxy) and
//! writes the report; the other subcommands run one workload against URLs
//! you give, printing a human line on stderr and JSON on stdout.

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
    /// Messages per second Redis stores and publishes: the old PUBLISH+XADD
    /// pipeline against the atomic store-and-publish script
    StoreCost {
        #[arg(long)]
        redis: String,
        #[arg(long, default_value_t = 100_000)]
        count: usize,
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
    /// Broadcast fan-out across nodes: deliveries per second and latency
    Fanout {
        /// Comma-separated base URLs (receivers are spread over them; the sender uses the first)
        #[arg(long, value_delimiter = ',')]
        urls: Vec<String>,
        #[arg(long, default_value_t = 300)]
        receivers: usize,
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration_secs: f64,
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
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()?.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
            };
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
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()?.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
            };
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
        Command::StoreCost { redis, count } => store_cost::run(&redis, count).await?,
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
        Command::Fanout { urls, receivers, rate, duration_secs } => {
            scenarios::fanout(&urls, receivers, rate, secs(duration_secs)).await?
        }
        Command::Discovery { balancer, admin, redis, node_bin, runs } => {
            scenarios::discovery(&balancer, &admin, &redis, &node_bin, runs).await?
        }
    };
    println!("{result}");
    Ok(())
}

/// report.md, latency.svg and memory.svg next to results.json.
fn write_report(dir: &std::path::Path, doc: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(dir.join("report.md"), report::markdown(doc))?;
    let (latency, memory) = report::plots(doc);
    std::fs::write(dir.join("latency.svg"), latency)?;
    std::fs::write(dir.join("memory.svg"), memory)?;
    Ok(())
}
