//! Microsoft's official SignalR browser client in a test page: the
//! unmodified files from `../shared/vendor/` (`@microsoft/signalr` 8 and its
//! MessagePack protocol) are injected through WebDriver into a page of the
//! cluster's own origin (its JSON `/health`), with a small harness that starts
//! named clients and records what each receives in `window.__sb`. Nothing of
//! the vendor files is served by the project.

use crate::browser::{eval, Browser};
use serde_json::json;
use std::path::PathBuf;

pub fn vendor(file: &str) -> String {
    let dir = std::env::var_os("SWITCHBOARD_VENDOR_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/vendor")));
    let path = dir.join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e} (the official client lives in shared/vendor beside the repository)", path.display())
    })
}

/// Helpers the tests call in the page; each records what happened in
/// `window.__sb` so the test can poll for it.
pub const HARNESS: &str = r#"
window.__sb = { clients: {} };
window.__sbStart = async (name, o) => {
  const b = new signalR.HubConnectionBuilder()
    .withUrl(o.url, Object.assign({ transport: signalR.HttpTransportType[o.transport], skipNegotiation: !!o.skip },
      o.token ? { accessTokenFactory: () => o.token } : {}))
    .configureLogging(signalR.LogLevel.Warning);
  if (o.msgpack) b.withHubProtocol(new signalR.protocols.msgpack.MessagePackHubProtocol());
  if (o.stateful) b.withStatefulReconnect();
  // With o.resume: message ids, automatic reconnect (after o.retryDelays), and Resume(lastId) after it.
  if (o.resume) b.withAutomaticReconnect(o.retryDelays || [0, 250, 500, 1000, 2000, 2000, 2000, 2000, 2000, 2000]);
  const c = b.build();
  const rec = { state: 'starting', got: [], users: [], dms: [], node: null, reconnecting: 0, closed: 0, errors: [], lastId: null, resumed: 0 };
  window.__sb.clients[name] = { c, rec };
  c.on('ReceiveMessage', (user, message, cid, node, id) => { rec.got.push(message); rec.users.push(user); if (id) rec.lastId = id; });
  c.on('ReceivePrivateMessage', (user, message, cid, node, id, to) => {
    rec.dms.push({ user, message, to: to === undefined ? null : to }); if (id) rec.lastId = id;
  });
  if (o.resume) c.onreconnected(async () => {
    if (!rec.lastId) return;
    try { rec.resumed += await c.invoke('Resume', rec.lastId); } catch (e) { rec.errors.push('resume: ' + e); }
  });
  c.on('NodeInfo', (node) => { rec.node = node; });
  c.onreconnecting(() => rec.reconnecting++);
  c.onclose((e) => { rec.closed++; if (e) rec.errors.push(String(e)); });
  try {
    await c.start();
    rec.connectionId = c.connectionId;
    await c.invoke('GetNodeInfo');
    rec.state = 'connected';
  } catch (e) { rec.state = 'failed: ' + e; }
};
window.__sbEcho = async (name) => {
  const { c, rec } = window.__sb.clients[name];
  try {
    const big = 'x'.repeat(19990) + 'é€😀 <b>&</b>';
    const nested = { a: [1, -2, 3.5, null, true, { b: 'c' }], s: 'é', n: { deep: [[[]]] } };
    const r1 = await c.invoke('Echo', big);
    const r2 = await c.invoke('Echo', nested);
    rec.echo = (r1 === big ? 'ok' : 'big differs') + '/' + (JSON.stringify(r2) === JSON.stringify(nested) ? 'ok' : JSON.stringify(r2));
  } catch (e) { rec.echo = 'error: ' + e; }
};
window.__sbSend = (name, text, as) => window.__sb.clients[name].c.invoke('SendMessage', as || name, text)
  .catch((e) => window.__sb.clients[name].rec.errors.push('send: ' + e));
window.__sbInvoke = (name, method, args) => window.__sb.clients[name].c.invoke(method, ...args)
  .catch((e) => window.__sb.clients[name].rec.errors.push(method + ': ' + e));
window.__sbRec = (name) => { const r = window.__sb.clients[name].rec; return Object.assign({}, r, { connectionIdNow: window.__sb.clients[name].c.connectionId }); };
return typeof signalR.HubConnectionBuilder + '/' + typeof signalR.protocols.msgpack.MessagePackHubProtocol;
"#;

/// Opens `origin`'s `/health` (a page of that origin without a CSP) and loads
/// the official client and the harness into it.
pub async fn official_client_page(browser: &Browser, origin: &str) -> fantoccini::Client {
    official_client_page_in(browser.session(800, 600).await, origin).await
}

/// The same in a session the caller opened (for example one that accepts
/// the test certificate authority's certificates).
pub async fn official_client_page_in(client: fantoccini::Client, origin: &str) -> fantoccini::Client {
    client.goto(&format!("{origin}/health")).await.unwrap_or_else(|e| panic!("open {origin}/health: {e}"));
    // Each is a UMD bundle: run as a function body it defines window.signalR.
    eval(&client, &format!("{}\nreturn 1;", vendor("signalr.js"))).await;
    eval(&client, &format!("{}\nreturn 1;", vendor("signalr-protocol-msgpack.js"))).await;
    assert_eq!(eval(&client, HARNESS).await, json!("function/function"));
    client
}
