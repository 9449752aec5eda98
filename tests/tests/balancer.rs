//! The balancer in front of real nodes: SignalR works through it over every
//! transport, with and without cookies; new clients spread by load and reach
//! nodes that join later; dead, draining and unreachable nodes are handled;
//! a Redis outage does not stop routing; a node that refuses connections for
//! a moment keeps its clients; idle limits are settings; bad input gets clear
//! answers.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use switchboard_common::registry::{write_record, NodeRecord, NodeStatus};
use switchboard_common::token::ConnectionToken;
use switchboard_tests::client::{record, ws_url};
use switchboard_tests::{
    eventually, get_json, get_text, listening_sockets, metric_nonzero, wait_for_status, HubClient, RedisServer,
    TestBalancer, TestNode, TransportKind, ALL_TRANSPORTS, WAIT,
};
use tokio_tungstenite::tungstenite::Message;

async fn node_of(c: &mut HubClient) -> String {
    c.send("GetNodeInfo", vec![]).await;
    let info = c.expect_event("NodeInfo", WAIT).await.expect("NodeInfo");
    info[0].as_str().unwrap_or_default().to_string()
}

struct Cluster {
    redis: RedisServer,
    nodes: Vec<TestNode>,
    balancer: TestBalancer,
}

async fn cluster(ids: &[&str], node_args: &[&str], balancer_args: &[&str]) -> Cluster {
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(TestNode::start(&redis, id, node_args).await);
    }
    let balancer = TestBalancer::start(&redis, balancer_args).await;
    balancer.wait_accepting(ids).await;
    Cluster { redis, nodes, balancer }
}

/// Lists a node that is not a Switchboard node (a test's own listener) in
/// the registry as healthy, for a minute.
async fn register_healthy(redis: &RedisServer, id: &str, addr: std::net::SocketAddr) {
    let now = chrono::Utc::now();
    let record = NodeRecord {
        node_id: id.into(),
        name: id.into(),
        description: String::new(),
        url: format!("http://{addr}"),
        status: NodeStatus::Healthy,
        connections: 0,
        last_seen: now,
        started_at: now,
        version: "0".into(),
    };
    let mut r = redis.connection().await;
    let mut pipe = redis::pipe();
    write_record(&mut pipe, "switchboard", &record, 60_000, now.timestamp_millis());
    let _: () = pipe.query_async(&mut r).await.unwrap();
}

/// A fresh cookie-less HTTP client, like a third-party SignalR client.
fn cookieless() -> reqwest::Client {
    reqwest::Client::new()
}

/// Connects cookie-less clients until one lands on `node`.
async fn client_on(base: &str, kind: TransportKind, node: &str) -> HubClient {
    for _ in 0..20 {
        let mut c = HubClient::connect(&cookieless(), base, kind).await.expect("connect through balancer");
        if node_of(&mut c).await == node {
            return c;
        }
    }
    panic!("no client landed on {node}");
}

#[tokio::test]
async fn clients_on_every_transport_exchange_messages_through_the_balancer() {
    let c = cluster(&["a", "b", "c"], &[], &[]).await;
    let base = &c.balancer.base;
    for kind in ALL_TRANSPORTS {
        let mut x = HubClient::connect(&cookieless(), base, kind).await.unwrap();
        let mut y = HubClient::connect(&cookieless(), base, kind).await.unwrap();
        let x_node = node_of(&mut x).await;
        let mut got = None;
        for i in 0..50 {
            let text = format!("{kind:?} hello {i}");
            x.send("SendMessage", vec![json!("x"), json!(text)]).await;
            if let Some(v) = y.expect(Duration::from_millis(300), |v| v["arguments"][1] == text.as_str()).await {
                got = Some(v);
                break;
            }
        }
        let got = got.unwrap_or_else(|| panic!("{kind:?}: message never crossed"));
        assert_eq!(got["arguments"][2], x.connection_id.as_str());
        assert_eq!(got["arguments"][3], x_node.as_str());
        assert_eq!(y.invoke("Echo", vec![json!([1, 2])]).await, Ok(json!([1, 2])));
    }
}

#[tokio::test]
async fn a_cookieless_long_polling_client_stays_on_its_node_by_token() {
    let c = cluster(&["a", "b", "c"], &[], &[]).await;
    for version in [None, Some(1)] {
        let http = cookieless();
        let mut lp =
            HubClient::connect_with(&http, &c.balancer.base, TransportKind::LongPolling, version).await.unwrap();
        let home = node_of(&mut lp).await;
        for i in 0..15 {
            assert_eq!(lp.invoke("Echo", vec![json!(i)]).await, Ok(json!(i)), "{version:?}");
        }
        assert_eq!(node_of(&mut lp).await, home);
    }
    let v = c.balancer.backends().await;
    let token_routed: u64 = v["nodes"].as_array().unwrap().iter().map(|n| n["routed"]["token"].as_u64().unwrap()).sum();
    assert!(token_routed >= 30, "{v}");
}

#[tokio::test]
async fn a_browser_like_client_with_cookies_sticks_to_its_node_and_others_spread() {
    let c = cluster(&["a", "b", "c"], &[], &[]).await;
    let browser = reqwest::Client::builder().cookie_store(true).build().unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        let h = get_json(&browser, &format!("{}/health", c.balancer.base)).await.expect("health");
        seen.insert(h["nodeId"].as_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 1, "cookie client moved between {seen:?}");
    // The cookie also pins negotiation, so the page's SignalR connection lands there.
    let mut conn = HubClient::connect(&browser, &c.balancer.base, TransportKind::LongPolling).await.unwrap();
    assert_eq!(Some(&node_of(&mut conn).await), seen.iter().next());

    let mut spread = std::collections::HashSet::new();
    for _ in 0..12 {
        let h = get_json(&cookieless(), &format!("{}/health", c.balancer.base)).await.expect("health");
        spread.insert(h["nodeId"].as_str().unwrap().to_string());
    }
    assert!(spread.len() >= 2, "cookie-less requests all went to {spread:?}");
}

