//! SignalR clients from PyPI (signalrcore and pysignalr, installed by
//! scripts/test.sh into a virtual environment) on every transport and
//! protocol they support, straight to a node and through the balancer. Both
//! negotiate without `negotiateVersion` (version 0), and signalrcore then
//! sends handshake version 0, which the official server accepts. The cases
//! live in `tests/python/third_party_clients.py`; this test starts the
//! cluster, runs it once per URL and checks every case.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use switchboard_tests::{py_env_python as python, RedisServer, TestBalancer, TestNode};

fn run_cases(python: &PathBuf, url: &str, label: &str) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/third_party_clients.py");
    let out = Command::new(python)
        .args([script, "--url", url, "--label", label])
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let cases: Vec<Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        cases.len() >= 6,
        "{label}: {} cases reported\nstdout:\n{stdout}\nstderr:\n{}",
        cases.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    cases
}

#[tokio::test]
async fn python_signalr_clients_work_directly_and_through_the_balancer() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start();
    // A short keep-alive: signalrcore's stop() waits for the next event on
    // its Server-Sent Events stream, which is the next Ping.
    let args = ["--keepalive-secs", "1"];
    let node_a = TestNode::start(&redis, "node-a", &args).await;
    let _node_b = TestNode::start(&redis, "node-b", &args).await;
    let lb = TestBalancer::start(&redis, &[]).await;
    lb.wait_accepting(&["node-a", "node-b"]).await;

    let python2 = python.clone();
    let direct_url = format!("{}/chathub", node_a.base);
    let balanced_url = format!("{}/chathub", lb.base);
    let (direct, balanced) = tokio::task::spawn_blocking(move || {
        (run_cases(&python2, &direct_url, "direct"), run_cases(&python2, &balanced_url, "balancer"))
    })
    .await
    .unwrap();
    let mut failures = Vec::new();
    for case in direct.iter().chain(&balanced) {
        eprintln!(
            "{:<9} {:<12} {:<17} {:<12} {}",
            case["label"].as_str().unwrap_or(""),
            case["client"].as_str().unwrap_or(""),
            case["transport"].as_str().unwrap_or(""),
            case["protocol"].as_str().unwrap_or(""),
            if case["ok"] == true { "pass".to_string() } else { format!("FAIL: {}", case["error"]) }
        );
        if case["ok"] != true {
            failures.push(case.clone());
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(direct.len(), balanced.len());
}
