//! Holes an outside probe found, each closed and held closed end to end on
//! real sockets with a real Redis: the id other clients see never opens,
//! feeds, reads or closes a connection (negotiate v0 included, straight to a
//! node and through the balancer); replies that replay history are held to
//! the per-connection byte budget whatever the client reads; anonymous
//! senders can be told from signed-in ones; standard JWTs are accepted.

use serde_json::{json, Value};
use std::time::Duration;
use switchboard_tests::client::{record, ws_url};
use switchboard_tests::{HubClient, RedisServer, TestBalancer, TestNode, TransportKind, ALL_TRANSPORTS, WAIT};

/// What an attacker can do with an id: every transport request a SignalR
/// client makes, each answered with its status.
async fn try_every_transport_request(http: &reqwest::Client, base: &str, id: &str) -> Vec<(&'static str, u16)> {
    let url = format!("{base}/chathub?id={id}");
    let send = record(&json!({"type": 1, "target": "SendMessage", "arguments": ["mallory", "as the victim"]}));
    let set_user = record(&json!({"type": 1, "target": "SetUser", "arguments": ["mallory"]}));
    let status = |r: reqwest::Result<reqwest::Response>| r.map(|r| r.status().as_u16()).unwrap_or(0);
    let mut out = vec![
        ("send", status(http.post(&url).body(send).send().await)),
        ("rename", status(http.post(&url).body(set_user).send().await)),
        ("poll", status(http.get(&url).timeout(Duration::from_secs(5)).send().await)),
        (
            "event stream",
            status(http.get(&url).header("Accept", "text/event-stream").timeout(Duration::from_secs(5)).send().await),
        ),
        ("delete", status(http.delete(&url).send().await)),
    ];
    let ws = match tokio_tungstenite::connect_async(ws_url(&url)).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(_) => 0,
    };
    out.push(("websocket", ws));
    out
}

