//! The `switchboard-balancer` binary: settings from the command line, the
//! environment and the config file, logging, and the process's signals,
//! around `switchboard_balancer::run`.

use clap::Parser;
use std::process::ExitCode;
use switchboard_balancer::config::{BalancerConfig, Cli};
use switchboard_balancer::Shutdown;
use switchboard_common::config::init_logging;

/// jemalloc with background purging returns the memory of closed connections
/// to the OS within seconds; glibc malloc kept ~80 MB after 10,000 clients left.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

/// `--check-config`: the settings and the TLS files they name, without
/// starting anything; prints them with secrets masked.
fn check_config(resolved: Result<BalancerConfig, String>) -> ExitCode {
    let report = resolved.and_then(|cfg| {
        switchboard_balancer::check_files(&cfg)?;
        cfg.masked()
    });
    switchboard_common::config::finish_check("switchboard-balancer", report)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (upgrade, check) = (cli.upgrade, cli.check_config);
    let checked = cli.resolve().map_err(|e| e.to_string());
    if check {
        return check_config(checked);
    }
    let cfg = match checked {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard-balancer: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.log_format);
    match switchboard_balancer::run(cfg, upgrade, Shutdown::Signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard-balancer: {e}");
            ExitCode::from(2)
        }
    }
}
