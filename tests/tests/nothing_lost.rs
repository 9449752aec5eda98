//! Chat messages are neither lost nor repeated while Redis and nodes come
//! and go: every message gets one id when it is stored (atomically with its
//! publication), connections that opt in with `?messageIds=true` see it,
//! `Resume(lastId)` replays exactly what a connection missed, a Redis
//! outage costs no cross-node delivery (nodes catch up from history when they
//! resubscribe), and a paused Redis (publishes retried after timeouts) stores
//! and delivers each message once. Real nodes, a real redis-server.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use switchboard_tests::{ConnectOptions, HubClient, RedisServer, TestNode, TransportKind, WAIT};

async fn two_nodes() -> (RedisServer, TestNode, TestNode, reqwest::Client) {
    let redis = RedisServer::start();
    let (a, b) = (TestNode::start(&redis, "node-a", &[]).await, TestNode::start(&redis, "node-b", &[]).await);
    (redis, a, b, reqwest::Client::new())
}

fn with_ids() -> ConnectOptions {
    ConnectOptions { message_ids: true, ..ConnectOptions::default() }
}

async fn connect(http: &reqwest::Client, node: &TestNode, ids: bool) -> HubClient {
    let opts = if ids { with_ids() } else { ConnectOptions::default() };
    HubClient::connect_opts(http, &node.base, TransportKind::WebSockets, opts).await.unwrap()
}

/// Texts of every ReceiveMessage (and group message) received until `until`
/// arrives, with their ids (the last argument) when present.
async fn collect_until(c: &mut HubClient, until: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    loop {
        let v = c
            .expect(WAIT, |v| v["target"] == "ReceiveMessage" || v["target"] == "ReceiveGroupMessage")
            .await
            .unwrap_or_else(|| panic!("{until:?} never arrived; got {out:?}"));
        let args = v["arguments"].as_array().unwrap();
        let group = v["target"] == "ReceiveGroupMessage";
        let text = args[if group { 2 } else { 1 }].as_str().unwrap().to_string();
        let id_at = if group { 5 } else { 4 };
        let id = args.get(id_at).and_then(Value::as_str).map(String::from);
        let done = text == until;
        out.push((text, id));
        if done {
            return out;
        }
    }
}

async fn say(c: &mut HubClient, text: &str) {
    c.invoke("SendMessage", vec![json!("u"), json!(text)]).await.unwrap();
}

#[tokio::test]
async fn message_ids_are_opt_in_ordered_and_match_history() {
    let (redis, a, b, http) = two_nodes().await;
    let mut plain = connect(&http, &a, false).await;
    let mut ided = connect(&http, &b, true).await;
    ided.invoke("JoinGroup", vec![json!("g")]).await.unwrap();
    plain.invoke("JoinGroup", vec![json!("g")]).await.unwrap();
    redis.wait_subscribers("switchboard:bp:group:g", 2).await;
    say(&mut plain, "one").await;
    plain.invoke("SendMessageToGroup", vec![json!("g"), json!("u"), json!("two")]).await.unwrap();
    say(&mut plain, "three").await;

    let plain_got = collect_until(&mut plain, "three").await;
    assert!(plain_got.iter().all(|(_, id)| id.is_none()), "no id without opting in: {plain_got:?}");
    let got = collect_until(&mut ided, "three").await;
    let texts: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(texts, ["one", "two", "three"]);
    let ids: Vec<String> = got.iter().map(|(_, id)| id.clone().expect("an id")).collect();
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| {
        let (ms, seq) = id.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    });
    assert_eq!(ids, sorted, "delivered in id order");
    let history = ided.invoke("GetHistory", vec![json!(10)]).await.unwrap();
    let entries = history.as_array().unwrap();
    let by_text: HashMap<&str, &Value> = entries.iter().map(|e| (e["message"].as_str().unwrap(), e)).collect();
    for (text, id) in &got {
        assert_eq!(by_text[text.as_str()]["id"].as_str(), id.as_deref(), "{text}");
    }
    assert_eq!(by_text["two"]["group"], "g");
    assert!(by_text["one"].get("group").is_none() && by_text["one"].get("uid").is_none());
}

