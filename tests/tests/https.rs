//! HTTPS at the balancer, end to end: a real balancer process with a
//! certificate from a throwaway authority, real nodes and Redis.
//!
//! - rustls clients over TLS 1.3 and 1.2 (ALPN http/1.1): `/health`,
//!   negotiate, and a `wss://` hub connection that pipelines large Echo
//!   invocations in both directions at once, checked byte for byte;
//! - Microsoft's SignalR client in Chromium over `https://` on WebSockets,
//!   Server-Sent Events and long polling (JSON) and MessagePack;
//! - the certificate swapped on disk is served to new connections while an
//!   open `wss://` connection keeps working; garbage at reload keeps the old
//!   one; SIGHUP reloads and does not stop the process;
//! - plain HTTP and malformed TLS records on the TLS port are closed, the
//!   balancer keeps serving; plain requests are redirected to HTTPS (308)
//!   except `/health`;
//! - a certificate that is missing or garbage at start stops the balancer
//!   with a clear message and a non-zero exit.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use switchboard_tests::browser::{eval, eval_until, Browser};
use switchboard_tests::official::official_client_page_in;
use switchboard_tests::tls::{peer_leaf, TestCa};
use switchboard_tests::{eventually, free_port, free_ports, InProcessNode, Process, RedisServer, TestBalancer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sb-{label}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Opens a hub connection over `wss://` through the balancer's TLS port and
/// completes the JSON handshake.
async fn wss_hub(
    ca: &TestCa,
    port: u16,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let client = ca.client(TLS13);
    let (status, text) = client.request(port, "POST", "/chathub/negotiate?negotiateVersion=1", &[]).await;
    assert_eq!(status, 200, "negotiate over HTTPS: {text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let neg: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("negotiate body {body:?}: {e}"));
    let token = neg["connectionToken"].as_str().expect("connectionToken").to_string();
    let tls = client.connect(port).await.expect("TLS connect");
    let url = format!("wss://localhost:{port}/chathub?id={token}");
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls).await.expect("wss upgrade");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("{\"protocol\":\"json\",\"version\":1}\u{1e}")).await.expect("handshake");
    let answer = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("handshake answer");
    assert_eq!(answer.expect("open").expect("frame").into_text().expect("text").as_str(), "{}\u{1e}");
    ws
}

