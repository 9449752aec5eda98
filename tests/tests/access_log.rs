//! The balancer's access log, read back from its file after real traffic
//! through a real balancer and node: every kind of request appears once, when
//! it has ended, with its status, node, route kind, duration and bytes; the
//! connection tokens, an `access_token` and the cookies the clients sent
//! appear nowhere in it.

use serde_json::{json, Value};
use std::time::Duration;
use switchboard_tests::process::target_dir;
use switchboard_tests::{eventually, HubClient, RedisServer, TestBalancer, TestNode, TransportKind, WAIT};

const COOKIE_SECRET_VALUE: &str = "cookie-value-that-must-not-be-logged";
const ACCESS_TOKEN: &str = "access-token-that-must-not-be-logged";

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn of_kind<'a>(all: &'a [Value], kind: &str) -> Vec<&'a Value> {
    all.iter().filter(|l| l["kind"] == kind).collect()
}

#[tokio::test]
async fn every_kind_of_request_is_logged_once_when_it_ends_and_no_secret_is() {
    let redis = RedisServer::start();
    // Short long polls and keep-alives, so polls and event streams end soon
    // after their clients leave.
    let _node = TestNode::start(&redis, "log-a", &["--long-poll-secs", "1", "--keepalive-secs", "1"]).await;
    let dir = target_dir().join("access-log");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("access-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let path_arg = path.to_string_lossy().to_string();
    let lb = TestBalancer::start(&redis, &["--access-log", &path_arg, "--access-log-format", "json"]).await;
    lb.wait_accepting(&["log-a"]).await;
    let http = reqwest::Client::new();
    let cookie = format!("switchboard_affinity={COOKIE_SECRET_VALUE}; theme={COOKIE_SECRET_VALUE}");

    // The page, a path the public port does not serve, and a negotiate with an access token.
    let page = http.get(format!("{}/", lb.base)).header("Cookie", &cookie).header("User-Agent", "log-test/1.0");
    assert_eq!(page.send().await.unwrap().status(), 200);
    let hidden = http.get(format!("{}/metrics?access_token={ACCESS_TOKEN}", lb.base)).header("Cookie", &cookie);
    assert_eq!(hidden.send().await.unwrap().status(), 404);
    // The same secret under names spelled so that a literal match misses them.
    for query in ["access%5Ftoken", "%61ccess_token", "%69d", "x=1;id"] {
        let spelled = http.get(format!("{}/metrics?{query}={ACCESS_TOKEN}", lb.base)).send().await.unwrap();
        assert_eq!(spelled.status(), 404, "{query}");
    }
    let negotiate = http.post(format!("{}/chathub/negotiate?negotiateVersion=1&access_token={ACCESS_TOKEN}", lb.base));
    assert_eq!(negotiate.send().await.unwrap().status(), 200);

    // A head larger than the balancer reads: answered 431 by the front itself.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = lb.base.trim_start_matches("http://").to_string();
        let mut raw = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        let head =
            format!("GET /?access_token={ACCESS_TOKEN} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(40_000));
        let _ = raw.write_all(head.as_bytes()).await;
        let mut answer = vec![0u8; 64];
        let n = tokio::time::timeout(WAIT, raw.read(&mut answer)).await.expect("an answer").unwrap_or(0);
        assert!(answer[..n].starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&answer[..n]));
    }

    // One client on each transport, each doing a round trip.
    let mut ids = Vec::new();
    for kind in [TransportKind::WebSockets, TransportKind::ServerSentEvents, TransportKind::LongPolling] {
        let mut c = HubClient::connect(&http, &lb.base, kind).await.expect("connect through the balancer");
        assert_eq!(c.invoke("Echo", vec![json!("x".repeat(1000))]).await, Ok(json!("x".repeat(1000))));
        ids.push(c.id.clone());
        drop(c);
    }

    // The WebSocket is logged when its tunnel ends, the event stream when the
    // node's next keep-alive finds it gone, each poll when it is answered;
    // the writer collects lines every 50 ms.
    let all = eventually(WAIT, "every request's line", || async {
        let all = lines(&path);
        let polled: u64 = of_kind(&all, "long_poll").iter().filter_map(|p| p["bytesOut"].as_u64()).sum();
        let done = of_kind(&all, "websocket").len() == 1
            && of_kind(&all, "sse").len() == 1
            && polled > 1000
            && of_kind(&all, "send").len() >= 4
            && of_kind(&all, "negotiate").len() == 4
            && all.iter().any(|l| l["status"] == 431);
        done.then_some(all)
    })
    .await;
    let text = std::fs::read_to_string(&path).unwrap();
    for secret in ids.iter().map(String::as_str).chain([COOKIE_SECRET_VALUE, ACCESS_TOKEN]) {
        assert!(!text.contains(secret), "{secret} is in the access log:\n{text}");
    }

    let ws = of_kind(&all, "websocket")[0];
    assert_eq!(
        (ws["status"].as_u64(), ws["node"].as_str(), ws["route"].as_str()),
        (Some(101), Some("log-a"), Some("token"))
    );
    assert_eq!(ws["method"], "GET");
    assert!(ws["target"].as_str().unwrap().starts_with("/chathub?id=REDACTED"), "{ws}");
    // Both ways: the handshake and the 1,000-character Echo each way.
    assert!(ws["bytesIn"].as_u64().unwrap() > 1000 && ws["bytesOut"].as_u64().unwrap() > 1000, "{ws}");
    assert!(ws["durationMs"].as_f64().unwrap() > 0.0);

    let sse = of_kind(&all, "sse")[0];
    assert_eq!((sse["status"].as_u64(), sse["node"].as_str()), (Some(200), Some("log-a")));
    assert!(sse["bytesOut"].as_u64().unwrap() > 1000, "the Echo's answer went down the stream: {sse}");
    let polls = of_kind(&all, "long_poll");
    // A poll still open when its client dropped is logged as 499 (nginx's
    // "client closed request").
    let answered = |p: &&Value| [200, 204, 499].iter().any(|s| p["status"] == *s);
    assert!(!polls.is_empty() && polls.iter().all(answered), "{polls:?}");
    assert!(polls.iter().map(|p| p["bytesOut"].as_u64().unwrap()).sum::<u64>() > 1000, "{polls:?}");
    // Sends: the handshakes and Echo of the SSE and long-polling clients.
    let sends = of_kind(&all, "send");
    assert!(sends.len() >= 4 && sends.iter().all(|s| s["bytesIn"].as_u64().unwrap() > 0), "{sends:?}");
    let negotiations = of_kind(&all, "negotiate");
    assert_eq!(negotiations.len(), 4, "one per client and the one with a token: {negotiations:?}");
    assert!(negotiations.iter().any(|n| n["target"].as_str().unwrap().ends_with("access_token=REDACTED")));

    let http_lines = of_kind(&all, "http");
    let page = http_lines.iter().find(|l| l["target"] == "/").expect("the page's line");
    assert_eq!((page["status"].as_u64(), page["userAgent"].as_str()), (Some(200), Some("log-test/1.0")));
    assert!(page["bytesOut"].as_u64().unwrap() > 0 && page["route"] == "new", "{page}");
    let refused = http_lines.iter().find(|l| l["target"] == "/metrics?access_token=REDACTED").expect("the 404");
    assert_eq!(
        (refused["status"].as_u64(), refused["node"].is_null(), refused["route"].as_str()),
        (Some(404), true, Some("-"))
    );
    let too_large: Vec<&&Value> = http_lines.iter().filter(|l| l["status"] == 431).collect();
    assert_eq!(too_large.len(), 1, "{http_lines:?}");
    assert_eq!((too_large[0]["method"].as_str(), too_large[0]["route"].as_str()), (Some("-"), Some("-")));
    assert!(all.iter().all(|l| l["client"] == "127.0.0.1" && l["tls"] == false), "{all:?}");

    // Nothing is logged twice: let everything settle and count again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = lines(&path);
    assert_eq!(of_kind(&again, "websocket").len(), 1);
    assert_eq!(of_kind(&again, "sse").len(), 1);
    assert_eq!(of_kind(&again, "negotiate").len(), 4);
}