#[tokio::test]
async fn resume_replays_exactly_what_a_connection_missed() {
    let (redis, a, b, http) = two_nodes().await;
    let mut sender = connect(&http, &a, false).await;
    let mut first = connect(&http, &b, true).await;
    first.invoke("JoinGroup", vec![json!("mine")]).await.unwrap();
    redis.wait_subscribers("switchboard:bp:group:mine", 1).await;
    say(&mut sender, "seen").await;
    let seen = collect_until(&mut first, "seen").await;
    let last_id = seen.last().unwrap().1.clone().unwrap();
    drop(first); // the connection is lost…
    say(&mut sender, "missed 1").await;
    sender.invoke("SendMessageToGroup", vec![json!("mine"), json!("u"), json!("missed group")]).await.unwrap();
    sender.invoke("SendMessageToGroup", vec![json!("other"), json!("u"), json!("not mine")]).await.unwrap();
    say(&mut sender, "missed 2").await;
    redis.wait_history_len(5).await;

    // …and the client comes back on another node: rejoin, then resume.
    let mut again = connect(&http, &a, true).await;
    again.invoke("JoinGroup", vec![json!("mine")]).await.unwrap();
    // A message stored after the new connection opened but before Resume:
    // it is held, and comes once, after the replay, in id order.
    say(&mut sender, "between").await;
    collect_until(&mut sender, "between").await;
    let replayed = again.invoke("Resume", vec![json!(last_id)]).await.unwrap();
    assert_eq!(replayed, json!(4));
    say(&mut sender, "live").await;
    let got = collect_until(&mut again, "live").await;
    let texts: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(texts, ["missed 1", "missed group", "missed 2", "between", "live"], "replay, then live, nothing twice");
    let ids: Vec<(u64, u64)> = got
        .iter()
        .map(|(_, id)| {
            let (ms, seq) = id.as_deref().expect("an id").split_once('-').unwrap();
            (ms.parse().unwrap(), seq.parse().unwrap())
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order: {got:?}");

    // Bad ids get clear errors; a second Resume answers again, bounded.
    let e = again.invoke("Resume", vec![json!("garbage")]).await.unwrap_err();
    assert!(e.contains("malformed"), "{e}");
    let e = again.invoke("Resume", vec![json!("99999999999999-0")]).await.unwrap_err();
    assert!(e.contains("newer than any"), "{e}");
    let e = again.invoke("Resume", vec![json!(5)]).await.unwrap_err();
    assert!(e.contains("Error binding arguments"), "{e}");
    // Again: the four replayed before, but not "live", which this
    // connection already got live.
    assert_eq!(again.invoke("Resume", vec![json!(last_id)]).await, Ok(json!(4)));
}

/// A client slower than the node's 2 s hold (a storm: seconds between
/// negotiate and its `Resume`) gets live messages before it rejoins its
/// group; its replay must still bring the group's messages from before the
/// join, though they are newer than the first message it got live.
#[tokio::test]
async fn a_group_joined_after_live_delivery_began_is_still_replayed() {
    let (redis, a, b, http) = two_nodes().await;
    let mut sender = connect(&http, &a, false).await;
    let mut old = connect(&http, &b, true).await;
    say(&mut sender, "seen").await;
    let last_id = collect_until(&mut old, "seen").await.last().unwrap().1.clone().unwrap();
    drop(old);

    let mut again = connect(&http, &b, true).await;
    // The hold ends unused, and live delivery begins.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    say(&mut sender, "live first").await;
    collect_until(&mut again, "live first").await;
    sender.invoke("SendMessageToGroup", vec![json!("late"), json!("u"), json!("before the join")]).await.unwrap();
    redis.wait_history_len(3).await;
    again.invoke("JoinGroup", vec![json!("late")]).await.unwrap();
    sender.invoke("SendMessageToGroup", vec![json!("late"), json!("u"), json!("after the join")]).await.unwrap();
    collect_until(&mut again, "after the join").await;
    // "live first" and "after the join" came live; the group's earlier one is replayed.
    assert_eq!(again.invoke("Resume", vec![json!(last_id)]).await, Ok(json!(1)));
    say(&mut sender, "end").await;
    let got: Vec<String> = collect_until(&mut again, "end").await.into_iter().map(|(t, _)| t).collect();
    assert_eq!(got, ["before the join", "end"]);
}

#[tokio::test]
async fn a_replay_larger_than_the_outbox_budget_arrives_whole() {
    let redis = RedisServer::start();
    let small = ["--max-buffered-frames", "16", "--max-buffered-bytes", "65536"];
    let node = TestNode::start(&redis, "small-outbox", &small).await;
    // The sender talks to a node with the default budget: on a loaded machine
    // its own echoes could outgrow a 16-frame outbox, and it is not what this
    // test is about.
    let roomy = TestNode::start(&redis, "roomy", &[]).await;
    let http = reqwest::Client::new();
    let mut sender = connect(&http, &roomy, false).await;
    let mut first = connect(&http, &node, true).await;
    say(&mut sender, "seen").await;
    let last_id = collect_until(&mut first, "seen").await[0].1.clone().unwrap();
    drop(first);
    // 100 messages of 1 KB: more frames and bytes than the outbox holds for
    // traffic a client did not ask for.
    let filler = "x".repeat(1000);
    for i in 0..100 {
        say(&mut sender, &format!("{i} {filler}")).await;
    }
    collect_until(&mut sender, &format!("99 {filler}")).await;
    let mut again = connect(&http, &node, true).await;
    assert_eq!(again.invoke("Resume", vec![json!(last_id)]).await, Ok(json!(100)));
    let got = collect_until(&mut again, &format!("99 {filler}")).await;
    assert_eq!(got.len(), 100, "every replayed message, and the client stays connected");
    say(&mut sender, "after").await;
    collect_until(&mut again, "after").await;
}

#[tokio::test]
async fn resuming_from_an_id_that_left_the_history_says_so() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "small", &["--history-len", "10"]).await;
    let http = reqwest::Client::new();
    let mut c = connect(&http, &node, true).await;
    say(&mut c, "first").await;
    let first_id = collect_until(&mut c, "first").await[0].1.clone().unwrap();
    // MAXLEN ~ trims whole blocks of entries, so send enough to drop some.
    let mut frame = Vec::new();
    for i in 0..400 {
        frame.extend(switchboard_tests::client::record(
            &json!({"type":1,"target":"SendMessage","arguments":["u", format!("bulk {i}")]}),
        ));
    }
    c.send_raw(frame).await.unwrap();
    collect_until(&mut c, "bulk 399").await;
    let e = c.invoke("Resume", vec![json!(first_id)]).await.unwrap_err();
    assert!(e.contains("left the capped history"), "{e}");
}

