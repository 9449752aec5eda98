//! The server API for application backends (Azure SignalR Service's
//! data-plane REST API, api-version 2022-06-01), end to end: three real
//! nodes given the access key as an Azure connection string, the real
//! balancer, Redis, and a backend in Python (`tests/python/api_backend.py`,
//! standard library only) that signs a token per request as Azure's SDKs do
//! and calls every operation through the balancer's public port. SignalR
//! clients on all three nodes show what each call did:
//!
//! - send to everyone, to a user (two connections on two nodes), to a group
//!   and to one connection: `202`, and exactly the addressed clients get the
//!   event, with its message id for a client that asked for ids; a client
//!   that resumes from before gets it replayed;
//! - add and remove a connection to and from a group, a user to and from a
//!   group (a connection the user opens later, on another node, is in it
//!   until the user is removed), the existence checks (`HEAD`) of
//!   connections, users, groups and a user's membership: `200`/`204`/`404`;
//! - a send to everyone that leaves one connection out (`excluded`);
//! - close a group's connections but one, one connection, all of a user's
//!   and everyone's, with the reason in `Close`;
//! - a missing, wrongly signed, expired, `exp`-less or wrong-audience token
//!   (`401`), an oversized body (`413`) and malformed bodies (`400`) change
//!   nothing; a node without a key answers `404`; the calls are counted in
//!   `/metrics`.

