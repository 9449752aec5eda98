//! A lean SignalR JSON-protocol client for load generation: negotiate (v1),
//! WebSocket connect, handshake, invoke and read, with nothing kept per
//! message beyond what a measurement needs. Like a browser, it carries the
//! cookies the negotiate answer set onto the WebSocket upgrade, so cookie
//! stickiness (Traefik, HAProxy, Switchboard) can work. `longpoll_echo` is the
//! other kind of client: a third-party one that keeps no cookies and polls.

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard_common::token::owner_of;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{COOKIE, SET_COOKIE};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const RS: char = '\u{1e}';

pub struct HubSocket {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The node that owns the connection (read from its token).
    pub node: Option<String>,
    next_id: u64,
}

/// `name=value` pairs of every Set-Cookie header, as one Cookie header value.
pub fn cookie_header<'a>(set_cookies: impl Iterator<Item = &'a str>) -> Option<String> {
    let pairs: Vec<&str> =
        set_cookies.filter_map(|c| c.split(';').next()).map(str::trim).filter(|p| p.contains('=')).collect();
    (!pairs.is_empty()).then(|| pairs.join("; "))
}

pub async fn connect(http: &reqwest::Client, base: &str) -> Result<HubSocket> {
    connect_opts(http, base, false, false).await
}

/// `connect`, optionally asking for stateful reconnect (negotiate flag and
/// handshake version 2), which makes the node keep per-connection sequence
/// state.
pub async fn connect_with(http: &reqwest::Client, base: &str, stateful: bool) -> Result<HubSocket> {
    connect_opts(http, base, stateful, false).await
}

/// `connect_with`, optionally opting in to message ids (`?messageIds=true`).
pub async fn connect_opts(http: &reqwest::Client, base: &str, stateful: bool, message_ids: bool) -> Result<HubSocket> {
    connect_from(http, base, stateful, message_ids, None).await
}

/// `connect_opts`, with the WebSocket opened from the local address `source`
/// when given (the HTTP client should be bound to it too). Many source
/// addresses (127.0.0.x) let one machine open more connections to one port
/// than a single address has ephemeral ports.
pub async fn connect_from(
    http: &reqwest::Client,
    base: &str,
    stateful: bool,
    message_ids: bool,
    source: Option<std::net::IpAddr>,
) -> Result<HubSocket> {
    let mut query = String::from("negotiateVersion=1");
    if stateful {
        query.push_str("&useStatefulReconnect=true");
    }
    if message_ids {
        query.push_str("&messageIds=true");
    }
    let negotiate = format!("{base}/chathub/negotiate?{query}");
    let (status, cookies, body) = if base.starts_with("https://") {
        let (status, set, body) = crate::tls::request(&negotiate, "POST").await?;
        (status, cookie_header(set.iter().map(String::as_str)), body)
    } else {
        let resp = http.post(&negotiate).send().await?;
        let status = resp.status().as_u16();
        let cookies = cookie_header(resp.headers().get_all(SET_COOKIE).iter().filter_map(|v| v.to_str().ok()));
        (status, cookies, resp.text().await?)
    };
    let body: Value = serde_json::from_str(&body).with_context(|| format!("negotiate answered {status}: {body}"))?;
    let token = body["connectionToken"].as_str().ok_or_else(|| anyhow!("negotiate: {body}"))?;
    let ws_base = base.replacen("https://", "wss://", 1).replacen("http://", "ws://", 1);
    let url = format!("{ws_base}/chathub?id={token}");
    let mut request = url.into_client_request()?;
    if let Some(c) = cookies {
        request.headers_mut().insert(COOKIE, c.parse()?);
    }
    let mut ws = if base.starts_with("https://") {
        let tls = crate::tls::connect(crate::tls::authority(base)?).await?;
        tokio_tungstenite::client_async(request, MaybeTlsStream::Rustls(tls)).await?.0
    } else if let Some(source) = source {
        let authority = request.uri().authority().ok_or_else(|| anyhow!("no host in {base}"))?.as_str();
        let addr = tokio::net::lookup_host(authority).await?.next().ok_or_else(|| anyhow!("{authority} not found"))?;
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.bind(std::net::SocketAddr::new(source, 0))?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        // A small read buffer: thousands of idle sockets are held at once.
        let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
        tokio_tungstenite::client_async_with_config(request, MaybeTlsStream::Plain(stream), Some(config)).await?.0
    } else {
        tokio_tungstenite::connect_async(request).await?.0
    };
    let version = if stateful { 2 } else { 1 };
    ws.send(Message::Text(format!("{{\"protocol\":\"json\",\"version\":{version}}}{RS}").into())).await?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str().starts_with("{}") => {
            Ok(HubSocket { ws, node: owner_of(token), next_id: 0 })
        }
        other => bail!("handshake answered {other:?}"),
    }
}