#[tokio::test]
async fn new_clients_go_to_the_least_loaded_node_including_one_that_joins_later() {
    let mut c = cluster(&["a", "b", "c"], &[], &[]).await;
    let mut clients = Vec::new();
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for _ in 0..6 {
        let mut cl = HubClient::connect(&cookieless(), &c.balancer.base, TransportKind::WebSockets).await.unwrap();
        *per_node.entry(node_of(&mut cl).await).or_default() += 1;
        clients.push(cl);
    }
    assert_eq!(per_node.len(), 3, "{per_node:?}");
    assert!(per_node.values().all(|&n| n == 2), "uneven spread {per_node:?}");

    c.nodes.push(TestNode::start(&c.redis, "d", &[]).await);
    c.balancer.wait_accepting(&["a", "b", "c", "d"]).await;
    let mut late = HubClient::connect(&cookieless(), &c.balancer.base, TransportKind::WebSockets).await.unwrap();
    assert_eq!(node_of(&mut late).await, "d", "the empty new node should take the next client");
}

#[tokio::test]
async fn a_killed_node_gets_no_new_clients_and_its_clients_renegotiate_elsewhere() {
    let mut c = cluster(&["a", "b"], &[], &[]).await;
    let base = c.balancer.base.clone();
    let mut victim = client_on(&base, TransportKind::LongPolling, "a").await;
    let victim_id = victim.id.clone();
    c.nodes[0].process.kill();
    c.balancer.wait_accepting(&["b"]).await;
    for _ in 0..6 {
        let mut n = HubClient::connect(&cookieless(), &base, TransportKind::WebSockets).await.unwrap();
        assert_eq!(node_of(&mut n).await, "b");
    }
    // Once its health checks fail, the dead node's token gets a fast 404,
    // which makes clients negotiate again; before that (its connects failing
    // but its checks not yet), a 502 the client may retry, never a 404 for a
    // node that may be alive.
    let url = format!("{base}/chathub?id={victim_id}");
    eventually(WAIT, "the dead node's token to get 404", || async {
        let status = cookieless().get(&url).send().await.ok()?.status().as_u16();
        assert!(status == 404 || status == 502, "{status}");
        (status == 404).then_some(())
    })
    .await;
    assert!(victim.wait_ended(WAIT).await, "the victim's poll should end");
    let mut again = HubClient::connect(&cookieless(), &base, TransportKind::LongPolling).await.unwrap();
    assert_eq!(node_of(&mut again).await, "b");
}

#[tokio::test]
async fn a_draining_node_gets_no_new_clients_while_its_clients_keep_working_until_closed() {
    let c = cluster(&["a", "b"], &["--drain-secs", "3"], &[]).await;
    let base = c.balancer.base.clone();
    let mut ws = client_on(&base, TransportKind::WebSockets, "a").await;
    let mut lp = client_on(&base, TransportKind::LongPolling, "a").await;
    c.nodes[0].process.terminate();
    c.balancer.wait_accepting(&["b"]).await;
    for _ in 0..4 {
        let mut n = HubClient::connect(&cookieless(), &base, TransportKind::LongPolling).await.unwrap();
        assert_eq!(node_of(&mut n).await, "b");
    }
    // Existing clients of the draining node still reach it by token.
    assert_eq!(ws.invoke("Echo", vec![json!("still")]).await, Ok(json!("still")));
    assert_eq!(lp.invoke("Echo", vec![json!("still")]).await, Ok(json!("still")));
    for cl in [&mut ws, &mut lp] {
        let close = cl.expect_close(Duration::from_secs(15)).await.expect("Close from the draining node");
        assert_eq!(close["allowReconnect"], true);
    }
}

#[tokio::test]
async fn with_redis_stopped_the_balancer_keeps_routing_to_known_nodes() {
    let mut c = cluster(&["a", "b"], &[], &[]).await;
    c.redis.stop();
    eventually(WAIT, "balancer to notice the registry is down", || async {
        (c.balancer.backends().await["registry"] == "down").then_some(())
    })
    .await;
    let mut nodes = std::collections::HashSet::new();
    for kind in ALL_TRANSPORTS {
        for _ in 0..2 {
            let mut cl =
                HubClient::connect(&cookieless(), &c.balancer.base, kind).await.expect("connect with Redis down");
            assert_eq!(cl.invoke("Echo", vec![json!("up")]).await, Ok(json!("up")));
            nodes.insert(node_of(&mut cl).await);
        }
    }
    assert_eq!(nodes.len(), 2, "both known nodes should still be used: {nodes:?}");
}

#[tokio::test]
async fn the_idle_limit_closes_quiet_websockets_and_spares_active_ones() {
    let c = cluster(&["a"], &[], &["--idle-timeout-secs", "1"]).await;
    let mut quiet = HubClient::connect(&cookieless(), &c.balancer.base, TransportKind::WebSockets).await.unwrap();
    let mut active = HubClient::connect(&cookieless(), &c.balancer.base, TransportKind::WebSockets).await.unwrap();
    for i in 0..8 {
        assert_eq!(active.invoke("Echo", vec![json!(i)]).await, Ok(json!(i)), "active client cut");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(quiet.wait_ended(WAIT).await, "an idle WebSocket outlived the configured idle limit");
}

/// When the balancer itself ends a tunnel it says so with a WebSocket Close
/// (1001, "going away") rather than only dropping the TCP connection, which
/// a client reads as 1006: after the idle limit, and when the node behind
/// the tunnel dies between frames.
#[tokio::test]
async fn the_balancer_ends_its_own_tunnels_with_a_close_frame() {
    let mut c = cluster(&["a"], &[], &["--idle-timeout-secs", "2"]).await;
    let open = || async {
        let url = format!("{}/chathub", ws_url(&c.balancer.base));
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade through the balancer");
        ws.send(Message::Text("{\"protocol\":\"json\",\"version\":1}\u{1e}".into())).await.unwrap();
        let hello = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(hello.into_text().unwrap().as_str(), "{}\u{1e}");
        ws
    };
    let close_of = |mut ws: tokio_tungstenite::WebSocketStream<_>| async move {
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await.expect("the tunnel ends") {
                Some(Ok(Message::Close(Some(frame)))) => break (u16::from(frame.code), frame.reason.to_string()),
                Some(Ok(_)) => continue,
                other => panic!("expected a Close frame, got {other:?}"),
            }
        }
    };
    let quiet = open().await;
    assert_eq!(close_of(quiet).await, (1001, "idle timeout".to_string()));
    let orphan = open().await;
    c.nodes[0].process.kill();
    assert_eq!(close_of(orphan).await, (1001, "node went away".to_string()));
}

