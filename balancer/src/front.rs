//! The public listener's front door, a Pingora `ServerApp` in front of the
//! proxy. It owns every client connection from accept to close: it counts it
//! against the connection cap (503 above it), and reads each request head
//! itself, the first and every later one on a kept-alive connection, within
//! `request_head_timeout_secs` and `max_request_head_bytes` (408 and 431
//! past them) and after at most `keepalive_timeout_secs` of idleness. A
//! On the HTTPS listener a TLS handshake (`tls`) comes first and the same
//! serving runs on the decrypted stream; on the plain one, with `tls_redirect`,
//! requests other than `/health` are redirected to HTTPS instead. A
//! WebSocket upgrade is routed and tunnelled by `tunnel` (the balancer owns
//! the socket once the node answers 101); a request without a body (a
//! negotiate, a long poll, an event stream, `/health`, the page) is
//! forwarded by `forward` over a kept-alive connection to its node; any
//! other request (one with a body: a long-poll send) is pushed back into the
//! stream (`rewind`) and handed to the Pingora HTTP proxy for that one
//! request, which gives the connection back when it may be reused.
//!
//! Why not let Pingora run the connection: its read timeout is per read, so
//! a head trickled a byte at a time on a kept-alive connection never ends,
//! and its keep-alive loop offers no hook between requests. And Pingora 0.9
//! pumps upgraded connections through its HTTP body path, which keeps 64 KiB
//! buffers per direction for the life of every WebSocket, and has a race that
//! drops a tunnel when the node's 101 is parsed before the request's empty
//! body is (seen here on pooled upstream connections).

use crate::access_log::Entry;
use crate::admission::ConnectionPermit;
use crate::cluster::Cluster;
use crate::forward::{self, Next};
use crate::proxy::SwitchboardProxy;
use crate::refusal::{self, Refusal};
use crate::request::{Origin, Request};
use crate::tls::TlsConn;
use crate::tunnel;
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::listeners::{ListenerConfig, TcpSocketOptions};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::GetSocketDigest;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// How long a connection over the cap may take to send its head before it
/// is answered 503 anyway (reading it first lets the client see the answer
/// instead of a reset).
pub const REFUSAL_READ: Duration = Duration::from_millis(500);

/// How long, and for how many reads, a refused connection is drained.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_READS: usize = 256;

pub struct FrontApp {
    pub cluster: Arc<Cluster>,
    pub proxy: Arc<HttpProxy<SwitchboardProxy>>,
    /// Set on the HTTPS listener: every connection starts with a TLS handshake.
    pub tls: Option<TlsAcceptor>,
}

/// Limits on one request head.
#[derive(Clone, Copy)]
pub struct HeadLimits {
    pub time: Duration,
    pub bytes: usize,
}

/// What reading one request head came to.
#[derive(Debug, PartialEq)]
pub enum Head {
    /// The whole head, and whatever followed it.
    Complete(Vec<u8>),
    TooLarge,
    /// The time limit passed with part of a head read.
    TimedOut,
    /// Closed, failed, or nothing arrived in time.
    Closed,
}

/// Where the blank line that ends a head is, searching from `from` (bytes
/// before it were searched already, so a trickled head costs linear time).
/// Bare `\n` line ends are accepted, as Pingora's parser accepts them.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    (from.max(1)..buf.len()).find_map(|i| {
        let ends = buf[i] == b'\n' && (buf[i - 1] == b'\n' || (i >= 2 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n'));
        ends.then_some(i + 1)
    })
}

/// Reads one request head. With `idle`, first waits that long for its first
/// byte (a kept-alive connection between requests) and the time limit runs
/// from that byte; without it the limit runs from now.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limits: HeadLimits,
    idle: Option<Duration>,
) -> Head {
    read_head_after(stream, limits, idle, Vec::new()).await
}

