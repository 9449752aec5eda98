//! A SignalR client for tests, written against the spec rather than the
//! server: negotiate (v0 or v1), then WebSockets (tokio-tungstenite), Server-
//! Sent Events or long polling (reqwest), then the handshake, in the JSON or
//! the MessagePack hub protocol. Incoming messages land in an inbox in the
//! JSON protocol's shape whatever the wire protocol; tests wait for the message
//! they expect, with a bounded wait, and may look at everything else that
//! arrived.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

pub const RS: u8 = 0x1e;
pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    WebSockets,
    ServerSentEvents,
    LongPolling,
}

pub const ALL_TRANSPORTS: [TransportKind; 3] =
    [TransportKind::WebSockets, TransportKind::ServerSentEvents, TransportKind::LongPolling];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Json,
    MessagePack,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Json => "json",
            Protocol::MessagePack => "messagepack",
        }
    }

    /// One hub message (in the JSON protocol's shape) as wire bytes.
    pub fn encode(self, v: &Value) -> Vec<u8> {
        match self {
            Protocol::Json => record(v),
            Protocol::MessagePack => crate::msgpack::encode(v),
        }
    }
}

/// Reads what the server sends: the handshake answer (always a JSON record),
/// then messages in the connection's protocol, however they are split.
pub struct WireDecoder {
    protocol: Protocol,
    handshaken: bool,
    buf: Vec<u8>,
}

impl WireDecoder {
    pub fn new(protocol: Protocol) -> Self {
        WireDecoder { protocol, handshaken: false, buf: Vec::new() }
    }

    /// For a socket that resumes a connection: no handshake answer comes.
    pub fn after_handshake(protocol: Protocol) -> Self {
        WireDecoder { protocol, handshaken: true, buf: Vec::new() }
    }

    pub fn feed(&mut self, data: &[u8]) -> Vec<Value> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        if !self.handshaken {
            let Some(end) = self.buf.iter().position(|&b| b == RS) else { return out };
            let hs: Vec<u8> = self.buf.drain(..=end).collect();
            out.extend(parse_records(&hs));
            self.handshaken = true;
        }
        match self.protocol {
            Protocol::Json => {
                let Some(end) = self.buf.iter().rposition(|&b| b == RS) else { return out };
                let whole: Vec<u8> = self.buf.drain(..=end).collect();
                out.extend(parse_records(&whole));
            }
            Protocol::MessagePack => out.extend(crate::msgpack::take_messages(&mut self.buf)),
        }
        out
    }
}

/// How a test client connects.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    pub negotiate_version: Option<u32>,
    pub protocol: Protocol,
    pub handshake_version: u32,
    /// `?messageIds=true` on the hub URL: chat events carry their id.
    pub message_ids: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            negotiate_version: Some(1),
            protocol: Protocol::Json,
            handshake_version: 1,
            message_ids: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Message(Value),
    /// The transport ended (socket closed, event stream ended, poll got 204).
    Ended(String),
}

type WsSink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

enum Sender {
    Ws(Arc<Mutex<WsSink>>),
    Http,
}

pub struct HubClient {
    pub base: String,
    pub http: reqwest::Client,
    pub kind: TransportKind,
    pub protocol: Protocol,
    pub connection_id: String,
    /// The `?id=` value the transport uses.
    pub id: String,
    sender: Sender,
    inbox: mpsc::UnboundedReceiver<Incoming>,
    pending: VecDeque<Incoming>,
    next_invocation: u64,
    tasks: Vec<JoinHandle<()>>,
}

/// Splits a buffer of records into JSON values (an unparsable record is kept as a string).
pub fn parse_records(data: &[u8]) -> Vec<Value> {
    data.split(|&b| b == RS)
        .filter(|r| !r.is_empty())
        .map(|r| serde_json::from_slice(r).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(r).into_owned())))
        .collect()
}

pub fn record(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(RS);
    b
}

pub fn ws_url(base: &str) -> String {
    base.replacen("http://", "ws://", 1)
}

/// POSTs to `/chathub/negotiate`, returning the parsed body.
pub async fn negotiate(http: &reqwest::Client, base: &str, version: Option<u32>) -> Result<Value, String> {
    negotiate_query(http, base, version, false).await
}