#[tokio::test]
async fn bad_cookies_are_ignored_and_replaced() {
    let c = cluster(&["a", "b"], &[], &[]).await;
    let url = format!("{}/health", c.balancer.base);
    let valid = cookieless().get(&url).send().await.unwrap();
    let set = valid.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.starts_with("switchboard_affinity=") && set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    assert!(!set.contains("127.0.0.1") && !set.contains("http"), "cookie must be opaque: {set}");
    for bad in ["zzzz", "0000000000000000", &"f".repeat(2000), "\"\"", ""] {
        let r = cookieless().get(&url).header("Cookie", format!("switchboard_affinity={bad}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "cookie {bad:?}");
        let replaced = r.headers().get("set-cookie").map(|v| v.to_str().unwrap().to_string());
        assert!(
            replaced.is_some_and(|s| s.starts_with("switchboard_affinity=") && !s.contains(bad) || bad.is_empty()),
            "cookie {bad:?}"
        );
    }
    // A valid cookie is honoured and not re-set.
    let pair = set.split(';').next().unwrap().to_string();
    let r = cookieless().get(&url).header("Cookie", &pair).send().await.unwrap();
    assert!(r.headers().get("set-cookie").is_none());
}

#[tokio::test]
async fn malformed_unknown_and_forged_tokens_get_404() {
    let c = cluster(&["a"], &[], &[]).await;
    let base = &c.balancer.base;
    let gone = ConnectionToken::issue("node-that-left").token;
    let forged_for_live =
        format!("{}.forgedforgedforged", ConnectionToken::issue("a").token.split('.').next().unwrap());
    for id in ["garbage", "", &"a".repeat(600), &gone, &forged_for_live, "%00%ff"] {
        for method in [reqwest::Method::GET, reqwest::Method::POST, reqwest::Method::DELETE] {
            let r =
                cookieless().request(method.clone(), format!("{base}/chathub?id={id}")).body("x").send().await.unwrap();
            assert_eq!(r.status(), 404, "{method} id={id:.40}");
        }
    }
    let ws = tokio_tungstenite::connect_async(format!("{}/chathub?id={gone}", ws_url(base))).await;
    match ws {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 404),
        other => panic!("expected 404, got {other:?}"),
    }
}

#[tokio::test]
async fn with_no_healthy_node_requests_get_503_with_a_clear_body() {
    let redis = RedisServer::start();
    let balancer = TestBalancer::start(&redis, &[]).await;
    let r = cookieless().post(format!("{}/chathub/negotiate?negotiateVersion=1", balancer.base)).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("no healthy"), "{body}");
}

#[tokio::test]
async fn malformed_requests_and_slow_clients_do_not_disturb_others() {
    let c = cluster(&["a"], &[], &[]).await;
    let addr = c.balancer.base.trim_start_matches("http://").to_string();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Garbage instead of HTTP: a 400 or a closed connection, never a hang.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GARBAGE \x00\x01 nonsense\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("no hang").unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || head.starts_with("HTTP/1.1 4"), "{head}");
    // A slow client that sends half a request header and stalls.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // A header block over Pingora's 1 MiB limit.
    let big =
        cookieless().get(format!("{}/health", c.balancer.base)).header("X-Big", "x".repeat(2_000_000)).send().await;
    assert!(big.map(|r| r.status().is_client_error()).unwrap_or(true));
    // Everyone else is served meanwhile.
    let mut cl = HubClient::connect(&cookieless(), &c.balancer.base, TransportKind::WebSockets).await.unwrap();
    assert_eq!(cl.invoke("Echo", vec![json!("ok")]).await, Ok(json!("ok")));
    drop(slow);
}

#[tokio::test]
async fn a_node_that_accepts_tcp_but_never_answers_is_taken_out_of_rotation() {
    let c = cluster(&["a"], &[], &[]).await;
    // A black hole: accepts connections, never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    register_healthy(&c.redis, "blackhole", hole_addr).await;
    eventually(WAIT, "black hole to be listed and found unhealthy", || async {
        let v = c.balancer.backends().await;
        v["nodes"].as_array()?.iter().find(|n| n["nodeId"] == "blackhole" && n["healthy"] == false).map(|_| ())
    })
    .await;
    for _ in 0..6 {
        let mut cl = HubClient::connect(&cookieless(), &c.balancer.base, TransportKind::LongPolling).await.unwrap();
        assert_eq!(node_of(&mut cl).await, "a");
    }
    holder.abort();
}

#[tokio::test]
async fn the_per_ip_rate_limit_refuses_clearly() {
    let c = cluster(&["a"], &[], &["--rate-limit-per-ip", "3"]).await;
    let url = format!("{}/chathub/negotiate?negotiateVersion=1", c.balancer.base);
    let mut codes = Vec::new();
    for _ in 0..10 {
        codes.push(cookieless().post(&url).send().await.unwrap().status().as_u16());
    }
    assert!(codes.contains(&200) && codes.contains(&429), "{codes:?}");
}

