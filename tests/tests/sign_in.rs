//! Sign-in with JWT bearer tokens and cross-origin pages, end to end through
//! the balancer in front of two nodes, with Microsoft's SignalR client in
//! headless Chromium (`accessTokenFactory`) on all three transports:
//!
//! - `auth = "required"`: no token → 401 and the client reports it; a
//!   tampered, expired, `alg: none` or oversized token → refused; a valid
//!   token → the name in the token is what other clients see, whatever `user`
//!   the sender passed; a token that expires mid-connection → Close with an
//!   error; a transport request with another user's token → 403;
//! - `allowed_origins`: a page on a listed origin connects on every
//!   transport, a page on another origin does not (preflights and
//!   WebSocket upgrades alike), and a client without `Origin` is unaffected.

use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use switchboard_tests::browser::{eval, eval_until, Browser};
use switchboard_tests::official::official_client_page;
use switchboard_tests::{token_signer, HubClient, InProcessBalancer, InProcessNode, RedisServer, TransportKind};

const SECRET: &str = "sign-in-test-secret-0123456789abcdef";
const TRANSPORTS: [&str; 3] = ["WebSockets", "ServerSentEvents", "LongPolling"];

/// Starts a client in the page and waits until it connected or failed.
async fn start(page: &fantoccini::Client, name: &str, opts: Value) -> Value {
    eval(page, &format!("window.__sbStart('{name}', {opts}); return 1;")).await;
    let js = format!("const r = window.__sbRec('{name}'); return r.state === 'starting' ? null : r;");
    eval_until(page, &format!("{name} to start"), &js, |v| (!v.is_null()).then(|| v.clone())).await
}

