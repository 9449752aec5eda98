//! The `switchboard-node` binary: settings from the command line, the
//! environment and the config file, logging, the listening socket and the
//! process's signals, around `switchboard_node::run`.

use clap::Parser;
use std::process::ExitCode;
use switchboard_common::config::init_logging;
use switchboard_node::auth::{parse_ttl, Auth};
use switchboard_node::config::{Cli, Command, NodeConfig};

/// `switchboard-node token --user NAME --ttl 1h`: prints a token signed with
/// the configured secret.
fn print_token(cfg: &NodeConfig, user: &str, ttl: &str) -> ExitCode {
    let signed = parse_ttl(ttl).and_then(|secs| Auth::from_config(cfg)?.issue(user, secs));
    match signed {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchboard-node token: {e}");
            ExitCode::from(2)
        }
    }
}

/// jemalloc with background purging returns the memory of closed connections
/// to the OS within seconds; glibc malloc kept ~80 MB after 10,000 clients left.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

#[tokio::main]
async fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let command = cli.command.take();
    if cli.check_config {
        // `resolve` validates everything, key files included.
        let report = cli.resolve().map_err(|e| e.to_string()).and_then(|c| c.masked());
        return switchboard_common::config::finish_check("switchboard-node", report);
    }
    let cfg = match cli.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard-node: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Token { user, ttl }) = command {
        return print_token(&cfg, &user, &ttl);
    }
    init_logging(cfg.log_format);
    let listen = cfg.listen;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("switchboard-node: cannot listen on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    match switchboard_node::run(listener, cfg, switchboard_node::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard-node: {e}");
            ExitCode::from(2)
        }
    }
}