async fn negotiate_query(
    http: &reqwest::Client,
    base: &str,
    version: Option<u32>,
    message_ids: bool,
) -> Result<Value, String> {
    let mut query = Vec::new();
    if let Some(v) = version {
        query.push(format!("negotiateVersion={v}"));
    }
    if message_ids {
        query.push("messageIds=true".to_string());
    }
    let url = if query.is_empty() {
        format!("{base}/chathub/negotiate")
    } else {
        format!("{base}/chathub/negotiate?{}", query.join("&"))
    };
    let resp = http.post(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("negotiate answered {status}: {body}"));
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("negotiate body {body:?}: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(format!("negotiate error: {e}"));
    }
    Ok(v)
}

impl HubClient {
    /// Two WebSocket clients through the balancer at `base`, on different
    /// nodes (the second connects again until its node differs).
    pub async fn pair_on_two_nodes(http: &reqwest::Client, base: &str) -> (Self, Self) {
        let connect = || async { HubClient::connect(http, base, TransportKind::WebSockets).await.expect("a client") };
        let node = |c: &HubClient| switchboard_common::token::owner_of(&c.connection_id);
        let one = connect().await;
        let mut two = connect().await;
        while node(&two) == node(&one) {
            two = connect().await;
        }
        (one, two)
    }

    /// Negotiates (v1) and connects over `kind`, then completes the handshake.
    pub async fn connect(http: &reqwest::Client, base: &str, kind: TransportKind) -> Result<Self, String> {
        Self::connect_with(http, base, kind, Some(1)).await
    }

    pub async fn connect_with(
        http: &reqwest::Client,
        base: &str,
        kind: TransportKind,
        negotiate_version: Option<u32>,
    ) -> Result<Self, String> {
        Self::connect_opts(http, base, kind, ConnectOptions { negotiate_version, ..ConnectOptions::default() }).await
    }

