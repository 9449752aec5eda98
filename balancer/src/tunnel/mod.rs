//! WebSocket tunnels owned by the balancer. `front` hands over a connection
//! whose first request is a WebSocket upgrade; this module routes it like any
//! request (token → cookie → least loaded, with the same admission and
//! metrics; `connect`), forwards the head with the balancer's headers
//! (`head`), passes the node's answer on (adding the affinity cookie for new
//! clients) and, after a 101, hands both sockets to `relay`, in a task of
//! its own, until either side closes or the tunnel has been idle for
//! `idle_timeout_secs`; a tunnel the balancer ends itself gets a Close frame
//! (`frames`). One access-log line per tunnel, when it ends.

mod frames;
mod head;
mod relay;

pub use head::UpgradeRequest;
pub(crate) use head::{has_token, with_headers, without_forwarded};

use crate::access_log::Entry;
use crate::admission::{self, ConnectionPermit};
use crate::cluster::Cluster;
use crate::connect;
use crate::proxy::InFlight;
use crate::public_surface;
use crate::refusal::{self, Refusal};
use crate::request::Request;
use crate::routing::{set_cookie_header, RouteKind};
use crate::table::RouteNode;
use head::read_response_head;
use pingora::protocols::l4::stream::Stream as L4Stream;
use relay::{write_all, Downstream, RELAY_CHUNK};
use std::future::Future;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

const MAX_ERROR_BODY: usize = 64 * 1024;

/// Duplicates the accepted socket into a tokio `TcpStream` we own.
pub fn take_socket(stream: &L4Stream) -> Option<TcpStream> {
    // SAFETY: `stream` owns this descriptor and outlives the borrow; it is only duplicated.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let std_stream = std::net::TcpStream::from(fd.try_clone_to_owned().ok()?);
    std_stream.set_nonblocking(true).ok()?;
    TcpStream::from_std(std_stream).ok()
}

async fn respond<C: Downstream>(client: &mut C, refusal: &Refusal) {
    let _ = client.send(refusal.to_http().as_bytes()).await;
}

/// An established tunnel: both sockets and the counters held while it lives.
struct Tunnel<C> {
    client: C,
    upstream: TcpStream,
    kind: RouteKind,
    in_flight: InFlight,
    /// Where each direction is in its frames after the handshake's trailing bytes.
    cursors: frames::Cursors,
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
    request: Request<'static>,
}

impl TunnelLog {
    fn new(cluster: &Cluster, req: &UpgradeRequest) -> Option<Box<Self>> {
        cluster.access_log.as_ref()?;
        Some(Box::new(TunnelLog { started: std::time::Instant::now(), request: req.request.clone() }))
    }

    /// Writes the tunnel's line, when the log is on.
    fn finish(this: Option<Box<Self>>, cluster: &Cluster, ended: &Ended) {
        let (Some(this), Some(log)) = (this, &cluster.access_log) else { return };
        let node = ended.node.as_ref();
        log.record(&Entry {
            request: &this.request,
            status: ended.status,
            node: node.map(|(n, _)| n.record.node_id.as_str()),
            route: node.map_or("-", |(_, k)| k.label()),
            duration: this.started.elapsed(),
            bytes_in: ended.bytes.0,
            bytes_out: ended.bytes.1,
        });
    }
}

/// A connection the tunnel takes over: its socket and bytes the front read
/// past the request head but left rewound (none today: the front reads a
/// head only from an empty rewind buffer).
pub struct Client {
    pub socket: Socket,
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
    let Client { socket, rewound } = client;
    let mut buf = buf;
    buf.extend_from_slice(&rewound);
    match socket {
        Socket::Plain(socket) => start(cluster, socket, req, buf, permit).await,
        Socket::Tls(socket) => start(cluster, *socket, req, buf, permit).await,
    }
}

/// A client socket a tunnel relays: plain or TLS.
trait ClientSide: Downstream + Sized + 'static {
    /// Relays both ways, then closes both sides; returns the bytes moved
    /// (from the client, to the client).
    fn relay(
        self,
        upstream: TcpStream,
        idle: Duration,
        cursors: frames::Cursors,
    ) -> impl Future<Output = (u64, u64)> + Send;
}

impl ClientSide for TcpStream {
    fn relay(
        self,
        upstream: TcpStream,
        idle: Duration,
        cursors: frames::Cursors,
    ) -> impl Future<Output = (u64, u64)> + Send {
        relay::relay(self, upstream, idle, cursors)
    }
}

impl ClientSide for TlsStream<Box<L4Stream>> {
    fn relay(
        self,
        upstream: TcpStream,
        idle: Duration,
        cursors: frames::Cursors,
    ) -> impl Future<Output = (u64, u64)> + Send {
        relay::relay_tls(self, upstream, idle, cursors)
    }
}

/// `serve` for one kind of client socket.
async fn start<C: ClientSide>(
    cluster: Arc<Cluster>,
    client: C,
    req: UpgradeRequest,
    buf: Vec<u8>,
    permit: ConnectionPermit,
) {
    let log = TunnelLog::new(&cluster, &req);
    // Boxed, so that the handshake's state does not size the front's future
    // (every kept-alive connection's) too.
    match Box::pin(handshake(&cluster, client, req, buf)).await {
        Ok(Tunnel { client, upstream, kind, in_flight, cursors }) => {
            tokio::spawn(async move {
                let idle = Duration::from_secs(cluster.cfg.idle_timeout_secs);
                let bytes = client.relay(upstream, idle, cursors).await;
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
    req: UpgradeRequest,
    buf: Vec<u8>,
) -> Result<Tunnel<C>, Ended> {
    let request = &req.request;
    if !public_surface::serves(request.path()) {
        return refuse(&mut client, &refusal::NOT_PUBLIC).await;
    }
    if request.starts_connection() && !cluster.admit_new_connection(request.peer) {
        return refuse(&mut client, &refusal::RATE_LIMITED).await;
    }
    let chosen = match connect::choose(cluster, request).await {
        Ok((node, kind)) => connect::connect(cluster, node, kind, &mut Vec::new()).await,
        Err(refusal) => Err(refusal),
    };
    let (node, kind, upstream) = match chosen {
        Ok(chosen) => chosen,
        Err(refusal) => return refuse(&mut client, refusal).await,
    };
    let in_flight = InFlight::new(node.clone());
    let started = std::time::Instant::now();

    let forwarded = admission::forwarded_lines(request.peer, request.host.as_deref(), request.tls);
    let head = with_headers(&without_forwarded(&buf[..req.head_len]), &forwarded);
    if write_all(&upstream, &head).await.is_err() || write_all(&upstream, &buf[req.head_len..]).await.is_err() {
        return refuse(&mut client, &refusal::NODE_UNREACHABLE).await;
    }
    let idle = Duration::from_secs(cluster.cfg.idle_timeout_secs);
    let answer = tokio::time::timeout(idle, read_response_head(&upstream)).await;
    let Ok(Some((resp, head_len, status, length))) = answer else {
        cluster.metrics.count_request(502);
        return refuse(&mut client, &refusal::NODE_UNREACHABLE).await;
    };
    cluster.metrics.upstream_latency.observe(started.elapsed().as_secs_f64());
    cluster.metrics.count_request(status);
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
        let mut cursors = [frames::FrameCursor::default(), frames::FrameCursor::default()];
        cursors[0].feed(&buf[req.head_len..]);
        cursors[1].feed(&resp[head_len..]);
        return Ok(Tunnel { client, upstream, kind, in_flight, cursors });
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
