//! Users as addresses, end to end: Microsoft's official browser client
//! (unmodified, `../shared/vendor/`) in headless Chromium, signed in as
//! three users on three real nodes behind the real balancer, over Redis.
//!
//! - A direct message (`SendToUser`) reaches every connection of its
//!   recipient (two tabs, on two nodes) and the sender's other connection,
//!   and neither the sending connection nor a third user.
//! - A recipient tab whose node is killed (`kill -9`) reconnects through the
//!   balancer to another node and, with `Resume(lastId)`, gets exactly the
//!   direct messages it missed, and not the ones between other users.

use serde_json::{json, Value};
use std::time::Duration;
use switchboard_tests::browser::{eval, eval_until, Browser};
use switchboard_tests::official::official_client_page;
use switchboard_tests::{token_signer, RedisServer, TestBalancer, TestNode};

const SECRET: &str = "direct-messages-test-secret-of-32-bytes-or-more";

async fn rec(page: &fantoccini::Client, name: &str) -> Value {
    eval(page, &format!("return window.__sbRec('{name}');")).await
}

/// The texts of the direct messages `name` received, in order.
async fn dms(page: &fantoccini::Client, name: &str) -> Vec<String> {
    let r = rec(page, name).await;
    r["dms"].as_array().unwrap().iter().map(|d| d["message"].as_str().unwrap_or_default().to_string()).collect()
}

async fn wait_dms(page: &fantoccini::Client, name: &str, n: usize) -> Vec<String> {
    let js = format!("const r = window.__sbRec('{name}'); return r.dms.length >= {n} ? r.dms.length : null;");
    eval_until(page, &format!("{name} to receive {n} direct messages"), &js, |v| v.as_u64()).await;
    dms(page, name).await
}

#[tokio::test]
async fn direct_messages_reach_only_their_users_connections_and_survive_a_killed_node() {
    let redis = RedisServer::start();
    let auth = ["--auth", "required", "--auth-secret", SECRET];
    let mut nodes = [
        TestNode::start(&redis, "node-a", &auth).await,
        TestNode::start(&redis, "node-b", &auth).await,
        TestNode::start(&redis, "node-c", &auth).await,
    ];
    let lb = TestBalancer::start(&redis, &[]).await;
    lb.wait_accepting(&["node-a", "node-b", "node-c"]).await;
    let Some(browser) = Browser::start().await else { return };
    let page = official_client_page(&browser, &lb.base).await;
    let signer = token_signer(SECRET);

    // Placed by load (a fresh cookie jar each): bob's two tabs on two nodes.
    let mut placed: Vec<(&str, String)> = Vec::new();
    for (name, user) in [("bob1", "bob"), ("bob2", "bob"), ("ana", "ana"), ("ana2", "ana"), ("cat", "cat")] {
        page.delete_all_cookies().await.expect("clear cookies");
        let token = signer.issue(user, 3600).expect("token");
        // The first retry waits 3 s, so what is sent once the tab noticed its loss is missed live.
        let opts = json!({"url": format!("{}/chathub?messageIds=true", lb.base), "transport": "WebSockets",
            "token": token, "resume": true, "retryDelays": [3000, 500, 500, 1000, 1000, 2000, 2000, 2000]});
        eval(&page, &format!("window.__sbStart('{name}', {opts}); return 1;")).await;
        let js = format!("const r = window.__sbRec('{name}'); return r.state === 'starting' ? null : r;");
        let r = eval_until(&page, &format!("{name} to start"), &js, |v| (!v.is_null()).then(|| v.clone())).await;
        assert_eq!(r["state"], "connected", "{name}: {r}");
        placed.push((name, r["node"].as_str().unwrap_or_default().to_string()));
    }
    eprintln!("placed: {placed:?}");
    let node_of = |name: &str| placed.iter().find(|(n, _)| *n == name).map(|(_, node)| node.clone()).unwrap();
    assert_ne!(node_of("bob1"), node_of("bob2"), "bob's tabs on two nodes: {placed:?}");

    let send = |to: &str, text: &str| format!("window.__sbInvoke('ana', 'SendToUser', ['{to}', '{text}']); return 1;");
    eval(&page, &send("bob", "dm1")).await;
    for name in ["bob1", "bob2", "ana2"] {
        assert_eq!(wait_dms(&page, name, 1).await, ["dm1"], "{name}");
    }
    let r = rec(&page, "bob1").await;
    assert_eq!(r["dms"][0], json!({"user": "ana", "message": "dm1", "to": "bob"}), "{r}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for name in ["ana", "cat"] {
        assert!(dms(&page, name).await.is_empty(), "{name} gets no copy");
    }

    // The node of a bob tab that ana is not on dies; while that tab waits
    // to reconnect, ana writes to bob twice and to cat once.
    let victim = ["bob1", "bob2"].into_iter().find(|b| node_of(b) != node_of("ana")).unwrap();
    let dead = node_of(victim);
    let i = nodes.iter().position(|n| n.id == dead).unwrap();
    nodes[i].process.kill();
    let js = format!("return window.__sbRec('{victim}').reconnecting > 0 ? 1 : null;");
    eval_until(&page, &format!("{victim} to notice"), &js, |v| v.as_u64()).await;
    eval(&page, &send("bob", "dm2")).await;
    eval(&page, &send("cat", "for cat")).await;
    eval(&page, &send("bob", "dm3")).await;
    assert_eq!(wait_dms(&page, victim, 3).await, ["dm1", "dm2", "dm3"], "{victim}: missed ones replayed, in order");
    eval(&page, &format!("window.__sbInvoke('{victim}', 'GetNodeInfo', []); return 1;")).await;
    let js = format!("const n = window.__sbRec('{victim}').node; return n === '{dead}' ? null : n;");
    let now =
        eval_until(&page, &format!("{victim} to say where it is now"), &js, |v| v.as_str().map(String::from)).await;
    eprintln!("{victim} moved from {dead} to {now}");
    let other = if victim == "bob1" { "bob2" } else { "bob1" };
    assert_eq!(wait_dms(&page, other, 3).await, ["dm1", "dm2", "dm3"]);
    assert_eq!(wait_dms(&page, "cat", 1).await, ["for cat"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = rec(&page, victim).await;
    assert_eq!(r["resumed"], 2, "Resume replayed dm2 and dm3 and not cat's: {r}");
    assert_eq!(dms(&page, victim).await, ["dm1", "dm2", "dm3"], "none twice");
    assert_eq!(dms(&page, "ana2").await, ["dm1", "dm2", "for cat", "dm3"], "the sender's other tab");
    assert!(dms(&page, "ana").await.is_empty());
    for name in ["bob1", "bob2", "ana", "ana2", "cat"] {
        assert_eq!(rec(&page, name).await["errors"], json!([]), "{name}");
    }
}
