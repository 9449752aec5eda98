//! Microsoft's own SignalR browser client (`@microsoft/signalr` 8 and its
//! MessagePack protocol, unmodified from `../shared/vendor/`) in a real
//! headless Chromium, against real nodes and the real balancer:
//!
//! - every protocol and transport it offers ({JSON, MessagePack} ×
//!   {WebSockets, Server-Sent Events (JSON only), long polling}, plus
//!   skipNegotiation), directly to a node and through the balancer: Echo of a
//!   20 KB string and of a nested object, and a broadcast from each client
//!   reaching every client exactly once whatever its protocol and node;
//! - stateful reconnect: while a sender on another node sends 40 messages a
//!   second, the stateful clients' TCP connections to the balancer are cut
//!   (`ss -K`), then the balancer's connections to their nodes, then the
//!   balancer is replaced by a graceful upgrade; each client receives every
//!   message, in order, none twice, and keeps its connection id.
//!
//! The vendor files are injected through WebDriver into a page of the
//! cluster's own origin (its JSON `/health`), so nothing of them is served by
//! the project.

use serde_json::{json, Value};
use std::time::Duration;
use switchboard_tests::browser::{eval, eval_until, Browser};
use switchboard_tests::official::official_client_page;
use switchboard_tests::{cut_connections_to, get_text, HubClient, RedisServer, TestBalancer, TestNode, TransportKind};

struct Case {
    name: &'static str,
    transport: &'static str,
    msgpack: bool,
    skip: bool,
}

const MATRIX: [Case; 7] = [
    Case { name: "json-ws", transport: "WebSockets", msgpack: false, skip: false },
    Case { name: "json-sse", transport: "ServerSentEvents", msgpack: false, skip: false },
    Case { name: "json-lp", transport: "LongPolling", msgpack: false, skip: false },
    Case { name: "json-ws-skip", transport: "WebSockets", msgpack: false, skip: true },
    Case { name: "msgpack-ws", transport: "WebSockets", msgpack: true, skip: false },
    Case { name: "msgpack-lp", transport: "LongPolling", msgpack: true, skip: false },
    Case { name: "msgpack-ws-skip", transport: "WebSockets", msgpack: true, skip: true },
];

async fn rec(client: &fantoccini::Client, name: &str) -> Value {
    eval(client, &format!("return window.__sbRec('{name}');")).await
}

/// Runs the whole matrix against `origin`; returns each client's node.
async fn run_matrix(browser: &Browser, origin: &str) -> Vec<(String, String)> {
    let client = official_client_page(browser, origin).await;
    let mut placed = Vec::new();
    for c in &MATRIX {
        // A fresh cookie jar for each client, so the balancer places each
        // by load, as it would separate people; their tokens keep them there.
        client.delete_all_cookies().await.expect("clear cookies");
        let opts =
            json!({"url": format!("{origin}/chathub"), "transport": c.transport, "msgpack": c.msgpack, "skip": c.skip});
        eval(&client, &format!("window.__sbStart('{}', {opts}); return 1;", c.name)).await;
        let js = format!("const r = window.__sbRec('{}'); return r.state === 'starting' ? null : r;", c.name);
        let r = eval_until(&client, &format!("{} to start", c.name), &js, |v| (!v.is_null()).then(|| v.clone())).await;
        assert_eq!(r["state"], "connected", "{} via {origin}: {r}", c.name);
        placed.push((c.name.to_string(), r["node"].as_str().unwrap_or_default().to_string()));
        eval(&client, &format!("window.__sbEcho('{}'); return 1;", c.name)).await;
    }
    for c in &MATRIX {
        let js = format!("return window.__sbRec('{}').echo || null;", c.name);
        let echo = eval_until(&client, &format!("{} Echo", c.name), &js, |v| v.as_str().map(String::from)).await;
        assert_eq!(echo, "ok/ok", "{} via {origin}", c.name);
    }
    // Every client broadcasts once; every client hears every broadcast once.
    for c in &MATRIX {
        eval(&client, &format!("window.__sbSend('{0}', 'hello from {0}'); return 1;", c.name)).await;
    }
    let mut want: Vec<String> = MATRIX.iter().map(|c| format!("hello from {}", c.name)).collect();
    want.sort();
    for c in &MATRIX {
        let js = format!("return window.__sbRec('{}').got;", c.name);
        eval_until(&client, &format!("{} to hear all broadcasts", c.name), &js, |v| {
            (v.as_array()?.len() >= MATRIX.len()).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for c in &MATRIX {
        let r = rec(&client, c.name).await;
        let mut got: Vec<String> =
            r["got"].as_array().unwrap().iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect();
        got.sort();
        assert_eq!(got, want, "{} via {origin}: each broadcast exactly once", c.name);
        assert_eq!(r["errors"], json!([]), "{}", c.name);
    }
    let _ = client.close().await;
    placed
}

#[tokio::test]
async fn the_official_client_works_on_every_protocol_and_transport() {
    let redis = RedisServer::start();
    let nodes = [
        TestNode::start(&redis, "node-a", &[]).await,
        TestNode::start(&redis, "node-b", &[]).await,
        TestNode::start(&redis, "node-c", &[]).await,
    ];
    let lb = TestBalancer::start(&redis, &[]).await;
    lb.wait_accepting(&["node-a", "node-b", "node-c"]).await;
    let Some(browser) = Browser::start().await else { return };

    let direct = run_matrix(&browser, &nodes[0].base).await;
    assert!(direct.iter().all(|(_, n)| n == "node-a"), "{direct:?}");
    let balanced = run_matrix(&browser, &lb.base).await;
    let mut used: Vec<&str> = balanced.iter().map(|(_, n)| n.as_str()).collect();
    used.sort();
    used.dedup();
    eprintln!("official client through the balancer: {balanced:?}");
    assert!(used.len() >= 2, "clients spread over the nodes: {balanced:?}");
}

/// Sends `SendMessage` at about 40 a second from `sender` until told to stop;
/// returns how many it sent.
fn start_sender(mut sender: HubClient) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<usize>) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(25));
        let mut n = 0usize;
        // Bounded: at most 60 s of sending whatever happens.
        while n < 2400 {
            tokio::select! {
                _ = &mut stopped => break,
                _ = tick.tick() => {
                    sender.send("SendMessage", vec![json!("sender"), json!(format!("m{n:05}"))]).await;
                    n += 1;
                }
            }
        }
        // A completed invocation after the last send: everything before it
        // has been published.
        sender.invoke("Echo", vec![json!("done")]).await.expect("sender still connected");
        n
    });
    (stop, task)
}

fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a base URL with a port")
}

async fn wait_received(client: &fantoccini::Client, name: &str, n: usize) -> Value {
    let js = format!("const r = window.__sbRec('{name}'); return r.got.length >= {n} ? r : null;");
    eval_until(client, &format!("{name} to receive {n} messages"), &js, |v| (!v.is_null()).then(|| v.clone())).await
}

#[tokio::test]
async fn stateful_reconnect_loses_nothing_across_cut_connections_and_a_balancer_upgrade() {
    let redis = RedisServer::start();
    let nodes = [
        TestNode::start(&redis, "node-a", &[]).await,
        TestNode::start(&redis, "node-b", &[]).await,
        TestNode::start(&redis, "node-c", &[]).await,
    ];
    let mut lb = TestBalancer::start(&redis, &[]).await;
    lb.wait_accepting(&["node-a", "node-b", "node-c"]).await;
    let Some(browser) = Browser::start().await else { return };
    let page = official_client_page(&browser, &lb.base).await;
    let names = ["stateful-json", "stateful-msgpack"];
    for (name, msgpack) in names.iter().zip([false, true]) {
        let opts = json!({"url": format!("{}/chathub", lb.base), "transport": "WebSockets", "msgpack": msgpack, "stateful": true});
        eval(&page, &format!("window.__sbStart('{name}', {opts}); return 1;")).await;
    }
    let mut first = Vec::new();
    for name in names {
        let js = format!("const r = window.__sbRec('{name}'); return r.state === 'starting' ? null : r;");
        let r = eval_until(&page, &format!("{name} to start"), &js, |v| (!v.is_null()).then(|| v.clone())).await;
        assert_eq!(r["state"], "connected", "{r}");
        first.push(r);
    }
    // The sender sits on a node none of the stateful clients uses, straight
    // to it, so no cut touches it.
    let used: Vec<&str> = first.iter().map(|r| r["node"].as_str().unwrap()).collect();
    let sender_node = nodes.iter().find(|n| !used.contains(&n.id.as_str())).expect("a third node");
    let http = reqwest::Client::new();
    let sender = HubClient::connect(&http, &sender_node.base, TransportKind::WebSockets).await.unwrap();
    let (stop, sending) = start_sender(sender);

    // 1. Every client connection to the balancer is cut.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cut_connections_to(port_of(&lb.base));
    // 2. The balancer's connections to the clients' nodes are cut.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for node in nodes.iter().filter(|n| used.contains(&n.id.as_str())) {
        cut_connections_to(node.port);
    }
    // 3. The balancer is replaced; the old one drops its tunnels when its
    //    shutdown timeout ends, and the clients resume through the new one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut old = lb.upgrade().await;
    assert!(old.wait_exit(Duration::from_secs(20)).is_some(), "the old balancer exits after its shutdown timeout");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = stop.send(());
    let sent = sending.await.unwrap();
    assert!(sent >= 150, "only {sent} sent");
    let want: Vec<String> = (0..sent).map(|n| format!("m{n:05}")).collect();
    for (name, before) in names.iter().zip(&first) {
        let r = wait_received(&page, name, sent).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r2 = rec(&page, name).await;
        let got: Vec<String> =
            r2["got"].as_array().unwrap().iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect();
        let missing = want.iter().filter(|w| !got.contains(w)).count();
        let dups = got.len() - {
            let mut g = got.clone();
            g.sort();
            g.dedup();
            g.len()
        };
        eprintln!("{name}: sent {sent}, received {}, missing {missing}, duplicated {dups}", got.len());
        assert_eq!(got, want, "{name}: every message, in order, none twice");
        assert_eq!(r["connectionIdNow"], before["connectionId"], "{name} kept its connection id");
        assert_eq!((r2["closed"].as_u64(), r2["reconnecting"].as_u64()), (Some(0), Some(0)), "{name}: {r2}");
    }
    let mut resumes = 0;
    for node in &nodes {
        let text = get_text(&format!("{}/metrics", node.base)).await;
        resumes += text
            .lines()
            .find_map(|l| l.strip_prefix("switchboard_node_stateful_resumes_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    eprintln!("stateful resumes across the nodes: {resumes}");
    assert!(resumes >= 6, "two clients resumed after each of three cuts: {resumes}");
}
