//! A short run of `switchboard-bench storm --quick`: Redis, three nodes and
//! two balancers, 100 idle WebSocket clients per node that reconnect like
//! Microsoft's official client (at once, then 2 s, 10 s, 30 s) and resume,
//! while a sender on an undisturbed node sends to everyone and to the
//! clients' groups. A node is killed (`kill -9`), comes back, and another
//! drains. The command exits non-zero when a client gave up, was not back,
//! or lost or repeated a message; this test also checks each event really
//! took clients away and where they went.

use serde_json::Value;
use std::time::Duration;
use switchboard_tests::process::{binary, target_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_of_a_killed_or_drained_node_comes_back_and_resuming_clients_lose_and_repeat_nothing() {
    let bench = binary("switchboard-bench");
    let run = tokio::process::Command::new(&bench)
        .args(["storm", "--quick", "--per-node", "100", "--bin-dir"])
        .arg(target_dir())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the storm run ended within 5 minutes")
        .unwrap_or_else(|e| panic!("run {}: {e}", bench.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "the storm run failed:\n{stderr}");
    let result: Value = serde_json::from_slice(&out.stdout).expect("the run's JSON");
    assert_eq!(result["clients"], 300, "{}", result["clients"]);
    assert!(result["failures"].as_array().is_some_and(|f| f.is_empty()), "{}", result["failures"]);
    let event = |name: &str| {
        result["events"].as_array().and_then(|e| e.iter().find(|e| e["event"] == name)).cloned().expect(name)
    };
    // kill -9 of n3: its 100 clients (n3 gets about a third) lose their
    // connection, all come back, on the two nodes left.
    let kill = event("kill -9");
    let affected = kill["affected"].as_u64().unwrap_or(0);
    assert!((60..=140).contains(&affected), "{kill}");
    assert!(kill["back_ms"]["p100"].as_u64().is_some(), "{kill}");
    assert!(kill["moved_to"].get("n3").is_none(), "nobody goes back to the dead node: {kill}");
    // The drain of n1: every client it held comes back elsewhere.
    let drain = event("drain");
    assert!(drain["affected"].as_u64().unwrap_or(0) >= 60, "{drain}");
    assert!(drain["back_ms"]["p100"].as_u64().is_some(), "{drain}");
    assert!(drain["moved_to"].get("n1").is_none(), "nobody goes back to the draining node: {drain}");
    let m = &result["messages"];
    assert!(m["sent"].as_u64().unwrap_or(0) >= 50, "{m}");
    for k in ["lost", "duplicated", "stray", "resume_errors"] {
        assert_eq!(m[k], 0, "{k}: {m}");
    }
}