/// The cap on open client connections, with no rate limit to pace around
/// (it is off by default): four open WebSockets fill it, the fifth
/// connection gets 503, and closing them gives the capacity back.
#[tokio::test]
async fn the_connection_cap_refuses_clearly() {
    let c = cluster(&["a"], &[], &["--max-connections", "4"]).await;
    let mut sockets = Vec::new();
    for _ in 0..4 {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/chathub", ws_url(&c.balancer.base)))
            .await
            .expect("a WebSocket within the cap");
        ws.send(Message::Text(String::from_utf8(record(&json!({"protocol":"json","version":1}))).unwrap().into()))
            .await
            .unwrap();
        let _ = ws.next().await;
        sockets.push(ws);
    }
    let over = cookieless().get(format!("{}/health", c.balancer.base)).send().await.unwrap();
    assert_eq!(over.status(), 503);
    drop(sockets);
    wait_for_status(&format!("{}/health", c.balancer.base), 200, WAIT, "capacity to return").await;
}

#[tokio::test]
async fn admin_port_serves_api_dashboard_and_metrics() {
    let c = cluster(&["a", "b"], &[], &[]).await;
    let mut cl = HubClient::connect(&cookieless(), &c.balancer.base, TransportKind::WebSockets).await.unwrap();
    let home = node_of(&mut cl).await;
    let v = c.balancer.backends().await;
    let node = v["nodes"].as_array().unwrap().iter().find(|n| n["nodeId"] == home.as_str()).unwrap().clone();
    assert_eq!(node["openConnections"], 1, "{node}");
    for field in ["url", "status", "healthy", "lastSeen", "routed"] {
        assert!(!node[field].is_null(), "{field} missing");
    }
    assert_eq!(v["totals"]["nodes"], 2);
    let page = cookieless().get(format!("{}/dashboard", c.balancer.admin)).send().await.unwrap();
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let m = get_text(&format!("{}/metrics", c.balancer.admin)).await;
    for name in [
        "switchboard_balancer_requests_total",
        "switchboard_balancer_routing_decisions_total{kind=\"new\"}",
        "switchboard_balancer_upgrades_total 1",
        &format!("switchboard_balancer_open_connections{{backend=\"{home}\"}} 1"),
        "switchboard_balancer_backend_healthy",
        "switchboard_balancer_discovery_events_total{event=\"added\"} 2",
        "switchboard_balancer_upstream_latency_seconds_bucket",
    ] {
        assert!(m.contains(name), "{name} missing from metrics:\n{m}");
    }
    // The public port does not expose the admin API.
    assert_ne!(cookieless().get(format!("{}/api/backends", c.balancer.base)).send().await.unwrap().status(), 200);
}

/// `switchboard_balancer_backend_healthy` is Pingora's own verdict and
/// nothing earlier: with `health_rise` 3, a node back from failing its
/// checks reads 0 until Pingora counts it healthy (the check itself used to
/// set 1 at its first pass, a second before the node took traffic).
#[tokio::test]
async fn the_healthy_gauge_is_pingoras_verdict_when_a_node_needs_several_passes_to_rise() {
    let checks = ["--health-interval-ms", "300", "--health-timeout-ms", "200", "--health-rise", "3"];
    let c = cluster(&["a", "b"], &[], &checks).await;
    let gauge = || async {
        let m = get_text(&format!("{}/metrics", c.balancer.admin)).await;
        m.lines()
            .find_map(|l| l.strip_prefix("switchboard_balancer_backend_healthy{backend=\"a\"} "))
            .map(|v| v.trim().to_string())
    };
    let pingora_says = || async {
        let v = c.balancer.backends().await;
        v["nodes"].as_array().and_then(|n| n.iter().find(|n| n["nodeId"] == "a")).map(|n| n["healthy"] == true)
    };
    c.nodes[0].process.signal(libc::SIGSTOP);
    eventually(WAIT, "node a to fail its checks", || async { (gauge().await.as_deref() == Some("0")).then_some(()) })
        .await;
    assert_eq!(pingora_says().await, Some(false));
    c.nodes[0].process.signal(libc::SIGCONT);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        // The gauge first, then Pingora: a gauge of 1 read first must agree.
        let g = gauge().await;
        let healthy = pingora_says().await;
        if g.as_deref() == Some("1") {
            assert_eq!(healthy, Some(true), "the gauge said healthy before Pingora did");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "node a never became healthy again (gauge {g:?})");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

#[tokio::test]
async fn requests_to_a_node_that_just_died_are_retried_on_another_before_any_health_check() {
    // Health checks every minute: only the failed connection can reveal the death.
    let mut c = cluster(&["a", "b"], &[], &["--health-interval-ms", "60000"]).await;
    c.nodes[0].process.kill();
    for i in 0..8 {
        let r = cookieless()
            .post(format!("{}/chathub/negotiate?negotiateVersion=1", c.balancer.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "negotiate {i} failed after a node died");
        let body: Value = r.json().await.unwrap();
        let token = body["connectionToken"].as_str().unwrap();
        assert_eq!(switchboard_common::token::owner_of(token).as_deref(), Some("b"));
    }
    let m = get_text(&format!("{}/metrics", c.balancer.admin)).await;
    assert!(metric_nonzero(&m, "switchboard_balancer_retries_total"), "{m}");
}

/// Per-core (the default): each proxy thread listens on the public port with
/// a socket of its own, the kernel spreads connections over them, and a
/// graceful upgrade hands every one of them to the new process; with
/// `--work-stealing true` there is one socket.
#[tokio::test]
async fn each_proxy_thread_has_its_own_listening_socket_and_an_upgrade_hands_them_all_over() {
    let redis = RedisServer::start();
    let _node = TestNode::start(&redis, "a", &[]).await;
    let mut lb = TestBalancer::start(&redis, &["--threads", "3"]).await;
    let port_of = |base: &str| base.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).expect("a port");
    let port = port_of(&lb.base);
    assert_eq!(listening_sockets(port), 3);
    lb.wait_accepting(&["a"]).await;
    let http = reqwest::Client::new();
    let echo = |mut c: HubClient, text: &'static str| async move {
        assert_eq!(c.invoke("Echo", vec![json!(text)]).await, Ok(json!(text)));
        c
    };
    echo(HubClient::connect(&http, &lb.base, TransportKind::WebSockets).await.expect("client"), "before").await;

    let mut old = lb.upgrade().await;
    // The new process answers on every socket, each connection a new one.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    for _ in 0..30 {
        assert_eq!(fresh.get(format!("{}/health", lb.base)).send().await.map(|r| r.status().as_u16()).ok(), Some(200));
    }
    let after = HubClient::connect(&http, &lb.base, TransportKind::WebSockets).await.expect("client after");
    echo(after, "after").await;
    assert!(old.wait_exit(Duration::from_secs(15)).is_some(), "the old process exits");
    assert_eq!(listening_sockets(port), 3, "the new process holds every socket, none doubled or lost");

    let stealing = TestBalancer::start(&redis, &["--threads", "3", "--work-stealing", "true"]).await;
    assert_eq!(listening_sockets(port_of(&stealing.base)), 1);
}

