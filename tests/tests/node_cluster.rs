//! Two or more nodes sharing one Redis behave as one chat: messages and group
//! messages reach every intended client on every node exactly once with the
//! sender's ids, history is shared, the registry lists live nodes, a Redis
//! outage is survived, and SIGTERM drains without losing messages.

use redis::AsyncCommands;
use serde_json::{json, Value};
use std::time::Duration;
use switchboard_tests::{
    eventually, get_json, get_text, metric_nonzero, wait_for_status, HubClient, RedisServer, TestNode, TransportKind,
    ALL_TRANSPORTS, WAIT,
};

async fn two_nodes() -> (RedisServer, TestNode, TestNode, reqwest::Client) {
    let redis = RedisServer::start();
    let a = TestNode::start(&redis, "node-a", &[]).await;
    let b = TestNode::start(&redis, "node-b", &[]).await;
    (redis, a, b, reqwest::Client::new())
}

/// Waits until both nodes' backplanes are subscribed (a broadcast crosses).
async fn wait_backplane(http: &reqwest::Client, a: &TestNode, b: &TestNode) {
    let mut ca = HubClient::connect(http, &a.base, TransportKind::WebSockets).await.unwrap();
    let cb = HubClient::connect(http, &b.base, TransportKind::WebSockets).await.unwrap();
    for i in 0..100 {
        cb.send("SendMessage", vec![json!("probe"), json!(format!("probe-{i}"))]).await;
        if ca.expect_event("ReceiveMessage", Duration::from_millis(200)).await.is_some() {
            return;
        }
    }
    panic!("backplane never connected the two nodes");
}

#[tokio::test]
async fn a_message_sent_on_one_node_reaches_clients_on_both_over_every_transport() {
    let (_redis, a, b, http) = two_nodes().await;
    wait_backplane(&http, &a, &b).await;
    for kind in ALL_TRANSPORTS {
        let mut on_a = HubClient::connect(&http, &a.base, kind).await.unwrap();
        let mut on_b = HubClient::connect(&http, &b.base, kind).await.unwrap();
        let text = format!("hello over {kind:?}");
        on_a.send("SendMessage", vec![json!("alice"), json!(text)]).await;
        let sender_id = on_a.connection_id.clone();
        for (who, c) in [("sender", &mut on_a), ("other node", &mut on_b)] {
            let args = c
                .expect(WAIT, |v| v["target"] == "ReceiveMessage" && v["arguments"][1] == text.as_str())
                .await
                .unwrap_or_else(|| panic!("{who} did not get the {kind:?} message"));
            assert_eq!(args["arguments"], json!(["alice", text, sender_id, "node-a"]), "{who}");
        }
        // Exactly once: the same text never arrives twice.
        on_b.send("SendMessage", vec![json!("bob"), json!("fence")]).await;
        for c in [&mut on_a, &mut on_b] {
            c.expect(WAIT, |v| v["arguments"][1] == "fence").await.expect("fence");
            let dupes = c.drain_pending().into_iter().filter(|i| format!("{i:?}").contains(&text)).count();
            assert_eq!(dupes, 0, "{kind:?} message delivered twice");
        }
    }
}

#[tokio::test]
async fn group_messages_reach_members_on_both_nodes_and_nobody_else() {
    let (_redis, a, b, http) = two_nodes().await;
    wait_backplane(&http, &a, &b).await;
    let mut member_a = HubClient::connect(&http, &a.base, TransportKind::WebSockets).await.unwrap();
    let mut member_b = HubClient::connect(&http, &b.base, TransportKind::LongPolling).await.unwrap();
    let mut outsider_b = HubClient::connect(&http, &b.base, TransportKind::ServerSentEvents).await.unwrap();
    member_a.invoke("JoinGroup", vec![json!("room")]).await.unwrap();
    member_b.invoke("JoinGroup", vec![json!("room")]).await.unwrap();
    outsider_b.invoke("JoinGroup", vec![json!("other-room")]).await.unwrap();

    // Subscribing is asynchronous; retry the first group message until it crosses.
    let mut crossed = false;
    for i in 0..50 {
        member_a.send("SendMessageToGroup", vec![json!("room"), json!("alice"), json!(format!("warmup-{i}"))]).await;
        if member_b.expect_event("ReceiveGroupMessage", Duration::from_millis(200)).await.is_some() {
            crossed = true;
            break;
        }
    }
    assert!(crossed, "group message never reached the member on the other node");

    member_b.send("SendMessageToGroup", vec![json!("room"), json!("bob"), json!("in the room")]).await;
    let sender_id = member_b.connection_id.clone();
    for c in [&mut member_a, &mut member_b] {
        let got = c
            .expect(WAIT, |v| v["target"] == "ReceiveGroupMessage" && v["arguments"][2] == "in the room")
            .await
            .unwrap();
        assert_eq!(got["arguments"], json!(["room", "bob", "in the room", sender_id, "node-b"]));
    }
    // The outsider, in another group on the sender's node, got nothing from "room".
    outsider_b.send("SendMessageToGroup", vec![json!("other-room"), json!("o"), json!("fence")]).await;
    outsider_b.expect(WAIT, |v| v["arguments"][2] == "fence").await.expect("own group message");
    let leaked: Vec<_> =
        outsider_b.drain_pending().into_iter().filter(|i| format!("{i:?}").contains("\"room\"")).collect();
    assert!(leaked.is_empty(), "outsider received {leaked:?}");

    // After leaving, a member no longer receives the group.
    member_a.invoke("LeaveGroup", vec![json!("room")]).await.unwrap();
    member_b.send("SendMessageToGroup", vec![json!("room"), json!("bob"), json!("after leave")]).await;
    member_b.expect(WAIT, |v| v["arguments"][2] == "after leave").await.expect("member still gets it");
    member_a.send("SendMessage", vec![json!("a"), json!("fence-a")]).await;
    member_a.expect(WAIT, |v| v["arguments"][1] == "fence-a").await.expect("fence");
    assert!(!member_a.drain_pending().iter().any(|i| format!("{i:?}").contains("after leave")));
}

