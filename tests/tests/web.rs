//! The chat page and the balancer dashboard in a real headless Chromium,
//! through a real balancer in front of real nodes and Redis: two people land
//! on different nodes and talk; markup typed by a user stays text; groups and
//! history work; the page fits a phone; when a person's node drains or is
//! killed the page says so, reconnects to another node and chat goes on; the dashboard
//! shows a node drain and a killed node leave. Screenshots are saved under
//! `target/<profile>/test-artifacts/`.

use fantoccini::{Client, Locator};
use serde_json::{json, Value};
use switchboard_tests::browser::{click, eval, eval_until, screenshot, type_into, Browser};
use switchboard_tests::{
    cut_connections_to, eventually, get_text, metric_nonzero, HubClient, RedisServer, TestBalancer, TestNode,
    TransportKind, WAIT,
};

const XSS_IMG: &str = r#"<img src=x onerror="window.__xss=(window.__xss||0)+1">"#;
const XSS_SCRIPT: &str = "<script>window.__xss=(window.__xss||0)+1</script>";

/// Every chat message on the page, as the user sees it.
const MESSAGES_JS: &str = r#"
return [...document.querySelectorAll('#messages li.message')].map(li => ({
  kind: li.dataset.kind,
  node: li.dataset.node,
  group: li.dataset.group || null,
  to: li.dataset.to || null,
  user: li.querySelector('.user').textContent,
  text: li.querySelector('.text').textContent,
  via: li.querySelector('.node').textContent,
}));"#;

/// Opens the chat page at `url` and waits until it says which node it is on.
async fn open_chat(browser: &Browser, url: &str, width: u32, height: u32) -> (Client, String) {
    let client = browser.session(width, height).await;
    client.goto(url).await.unwrap_or_else(|e| panic!("open {url}: {e}"));
    let node = connected_node(&client, None).await;
    (client, node)
}

/// Waits until the page shows "connected" with a node id (other than `not`).
async fn connected_node(client: &Client, not: Option<&str>) -> String {
    let js = r#"const s = document.getElementById('status');
        return s.dataset.state === 'connected' ? document.getElementById('node-id').textContent : null;"#;
    eval_until(client, "the page to show it is connected to a node", js, |v| {
        let node = v.as_str()?;
        (node != "–" && Some(node) != not).then(|| node.to_string())
    })
    .await
}

async fn set_name(client: &Client, name: &str) {
    type_into(client, "#name", name).await;
}

async fn send_chat(client: &Client, text: &str) {
    type_into(client, "#message", text).await;
    click(client, "#send").await;
    // The field is cleared once the hub accepted the message.
    eval_until(
        client,
        "the message box to clear after sending",
        "return document.getElementById('message').value;",
        |v| (v.as_str() == Some("")).then_some(()),
    )
    .await;
}

async fn messages(client: &Client) -> Vec<Value> {
    eval(client, MESSAGES_JS).await.as_array().cloned().unwrap_or_default()
}

/// Waits for a chat message whose text is exactly `text`, and returns it.
async fn wait_message(client: &Client, text: &str) -> Value {
    eval_until(client, &format!("the message {text:?} on the page"), MESSAGES_JS, |v| {
        v.as_array()?.iter().find(|m| m["text"] == text).cloned()
    })
    .await
}

async fn system_lines(client: &Client) -> Vec<String> {
    let js = "return [...document.querySelectorAll('#messages li.system')].map(li => li.textContent);";
    eval(client, js).await.as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect()
}

/// Asserts that no markup from chat text became elements or ran.
async fn assert_nothing_injected(client: &Client, who: &str) {
    let v = eval(
        client,
        "return { elements: document.querySelectorAll('#messages img, #messages script').length, xss: window.__xss ?? null };",
    )
    .await;
    assert_eq!(v["elements"], 0, "{who}: chat text became elements");
    assert_eq!(v["xss"], Value::Null, "{who}: chat text ran as script");
}

/// Waits until the dashboard lists `what` for `node` in its recent changes
/// and marks it on the connections chart.
async fn wait_change(dashboard: &Client, node: &str, what: &str) {
    let js = format!(
        "return document.querySelector('#events li[data-node=\"{node}\"][data-what=\"{what}\"]') !== null \
         && document.querySelector('#chart-connections line.marker[data-node=\"{node}\"][data-what=\"{what}\"]') !== null;"
    );
    eval_until(dashboard, &format!("the dashboard to log and mark {node} {what}"), &js, |v| (v == true).then_some(()))
        .await;
}

