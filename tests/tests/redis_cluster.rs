//! The test harness's Redis Cluster (three masters, three replicas, real
//! `redis-server` processes), and what Switchboard's Redis Cluster support
//! (issue #28) relies on from redis-rs's cluster client, checked on it:
//! keys spread over every shard and reached through `MOVED` redirections;
//! sharded pub/sub delivered by the shard that owns the channel and listed
//! there only; and when that shard's master is killed, its replica takes
//! over, and a sharded subscription made again through the same client
//! reaches it (redis-rs does not move it by itself: see the test). Then
//! Switchboard itself on the cluster: nodes and balancer given
//! `redis+cluster://…`, chat and presence on shard channels, each group's
//! history and channel on its own name's slot, through a failover of a busy
//! group's master while a sender sends.

use redis::cluster::ClusterClientBuilder;
use redis::{AsyncCommands, ProtocolVersion, PushInfo, PushKind, Value};
use serde_json::json;
use std::time::{Duration, Instant};
use switchboard_tests::{
    get_text, ConnectOptions, HubClient, RedisCluster, TestBalancer, TestNode, TransportKind, WAIT,
};
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

/// The channels `PUBSUB kind` lists on the member on `port` (none when it
/// does not answer).
fn listed(cluster: &RedisCluster, port: u16, kind: &str) -> Vec<String> {
    let answer = cluster.query_member(port, redis::cmd("PUBSUB").arg(kind));
    answer.and_then(|v| redis::from_redis_value(v).ok()).unwrap_or_default()
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
    assert_eq!(listed(&cluster, cluster.members[owner].port, "SHARDCHANNELS"), [channel]);
    assert!(listed(&cluster, cluster.members[owner].port, "CHANNELS").is_empty());

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
    assert_eq!(listed(&cluster, cluster.members[promoted].port, "SHARDCHANNELS"), [channel]);
    eprintln!(
        "failover: replica promoted {:.1} s after the kill; without a new SSUBSCRIBE no receiver for {:.1} s; \
         delivery back {:.1} s after the kill",
        took_over.as_secs_f64(),
        unsubscribed_for.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
}

async fn hears(client: &mut HubClient, target: &str, text: &str, limit: Duration) -> bool {
    let at = if target == "ReceiveGroupMessage" { 2 } else { 1 };
    client.expect(limit, |v| v["target"] == target && v["arguments"][at] == text).await.is_some()
}

/// `channels` are shard channels on member `master` (the broadcast one with
/// `subscribers` subscribers, within `WAIT`), and no running member lists
/// a chat channel among its classic ones.
async fn assert_sharded(cluster: &RedisCluster, master: usize, channels: &[&str], subscribers: i64) {
    let port = cluster.members[master].port;
    let numsub = |channel: &str| match cluster.query_member(port, redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(channel))
    {
        Some(Value::Array(v)) => match v.get(1) {
            Some(Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    };
    let deadline = Instant::now() + WAIT;
    while numsub(channels[0]) != subscribers {
        assert!(
            Instant::now() < deadline,
            "{subscribers} shard subscribers to {}: {}",
            channels[0],
            numsub(channels[0])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sharded = listed(cluster, port, "SHARDCHANNELS");
    for c in channels {
        assert!(sharded.iter().any(|s| s == c), "{c} is a shard channel of its master: {sharded:?}");
    }
    for m in cluster.members.iter().filter(|m| m.is_running()) {
        let classic = listed(cluster, m.port, "CHANNELS");
        assert!(
            !classic.iter().any(|c| c.contains(":bp:") || c.contains("presence")),
            "classic chat channels: {classic:?}"
        );
    }
}

/// A group's shard channel (see node/src/backplane/layout.rs).
fn group_channel(group: &str) -> String {
    format!("switchboard:g:{{#{group}}}:bp")
}

/// Nodes and the balancer given `redis+cluster://…` (with a password): the
/// balancer discovers the nodes, broadcasts, group messages and presence
/// cross nodes on shard channels, the registry and broadcasts sit on the
/// slot of the prefix's hash tag and each group's history and channel on
/// its own name's, and when a busy group's master (not the prefix's) is
/// killed while a sender sends to it, its replica takes over while the
/// clients stay connected: the other node's client gets every message once
/// and in order, a client that left during the failover resumes from its
/// own position in the group and gets the rest once, nothing sent is
/// missing from history, a node started afterwards is discovered and
/// subscribes on the new masters, and the password shows nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_the_balancer_run_on_a_redis_cluster_and_follow_a_failover() {
    const PASSWORD: &str = "s3cret-cluster-pass";
    let mut cluster = RedisCluster::start_with_password(Some(PASSWORD));
    let url = cluster.url();
    let a = TestNode::start_with_redis_url(&url, "rc-a", &[]).await;
    let _b = TestNode::start_with_redis_url(&url, "rc-b", &[]).await;
    let balancer = TestBalancer::start(&cluster.members[0], &["--redis", &url]).await;
    balancer.wait_accepting(&["rc-a", "rc-b"]).await;

    let http = reqwest::Client::new();
    let (mut one, mut two) = HubClient::pair_on_two_nodes(&http, &balancer.base).await;
    // The busy group: one whose slot another master than the prefix's owns.
    let owner = cluster.master_of("{switchboard}").expect("a master for the prefix's slot");
    let busy = (0..100)
        .map(|i| format!("busy{i}"))
        .find(|g| cluster.master_of(&group_channel(g)).is_some_and(|m| m != owner))
        .expect("a group on another master");
    let busy_master = cluster.master_of(&group_channel(&busy)).expect("the busy group's master");
    one.invoke("SendMessage", vec![json!("one"), json!("before")]).await.expect("SendMessage");
    assert!(hears(&mut two, "ReceiveMessage", "before", WAIT).await, "a broadcast crossed nodes");
    one.invoke("JoinGroup", vec![json!("ops")]).await.expect("JoinGroup");
    two.invoke("JoinGroup", vec![json!("ops")]).await.expect("JoinGroup");
    two.invoke("JoinGroup", vec![json!(busy)]).await.expect("JoinGroup");
    one.invoke("SendMessageToGroup", vec![json!("ops"), json!("one"), json!("to ops")]).await.expect("group send");
    assert!(hears(&mut two, "ReceiveGroupMessage", "to ops", WAIT).await, "a group message crossed nodes");
    // Presence crosses too.
    assert_eq!(one.invoke("SetUser", vec![json!("ana")]).await, Ok(serde_json::Value::Null));
    let deadline = Instant::now() + WAIT;
    loop {
        let online = two.invoke("GetOnlineUsers", vec![]).await.expect("GetOnlineUsers");
        if online.as_array().is_some_and(|u| u.contains(&json!("ana"))) {
            break;
        }
        assert!(Instant::now() < deadline, "ana never showed online on the other node: {online}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The registry and the broadcasts are on the prefix's slot, and each
    // group's history on its own name's.
    let port = cluster.members[owner].port;
    let len = cluster.query_member(port, redis::cmd("XLEN").arg("{switchboard}:history"));
    assert_eq!(len, Some(redis::Value::Int(1)), "the broadcast in the broadcasts' stream");
    let ops_master = cluster.master_of(&group_channel("ops")).expect("ops's master");
    let ops_history = "switchboard:g:{#ops}:history";
    let len = cluster.query_member(cluster.members[ops_master].port, redis::cmd("XLEN").arg(ops_history));
    assert_eq!(len, Some(redis::Value::Int(1)), "the group message in the group's stream");
    let ttl = cluster.query_member(cluster.members[ops_master].port, redis::cmd("PTTL").arg(ops_history));
    assert!(
        matches!(ttl, Some(redis::Value::Int(ms)) if ms > 6 * 24 * 3_600_000),
        "a group's stream expires when idle: {ttl:?}"
    );
    for id in ["rc-a", "rc-b"] {
        let exists = cluster.query_member(port, redis::cmd("EXISTS").arg(format!("{{switchboard}}:nodes:{id}")));
        assert_eq!(exists, Some(redis::Value::Int(1)), "{id}'s registry hash on the prefix's master");
    }
    // Chat and presence ride sharded pub/sub: their channels are shard
    // channels of the slot's master, and no member lists them as classic ones.
    let chat_channels = ["{switchboard}:bp:all", "{switchboard}:presence:changes"];
    assert_sharded(&cluster, owner, &chat_channels, 2).await;
    assert_sharded(&cluster, ops_master, &[&group_channel("ops")], 2).await;
    assert_sharded(&cluster, busy_master, &[&group_channel(&busy)], 1).await;
    // A direct message: stored with the broadcasts, published on its two
    // users' shard channels on the prefix's master, each followed by the
    // one node that has a connection of the user.
    assert_eq!(two.invoke("SetUser", vec![json!("bob")]).await, Ok(serde_json::Value::Null));
    one.invoke("SendToUser", vec![json!("bob"), json!("direct")]).await.expect("SendToUser");
    assert!(hears(&mut two, "ReceivePrivateMessage", "direct", WAIT).await, "a direct message crossed nodes");
    assert_sharded(&cluster, owner, &["{switchboard}:bp:user:bob", "{switchboard}:bp:user:ana"], 1).await;

    // A client that tracks ids, in the busy group, to leave and resume.
    let ids = ConnectOptions { message_ids: true, ..ConnectOptions::default() };
    let mut leaver = HubClient::connect_opts(&http, &balancer.base, TransportKind::WebSockets, ids).await.unwrap();
    leaver.invoke("JoinGroup", vec![json!(busy)]).await.expect("JoinGroup");
    leaver.invoke("Resume", vec![json!({"groups": {&busy: "0-0"}})]).await.expect("Resume");

    // The replica has everything (WAIT), then its master dies while a
    // sender on one node sends to the group every 25 ms: the subscriptions
    // find the promoted master by themselves (the probe's echo stops) and
    // the receiver on the other node gets every message once, in order.
    let busy_port = cluster.members[busy_master].port;
    let acked = cluster.query_member(busy_port, redis::cmd("WAIT").arg(1).arg(5000));
    assert_eq!(acked, Some(redis::Value::Int(1)), "the replica acknowledged the writes");
    const STEADY: usize = 320;
    let to = busy.clone();
    let sender = tokio::spawn(async move {
        for i in 0..STEADY {
            one.send("SendMessageToGroup", vec![json!(to), json!("one"), json!(format!("steady {i}"))]).await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        one
    });
    let receiver = tokio::spawn(async move {
        let mut got: Vec<(Instant, String)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.last().is_none_or(|(_, t)| t != &format!("steady {}", STEADY - 1)) && Instant::now() < deadline {
            let Some(args) = two.expect_event("ReceiveGroupMessage", Duration::from_secs(1)).await else { continue };
            if let Some(text) = args.get(2).and_then(|t| t.as_str()).filter(|t| t.starts_with("steady ")) {
                got.push((Instant::now(), text.to_string()));
            }
        }
        (two, got)
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The leaver's last id in the group, and it goes.
    let mut left_after = None;
    let listening = Instant::now();
    while listening.elapsed() < Duration::from_millis(300) {
        if let Some(args) = leaver.expect_event("ReceiveGroupMessage", Duration::from_millis(50)).await {
            left_after = Some((args[2].as_str().unwrap_or_default().to_string(), args[5].clone()));
        }
    }
    let (last_text, last_id) = left_after.expect("the leaver heard the group");
    drop(leaver);
    let killed = Instant::now();
    cluster.kill(busy_master);
    let promoted_to = cluster.wait_failover(&group_channel(&busy), busy_master, Duration::from_secs(30));
    let promoted = killed.elapsed();
    let mut one = sender.await.expect("the sender");
    let (mut two, got) = receiver.await.expect("the receiver");
    let texts: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    let want: Vec<String> = (0..STEADY).map(|i| format!("steady {i}")).collect();
    if texts != want {
        let missing: Vec<&String> = want.iter().filter(|w| !texts.contains(&w.as_str())).collect();
        let repeated: Vec<&&str> =
            texts.iter().enumerate().filter(|(i, t)| texts[..*i].contains(t)).map(|(_, t)| t).collect();
        let history = two.invoke("GetHistory", vec![json!(1000)]).await.expect("GetHistory");
        let stored: Vec<&str> =
            history.as_array().into_iter().flatten().filter_map(|m| m["message"].as_str()).collect();
        let in_history: Vec<&&String> = missing.iter().filter(|m| stored.contains(&m.as_str())).collect();
        eprintln!("of those, in history: {in_history:?}; the nodes' warnings and errors:");
        for l in a.process.log_text().lines().chain(_b.process.log_text().lines()) {
            if l.contains("WARN") || l.contains("ERROR") {
                eprintln!("  {l}");
            }
        }
        panic!("across the failover: missing {missing:?}, repeated {repeated:?}, received {} of {STEADY}", texts.len());
    }
    let stopped = got.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap_or_default();
    eprintln!(
        "Switchboard on the cluster: the busy group's replica promoted {:.1} s after the kill; a group message \
         every 25 ms, the longest pause in delivery {:.1} s; {STEADY} sent, {} received, 0 lost, 0 repeated",
        promoted.as_secs_f64(),
        stopped.as_secs_f64(),
        got.len()
    );
    // The leaver comes back and resumes from its own position in the group.
    let mut back = HubClient::connect_opts(&http, &balancer.base, TransportKind::WebSockets, ids).await.unwrap();
    back.invoke("JoinGroup", vec![json!(busy)]).await.expect("JoinGroup");
    let replayed = back.invoke("Resume", vec![json!({"groups": {&busy: last_id}})]).await.expect("Resume");
    let replayed_texts = back.take_arguments("ReceiveGroupMessage", 2);
    let first_missed: usize = last_text.trim_start_matches("steady ").parse::<usize>().unwrap() + 1;
    let missed: Vec<String> = (first_missed..STEADY).map(|i| format!("steady {i}")).collect();
    assert_eq!(replayed_texts, missed, "the resumed client got exactly what it missed, once");
    // (It names no position in the broadcasts, so it also got the recent
    // ones from a margin before its group position: counted, not shown here.)
    assert!(replayed.as_u64().is_some_and(|n| n as usize >= missed.len()), "{replayed}");
    one.invoke("SendMessageToGroup", vec![json!("ops"), json!("one"), json!("ops again")]).await.expect("group send");
    assert!(hears(&mut two, "ReceiveGroupMessage", "ops again", WAIT).await, "group messages cross again");
    one.invoke("SendMessage", vec![json!("one"), json!("after")]).await.expect("SendMessage");
    assert!(hears(&mut two, "ReceiveMessage", "after", WAIT).await, "broadcasts cross again");
    let history = two.invoke("GetHistory", vec![json!(1000)]).await.expect("GetHistory on the new master");
    let stored: Vec<&str> = history.as_array().into_iter().flatten().filter_map(|m| m["message"].as_str()).collect();
    for text in ["before", "to ops", "ops again", "after"].into_iter().map(String::from).chain(want) {
        assert!(stored.contains(&text.as_str()), "{text:?} in history after the failover: {stored:?}");
    }

    // The registry moved with the slot: a node started now is discovered,
    // and all three nodes' subscriptions are shard subscriptions on the
    // promoted master.
    let c = TestNode::start_with_redis_url(&url, "rc-c", &[]).await;
    balancer.wait_accepting(&["rc-a", "rc-b", "rc-c"]).await;
    assert_eq!(one.invoke("Echo", vec![json!("still here")]).await, Ok(json!("still here")));
    assert_sharded(&cluster, owner, &chat_channels[..1], 3).await;
    let owner_of = |c: &HubClient| switchboard_common::token::owner_of(&c.connection_id);
    let busy_nodes = [owner_of(&two), owner_of(&back)].into_iter().collect::<std::collections::HashSet<_>>();
    assert_sharded(&cluster, promoted_to, &[&group_channel(&busy)], busy_nodes.len() as i64).await;

    for page in [format!("{}/api/backends", balancer.admin), format!("{}/metrics", balancer.admin)] {
        assert!(!get_text(&page).await.contains(PASSWORD), "{page} shows the password");
    }
    for page in ["metrics", "nodes", "health"] {
        assert!(!get_text(&format!("{}/{page}", c.base)).await.contains(PASSWORD), "/{page} shows the password");
    }
    for (who, log) in [("node", a.process.log_text()), ("balancer", balancer.process.log_text())] {
        assert!(!log.contains(PASSWORD), "the {who}'s log shows the password");
    }
}
