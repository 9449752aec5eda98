//! A short run of `switchboard-bench chaos --quick`: Redis, four nodes and
//! the balancer while a node drains, a node is killed, the balancer restarts,
//! Redis stops and is paused, and a node is scaled in, under a steady 40
//! messages/s. Besides the command's own resuming and plain clients, two
//! browser clients join through the balancer before the sending starts: the
//! chat page (message ids, `Resume` after every reconnect) and Microsoft's
//! official client with automatic reconnect and `Resume` in its
//! `onreconnected`. The command checks its clients and exits non-zero when a
//! resuming one lost or repeated a message, or any did to Redis; this test
//! checks the two browser clients the same way against what was sent.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;
use switchboard_tests::browser::{eval, eval_until, Browser};
use switchboard_tests::official::official_client_page;
use switchboard_tests::process::{binary, target_dir};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// Records the text of every chat message the page shows, as it is added
/// (the page keeps only its newest 500 on screen).
const OBSERVE_PAGE: &str = r#"
window.__chaosSeen = [];
new MutationObserver((changes) => {
  for (const c of changes) for (const n of c.addedNodes) {
    if (n.classList && n.classList.contains('message')) window.__chaosSeen.push(n.querySelector('.text').textContent);
  }
}).observe(document.getElementById('messages'), { childList: true });
return 1;"#;

/// Lost and repeated messages of one client against what was sent.
fn count(seen: &[String], sent: &[(String, String)]) -> (usize, usize) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for s in seen {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    let lost = sent.iter().filter(|(_, t)| !counts.contains_key(t.as_str())).count();
    let dup = sent.iter().filter_map(|(_, t)| counts.get(t.as_str())).filter(|n| **n > 1).map(|n| n - 1).sum();
    (lost, dup)
}

fn texts(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(String::from)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chaos_run_loses_and_repeats_nothing_for_resuming_clients() {
    let bench = binary("switchboard-bench");
    let mut child = tokio::process::Command::new(&bench)
        .args(["chaos", "--quick", "--hold-secs", "15", "--bin-dir"])
        .arg(target_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", bench.display()));
    // Read stdout as it comes: the JSON is larger than a pipe's buffer.
    let mut stdout = child.stdout.take().expect("stdout");
    let json_out = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out).await;
        out
    });
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let balancer = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            if let Some(url) = line.strip_prefix("chaos: balancer ") {
                return url.to_string();
            }
        }
        panic!("the chaos run ended before announcing its balancer");
    })
    .await
    .expect("the chaos cluster started");
    let log = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    });

    // Two browser clients join while the command holds.
    let browser = Browser::start().await;
    let mut pages = None;
    if let Some(browser) = &browser {
        let page = browser.session(1024, 768).await;
        page.goto(&format!("{balancer}/")).await.expect("open the chat page");
        let connected = "return document.getElementById('status').dataset.state === 'connected' || null;";
        eval_until(&page, "the chat page to connect", connected, |v| (v == &json!(true)).then_some(())).await;
        eval(&page, OBSERVE_PAGE).await;
        let official = official_client_page(browser, &balancer).await;
        let opts =
            json!({"url": format!("{balancer}/chathub?messageIds=true"), "transport": "WebSockets", "resume": true});
        eval(&official, &format!("window.__sbStart('resume', {opts}); return 1;")).await;
        let js = "const r = window.__sbRec('resume'); return r.state === 'starting' ? null : r.state;";
        let state = eval_until(&official, "the official client to start", js, |v| v.as_str().map(String::from)).await;
        assert_eq!(state, "connected");
        pages = Some((page, official));
    }

    let status =
        tokio::time::timeout(Duration::from_secs(300), child.wait()).await.expect("the chaos run ended").unwrap();
    let stderr = log.await.unwrap_or_default();
    let out = json_out.await.expect("the run's JSON");
    assert!(status.success(), "chaos run failed:\n{stderr}");
    let result: Value = serde_json::from_slice(&out).expect("the run's JSON");
    assert!(result["sent"].as_u64().unwrap_or(0) > 500, "{result}");
    let rows = result["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 14, "seven phases for two kinds of client");
    // The contrast the resuming clients are there for: plain clients lose
    // what is sent while the balancer restarts.
    let plain_restart = rows.iter().find(|r| r["clients"] == "plain" && r["event"] == "restart balancer").unwrap();
    assert!(plain_restart["lost"].as_u64().unwrap_or(0) > 0, "{plain_restart}");

    let Some((page, official)) = pages else { return };
    let sent: Vec<(String, String)> = result["sent_texts"]
        .as_array()
        .expect("sent texts")
        .iter()
        .map(|p| (p[0].as_str().unwrap_or("").to_string(), p[1].as_str().unwrap_or("").to_string()))
        .collect();
    // The last messages may still be on their way to a browser.
    let last = sent.last().map(|(_, t)| t.clone()).unwrap_or_default();
    let page_js = "return window.__chaosSeen;";
    eval_until(&page, "the page to show the last message", page_js, |v| texts(v).contains(&last).then_some(())).await;
    let official_js = "return window.__sbRec('resume').got;";
    eval_until(&official, "the official client to get the last message", official_js, |v| {
        texts(v).contains(&last).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let page_seen = texts(&eval(&page, page_js).await);
    let rec = eval(&official, "return window.__sbRec('resume');").await;
    let official_seen = texts(&rec["got"]);
    let (page_lost, page_dup) = count(&page_seen, &sent);
    let (off_lost, off_dup) = count(&official_seen, &sent);
    eprintln!(
        "browser clients over {} messages: chat page lost {page_lost}, repeated {page_dup}; \
         official client (+Resume) lost {off_lost}, repeated {off_dup}, reconnected {} times, resumed {} messages",
        sent.len(),
        rec["reconnecting"],
        rec["resumed"]
    );
    assert_eq!((page_lost, page_dup), (0, 0), "the chat page lost or repeated messages");
    assert_eq!((off_lost, off_dup), (0, 0), "the official client with Resume lost or repeated messages: {rec}");
}
