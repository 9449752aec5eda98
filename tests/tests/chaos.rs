//! A short run of `switchboard-bench chaos --quick`: Redis, four nodes and
//! the balancer while a node drains, a node is killed, the balancer restarts,
//! Redis stops and is paused, and a node is scaled in, with resuming and
//! plain clients through the balancer under a steady 40 messages/s. The
//! command checks every client's messages and exits non-zero when a resuming
//! client lost or repeated one, or any client did to Redis; its table is
//! printed with the test's output.

use std::process::Command;
use switchboard_tests::process::{binary, target_dir};

#[test]
fn the_chaos_run_loses_and_repeats_nothing_for_resuming_clients() {
    let bench = binary("switchboard-bench");
    let out = Command::new(&bench)
        .args(["chaos", "--quick", "--bin-dir"])
        .arg(target_dir())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bench.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "chaos run failed:\n{stderr}");
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the run's JSON");
    assert!(result["sent"].as_u64().unwrap_or(0) > 500, "{result}");
    let rows = result["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 14, "seven phases for two kinds of client");
    // The contrast the resuming clients are there for: plain clients lose
    // what is sent while the balancer restarts.
    let plain_restart = rows.iter().find(|r| r["clients"] == "plain" && r["event"] == "restart balancer").unwrap();
    assert!(plain_restart["lost"].as_u64().unwrap_or(0) > 0, "{plain_restart}");
}