/// One third-party-style session over long polling with no cookies: negotiate
/// (v1 or v0), open, handshake, one `Echo` round trip, close. Each request is
/// routed by the proxy on its own, so this succeeds only where the proxy keeps
/// a connection's requests on its node. Returns the owning node on success.
pub async fn longpoll_echo(http: &reqwest::Client, base: &str, negotiate_version: u8) -> Result<Option<String>> {
    let query = if negotiate_version == 0 { String::new() } else { "?negotiateVersion=1".into() };
    let resp = http.post(format!("{base}/chathub/negotiate{query}")).send().await?;
    let status = resp.status();
    let body: Value = resp.json().await.with_context(|| format!("negotiate answered {status}"))?;
    let key = if negotiate_version == 0 { "connectionId" } else { "connectionToken" };
    let token = body[key].as_str().ok_or_else(|| anyhow!("negotiate: {body}"))?.to_string();
    let url = format!("{base}/chathub?id={token}");
    let check = |r: reqwest::Response, what: &str| {
        if r.status().is_success() {
            Ok(r)
        } else {
            Err(anyhow!("{what} answered {}", r.status()))
        }
    };
    check(http.get(&url).send().await?, "first poll")?;
    check(http.post(&url).body(format!("{{\"protocol\":\"json\",\"version\":1}}{RS}")).send().await?, "handshake")?;
    let mut seen = String::new();
    let mut sent_echo = false;
    for _ in 0..6 {
        let text = check(http.get(&url).send().await?, "poll")?.text().await?;
        seen.push_str(&text);
        if !sent_echo && seen.contains("{}") {
            let echo = json!({"type": 1, "invocationId": "1", "target": "Echo", "arguments": ["sticky"]});
            check(http.post(&url).body(format!("{echo}{RS}")).send().await?, "send")?;
            sent_echo = true;
        }
        let done = seen
            .split(RS)
            .filter_map(|r| serde_json::from_str::<Value>(r).ok())
            .any(|m| m["type"] == 3 && m["invocationId"] == "1" && m["result"] == "sticky");
        if done {
            let _ = http.delete(&url).send().await;
            return Ok(owner_of(&token));
        }
    }
    bail!("no Echo completion after 6 polls")
}

/// The hub messages in a text frame (unparsable records are skipped).
pub fn records(text: &str) -> Vec<Value> {
    text.split(RS).filter(|r| !r.is_empty()).filter_map(|r| serde_json::from_str(r).ok()).collect()
}

impl HubSocket {
    pub async fn send_record(&mut self, v: &Value) -> Result<()> {
        self.ws.send(Message::Text(format!("{v}{RS}").into())).await?;
        Ok(())
    }

    pub async fn ping(&mut self) -> Result<()> {
        self.send_record(&json!({"type": 6})).await
    }

    /// Invokes `target` and waits for its completion; other messages are skipped.
    pub async fn invoke(&mut self, target: &str, args: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id.to_string();
        self.send_record(&json!({"type": 1, "invocationId": id, "target": target, "arguments": args})).await?;
        loop {
            for msg in self.read_frame().await? {
                if msg["type"] == 3 && msg["invocationId"] == id.as_str() {
                    if let Some(e) = msg.get("error") {
                        bail!("{target} failed: {e}");
                    }
                    return Ok(msg["result"].clone());
                }
            }
        }
    }

    /// The hub messages of the next text frame.
    pub async fn read_frame(&mut self) -> Result<Vec<Value>> {
        Ok(records(self.read_text().await?.as_str()))
    }

    /// The next text frame, unparsed.
    pub async fn read_text(&mut self) -> Result<tokio_tungstenite::tungstenite::Utf8Bytes> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(Message::Close(_))) | None => bail!("connection closed"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_set_by_negotiate_are_carried_as_name_value_pairs() {
        let set = ["signalr-server=abc; Path=/; HttpOnly", "SERVERID=n1; path=/", "broken-no-equals; Path=/"];
        assert_eq!(cookie_header(set.into_iter()).as_deref(), Some("signalr-server=abc; SERVERID=n1"));
        assert_eq!(cookie_header(std::iter::empty()), None);
    }
}
