//! Who is online, across real nodes sharing a real Redis: a user is online
//! while any of their connections on any node is; a watcher's
//! `GetOnlineUsers()` answer is followed by exactly the changes after it; a
//! killed node's users go offline within its TTL; bad names are refused.

use serde_json::{json, Value};
use std::time::Duration;
use switchboard_tests::{HubClient, RedisServer, TestNode, TransportKind, WAIT};

async fn client(base: &str) -> HubClient {
    HubClient::connect(&reqwest::Client::new(), base, TransportKind::WebSockets).await.expect("connect")
}

async fn as_user(base: &str, user: &str) -> HubClient {
    let mut c = client(base).await;
    assert_eq!(c.invoke("SetUser", vec![json!(user)]).await, Ok(Value::Null));
    c
}

async fn online(c: &mut HubClient) -> Vec<String> {
    let v = c.invoke("GetOnlineUsers", vec![]).await.expect("GetOnlineUsers");
    v.as_array().expect("an array").iter().map(|u| u.as_str().unwrap_or_default().to_string()).collect()
}

/// The next UserJoined/UserLeft event, as ("UserJoined", user).
async fn next_change(c: &mut HubClient, limit: Duration) -> Option<(String, String)> {
    let v = c.expect(limit, |v| v["type"] == 1 && (v["target"] == "UserJoined" || v["target"] == "UserLeft")).await?;
    Some((v["target"].as_str()?.to_string(), v["arguments"][0].as_str()?.to_string()))
}

fn change(kind: &str, user: &str) -> Option<(String, String)> {
    Some((kind.to_string(), user.to_string()))
}

#[tokio::test]
async fn people_are_online_across_nodes_until_their_last_connection_or_their_node_goes() {
    let redis = RedisServer::start();
    let a = TestNode::start(&redis, "pa", &[]).await;
    let b = TestNode::start(&redis, "pb", &[]).await;
    let mut c = TestNode::start(&redis, "pc", &[]).await;

    let ann_tab1 = as_user(&a.base, "ann").await;
    let ann_tab2 = as_user(&b.base, "ann").await;
    let _bob = as_user(&b.base, "bob").await;
    // A watcher on node a sees bob, who is on node b, once b's change arrives.
    let mut watcher = client(&a.base).await;
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = online(&mut watcher).await;
        if seen == ["ann", "bob"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, ["ann", "bob"], "the watcher (no name yet) is not listed; ann is listed once");

    // Closing one of ann's two tabs keeps her online.
    drop(ann_tab1);
    assert_eq!(next_change(&mut watcher, Duration::from_secs(2)).await, None, "ann still has a tab open");
    assert_eq!(online(&mut watcher).await, ["ann", "bob"]);

    // A newcomer on node c: everyone watching hears of it once.
    let _carl = as_user(&c.base, "carl").await;
    assert_eq!(next_change(&mut watcher, WAIT).await, change("UserJoined", "carl"));

    // Renaming moves the connection: one leave, one join.
    let mut ann_tab2 = ann_tab2;
    assert_eq!(ann_tab2.invoke("SetUser", vec![json!("anna")]).await, Ok(Value::Null));
    let mut renamed = vec![next_change(&mut watcher, WAIT).await, next_change(&mut watcher, WAIT).await];
    renamed.sort();
    assert_eq!(renamed, [change("UserJoined", "anna"), change("UserLeft", "ann")]);

    // Node c dies without a word: carl goes offline within its TTL (1.5 s
    // for test nodes) plus one heartbeat of the watcher's node.
    let killed_at = std::time::Instant::now();
    c.process.kill();
    assert_eq!(next_change(&mut watcher, Duration::from_secs(8)).await, change("UserLeft", "carl"));
    eprintln!("carl went offline {:?} after his node was killed", killed_at.elapsed());
    assert_eq!(online(&mut watcher).await, ["anna", "bob"]);

    // The last connection of a user closing takes them offline everywhere.
    drop(ann_tab2);
    assert_eq!(next_change(&mut watcher, WAIT).await, change("UserLeft", "anna"));
}

#[tokio::test]
async fn bad_names_are_refused_and_the_connection_stays() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "ps", &[]).await;
    let mut anon = client(&node.base).await;
    for bad in [json!(""), json!("a\u{7}b"), json!("x".repeat(65)), json!(7)] {
        let err = anon.invoke("SetUser", vec![bad.clone()]).await.expect_err("a bad name is refused");
        assert!(err.contains("HubException") || err.contains("InvalidDataException"), "{bad}: {err}");
    }
    assert_eq!(online(&mut anon).await, Vec::<String>::new());
    assert_eq!(anon.invoke("SetUser", vec![json!("  erin ")]).await, Ok(Value::Null));
    assert_eq!(online(&mut anon).await, ["erin"], "trimmed");
    // A signed-in connection is online as its token's user (the page test
    // in web.rs signs in and sees its name listed); it cannot take another.
}