fn tampered(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = b64.encode(br#"{"name":"admin","sub":"admin","exp":99999999999}"#);
    format!("{}.{claims}.{}", parts[0], parts[2])
}

fn unsigned(user: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = b64.encode(format!(r#"{{"name":"{user}","exp":99999999999}}"#));
    format!("{header}.{claims}.")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_may_connect_and_who_a_message_is_from() {
    let redis = RedisServer::start();
    let auth = ["--auth", "required", "--auth-secret", SECRET, "--auth-clock-skew-secs", "0"];
    let _a = InProcessNode::start(&redis, "auth-a", &auth).await;
    let _b = InProcessNode::start(&redis, "auth-b", &auth).await;
    let balancer = InProcessBalancer::start(&redis, &[]).await;
    balancer.wait_accepting(&["auth-a", "auth-b"]).await;
    let signer = token_signer(SECRET);
    let base = &balancer.base;

    // Raw HTTP: what each kind of token gets at negotiate.
    let http = reqwest::Client::new();
    let negotiate = format!("{base}/chathub/negotiate?negotiateVersion=1");
    let status_with = |token: Option<String>| {
        let (http, url) = (http.clone(), negotiate.clone());
        async move {
            let mut req = http.post(url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.expect("negotiate");
            let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or("").to_string());
            (resp.status().as_u16(), challenge, resp.text().await.unwrap_or_default())
        }
    };
    let good = signer.issue("ana", 3600).expect("token");
    let (status, _, _) = status_with(Some(good.clone())).await;
    assert_eq!(status, 200);
    let (status, challenge, _) = status_with(None).await;
    assert_eq!((status, challenge.as_deref()), (401, Some("Bearer")));
    for (label, bad) in [
        ("tampered", tampered(&good)),
        ("alg none", unsigned("ana")),
        ("oversized", format!("{good}{}", "A".repeat(9000))),
        ("garbage", "not-a-jwt".to_string()),
    ] {
        let (status, challenge, body) = status_with(Some(bad)).await;
        assert_eq!(status, 401, "{label}: {body}");
        assert!(challenge.is_some_and(|c| c.contains("invalid_token")), "{label}");
    }
    // The access_token query parameter works as the header does.
    let q = http.post(format!("{negotiate}&access_token={good}")).send().await.expect("negotiate");
    assert_eq!(q.status().as_u16(), 200);
    // A transport request with another user's token: 403.
    let neg: Value = q.json().await.expect("json");
    let token = neg["connectionToken"].as_str().expect("token");
    let bob = signer.issue("bob", 3600).expect("token");
    let poll = http.get(format!("{base}/chathub?id={token}")).bearer_auth(&bob).send().await.expect("poll");
    assert_eq!(poll.status().as_u16(), 403);
    let poll = http.get(format!("{base}/chathub?id={token}")).send().await.expect("poll");
    assert_eq!(poll.status().as_u16(), 401, "a signed-in connection's requests need the token");

    let Some(browser) = Browser::start().await else { return };
    let page = official_client_page(&browser, base).await;
    let expired = signer.issue("old", 1).expect("token");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut matrix: Vec<(String, &str, String)> = Vec::new();
    for (i, transport) in TRANSPORTS.iter().enumerate() {
        let url = format!("{base}/chathub");
        // Refused: no token, tampered, expired.
        for (state, token) in [("none", None), ("tampered", Some(tampered(&good))), ("expired", Some(expired.clone()))]
        {
            let name = format!("{state}-{i}");
            let r = start(&page, &name, json!({"url": url, "transport": transport, "token": token})).await;
            let outcome = r["state"].as_str().unwrap_or_default().to_string();
            assert!(outcome.contains("401"), "{transport} with {state} token: {r}");
            matrix.push((transport.to_string(), state, "refused (401)".into()));
        }
        // Valid: the listener hears the token's name, not the `user` argument.
        let (speaker, listener) = (format!("ana-{i}"), format!("lis-{i}"));
        let ana = signer.issue("ana", 3600).expect("token");
        let lis = signer.issue("listener", 3600).expect("token");
        let r = start(&page, &listener, json!({"url": url, "transport": transport, "token": lis})).await;
        assert_eq!(r["state"], "connected", "{r}");
        let r = start(&page, &speaker, json!({"url": url, "transport": transport, "token": ana})).await;
        assert_eq!(r["state"], "connected", "{r}");
        let text = format!("hello-{i}");
        eval(&page, &format!("window.__sbSend('{speaker}', '{text}', 'mallory'); return 1;")).await;
        let js = format!("const r = window.__sbRec('{listener}'); const k = r.got.indexOf('{text}'); return k < 0 ? null : r.users[k];");
        let user =
            eval_until(&page, &format!("{listener} to hear {speaker}"), &js, |v| v.as_str().map(String::from)).await;
        assert_eq!(user, "ana", "{transport}: the token's name, not the claimed one");
        matrix.push((transport.to_string(), "valid", format!("connected, sent as {user:?} (claimed \"mallory\")")));

        // A token that expires mid-connection: Close with an error.
        let short = signer.issue("brief", 3).expect("token");
        let name = format!("brief-{i}");
        let r = start(&page, &name, json!({"url": url, "transport": transport, "token": short})).await;
        assert_eq!(r["state"], "connected", "{r}");
        let js = format!("const r = window.__sbRec('{name}'); return r.closed ? r.errors : null;");
        let errors = eval_until(&page, &format!("{name} to be closed at expiry"), &js, |v| v.as_array().cloned()).await;
        assert!(errors.iter().any(|e| e.as_str().is_some_and(|e| e.contains("expired"))), "{transport}: {errors:?}");
        matrix.push((transport.to_string(), "expires mid-connection", "closed with an error".into()));
    }
    for (transport, state, result) in &matrix {
        eprintln!("auth matrix: {transport:<16} {state:<24} {result}");
    }
}

/// A page server on its own origin: every path answers a tiny HTML page.
async fn page_origin() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
                let body = "<!doctype html><title>elsewhere</title>";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://127.0.0.1:{}", addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_origins_may_use_the_hub_from_a_browser() {
    let (allowed, other) = (page_origin().await, page_origin().await);
    let redis = RedisServer::start();
    let _a = InProcessNode::start(&redis, "cors-a", &["--allowed-origins", &allowed]).await;
    let _b = InProcessNode::start(&redis, "cors-b", &["--allowed-origins", &allowed]).await;
    let balancer = InProcessBalancer::start(&redis, &[]).await;
    balancer.wait_accepting(&["cors-a", "cors-b"]).await;
    let base = &balancer.base;

    // Preflight and the answer's headers, raw.
    let http = reqwest::Client::new();
    let negotiate = format!("{base}/chathub/negotiate?negotiateVersion=1");
    let preflight = |origin: String| {
        http.request(reqwest::Method::OPTIONS, &negotiate)
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "x-requested-with,authorization")
            .send()
    };
    let ok = preflight(allowed.clone()).await.expect("preflight");
    assert_eq!(ok.status().as_u16(), 204);
    let h: HashMap<String, String> =
        ok.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
    assert_eq!(h.get("access-control-allow-origin"), Some(&allowed));
    assert_eq!(h.get("access-control-allow-credentials").map(String::as_str), Some("true"));
    assert!(h.get("access-control-allow-headers").is_some_and(|v| v.contains("authorization")));
    let refused = preflight(other.clone()).await.expect("preflight");
    assert_eq!(refused.status().as_u16(), 403);
    assert!(refused.headers().get("access-control-allow-origin").is_none());
    // A non-browser client (no Origin) is not affected.
    let mut plain = HubClient::connect(&http, base, TransportKind::WebSockets).await.expect("no-Origin client");
    assert_eq!(plain.invoke("Echo", vec![json!("x")]).await, Ok(json!("x")));

    let Some(browser) = Browser::start().await else { return };
    for (origin, should) in [(&allowed, true), (&other, false)] {
        let page = official_client_page(&browser, origin).await;
        for (i, transport) in TRANSPORTS.iter().enumerate() {
            let name = format!("c{i}");
            let r = start(&page, &name, json!({"url": format!("{base}/chathub"), "transport": transport})).await;
            let connected = r["state"] == "connected";
            assert_eq!(connected, should, "page on {origin} over {transport}: {r}");
            eprintln!("origin matrix: {origin} {transport:<16} {}", if connected { "connected" } else { "refused" });
        }
    }
    // A WebSocket upgrade with a disallowed Origin, raw: 403 before any upgrade.
    let ws = http
        .get(format!("{base}/chathub"))
        .header("Origin", &other)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("upgrade");
    assert_eq!(ws.status().as_u16(), 403);
}