/// `read_head` for a head whose first bytes, `carried`, were read already
/// (sent while the previous request's answer was on its way); with some,
/// there is no idle wait.
async fn read_head_after<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limits: HeadLimits,
    idle: Option<Duration>,
    carried: Vec<u8>,
) -> Head {
    let mut buf = carried;
    if let Some(idle) = idle.filter(|_| buf.is_empty()) {
        buf.reserve(1024);
        match tokio::time::timeout(idle, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Head::Closed,
        }
    }
    let deadline = Instant::now() + limits.time;
    let mut searched: usize = 0;
    loop {
        if head_end(&buf, searched.saturating_sub(3)).is_some() {
            return Head::Complete(buf);
        }
        searched = buf.len();
        if buf.len() >= limits.bytes {
            return Head::TooLarge;
        }
        // Grown on the heap as bytes arrive, never past the limit by more
        // than one read: an idle connection holds no buffer at all.
        buf.reserve((limits.bytes - buf.len()).min(4096));
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) if buf.is_empty() => return Head::Closed,
            Err(_) => return Head::TimedOut,
            Ok(Ok(0)) | Ok(Err(_)) => return Head::Closed,
            Ok(Ok(_)) => {}
        }
    }
}

/// Answers and closes. What the client is still sending is read and
/// discarded for a moment first (a "lingering close", as nginx does):
/// closing with unread bytes makes the kernel send a reset, which can
/// destroy the answer before the client reads it.
pub async fn answer<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, refusal: &Refusal) {
    let write = async {
        stream.write_all(refusal.to_http().as_bytes()).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    if !matches!(tokio::time::timeout(Duration::from_secs(2), write).await, Ok(Ok(()))) {
        return;
    }
    let linger = async {
        let mut sink = vec![0u8; 4096];
        for _ in 0..LINGER_READS {
            if !matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}

/// A public listening address. Accepted sockets get no read buffer: Pingora's
/// default is 64 KiB per connection, held by every kept-alive client, and
/// bytes it read ahead would be lost when a tunnel takes the socket over.
/// Writes keep a one-packet buffer, so a small answer's head and body leave
/// in one segment.
///
/// `shared`: the index of one of several sockets bound to this address with
/// `SO_REUSEPORT`. Pingora keys its table of listening descriptors (those a
/// graceful upgrade hands over) by the address as written, and gives every
/// service with the same key one descriptor, closed once by each. So socket
/// `i` is written with `i + 1` leading zeros on its port (`:08888`), which
/// parses to the same port: a key of its own, never the plain address a
/// listener without `SO_REUSEPORT` would have.
pub fn listener(addr: SocketAddr, shared: Option<usize>) -> ListenerConfig {
    let config = match shared {
        None => ListenerConfig::tcp(addr.to_string()),
        Some(i) => {
            // Every SocketAddr is written `host:port`.
            let written = addr.to_string();
            let host = written.rsplit_once(':').map_or(written.as_str(), |(host, _)| host);
            let mut options = TcpSocketOptions::default();
            options.so_reuseport = Some(true);
            ListenerConfig::tcp(format!("{host}:{}{}", "0".repeat(i + 1), addr.port())).tcp_socket_options(options)
        }
    };
    config.l4_buffer(L4BufferSettings::new(0, 1460))
}

pub fn downcast<C: 'static>(stream: Stream) -> Option<Box<C>> {
    match stream.into_any().downcast::<C>() {
        Ok(s) => Some(s),
        Err(_) => {
            tracing::error!("unexpected stream type on a listener");
            None
        }
    }
}

/// A client connection the front serves: plain TCP or decrypted TLS.
trait ClientConn: pingora::protocols::IO + Sized + 'static {
    const TLS: bool;
    /// The client's address, for the access log.
    fn peer_ip(&self) -> Option<std::net::IpAddr> {
        peer_ip_of(self)
    }
    /// Makes `data` the next bytes read.
    fn rewind(&mut self, data: &[u8]);
    /// The connection as the WebSocket tunnel takes it over; `None` when its
    /// socket could not be duplicated (out of descriptors).
    fn into_client(self: Box<Self>) -> Option<tunnel::Client>;
}

impl ClientConn for L4Stream {
    const TLS: bool = false;
    fn rewind(&mut self, data: &[u8]) {
        L4Stream::rewind(self, data);
    }
    fn into_client(self: Box<Self>) -> Option<tunnel::Client> {
        // Pingora set TCP_NODELAY on the socket when it accepted it.
        let socket = tunnel::take_socket(&self)?;
        // Pingora's stream is read only through its own rewind buffer, which
        // the front leaves empty.
        Some(tunnel::Client { socket: tunnel::Socket::Plain(socket), rewound: Vec::new() })
    }
}

impl ClientConn for TlsConn {
    const TLS: bool = true;
    fn rewind(&mut self, data: &[u8]) {
        TlsConn::rewind(self, data);
    }
    fn into_client(self: Box<Self>) -> Option<tunnel::Client> {
        let (socket, rewound) = self.into_parts();
        Some(tunnel::Client { socket: tunnel::Socket::Tls(Box::new(socket)), rewound })
    }
}

/// The client's address of a connection, from its socket digest.
pub fn peer_ip_of(s: &impl GetSocketDigest) -> Option<std::net::IpAddr> {
    s.get_socket_digest()?.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
}

/// Logs an answer the front gave itself (a refusal or a redirect), with the
/// request's facts when a head was read.
fn log_answer(cluster: &Cluster, origin: Origin<'_>, head: Option<&[u8]>, status: u16, started: std::time::Instant) {
    let Some(log) = &cluster.access_log else { return };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = head.is_some_and(|h| req.parse(h).is_ok());
    let request = parsed
        .then(|| Request::from_parsed(&req, origin, false))
        .flatten()
        .unwrap_or_else(|| Request::unparsed(origin.peer, origin.tls));
    log.record(&Entry::answered(&request, status, started.elapsed()));
}

/// Where a plain request should go instead when HTTPS is enforced: the same
/// host and path on the TLS port. `/health` and heads without a Host stay.
fn https_location(head: &[u8], tls_port: u16) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    let target = req.path?;
    if target.split('?').next() == Some("/health") || !target.starts_with('/') {
        return None;
    }
    let host = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host"))?;
    let host = std::str::from_utf8(host.value).ok()?.trim();
    // Drop the port (a bracketed IPv6 literal keeps its brackets).
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b)) {
        return None;
    }
    Some(if tls_port == 443 { format!("https://{name}{target}") } else { format!("https://{name}:{tls_port}{target}") })
}