/// Who the page lists as online.
const ONLINE_JS: &str = "return [...document.querySelectorAll('#online li')].map(li => li.dataset.user);";

/// Waits until the page lists exactly `users` as online.
async fn wait_online(client: &Client, users: &[&str]) {
    eval_until(client, &format!("the page to list {users:?} online"), ONLINE_JS, |v| {
        let listed: Vec<&str> = v.as_array()?.iter().filter_map(Value::as_str).collect();
        (listed == users).then_some(())
    })
    .await;
}

async fn join_group(client: &Client, group: &str) {
    type_into(client, "#group-name", group).await;
    click(client, "#join").await;
    let js = format!("return document.querySelector('#groups li[data-group=\"{group}\"]') !== null;");
    eval_until(client, &format!("group {group} to be listed"), &js, |v| (v == true).then_some(())).await;
}

async fn choose_target(client: &Client, value: &str) {
    let select = client.find(Locator::Css("#target")).await.unwrap_or_else(|e| panic!("no #target: {e}"));
    select.select_by_value(value).await.unwrap_or_else(|e| panic!("select {value:?}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_on_different_nodes_chat_in_groups_with_history_and_markup_stays_text() {
    let redis = RedisServer::start();
    let nodes = [TestNode::start(&redis, "node-a", &[]).await, TestNode::start(&redis, "node-b", &[]).await];
    let lb = TestBalancer::start(&redis, &[]).await;
    lb.wait_accepting(&["node-a", "node-b"]).await;
    let Some(browser) = Browser::start().await else { return };

    // Separate sessions are separate cookie jars: the second person is a new
    // client and goes to the less loaded node.
    let (alice, alice_node) = open_chat(&browser, &lb.base, 1280, 800).await;
    let (bob, bob_node) = open_chat(&browser, &lb.base, 1280, 800).await;
    assert_ne!(alice_node, bob_node, "two new people should land on different nodes");
    set_name(&alice, "alice").await;
    set_name(&bob, "bob").await;

    send_chat(&alice, "hello from alice").await;
    let seen_by_bob = wait_message(&bob, "hello from alice").await;
    assert_eq!(seen_by_bob["user"], "alice");
    assert_eq!(seen_by_bob["node"], alice_node.as_str(), "the message names the node that carried it");
    assert_eq!(seen_by_bob["via"], format!("via {alice_node}"));
    assert_eq!(seen_by_bob["kind"], "broadcast");
    send_chat(&bob, "hi alice").await;
    let seen_by_alice = wait_message(&alice, "hi alice").await;
    assert_eq!(seen_by_alice["user"], "bob");
    assert_eq!(seen_by_alice["node"], bob_node.as_str());

    // Who is online: each sees both (the first, random names are gone).
    wait_online(&alice, &["alice", "bob"]).await;
    wait_online(&bob, &["alice", "bob"]).await;
    // Alice opens a second tab, then closes it: she is still online.
    let (alice_tab2, _) = open_chat(&browser, &lb.base, 800, 600).await;
    set_name(&alice_tab2, "alice").await;
    click(&alice_tab2, "#message").await; // leaving the name field announces it
    wait_online(&alice_tab2, &["alice", "bob"]).await;
    let _ = alice_tab2.close().await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    wait_online(&bob, &["alice", "bob"]).await;
    screenshot(&bob, "chat-online").await;

    // Markup is shown as typed and runs nowhere (not even for the sender).
    send_chat(&alice, XSS_IMG).await;
    send_chat(&alice, XSS_SCRIPT).await;
    for who in [&alice, &bob] {
        wait_message(who, XSS_IMG).await;
        wait_message(who, XSS_SCRIPT).await;
    }
    assert_nothing_injected(&alice, "alice").await;
    assert_nothing_injected(&bob, "bob").await;

    // Groups: a group message crosses nodes to members only, marked as such.
    join_group(&alice, "ops").await;
    join_group(&bob, "ops").await;
    choose_target(&bob, "ops").await;
    send_chat(&bob, "ops only").await;
    let group_msg = wait_message(&alice, "ops only").await;
    assert_eq!(group_msg["kind"], "group");
    assert_eq!(group_msg["group"], "ops");
    assert_eq!(group_msg["node"], bob_node.as_str());
    click(&alice, "#groups li[data-group=\"ops\"] button").await;
    eval_until(&alice, "ops to leave the group list", "return document.querySelectorAll('#groups li').length;", |v| {
        (v == 0).then_some(())
    })
    .await;
    send_chat(&bob, "ops after alice left").await;
    wait_message(&bob, "ops after alice left").await;
    choose_target(&bob, "").await;
    send_chat(&bob, "everyone again").await;
    wait_message(&alice, "everyone again").await;
    assert!(
        !messages(&alice).await.iter().any(|m| m["text"] == "ops after alice left"),
        "a group message reached someone who had left the group"
    );

    // The cluster panel lists both nodes and marks the page's own.
    let panel = eval_until(
        &alice,
        "the cluster panel to list both nodes",
        r#"return { count: document.getElementById('node-count').textContent,
                    nodes: [...document.querySelectorAll('#nodes li')].map(li => li.dataset.node),
                    current: document.querySelector('#nodes li.current')?.dataset.node ?? null };"#,
        |v| (v["count"] == "2" && v["nodes"].as_array()?.len() == 2).then(|| v.clone()),
    )
    .await;
    assert_eq!(panel["current"], alice_node.as_str());
    screenshot(&alice, "chat-desktop").await;

    // A third person, on a phone-sized screen, gets the earlier messages as
    // history, still as text, and the page fits the screen.
    let (carol, _) = open_chat(&browser, &lb.base, 390, 844).await;
    let history = wait_message(&carol, "hello from alice").await;
    assert_eq!(history["kind"], "history");
    assert_eq!(history["node"], alice_node.as_str());
    wait_message(&carol, XSS_IMG).await;
    assert_nothing_injected(&carol, "carol").await;
    let fit = eval(
        &carol,
        r#"const send = document.getElementById('send').getBoundingClientRect();
           return { overflow: document.documentElement.scrollWidth - window.innerWidth,
                    sendVisible: send.width > 0 && send.right <= window.innerWidth };"#,
    )
    .await;
    assert!(fit["overflow"].as_i64().unwrap_or(1) <= 0, "the page scrolls sideways on a phone: {fit}");
    assert_eq!(fit["sendVisible"], true, "the send button is off screen on a phone: {fit}");
    screenshot(&carol, "chat-phone").await;

    // Someone behind a proxy that breaks WebSockets falls back to long
    // polling and chats both ways.
    let dave = browser.session_without_websockets(1024, 700).await;
    dave.goto(&lb.base).await.expect("open the chat page");
    connected_node(&dave, None).await;
    let transport = eval(&dave, "return document.getElementById('transport').textContent;").await;
    assert_eq!(transport, "LongPolling");
    set_name(&dave, "dave").await;
    send_chat(&dave, "sent over long polling").await;
    assert_eq!(wait_message(&alice, "sent over long polling").await["user"], "dave");
    send_chat(&alice, "to dave").await;
    wait_message(&dave, "to dave").await;

    // Draining bob's node (SIGTERM): the node sends Close with
    // allowReconnect, and the page moves to the other node by itself.
    let bob_proc = nodes.iter().find(|n| n.id == bob_node).expect("bob's node is one of ours");
    bob_proc.process.terminate();
    let moved_to = connected_node(&bob, Some(&bob_node)).await;
    assert_eq!(moved_to, alice_node, "a drained page should reconnect to the remaining node");
    send_chat(&bob, "after the drain").await;
    assert_eq!(wait_message(&alice, "after the drain").await["node"], alice_node.as_str());

    for c in [alice, bob, carol, dave] {
        let _ = c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_sends_its_page_elsewhere_and_the_dashboard_shows_drain_and_loss() {
    let redis = RedisServer::start();
    let mut nodes = [
        TestNode::start(&redis, "node-a", &[]).await,
        TestNode::start(&redis, "node-b", &[]).await,
        // Drains for long enough that the dashboard must show it.
        TestNode::start(&redis, "node-c", &["--drain-secs", "30"]).await,
    ];
    let lb = TestBalancer::start(&redis, &[]).await;
    lb.wait_accepting(&["node-a", "node-b", "node-c"]).await;
    let Some(browser) = Browser::start().await else { return };

    // Clients straight on node-c keep it busy (more than the eight held
    // below can even out, whatever the tie breaks), so the two people land
    // on node-a and node-b; and they keep node-c draining instead of exiting.
    let http = reqwest::Client::new();
    let c_base = nodes[2].base.clone();
    let mut pinned = Vec::new();
    for _ in 0..12 {
        pinned.push(HubClient::connect(&http, &c_base, TransportKind::WebSockets).await.expect("client on node-c"));
    }
    eventually(WAIT, "the balancer to see node-c's clients", || async {
        let v = lb.backends().await;
        v["nodes"].as_array()?.iter().any(|n| n["nodeId"] == "node-c" && n["nodeConnections"] == 12).then_some(())
    })
    .await;

    // The page runs only its own script, under a strict policy.
    let page = reqwest::get(format!("{}/dashboard", lb.admin)).await.expect("the dashboard page");
    let csp = page.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'"), "{csp}");
    let html = page.text().await.unwrap_or_default();
    assert!(!html.contains("<script>") && !html.contains("style="), "no inline script or style");

    // Connections through the balancer, so the chart has shapes to show.
    // Eight, so node-a and node-b end level (four each) and the two people
    // who come next take one each.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(HubClient::connect(&http, &lb.base, TransportKind::WebSockets).await.expect("a held client"));
    }

    let dashboard = browser.session(1280, 1300).await;
    dashboard.goto(&format!("{}/dashboard", lb.admin)).await.expect("open the dashboard");
    let rows_js = "return Object.fromEntries([...document.querySelectorAll('#nodes tr')].map(r => [r.dataset.node, r.dataset.status]));";
    eval_until(&dashboard, "the dashboard to list three healthy nodes", rows_js, |v| {
        let rows = v.as_object()?;
        (rows.len() == 3 && rows.values().all(|s| s == "healthy")).then_some(())
    })
    .await;

    let (alice, alice_node) = open_chat(&browser, &lb.base, 1280, 800).await;
    let (bob, bob_node) = open_chat(&browser, &lb.base, 1280, 800).await;
    assert_ne!(alice_node, bob_node);
    for n in [&alice_node, &bob_node] {
        assert_ne!(n, "node-c", "a person was sent to the busy node");
    }
    set_name(&alice, "alice").await;
    set_name(&bob, "bob").await;
    send_chat(&alice, "before the failure").await;
    wait_message(&bob, "before the failure").await;
    // Alice picks bob from her online list and writes to him directly.
    click(&bob, "#message").await; // bob's name is taken when the field loses focus
    wait_online(&alice, &["alice", "bob"]).await;
    click(&alice, "#online li[data-user=\"bob\"]").await;
    send_chat(&alice, "just for bob").await;
    let dm = wait_message(&bob, "just for bob").await;
    assert_eq!((&dm["kind"], &dm["to"], &dm["user"]), (&json!("direct"), &json!("bob"), &json!("alice")), "{dm}");
    choose_target(&alice, "").await;

    // A node joins: the chart grows a band for it, the log numbers the join.
    let late = TestNode::start(&redis, "node-d", &[]).await;
    wait_change(&dashboard, "node-d", "joined").await;
    for _ in 0..3 {
        held.push(HubClient::connect(&http, &lb.base, TransportKind::WebSockets).await.expect("a held client"));
    }

    // Draining shows on the dashboard: in the table, the log and the charts.
    nodes[2].process.terminate();
    eval_until(&dashboard, "the dashboard to show node-c draining", rows_js, |v| {
        (v["node-c"] == "draining").then_some(())
    })
    .await;
    wait_change(&dashboard, "node-c", "draining").await;
    screenshot(&dashboard, "dashboard").await;

    // Kill bob's node outright.
    let bob_index = nodes.iter().position(|n| n.id == bob_node).expect("bob's node is one of ours");
    nodes[bob_index].process.kill();
    // Alice keeps talking while bob is away, to everyone and to him.
    choose_target(&alice, "@bob").await;
    send_chat(&alice, "direct while bob is away").await;
    choose_target(&alice, "").await;
    send_chat(&alice, "while bob reconnects").await;

    // The page notices, says so, and reconnects to the only node still taking
    // new clients; Resume replays what bob missed, once.
    let now_on = connected_node(&bob, Some(&bob_node)).await;
    wait_message(&bob, "while bob reconnects").await;
    let missed = messages(&bob).await.iter().filter(|m| m["text"] == "while bob reconnects").count();
    assert_eq!(missed, 1, "the message sent during the failover is shown exactly once");
    let dm = wait_message(&bob, "direct while bob is away").await;
    assert_eq!((&dm["kind"], &dm["to"]), (&json!("direct"), &json!("bob")), "{dm}");
    for (page, who) in [(&bob, "bob"), (&alice, "alice")] {
        let shown = messages(page).await.iter().filter(|m| m["text"] == "direct while bob is away").count();
        assert_eq!(shown, 1, "{who} shows the direct message sent during the failover once");
    }
    assert!(now_on != bob_node && now_on != "node-c", "bob should reconnect to a node still accepting: {now_on}");
    let lines = system_lines(&bob).await;
    assert!(
        lines.iter().any(|l| l.contains(&format!("Connection to {bob_node} lost"))),
        "the page did not say the connection was lost: {lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("Reconnected")), "the page did not say it reconnected: {lines:?}");
    send_chat(&bob, "back on another node").await;
    let msg = wait_message(&alice, "back on another node").await;
    assert_eq!(msg["node"], now_on.as_str(), "carried by bob's new node");
    assert_eq!(msg["user"], "bob");
    screenshot(&bob, "chat-after-failover").await;

    // The dashboard drops the killed node; its band fell to nothing when its
    // connections broke, and the log says it failed and left.
    eval_until(&dashboard, "the dashboard to drop the killed node", rows_js, |v| {
        v.as_object()?.get(&bob_node).is_none().then_some(())
    })
    .await;
    wait_change(&dashboard, &bob_node, "down").await;
    wait_change(&dashboard, &bob_node, "left").await;
    let band = format!(
        "const p = document.querySelector('#chart-connections path[data-key=\"{bob_node}\"]'); return p ? [Number(p.dataset.peak), Number(p.dataset.last)] : null;"
    );
    eval_until(&dashboard, "the killed node's band to rise and then fall to zero", &band, |v| {
        let (peak, last) = (v[0].as_f64()?, v[1].as_f64()?);
        (peak >= 1.0 && last == 0.0).then_some(())
    })
    .await;
    // Requests and upgrades were drawn, and every chart marks the changes.
    let drawn = eval(
        &dashboard,
        "return ['requests','upgrades'].map(k => Number(document.querySelector('#chart-requests path[data-key=\"' + k + '\"]').dataset.peak));",
    )
    .await;
    assert!(drawn[0].as_f64() > Some(0.0) && drawn[1].as_f64() > Some(0.0), "requests and upgrades: {drawn}");
    let markers = eval(&dashboard, "return document.querySelectorAll('#chart-health line.marker').length;").await;
    assert!(markers.as_u64() >= Some(4), "changes marked on the health chart too: {markers}");
    screenshot(&dashboard, "dashboard-after-kill").await;

    // A dashboard opened now is not empty: the balancer kept the last minutes.
    let fresh = browser.session(1280, 1000).await;
    fresh.goto(&format!("{}/dashboard", lb.admin)).await.expect("open a second dashboard");
    wait_change(&fresh, &bob_node, "left").await;
    eval_until(&fresh, "the fresh dashboard to draw the killed node's band", &band, |v| {
        (v[0].as_f64()? >= 1.0).then_some(())
    })
    .await;
    let _ = fresh.close().await;

    drop(held);
    drop(late);
    drop(pinned);
    for c in [alice, bob, dashboard] {
        let _ = c.close().await;
    }
}

async fn chat_from(sender: &mut HubClient, text: String) {
    sender.invoke("SendMessage", vec![serde_json::json!("sender"), serde_json::json!(text)]).await.expect("send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_without_losing_or_repeating_a_message() {
    let redis = RedisServer::start();
    let nodes = [TestNode::start(&redis, "node-a", &[]).await, TestNode::start(&redis, "node-b", &[]).await];
    let lb = TestBalancer::start(&redis, &[]).await;
    lb.wait_accepting(&["node-a", "node-b"]).await;
    let Some(browser) = Browser::start().await else { return };
    let (page, node) = open_chat(&browser, &lb.base, 1024, 768).await;
    let connection_id = eval(&page, "return document.getElementById('connection-id').textContent;").await;
    let other = nodes.iter().find(|n| n.id != node).expect("another node");
    let http = reqwest::Client::new();
    let mut sender = HubClient::connect(&http, &other.base, TransportKind::WebSockets).await.unwrap();
    for i in 0..5 {
        chat_from(&mut sender, format!("before {i}")).await;
    }
    wait_message(&page, "before 4").await;

    // Every connection from the browser to the balancer is cut; messages
    // keep coming meanwhile.
    let port: u16 = lb.base.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap();
    cut_connections_to(port);
    for i in 0..20 {
        chat_from(&mut sender, format!("during {i}")).await;
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    wait_message(&page, "during 19").await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let texts: Vec<String> =
        messages(&page).await.iter().map(|m| m["text"].as_str().unwrap_or_default().to_string()).collect();
    let want: Vec<String> =
        (0..5).map(|i| format!("before {i}")).chain((0..20).map(|i| format!("during {i}"))).collect();
    assert_eq!(texts, want, "every message once, in order");
    let lines = system_lines(&page).await;
    assert!(!lines.iter().any(|l| l.contains("lost")), "the page never lost its connection: {lines:?}");
    let still = eval(&page, "return document.getElementById('connection-id').textContent;").await;
    assert_eq!(still, connection_id, "same connection, resumed");
    let metrics = get_text(&format!("{}/metrics", nodes.iter().find(|n| n.id == node).unwrap().base)).await;
    assert!(metric_nonzero(&metrics, "switchboard_node_stateful_resumes_total"), "the node saw a resume");
}

/// The header names the node the page is on as the cluster panel does (the
/// id on hover), and a page open for long remembers only a window of the
/// messages it showed (`seenWindow`, 2,000 unless the URL says otherwise)
/// without showing any twice, across its node's death and a `Resume`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_names_its_node_and_a_long_open_page_remembers_a_window_of_messages() {
    let redis = RedisServer::start();
    let mut nodes = [
        TestNode::start(&redis, "node-a", &["--name", "Alpha"]).await,
        TestNode::start(&redis, "node-b", &["--name", "Beta"]).await,
    ];
    let lb = TestBalancer::start(&redis, &[]).await;
    lb.wait_accepting(&["node-a", "node-b"]).await;
    let Some(browser) = Browser::start().await else { return };
    let (page, node) = open_chat(&browser, &format!("{}/?seenWindow=4", lb.base), 1024, 768).await;
    let name = if node == "node-a" { "Alpha" } else { "Beta" };
    let header = "const s = document.getElementById('status'); return [s.textContent, s.title];";
    eval_until(&page, "the header to name the node", header, |v| {
        (v[0] == format!("Connected to {name}") && v[1].as_str()?.contains(&node)).then_some(())
    })
    .await;

    let (i, other) = nodes.iter().enumerate().find(|(_, n)| n.id != node).map(|(i, n)| (i, n.base.clone())).unwrap();
    let http = reqwest::Client::new();
    let mut sender = HubClient::connect(&http, &other, TransportKind::WebSockets).await.unwrap();
    for k in 0..12 {
        chat_from(&mut sender, format!("m {k}")).await;
    }
    wait_message(&page, "m 11").await;
    let seen = eval(&page, "return window.switchboardPage.seenCount();").await;
    assert!(seen.as_u64().is_some_and(|n| n <= 8), "four ids and four contents at most: {seen}");

    // The page's node dies: it reconnects to the other one and resumes.
    let page_node = 1 - i;
    nodes[page_node].process.kill();
    let back = connected_node(&page, Some(&node)).await;
    assert_eq!(back, nodes[i].id);
    eval_until(&page, "the header to name the new node", header, |v| {
        (v[0] == format!("Connected to {}", if back == "node-a" { "Alpha" } else { "Beta" })).then_some(())
    })
    .await;
    for k in 12..15 {
        chat_from(&mut sender, format!("m {k}")).await;
    }
    wait_message(&page, "m 14").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let texts: Vec<String> =
        messages(&page).await.iter().map(|m| m["text"].as_str().unwrap_or_default().to_string()).collect();
    let want: Vec<String> = (0..15).map(|k| format!("m {k}")).collect();
    assert_eq!(texts, want, "every message once, in order");
}

/// With `auth = "required"` the page says it needs a sign-in instead of
/// retrying; a pasted token signs it in (its name replaces the typed one and
/// is what another person sees), and so does the development sign-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_signs_in_with_a_pasted_token_or_the_development_sign_in() {
    const SECRET: &str = "web-sign-in-test-secret-0123456789abcdef";
    let redis = RedisServer::start();
    let auth = ["--auth", "required", "--auth-secret", SECRET, "--auth-dev-sign-in", "true"];
    let _a = TestNode::start(&redis, "web-auth-a", &auth).await;
    let balancer = TestBalancer::start(&redis, &[]).await;
    balancer.wait_accepting(&["web-auth-a"]).await;
    let Some(browser) = Browser::start().await else { return };

    let token = switchboard_tests::token_signer(SECRET).issue("Ana Token", 3600).expect("token");

    let ana = browser.session(1000, 800).await;
    ana.goto(&format!("{}/", balancer.base)).await.expect("open the page");
    let js = "return document.getElementById('signin').hidden ? null : document.getElementById('status').textContent;";
    eval_until(&ana, "the page to say it is not signed in", js, |v| (v == "Not signed in").then_some(())).await;
    let said = eval(&ana, "return document.getElementById('signin-state').textContent;").await;
    assert!(said.as_str().is_some_and(|s| s.contains("401")), "the page says why: {said}");
    type_into(&ana, "#token", &token).await;
    click(&ana, "#use-token").await;
    connected_node(&ana, None).await;
    let name = eval(&ana, "const n = document.getElementById('name'); return [n.value, n.disabled];").await;
    assert_eq!(name, serde_json::json!(["Ana Token", true]));

    // Another person signs in by name with the development sign-in.
    let bo = browser.session(1000, 800).await;
    bo.goto(&format!("{}/", balancer.base)).await.expect("open the page");
    eval_until(
        &bo,
        "the development sign-in button",
        "return document.getElementById('dev-signin').hidden ? null : 1;",
        |v| (!v.is_null()).then_some(()),
    )
    .await;
    set_name(&bo, "Bo").await;
    click(&bo, "#dev-signin").await;
    connected_node(&bo, None).await;

    send_chat(&ana, "signed-in hello").await;
    let seen = wait_message(&bo, "signed-in hello").await;
    assert_eq!(seen["user"], "Ana Token");
    send_chat(&bo, "from bo").await;
    assert_eq!(wait_message(&ana, "from bo").await["user"], "Bo");

    // Signed in, each is online under the token's name (not a typed one).
    for page in [&ana, &bo] {
        wait_online(page, &["Ana Token", "Bo"]).await;
    }
}

/// With `auth = "optional"` a guest who types a signed-in person's name is
/// shown apart from them: a "guest" badge on its messages and in the online
/// list, while the signed-in person's name carries none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_optional_sign_in_the_page_shows_guests_apart_from_signed_in_people() {
    const SECRET: &str = "web-guest-test-secret-0123456789abcdef";
    let redis = RedisServer::start();
    let _a = TestNode::start(&redis, "web-guest-a", &["--auth", "optional", "--auth-secret", SECRET]).await;
    let balancer = TestBalancer::start(&redis, &[]).await;
    balancer.wait_accepting(&["web-guest-a"]).await;
    let Some(browser) = Browser::start().await else { return };
    let token = switchboard_tests::token_signer(SECRET).issue("Ana", 3600).expect("token");

    let ana = browser.session(1000, 800).await;
    ana.goto(&format!("{}/", balancer.base)).await.expect("open the page");
    connected_node(&ana, None).await;
    type_into(&ana, "#token", &token).await;
    click(&ana, "#use-token").await;
    eval_until(&ana, "the page to take the token's name", "return document.getElementById('name').disabled;", |v| {
        (v == true).then_some(())
    })
    .await;
    connected_node(&ana, None).await;

    let (guest, _) = open_chat(&browser, &format!("{}/", balancer.base), 1000, 800).await;
    set_name(&guest, "Ana").await;
    send_chat(&guest, "I am Ana, honestly").await;
    send_chat(&ana, "the real Ana").await;

    let shown = r#"return [...document.querySelectorAll('#messages li.message')].map(li => {
        const u = li.querySelector('.user');
        return { text: li.querySelector('.text').textContent, name: u.firstChild.textContent,
                 guest: u.classList.contains('guest'), badge: u.querySelector('.badge')?.textContent ?? null };
    });"#;
    let seen = eval_until(&ana, "both messages on the signed-in page", shown, |v| {
        let list = v.as_array()?;
        (list.len() >= 2).then(|| list.clone())
    })
    .await;
    let by_text = |t: &str| seen.iter().find(|m| m["text"] == t).cloned().unwrap_or_default();
    assert_eq!(
        by_text("I am Ana, honestly"),
        serde_json::json!({"text": "I am Ana, honestly", "name": "Ana", "guest": true, "badge": "guest"})
    );
    assert_eq!(
        by_text("the real Ana"),
        serde_json::json!({"text": "the real Ana", "name": "Ana", "guest": false, "badge": null})
    );
    // Online: the two are two people.
    eval_until(&ana, "both Anas online", ONLINE_JS, |v| {
        let mut listed: Vec<&str> = v.as_array()?.iter().filter_map(Value::as_str).collect();
        listed.sort();
        (listed == ["Ana", "~Ana"]).then_some(())
    })
    .await;
    screenshot(&ana, "chat-guest").await;
}