#[tokio::test]
async fn history_is_shared_across_nodes_oldest_first() {
    let (_redis, a, b, http) = two_nodes().await;
    let c_a = HubClient::connect(&http, &a.base, TransportKind::WebSockets).await.unwrap();
    let mut c_b = HubClient::connect(&http, &b.base, TransportKind::LongPolling).await.unwrap();
    for i in 0..5 {
        c_a.send("SendMessage", vec![json!("alice"), json!(format!("m{i}"))]).await;
    }
    // History is written by the sender's publisher task, so it lands shortly after.
    let mut history = Value::Null;
    for _ in 0..100 {
        history = c_b.invoke("GetHistory", vec![json!(3)]).await.unwrap();
        if history.as_array().is_some_and(|a| a.len() == 3 && a[2]["message"] == "m4") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let messages: Vec<&str> = history.as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert_eq!(messages, ["m2", "m3", "m4"]);
    assert_eq!(history[0]["nodeId"], "node-a");
    assert_eq!(history[0]["user"], "alice");
    assert_eq!(history[0]["connectionId"], c_a.connection_id.as_str());
    assert_eq!(c_b.invoke("GetHistory", vec![json!(0)]).await, Ok(json!([])));
}

#[tokio::test]
async fn nodes_lists_live_nodes_and_forgets_a_killed_one_after_its_ttl() {
    let (redis, a, mut b, http) = two_nodes().await;
    let ids = |v: &Value| -> Vec<String> {
        v["available_nodes"]
            .as_array()
            .map(|a| a.iter().filter_map(|n| n["id"].as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let listing = eventually(WAIT, "both nodes listed", || {
        let (http, url) = (http.clone(), format!("{}/nodes", a.base));
        async move { get_json(&http, &url).await.filter(|v| v["active_count"] == 2) }
    })
    .await;
    assert_eq!(ids(&listing), ["node-a", "node-b"]);
    assert_eq!(listing["current_node"], "node-a");
    let entry = &listing["available_nodes"][1];
    assert_eq!(entry["status"], "healthy");
    // Internal addresses are the balancer's business, never the public's.
    assert!(entry.get("url").is_none(), "{entry}");
    assert!(!listing.to_string().contains(&b.base), "{listing}");
    for field in ["name", "description", "lastSeen", "connections"] {
        assert!(!entry[field].is_null(), "{field} missing in {entry}");
    }
    assert!(listing["timestamp"].is_string());

    // A garbage registry entry is skipped, not fatal.
    let mut r = redis.connection().await;
    let _: () = r.hset("switchboard:nodes:junk", "nodeId", "junk").await.unwrap();
    let _: () = r.set("switchboard:nodes:wrongtype", "x").await.unwrap();
    let _: () = r.zadd_multiple("switchboard:nodes", &[(i64::MAX, "junk"), (i64::MAX, "wrongtype")]).await.unwrap();

    b.process.kill();
    let listing = eventually(Duration::from_secs(15), "killed node to expire", || {
        let (http, url) = (http.clone(), format!("{}/nodes", a.base));
        async move { get_json(&http, &url).await.filter(|v| v["active_count"] == 1) }
    })
    .await;
    assert_eq!(ids(&listing), ["node-a"]);
}

#[tokio::test]
async fn garbage_on_backplane_channels_is_ignored() {
    let (redis, a, b, http) = two_nodes().await;
    wait_backplane(&http, &a, &b).await;
    let mut c = HubClient::connect(&http, &a.base, TransportKind::WebSockets).await.unwrap();
    let mut r = redis.connection().await;
    for junk in [
        "not json",
        "{\"origin\":\"x\"}",
        "{\"origin\":\"x\",\"frame\":\"{\\\"type\\\":7}\\u001e\"}",
        "{\"origin\":\"x\",\"frame\":\"<script>\"}",
    ] {
        let _: () = r.publish("switchboard:bp:all", junk).await.unwrap();
    }
    let _: () = r.publish("switchboard:bp:all", vec![0xffu8, 0xfe, 0x00]).await.unwrap();
    let cb = HubClient::connect(&http, &b.base, TransportKind::WebSockets).await.unwrap();
    cb.send("SendMessage", vec![json!("b"), json!("after junk")]).await;
    c.expect(WAIT, |v| v["arguments"][1] == "after junk").await.expect("delivery continues after junk");
    let junk: Vec<_> = c
        .drain_pending()
        .into_iter()
        .filter(|i| format!("{i:?}").contains("script") || format!("{i:?}").contains("\"type\": Number(7)"))
        .collect();
    assert!(junk.is_empty(), "{junk:?}");
    let m = get_text(&format!("{}/metrics", a.base)).await;
    assert!(metric_nonzero(&m, "switchboard_node_backplane_invalid_total"), "{m}");
}

#[tokio::test]
async fn nodes_survive_a_redis_restart_re_register_and_resume_cross_node_delivery() {
    let (mut redis, a, b, http) = two_nodes().await;
    wait_backplane(&http, &a, &b).await;
    let mut on_a = HubClient::connect(&http, &a.base, TransportKind::WebSockets).await.unwrap();
    let on_b = HubClient::connect(&http, &b.base, TransportKind::WebSockets).await.unwrap();

    redis.stop();
    // Health reports the outage as degraded, not unavailable.
    let h = eventually(WAIT, "health to report redis down", || {
        let (http, url) = (http.clone(), format!("{}/health", a.base));
        async move {
            let resp = http.get(url).send().await.ok()?;
            let code = resp.status();
            let v: Value = resp.json().await.ok()?;
            (v["redis"] == "down").then_some((code, v))
        }
    })
    .await;
    assert_eq!(h.0, 200);
    assert_eq!(h.1["status"], "degraded");
    // Local clients keep being served.
    on_a.send("SendMessage", vec![json!("a"), json!("local during outage")]).await;
    on_a.expect(WAIT, |v| v["arguments"][1] == "local during outage").await.expect("local delivery during outage");
    let e = on_a.invoke("GetHistory", vec![json!(5)]).await.unwrap_err();
    assert!(e.contains("unavailable"), "{e}");

    redis.restart();
    let mut r = redis.connection().await;
    eventually(Duration::from_secs(15), "both nodes to re-register", || {
        let mut r = r.clone();
        async move {
            let a: bool = r.exists("switchboard:nodes:node-a").await.ok()?;
            let b: bool = r.exists("switchboard:nodes:node-b").await.ok()?;
            (a && b).then_some(())
        }
    })
    .await;
    let _: () = r.ping().await.unwrap();
    // Cross-node delivery resumes (the subscriber reconnects with backoff).
    let mut delivered = false;
    for i in 0..60 {
        on_b.send("SendMessage", vec![json!("b"), json!(format!("after restart {i}"))]).await;
        if on_a
            .expect(Duration::from_millis(250), |v| {
                v["arguments"][1].as_str().is_some_and(|s| s.starts_with("after restart"))
            })
            .await
            .is_some()
        {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "cross-node delivery did not resume after Redis came back");
}

#[tokio::test]
async fn sigterm_drains_closes_clients_with_allow_reconnect_and_loses_no_message() {
    let redis = RedisServer::start();
    let a = TestNode::start(&redis, "stay", &[]).await;
    let mut b = TestNode::start(&redis, "leave", &["--drain-secs", "2"]).await;
    let http = reqwest::Client::new();
    wait_backplane(&http, &a, &b).await;
    let mut watcher = HubClient::connect(&http, &a.base, TransportKind::WebSockets).await.unwrap();
    let mut leaving: Vec<HubClient> = Vec::new();
    for kind in ALL_TRANSPORTS {
        leaving.push(HubClient::connect(&http, &b.base, kind).await.unwrap());
    }

    b.process.terminate();
    // Draining: health 503, negotiate refused, registry says draining.
    wait_for_status(&format!("{}/health", b.base), 503, WAIT, "node to report draining").await;
    let neg = http.post(format!("{}/chathub/negotiate?negotiateVersion=1", b.base)).send().await.unwrap();
    assert_eq!(neg.status(), 503);
    let mut r = redis.connection().await;
    let status: Option<String> = r.hget("switchboard:nodes:leave", "status").await.unwrap();
    assert_eq!(status.as_deref(), Some("draining"));

    // Messages accepted while draining reach the other node.
    for (i, c) in leaving.iter().enumerate() {
        c.send("SendMessage", vec![json!("leaver"), json!(format!("drain-msg-{i}"))]).await;
    }
    for c in leaving.iter_mut() {
        let close =
            c.expect_close(Duration::from_secs(15)).await.unwrap_or_else(|| panic!("{:?} got no Close", c.kind));
        assert_eq!(close["allowReconnect"], true, "{close}");
        assert!(close.get("error").is_none() || close["error"].is_null(), "{close}");
    }
    for i in 0..leaving.len() {
        let text = format!("drain-msg-{i}");
        watcher.expect(WAIT, |v| v["arguments"][1] == text.as_str()).await.unwrap_or_else(|| panic!("{text} lost"));
    }
    let status = b.process.wait_exit(Duration::from_secs(15)).expect("node exits after draining");
    assert!(status.success(), "{status:?}");
    let exists: bool = r.exists("switchboard:nodes:leave").await.unwrap();
    assert!(!exists, "registry key still present after drain");
    // History kept the drained node's messages too.
    let h = watcher.invoke("GetHistory", vec![json!(10)]).await.unwrap();
    assert!(
        h.as_array().unwrap().iter().filter(|e| e["nodeId"] == "leave" && e["user"] == "leaver").count() == 3,
        "{h}"
    );
}

/// A node's connection count in the registry follows its clients within
/// about a second, not at the next 15 s heartbeat: `/nodes` on another node
/// and the balancer's `/api/backends` show it.
#[tokio::test]
async fn connection_counts_are_fresh_between_heartbeats() {
    let redis = RedisServer::start();
    let slow_heartbeat = ["--heartbeat-secs", "15", "--ttl-secs", "45"];
    let a = TestNode::start(&redis, "count-a", &slow_heartbeat).await;
    let b = TestNode::start(&redis, "count-b", &slow_heartbeat).await;
    let lb = switchboard_tests::TestBalancer::start(&redis, &[]).await;
    lb.wait_accepting(&["count-a", "count-b"]).await;
    let http = reqwest::Client::new();
    let count_on_b = |want: u64| {
        let (http, url) = (http.clone(), format!("{}/nodes", b.base));
        async move {
            let v = get_json(&http, &url).await?;
            let a = v["available_nodes"].as_array()?.iter().find(|n| n["id"] == "count-a")?.clone();
            (a["connections"].as_u64() == Some(want)).then_some(())
        }
    };
    let clients = [
        HubClient::connect(&http, &a.base, TransportKind::WebSockets).await.unwrap(),
        HubClient::connect(&http, &a.base, TransportKind::WebSockets).await.unwrap(),
    ];
    eventually(Duration::from_secs(4), "count-b's /nodes to show count-a's 2 connections", || count_on_b(2)).await;
    eventually(Duration::from_secs(6), "the balancer to show count-a's 2 connections", || async {
        let v = lb.backends().await;
        v["nodes"].as_array()?.iter().any(|n| n["nodeId"] == "count-a" && n["nodeConnections"] == 2).then_some(())
    })
    .await;
    // Both waits end well before the 15 s heartbeat would have written the count.
    // A node's own entry is its live count.
    let own = get_json(&http, &format!("{}/nodes", a.base)).await.unwrap();
    let me = own["available_nodes"].as_array().unwrap().iter().find(|n| n["id"] == "count-a").unwrap().clone();
    assert_eq!(me["connections"], 2);
    drop(clients);
    eventually(Duration::from_secs(6), "the count to fall back to 0", || count_on_b(0)).await;
}

#[tokio::test]
async fn a_drain_closes_its_remaining_clients_one_by_one_over_the_spread_window_oldest_first() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "leaving", &["--drain-secs", "1", "--drain-spread-secs", "2"]).await;
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(HubClient::connect(&http, &node.base, TransportKind::WebSockets).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.process.terminate();
    // When each client got its Close (with allowReconnect), in connection order.
    let closed: Vec<(tokio::time::Instant, Value)> =
        futures_util::future::join_all(clients.iter_mut().map(|c| async move {
            let close = c.expect_close(Duration::from_secs(20)).await.expect("a Close");
            (tokio::time::Instant::now(), close)
        }))
        .await;
    assert!(closed.iter().all(|(_, c)| c["allowReconnect"] == true), "{closed:?}");
    let first = closed.iter().map(|(t, _)| *t).min().unwrap();
    let last = closed.iter().map(|(t, _)| *t).max().unwrap();
    // Twenty closes spread over 2 s are about 100 ms apart; however late
    // each one runs, they are never closer (each waits from the one before).
    assert!(last - first >= Duration::from_secs(1), "all closed within {:?}", last - first);
    assert!(closed[0].0 < closed[19].0, "the oldest client is closed before the newest");
}