/// Every connection id `c` has been shown by the hub: the senders of the
/// chat and group messages it received.
fn ids_seen(events: &[Vec<Value>], sender_index: usize) -> Vec<String> {
    events.iter().filter_map(|args| args.get(sender_index)?.as_str().map(String::from)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_id_another_client_sees_opens_feeds_reads_or_closes_a_negotiate_v0_connection() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "solo", &[]).await;
    let balancer = TestBalancer::start(&redis, &[]).await;
    balancer.wait_accepting(&["solo"]).await;
    let http = reqwest::Client::new();
    for base in [node.base.as_str(), balancer.base.as_str()] {
        for kind in ALL_TRANSPORTS {
            let what = format!("{kind:?} via {base}");
            // A v0 victim (its ?id= is the connectionId negotiate gave it)
            // and an attacker in the same group, who hears everything the
            // victim says.
            let mut victim = HubClient::connect_with(&http, base, kind, None).await.unwrap();
            let mut attacker = HubClient::connect(&http, base, TransportKind::WebSockets).await.unwrap();
            for c in [&mut victim, &mut attacker] {
                assert_eq!(c.invoke("JoinGroup", vec![json!("room")]).await, Ok(Value::Null));
            }
            victim.send("SendMessage", vec![json!("victim"), json!(format!("hello {what}"))]).await;
            victim.send("SendMessageToGroup", vec![json!("room"), json!("victim"), json!("in the room")]).await;
            let mut heard = Vec::new();
            heard.push(attacker.expect_event("ReceiveMessage", WAIT).await.expect("broadcast"));
            let group = attacker.expect_event("ReceiveGroupMessage", WAIT).await.expect("group message");
            let mut seen = ids_seen(&heard, 2);
            seen.extend(ids_seen(&[group], 3));
            // What the victim itself is told it is, as the hub shows it.
            victim.send("GetNodeInfo", vec![]).await;
            let info = victim.expect_event("NodeInfo", WAIT).await.unwrap();
            seen.push(info[1].as_str().unwrap().to_string());
            seen.dedup();
            assert_eq!(seen.len(), 1, "{what}: one public id: {seen:?}");
            let public = &seen[0];
            assert_ne!(public, &victim.id, "{what}: the public id is not the transport key");

            for (request, status) in try_every_transport_request(&http, base, public).await {
                assert_eq!(status, 404, "{what}: an attacker's {request} with the public id");
            }

            // The victim lost nothing: still connected, still in its group,
            // still itself, and no message was spoken in its name.
            assert_eq!(victim.invoke("Echo", vec![json!("still here")]).await, Ok(json!("still here")), "{what}");
            attacker.send("SendMessageToGroup", vec![json!("room"), json!("attacker"), json!("after")]).await;
            let after =
                victim.expect(WAIT, |v| v["target"] == "ReceiveGroupMessage" && v["arguments"][2] == "after").await;
            assert!(after.is_some(), "{what}: the victim still gets its group's messages");
            let spoofed = attacker.expect(Duration::from_millis(300), |v| v["arguments"][1] == "as the victim").await;
            assert!(spoofed.is_none(), "{what}: nobody spoke as the victim: {spoofed:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateful_reconnect_is_granted_only_from_negotiate_v1_on() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "solo", &[]).await;
    let http = reqwest::Client::new();
    let negotiate = |query: &'static str| {
        let (http, base) = (http.clone(), node.base.clone());
        async move {
            let url = format!("{base}/chathub/negotiate?useStatefulReconnect=true{query}");
            http.post(url).send().await.unwrap().json::<Value>().await.unwrap()
        }
    };
    let v0 = negotiate("").await;
    assert_eq!(v0["negotiateVersion"], 0);
    assert!(v0.get("useStatefulReconnect").is_none(), "{v0}");
    let v1 = negotiate("&negotiateVersion=1").await;
    assert_eq!(v1["useStatefulReconnect"], true, "{v1}");
}

/// The node process's resident memory now and at its peak (VmRSS, VmHWM), in bytes.
fn node_memory(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("node's /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .expect("memory field")
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Fills the chat history with `n` messages of `size` bytes, as nodes store
/// them; answers every id, oldest first.
async fn fill_history(redis: &RedisServer, n: usize, size: usize) -> Vec<String> {
    let mut c = redis.connection().await;
    let text = "x".repeat(size);
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("XADD").arg("switchboard:history").arg("*");
        for (k, v) in [
            ("uid", format!("{i:032x}")),
            ("user", "filler".to_string()),
            ("message", text.clone()),
            ("connectionId", "c".to_string()),
            ("nodeId", "elsewhere".to_string()),
            ("timestamp", "2026-12-03T00:00:00Z".to_string()),
        ] {
            pipe.arg(k).arg(v);
        }
    }
    let ids: Vec<String> = pipe.query_async(&mut c).await.expect("XADD");
    assert_eq!(ids.len(), n);
    ids
}

/// A WebSocket client that asks for `invocations` and then never reads
/// (with a small receive buffer, so the node's side fills soon). Kept open
/// while the returned stream lives.
async fn never_reading(base: &str, invocations: &[Value]) -> Box<dyn std::any::Any + Send> {
    let http = reqwest::Client::new();
    let body: Value =
        http.post(format!("{base}/chathub/negotiate?negotiateVersion=1")).send().await.unwrap().json().await.unwrap();
    let token = body["connectionToken"].as_str().unwrap().to_string();
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let url = ws_url(&format!("{base}/chathub?id={token}"));
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await.expect("websocket");
    use futures_util::{SinkExt, StreamExt};
    let (mut sink, stream) = ws.split();
    let mut frame = record(&json!({"protocol": "json", "version": 1}));
    for inv in invocations {
        frame.extend(record(inv));
    }
    let text = String::from_utf8(frame).unwrap();
    sink.send(tokio_tungstenite::tungstenite::Message::Text(text.into())).await.unwrap();
    Box::new((sink, stream))
}

/// How much the node's peak resident memory grew over `before` once it has
/// settled (see `settled_peak`), reported as `what`.
async fn added_memory(pid: i32, before: u64, what: &str) -> u64 {
    let peak = settled_peak(pid).await;
    let added = peak.saturating_sub(before);
    eprintln!("{what}: node RSS {} MB before, peak {} MB (+{} MB)", before / MB, peak / MB, added / MB);
    added
}

/// Waits until the node's resident memory has not grown for two seconds
/// (at most 30 s), then answers its peak.
async fn settled_peak(pid: i32) -> u64 {
    let mut last = node_memory(pid).0;
    let mut still = 0;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = node_memory(pid).0;
        still = if now > last + 1024 * 1024 { 0 } else { still + 1 };
        last = last.max(now);
        if still >= 4 {
            break;
        }
    }
    node_memory(pid).1
}

const MB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_that_are_never_read_hold_the_byte_budget_and_a_reading_client_gets_everything_once() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "solo", &[]).await;
    let ids = fill_history(&redis, 1000, 30_000).await;
    let oldest = &ids[0];
    let pid = node.process.pid();
    let (before, _) = node_memory(pid);
    let resume = json!({"type": 1, "invocationId": "r", "target": "Resume", "arguments": [oldest]});
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(never_reading(&node.base, std::slice::from_ref(&resume)).await);
    }
    let added = added_memory(pid, before, "30 unread resumes over 1,000 x 30 KB").await;
    assert!(added <= 64 * MB, "30 clients that never read added {} MB to the node", added / MB);

    // A client that reads gets every message after its id, in order, once.
    let opts = switchboard_tests::ConnectOptions { message_ids: true, ..Default::default() };
    let mut c =
        HubClient::connect_opts(&reqwest::Client::new(), &node.base, TransportKind::WebSockets, opts).await.unwrap();
    assert_eq!(c.invoke("Resume", vec![json!(oldest)]).await, Ok(json!(999)));
    let got: Vec<String> = c.take_arguments("ReceiveMessage", 4);
    assert_eq!(got, ids[1..], "every missed message, in order, once");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_that_are_never_read_hold_the_byte_budget_and_read_redis_in_proportion_to_the_page() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "solo", &[]).await;
    fill_history(&redis, 1000, 30_000).await;
    let pid = node.process.pid();

    // One call reads about what it returns from Redis, not all it was asked for.
    let mut c = HubClient::connect(&reqwest::Client::new(), &node.base, TransportKind::WebSockets).await.unwrap();
    let mut r = redis.connection().await;
    let sent_by_redis = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("total_net_output_bytes")
    };
    let info = || redis::cmd("INFO").arg("stats").clone();
    let out_before = sent_by_redis(info().query_async(&mut r).await.unwrap());
    let page = c.invoke("GetHistory", vec![json!(1000)]).await.unwrap();
    let out_after = sent_by_redis(info().query_async(&mut r).await.unwrap());
    let page_bytes = page.to_string().len() as u64;
    let read = out_after - out_before;
    eprintln!(
        "GetHistory(1000): a page of {} messages, {page_bytes} bytes; Redis sent {read} bytes",
        page.as_array().unwrap().len()
    );
    assert!(page_bytes > 256 * 1024, "a page of about half the 1 MB budget: {page_bytes}");
    assert!(read <= 2 * page_bytes + 256 * 1024, "Redis sent {read} bytes for a {page_bytes}-byte page");

    let (before, _) = node_memory(pid);
    let call = |i: u32| json!({"type": 1, "invocationId": i.to_string(), "target": "GetHistory", "arguments": [1000]});
    let calls = [call(1), call(2), call(3)];
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(never_reading(&node.base, &calls).await);
    }
    let added = added_memory(pid, before, "30 unread clients x 3 GetHistory(1000)").await;
    assert!(added <= 64 * MB, "30 clients that never read added {} MB to the node", added / MB);
    assert_eq!(c.invoke("Echo", vec![json!(1)]).await, Ok(json!(1)), "the node still serves");
    drop(idle);
}