/// Sends `count` Echo invocations of distinct `size`-byte strings without
/// reading, then reads every completion and checks each result exactly.
async fn pipelined_echoes<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, count: usize, size: usize, salt: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let text = |i: usize| format!("{salt}{i:05}-{}", "é".repeat(size / 2));
    let (mut sink, mut stream) = ws.split();
    let send = async {
        for i in 0..count {
            let inv = json!({"type": 1, "invocationId": i.to_string(), "target": "Echo", "arguments": [text(i)]});
            sink.send(Message::text(format!("{inv}\u{1e}"))).await.expect("send invocation");
        }
    };
    let receive = async {
        let mut done = vec![false; count];
        let mut left = count;
        while left > 0 {
            let frame = tokio::time::timeout(Duration::from_secs(20), stream.next())
                .await
                .expect("completions keep coming")
                .expect("stream open")
                .expect("frame");
            let Message::Text(t) = frame else { continue };
            for record in t.as_str().split('\u{1e}').filter(|r| !r.is_empty()) {
                let v: Value = serde_json::from_str(record).expect("a JSON record");
                if v["type"] != 3 {
                    continue;
                }
                let i: usize = v["invocationId"].as_str().and_then(|s| s.parse().ok()).expect("invocation id");
                assert_eq!(v["result"], json!(text(i)), "echo {i} came back changed");
                assert!(!std::mem::replace(&mut done[i], true), "echo {i} twice");
                left -= 1;
            }
        }
    };
    tokio::join!(send, receive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_hub_and_swaps_certificates_without_dropping_connections() {
    let redis = RedisServer::start();
    let _a = InProcessNode::start(&redis, "tls-a", &[]).await;
    let _b = InProcessNode::start(&redis, "tls-b", &[]).await;
    let dir = temp_dir("tls");
    let (cert, key) = (dir.join("chain.pem"), dir.join("key.pem"));
    let ca = TestCa::new();
    let first = ca.write_leaf(&cert, &key);
    let tls_port = free_port();
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let balancer = TestBalancer::start(
        &redis,
        &[
            "--tls-listen",
            &tls_listen,
            "--tls-cert",
            &cert.to_string_lossy(),
            "--tls-key",
            &key.to_string_lossy(),
            "--tls-redirect",
            "true",
        ],
    )
    .await;
    balancer.wait_accepting(&["tls-a", "tls-b"]).await;

    // TLS 1.3 and 1.2, ALPN http/1.1, the test certificate.
    for versions in [TLS13, TLS12] {
        let client = ca.client(versions);
        let tls = client.connect(tls_port).await.expect("TLS handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(peer_leaf(&tls).as_ref(), Some(&first));
        let (status, text) = client.request(tls_port, "GET", "/health", &[]).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("\"status\""), "{text}");
    }
    // TLS 1.1 and older are not offered by rustls at all; a client that
    // insists on them is refused in the handshake (checked with raw records below).

    // Plain HTTP is redirected to HTTPS, except /health.
    let plain = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let moved = plain.get(format!("{}/chathub/negotiate?x=1", balancer.base)).send().await.expect("plain request");
    assert_eq!(moved.status().as_u16(), 308);
    assert_eq!(
        moved.headers()["location"].to_str().expect("location"),
        format!("https://127.0.0.1:{tls_port}/chathub/negotiate?x=1")
    );
    let health = plain.get(format!("{}/health", balancer.base)).send().await.expect("plain /health");
    assert_eq!(health.status().as_u16(), 200);

    // A wss:// hub connection: many large Echoes in flight both ways, byte for byte.
    let mut ws = wss_hub(&ca, tls_port).await;
    pipelined_echoes(&mut ws, 200, 16 * 1024, "first").await;

    // Swap the certificate on disk: new connections get the new one.
    let second = ca.write_leaf(&cert, &key);
    assert_ne!(first, second);
    let client = ca.client(TLS13);
    eventually(Duration::from_secs(10), "the new certificate to be served", || async {
        let tls = client.connect(tls_port).await.ok()?;
        (peer_leaf(&tls).as_ref() == Some(&second)).then_some(())
    })
    .await;
    // The connection opened before the swap still works.
    pipelined_echoes(&mut ws, 50, 4096, "after-swap").await;

    // Garbage at reload: the old certificate stays, the reason is logged.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        .expect("garbage");
    eventually(Duration::from_secs(10), "the failed reload to be logged", || async {
        balancer.process.log_text().contains("not reloaded").then_some(())
    })
    .await;
    let tls = client.connect(tls_port).await.expect("still serving TLS");
    assert_eq!(peer_leaf(&tls).as_ref(), Some(&second), "the previous certificate stays");
    drop(tls);

    // SIGHUP reloads (a forced reload of a good pair) and does not stop the process.
    let third = ca.write_leaf(&cert, &key);
    balancer.process.signal(libc::SIGHUP);
    eventually(Duration::from_secs(10), "the certificate after SIGHUP", || async {
        let tls = client.connect(tls_port).await.ok()?;
        (peer_leaf(&tls).as_ref() == Some(&third)).then_some(())
    })
    .await;

    // Plain HTTP and malformed TLS records on the TLS port: closed, nothing else.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5][..],
        &[0x16, 0x03, 0x00, 0x00, 0x05, 1, 0, 0, 1, 0][..],
    ] {
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", tls_port)).await.expect("connect");
        raw.write_all(junk).await.expect("send junk");
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "the balancer closed a connection that sent {junk:?}");
        assert!(!String::from_utf8_lossy(&sink).contains("HTTP/1.1 200"), "no HTTP answer in the clear");
    }
    pipelined_echoes(&mut ws, 20, 1024, "after-junk").await;
    let metrics =
        reqwest::get(format!("{}/metrics", balancer.admin)).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("reason=\"tls_handshake\""), "refused TLS handshakes are counted");

    // Microsoft's client in Chromium over https:// on every transport, one
    // sender's broadcast reaching every one of them.
    if let Some(browser) = Browser::start().await {
        let origin = format!("https://127.0.0.1:{tls_port}");
        let session = browser.session_with(800, 600, &["--ignore-certificate-errors"]).await;
        let page = official_client_page_in(session, &origin).await;
        let cases = [
            ("ws", "WebSockets", false),
            ("sse", "ServerSentEvents", false),
            ("lp", "LongPolling", false),
            ("mp-ws", "WebSockets", true),
            ("mp-lp", "LongPolling", true),
        ];
        for (name, transport, msgpack) in cases {
            let opts = json!({"url": format!("{origin}/chathub"), "transport": transport, "msgpack": msgpack});
            eval(&page, &format!("window.__sbStart('{name}', {opts}); return 1;")).await;
            let js = format!("const r = window.__sbRec('{name}'); return r.state === 'starting' ? null : r;");
            let r = eval_until(&page, &format!("{name} to start"), &js, |v| (!v.is_null()).then(|| v.clone())).await;
            assert_eq!(r["state"], "connected", "{name} over https: {r}");
            eval(&page, &format!("window.__sbEcho('{name}'); return 1;")).await;
            let js = format!("return window.__sbRec('{name}').echo || null;");
            let echo = eval_until(&page, &format!("{name} echo"), &js, |v| v.as_str().map(String::from)).await;
            assert_eq!(echo, "ok/ok", "{name} echo over https");
        }
        eval(&page, "window.__sbSend('ws', 'over-tls'); return 1;").await;
        for (name, ..) in cases {
            let js = format!("const g = window.__sbRec('{name}').got; return g.includes('over-tls') ? g : null;");
            let got = eval_until(&page, &format!("{name} to get the broadcast"), &js, |v| v.as_array().cloned()).await;
            assert_eq!(got.iter().filter(|m| *m == "over-tls").count(), 1, "{name}: exactly once");
        }
        eprintln!("official client over https: {:?}", cases.map(|c| c.0));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_missing_or_garbage_certificate_stops_the_balancer_at_start() {
    let redis = RedisServer::start();
    let dir = temp_dir("badcert");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").expect("write");
    let missing = dir.join("missing.pem");
    for (cert, key, says) in [(&missing, &garbage, "missing.pem"), (&garbage, &garbage, "garbage.pem")] {
        let [port, admin, tls] = free_ports();
        let args: Vec<String> = [
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin}"),
            "--redis".into(),
            redis.url(),
            "--tls-listen".into(),
            format!("127.0.0.1:{tls}"),
            "--tls-cert".into(),
            cert.to_string_lossy().into_owned(),
            "--tls-key".into(),
            key.to_string_lossy().into_owned(),
            "--pid-file".into(),
            dir.join(format!("{port}.pid")).to_string_lossy().into_owned(),
            "--upgrade-sock".into(),
            dir.join(format!("{port}.sock")).to_string_lossy().into_owned(),
        ]
        .into();
        let mut p = Process::spawn("switchboard-balancer", "balancer-badcert", &args);
        let status = p.wait_exit(Duration::from_secs(15)).expect("the balancer exits");
        assert!(!status.success(), "exit status {status:?}");
        let log = p.log_text();
        assert!(log.contains(says), "the message names the file: {log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
