//! The `switchboard-balancer` binary: settings from the command line, the
//! environment and the config file, logging, and the process's signals,
//! around `switchboard_balancer::run`.

use clap::Parser;
use std::process::ExitCode;
use switchboard_balancer::config::Cli;
use switchboard_balancer::Shutdown;
use switchboard_common::config::init_logging;

/// jemalloc with background purging returns the memory of closed connections
/// to the OS within seconds; glibc malloc kept ~80 MB after 10,000 clients left.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let upgrade = cli.upgrade;
    let cfg = match cli.resolve() {
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