/// What a `gate` does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    /// New connections are refused (its listening socket is closed); those
    /// it relays carry on.
    Refusing,
    /// A partition: new connections are refused and the ones it relays carry
    /// nothing either way, then or ever after (nothing is closed: a dropped
    /// connection that TCP keeps retrying in silence); connections made after
    /// it opens again work.
    Partitioned,
    /// A node dying with requests in flight: connections are accepted, and
    /// any of them (new or relayed) is closed the moment bytes arrive,
    /// without passing them on.
    Dying,
}

/// Copies `from` to `to` until the gate is partitioned; from then on it
/// holds the connection open and silent.
async fn relay_half(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: tokio::sync::watch::Receiver<Gate>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = state.wait_for(|s| *s == Gate::Partitioned) => break,
        };
        if *state.borrow() == Gate::Dying {
            return;
        }
        if *state.borrow() == Gate::Partitioned || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Silent until the test ends (the sender is dropped).
    let _ = state.wait_for(|_| false).await;
    drop((from, to));
}

/// A TCP relay in front of `target` on a port of its own, doing what the
/// sender last said (see `Gate`). Stopped when the sender is dropped.
async fn gate(target: String) -> (u16, tokio::sync::watch::Sender<Gate>) {
    use tokio::net::{TcpListener, TcpStream};
    let port = switchboard_tests::free_port();
    let (set, mut watch) = tokio::sync::watch::channel(Gate::Open);
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind the gate");
    tokio::spawn(async move {
        let mut listener = Some(listener);
        loop {
            if matches!(*watch.borrow(), Gate::Refusing | Gate::Partitioned) {
                listener = None;
                if watch.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let Some(l) = &listener else {
                match TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(l) => listener = Some(l),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
                continue;
            };
            tokio::select! {
                accepted = l.accept() => if let Ok((inbound, _)) = accepted {
                    let (target, state) = (target.clone(), watch.clone());
                    tokio::spawn(async move {
                        if let Ok(out) = TcpStream::connect(&target).await {
                            let ((in_r, in_w), (out_r, out_w)) = (inbound.into_split(), out.into_split());
                            tokio::join!(relay_half(in_r, out_w, state.clone()), relay_half(out_r, in_w, state));
                        }
                    });
                },
                changed = watch.changed() => if changed.is_err() { return },
            }
        }
    });
    (port, set)
}

#[tokio::test]
async fn a_negotiate_in_flight_to_a_node_that_dies_is_answered_by_another_node() {
    let redis = RedisServer::start();
    let node_port = switchboard_tests::free_port();
    let (gate_port, gate) = gate(format!("127.0.0.1:{node_port}")).await;
    let advertise = format!("http://127.0.0.1:{gate_port}");
    let _dying = TestNode::start_on_port(&redis.url(), "a", node_port, &["--advertise-url", &advertise]).await;
    let _b = TestNode::start(&redis, "b", &[]).await;
    // Health checks every minute: only the failed requests can reveal the death.
    let balancer = TestBalancer::start(&redis, &["--health-interval-ms", "60000"]).await;
    balancer.wait_accepting(&["a", "b"]).await;
    // Pooled connections to both nodes.
    let http = cookieless();
    let negotiate = || http.post(format!("{}/chathub/negotiate?negotiateVersion=1", balancer.base)).send();
    let mut owners = std::collections::HashSet::new();
    for _ in 0..12 {
        let body: Value = negotiate().await.unwrap().json().await.unwrap();
        owners.insert(switchboard_common::token::owner_of(body["connectionToken"].as_str().unwrap()));
    }
    assert_eq!(owners.len(), 2, "both nodes answered while well: {owners:?}");

    gate.send(Gate::Dying).unwrap();
    for i in 0..8 {
        let r = negotiate().await.unwrap();
        assert_eq!(r.status(), 200, "negotiate {i} failed while a node died under it");
        let body: Value = r.json().await.unwrap();
        let token = body["connectionToken"].as_str().unwrap();
        assert_eq!(switchboard_common::token::owner_of(token).as_deref(), Some("b"));
    }
}

#[tokio::test]
async fn a_node_cut_off_from_redis_takes_no_new_clients_and_its_clients_catch_up_after_the_heal() {
    let redis = RedisServer::start();
    let (redis_gate, partition) = gate(format!("127.0.0.1:{}", redis.port)).await;
    let cut = TestNode::start_with_redis_url(&format!("redis://127.0.0.1:{redis_gate}"), "cut", &[]).await;
    let _whole = TestNode::start(&redis, "whole", &[]).await;
    let balancer = TestBalancer::start(&redis, &[]).await;
    balancer.wait_accepting(&["cut", "whole"]).await;
    let base = balancer.base.clone();
    let mut listener = client_on(&base, TransportKind::WebSockets, "cut").await;
    let speaker = client_on(&base, TransportKind::WebSockets, "whole").await;

    partition.send(Gate::Partitioned).unwrap();
    let cut_at = std::time::Instant::now();
    let degraded =
        |v: &Value| v["nodes"].as_array().into_iter().flatten().any(|n| n["nodeId"] == "cut" && n["degraded"] == true);
    eventually(Duration::from_secs(15), "the cut node to be seen as degraded", || async {
        degraded(&balancer.backends().await).then_some(())
    })
    .await;
    eprintln!("the cut node was seen as degraded {:?} after the cut", cut_at.elapsed());
    for _ in 0..8 {
        let mut c = HubClient::connect(&cookieless(), &base, TransportKind::LongPolling).await.unwrap();
        assert_eq!(node_of(&mut c).await, "whole", "a new client went to the node cut off from Redis");
    }
    let said: Vec<String> = (0..5).map(|i| format!("during the partition {i}")).collect();
    for text in &said {
        speaker.send("SendMessage", vec![json!("speaker"), json!(text)]).await;
    }

    partition.send(Gate::Open).unwrap();
    let healed_at = std::time::Instant::now();
    speaker.send("SendMessage", vec![json!("speaker"), json!("after the heal")]).await;
    let heard = listener
        .expect(Duration::from_secs(20), |v| v["target"] == "ReceiveMessage" && v["arguments"][1] == "after the heal")
        .await;
    assert!(heard.is_some(), "the cut node's client never heard the cluster again:\n{}", cut.process.log_text());
    eprintln!("the cut node's client heard the cluster again {:?} after the heal", healed_at.elapsed());
    let got: Vec<String> = listener.take_arguments("ReceiveMessage", 1);
    assert_eq!(got, said, "what was said during the partition, once each and in order");
    eventually(Duration::from_secs(15), "the healed node to take new clients again", || async {
        (!degraded(&balancer.backends().await)).then_some(())
    })
    .await;
    drop(cut);
}

#[tokio::test]
async fn a_node_that_refuses_connections_for_a_moment_keeps_its_long_polling_and_sse_clients() {
    let redis = RedisServer::start();
    // The balancer reaches the node through a gate the test closes.
    let node_port = switchboard_tests::free_port();
    let (gate_port, gate) = gate(format!("127.0.0.1:{node_port}")).await;
    let node = TestNode::start_on_port(
        &redis.url(),
        "a",
        node_port,
        &["--advertise-url", &format!("http://127.0.0.1:{gate_port}")],
    )
    .await;
    // Health checks at the default second, two failures to fall: a moment's
    // refusal is shorter than that.
    let balancer = TestBalancer::start(&redis, &["--health-interval-ms", "1000"]).await;
    balancer.wait_accepting(&["a"]).await;
    let base = balancer.base.clone();
    let mut clients = Vec::new();
    for kind in [TransportKind::LongPolling, TransportKind::ServerSentEvents] {
        for _ in 0..6 {
            clients.push(HubClient::connect(&cookieless(), &base, kind).await.unwrap());
        }
    }
    let speaker = HubClient::connect(&cookieless(), &base, TransportKind::WebSockets).await.unwrap();

    // The node refuses new connections for a moment: new clients fail to
    // connect to it (more than once), and messages make every poll return
    // and poll again meanwhile.
    gate.send(Gate::Refusing).unwrap();
    let failed = futures_util::future::join_all((0..3).map(|_| {
        let base = base.clone();
        async move { tokio_tungstenite::connect_async(format!("{}/chathub", ws_url(&base))).await.is_err() }
    }));
    let talk = async {
        for i in 0..5 {
            speaker.send("SendMessage", vec![json!("speaker"), json!(format!("during {i}"))]).await;
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    };
    let (failed, ()) = tokio::join!(failed, talk);
    assert!(failed.iter().all(|f| *f), "new clients could not reach the closed node: {failed:?}");
    gate.send(Gate::Open).unwrap();

    // Every client is still there: it hears what was said after, and answers.
    speaker.send("SendMessage", vec![json!("speaker"), json!("after")]).await;
    for (i, c) in clients.iter_mut().enumerate() {
        let heard = c.expect(WAIT, |v| v["target"] == "ReceiveMessage" && v["arguments"][1] == "after").await;
        let kind = c.kind;
        assert!(heard.is_some(), "client {i} ({kind:?}) lost its connection: {:?}", c.drain_pending());
        assert_eq!(c.invoke("Echo", vec![json!(i)]).await, Ok(json!(i)), "client {i} ({:?})", c.kind);
    }
    drop(node);
}

#[tokio::test]
async fn a_node_takes_new_connections_at_its_admission_rate_and_its_own_connections_never_wait() {
    let c =
        cluster(&["a"], &[], &["--node-admission-rate", "5", "--admission-wait-ms", "300", "--slow-start-secs", "0"])
            .await;
    let base = c.balancer.base.clone();
    let mut own = HubClient::connect(&cookieless(), &base, TransportKind::LongPolling).await.unwrap();
    // Forty clients negotiate at once with a node that takes five a second.
    let burst = (0..40).map(|_| {
        let url = format!("{base}/chathub/negotiate?negotiateVersion=1");
        async move {
            let r = cookieless().post(url).send().await.unwrap();
            let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_string());
            (r.status().as_u16(), retry_after, r.text().await.unwrap_or_default())
        }
    });
    let began = std::time::Instant::now();
    let (answers, echoed) =
        tokio::join!(futures_util::future::join_all(burst), own.invoke("Echo", vec![json!("mine")]));
    // What the node could admit while the burst lasted, however slow the
    // machine: one second's worth at once, then five a second.
    let most = 5 + (5.0 * began.elapsed().as_secs_f64()).ceil() as usize + 1;
    assert_eq!(echoed, Ok(json!("mine")), "a connection the node owns is never held back");
    let admitted = answers.iter().filter(|(s, _, _)| *s == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
    assert_eq!(admitted + refused.len(), 40, "{answers:?}");
    assert!((1..=most).contains(&admitted), "{admitted} admitted at 5/s, at most {most} while the burst lasted");
    assert!(!refused.is_empty(), "the rest wait a short while, then are refused");
    for (_, retry_after, body) in &refused {
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert!(body.contains("as fast as they can"), "{body}");
    }
    let m = get_text(&format!("{}/metrics", c.balancer.admin)).await;
    assert!(m.contains("switchboard_balancer_refused_total{reason=\"node_busy\"}"), "{m}");
    assert!(metric_nonzero(&m, "switchboard_balancer_admission_waited_total"), "{m}");
    // Later, at the node's pace, new clients are admitted again.
    eventually(WAIT, "a new client to be admitted again", || async {
        HubClient::connect(&cookieless(), &base, TransportKind::WebSockets).await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn a_node_that_joins_a_running_cluster_starts_slowly() {
    let mut c = cluster(&["a"], &[], &[]).await;
    c.nodes.push(TestNode::start(&c.redis, "b", &[]).await);
    c.balancer.wait_accepting(&["a", "b"]).await;
    let backends = c.balancer.backends().await;
    let admission = |id: &str| {
        backends["nodes"].as_array().unwrap().iter().find(|n| n["nodeId"] == id).unwrap()["admission"].clone()
    };
    let (a, b) = (admission("a"), admission("b"));
    assert_eq!(a["slowStart"], false, "{a}");
    assert_eq!(a["ratePerSec"], 1000.0, "{a}");
    assert_eq!(b["slowStart"], true, "{b}");
    assert!(b["ratePerSec"].as_f64().unwrap() < 1000.0, "{b}");
}

/// The node judges an `Origin` against the address the client used, which it
/// learns from the balancer's `X-Forwarded-*` headers: a client's own forged
/// ones must be replaced on the proxied HTTP path (negotiate here), or a page
/// on another site could pass as same-origin.
#[tokio::test]
async fn the_balancer_replaces_a_clients_forwarded_headers_on_proxied_requests() {
    let c = cluster(&["a"], &[], &[]).await;
    let negotiate = |origin: &'static str| {
        cookieless()
            .post(format!("{}/chathub/negotiate?negotiateVersion=1", c.balancer.base))
            .header("Host", "chat.example")
            .header("Origin", origin)
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "evil.example")
            .send()
    };
    let own = negotiate("http://chat.example").await.unwrap();
    assert_eq!(own.status(), 200, "the page's own origin, as the balancer forwards it");
    let json: serde_json::Value = own.json().await.unwrap();
    assert!(json["connectionToken"].as_str().is_some_and(|t| !t.is_empty()), "{json}");
    let forged = negotiate("https://evil.example").await.unwrap();
    assert_eq!(forged.status(), 403, "the origin the forged headers named");
}

/// A node made of raw HTTP, so the test controls every byte and sees every
/// connection: `/health` answers healthy; `/nodes?case=…` answers `stream`
/// (a chunked body whose second half waits for the test), `plain` (a short
/// body), `close` (a body, then the connection closed without saying so),
/// `events` (a chunked stream that stays open), `big` (`BIG` bytes of a
/// known pattern) and `hold` (no answer: a long poll). Each request is reported with the number of the connection it came
/// on; a held or streaming request's connection is reported again when the
/// balancer closes it.
struct RawNode {
    addr: std::net::SocketAddr,
    seen: tokio::sync::mpsc::UnboundedReceiver<(String, usize)>,
    release: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl RawNode {
    async fn start() -> RawNode {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
        let release = std::sync::Arc::new(tokio::sync::Notify::new());
        let notify = release.clone();
        let task = tokio::spawn(async move {
            let mut number = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                number += 1;
                let (tx, release) = (tx.clone(), notify.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        let target = head.split(' ').nth(1).unwrap_or_default().to_string();
                        let case = target.split("case=").nth(1).unwrap_or("health").to_string();
                        if case != "health" {
                            let _ = tx.send((case.clone(), number));
                        }
                        match case.as_str() {
                            "stream" => {
                                let _ = s
                                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                                    .await;
                                release.notified().await;
                                let _ = s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await;
                            }
                            "events" => {
                                let _ = s
                                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
                                    .await;
                                let mut rest = [0u8; 64];
                                while matches!(s.read(&mut rest).await, Ok(n) if n > 0) {}
                                let _ = tx.send(("closed".into(), number));
                                return;
                            }
                            "big" => {
                                let body: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
                                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
                                let _ = s.write_all(head.as_bytes()).await;
                                let _ = s.write_all(&body).await;
                            }
                            "hold" => {
                                let mut rest = [0u8; 64];
                                while matches!(s.read(&mut rest).await, Ok(n) if n > 0) {}
                                let _ = tx.send(("closed".into(), number));
                                return;
                            }
                            "close" => {
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbye\n").await;
                                return;
                            }
                            _ => {
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n").await;
                            }
                        }
                    }
                });
            }
        });
        RawNode { addr, seen, release, task }
    }

    async fn next(&mut self) -> (String, usize) {
        tokio::time::timeout(WAIT, self.seen.recv()).await.expect("the raw node hears").expect("raw node running")
    }
}

/// The size of the raw node's `big` answer: far more than the sockets' buffers.
const BIG: usize = 16 << 20;

/// Reads one response from `s`: its head and, by its framing, its raw body.
async fn raw_response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    async fn more(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.expect("an answer in time").expect("read");
        assert!(n > 0, "closed early; have {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        more(s, buf).await;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end);
    let lower = head.to_ascii_lowercase();
    let body_len = if lower.contains("transfer-encoding: chunked") {
        loop {
            if let Some(end) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                break end + 5;
            }
            more(s, buf).await;
        }
    } else {
        let len: usize =
            lower.split("content-length: ").nth(1).and_then(|v| v.split("\r\n").next()?.parse().ok()).unwrap();
        while buf.len() < len {
            more(s, buf).await;
        }
        len
    };
    (head, buf.drain(..body_len).collect())
}

/// Plain requests the balancer forwards itself: a chunked answer reaches the
/// client as it is written (an event stream is never held back) and byte for
/// byte; the client's connection and the one to the node both carry the next
/// request, after the balancer's own refusals too; a kept connection the node closed is replaced without the client
/// noticing; a slow reader gets a large answer whole while its next request
/// waits; and a client that leaves a request the node has not answered
/// (a long poll), or one whose answer is still streaming (an event stream),
/// takes the node's side of it away at once.
#[tokio::test]
async fn plain_requests_stream_through_kept_alive_connections_both_sides() {
    use tokio::io::AsyncWriteExt;
    let c = cluster(&[], &[], &[]).await;
    let mut node = RawNode::start().await;
    register_healthy(&c.redis, "raw", node.addr).await;
    c.balancer.wait_accepting(&["raw"]).await;

    let front = c.balancer.base.trim_start_matches("http://").to_string();
    let mut client = tokio::net::TcpStream::connect(&front).await.unwrap();
    let mut buf = Vec::new();
    let ask = |case: &str| format!("GET /nodes?case={case} HTTP/1.1\r\nHost: sb\r\n\r\n");

    client.write_all(ask("stream").as_bytes()).await.unwrap();
    let (_, first_conn) = node.next().await;
    // The first chunk arrives while the node still holds the second.
    let (head, _) = tokio::time::timeout(WAIT, async {
        use tokio::io::AsyncReadExt;
        loop {
            let mut chunk = [0u8; 4096];
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(5).any(|w| w == b"first") {
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                break (String::from_utf8_lossy(&buf[..end]).to_string(), ());
            }
        }
    })
    .await
    .expect("the first chunk before the rest is written");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Set-Cookie: switchboard_affinity="), "a new client gets its cookie: {head}");
    node.release.notify_one();
    let (_, body) = raw_response(&mut client, &mut buf).await;
    assert_eq!(body, b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n");

    client.write_all(ask("plain").as_bytes()).await.unwrap();
    let (_, body) = raw_response(&mut client, &mut buf).await;
    assert_eq!(body, b"ok\n");
    assert_eq!(node.next().await, ("plain".into(), first_conn), "the node's connection was kept and reused");

    client.write_all(ask("close").as_bytes()).await.unwrap();
    assert_eq!(raw_response(&mut client, &mut buf).await.1, b"bye\n");
    assert_eq!(node.next().await, ("close".into(), first_conn));
    // Whether or not the balancer saw the close before reusing: an answer.
    for _ in 0..3 {
        client.write_all(ask("plain").as_bytes()).await.unwrap();
        assert_eq!(raw_response(&mut client, &mut buf).await.1, b"ok\n");
        let (case, conn) = node.next().await;
        assert_eq!(case, "plain");
        assert_ne!(conn, first_conn, "a closed connection is not used again");
    }

    // The balancer's own answers keep the connection too (a long-polling
    // client told its connection is gone negotiates again on it).
    client.write_all(b"GET /metrics HTTP/1.1\r\nHost: sb\r\n\r\n").await.unwrap();
    let (head, _) = raw_response(&mut client, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 404") && !head.to_ascii_lowercase().contains("connection: close"), "{head}");
    client.write_all(ask("plain").as_bytes()).await.unwrap();
    assert_eq!(raw_response(&mut client, &mut buf).await.1, b"ok\n");
    assert_eq!(node.next().await.0, "plain");

    // A large answer to a slow reader that sends its next request while
    // the answer is still coming: every byte arrives, in order, and the
    // next request (read by the balancer mid-answer) is answered after it.
    client.write_all(ask("big").as_bytes()).await.unwrap();
    {
        use tokio::io::AsyncReadExt;
        let mut got = std::mem::take(&mut buf);
        let mut sent_next = false;
        let end = loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                if got.len() >= end + 4 + BIG {
                    break end + 4;
                }
            }
            if !sent_next && got.len() > 64 * 1024 {
                client.write_all(ask("plain").as_bytes()).await.unwrap();
                sent_next = true;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            let mut chunk = vec![0u8; 32 * 1024];
            let n = tokio::time::timeout(WAIT, client.read(&mut chunk)).await.expect("more of the answer").unwrap();
            assert!(n > 0, "closed after {} bytes", got.len());
            got.extend_from_slice(&chunk[..n]);
        };
        assert!(sent_next);
        let body = &got[end..end + BIG];
        let wrong = body.iter().enumerate().position(|(i, b)| *b != (i % 251) as u8);
        assert_eq!(wrong, None, "the big answer's bytes arrive as sent");
        buf = got[end + BIG..].to_vec();
    }
    assert_eq!(node.next().await.0, "big");
    assert_eq!(raw_response(&mut client, &mut buf).await.1, b"ok\n", "the request sent mid-answer is answered");
    assert_eq!(node.next().await.0, "plain");

    let mut poller = tokio::net::TcpStream::connect(&front).await.unwrap();
    poller.write_all(ask("hold").as_bytes()).await.unwrap();
    let (_, held) = node.next().await;
    drop(poller);
    assert_eq!(node.next().await, ("closed".into(), held), "the node's side of an abandoned request closes");

    // The same for a stream already under way (an event stream whose tab closed).
    let mut listener = tokio::net::TcpStream::connect(&front).await.unwrap();
    listener.write_all(ask("events").as_bytes()).await.unwrap();
    let (_, streaming) = node.next().await;
    let mut seen = Vec::new();
    while !seen.windows(7).any(|w| w == b"data: 1") {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, listener.read(&mut chunk)).await.expect("the first event").unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&chunk[..n]);
    }
    drop(listener);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(2), node.seen.recv())
            .await
            .expect("closed within 2 s, not at the next write"),
        Some(("closed".into(), streaming))
    );
    node.task.abort();
}