/// Adds to `got` what arrives until every text in `want` is there (or the
/// wait runs out), then whatever else comes within half a second.
async fn collect_all(c: &mut HubClient, want: &[String], got: &mut Vec<(String, Option<String>)>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut settle = None;
    loop {
        if settle.is_none() && want.iter().all(|w| got.iter().any(|(t, _)| t == w)) {
            settle = Some(tokio::time::Instant::now() + Duration::from_millis(500));
        }
        let until = settle.unwrap_or(deadline).min(deadline);
        let now = tokio::time::Instant::now();
        if now >= until {
            return;
        }
        let Some(v) = c.expect(until - now, |v| v["target"] == "ReceiveMessage").await else { continue };
        got.push((v["arguments"][1].as_str().unwrap_or_default().to_string(), None));
    }
}

/// Every client got every text exactly once.
fn assert_exactly_once(who: &str, got: &[(String, Option<String>)], want: &[String]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (t, _) in got {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = want.iter().filter(|w| !counts.contains_key(w.as_str())).collect();
    let repeated: Vec<(&&str, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(missing.is_empty() && repeated.is_empty(), "{who}: missing {missing:?}, repeated {repeated:?}");
}

#[tokio::test]
async fn a_redis_outage_costs_no_cross_node_message() {
    let (mut redis, a, b, http) = two_nodes().await;
    let mut on_a = connect(&http, &a, false).await;
    let mut on_b = connect(&http, &b, false).await;
    say(&mut on_a, "before").await;
    collect_until(&mut on_b, "before").await;
    collect_until(&mut on_a, "before").await;

    redis.stop();
    let mut want = Vec::new();
    for i in 0..10 {
        for (c, name) in [(&mut on_a, "a"), (&mut on_b, "b")] {
            let text = format!("{name} during {i}");
            c.send("SendMessage", vec![json!("u"), json!(text)]).await;
            want.push(text);
        }
    }
    // Each node's own clients are not kept waiting for Redis.
    let early = collect_until(&mut on_a, "a during 9").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    say(&mut on_a, "after").await;
    want.push("after".into());
    for (c, who, mut got) in [(&mut on_a, "client on a", early), (&mut on_b, "client on b", Vec::new())] {
        collect_all(c, &want, &mut got).await;
        got.retain(|(t, _)| t != "before");
        assert_exactly_once(who, &got, &want);
    }
}

#[tokio::test]
async fn a_paused_redis_stores_and_delivers_each_message_once() {
    let (redis, a, b, http) = two_nodes().await;
    let mut on_a = connect(&http, &a, false).await;
    let mut on_b = connect(&http, &b, false).await;
    say(&mut on_a, "warm").await;
    collect_until(&mut on_b, "warm").await;
    collect_until(&mut on_a, "warm").await;
    let mut admin = redis.connection().await;
    // Longer than the nodes' 2 s response timeout, so publishes are retried.
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(3500).arg("WRITE").query_async(&mut admin).await.unwrap();
    let mut want = Vec::new();
    for i in 0..5 {
        let text = format!("paused {i}");
        on_a.send("SendMessage", vec![json!("u"), json!(text)]).await;
        want.push(text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say(&mut on_a, "resumed").await;
    want.push("resumed".into());
    for (c, who) in [(&mut on_a, "sender's node"), (&mut on_b, "other node")] {
        let mut got = Vec::new();
        collect_all(c, &want, &mut got).await;
        assert_exactly_once(who, &got, &want);
    }
    let history = on_b.invoke("GetHistory", vec![json!(50)]).await.unwrap();
    let stored: Vec<&str> = history.as_array().unwrap().iter().filter_map(|e| e["message"].as_str()).collect();
    for w in &want {
        assert_eq!(stored.iter().filter(|s| **s == w.as_str()).count(), 1, "{w} stored once: {stored:?}");
    }
}

/// Calls of the history commands Redis has served since its stats were reset.
async fn history_commands(redis: &RedisServer) -> u64 {
    let mut c = redis.connection().await;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut c).await.unwrap();
    info.lines()
        .filter(|l| ["cmdstat_xrange:", "cmdstat_xrevrange:", "cmdstat_xinfo|stream:"].iter().any(|p| l.starts_with(p)))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_clients_resuming_from_one_id_shares_history_reads_and_each_gets_everything_once() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "solo", &[]).await;
    let http = reqwest::Client::new();
    let sender = connect(&http, &node, false).await;
    for i in 0..40 {
        sender.send("SendMessage", vec![json!("s"), json!(format!("m{i}"))]).await;
    }
    redis.wait_history_len(40).await;
    let mut c = redis.connection().await;
    let ids: Vec<String> = {
        let entries: redis::Value =
            redis::cmd("XRANGE").arg("switchboard:history").arg("-").arg("+").query_async(&mut c).await.unwrap();
        let redis::Value::Array(entries) = entries else { panic!("XRANGE answered {entries:?}") };
        entries
            .iter()
            .filter_map(|e| match e {
                redis::Value::Array(parts) => match parts.first() {
                    Some(redis::Value::BulkString(id)) => Some(String::from_utf8_lossy(id).into_owned()),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    };
    assert_eq!(ids.len(), 40);
    let mut clients = Vec::new();
    for _ in 0..150 {
        clients.push(connect(&http, &node, true).await);
    }
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut c).await.unwrap();
    // Every client resumes from the same id at once, as the clients of a
    // dead node do on the node they reach.
    let results =
        futures_util::future::join_all(clients.iter_mut().map(|c| c.invoke("Resume", vec![json!(ids[0])]))).await;
    assert!(results.iter().all(|r| r == &Ok(json!(39))), "{results:?}");
    let reads = history_commands(&redis).await;
    eprintln!("150 clients resumed from one id with {reads} history commands");
    assert!(reads < 150, "{reads} history commands for 150 resumes: identical reads were not shared");
    for (i, c) in clients.iter_mut().enumerate() {
        let got: Vec<String> = c.take_arguments("ReceiveMessage", 4);
        assert_eq!(got, ids[1..], "client {i} got every missed message once, in order");
    }
    let metrics = reqwest::get(format!("{}/metrics", node.base)).await.unwrap().text().await.unwrap();
    assert!(switchboard_tests::metric_nonzero(&metrics, "switchboard_node_history_reads_shared_total"), "{metrics}");
}
