//! `switchboard-bench`: measurements of Switchboard on loopback — idle memory
//! per connection, `Echo` latency and throughput, cross-node broadcast
//! fan-out, and discovery/failover times. Each subcommand prints a human line
//! on stderr and one JSON document on stdout for the report.

mod rss;
mod scenarios;
mod signalr;
mod stats;

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
        Command::Idle { url, count, pids, settle_secs } => {
            scenarios::idle(&url, count, &pids, secs(settle_secs)).await?
        }
        Command::Latency { url, connections, rate, duration_secs, payload_bytes } => {
            scenarios::echo_latency(&url, connections, rate, secs(duration_secs), payload_bytes).await?
        }
        Command::Throughput { url, connections, duration_secs } => {
            scenarios::echo_throughput(&url, connections, secs(duration_secs)).await?
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