/// An HTTP client that sends `token` as a bearer token on every request.
fn signed_in(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

/// The arguments of the next `ReceiveMessage` carrying `text`.
async fn heard(c: &mut HubClient, text: &str) -> Vec<Value> {
    let v = c.expect(WAIT, |v| v["target"] == "ReceiveMessage" && v["arguments"][1] == text).await;
    v.unwrap_or_else(|| panic!("{text:?} never arrived"))["arguments"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_optional_sign_in_an_anonymous_client_cannot_pass_as_a_signed_in_user() {
    const SECRET: &str = "a-secret-for-the-security-tests-0123456789";
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "solo", &["--auth", "optional", "--auth-secret", SECRET]).await;
    let signer = switchboard_tests::token_signer(SECRET);
    let plain = reqwest::Client::new();
    let mut watcher = HubClient::connect(&plain, &node.base, TransportKind::WebSockets).await.unwrap();
    assert_eq!(watcher.invoke("GetOnlineUsers", vec![]).await, Ok(json!([])));
    let token = signer.issue("alice", 3600).unwrap();
    let alice = HubClient::connect(&signed_in(&token), &node.base, TransportKind::LongPolling).await.unwrap();
    assert_eq!(watcher.expect_event("UserJoined", WAIT).await, Some(vec![json!("alice")]));
    let mut anon = HubClient::connect(&plain, &node.base, TransportKind::WebSockets).await.unwrap();

    // The anonymous "alice" is online, and speaks, as "~alice".
    assert_eq!(anon.invoke("SetUser", vec![json!("alice")]).await, Ok(Value::Null));
    assert_eq!(watcher.expect_event("UserJoined", WAIT).await, Some(vec![json!("~alice")]));
    anon.send("SendMessage", vec![json!("alice"), json!("from the anonymous one")]).await;
    assert_eq!(heard(&mut watcher, "from the anonymous one").await[0], "~alice");
    alice.send("SendMessage", vec![json!("anything"), json!("from the signed-in one")]).await;
    assert_eq!(heard(&mut watcher, "from the signed-in one").await[0], "alice");
    let mut online: Vec<String> =
        serde_json::from_value(watcher.invoke("GetOnlineUsers", vec![]).await.unwrap()).unwrap();
    online.sort();
    assert_eq!(online, ["alice", "~alice"]);
    // The mark cannot be typed, and a token cannot claim it either.
    let refused = anon.invoke("SetUser", vec![json!("~alice")]).await.unwrap_err();
    assert!(refused.contains("may not begin"), "{refused}");
    let marked = signer.issue("~bob", 3600).unwrap();
    let status = plain
        .post(format!("{}/chathub/negotiate?negotiateVersion=1", node.base))
        .bearer_auth(marked)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401, "a token whose name carries the anonymous mark");

    // When alice leaves, she is gone; the anonymous one stays.
    let deleted = plain.delete(format!("{}/chathub?id={}", node.base, alice.id)).bearer_auth(&token).send().await;
    assert_eq!(deleted.unwrap().status(), 202);
    assert_eq!(watcher.expect_event("UserLeft", WAIT).await, Some(vec![json!("alice")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_invisible_or_reordering_characters_are_refused_and_renames_are_rate_limited() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "solo", &[]).await;
    let http = reqwest::Client::new();
    let mut c = HubClient::connect(&http, &node.base, TransportKind::WebSockets).await.unwrap();
    for bad in ["ali\u{202E}ecila", "a\u{200B}b", "line\u{2028}break", "\u{FEFF}bom", "~marked"] {
        assert!(c.invoke("SetUser", vec![json!(bad)]).await.is_err(), "SetUser({bad:?})");
        assert!(c.invoke("SendMessage", vec![json!(bad), json!("x")]).await.is_err(), "SendMessage({bad:?}, …)");
    }
    // A burst of renames: the first few pass, then one a second.
    let mut watcher = HubClient::connect(&http, &node.base, TransportKind::WebSockets).await.unwrap();
    assert_eq!(watcher.invoke("GetOnlineUsers", vec![]).await, Ok(json!([])));
    let mut passed = 0;
    for i in 0..50 {
        if c.invoke("SetUser", vec![json!(format!("name{i}"))]).await.is_ok() {
            passed += 1;
        }
    }
    assert!((5..=8).contains(&passed), "{passed} of 50 renames in a burst passed");
    let refused = c.invoke("SetUser", vec![json!("one more")]).await.unwrap_err();
    assert!(refused.contains("renaming too often"), "{refused}");
    let joined = watcher.drain_pending().len();
    assert!(joined <= 2 * 8, "the watcher got {joined} presence events for 50 renames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_a_client_chooses_reaches_the_nodes_log_escaped() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "solo", &[]).await;
    let forged = "\u{1b}[31mR\u{1b}[0m\n2026-12-02T00:00:00.000000Z  INFO switchboard_node: FORGED";
    let http = reqwest::Client::new();
    // A handshake whose protocol name is the forgery, and a message whose
    // target is (after a good handshake): both are refused and logged.
    for frames in [
        vec![record(&json!({"protocol": forged, "version": 1}))],
        vec![
            record(&json!({"protocol": "json", "version": 1})),
            record(&json!({"type": 1, "target": 7, "arguments": [forged]})),
        ],
        vec![
            record(&json!({"protocol": "json", "version": 1})),
            format!("{{\"type\":1,\"{forged}\":1}}\u{1e}").into_bytes(),
        ],
    ] {
        let body: Value = http
            .post(format!("{}/chathub/negotiate?negotiateVersion=1", node.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let url = ws_url(&format!("{}/chathub?id={}", node.base, body["connectionToken"].as_str().unwrap()));
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        for f in frames {
            ws.send(Message::Text(String::from_utf8(f).unwrap().into())).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = switchboard_tests::eventually(WAIT, "the refusal in the log", || async {
        let log = node.process.log_text();
        log.contains("handshake refused").then_some(log)
    })
    .await;
    assert!(!log.contains('\u{1b}'), "a terminal escape reached the log:\n{log}");
    assert!(!log.lines().any(|l| l.starts_with("2026-12-02T00:00:00")), "a forged line:\n{log}");
    assert!(log.contains("\\u{1b}[31mR"), "the text is logged, escaped:\n{log}");
}
