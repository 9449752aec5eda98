//! WebSocket tunnels owned by the balancer. `front` hands over a connection
//! whose first request is a WebSocket upgrade; this module routes it like any
//! request (token → cookie → least loaded, with the same admission and
//! metrics), connects to the node, forwards the head, relays the node's
//! answer (adding the affinity cookie for new clients) and, after a 101,
//! relays bytes both ways, in a task of its own, until either side closes or
//! the tunnel has been idle for `idle_timeout_secs`.
//!
//! The relay runs one loop per direction, each owning its buffer from the
//! read until the write has finished: a byte read is always written before
//! that loop looks at anything else, and only the wait for readiness (which
//! holds no data) is ever raced against the end of the tunnel. When one
//! direction ends, the other finishes what it is writing and stops; only the
//! idle watchdog's expiry (nothing moved, or a write stuck, for the idle
//! limit) abandons a write. A buffer is allocated only while data moves, and
//! the watchdog's is the tunnel's one timer, so an idle tunnel holds two
//! sockets and one small task (about 2.3 KB in all at 9,500 tunnels). Over
//! TLS the client side is read through rustls, which has no readiness to wait
//! on: that direction keeps one small buffer (and rustls its own state) for
//! the tunnel's life.

use crate::access_log::Entry;
use crate::admission::{self, ConnectionPermit, FORWARDED_HEADERS};
use crate::cluster::Cluster;
use crate::proxy::{query_id, InFlight};
use crate::public_surface;
use crate::refusal::{self, Refusal};
use crate::routing::{cookie_value, set_cookie_header, RouteDecision, RouteKind};
use crate::table::RouteNode;
use pingora::protocols::l4::stream::Stream as L4Stream;
use std::future::{poll_fn, Future};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

const MAX_RESPONSE_HEAD: usize = 16 * 1024;
const MAX_ERROR_BODY: usize = 64 * 1024;
const RELAY_CHUNK: usize = 16 * 1024;
/// The decrypted read buffer of a TLS tunnel, held for its whole life.
const TLS_READ_CHUNK: usize = 4 * 1024;

/// The parts of an upgrade request head that routing needs.
#[derive(Debug, PartialEq)]
pub struct UpgradeRequest {
    pub head_len: usize,
    /// The path without the query.
    pub path: String,
    pub id: Option<String>,
    pub cookie: Option<String>,
    pub host: Option<String>,
    /// Path and query as sent (for the access log, which redacts it).
    pub target: String,
    pub user_agent: Option<String>,
}

fn header_has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value).map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))).unwrap_or(false)
}

impl UpgradeRequest {
    /// `Some` for a complete `GET` head asking to upgrade to WebSocket.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(head_len) = req.parse(buf).ok()? else {
            return None;
        };
        if req.method != Some("GET") {
            return None;
        }
        let upgrade = req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade") && header_has_token(h.value, "websocket"));
        let connection = req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("connection") && header_has_token(h.value, "upgrade"));
        if !(upgrade && connection) {
            return None;
        }
        let target = req.path?;
        let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
        let cookies: Vec<&str> = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .collect();
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::to_string)
        };
        Some(UpgradeRequest {
            head_len,
            host: header("host"),
            user_agent: header("user-agent"),
            target: target.to_string(),
            path: path.to_string(),
            id: query_id(query).map(str::to_string),
            cookie: (!cookies.is_empty()).then(|| cookies.join("; ")),
        })
    }
}

/// Duplicates the accepted socket into a tokio `TcpStream` we own.
pub fn take_socket(stream: &L4Stream) -> Option<TcpStream> {
    // SAFETY: `stream` owns this descriptor and outlives the borrow; it is only duplicated.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let std_stream = std::net::TcpStream::from(fd.try_clone_to_owned().ok()?);
    std_stream.set_nonblocking(true).ok()?;
    TcpStream::from_std(std_stream).ok()
}

/// Writes all of `data`, trying first and waiting for writability only when
/// the socket is full. The wait is `poll_write_ready`, which keeps no waiter
/// in the future: a tunnel's futures stay small while it lives.
async fn write_all(to: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => poll_fn(|cx| to.poll_write_ready(cx)).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The client side of a tunnel while it is set up: plain TCP or TLS.
pub trait Downstream: Send {
    /// Writes all of `data` to the client.
    fn send(&mut self, data: &[u8]) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl Downstream for TcpStream {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        write_all(self, data).await
    }
}

/// A socket both directions of a plain tunnel share.
impl Downstream for &TcpStream {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        write_all(self, data).await
    }
}

