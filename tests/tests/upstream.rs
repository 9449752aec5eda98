//! Upstream events (Azure's upstream format), end to end: two real nodes
//! with `upstream_url` pointing at an upstream server in this test (plain
//! HTTP over loopback), real Redis, SignalR clients signed in with tokens.
//!
//! - `connected` and `disconnected` arrive for every connection with the
//!   `X-ASRS-*` headers and a signature the test checks (HMAC-SHA256 of the
//!   connection id with the access key); the upstream's answer to
//!   `connected` puts the connection in a group, which then carries a group
//!   message to it;
//! - a method the hub does not define goes upstream as the invocation's
//!   JSON: a 200 answer is the completion's result, a 500 an error
//!   completion, an invocation without an id gets no completion;
//! - an upstream that holds an invocation: until the test lets it answer,
//!   another client's chat message reaches a client on the invoker's node,
//!   and the invoker then gets the answer; an upstream that never answers:
//!   the invoking client gets an error completion after the timeout.

use hmac::Mac;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use switchboard_tests::{token_signer, HubClient, RedisServer, TestNode, TransportKind, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const KEY: &str = "upstream-test-access-key-of-32-bytes-or-more";
const SECRET: &str = "upstream-test-sign-in-secret-of-32-bytes-or-more";

/// One request the upstream got: its `X-ASRS-*` headers (lower-cased names) and body.
#[derive(Debug)]
struct Call {
    headers: Vec<(String, String)>,
    body: Value,
}

impl Call {
    fn header(&self, name: &str) -> &str {
        self.headers.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str())
    }
}

/// The application backend: records every call and answers by event.
/// `Hold` is answered `"released"` once `release` is notified; `Hang` never.
async fn upstream_server(release: Arc<tokio::sync::Notify>) -> (String, mpsc::UnboundedReceiver<Call>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/upstream", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve(socket, tx.clone(), release.clone()));
        }
    });
    (url, rx)
}

