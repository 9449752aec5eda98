//! What one connection can make a node hold is bounded: a single frame of
//! `GetHistory` calls from a client that does not read (history full of large
//! messages) leaves the node's memory within the connection's byte budget, and
//! each answer is a bounded page; a connection joins a bounded number of
//! groups, with a clear error past it. Real node, real Redis, real sockets.

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::Duration;
use switchboard_tests::client::{record, ws_url, WireDecoder};
use switchboard_tests::{get_text, HubClient, Protocol, RedisServer, TestNode, TransportKind, WAIT};
use tokio_tungstenite::tungstenite::Message;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_frame_of_history_requests_from_a_client_that_does_not_read_is_bounded() {
    let redis = RedisServer::start();
    let budget = 256 * 1024;
    let node = TestNode::start(&redis, "bounded", &["--max-buffered-bytes", &budget.to_string()]).await;
    let http = reqwest::Client::new();
    // History: 60 messages of 20 KB.
    let mut filler = HubClient::connect(&http, &node.base, TransportKind::WebSockets).await.unwrap();
    let big = "h".repeat(20_000);
    for i in 0..60 {
        filler.invoke("SendMessage", vec![json!("filler"), json!(format!("{i} {big}"))]).await.unwrap();
    }
    filler.expect(WAIT, |v| v["arguments"][1].as_str().is_some_and(|t| t.starts_with("59 "))).await.unwrap();
    drop(filler);

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/chathub", ws_url(&node.base))).await.unwrap();
    ws.send(Message::Text((r#"{"protocol":"json","version":1}"#.to_string() + "\u{1e}").into())).await.unwrap();
    let _ = ws.next().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(node.process.pid());
    // 30 requests for the whole history in one frame, then no reading:
    // unbounded, that is 30 × 1.2 MB of answers held for this client.
    let mut frame = Vec::new();
    for i in 0..30 {
        frame.extend(record(&json!({"type":1,"invocationId":i.to_string(),"target":"GetHistory","arguments":[1000]})));
    }
    ws.send(Message::Text(String::from_utf8(frame).unwrap().into())).await.unwrap();
    // Measured once the node has answered what it will while the client
    // does not read: GetHistory answers counted, and no more for a while
    // (it reads no more requests once the connection's budget is full).
    let answered = || async {
        let m = get_text(&format!("{}/metrics", node.base)).await;
        m.lines()
            .find_map(|l| l.strip_prefix("switchboard_node_invocations_total{method=\"GetHistory\",outcome=\"ok\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut last = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = answered().await;
        if now > 0 && now == last {
            break;
        }
        last = now;
    }
    assert!(last > 0, "the node answered none of the GetHistory calls");
    let during = rss_kib(node.process.pid());
    let grew = during.saturating_sub(before);
    eprintln!("node RSS {before} KiB → {during} KiB with {last} of 30 GetHistory(1000) answered and unread");
    assert!(grew < 16 * 1024, "the node grew {grew} KiB for one client that does not read");

    // Every request is answered, each with a page that fits the budget.
    let mut d = WireDecoder::after_handshake(Protocol::Json);
    let mut answered = 0;
    while answered < 30 {
        let m = tokio::time::timeout(WAIT, ws.next()).await.expect("answers keep coming").unwrap().unwrap();
        for v in d.feed(&m.into_data()) {
            assert_ne!(v["type"], 7, "the client was closed: {v}");
            if v["type"] == 3 {
                let page = v["result"].as_array().expect("a page of history");
                assert!(!page.is_empty() && page.len() < 60, "{} entries", page.len());
                assert!(v.to_string().len() <= budget / 2 + 1024);
                answered += 1;
            }
        }
    }
}

#[tokio::test]
async fn a_connection_joins_a_bounded_number_of_groups() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "groups", &["--max-groups-per-connection", "3"]).await;
    let http = reqwest::Client::new();
    let mut c = HubClient::connect(&http, &node.base, TransportKind::WebSockets).await.unwrap();
    for g in ["a", "b", "c"] {
        c.invoke("JoinGroup", vec![json!(g)]).await.unwrap();
    }
    let e = c.invoke("JoinGroup", vec![json!("d")]).await.unwrap_err();
    assert!(e.contains("at most 3 groups"), "{e}");
    c.invoke("JoinGroup", vec![json!("a")]).await.expect("rejoining a group it is in");
    c.invoke("LeaveGroup", vec![json!("a")]).await.unwrap();
    c.invoke("JoinGroup", vec![json!("d")]).await.expect("room again after leaving one");
}