impl FrontApp {
    fn refuse(&self, reason: &str) {
        self.cluster.metrics.refused.with_label_values(&[reason]).inc();
    }

    /// Serves requests on one connection until it closes, fails a limit or
    /// becomes a tunnel (which then runs in a task of its own, holding
    /// `permit`).
    async fn serve<C: ClientConn>(&self, mut conn: Box<C>, shutdown: &ShutdownWatch, permit: ConnectionPermit) {
        let cfg = &self.cluster.cfg;
        let limits =
            HeadLimits { time: Duration::from_secs(cfg.request_head_timeout_secs), bytes: cfg.max_request_head_bytes };
        let keepalive = Duration::from_secs(cfg.keepalive_timeout_secs);
        let redirect_to = if C::TLS || !cfg.tls_redirect { None } else { cfg.tls_port() };
        let origin = Origin { peer: conn.peer_ip(), tls: C::TLS, cookie_name: &cfg.cookie_name };
        let mut idle = None;
        let mut carried = Vec::new();
        loop {
            let started = std::time::Instant::now();
            let (refused, head) = match read_head_after(&mut *conn, limits, idle, std::mem::take(&mut carried)).await {
                Head::Complete(head) => (None, head),
                Head::Closed => return,
                Head::TimedOut => (Some(("head_timeout", &refusal::HEAD_TIMEOUT)), Vec::new()),
                Head::TooLarge => (Some(("head_too_large", &refusal::HEAD_TOO_LARGE)), Vec::new()),
            };
            if let Some((reason, refusal)) = refused {
                self.refuse(reason);
                log_answer(&self.cluster, origin, None, refusal.status, started);
                return answer(&mut *conn, refusal).await;
            }
            if let Some(location) = redirect_to.and_then(|port| https_location(&head, port)) {
                let moved = refusal::redirect(&location);
                let _ = conn.write_all(moved.as_bytes()).await;
                let _ = conn.flush().await;
                log_answer(&self.cluster, origin, Some(&head), 308, started);
                return;
            }
            if let Some(request) = tunnel::UpgradeRequest::parse(&head, origin) {
                if let Some(client) = conn.into_client() {
                    tunnel::serve(self.cluster.clone(), client, request, head, permit).await;
                }
                return;
            }
            let reusable = !*shutdown.borrow();
            // Boxed: only a request in flight holds the forwarder's state.
            match Box::pin(forward::serve(&self.cluster, &mut *conn, &head, origin, reusable)).await {
                Some(Next::KeepAlive(early)) => {
                    carried = early;
                    idle = Some(keepalive);
                    continue;
                }
                Some(Next::Close) => return,
                None => {}
            }
            conn.rewind(&head);
            let Some(reused) = self.proxy_one(conn, shutdown).await else { return };
            let (stream, _) = reused.consume();
            let Some(next) = downcast::<C>(stream) else { return };
            conn = next;
            idle = Some(keepalive);
        }
    }