impl Downstream for TlsStream<Box<L4Stream>> {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write_all(data).await?;
        self.flush().await
    }
}

/// The writing half of a TLS tunnel's client side.
impl Downstream for WriteHalf<TlsStream<Box<L4Stream>>> {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write_all(data).await?;
        self.flush().await
    }
}

async fn respond<C: Downstream>(client: &mut C, refusal: &Refusal) {
    let _ = client.send(refusal.to_http().as_bytes()).await;
}

/// `head` without the client's own `X-Forwarded-*` lines (the balancer sets
/// them; a client must not be able to forge its address to the node).
fn without_forwarded(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len());
    for line in head.split_inclusive(|b| *b == b'\n') {
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        let forged = line.contains(&b':')
            && FORWARDED_HEADERS.iter().any(|f| name.trim_ascii().eq_ignore_ascii_case(f.as_bytes()));
        if !forged {
            out.extend_from_slice(line);
        }
    }
    out
}

/// Inserts header lines before the blank line that ends `head`.
fn with_headers(head: &[u8], extra: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + extra.len());
    out.extend_from_slice(&head[..head.len() - 2]);
    out.extend_from_slice(extra.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// Reads a response head; returns (bytes read, head length, status, content length).
async fn read_response_head(upstream: &TcpStream) -> Option<(Vec<u8>, usize, u16, Option<usize>)> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        upstream.readable().await.ok()?;
        let mut chunk = Vec::with_capacity(4096);
        match upstream.try_read_buf(&mut chunk) {
            Ok(0) => return None,
            Ok(_) => buf.extend_from_slice(&chunk),
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code?;
                let length = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok());
                return Some((buf, len, status, length));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => continue,
            _ => return None,
        }
    }
}

/// Chooses a node and connects to it, retrying other nodes as
/// `Cluster::reroute` allows.
async fn connect(
    cluster: &Cluster,
    req: &UpgradeRequest,
) -> Result<(Arc<RouteNode>, RouteKind, TcpStream), &'static Refusal> {
    let cookie = req.cookie.as_deref().and_then(|h| cookie_value(h, &cluster.cfg.cookie_name));
    let (mut node, mut kind) = match cluster.route(req.id.as_deref(), cookie) {
        RouteDecision::Node { node, kind } => (node, kind),
        RouteDecision::UnknownConnection => return Err(&refusal::UNKNOWN_CONNECTION),
        RouteDecision::NoNodeAvailable => return Err(&refusal::NO_NODE),
    };
    // A WebSocket without an id starts a connection: it waits for its node's
    // admission turn (or goes to another node), as a negotiate does.
    if req.id.is_none() {
        (node, kind) = cluster.admit(node, kind).await.ok_or(&refusal::NODES_BUSY)?;
    }
    let timeout = Duration::from_millis(cluster.cfg.connect_timeout_ms);
    let mut tried: Vec<String> = Vec::new();
    loop {
        match tokio::time::timeout(timeout, TcpStream::connect(node.addr)).await {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                return Ok((node, kind, upstream));
            }
            Ok(Err(e)) => tracing::debug!(node = %node.record.node_id, error = %e, "websocket connect failed"),
            Err(_) => tracing::debug!(node = %node.record.node_id, "websocket connect timed out"),
        }
        match cluster.reroute(&node, kind, &mut tried) {
            Some((next, wait)) => {
                tokio::time::sleep(wait).await;
                if kind != RouteKind::Token {
                    kind = RouteKind::New;
                }
                node = next;
            }
            // A connection whose node cannot be reached now is not unknown:
            // 502, which the client may retry, never 404.
            None => return Err(&refusal::NODE_UNREACHABLE),
        }
    }
}

/// An established tunnel: both sockets and the counters held while it lives.
struct Tunnel<C> {
    client: C,
    upstream: TcpStream,
    kind: RouteKind,
    in_flight: InFlight,
}

/// How an upgrade ended, for the access log: the status the client got, the
/// node and how it was chosen (when one answered), and the bytes relayed
/// after the head (from the client, to the client).
struct Ended {
    status: u16,
    node: Option<(Arc<RouteNode>, RouteKind)>,
    bytes: (u64, u64),
}

/// Logs a tunnel that ran and closed after relaying `bytes`, and releases
/// its counters.
fn relayed(cluster: &Cluster, log: Option<Box<TunnelLog>>, in_flight: InFlight, kind: RouteKind, bytes: (u64, u64)) {
    let ended = Ended { status: 101, node: Some((in_flight.node().clone(), kind)), bytes };
    drop(in_flight);
    TunnelLog::finish(log, cluster, &ended);
}

