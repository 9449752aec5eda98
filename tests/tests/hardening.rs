//! Abuse and limits, end to end on real sockets: request heads trickled on a
//! kept-alive connection's later request, connections that never send, and
//! oversized heads, against the balancer and a node; the balancer's
//! descriptor budget under a lowered open-file limit (503 past the cap, the
//! admin port answering throughout, recovery after); what the public port
//! shows; and the admin port's token. Limits are lowered by settings so that
//! the waits are short; every wait is bounded.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use switchboard_tests::client::{record, ws_url};
use switchboard_tests::{get_json, wait_for_status, RedisServer, TestBalancer, TestNode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const HEAD_LIMIT: &str = "2";

fn addr(base: &str) -> &str {
    base.trim_start_matches("http://")
}

/// Sends `request` and reads one response with a `Content-Length` body;
/// returns its status and body.
async fn roundtrip(s: &mut TcpStream, request: &[u8]) -> (u16, String) {
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = resp.parse(&buf) {
            let length: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= len + length {
                return (resp.code.unwrap_or(0), String::from_utf8_lossy(&buf[len..len + length]).into_owned());
            }
        }
        let n = tokio::time::timeout_at(deadline.into(), s.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed before a whole response: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends `start`, then one more byte every 250 ms, until the peer closes;
/// returns how long that took and what it answered, or `None` if it was
/// still open after `limit`.
async fn trickle_until_closed(s: &mut TcpStream, start: &[u8], limit: Duration) -> Option<(Duration, String)> {
    let began = Instant::now();
    let _ = s.write_all(start).await;
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while began.elapsed() < limit {
        tokio::select! {
            r = s.read(&mut chunk) => match r {
                Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                _ => return Some((began.elapsed(), String::from_utf8_lossy(&got).into_owned())),
            },
            _ = tick.tick() => {
                if !start.is_empty() && s.write_all(b"X").await.is_err() {
                    return Some((began.elapsed(), String::from_utf8_lossy(&got).into_owned()));
                }
            }
        }
    }
    None
}

async fn cluster(balancer_extra: &[&str], open_files: Option<u64>) -> (RedisServer, TestNode, TestBalancer) {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "a", &["--request-head-timeout-secs", HEAD_LIMIT]).await;
    let mut extra = vec!["--request-head-timeout-secs", HEAD_LIMIT, "--keepalive-timeout-secs", "3"];
    extra.extend_from_slice(balancer_extra);
    let balancer = TestBalancer::start_limited(&redis, &extra, open_files).await;
    balancer.wait_accepting(&["a"]).await;
    (redis, node, balancer)
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";

#[tokio::test]
async fn a_trickled_head_on_a_kept_alive_connections_second_request_is_cut_by_balancer_and_node() {
    let (_redis, node, balancer) = cluster(&[], None).await;
    for (who, base) in [("balancer", &balancer.base), ("node", &node.base)] {
        let mut s = TcpStream::connect(addr(base)).await.unwrap();
        assert_eq!(roundtrip(&mut s, HEALTH).await.0, 200, "{who}: first request");
        let second = b"GET /health HTTP/1.1\r\nHost: t\r\n";
        let (took, answer) = trickle_until_closed(&mut s, second, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("{who} kept a trickled second request head open for 30 s"));
        eprintln!("{who}: trickled head closed after {took:?}, answer {answer:?}");
        assert!(took >= Duration::from_secs(1), "{who} closed before the limit: {took:?}");
        assert!(took < Duration::from_secs(15), "{who} took {took:?} for a {HEAD_LIMIT} s limit");
        if who == "balancer" {
            assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        }
    }
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed_and_oversized_heads_refused() {
    let (_redis, node, balancer) = cluster(&[], None).await;
    for (who, base) in [("balancer", &balancer.base), ("node", &node.base)] {
        // Never sends a byte.
        let mut s = TcpStream::connect(addr(base)).await.unwrap();
        let (took, _) = trickle_until_closed(&mut s, b"", Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("{who} kept a silent connection for 30 s"));
        assert!(took < Duration::from_secs(15), "{who}: {took:?}");
        // Idle after one request (the node's head limit covers the wait for
        // the next head; the balancer has its own keep-alive limit).
        let mut s = TcpStream::connect(addr(base)).await.unwrap();
        assert_eq!(roundtrip(&mut s, HEALTH).await.0, 200);
        let (took, _) = trickle_until_closed(&mut s, b"", Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("{who} kept an idle kept-alive connection for 30 s"));
        assert!(took < Duration::from_secs(15), "{who}: {took:?}");
        // A 40 KB head, over the 32 KiB default.
        let mut big = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 40_000));
        big.extend_from_slice(b"\r\n\r\n");
        let mut s = TcpStream::connect(addr(base)).await.unwrap();
        assert_eq!(roundtrip(&mut s, &big).await.0, 431, "{who}");
    }
}

#[tokio::test]
async fn the_public_port_serves_no_metrics_and_no_internal_addresses() {
    let (_redis, node, balancer) = cluster(&[], None).await;
    let http = reqwest::Client::new();
    for path in ["/metrics", "/metrics?x=1", "//metrics", "/api/backends", "/static/../metrics"] {
        let r = http.get(format!("{}{path}", balancer.base)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert!(!r.text().await.unwrap().contains("switchboard_node"), "{path}");
    }
    // Nor through a WebSocket upgrade, which the balancer tunnels itself.
    let upgrade = tokio_tungstenite::connect_async(format!("{}/metrics", ws_url(&balancer.base))).await;
    match upgrade {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("upgrade to /metrics answered {other:?}"),
    }
    // The node still serves its metrics on its own address.
    assert_eq!(http.get(format!("{}/metrics", node.base)).send().await.unwrap().status(), 200);

    let nodes = get_json(&http, &format!("{}/nodes", balancer.base)).await.expect("/nodes");
    assert_eq!(nodes["available_nodes"][0]["id"], "a", "{nodes}");
    let text = nodes.to_string();
    assert!(!text.contains("\"url\"") && !text.contains(addr(&node.base)) && !text.contains("http://"), "{text}");
}

#[tokio::test]
async fn the_admin_port_wants_its_token_once_one_is_set() {
    let (_redis, _node, balancer) = cluster(&["--admin-token", "s3cret"], None).await;
    let http = reqwest::Client::new();
    for path in ["/api/backends", "/metrics", "/dashboard"] {
        let url = format!("{}{path}", balancer.admin);
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers().contains_key("www-authenticate"), "{path}");
        assert_eq!(http.get(&url).bearer_auth("wrong").send().await.unwrap().status(), 401, "{path}");
        assert_eq!(http.get(&url).bearer_auth("s3cret").send().await.unwrap().status(), 200, "{path}");
        assert_eq!(http.get(&url).basic_auth("admin", Some("s3cret")).send().await.unwrap().status(), 200, "{path}");
    }
    // Liveness stays open for container health checks.
    assert_eq!(http.get(format!("{}/health", balancer.admin)).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn the_admin_port_limits_head_time_and_its_own_connections_apart_from_the_clients() {
    // 200 descriptors: 90 reserved, 10 admin connections, so 50 clients.
    let (_redis, _node, balancer) = cluster(&["--fd-reserve", "90", "--admin-max-connections", "10"], Some(200)).await;
    // A head trickled a byte at a time is cut at the head limit, as on the public port.
    let mut s = TcpStream::connect(addr(&balancer.admin)).await.unwrap();
    let (took, answer) = trickle_until_closed(&mut s, b"GET /api/backends HTTP/1.1\r\n", Duration::from_secs(30))
        .await
        .expect("the admin port kept a trickled head open for 30 s");
    eprintln!("admin: trickled head closed after {took:?}, answer {answer:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Thirty connections that start a head and stop: ten are held (until
    // the head limit answers them 408), the rest answered 503 at once; and
    // meanwhile the public port still opens all of its 50 tunnels.
    let mut admin = Vec::new();
    for _ in 0..30 {
        let mut s = TcpStream::connect(addr(&balancer.admin)).await.unwrap();
        s.write_all(b"GET /api/backends HTTP/1.1\r\n").await.unwrap();
        admin.push(s);
    }
    let mut tunnels = Vec::new();
    for _ in 0..50 {
        tunnels.push(open_tunnel(&balancer.base).await.expect("a client tunnel while the admin port is full"));
    }
    let answers = futures_util::future::join_all(admin.iter_mut().map(|s| async move {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
        String::from_utf8_lossy(&got).into_owned()
    }))
    .await;
    let count = |status: &str| answers.iter().filter(|a| a.starts_with(status)).count();
    // At most the cap held (a connection the test's harness or the trickle
    // left a moment ago may still hold one), every other one refused.
    let (held, refused) = (count("HTTP/1.1 408"), count("HTTP/1.1 503"));
    assert!((5..=10).contains(&held) && held + refused == 30, "{held} held, {refused} refused: {answers:?}");
    drop(tunnels);
    wait_for_status(&format!("{}/api/backends", balancer.admin), 200, Duration::from_secs(15), "admin port again")
        .await;
}

#[tokio::test]
async fn wrong_admin_tokens_are_answered_slowly_and_then_refused_and_foreign_host_names_are_not_served() {
    let (_redis, _node, guarded) = cluster(&["--admin-token", "the-admin-token-0123"], None).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/backends", guarded.admin);
    // Forty guesses at once: some 401, the rest 429 (past the rate of wrong
    // tokens), none served; the right token still is.
    let guesses = (0..40).map(|i| {
        let req = http.get(&url).bearer_auth(format!("guess-{i}"));
        async move { req.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(guesses).await;
    let too_many = statuses.iter().filter(|s| **s == 429).count();
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    assert!(too_many >= 10, "{statuses:?}");
    assert_eq!(http.get(&url).bearer_auth("the-admin-token-0123").send().await.unwrap().status(), 200);

    // Without a token: a page of another name (DNS rebinding) gets nothing.
    let (_redis, _node, open) = cluster(&[], None).await;
    let port = open.admin.rsplit(':').next().unwrap().to_string();
    let with_host = |host: String| {
        let (http, url) = (http.clone(), format!("{}/api/backends", open.admin));
        async move { http.get(url).header("Host", host).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(with_host(format!("evil.example:{port}")).await, 403);
    assert_eq!(with_host(format!("localhost:{port}")).await, 200);
    assert_eq!(with_host(format!("127.0.0.1:{port}")).await, 200);
}

/// Opens a WebSocket through the balancer and completes the SignalR handshake.
async fn open_tunnel(base: &str) -> Result<impl Sized, u16> {
    match tokio_tungstenite::connect_async(format!("{}/chathub", ws_url(base))).await {
        Ok((mut ws, _)) => {
            let hs = String::from_utf8(record(&json!({"protocol":"json","version":1}))).unwrap_or_default();
            ws.send(Message::Text(hs.into())).await.map_err(|_| 0u16)?;
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(_))) => Ok(ws),
                _ => Err(0),
            }
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(_) => Err(0),
    }
}

#[tokio::test]
async fn at_the_descriptor_budget_clients_get_503_the_admin_port_answers_and_all_recovers() {
    // 200 descriptors, 90 kept in reserve and 10 for the admin port: 50 client connections.
    let (_redis, _node, balancer) = cluster(&["--fd-reserve", "90", "--admin-max-connections", "10"], Some(200)).await;
    let http = reqwest::Client::new();
    let totals = |v: Value| v["totals"].clone();
    assert_eq!(totals(balancer.backends().await)["connectionCap"], 50);

    let mut open = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..60 {
        match open_tunnel(&balancer.base).await {
            Ok(ws) => open.push(ws),
            Err(status) => refused.push(status),
        }
    }
    assert_eq!(open.len(), 50, "tunnels open at the cap; refused: {refused:?}");
    assert!(refused.iter().all(|s| *s == 503), "past the cap every client gets a 503: {refused:?}");

    // Plain requests past the cap are answered at once, with a clear body.
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr(&balancer.base)).await.unwrap();
        let (status, body) = roundtrip(&mut s, HEALTH).await;
        assert_eq!((status, body.as_str()), (503, "Too many connections; retry shortly.\n"));
    }
    // The admin port keeps answering, and reports the budget.
    assert_eq!(http.get(format!("{}/health", balancer.admin)).send().await.unwrap().status(), 200);
    let t = totals(get_json(&http, &format!("{}/api/backends", balancer.admin)).await.expect("/api/backends"));
    assert_eq!(t["clientConnections"], 50, "{t}");
    let metrics = http.get(format!("{}/metrics", balancer.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("switchboard_balancer_refused_total{reason=\"max_connections\"}"), "{metrics}");

    drop(open);
    wait_for_status(&format!("{}/health", balancer.base), 200, Duration::from_secs(15), "capacity to return").await;
    let again: Vec<_> = futures_util::future::join_all((0..10).map(|_| open_tunnel(&balancer.base))).await;
    assert!(again.iter().all(Result::is_ok), "tunnels after recovery");
}

#[tokio::test]
async fn a_redis_that_refuses_the_password_is_logged_once_with_the_reason_and_no_secret() {
    let redis = RedisServer::start();
    let url = redis.url().replacen("redis://", "redis://:hunter2-secret@", 1);
    let node = TestNode::start_with_redis_url(&url, "a", &[]).await;
    let mut balancer_args: Vec<String> =
        ["--listen", "127.0.0.1:0", "--redis", &url].iter().map(|s| s.to_string()).collect();
    let admin = switchboard_tests::free_port();
    balancer_args.extend(["--admin-listen".to_string(), format!("127.0.0.1:{admin}")]);
    let dir = std::env::temp_dir();
    balancer_args.extend([
        "--pid-file".to_string(),
        dir.join(format!("sb-balancer-auth-{admin}.pid")).to_string_lossy().into_owned(),
        "--upgrade-sock".to_string(),
        dir.join(format!("sb-balancer-auth-{admin}.sock")).to_string_lossy().into_owned(),
    ]);
    let balancer = switchboard_tests::Process::spawn("switchboard-balancer", "balancer-auth", &balancer_args);
    wait_for_status(&format!("http://127.0.0.1:{admin}/health"), 200, Duration::from_secs(15), "balancer").await;
    // Both keep serving, and keep retrying for a few seconds.
    assert_eq!(reqwest::get(format!("{}/health", node.base)).await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (who, log) in [("node", node.process.log_text()), ("balancer", balancer.log_text())] {
        let refusals = log.lines().filter(|l| l.contains("redis refuses")).count();
        assert_eq!(refusals, 1, "{who} should say once why Redis refuses it:\n{log}");
        assert!(log.contains("authentication failed"), "{who} should give the reason:\n{log}");
        assert!(!log.contains("hunter2"), "{who} logged the password:\n{log}");
    }
}
