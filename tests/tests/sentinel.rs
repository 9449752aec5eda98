//! Redis high availability with Sentinel: a master, a replica and a
//! sentinel; two nodes and the balancer given `redis+sentinel://…`. The
//! master is killed while clients are connected; after the sentinel promotes
//! the replica, chat crosses nodes again, history is written and read on the
//! new master, and a node started after the failover is discovered — while
//! the clients connected before it never lost their connection. Again with
//! password-protected servers, checking that the password shows nowhere.

use serde_json::json;
use std::time::Duration;
use switchboard_tests::{eventually, get_text, HubClient, InProcessBalancer, InProcessNode, RedisServer, TestNode};

const SERVICE: &str = "sbmaster";

/// The master's port as the sentinel reports it.
async fn master_port(sentinel: &RedisServer) -> Option<u16> {
    let client = redis::Client::open(sentinel.url()).ok()?;
    let mut c = client.get_multiplexed_async_connection().await.ok()?;
    let (_, port): (String, String) =
        redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(SERVICE).query_async(&mut c).await.ok()?;
    port.parse().ok()
}

async fn replicas_known(sentinel: &RedisServer) -> usize {
    let Ok(client) = redis::Client::open(sentinel.url()) else { return 0 };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else { return 0 };
    let r: redis::RedisResult<Vec<redis::Value>> =
        redis::cmd("SENTINEL").arg("replicas").arg(SERVICE).query_async(&mut c).await;
    r.map(|v| v.len()).unwrap_or(0)
}

async fn hears(client: &mut HubClient, text: &str, limit: Duration) -> bool {
    client.expect(limit, |v| v["target"] == "ReceiveMessage" && v["arguments"][1] == text).await.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_the_balancer_follow_a_sentinel_failover() {
    failover(None).await;
}

/// The same with password-protected Redis servers: the password in the
/// Sentinel URL reaches the master, and appears in no log or page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_sentinel_url_works_and_is_never_shown() {
    failover(Some("s3cret-sentinel-pass")).await;
}

async fn failover(password: Option<&str>) {
    let mut master = RedisServer::start_with_password(&[], password);
    let replica_of = master.port.to_string();
    let replica = RedisServer::start_with_password(&["--replicaof", "127.0.0.1", &replica_of], password);
    let sentinel = RedisServer::start_sentinel(master.port, SERVICE, password);
    eventually(Duration::from_secs(20), "the sentinel to know the replica", || async {
        (replicas_known(&sentinel).await == 1).then_some(())
    })
    .await;
    let rc = replica.connection().await;
    eventually(Duration::from_secs(20), "the replica to be in sync", || {
        let mut rc = rc.clone();
        async move {
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut rc).await.ok()?;
            (role.get(3) == Some(&redis::Value::BulkString(b"connected".to_vec()))).then_some(())
        }
    })
    .await;
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let url = format!("redis+sentinel://{auth}127.0.0.1:{}/{SERVICE}", sentinel.port);

    let _a = InProcessNode::start_with_redis_url(&url, "sent-a", &[]).await;
    let _b = InProcessNode::start_with_redis_url(&url, "sent-b", &[]).await;
    let balancer = InProcessBalancer::start(&master, &["--redis", &url]).await;
    balancer.wait_accepting(&["sent-a", "sent-b"]).await;

    let http = reqwest::Client::new();
    let (mut one, mut two) = HubClient::pair_on_two_nodes(&http, &balancer.base).await;
    one.send("SendMessage", vec![json!("one"), json!("before the failover")]).await;
    assert!(hears(&mut two, "before the failover", Duration::from_secs(10)).await);

    // The master dies; the sentinel promotes the replica.
    // (Replication is asynchronous: wait until the replica has the message,
    // as a real failover promotes the replica that is most up to date.)
    let rc = replica.connection().await;
    eventually(Duration::from_secs(10), "the replica to hold the message", || {
        let mut rc = rc.clone();
        async move {
            let len: usize = redis::cmd("XLEN").arg("switchboard:history").query_async(&mut rc).await.ok()?;
            (len == 1).then_some(())
        }
    })
    .await;
    master.stop();
    eventually(Duration::from_secs(30), "the sentinel to promote the replica", || async {
        (master_port(&sentinel).await == Some(replica.port)).then_some(())
    })
    .await;

    // Chat crosses nodes again through the new master (messages sent while
    // the master was gone are queued by the node and published once it can).
    let mut crossed = None;
    for i in 0..40 {
        one.send("SendMessage", vec![json!("one"), json!(format!("after {i}"))]).await;
        if hears(&mut two, &format!("after {i}"), Duration::from_millis(500)).await {
            crossed = Some(i);
            break;
        }
    }
    let Some(last) = crossed else { panic!("no message crossed nodes after the failover") };
    let history = two.invoke("GetHistory", vec![json!(50)]).await.expect("GetHistory on the new master");
    let texts: Vec<&str> = history.as_array().into_iter().flatten().filter_map(|m| m["message"].as_str()).collect();
    eprintln!("history after the failover: {texts:?}");
    assert!(texts.contains(&"before the failover"), "history kept across the failover: {texts:?}");
    // Nothing sent during the failover was lost: each was stored on the new master.
    for i in 0..=last {
        assert!(texts.contains(&format!("after {i}").as_str()), "after {i} stored: {texts:?}");
    }

    // The registry moved too: a node started now is discovered.
    // (A process, so that its log can be read.)
    let c = TestNode::start_with_redis_url(&url, "sent-c", &[]).await;
    balancer.wait_accepting(&["sent-a", "sent-b", "sent-c"]).await;
    if let Some(pw) = password {
        for page in [format!("{}/api/backends", balancer.admin), format!("{}/metrics", balancer.admin)] {
            assert!(!get_text(&page).await.contains(pw), "{page} shows the password");
        }
        for page in ["metrics", "nodes", "health"] {
            assert!(!get_text(&format!("{}/{page}", c.base)).await.contains(pw), "/{page} shows the password");
        }
        assert!(!c.process.log_text().contains(pw), "the node's log shows the password");
    }

    // The clients connected before the failover never lost their connection.
    assert_eq!(one.invoke("Echo", vec![json!("still here")]).await, Ok(json!("still here")));
    assert_eq!(two.invoke("Echo", vec![json!("still here")]).await, Ok(json!("still here")));
}