/// What the access log needs of a tunnel, kept (boxed) only while the log is on.
struct TunnelLog {
    started: std::time::Instant,
    peer: Option<std::net::IpAddr>,
    target: String,
    user_agent: Option<String>,
    tls: bool,
}

impl TunnelLog {
    fn new(cluster: &Cluster, req: &UpgradeRequest, peer: Option<std::net::IpAddr>, tls: bool) -> Option<Box<Self>> {
        cluster.access_log.as_ref()?;
        Some(Box::new(TunnelLog {
            started: std::time::Instant::now(),
            peer,
            target: req.target.clone(),
            user_agent: req.user_agent.clone(),
            tls,
        }))
    }

    /// Writes the tunnel's line, when the log is on.
    fn finish(this: Option<Box<Self>>, cluster: &Cluster, ended: &Ended) {
        let (Some(this), Some(log)) = (this, &cluster.access_log) else { return };
        let node = ended.node.as_ref();
        log.record(&Entry {
            client: this.peer,
            method: "GET",
            target: &this.target,
            status: ended.status,
            node: node.map(|(n, _)| n.record.node_id.as_str()),
            route: node.map_or("-", |(_, k)| k.label()),
            kind: "websocket",
            duration: this.started.elapsed(),
            bytes_in: ended.bytes.0,
            bytes_out: ended.bytes.1,
            tls: this.tls,
            user_agent: this.user_agent.as_deref(),
        });
    }
}

/// A connection the tunnel takes over: its socket, the client's address, and
/// bytes the front read past the request head but left rewound (none today:
/// the front reads a head only from an empty rewind buffer).
pub struct Client {
    pub socket: Socket,
    pub peer: Option<std::net::IpAddr>,
    pub rewound: Vec<u8>,
}

pub enum Socket {
    Plain(TcpStream),
    /// `wss://`: the tunnel reads and writes the decrypted stream.
    Tls(Box<TlsStream<Box<L4Stream>>>),
}

/// Routes and handshakes one WebSocket connection, then relays it in a task
/// of its own: the connection's first task (Pingora's, with the front's and
/// the handshake's state) ends there, and an idle tunnel keeps only its two
/// sockets, its counters and the relay's small state. `permit` is held until
/// the tunnel closes. `buf` holds the head and whatever followed it.
pub async fn serve(cluster: Arc<Cluster>, client: Client, req: UpgradeRequest, buf: Vec<u8>, permit: ConnectionPermit) {
    let Client { socket, peer, rewound } = client;
    let mut buf = buf;
    buf.extend_from_slice(&rewound);
    match socket {
        Socket::Plain(socket) => start(cluster, socket, peer, req, buf, permit).await,
        Socket::Tls(socket) => start(cluster, *socket, peer, req, buf, permit).await,
    }
}

/// A client socket a tunnel relays: plain or TLS.
trait ClientSide: Downstream + Sized + 'static {
    const TLS: bool;
    /// Relays both ways, then closes both sides; returns the bytes moved
    /// (from the client, to the client).
    fn relay(self, upstream: TcpStream, idle: Duration) -> impl Future<Output = (u64, u64)> + Send;
}

impl ClientSide for TcpStream {
    const TLS: bool = false;
    fn relay(self, upstream: TcpStream, idle: Duration) -> impl Future<Output = (u64, u64)> + Send {
        relay(self, upstream, idle)
    }
}

impl ClientSide for TlsStream<Box<L4Stream>> {
    const TLS: bool = true;
    fn relay(self, upstream: TcpStream, idle: Duration) -> impl Future<Output = (u64, u64)> + Send {
        relay_tls(self, upstream, idle)
    }
}

/// `serve` for one kind of client socket.
async fn start<C: ClientSide>(
    cluster: Arc<Cluster>,
    client: C,
    peer: Option<std::net::IpAddr>,
    req: UpgradeRequest,
    buf: Vec<u8>,
    permit: ConnectionPermit,
) {
    let log = TunnelLog::new(&cluster, &req, peer, C::TLS);
    // Boxed, so that the handshake's state does not size the front's future
    // (every kept-alive connection's) too.
    match Box::pin(handshake(&cluster, client, peer, req, buf)).await {
        Ok(Tunnel { client, upstream, kind, in_flight }) => {
            tokio::spawn(async move {
                let bytes = client.relay(upstream, Duration::from_secs(cluster.cfg.idle_timeout_secs)).await;
                relayed(&cluster, log, in_flight, kind, bytes);
                drop(permit);
            });
        }
        Err(ended) => TunnelLog::finish(log, &cluster, &ended),
    }
}

