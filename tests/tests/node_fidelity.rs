//! The rules where the official ASP.NET Core server is more permissive or
//! does more than the bare spec, which third-party clients rely on: every
//! handshake version up to the server's own, a long-polling send before the
//! first poll, concurrent sends taken in turn, the MessagePack protocol on
//! WebSockets and long polling (refused on Server-Sent Events) crossing to
//! JSON clients on other nodes, and stateful reconnect (numbered messages,
//! Ack, Sequence, resume on a new socket within the window). Each against a
//! real node and Redis, over real sockets.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use switchboard_tests::client::{negotiate, record, ws_url, WireDecoder};
use switchboard_tests::{
    eventually, get_text, metric_value, ConnectOptions, HubClient, InProcessNode, Protocol, RedisServer, TransportKind,
    ALL_TRANSPORTS, WAIT,
};
use tokio_tungstenite::tungstenite::Message;

async fn one_node(extra: &[&str]) -> (RedisServer, InProcessNode, reqwest::Client) {
    let redis = RedisServer::start();
    let node = InProcessNode::start(&redis, "solo", extra).await;
    (redis, node, reqwest::Client::new())
}

/// The negotiate answer for `query`, parsed.
async fn negotiate_at(http: &reqwest::Client, base: &str, query: &str) -> Value {
    let url = format!("{base}/chathub/negotiate?{query}");
    http.post(url).send().await.unwrap().json().await.unwrap()
}