use serde_json::{json, Value};
use std::time::Duration;
use switchboard_tests::{
    get_text, ConnectOptions, HubClient, RedisServer, TestBalancer, TestNode, TransportKind, WAIT,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const KEY: &str = "server-api-test-access-key-of-32-bytes-or-more";
/// How long a client is watched for something that must not arrive.
const QUIET: Duration = Duration::from_millis(700);

/// The Python backend, talking over its stdin and stdout.
struct Backend {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Backend {
    fn start(connection_string: &str) -> Self {
        Self::start_with(connection_string, &[])
    }

    /// The backend serving its own negotiate endpoint on `port` too.
    async fn serving(connection_string: &str, port: u16) -> Self {
        let mut backend = Self::start_with(connection_string, &["--serve-port", &port.to_string()]);
        let line = tokio::time::timeout(Duration::from_secs(20), backend.lines.next_line()).await;
        let line = line.expect("the backend starts in time").expect("read").expect("the backend is running");
        assert!(line.contains("serving"), "{line}");
        backend
    }

    fn start_with(connection_string: &str, extra: &[&str]) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/api_backend.py");
        let mut child = tokio::process::Command::new("python3")
            .args([script, "--connection-string", connection_string])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {script}: {e}"));
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Backend { _child: child, stdin, lines }
    }

    /// One API call; its status and body.
    async fn call(&mut self, request: Value) -> (u16, String) {
        self.stdin.write_all(format!("{request}\n").as_bytes()).await.expect("write to the backend");
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
            .await
            .expect("the backend answers in time")
            .expect("read the backend")
            .expect("the backend is running");
        let answer: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        (answer["status"].as_u64().unwrap_or(0) as u16, answer["body"].as_str().unwrap_or_default().to_string())
    }

    async fn status(&mut self, method: &str, path: &str) -> u16 {
        let (status, body) = self.call(json!({"method": method, "path": path})).await;
        eprintln!("{method:<6} {path:<60} {status} {body}");
        status
    }

    async fn send(&mut self, path: &str, target: &str, arguments: Value) -> u16 {
        let request = json!({"method": "POST", "path": path, "json": {"target": target, "arguments": arguments}});
        let (status, body) = self.call(request).await;
        eprintln!("POST   {path:<60} {status} {body}");
        status
    }
}

fn api(rest: &str) -> String {
    format!("/api/hubs/chathub{rest}")
}

/// A client on `node` that is `user`'s (the nodes run with auth off, so its `SetUser` name).
async fn user_client(http: &reqwest::Client, node: &TestNode, user: &str, message_ids: bool) -> HubClient {
    let options = ConnectOptions { message_ids, ..ConnectOptions::default() };
    let mut c = HubClient::connect_opts(http, &node.base, TransportKind::WebSockets, options).await.expect("connect");
    c.invoke("SetUser", vec![json!(user)]).await.expect("SetUser");
    if message_ids {
        // Live messages are held for such a client until it resumes or reads history.
        c.invoke("GetHistory", vec![json!(0)]).await.expect("GetHistory");
    }
    c
}

/// The arguments of the next `target` event `c` gets.
async fn gets(c: &mut HubClient, target: &str) -> Vec<Value> {
    c.expect_event(target, WAIT).await.unwrap_or_else(|| panic!("{} got no {target}", c.connection_id))
}

/// Asserts that none of `clients` gets a `target` event for a while.
async fn none_get(clients: &mut [&mut HubClient], target: &str) {
    tokio::time::sleep(QUIET).await;
    for c in clients.iter_mut() {
        let got = c.take_arguments(target, 0);
        assert!(got.is_empty(), "{} got {target}: {got:?}", c.connection_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_drives_every_server_api_call_through_the_balancer() {
    let redis = RedisServer::start();
    // The backend knows the cluster by its public URL, the balancer's: it is
    // the connection string's endpoint, and the audience of every token.
    let lb = TestBalancer::start(&redis, &[]).await;
    let connection_string = format!("Endpoint={};AccessKey={KEY};Version=1.0;", lb.base);
    let key = ["--api-access-key", &connection_string, "--api-max-body-bytes", "4096"];
    let nodes = [
        TestNode::start(&redis, "node-a", &key).await,
        TestNode::start(&redis, "node-b", &key).await,
        TestNode::start(&redis, "node-c", &key).await,
    ];
    lb.wait_accepting(&["node-a", "node-b", "node-c"]).await;
    let mut backend = Backend::start(&connection_string);
    let http = reqwest::Client::new();

    let mut ana = user_client(&http, &nodes[0], "ana", true).await;
    let mut bob_b = user_client(&http, &nodes[1], "bob", false).await;
    let mut bob_c = user_client(&http, &nodes[2], "bob", false).await;
    let mut cat = user_client(&http, &nodes[2], "cat", false).await;

    // Bad tokens and bodies first: each refused, and nobody hears anything.
    let body = json!({"target": "Notice", "arguments": ["must not arrive"]});
    for token in ["none", "wrong-key", "expired", "no-exp", "wrong-aud"] {
        let (status, text) =
            backend.call(json!({"method": "POST", "path": api("/:send"), "json": body, "token": token})).await;
        eprintln!("token {token:<10} {status} {text}");
        assert_eq!(status, 401, "{token}: {text}");
    }
    let big = json!({"target": "Notice", "arguments": ["x".repeat(5000)]});
    assert_eq!(backend.call(json!({"method": "POST", "path": api("/:send"), "json": big})).await.0, 413);
    for raw in
        ["{not json", "[1, 2]", "{\"arguments\": []}", "{\"target\": \"T\", \"arguments\": 5}", "{\"target\": \"\"}"]
    {
        let (status, text) = backend.call(json!({"method": "POST", "path": api("/:send"), "raw": raw})).await;
        assert_eq!(status, 400, "{raw}: {text}");
        assert!(text.contains("message"), "an error body says what was wrong: {text}");
    }
    none_get(&mut [&mut ana, &mut bob_b, &mut bob_c, &mut cat], "Notice").await;

    // To everyone: every client, the one that asked for ids with its id.
    assert_eq!(backend.send(&api("/:send"), "Notice", json!(["to all", 1])).await, 202);
    let with_id = gets(&mut ana, "Notice").await;
    assert_eq!(&with_id[..2], &[json!("to all"), json!(1)]);
    let notice_id = with_id[2].as_str().expect("the message id").to_string();
    for c in [&mut bob_b, &mut bob_c, &mut cat] {
        assert_eq!(gets(c, "Notice").await, [json!("to all"), json!(1)]);
    }
    // A client that resumes from before it gets it replayed.
    let options = ConnectOptions { message_ids: true, ..ConnectOptions::default() };
    let mut late = HubClient::connect_opts(&http, &lb.base, TransportKind::WebSockets, options).await.expect("late");
    let replayed = late.invoke("Resume", vec![json!("0-0")]).await.expect("Resume");
    assert!(replayed.as_u64() >= Some(1), "{replayed}");
    assert_eq!(gets(&mut late, "Notice").await, [json!("to all"), json!(1), json!(notice_id)]);

    // To a user: both of bob's connections, on two nodes; nobody else.
    assert_eq!(backend.send(&api("/users/bob/:send"), "Notice", json!(["to bob"])).await, 202);
    for c in [&mut bob_b, &mut bob_c] {
        assert_eq!(gets(c, "Notice").await, [json!("to bob")]);
    }
    none_get(&mut [&mut ana, &mut cat], "Notice").await;

    // To one connection.
    let path = api(&format!("/connections/{}/:send", bob_c.connection_id));
    assert_eq!(backend.send(&path, "Notice", json!(["to one"])).await, 202);
    assert_eq!(gets(&mut bob_c, "Notice").await, [json!("to one")]);
    none_get(&mut [&mut ana, &mut bob_b, &mut cat], "Notice").await;

    // Groups by connection, on two nodes.
    for c in [&ana, &cat] {
        assert_eq!(backend.status("PUT", &api(&format!("/groups/ops/connections/{}", c.connection_id))).await, 200);
    }
    assert_eq!(backend.status("HEAD", &api("/groups/ops")).await, 200);
    assert_eq!(backend.status("HEAD", &api("/groups/nobody-here")).await, 404);
    assert_eq!(backend.send(&api("/groups/ops/:send"), "Notice", json!(["to ops"])).await, 202);
    assert_eq!(gets(&mut ana, "Notice").await[0], "to ops");
    assert_eq!(gets(&mut cat, "Notice").await, [json!("to ops")]);
    none_get(&mut [&mut bob_b, &mut bob_c], "Notice").await;
    assert_eq!(backend.status("DELETE", &api(&format!("/groups/ops/connections/{}", cat.connection_id))).await, 200);
    assert_eq!(backend.send(&api("/groups/ops/:send"), "Notice", json!(["ops again"])).await, 202);
    assert_eq!(gets(&mut ana, "Notice").await[0], "ops again");
    none_get(&mut [&mut cat], "Notice").await;
    // A connection nobody has: 404; and one that left every group.
    let ghost = format!("{}.nosuchconnection", base64_of("node-b"));
    assert_eq!(backend.status("PUT", &api(&format!("/groups/ops/connections/{ghost}"))).await, 404);
    assert_eq!(backend.status("DELETE", &api(&format!("/connections/{}/groups", ana.connection_id))).await, 200);
    assert_eq!(backend.status("HEAD", &api("/groups/ops")).await, 404, "ops has no member left");

    // Existence checks.
    assert_eq!(backend.status("HEAD", &api(&format!("/connections/{}", bob_b.connection_id))).await, 200);
    assert_eq!(backend.status("HEAD", &api(&format!("/connections/{ghost}"))).await, 404);
    assert_eq!(backend.status("HEAD", &api("/connections/not-an-id")).await, 404);
    assert_eq!(backend.status("HEAD", &api("/users/bob")).await, 200);
    assert_eq!(backend.status("HEAD", &api("/users/nobody")).await, 404);

    // A user in a group: bob's connections now and later, until removed.
    assert_eq!(backend.status("PUT", &api("/users/bob/groups/team")).await, 200);
    assert_eq!(backend.status("HEAD", &api("/users/bob/groups/team")).await, 200);
    assert_eq!(backend.status("HEAD", &api("/users/cat/groups/team")).await, 404);
    assert_eq!(backend.send(&api("/groups/team/:send"), "Notice", json!(["team 1"])).await, 202);
    for c in [&mut bob_b, &mut bob_c] {
        assert_eq!(gets(c, "Notice").await, [json!("team 1")]);
    }
    // bob reconnects elsewhere: the new connection is in the group at once.
    drop(bob_b);
    let mut bob_a = user_client(&http, &nodes[0], "bob", false).await;
    assert_eq!(backend.send(&api("/groups/team/:send"), "Notice", json!(["team 2"])).await, 202);
    for c in [&mut bob_a, &mut bob_c] {
        assert_eq!(gets(c, "Notice").await, [json!("team 2")]);
    }
    none_get(&mut [&mut cat], "Notice").await;
    assert_eq!(backend.status("DELETE", &api("/users/bob/groups/team")).await, 204);
    assert_eq!(backend.status("HEAD", &api("/users/bob/groups/team")).await, 404);
    assert_eq!(backend.send(&api("/groups/team/:send"), "Notice", json!(["team 3"])).await, 202);
    none_get(&mut [&mut bob_a, &mut bob_c], "Notice").await;
    assert_eq!(backend.status("PUT", &api("/users/bob/groups/later")).await, 200);
    assert_eq!(backend.status("DELETE", &api("/users/bob/groups")).await, 204);
    assert_eq!(backend.status("HEAD", &api("/users/bob/groups/later")).await, 404);

    // A send that leaves a connection out.
    let path = format!("{}?excluded={}", api("/:send"), cat.connection_id);
    let request = json!({"method": "POST", "path": api("/:send"), "query": format!("excluded={}", cat.connection_id),
        "json": {"target": "Notice", "arguments": ["not for cat"]}});
    assert_eq!(backend.call(request).await.0, 202, "{path}");
    assert_eq!(gets(&mut ana, "Notice").await[0], "not for cat");
    none_get(&mut [&mut cat], "Notice").await;

    // Closing: a group's connections but one, one connection, all of a
    // user's, then everyone's, each with its reason.
    for c in [&ana, &cat] {
        assert_eq!(backend.status("PUT", &api(&format!("/groups/closing/connections/{}", c.connection_id))).await, 200);
    }
    let query = format!("reason=group-closed&excluded={}", ana.connection_id);
    let request = json!({"method": "POST", "path": api("/groups/closing/:closeConnections"), "query": query});
    assert_eq!(backend.call(request).await.0, 204);
    let close = cat.expect_close(WAIT).await.expect("cat gets a Close");
    assert!(close["error"].as_str().is_some_and(|e| e.contains("group-closed")), "{close}");
    let path = api(&format!("/connections/{}", ana.connection_id));
    let (status, _) = backend.call(json!({"method": "DELETE", "path": path, "query": "reason=maintenance"})).await;
    assert_eq!(status, 200);
    let close = ana.expect_close(WAIT).await.expect("ana gets a Close (and was not closed with the group)");
    assert!(close["error"].as_str().is_some_and(|e| e.contains("maintenance")), "{close}");
    let (status, _) = backend
        .call(json!({"method": "POST", "path": api("/users/bob/:closeConnections"), "query": "reason=bye%20bob"}))
        .await;
    assert_eq!(status, 204);
    for c in [&mut bob_a, &mut bob_c] {
        let close = c.expect_close(WAIT).await.expect("bob's connections get a Close");
        assert!(close["error"].as_str().is_some_and(|e| e.contains("bye bob")), "{close}");
    }
    let (status, _) =
        backend.call(json!({"method": "POST", "path": api("/:closeConnections"), "query": "reason=everyone"})).await;
    assert_eq!(status, 204);
    let close = late.expect_close(WAIT).await.expect("the last client gets a Close");
    assert!(close["error"].as_str().is_some_and(|e| e.contains("everyone")), "{close}");
    // Gone once their nodes let go of bob's channel.
    let deadline = tokio::time::Instant::now() + WAIT;
    while backend.status("HEAD", &api("/users/bob")).await != 404 {
        assert!(tokio::time::Instant::now() < deadline, "bob still connected after his connections were closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(backend.status("HEAD", "/api/health").await, 200);

    // Counted: every call above, by operation and status, across the nodes.
    let mut sends = 0.0;
    let mut refused = 0.0;
    for node in &nodes {
        let text = get_text(&format!("{}/metrics", node.base)).await;
        sends += switchboard_tests::metric_value(
            &text,
            "switchboard_node_api_requests_total{operation=\"send_all\",status=\"202\"}",
        );
        refused += switchboard_tests::metric_value(
            &text,
            "switchboard_node_api_requests_total{operation=\"send_all\",status=\"401\"}",
        );
    }
    assert_eq!((sends, refused), (2.0, 5.0), "two sends to everyone accepted, five refused");

    // A node with no key serves no API.
    let plain = TestNode::start(&redis, "node-plain", &[]).await;
    let resp = http.post(format!("{}{}", plain.base, api("/:send"))).body("{}").send().await.expect("request");
    assert_eq!(resp.status().as_u16(), 404);
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

/// Azure's serverless flow with Microsoft's official browser client
/// (unmodified, in headless Chromium): the application's own negotiate
/// endpoint (the Python backend, on another origin) answers `{url,
/// accessToken}`; the client follows it to the cluster's client endpoint
/// through the balancer, over WebSockets and long polling; the backend's
/// message to the token's user reaches both, the user is a full member
/// (`HEAD` finds it); a token signed with another key, or expired, gets 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_follows_a_serverless_negotiate_to_the_client_endpoint() {
    use switchboard_tests::browser::{eval, eval_until, Browser};
    let redis = RedisServer::start();
    let lb = TestBalancer::start(&redis, &[]).await;
    let connection_string = format!("Endpoint={};AccessKey={KEY};Version=1.0;", lb.base);
    let key = ["--api-access-key", &connection_string];
    let _nodes = [TestNode::start(&redis, "node-a", &key).await, TestNode::start(&redis, "node-b", &key).await];
    lb.wait_accepting(&["node-a", "node-b"]).await;
    let port = switchboard_tests::free_port();
    let mut backend = Backend::serving(&connection_string, port).await;
    let Some(browser) = Browser::start().await else { return };
    let page = switchboard_tests::official::official_client_page(&browser, &lb.base).await;

    let start = |name: &str, query: &str, transport: &str| {
        let opts = json!({"url": format!("http://127.0.0.1:{port}/chathub?{query}"), "transport": transport});
        format!("window.__sbStart('{name}', {opts}); return 1;")
    };
    let outcome = |name: &str| format!("const r = window.__sbRec('{name}'); return r.state === 'starting' ? null : r;");
    for (name, transport) in [("dana-ws", "WebSockets"), ("dana-lp", "LongPolling")] {
        eval(&page, &start(name, "user=dana", transport)).await;
        let r =
            eval_until(&page, &format!("{name} to start"), &outcome(name), |v| (!v.is_null()).then(|| v.clone())).await;
        assert_eq!(r["state"], "connected", "{name}: {r}");
    }
    assert_eq!(backend.status("HEAD", &api("/users/dana")).await, 200, "a client endpoint connection is its user's");
    assert_eq!(backend.send(&api("/users/dana/:send"), "ReceiveMessage", json!(["backend", "hello dana"])).await, 202);
    for name in ["dana-ws", "dana-lp"] {
        let js = format!("const r = window.__sbRec('{name}'); return r.got.includes('hello dana') ? r.got : null;");
        eval_until(&page, &format!("{name} to get the backend's message"), &js, |v| v.as_array().cloned()).await;
    }
    for kind in ["expired", "wrong-key"] {
        let name = format!("dana-{kind}");
        eval(&page, &start(&name, &format!("user=dana&token={kind}"), "WebSockets")).await;
        let r =
            eval_until(&page, &format!("{name} to fail"), &outcome(&name), |v| (!v.is_null()).then(|| v.clone())).await;
        let state = r["state"].as_str().unwrap_or_default();
        assert!(state.starts_with("failed") && state.contains("401"), "{kind}: {r}");
    }
    let _ = page.close().await;
}