async fn refuse<C: Downstream, T>(client: &mut C, refusal: &Refusal) -> Result<T, Ended> {
    respond(client, refusal).await;
    Err(Ended { status: refusal.status, node: None, bytes: (0, 0) })
}

async fn handshake<C: ClientSide>(
    cluster: &Arc<Cluster>,
    mut client: C,
    peer: Option<std::net::IpAddr>,
    req: UpgradeRequest,
    buf: Vec<u8>,
) -> Result<Tunnel<C>, Ended> {
    if !public_surface::serves(&req.path) {
        return refuse(&mut client, &refusal::NOT_PUBLIC).await;
    }
    if req.id.is_none() && !cluster.admit_new_connection(peer) {
        return refuse(&mut client, &refusal::RATE_LIMITED).await;
    }
    let (node, kind, upstream) = match connect(cluster, &req).await {
        Ok(chosen) => chosen,
        Err(refusal) => return refuse(&mut client, refusal).await,
    };
    let in_flight = InFlight::new(cluster, node.clone());
    let started = std::time::Instant::now();

    let forwarded: String = admission::forwarded(peer, req.host.as_deref(), C::TLS)
        .into_iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let head = with_headers(&without_forwarded(&buf[..req.head_len]), &forwarded);
    if write_all(&upstream, &head).await.is_err() || write_all(&upstream, &buf[req.head_len..]).await.is_err() {
        return refuse(&mut client, &refusal::NODE_UNREACHABLE).await;
    }
    let idle = Duration::from_secs(cluster.cfg.idle_timeout_secs);
    let answer = tokio::time::timeout(idle, read_response_head(&upstream)).await;
    let Ok(Some((resp, head_len, status, length))) = answer else {
        cluster.metrics.requests.with_label_values(&["5xx"]).inc();
        return refuse(&mut client, &refusal::NODE_UNREACHABLE).await;
    };
    cluster.metrics.upstream_latency.observe(started.elapsed().as_secs_f64());
    cluster.metrics.requests.with_label_values(&[admission::status_class(status)]).inc();
    let head = if kind == RouteKind::New {
        let cookie = set_cookie_header(&cluster.cfg.cookie_name, &node.cookie);
        with_headers(&resp[..head_len], &format!("Set-Cookie: {cookie}\r\n"))
    } else {
        resp[..head_len].to_vec()
    };
    let ended = Ended { status, node: Some((node, kind)), bytes: (0, 0) };
    if client.send(&head).await.is_err() || client.send(&resp[head_len..]).await.is_err() {
        return Err(ended);
    }
    if status == 101 {
        cluster.metrics.upgrades.inc();
        return Ok(Tunnel { client, upstream, kind, in_flight });
    }
    // A refusal (404, 409, 503…): pass its body on, then close.
    let mut remaining = length.unwrap_or(0).min(MAX_ERROR_BODY).saturating_sub(resp.len() - head_len);
    while remaining > 0 {
        let moved = async {
            upstream.readable().await.ok()?;
            let mut chunk = Vec::with_capacity(RELAY_CHUNK.min(remaining));
            match upstream.try_read_buf(&mut chunk) {
                Ok(0) => None,
                Ok(n) => client.send(&chunk).await.ok().map(|()| n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => Some(0),
                Err(_) => None,
            }
        };
        match tokio::time::timeout(idle, moved).await {
            Ok(Some(n)) => remaining = remaining.saturating_sub(n),
            _ => break,
        }
    }
    Err(ended)
}

/// The shared state of one tunnel's relay: both directions and the idle
/// watchdog run in one task (`tokio::join!`, which polls every unfinished
/// branch each time the task wakes), so ending needs no list of waiters:
/// whoever ends the tunnel sets `state` and wakes the task, and the others
/// see it when they are polled next.
///
/// Two ways to end: `ENDED` (a side closed or failed) stops reads that are
/// waiting, but a write in progress still finishes; `EXPIRED` (the watchdog
/// found the tunnel idle, or a write stuck) stops writes too. So no write
/// carries a timer of its own, and an idle tunnel holds one timer in all.
struct Relay {
    state: std::sync::atomic::AtomicU8,
    epoch: Instant,
    idle: Duration,
    /// When a byte last moved either way (ms since `epoch`).
    last: std::sync::atomic::AtomicU64,
    /// Per direction: when its write in progress began (ms since `epoch`, plus
    /// one), or 0 when it is not writing.
    writing: [std::sync::atomic::AtomicU64; 2],
}

const RUNNING: u8 = 0;
const ENDED: u8 = 1;
const EXPIRED: u8 = 2;

impl Relay {
    fn new(idle: Duration) -> Self {
        Relay { state: RUNNING.into(), epoch: Instant::now(), idle, last: 0.into(), writing: [0.into(), 0.into()] }
    }

    fn ended(&self) -> bool {
        self.state.load(std::sync::atomic::Ordering::Acquire) != RUNNING
    }

    fn expired(&self) -> bool {
        self.state.load(std::sync::atomic::Ordering::Acquire) == EXPIRED
    }

    /// Ends the tunnel (`ENDED` or `EXPIRED`; expiry is never undone). Only
    /// to be awaited inside the tunnel's task.
    async fn end(&self, how: u8) {
        self.state.fetch_max(how, std::sync::atomic::Ordering::AcqRel);
        poll_fn(|cx| {
            cx.waker().wake_by_ref();
            Poll::Ready(())
        })
        .await
    }

    /// Milliseconds since the relay began.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn moved(&self) {
        self.last.store(self.now(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `write` for direction `dir`, marked as in progress for the
    /// watchdog; `false` when it failed or the tunnel expired first (bytes
    /// not yet written are then dropped with the tunnel).
    async fn write<F: Future<Output = std::io::Result<()>>>(&self, dir: usize, write: F) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let began = self.now();
        self.last.store(began, Relaxed);
        self.writing[dir].store(began + 1, Relaxed);
        let mut write = std::pin::pin!(write);
        let done = poll_fn(|cx| match self.expired() {
            true => Poll::Ready(false),
            false => write.as_mut().poll(cx).map(|r| r.is_ok()),
        })
        .await;
        self.writing[dir].store(0, Relaxed);
        self.moved();
        done
    }

    /// Milliseconds (since `epoch`) at which the tunnel expires unless
    /// something moves: `idle` after the last byte moved, or after the
    /// oldest write in progress began.
    fn expiry(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let idle = self.idle.as_millis() as u64;
        let oldest = self.writing.iter().map(|w| w.load(Relaxed)).filter(|&w| w > 0).map(|w| w - 1).min();
        let since = oldest.map_or(self.last.load(Relaxed), |w| w.min(self.last.load(Relaxed)));
        since.saturating_add(idle)
    }
}

/// Copies `from` → `to` (direction `dir`) until either side closes or the
/// tunnel ends. Never abandons bytes it has read: the write is raced only
/// against expiry (a write that makes no progress for `idle` ends the tunnel).
///
/// While data flows it reads again straight after each write and keeps its
/// buffer; only when a read finds nothing does it free the buffer and park
/// on readiness (the one wait raced against the end of the tunnel). A busy
/// direction so costs no wake-up per message, and an idle one holds nothing.
async fn one_way<W: Downstream>(from: &TcpStream, to: &mut W, relay: &Relay, dir: usize) -> u64 {
    let mut buf: Vec<u8> = Vec::new();
    let mut moved = 0u64;
    loop {
        if relay.ended() {
            return moved;
        }
        if buf.capacity() == 0 {
            buf.reserve_exact(RELAY_CHUNK);
        }
        buf.clear();
        match from.try_read_buf(&mut buf) {
            Ok(0) => break,
            Ok(_) => {
                if !relay.write(dir, to.send(&buf)).await {
                    break;
                }
                moved += buf.len() as u64;
                // Yields to the thread's other tasks once tokio's cooperative
                // budget is spent, so a direction that never runs dry cannot
                // starve them.
                tokio::task::coop::consume_budget().await;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                buf = Vec::new();
                let ready = poll_fn(|cx| match relay.ended() {
                    true => Poll::Ready(None),
                    false => from.poll_read_ready(cx).map(Some),
                })
                .await;
                match ready {
                    None => return moved,
                    Some(Ok(())) => {}
                    Some(Err(_)) => break,
                }
            }
            Err(_) => break,
        }
    }
    relay.end(ENDED).await;
    moved
}

/// Expires the tunnel once nothing has moved either way for `idle`, or a
/// write has been in progress that long.
async fn watchdog(relay: &Relay) {
    loop {
        let deadline = relay.epoch + Duration::from_millis(relay.expiry());
        let sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(sleep);
        let ended = poll_fn(|cx| match relay.ended() {
            true => Poll::Ready(true),
            false => sleep.as_mut().poll(cx).map(|()| false),
        })
        .await;
        if ended {
            return;
        }
        // Writes that began after the sleep was set only move the expiry
        // later (each began with a byte moving), so looking again now is
        // never too late.
        if relay.now() >= relay.expiry() {
            tracing::debug!("closing idle or stuck websocket tunnel");
            relay.end(EXPIRED).await;
            return;
        }
    }
}

async fn relay(client: TcpStream, upstream: TcpStream, idle: Duration) -> (u64, u64) {
    let relay = Relay::new(idle);
    let (mut to_client, mut to_upstream) = (&client, &upstream);
    let (up, down, ()) = tokio::join!(
        one_way(&client, &mut to_upstream, &relay, 0),
        one_way(&upstream, &mut to_client, &relay, 1),
        watchdog(&relay)
    );
    (up, down)
}

/// Decrypted client bytes → node. The read buffer lives as long as the
/// tunnel (a TLS stream has no readiness to wait on without reading); the
/// read is the only thing raced against the end of the tunnel, and a read
/// that was cancelled has taken nothing.
async fn client_to_node<R: AsyncRead + Unpin>(mut from: R, to: &TcpStream, relay: &Relay) -> u64 {
    let mut buf = vec![0u8; TLS_READ_CHUNK];
    let mut moved = 0u64;
    loop {
        let mut read = ReadBuf::new(&mut buf);
        let ended = poll_fn(|cx| match relay.ended() {
            true => Poll::Ready(None),
            false => Pin::new(&mut from).poll_read(cx, &mut read).map(Some),
        })
        .await;
        let n = match ended {
            None => return moved,
            Some(Ok(())) if !read.filled().is_empty() => read.filled().len(),
            Some(_) => break,
        };
        if !relay.write(0, write_all(to, &buf[..n])).await {
            break;
        }
        moved += n as u64;
    }
    relay.end(ENDED).await;
    moved
}

async fn relay_tls(client: TlsStream<Box<L4Stream>>, upstream: TcpStream, idle: Duration) -> (u64, u64) {
    let relay = Relay::new(idle);
    let (reader, mut writer) = tokio::io::split(client);
    let (up, down, ()) = tokio::join!(
        client_to_node(reader, &upstream, &relay),
        one_way(&upstream, &mut writer, &relay, 1),
        watchdog(&relay)
    );
    // A TLS close_notify, so the client reads a clean end of stream.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
    (up, down)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WS: &[u8] = b"GET /chathub?id=YQ.x&v=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nCookie: a=1\r\nCookie: switchboard_affinity=ff\r\nSec-WebSocket-Key: k\r\n\r\nextra";

    #[test]
    fn websocket_upgrades_are_recognised() {
        let r = UpgradeRequest::parse(WS).unwrap();
        assert_eq!(r.id.as_deref(), Some("YQ.x"));
        assert_eq!(r.path, "/chathub");
        assert_eq!(r.head_len, WS.len() - 5);
        assert_eq!(cookie_value(r.cookie.as_deref().unwrap(), "switchboard_affinity"), Some("ff"));
    }

    #[test]
    fn other_requests_are_not_upgrades() {
        assert!(UpgradeRequest::parse(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").is_none());
        assert!(UpgradeRequest::parse(b"POST /chathub HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
            .is_none());
        assert!(UpgradeRequest::parse(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n").is_none());
        assert!(UpgradeRequest::parse(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n").is_none());
        assert!(UpgradeRequest::parse(b"\x00\x01garbage\r\n\r\n").is_none());
    }

    #[test]
    fn a_clients_forwarded_headers_are_dropped() {
        let head = b"GET /chathub HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6\r\nx-forwarded-proto : https\r\nX-Forwarded-Forx: keep\r\n\r\n";
        assert_eq!(without_forwarded(head), b"GET /chathub HTTP/1.1\r\nHost: h\r\nX-Forwarded-Forx: keep\r\n\r\n");
    }

    #[test]
    fn headers_are_inserted_before_the_blank_line() {
        assert_eq!(
            with_headers(b"HTTP/1.1 101 x\r\nA: b\r\n\r\n", "C: d\r\n"),
            b"HTTP/1.1 101 x\r\nA: b\r\nC: d\r\n\r\n"
        );
    }
}