/// On a Redis Cluster each group has message ids of its own. A page in two
/// groups whose node dies resumes with its newest id in each scope (the
/// broadcasts and every group), and shows every broadcast and group message
/// sent while it was away, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_page_resumes_every_group_from_its_own_position() {
    let cluster = switchboard_tests::RedisCluster::start();
    let url = cluster.url();
    let mut nodes = [
        TestNode::start_with_redis_url(&url, "node-a", &[]).await,
        TestNode::start_with_redis_url(&url, "node-b", &[]).await,
    ];
    let lb = TestBalancer::start(&cluster.members[0], &["--redis", &url]).await;
    lb.wait_accepting(&["node-a", "node-b"]).await;
    let Some(browser) = Browser::start().await else { return };
    let (page, node) = open_chat(&browser, &lb.base, 1024, 768).await;
    for group in ["ops", "dev"] {
        join_group(&page, group).await;
    }
    let (i, other) = nodes.iter().enumerate().find(|(_, n)| n.id != node).map(|(i, n)| (i, n.base.clone())).unwrap();
    let http = reqwest::Client::new();
    let mut sender = HubClient::connect(&http, &other, TransportKind::WebSockets).await.unwrap();
    let send = |group: Option<&'static str>, text: String| match group {
        Some(g) => ("SendMessageToGroup", vec![serde_json::json!(g), serde_json::json!("s"), serde_json::json!(text)]),
        None => ("SendMessage", vec![serde_json::json!("s"), serde_json::json!(text)]),
    };
    let rounds = |from: usize, to: usize| {
        (from..to).flat_map(move |k| {
            [(None, format!("all {k}")), (Some("ops"), format!("ops {k}")), (Some("dev"), format!("dev {k}"))]
        })
    };
    for (group, text) in rounds(0, 3) {
        let (target, args) = send(group, text);
        sender.invoke(target, args).await.expect("send");
    }
    wait_message(&page, "dev 2").await;

    // The page's node dies; messages go on to everyone and both groups.
    nodes[1 - i].process.kill();
    for (group, text) in rounds(3, 8) {
        let (target, args) = send(group, text);
        sender.invoke(target, args).await.expect("send");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let back = connected_node(&page, Some(&node)).await;
    assert_eq!(back, nodes[i].id);
    for last in ["all 7", "ops 7", "dev 7"] {
        wait_message(&page, last).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let shown = messages(&page).await;
    for (group, text) in rounds(0, 8) {
        let times = shown.iter().filter(|m| m["text"] == text.as_str()).count();
        assert_eq!(times, 1, "{text} shown once: {shown:?}");
        let m = shown.iter().find(|m| m["text"] == text.as_str()).unwrap();
        assert_eq!(m["group"].as_str(), group, "{text} in its group");
    }
    let lines = system_lines(&page).await;
    assert!(!lines.iter().any(|l| l.contains("may be missing")), "Resume was taken: {lines:?}");
}