/// Serves one connection's requests (keep-alive) until it closes.
async fn serve(
    mut socket: tokio::net::TcpStream,
    calls: mpsc::UnboundedSender<Call>,
    release: Arc<tokio::sync::Notify>,
) {
    let mut buf = Vec::new();
    loop {
        // One head, then its Content-Length body.
        let (head_len, length, headers) = loop {
            let mut parsed = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut parsed);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                let length =
                    headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
                break (n, length, headers);
            }
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        while buf.len() < head_len + length {
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Value = serde_json::from_slice(&buf[head_len..head_len + length]).unwrap_or(Value::Null);
        buf.drain(..head_len + length);
        let call = Call { headers: headers.into_iter().filter(|(n, _)| n.starts_with("x-asrs-")).collect(), body };
        let (status, answer) = match call.header("x-asrs-event") {
            "connected" => (200, json!({"groups": ["from-upstream"]}).to_string()),
            "Add" => {
                let a = &call.body["arguments"];
                (200, json!(a[0].as_i64().unwrap_or(0) + a[1].as_i64().unwrap_or(0)).to_string())
            }
            "Fail" => (500, "no".to_string()),
            "Hold" => {
                let _ = calls.send(call);
                release.notified().await;
                let answer = "\"released\"";
                let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}", answer.len());
                if socket.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            "Hang" => {
                let _ = calls.send(call);
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            _ => (200, String::new()),
        };
        let _ = calls.send(call);
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if socket.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The next call for `event`, others dropped.
async fn next_call(calls: &mut mpsc::UnboundedReceiver<Call>, event: &str) -> Call {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let call = tokio::time::timeout_at(deadline, calls.recv())
            .await
            .unwrap_or_else(|_| panic!("no {event} upstream call"))
            .expect("the upstream server runs");
        if call.header("x-asrs-event") == event {
            return call;
        }
    }
}

fn signature(connection_id: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(KEY.as_bytes()).expect("key");
    mac.update(connection_id.as_bytes());
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

async fn signed_in(node: &TestNode, user: &str) -> HubClient {
    let token = token_signer(SECRET).issue(user, 3600).expect("token");
    let http = reqwest::Client::builder()
        .default_headers(
            [(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().expect("header"))]
                .into_iter()
                .collect(),
        )
        .build()
        .expect("client");
    // Long polling: every request goes through `http`, which carries the token.
    HubClient::connect(&http, &node.base, TransportKind::LongPolling).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_events_reach_the_backend_signed_and_its_answers_become_completions() {
    let redis = RedisServer::start();
    let release = Arc::new(tokio::sync::Notify::new());
    let (url, mut calls) = upstream_server(release.clone()).await;
    // node-a waits for the upstream longer than this test waits for
    // anything, so only the upstream's answer ends an invocation there;
    // node-b gives up soon.
    let args = |timeout: &'static str| {
        let base = ["--auth", "required", "--auth-secret", SECRET, "--api-access-key", KEY, "--upstream-url"];
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        args.extend([url.clone(), "--upstream-timeout-secs".into(), timeout.into()]);
        args
    };
    let (args_a, args_b) = (args("60"), args("1.5"));
    let a = TestNode::start(&redis, "node-a", &args_a.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let b = TestNode::start(&redis, "node-b", &args_b.iter().map(String::as_str).collect::<Vec<_>>()).await;

    let mut ana = signed_in(&a, "ana").await;
    let connected = next_call(&mut calls, "connected").await;
    assert_eq!(connected.header("x-asrs-hub"), "chathub");
    assert_eq!(connected.header("x-asrs-category"), "connections");
    assert_eq!(connected.header("x-asrs-connection-id"), ana.connection_id);
    assert_eq!(connected.header("x-asrs-user-id"), "ana");
    assert_eq!(connected.header("x-asrs-signature"), signature(&ana.connection_id));
    let mut bob = signed_in(&b, "bob").await;
    next_call(&mut calls, "connected").await;

    // The upstream's answer put both in "from-upstream" (once its answer
    // arrived: bob sends until ana hears one, at most ten times).
    let mut got = None;
    for _ in 0..10 {
        let args = vec![json!("from-upstream"), json!("bob"), json!("grouped")];
        bob.invoke("SendMessageToGroup", args).await.expect("send");
        got = ana.expect_event("ReceiveGroupMessage", Duration::from_secs(1)).await;
        if got.is_some() {
            break;
        }
    }
    let got = got.expect("ana is in the upstream's group");
    assert_eq!(got[..3], [json!("from-upstream"), json!("bob"), json!("grouped")]);

    // Methods the hub does not define.
    assert_eq!(ana.invoke("Add", vec![json!(2), json!(40)]).await, Ok(json!(42)));
    let add = next_call(&mut calls, "Add").await;
    assert_eq!(add.header("x-asrs-category"), "messages");
    assert_eq!(add.header("x-asrs-signature"), signature(&ana.connection_id));
    assert_eq!(
        (&add.body["type"], &add.body["target"], &add.body["arguments"]),
        (&json!(1), &json!("Add"), &json!([2, 40]))
    );
    let failed = ana.invoke("Fail", vec![]).await.expect_err("a 500 is an error completion");
    assert!(failed.contains("answered 500"), "{failed}");
    ana.send("Ping2", vec![json!("no id")]).await;
    let fired = next_call(&mut calls, "Ping2").await;
    assert_eq!(fired.body["invocationId"], Value::Null);
    assert!(ana.expect(Duration::from_millis(500), |v| v["type"] == 3).await.is_none(), "no completion without an id");

    // An upstream that holds ana's invocation: meanwhile bob's chat reaches
    // cat, on ana's node, and ana's invocation is still waiting (node-a
    // gives up only after 60 s); then the upstream answers, and so does she.
    let mut cat = signed_in(&a, "cat").await;
    next_call(&mut calls, "connected").await;
    let held = tokio::spawn(async move {
        let outcome = ana.invoke("Hold", vec![]).await;
        (ana, outcome)
    });
    next_call(&mut calls, "Hold").await;
    bob.invoke("SendMessage", vec![json!("bob"), json!("still here")]).await.expect("bob's chat is not held up");
    let heard = cat.expect(WAIT, |v| v["target"] == "ReceiveMessage" && v["arguments"][1] == "still here").await;
    assert!(heard.is_some(), "cat hears bob while the upstream holds ana's invocation");
    assert!(!held.is_finished(), "ana's invocation waits for the upstream");
    release.notify_one();
    let (ana, outcome) = held.await.expect("ana's task");
    assert_eq!(outcome, Ok(json!("released")));
    drop(ana);
    // One that never answers: an error completion once node-b gives up.
    bob.send("Hang", vec![]).await; // no id: nothing comes back, and bob's next one waits its turn
    let error = bob.invoke("Hang", vec![]).await.expect_err("a timeout is an error completion");
    assert!(error.contains("did not answer in time"), "{error}");

    // Disconnected, signed, for the connection that left.
    let id = bob.connection_id.clone();
    bob.send_raw(switchboard_tests::client::record(&json!({"type": 7}))).await.expect("bob says goodbye");
    let gone = next_call(&mut calls, "disconnected").await;
    assert_eq!(gone.header("x-asrs-connection-id"), id);
    assert_eq!(gone.header("x-asrs-signature"), signature(&id));
    assert_eq!(gone.header("x-asrs-user-id"), "bob");
}