    /// Connects with a chosen negotiate version, hub protocol and handshake version.
    pub async fn connect_opts(
        http: &reqwest::Client,
        base: &str,
        kind: TransportKind,
        opts: ConnectOptions,
    ) -> Result<Self, String> {
        let body = negotiate_query(http, base, opts.negotiate_version, opts.message_ids).await?;
        let connection_id = body["connectionId"].as_str().ok_or("no connectionId")?.to_string();
        let id = match body.get("connectionToken").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => connection_id.clone(),
        };
        let mut client = Self::open(http, base, kind, opts.protocol, connection_id, Some(id)).await?;
        client.handshake(opts.handshake_version).await?;
        Ok(client)
    }

    /// Negotiates through `negotiate_base` and opens the transport through
    /// `transport_base` (two balancer replicas, say), then handshakes.
    pub async fn connect_split(
        http: &reqwest::Client,
        negotiate_base: &str,
        transport_base: &str,
        kind: TransportKind,
    ) -> Result<Self, String> {
        let body = negotiate_query(http, negotiate_base, Some(1), false).await?;
        let connection_id = body["connectionId"].as_str().ok_or("no connectionId")?.to_string();
        let token = body["connectionToken"].as_str().ok_or("no connectionToken")?.to_string();
        let mut client = Self::open(http, transport_base, kind, Protocol::Json, connection_id, Some(token)).await?;
        client.handshake(1).await?;
        Ok(client)
    }

    /// WebSocket without negotiation (`skipNegotiation: true`).
    pub async fn connect_skip_negotiation(http: &reqwest::Client, base: &str) -> Result<Self, String> {
        let mut client = Self::open(http, base, TransportKind::WebSockets, Protocol::Json, String::new(), None).await?;
        client.handshake(1).await?;
        Ok(client)
    }

    async fn open(
        http: &reqwest::Client,
        base: &str,
        kind: TransportKind,
        protocol: Protocol,
        connection_id: String,
        id: Option<String>,
    ) -> Result<Self, String> {
        let (tx, inbox) = mpsc::unbounded_channel();
        let mut decoder = WireDecoder::new(protocol);
        let idq = id.clone().unwrap_or_default();
        let url = match &id {
            Some(id) => format!("{base}/chathub?id={id}"),
            None => format!("{base}/chathub"),
        };
        let (sender, task) = match kind {
            TransportKind::WebSockets => {
                let (ws, _) =
                    tokio_tungstenite::connect_async(ws_url(&url)).await.map_err(|e| format!("websocket: {e}"))?;
                let (sink, mut stream) = ws.split();
                let task = tokio::spawn(async move {
                    while let Some(msg) = stream.next().await {
                        let data = match msg {
                            Ok(Message::Text(t)) => t.as_bytes().to_vec(),
                            Ok(Message::Binary(b)) => b.to_vec(),
                            Ok(Message::Close(_)) => break,
                            Ok(_) => continue,
                            Err(e) => {
                                let _ = tx.send(Incoming::Ended(e.to_string()));
                                return;
                            }
                        };
                        for v in decoder.feed(&data) {
                            let _ = tx.send(Incoming::Message(v));
                        }
                    }
                    let _ = tx.send(Incoming::Ended("websocket closed".into()));
                });
                (Sender::Ws(Arc::new(Mutex::new(sink))), task)
            }
            TransportKind::ServerSentEvents => {
                let resp =
                    http.get(&url).header("Accept", "text/event-stream").send().await.map_err(|e| e.to_string())?;
                if resp.status() != 200 {
                    return Err(format!("event stream answered {}", resp.status()));
                }
                let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                if !ct.starts_with("text/event-stream") {
                    return Err(format!("event stream content type {ct}"));
                }
                let mut body = resp.bytes_stream();
                let task = tokio::spawn(async move {
                    let mut buf: Vec<u8> = Vec::new();
                    while let Some(chunk) = body.next().await {
                        let Ok(chunk) = chunk else { break };
                        buf.extend_from_slice(&chunk);
                        while let Some(end) = find_event_end(&buf) {
                            let event: Vec<u8> = buf.drain(..end.0).collect();
                            buf.drain(..end.1);
                            for v in decoder.feed(&sse_data(&event)) {
                                let _ = tx.send(Incoming::Message(v));
                            }
                        }
                    }
                    let _ = tx.send(Incoming::Ended("event stream ended".into()));
                });
                (Sender::Http, task)
            }
            TransportKind::LongPolling => {
                let first = http.get(&url).send().await.map_err(|e| e.to_string())?;
                if first.status() != 200 {
                    return Err(format!("first poll answered {}", first.status()));
                }
                let http = http.clone();
                let task = tokio::spawn(async move {
                    loop {
                        match http.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {
                                let data = r.bytes().await.unwrap_or_default();
                                for v in decoder.feed(&data) {
                                    let _ = tx.send(Incoming::Message(v));
                                }
                            }
                            Ok(r) => {
                                let _ = tx.send(Incoming::Ended(format!("poll answered {}", r.status())));
                                return;
                            }
                            Err(e) => {
                                let _ = tx.send(Incoming::Ended(format!("poll failed: {e}")));
                                return;
                            }
                        }
                    }
                });
                (Sender::Http, task)
            }
        };
        Ok(HubClient {
            base: base.to_string(),
            http: http.clone(),
            kind,
            protocol,
            connection_id,
            id: idq,
            sender,
            inbox,
            pending: VecDeque::new(),
            next_invocation: 0,
            tasks: vec![task],
        })
    }

    async fn handshake(&mut self, version: u32) -> Result<(), String> {
        let hs = record(&json!({"protocol": self.protocol.name(), "version": version}));
        self.send_raw_as(hs, false).await?;
        match self.next(WAIT).await {
            Some(Incoming::Message(v)) if v == json!({}) => Ok(()),
            other => Err(format!("handshake answered {other:?}")),
        }
    }

    /// Sends raw bytes as one WebSocket frame (binary for MessagePack) or one POST body.
    pub async fn send_raw(&self, data: Vec<u8>) -> Result<(), String> {
        self.send_raw_as(data, self.protocol == Protocol::MessagePack).await
    }

    async fn send_raw_as(&self, data: Vec<u8>, binary: bool) -> Result<(), String> {
        match &self.sender {
            Sender::Ws(sink) => {
                let msg = if binary {
                    Message::Binary(data.into())
                } else {
                    Message::Text(String::from_utf8(data).map_err(|e| e.to_string())?.into())
                };
                sink.lock().await.send(msg).await.map_err(|e| e.to_string())
            }
            Sender::Http => {
                let resp = self.post(data).await?;
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                if status != 200 || !body.is_empty() {
                    return Err(format!("send answered {status} with body {body:?}"));
                }
                Ok(())
            }
        }
    }

    /// A raw POST to this connection's send URL.
    pub async fn post(&self, data: Vec<u8>) -> Result<reqwest::Response, String> {
        self.http
            .post(format!("{}/chathub?id={}", self.base, self.id))
            .body(data)
            .send()
            .await
            .map_err(|e| e.to_string())
    }

    /// Invokes `target` without expecting a reply.
    pub async fn send(&self, target: &str, args: Vec<Value>) {
        let msg = json!({"type": 1, "target": target, "arguments": args});
        self.send_raw(self.protocol.encode(&msg)).await.expect("send");
    }

    /// Invokes `target` and waits for its Completion: `Ok(result)` or `Err(error)`.
    pub async fn invoke(&mut self, target: &str, args: Vec<Value>) -> Result<Value, String> {
        self.next_invocation += 1;
        let id = self.next_invocation.to_string();
        let msg = json!({"type": 1, "invocationId": id, "target": target, "arguments": args});
        self.send_raw(self.protocol.encode(&msg)).await.expect("send invocation");
        let done = self
            .expect(WAIT, |v| v["type"] == 3 && v["invocationId"] == id.as_str())
            .await
            .unwrap_or_else(|| panic!("no completion for {target}"));
        match done.get("error").and_then(Value::as_str) {
            Some(e) => Err(e.to_string()),
            None => Ok(done.get("result").cloned().unwrap_or(Value::Null)),
        }
    }

    /// The next incoming item, whatever it is.
    pub async fn next(&mut self, limit: Duration) -> Option<Incoming> {
        if let Some(i) = self.pending.pop_front() {
            return Some(i);
        }
        tokio::time::timeout(limit, self.inbox.recv()).await.ok().flatten()
    }

    /// Waits for a message matching `pred`; others stay queued in order.
    pub async fn expect(&mut self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        if let Some(pos) = self.pending.iter().position(|i| matches!(i, Incoming::Message(v) if pred(v))) {
            if let Some(Incoming::Message(v)) = self.pending.remove(pos) {
                return Some(v);
            }
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let item = tokio::time::timeout_at(deadline, self.inbox.recv()).await.ok().flatten()?;
            match item {
                Incoming::Message(v) if pred(&v) => return Some(v),
                other => {
                    let ended = matches!(other, Incoming::Ended(_));
                    self.pending.push_back(other);
                    if ended {
                        return None;
                    }
                }
            }
        }
    }

    /// Arguments of the next invocation of `target` sent to this client.
    pub async fn expect_event(&mut self, target: &str, limit: Duration) -> Option<Vec<Value>> {
        let v = self.expect(limit, |v| v["type"] == 1 && v["target"] == target).await?;
        v["arguments"].as_array().cloned()
    }

    /// The Close message (type 7), if one arrives before the transport ends.
    pub async fn expect_close(&mut self, limit: Duration) -> Option<Value> {
        self.expect(limit, |v| v["type"] == 7).await
    }

    /// True once the transport has ended (it may first deliver a Close).
    pub async fn wait_ended(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        if self.pending.iter().any(|i| matches!(i, Incoming::Ended(_))) {
            return true;
        }
        loop {
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(Incoming::Ended(_))) | Ok(None) => return true,
                Ok(Some(other)) => self.pending.push_back(other),
                Err(_) => return false,
            }
        }
    }

    /// Argument `index` (a string) of every `target` event received so far
    /// that no `expect` consumed, in order; everything else is dropped.
    pub fn take_arguments(&mut self, target: &str, index: usize) -> Vec<String> {
        self.drain_pending()
            .into_iter()
            .filter_map(|i| match i {
                Incoming::Message(v) if v["target"] == target => v["arguments"][index].as_str().map(String::from),
                _ => None,
            })
            .collect()
    }

    /// Everything received so far that no `expect` consumed.
    pub fn drain_pending(&mut self) -> Vec<Incoming> {
        while let Ok(i) = self.inbox.try_recv() {
            self.pending.push_back(i);
        }
        self.pending.drain(..).collect()
    }
}

impl Drop for HubClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Finds the end of the first SSE event: (event length, separator length).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Joins the `data:` fields of one SSE event.
fn sse_data(event: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(event);
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    lines.join("\n").into_bytes()
}