fn opts(protocol: Protocol, negotiate_version: Option<u32>, handshake_version: u32) -> ConnectOptions {
    ConnectOptions { negotiate_version, protocol, handshake_version, message_ids: false }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handshake_version_up_to_two_works_on_every_transport() {
    let (_r, node, http) = one_node(&[]).await;
    for kind in ALL_TRANSPORTS {
        // Version 0 after a negotiate without negotiateVersion is what some
        // Python clients send.
        for (negotiate_version, hs) in [(None, 0), (Some(1), 0), (Some(1), 1), (Some(1), 2), (None, 1)] {
            let mut c = HubClient::connect_opts(&http, &node.base, kind, opts(Protocol::Json, negotiate_version, hs))
                .await
                .unwrap_or_else(|e| panic!("{kind:?} negotiate {negotiate_version:?} handshake v{hs}: {e}"));
            assert_eq!(c.invoke("Echo", vec![json!(hs)]).await, Ok(json!(hs)), "{kind:?} v{hs}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_polling_send_before_the_first_poll_is_accepted() {
    let (_r, node, http) = one_node(&[]).await;
    let body = negotiate(&http, &node.base, Some(1)).await.unwrap();
    let url = format!("{}/chathub?id={}", node.base, body["connectionToken"].as_str().unwrap());
    // Handshake and an invocation posted before any poll.
    let mut early = record(&json!({"protocol":"json","version":1}));
    early.extend(record(&json!({"type":1,"invocationId":"e","target":"Echo","arguments":["early"]})));
    let post = http.post(&url).body(early).send().await.unwrap();
    assert_eq!(post.status(), 200);
    assert!(post.bytes().await.unwrap().is_empty(), "a send answers with an empty body");
    // The first poll still starts the connection with an empty 200; the next
    // one carries the handshake answer and the completion.
    let first = http.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.bytes().await.unwrap().is_empty());
    let second = http.get(&url).send().await.unwrap().bytes().await.unwrap();
    let mut d = WireDecoder::new(Protocol::Json);
    let got = d.feed(&second);
    assert_eq!(got[0], json!({}));
    assert_eq!(got[1]["result"], "early", "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_on_one_connection_are_taken_in_turn() {
    let (r, node, http) = one_node(&[]).await;
    let mut c = HubClient::connect(&http, &node.base, TransportKind::LongPolling).await.unwrap();
    // GetHistory waits on Redis; pause Redis so the first POST stays in progress.
    let redis = redis::Client::open(r.url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("ALL").query_async(&mut conn).await.unwrap();
    let slow = record(&json!({"type":1,"invocationId":"h","target":"GetHistory","arguments":[1]}));
    let url = format!("{}/chathub?id={}", c.base, c.id);
    let received = "switchboard_node_messages_received_total";
    let before = metric_value(&get_text(&format!("{}/metrics", node.base)).await, received);
    let first = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move { http.post(url).body(slow).send().await.unwrap().status() }
    });
    // The first POST is in the node (its message counted, its GetHistory
    // waiting on the paused Redis) before the second is sent.
    eventually(WAIT, "the first POST's message to reach the hub", || async {
        let now = metric_value(&get_text(&format!("{}/metrics", node.base)).await, received);
        (now > before).then_some(())
    })
    .await;
    // The official server waits on the connection's write lock: no 409.
    let second = c.post(record(&json!({"type":1,"invocationId":"e","target":"Echo","arguments":[2]}))).await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(tokio::time::timeout(WAIT, first).await.unwrap().unwrap(), 200);
    // Both ran, in the order they were sent.
    let h = c.expect(WAIT, |v| v["type"] == 3).await.unwrap();
    assert_eq!(h["invocationId"], "h", "the first send completes first: {h}");
    assert_eq!(c.expect(WAIT, |v| v["type"] == 3).await.unwrap()["invocationId"], "e");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messagepack_works_on_websockets_and_long_polling() {
    let (_r, node, http) = one_node(&["--max-message-bytes", "65536"]).await;
    let big = "é".repeat(10_000); // 20 KB of UTF-8
    let nested = json!({"a": [1, -2, 3.5, null, true, {"b": "c"}], "n": 1u64 << 40});
    for kind in [TransportKind::WebSockets, TransportKind::LongPolling] {
        for hs in [1, 2] {
            let mut c = HubClient::connect_opts(&http, &node.base, kind, opts(Protocol::MessagePack, Some(1), hs))
                .await
                .unwrap_or_else(|e| panic!("{kind:?} messagepack v{hs}: {e}"));
            assert_eq!(c.invoke("Echo", vec![json!(big)]).await, Ok(json!(big)), "{kind:?}");
            assert_eq!(c.invoke("Echo", vec![nested.clone()]).await, Ok(nested.clone()), "{kind:?}");
            let err = c.invoke("NoSuchMethod", vec![]).await.unwrap_err();
            assert!(err.contains("Method does not exist"), "{err}");
            c.invoke("GetNodeInfo", vec![]).await.unwrap();
            let info = c.expect_event("NodeInfo", WAIT).await.unwrap();
            assert_eq!(info[0], "solo");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messagepack_is_refused_on_server_sent_events_as_the_official_server_does() {
    let (_r, node, http) = one_node(&[]).await;
    let err = HubClient::connect_opts(
        &http,
        &node.base,
        TransportKind::ServerSentEvents,
        opts(Protocol::MessagePack, Some(1), 1),
    )
    .await
    .err()
    .expect("the handshake is refused");
    assert!(err.contains("does not support 'Binary' transfer format"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_messagepack_clients_on_different_nodes_hear_each_other() {
    let redis = RedisServer::start();
    let a = InProcessNode::start(&redis, "node-a", &[]).await;
    let b = InProcessNode::start(&redis, "node-b", &[]).await;
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for (node, protocol, kind) in [
        (&a, Protocol::Json, TransportKind::WebSockets),
        (&a, Protocol::MessagePack, TransportKind::WebSockets),
        (&b, Protocol::MessagePack, TransportKind::LongPolling),
        (&b, Protocol::Json, TransportKind::ServerSentEvents),
    ] {
        let mut c = HubClient::connect_opts(&http, &node.base, kind, opts(protocol, Some(1), 1)).await.unwrap();
        c.invoke("JoinGroup", vec![json!("room")]).await.unwrap();
        clients.push(c);
    }
    for sender in 0..clients.len() {
        let text = format!("from {sender}");
        clients[sender].invoke("SendMessage", vec![json!("u"), json!(text)]).await.unwrap();
        clients[sender].invoke("SendMessageToGroup", vec![json!("room"), json!("u"), json!(text)]).await.unwrap();
        for (i, c) in clients.iter_mut().enumerate() {
            let got = c.expect_event("ReceiveMessage", WAIT).await.unwrap_or_else(|| panic!("{i} missed {text}"));
            assert_eq!(got[1], json!(text), "client {i} ({:?})", c.protocol);
            let got = c.expect_event("ReceiveGroupMessage", WAIT).await.unwrap();
            assert_eq!(got[2], json!(text));
        }
    }
    // Exactly once: nothing else arrived.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for c in &mut clients {
        let extra: Vec<_> = c
            .drain_pending()
            .into_iter()
            .filter(|i| matches!(i, switchboard_tests::client::Incoming::Message(v) if v["type"] == 1))
            .collect();
        assert!(extra.is_empty(), "{extra:?}");
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw_messagepack_ws(base: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/chathub", ws_url(base))).await.unwrap();
    ws.send(Message::Text((r#"{"protocol":"messagepack","version":1}"#.to_string() + "\u{1e}").into())).await.unwrap();
    let reply = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply.into_data().as_ref(), b"{}\x1e");
    ws
}

/// Reads until the server's Close message; returns its error text.
async fn close_error(ws: &mut Ws) -> String {
    let mut d = WireDecoder::after_handshake(Protocol::MessagePack);
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a Close in time") {
            Some(Ok(Message::Binary(b))) => {
                if let Some(close) = d.feed(&b).into_iter().find(|v| v["type"] == 7) {
                    return close["error"].as_str().unwrap_or_default().to_string();
                }
            }
            Some(Ok(_)) => {}
            other => panic!("socket ended without a Close: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messagepack_closes_the_connection_with_an_error() {
    let (_r, node, _http) = one_node(&["--max-message-bytes", "1024"]).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not MessagePack", vec![0x01, 0xc1]),
        ("not an array", vec![0x01, 0x05]),
        ("invocation without target", vec![0x04, 0x93, 0x01, 0x80, 0xc0]),
        ("arguments not an array", vec![0x07, 0x95, 0x01, 0x80, 0xc0, 0xa1, b'x', 0x05]),
        ("length above the limit", vec![0x81, 0x10]),
        ("six-byte length", vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
    ];
    for (what, bytes) in cases {
        let mut ws = raw_messagepack_ws(&node.base).await;
        ws.send(Message::Binary(bytes.into())).await.unwrap();
        let err = close_error(&mut ws).await;
        assert!(!err.is_empty(), "{what}: Close without an error");
    }
    // A message split across frames waits for its end, then is judged whole:
    // five bytes announced ([1, {}, nil, ""], no arguments), two sent first.
    let mut ws = raw_messagepack_ws(&node.base).await;
    ws.send(Message::Binary(vec![0x05, 0x94, 0x01].into())).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
    assert!(early.is_err(), "the node answered {early:?} to an incomplete message");
    ws.send(Message::Binary(vec![0x80, 0xc0, 0xa0].into())).await.unwrap();
    assert!(close_error(&mut ws).await.contains("arguments"));
    // The node is still fine.
    let mut ws = raw_messagepack_ws(&node.base).await;
    let echo =
        switchboard_tests::msgpack::encode(&json!({"type":1,"invocationId":"1","target":"Echo","arguments":["ok"]}));
    ws.send(Message::Binary(echo.into())).await.unwrap();
    let reply = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(WireDecoder::after_handshake(Protocol::MessagePack).feed(&reply.into_data())[0]["result"], "ok");
}

// ---- stateful reconnect ----

struct StatefulClient {
    base: String,
    token: String,
    ws: Option<Ws>,
    decoder: WireDecoder,
    queue: std::collections::VecDeque<Value>,
}

impl StatefulClient {
    async fn connect(http: &reqwest::Client, base: &str) -> Self {
        let body = negotiate_at(http, base, "negotiateVersion=1&useStatefulReconnect=true").await;
        assert_eq!(body["useStatefulReconnect"], true, "{body}");
        let token = body["connectionToken"].as_str().unwrap().to_string();
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("{}/chathub?id={token}", ws_url(base))).await.unwrap();
        ws.send(Message::Text((r#"{"protocol":"json","version":2}"#.to_string() + "\u{1e}").into())).await.unwrap();
        let mut c = StatefulClient {
            base: base.to_string(),
            token,
            ws: Some(ws),
            decoder: WireDecoder::new(Protocol::Json),
            queue: Default::default(),
        };
        assert_eq!(c.next().await, json!({}));
        c
    }

    async fn next(&mut self) -> Value {
        self.next_within(WAIT).await.expect("a message in time")
    }

    async fn next_within(&mut self, limit: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(v) = self.queue.pop_front() {
                return Some(v);
            }
            let ws = self.ws.as_mut()?;
            match tokio::time::timeout_at(deadline, ws.next()).await.ok()? {
                Some(Ok(m)) => {
                    let got = self.decoder.feed(&m.into_data());
                    self.queue.extend(got);
                }
                _ => return None,
            }
        }
    }

    /// Texts of the next `n` ReceiveMessage events (Pings and Acks skipped).
    async fn messages(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            let v = self.next().await;
            if v["type"] == 1 && v["target"] == "ReceiveMessage" {
                out.push(v["arguments"][1].as_str().unwrap().to_string());
            }
        }
        out
    }

    async fn send(&mut self, v: Value) {
        let ws = self.ws.as_mut().expect("a socket");
        ws.send(Message::Text(String::from_utf8(record(&v)).unwrap().into())).await.unwrap();
    }

    /// Drops the TCP connection without a WebSocket close, as a cut network does.
    fn cut(&mut self) {
        self.ws = None;
        self.queue.clear();
    }

    /// A new socket for the same connection (no handshake: it resumes).
    async fn reconnect(&mut self) -> Result<(), String> {
        let url = format!("{}/chathub?id={}", ws_url(&self.base), self.token);
        let (ws, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| e.to_string())?;
        self.ws = Some(ws);
        self.decoder = WireDecoder::after_handshake(Protocol::Json);
        Ok(())
    }
}

/// Sends each text and waits until it came back to the sender, so it has
/// been delivered on the node (every connection's copy is queued in the
/// same step as the sender's).
async fn broadcast(sender: &mut HubClient, texts: impl IntoIterator<Item = String>) {
    for t in texts {
        sender.invoke("SendMessage", vec![json!("s"), json!(t)]).await.unwrap();
        sender
            .expect(WAIT, |v| v["target"] == "ReceiveMessage" && v["arguments"][1] == t.as_str())
            .await
            .unwrap_or_else(|| panic!("{t} never came back to its sender"));
    }
}

fn texts(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_connection_resumes_on_a_new_socket_and_loses_nothing() {
    let (_r, node, http) = one_node(&["--reconnect-window-secs", "3"]).await;
    let mut sender = HubClient::connect(&http, &node.base, TransportKind::WebSockets).await.unwrap();
    let mut c = StatefulClient::connect(&http, &node.base).await;
    broadcast(&mut sender, texts(0..5)).await;
    assert_eq!(c.messages(5).await, texts(0..5));
    // Acknowledge the first two, then lose the socket once the node has
    // taken the ack (the acknowledged messages leave its buffer).
    let buffered = || async {
        metric_value(&get_text(&format!("{}/metrics", node.base)).await, "switchboard_node_stateful_buffer_bytes")
    };
    let before = buffered().await;
    assert!(before > 0.0, "five unacknowledged messages are buffered");
    c.send(json!({"type":8,"sequenceId":2})).await;
    eventually(WAIT, "the node to take the ack", || async { (buffered().await < before).then_some(()) }).await;
    c.cut();
    broadcast(&mut sender, texts(5..8)).await;
    c.reconnect().await.unwrap();
    // The node starts with Sequence (the first unacknowledged id) and resends
    // everything from there, then what was sent while the socket was gone.
    assert_eq!(c.next().await, json!({"type":9,"sequenceId":3}));
    assert_eq!(c.messages(6).await, texts(2..8));
    // The client resumes its side; the connection then works as before.
    c.send(json!({"type":9,"sequenceId":1})).await;
    c.send(json!({"type":1,"invocationId":"1","target":"Echo","arguments":["after"]})).await;
    let done = loop {
        let v = c.next().await;
        if v["type"] == 3 {
            break v;
        }
    };
    assert_eq!(done["result"], "after");
    // The node acknowledges what it received (about once a second).
    let ack = loop {
        let v = c.next().await;
        if v["type"] == 8 {
            break v;
        }
    };
    assert_eq!(ack["sequenceId"], 1);
    let metrics = get_text(&format!("{}/metrics", node.base)).await;
    assert!(metrics.contains("switchboard_node_stateful_resumes_total 1"), "{metrics}");
    assert!(metrics.contains("switchboard_node_stateful_resent_messages_total 6"), "{metrics}");
    // Nothing twice: more messages continue the sequence.
    broadcast(&mut sender, texts(8..10)).await;
    assert_eq!(c.messages(2).await, texts(8..10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_the_client_resends_are_dropped() {
    let (_r, node, http) = one_node(&[]).await;
    let mut c = StatefulClient::connect(&http, &node.base).await;
    let echo = |id: &str| json!({"type":1,"invocationId":id,"target":"Echo","arguments":[id]});
    c.send(echo("a")).await; // sequence 1
    c.send(echo("b")).await; // sequence 2
    let mut got = Vec::new();
    while got.len() < 2 {
        let v = c.next().await;
        if v["type"] == 3 {
            got.push(v["result"].clone());
        }
    }
    c.cut();
    c.reconnect().await.unwrap();
    // The client did not see an Ack for 2, so it resends it after Sequence 2.
    c.send(json!({"type":9,"sequenceId":2})).await;
    c.send(echo("b")).await;
    c.send(echo("c")).await;
    // The node resends its own unacknowledged completions (a, b); the
    // client's resent b is a duplicate and does not run again; c runs.
    let mut after = Vec::new();
    while after.len() < 3 {
        let v = c.next().await;
        if v["type"] == 3 {
            after.push(v["result"].clone());
        }
    }
    assert_eq!(after, vec![json!("a"), json!("b"), json!("c")], "b ran once, c once");
    assert!(c.next_within(Duration::from_millis(300)).await.is_none_or(|v| v["type"] != 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sequence_numbers_and_late_resumes_are_refused() {
    let (_r, node, http) = one_node(&["--reconnect-window-secs", "0.5"]).await;
    // A Sequence beyond what the node received: Close with an error.
    let mut c = StatefulClient::connect(&http, &node.base).await;
    c.cut();
    c.reconnect().await.unwrap();
    c.send(json!({"type":9,"sequenceId":5})).await;
    let close = loop {
        let v = c.next().await;
        if v["type"] == 7 {
            break v;
        }
    };
    assert!(close["error"].as_str().unwrap().contains("Sequence ID greater"), "{close}");
    // After the window: the connection is gone, a resume gets 404.
    let mut c = StatefulClient::connect(&http, &node.base).await;
    c.cut();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = c.reconnect().await.unwrap_err();
    assert!(err.contains("404"), "{err}");
    // Without stateful reconnect negotiated, a second socket is still a 409
    // and a handshake of version 2 gets no Sequence or Ack.
    let plain = HubClient::connect_opts(&http, &node.base, TransportKind::WebSockets, opts(Protocol::Json, Some(1), 2))
        .await
        .unwrap();
    let second = tokio_tungstenite::connect_async(format!("{}/chathub?id={}", ws_url(&node.base), plain.id)).await;
    assert!(matches!(second, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 409));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_client_that_never_acknowledges_is_bounded() {
    let (_r, node, http) = one_node(&["--stateful-buffer-bytes", "2000", "--max-buffered-frames", "40"]).await;
    let mut sender = HubClient::connect(&http, &node.base, TransportKind::WebSockets).await.unwrap();
    let mut c = StatefulClient::connect(&http, &node.base).await;
    broadcast(&mut sender, (0..100).map(|i| format!("{i:0>100}"))).await;
    // Writing pauses once 2,000 unacknowledged bytes are on the wire; what
    // queues behind it is bounded too, so the node gives up on the client.
    let mut received = 0;
    let close = loop {
        let v = c.next().await;
        match v["type"].as_u64() {
            Some(1) => received += 1,
            Some(7) => break v,
            _ => {}
        }
    };
    // At most the 2,000 bytes (each message is over 100) and one batch, then
    // the 40 frames that queued behind them when the node gave up.
    assert!(received <= 2000 / 100 + 1 + 40, "{received} of 100 messages written to a client that never acknowledged");
    assert!(close["error"].as_str().unwrap().contains("too slow"), "{close}");
    let metrics = get_text(&format!("{}/metrics", node.base)).await;
    assert!(metrics.contains("switchboard_node_stateful_buffer_bytes 0"), "buffer released: {metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiate_and_invocation_details_match_the_official_server() {
    let (_r, node, http) = one_node(&[]).await;
    // Only POST negotiates.
    let get = http.get(format!("{}/chathub/negotiate", node.base)).send().await.unwrap();
    assert_eq!(get.status(), 405);
    // Query keys are case-insensitive, as ASP.NET Core's query collection is.
    let v = negotiate_at(&http, &node.base, "NegotiateVersion=1&UseStatefulReconnect=True").await;
    assert_eq!((v["negotiateVersion"].as_u64(), v["useStatefulReconnect"].as_bool()), (Some(1), Some(true)), "{v}");
    // A node with stateful reconnect off never offers it.
    let (_r2, plain, _) = one_node(&["--stateful-reconnect", "false"]).await;
    let v = negotiate_at(&http, &plain.base, "negotiateVersion=1&useStatefulReconnect=true").await;
    assert!(v.get("useStatefulReconnect").is_none(), "{v}");
    // An invocation that opens client streams gets an error and the
    // connection stays open, in both protocols.
    for protocol in [Protocol::Json, Protocol::MessagePack] {
        let mut c = HubClient::connect_opts(&http, &node.base, TransportKind::WebSockets, opts(protocol, Some(1), 1))
            .await
            .unwrap();
        let msg = json!({"type":1,"invocationId":"s","target":"Echo","arguments":[],"streamIds":["1"]});
        let bytes = match protocol {
            Protocol::Json => record(&msg),
            Protocol::MessagePack => {
                // The test encoder writes no stream ids; build this one by hand.
                let mut body = Vec::new();
                let arr = rmpv::Value::Array(vec![
                    1.into(),
                    rmpv::Value::Map(vec![]),
                    "s".into(),
                    "Echo".into(),
                    rmpv::Value::Array(vec![]),
                    rmpv::Value::Array(vec!["1".into()]),
                ]);
                rmpv::encode::write_value(&mut body, &arr).unwrap();
                let mut framed = Vec::new();
                switchboard_tests::msgpack::varint(&mut framed, body.len());
                framed.extend(body);
                framed
            }
        };
        c.send_raw(bytes).await.unwrap();
        let done = c.expect(WAIT, |v| v["type"] == 3 && v["invocationId"] == "s").await.unwrap();
        assert!(done["error"].as_str().unwrap().contains("Client sent 1 stream(s)"), "{done}");
        assert_eq!(c.invoke("Echo", vec![json!("open")]).await, Ok(json!("open")), "{protocol:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_handshakes_and_abandoned_long_polls_are_dropped() {
    let (_r, node, http) = one_node(&["--handshake-timeout-secs", "0.5", "--long-poll-idle-secs", "0.5"]).await;
    // A WebSocket that never sends its handshake is closed.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/chathub", ws_url(&node.base))).await.unwrap();
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the node keeps a connection that never shook hands");
    // A long-polling connection nobody polls any more is forgotten.
    let body = negotiate(&http, &node.base, Some(1)).await.unwrap();
    let url = format!("{}/chathub?id={}", node.base, body["connectionToken"].as_str().unwrap());
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(http.post(&url).body("x").send().await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_invocations_all_get_their_completions() {
    let (_r, node, http) = one_node(&[]).await;
    for (kind, n) in [(TransportKind::WebSockets, 1800), (TransportKind::LongPolling, 1500)] {
        let mut c = HubClient::connect(&http, &node.base, kind).await.unwrap();
        let mut frame = Vec::new();
        for i in 0..n {
            frame.extend(record(&json!({"type":1,"invocationId":i.to_string(),"target":"Echo","arguments":[i]})));
        }
        c.send_raw(frame).await.unwrap();
        for i in 0..n {
            let done = c
                .expect(WAIT, |v| v["type"] == 3 || v["type"] == 7)
                .await
                .unwrap_or_else(|| panic!("{kind:?}: completion {i} of {n} missing"));
            assert_eq!(done["type"], 3, "{kind:?}: closed after {i} completions: {done}");
            assert_eq!(done["result"], json!(i), "{kind:?}: in order");
        }
    }
}