    /// Hands one request, its head already rewound into `conn`, to the
    /// Pingora proxy, which reads and proxies it and says whether the
    /// connection may carry another. A plain function so that Pingora's
    /// session (about 2 KB) lives only in the future it boxes, not in the
    /// connection's own future for every tunnel's life.
    fn proxy_one<'a, C: ClientConn>(
        &'a self,
        conn: Box<C>,
        shutdown: &'a ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'a>> {
        let mut session = ServerSession::new_http1(conn);
        let reusable = !*shutdown.borrow();
        session.set_keepalive(reusable.then_some(self.cluster.cfg.keepalive_timeout_secs));
        self.proxy.process_new_http(session, shutdown)
    }

    /// The TLS handshake, within the time a request head is allowed.
    async fn accept_tls(&self, acceptor: &TlsAcceptor, l4: Box<L4Stream>) -> Option<Box<TlsConn>> {
        let within = Duration::from_secs(self.cluster.cfg.request_head_timeout_secs);
        match tokio::time::timeout(within, acceptor.accept(l4)).await {
            Ok(Ok(tls)) => Some(Box::new(TlsConn::new(tls))),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                self.refuse("tls_handshake");
                None
            }
            Err(_) => {
                self.refuse("tls_handshake");
                None
            }
        }
    }
}

#[async_trait]
impl ServerApp for FrontApp {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let mut l4 = downcast::<L4Stream>(stream)?;
        let Some(permit) = self.cluster.admission.try_connect() else {
            self.refuse("max_connections");
            let started = std::time::Instant::now();
            // Over TLS there is no way to answer before a handshake; close.
            if self.tls.is_none() {
                let brief = HeadLimits { time: REFUSAL_READ, bytes: self.cluster.cfg.max_request_head_bytes };
                let head = match read_head(&mut *l4, brief, None).await {
                    Head::Complete(h) => Some(h),
                    _ => None,
                };
                let status = refusal::TOO_MANY_CONNECTIONS.status;
                let origin = Origin { peer: peer_ip_of(&*l4), tls: false, cookie_name: &self.cluster.cfg.cookie_name };
                log_answer(&self.cluster, origin, head.as_deref(), status, started);
                answer(&mut *l4, &refusal::TOO_MANY_CONNECTIONS).await;
            }
            return None;
        };
        match &self.tls {
            None => self.serve(l4, shutdown, permit).await,
            // Boxed: the handshake's and the TLS serving's state would
            // otherwise size every plain connection's future too, for its
            // whole life.
            Some(acceptor) => {
                Box::pin(async {
                    if let Some(conn) = self.accept_tls(acceptor, l4).await {
                        self.serve(conn, shutdown, permit).await;
                    }
                })
                .await
            }
        }
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const LIMITS: HeadLimits = HeadLimits { time: Duration::from_millis(300), bytes: 64 };

    #[test]
    fn the_end_of_a_head_is_found_from_where_the_search_left_off() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody", 0), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nbody", 0), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        // Searching again from three bytes before the old end still finds an
        // end split across two reads.
        let buf = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(head_end(buf, buf.len() - 2 - 3), Some(buf.len()));
    }

    #[tokio::test]
    async fn a_head_is_read_whole_with_what_follows() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\nnext").await.unwrap();
        let Head::Complete(buf) = read_head(&mut server, LIMITS, None).await else { panic!() };
        assert!(buf.ends_with(b"\r\n\r\nnext"));
    }

    #[tokio::test]
    async fn a_trickled_head_times_out_and_a_silent_connection_closes() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let trickle = tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if client.write_all(b"X").await.is_err() {
                    break;
                }
            }
        });
        assert_eq!(read_head(&mut server, LIMITS, None).await, Head::TimedOut);
        trickle.abort();
        let (_client, mut server) = tokio::io::duplex(1024);
        assert_eq!(read_head(&mut server, LIMITS, None).await, Head::Closed);
        // Kept alive: silence for the idle time closes quietly too.
        assert_eq!(read_head(&mut server, LIMITS, Some(Duration::from_millis(50))).await, Head::Closed);
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&[b'a'; 200]).await.unwrap();
        assert_eq!(read_head(&mut server, LIMITS, None).await, Head::TooLarge);
    }
}
