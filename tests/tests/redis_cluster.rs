//! The test harness's Redis Cluster (three masters, three replicas, real
//! `redis-server` processes), and what Switchboard's Redis Cluster support
//! (issue #28) relies on from redis-rs's cluster client, checked on it:
//! keys spread over every shard and reached through `MOVED` redirections;
//! sharded pub/sub delivered by the shard that owns the channel and listed
//! there only; and when that shard's master is killed, its replica takes
//! over, and a sharded subscription made again through the same client
//! reaches it (redis-rs does not move it by itself: see the test).

use redis::cluster::ClusterClientBuilder;
use redis::{AsyncCommands, ProtocolVersion, PushInfo, PushKind, Value};
use std::time::{Duration, Instant};
use switchboard_tests::RedisCluster;
use tokio::sync::mpsc;

/// The next sharded message's payload on `channel`, within `limit`.
async fn next_message(rx: &mut mpsc::UnboundedReceiver<PushInfo>, channel: &str, limit: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let push = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        if push.kind != PushKind::SMessage {
            continue;
        }
        let text = |v: &Value| match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            _ => None,
        };
        if push.data.first().and_then(text).as_deref() == Some(channel) {
            return push.data.get(1).and_then(text);
        }
    }
}

/// The channels `PUBSUB kind` lists on the member on `port`.
fn listed(port: u16, kind: &str) -> Vec<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut c = client.get_connection().unwrap();
    redis::cmd("PUBSUB").arg(kind).query(&mut c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_spreads_keys_carries_sharded_pubsub_and_a_subscription_follows_a_failover() {
    let mut cluster = RedisCluster::start();
    let (pushes, mut rx) = mpsc::unbounded_channel();
    let subscriber = ClusterClientBuilder::new(cluster.nodes())
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(pushes)
        .build()
        .unwrap();
    let mut sub = subscriber.get_async_connection().await.unwrap();
    let publisher = ClusterClientBuilder::new(cluster.nodes())
        .retries(10)
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut publ = publisher.get_async_connection().await.unwrap();

    // Keys land on every master and read back through the one client.
    for i in 0..60 {
        let () = publ.set(format!("k{i}"), i).await.unwrap();
    }
    for i in 0..60 {
        assert_eq!(publ.get::<_, i64>(format!("k{i}")).await.unwrap(), i);
    }
    let masters: Vec<usize> = (0..60).filter_map(|i| cluster.master_of(&format!("k{i}"))).collect();
    for m in 0..cluster.members.len() {
        let holds = masters.iter().filter(|x| **x == m).count();
        assert!(holds == 0 || holds < 60, "one shard holds every key");
    }
    assert_eq!(masters.iter().collect::<std::collections::HashSet<_>>().len(), 3, "three shards hold keys");

    // A sharded channel: delivered, and listed by its own shard only.
    let channel = "sb:bp:group:{ops}";
    sub.ssubscribe(channel).await.unwrap();
    let owner = cluster.master_of(channel).expect("an owner");
    let receivers: i64 = redis::cmd("SPUBLISH").arg(channel).arg("one").query_async(&mut publ).await.unwrap();
    assert_eq!(receivers, 1);
    assert_eq!(next_message(&mut rx, channel, Duration::from_secs(5)).await.as_deref(), Some("one"));
    assert_eq!(listed(cluster.members[owner].port, "SHARDCHANNELS"), [channel]);
    assert!(listed(cluster.members[owner].port, "CHANNELS").is_empty());

    // The owner dies and its replica takes the slot. redis-rs 1.8.1 learns
    // the new topology but does not move the sharded subscription there by
    // itself (seen here: SPUBLISH to the new master finds no receiver for as
    // long as this waits), so Switchboard's subscriber must subscribe again
    // when a shard's master changes; an SSUBSCRIBE through the same client
    // goes to the new owner.
    let killed = Instant::now();
    cluster.kill(owner);
    let promoted = cluster.wait_failover(channel, owner, Duration::from_secs(30));
    let took_over = killed.elapsed();
    let mut unsubscribed_for = Duration::ZERO;
    let alone = Instant::now();
    while alone.elapsed() < Duration::from_secs(3) {
        let sent: redis::RedisResult<i64> =
            redis::cmd("SPUBLISH").arg(channel).arg("lost").query_async(&mut publ).await;
        if matches!(sent, Ok(n) if n > 0) {
            break;
        }
        unsubscribed_for = alone.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sub.ssubscribe(channel).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    let resumed = loop {
        n += 1;
        let text = format!("after-{n}");
        let sent: redis::RedisResult<i64> = redis::cmd("SPUBLISH").arg(channel).arg(&text).query_async(&mut publ).await;
        if matches!(sent, Ok(1)) {
            if let Some(got) = next_message(&mut rx, channel, Duration::from_secs(2)).await {
                if got.starts_with("after-") {
                    break got;
                }
            }
        }
        assert!(Instant::now() < deadline, "a new SSUBSCRIBE did not reach the promoted master: {sent:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(resumed.starts_with("after-"), "{resumed}");
    assert_eq!(listed(cluster.members[promoted].port, "SHARDCHANNELS"), [channel]);
    eprintln!(
        "failover: replica promoted {:.1} s after the kill; without a new SSUBSCRIBE no receiver for {:.1} s; \
         delivery back {:.1} s after the kill",
        took_over.as_secs_f64(),
        unsubscribed_for.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
}
