//! A single node speaks the SignalR protocol as the spec and the official
//! server do: negotiate v0 and v1, the three transports with their status
//! codes, and a clear answer to every kind of bad input without disturbing
//! other connections. The node runs in-process (`InProcessNode`).

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard_tests::client::{negotiate, record, ws_url};
use switchboard_tests::{get_text, HubClient, InProcessNode, RedisServer, TransportKind, ALL_TRANSPORTS, WAIT};
use tokio_tungstenite::tungstenite::Message;

async fn one_node() -> (RedisServer, InProcessNode, reqwest::Client) {
    let redis = RedisServer::start();
    let node = InProcessNode::start(&redis, "solo", &["--max-message-bytes", "1024"]).await;
    (redis, node, reqwest::Client::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiate_v1_returns_a_token_and_v0_does_not() {
    let (_r, node, http) = one_node().await;
    let v1 = negotiate(&http, &node.base, Some(1)).await.unwrap();
    assert_eq!(v1["negotiateVersion"], 1);
    assert!(v1["connectionToken"].as_str().is_some_and(|t| !t.is_empty()));
    assert_ne!(v1["connectionToken"], v1["connectionId"]);
    let transports: Vec<&str> =
        v1["availableTransports"].as_array().unwrap().iter().map(|t| t["transport"].as_str().unwrap()).collect();
    assert_eq!(transports, ["WebSockets", "ServerSentEvents", "LongPolling"]);
    assert!(v1.get("ProtocolVersion").is_none());

    let v0 = negotiate(&http, &node.base, None).await.unwrap();
    assert_eq!(v0["negotiateVersion"], 0);
    assert!(v0.get("connectionToken").is_none());

    let bad = http.post(format!("{}/chathub/negotiate?negotiateVersion=abc", node.base)).send().await.unwrap();
    assert_eq!(bad.status(), 200);
    assert!(bad.json::<Value>().await.unwrap()["error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_works_with_negotiate_v0_and_v1() {
    let (_r, node, http) = one_node().await;
    for kind in ALL_TRANSPORTS {
        for version in [None, Some(1)] {
            let mut c = HubClient::connect_with(&http, &node.base, kind, version).await.unwrap();
            assert_eq!(
                c.invoke("Echo", vec![json!({"k": [1, "two"]})]).await,
                Ok(json!({"k": [1, "two"]})),
                "{kind:?} {version:?}"
            );
            c.send("GetNodeInfo", vec![]).await;
            let info = c.expect_event("NodeInfo", WAIT).await.unwrap();
            assert_eq!(info[0], "solo");
            if version.is_some() {
                assert_eq!(info[1], c.connection_id.as_str());
            } else {
                // A v0 client's connectionId is its secret ?id= key; the hub
                // shows everyone (itself too) a public id instead.
                assert_ne!(info[1], c.connection_id.as_str());
                assert_ne!(info[1], c.id.as_str());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_negotiation_websocket_works() {
    let (_r, node, http) = one_node().await;
    let mut c = HubClient::connect_skip_negotiation(&http, &node.base).await.unwrap();
    assert_eq!(c.invoke("Echo", vec![json!("x")]).await, Ok(json!("x")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_messages_in_one_frame_and_methods_ignore_case() {
    let (_r, node, http) = one_node().await;
    for kind in ALL_TRANSPORTS {
        let mut c = HubClient::connect(&http, &node.base, kind).await.unwrap();
        let mut frame =
            record(&json!({"type":1,"invocationId":"a","target":"echo","arguments":[1],"headers":{"x":"y"}}));
        frame.extend(record(&json!({"type":6})));
        frame.extend(record(&json!({"type":1,"invocationId":"b","target":"ECHO","arguments":[2]})));
        c.send_raw(frame).await.unwrap();
        let a = c.expect(WAIT, |v| v["invocationId"] == "a").await.unwrap();
        let b = c.expect(WAIT, |v| v["invocationId"] == "b").await.unwrap();
        assert_eq!((a["result"].clone(), b["result"].clone()), (json!(1), json!(2)), "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_and_bad_arguments_get_completion_errors_and_the_connection_stays() {
    let (_r, node, http) = one_node().await;
    for kind in ALL_TRANSPORTS {
        let mut c = HubClient::connect(&http, &node.base, kind).await.unwrap();
        let e = c.invoke("NoSuchMethod", vec![]).await.unwrap_err();
        assert!(e.contains("Method does not exist"), "{e}");
        let e = c.invoke("SendMessage", vec![json!("only one")]).await.unwrap_err();
        assert!(e.contains("expects 2"), "{e}");
        let e = c.invoke("SendMessage", vec![json!(1), json!({})]).await.unwrap_err();
        assert!(e.contains("Error binding arguments"), "{e}");
        let e = c.invoke("GetHistory", vec![json!("ten")]).await.unwrap_err();
        assert!(e.contains("count"), "{e}");
        let e = c.invoke("JoinGroup", vec![json!("")]).await.unwrap_err();
        assert!(e.contains("group"), "{e}");
        // A streaming invocation of a non-streaming method.
        c.send_raw(record(&json!({"type":4,"invocationId":"s","target":"Echo","arguments":[1]}))).await.unwrap();
        let s = c.expect(WAIT, |v| v["type"] == 3 && v["invocationId"] == "s").await.unwrap();
        assert!(s["error"].is_string());
        // Unknown message types are ignored.
        c.send_raw(record(&json!({"type":42,"whatever":true}))).await.unwrap();
        assert_eq!(c.invoke("Echo", vec![json!("still here")]).await, Ok(json!("still here")), "{kind:?}");
    }
}

async fn assert_closed_with_error(c: &mut HubClient, what: &str) {
    let close = c.expect_close(WAIT).await.unwrap_or_else(|| panic!("{what}: no Close message"));
    assert!(close["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {close}");
    assert!(c.wait_ended(WAIT).await, "{what}: transport did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_unparsable_messages_and_oversized_messages_close_with_an_error() {
    let (_r, node, http) = one_node().await;
    let bystander_kind = TransportKind::WebSockets;
    let mut bystander = HubClient::connect(&http, &node.base, bystander_kind).await.unwrap();
    for kind in ALL_TRANSPORTS {
        for (what, bad) in [
            ("invalid json", b"{not json\x1e".to_vec()),
            ("no type", b"{\"target\":\"Echo\"}\x1e".to_vec()),
            ("invocation without arguments", b"{\"type\":1,\"target\":\"Echo\"}\x1e".to_vec()),
            ("oversized", record(&json!({"type":1,"target":"Echo","arguments":["x".repeat(2000)]}))),
            ("oversized without separator", vec![b'a'; 1500]),
        ] {
            let mut c = HubClient::connect(&http, &node.base, kind).await.unwrap();
            c.send_raw(bad).await.unwrap();
            assert_closed_with_error(&mut c, &format!("{kind:?} {what}")).await;
        }
    }
    assert_eq!(bystander.invoke("Echo", vec![json!(1)]).await, Ok(json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_are_answered_with_an_error_and_closed() {
    let (_r, node, _http) = one_node().await;
    for hs in [
        &b"{\"protocol\":\"protobuf\",\"version\":1}\x1e"[..],
        b"{\"protocol\":\"json\",\"version\":99}\x1e",
        b"garbage\x1e",
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/chathub", ws_url(&node.base))).await.unwrap();
        ws.send(Message::Text(String::from_utf8_lossy(hs).into_owned().into())).await.unwrap();
        let reply = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        let text = reply.into_text().unwrap();
        let v: Value = serde_json::from_str(text.trim_end_matches('\u{1e}')).unwrap();
        assert!(v["error"].is_string() && v.get("type").is_none(), "{v}");
        let end = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
        assert!(matches!(end, None | Some(Ok(Message::Close(_))) | Some(Err(_))), "{end:?}");
    }
}

/// A frame the WebSocket layer refuses is answered with RFC 6455's close
/// code before the socket closes, as ASP.NET Core's WebSocket does: 1007 for
/// a text frame that is not UTF-8 (one client library sends MessagePack in
/// text frames) and 1009 for a message over the size limit (a framing error
/// gets 1002 the same way; no client library here can send one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_frames_get_their_close_codes() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let (_r, node, _http) = one_node().await;
    let text_frame = |bytes: Vec<u8>| Message::Frame(Frame::message(bytes, OpCode::Data(Data::Text), true));
    let cases = [
        (text_frame(vec![b'{', 0xff, 0xfe, b'}', 0x1e]), 1007u16),
        (Message::Binary(vec![0u8; 100 * 1024].into()), 1009),
    ];
    for (bad, want) in cases {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/chathub", ws_url(&node.base))).await.unwrap();
        ws.send(Message::Text("{\"protocol\":\"json\",\"version\":1}\u{1e}".into())).await.unwrap();
        let hello = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(hello.into_text().unwrap().as_str(), "{}\u{1e}");
        ws.send(bad).await.unwrap();
        let close = loop {
            match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a Close frame with {want}, got {other:?}"),
            }
        };
        assert_eq!(close.map(|f| u16::from(f.code)), Some(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_requests_get_the_spec_status_codes() {
    let (_r, node, http) = one_node().await;
    let url = |q: &str| format!("{}/chathub{q}", node.base);
    // Missing and unknown ids.
    assert_eq!(http.get(url("")).send().await.unwrap().status(), 400);
    assert_eq!(http.post(url("")).body("x").send().await.unwrap().status(), 400);
    assert_eq!(http.delete(url("")).send().await.unwrap().status(), 400);
    for q in ["?id=nope", "?id=bm9kZQ.forged", &format!("?id={}", "a".repeat(5000))] {
        assert_eq!(http.get(url(q)).send().await.unwrap().status(), 404, "{q}");
        assert_eq!(http.post(url(q)).body("x").send().await.unwrap().status(), 404, "{q}");
        assert_eq!(http.delete(url(q)).send().await.unwrap().status(), 404, "{q}");
    }
    let ws_unknown = tokio_tungstenite::connect_async(format!("{}/chathub?id=nope", ws_url(&node.base))).await;
    assert!(ws_unknown.is_err());

    // A second WebSocket for the same id: 409; POST to a WebSocket connection: 405.
    let ws = HubClient::connect(&http, &node.base, TransportKind::WebSockets).await.unwrap();
    let second = tokio_tungstenite::connect_async(format!("{}/chathub?id={}", ws_url(&node.base), ws.id)).await;
    match second {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 409),
        other => panic!("expected 409, got {other:?}"),
    }
    assert_eq!(ws.post(b"{}".to_vec()).await.unwrap().status(), 405);
    // DELETE on a non-long-polling connection: 400.
    assert_eq!(http.delete(url(&format!("?id={}", ws.id))).send().await.unwrap().status(), 400);

    // A second event stream: 409; long polling on an SSE connection: 400.
    let sse = HubClient::connect(&http, &node.base, TransportKind::ServerSentEvents).await.unwrap();
    let again = http.get(url(&format!("?id={}", sse.id))).header("Accept", "text/event-stream").send().await.unwrap();
    assert_eq!(again.status(), 409);
    assert_eq!(http.get(url(&format!("?id={}", sse.id))).send().await.unwrap().status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_follows_the_spec() {
    let (_r, node, http) = one_node().await;
    let body = negotiate(&http, &node.base, Some(1)).await.unwrap();
    let id = body["connectionToken"].as_str().unwrap().to_string();
    let url = format!("{}/chathub?id={id}", node.base);
    // The first poll returns at once, empty.
    let first = http.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.bytes().await.unwrap().is_empty());
    // POST answers 200 with an empty body; the handshake reply comes by poll.
    let post = http.post(&url).body(&b"{\"protocol\":\"json\",\"version\":1}\x1e"[..]).send().await.unwrap();
    assert_eq!(post.status(), 200);
    assert!(post.bytes().await.unwrap().is_empty());
    assert_eq!(http.get(&url).send().await.unwrap().bytes().await.unwrap().as_ref(), b"{}\x1e");
    // A newer poll ends the older one with 204: of two polls sent at once,
    // whichever the node took first ends, and the other waits.
    let poll = || {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move { http.get(url).send().await.unwrap() })
    };
    let (mut one, mut two) = (poll(), poll());
    let (ended, newer) = tokio::time::timeout(WAIT, async {
        tokio::select! {
            r = &mut one => (r, two),
            r = &mut two => (r, one),
        }
    })
    .await
    .expect("one poll ended");
    assert_eq!(ended.unwrap().status(), 204);
    // The newer poll gets the next message.
    http.post(&url)
        .body(record(&json!({"type":1,"invocationId":"1","target":"Echo","arguments":["lp"]})))
        .send()
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, newer).await.unwrap().unwrap();
    assert_eq!(got.status(), 200);
    let text = got.text().await.unwrap();
    assert!(text.contains("\"result\":\"lp\""), "{text}");
    // DELETE answers 202; the connection is then gone and a poll answers 204 or 404.
    assert_eq!(http.delete(&url).send().await.unwrap().status(), 202);
    let after = http.get(&url).send().await.unwrap().status();
    assert!(after == 404 || after == 204, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_pings_idle_clients_and_drops_silent_ones() {
    let redis = RedisServer::start();
    let node =
        InProcessNode::start(&redis, "pinger", &["--keepalive-secs", "0.3", "--client-timeout-secs", "1.5"]).await;
    let http = reqwest::Client::new();
    let mut c = HubClient::connect(&http, &node.base, TransportKind::WebSockets).await.unwrap();
    assert!(c.expect(WAIT, |v| v["type"] == 6).await.is_some(), "no keep-alive ping");
    // This client never sends anything, so the node must close it.
    let close = c.expect_close(WAIT).await.expect("silent client closed");
    assert!(close["error"].as_str().unwrap().contains("timeout"), "{close}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer() {
    let (_r, node, http) = one_node().await;
    let h: Value = http.get(format!("{}/health", node.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!((h["status"].as_str(), h["redis"].as_str()), (Some("healthy"), Some("up")));
    let _c = HubClient::connect(&http, &node.base, TransportKind::WebSockets).await.unwrap();
    let m = get_text(&format!("{}/metrics", node.base)).await;
    assert!(m.contains("switchboard_node_connections{transport=\"websockets\"} 1"), "{m}");
    assert!(m.contains("switchboard_node_redis_up 1"));
    let page = http.get(format!("{}/", node.base)).send().await.unwrap();
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_client_is_served_with_its_assets_and_a_strict_content_policy() {
    let (_r, node, http) = one_node().await;
    let page = http.get(format!("{}/", node.base)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    let html = page.text().await.unwrap();
    for (asset, content_type) in
        [("chat.css", "text/css"), ("signalr.js", "text/javascript"), ("chat.js", "text/javascript")]
    {
        assert!(html.contains(&format!("static/{asset}")), "the page does not load {asset}");
        let resp = http.get(format!("{}/static/{asset}", node.base)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{asset}");
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with(content_type), "{asset}");
        assert!(!resp.text().await.unwrap().is_empty());
    }
    for missing in ["nope.js", "..%2Fhttp.rs", "chat.js.map"] {
        let resp = http.get(format!("{}/static/{missing}", node.base)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{missing}");
    }
}
