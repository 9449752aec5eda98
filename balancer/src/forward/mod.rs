//! Plain HTTP requests without a body — negotiates, long polls, event
//! streams, closes, `/health`, the page — forwarded by the balancer itself,
//! from the head the front already read, over kept-alive connections to the
//! nodes (`pool`). The policy is the proxy's (public paths, per-IP rate, route,
//! admission, retries on a failed connect, a negotiate retried on another
//! node when its node went away with it in flight, the affinity cookie, the
//! `X-Forwarded-*` headers, one access-log line and the request metrics);
//! the node's answer is passed on as its bytes arrive, and `body` finds
//! where it ends so that both connections can carry the next request.
//!
//! Why not Pingora's proxy for these: it builds, clones and serialises
//! header maps and moves large futures for every request, which made the
//! balancer's user CPU per SignalR setup and per request two to three times
//! HAProxy's (docs/benchmarks.md). Requests with a body (long-poll sends),
//! HTTP/1.0, `Expect` and pipelined heads still go to Pingora's proxy.

mod body;
mod pool;

use crate::access_log::{Entry, CLIENT_LEFT};
use crate::admission;
use crate::cluster::Cluster;
use crate::connect;
use crate::proxy::InFlight;
use crate::public_surface;
use crate::refusal::{self, Refusal};
use crate::request::{Origin, Request};
use crate::routing::{set_cookie_header, RouteKind};
use crate::table::RouteNode;
use crate::tunnel::{has_token, with_headers, without_forwarded};
use body::Body;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_RESPONSE_HEAD: usize = 16 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// A request the forwarder takes: bodyless HTTP/1.1, nothing after its head.
struct Plain<'h> {
    request: Request<'h>,
    /// A `HEAD` request: the answer has a head only.
    head_only: bool,
    /// The client asked to close after this request.
    close: bool,
    /// A retry cannot do harm: idempotent, or a negotiate (which creates
    /// nothing the client has seen).
    retriable: bool,
}

impl<'h> Plain<'h> {
    fn parse(head: &'h [u8], origin: Origin<'_>) -> Option<Self> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(len) = req.parse(head).ok()? else { return None };
        if len != head.len() || req.version != Some(1) || req.method == Some("CONNECT") {
            return None;
        }
        let mut close = false;
        for h in req.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                if h.value.trim_ascii() != b"0" {
                    return None;
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("expect")
                || name.eq_ignore_ascii_case("upgrade")
            {
                return None;
            } else if name.eq_ignore_ascii_case("connection") {
                close |= has_token(h.value, "close");
            }
        }
        let method = req.method?;
        let request = Request::from_parsed(&req, origin, false)?;
        let retriable = matches!(method, "GET" | "HEAD" | "OPTIONS" | "DELETE" | "PUT") || request.kind == "negotiate";
        Some(Plain { head_only: method == "HEAD", close, retriable, request })
    }
}

/// What the front does with the client connection after a request.
pub enum Next {
    /// Read the next request head, starting with these bytes (sent by the
    /// client while its answer was on the way).
    KeepAlive(Vec<u8>),
    Close,
}

/// Forwards one request when it is one the forwarder takes (`None`: hand
/// it to Pingora's proxy). `reusable`: the connection may carry another
/// request (not while the balancer shuts down).
pub async fn serve<C: AsyncRead + AsyncWrite + Unpin + Send>(
    cluster: &Arc<Cluster>,
    client: &mut C,
    head: &[u8],
    origin: Origin<'_>,
    reusable: bool,
) -> Option<Next> {
    let plain = Plain::parse(head, origin)?;
    let started = Instant::now();
    let mut done = Done { status: 0, node: None, bytes_out: 0, next: Next::Close };
    forward(cluster, client, head, &plain, reusable && !plain.close, &mut done).await;
    cluster.metrics.count_request(done.status);
    if let Some(log) = &cluster.access_log {
        let node = done.node.as_ref();
        log.record(&Entry {
            request: &plain.request,
            status: if done.status == 0 { CLIENT_LEFT } else { done.status },
            node: node.map(|(n, _)| n.record.node_id.as_str()),
            route: node.map_or("-", |(_, k)| k.label()),
            duration: started.elapsed(),
            bytes_in: 0,
            bytes_out: done.bytes_out,
        });
    }
    Some(done.next)
}

/// How a request ended, for the log, the metrics and the front.
struct Done {
    /// The status the client got; 0 when it left before an answer.
    status: u16,
    node: Option<(Arc<RouteNode>, RouteKind)>,
    bytes_out: u64,
    next: Next,
}

/// Writes `parts` in order and flushes, within `idle`.
async fn send<C: AsyncWrite + Unpin>(client: &mut C, parts: &[&[u8]], idle: Duration) -> bool {
    let write = async {
        for part in parts {
            client.write_all(part).await?;
        }
        client.flush().await
    };
    matches!(tokio::time::timeout(idle, write).await, Ok(Ok(())))
}

/// Answers for the balancer. The connection stays open for the client's
/// next request (a long-polling client told its connection is gone
/// negotiates again on it), except after a 429: a client over its rate
/// pays for a new connection.
async fn refuse<C: AsyncWrite + Unpin>(
    client: &mut C,
    refusal: &Refusal,
    done: &mut Done,
    keep_alive: bool,
    early: &mut Vec<u8>,
) {
    done.status = refusal.status;
    let keep_alive = keep_alive && refusal.status != 429;
    if send(client, &[refusal.response(!keep_alive).as_bytes()], Duration::from_secs(2)).await && keep_alive {
        done.next = Next::KeepAlive(std::mem::take(early));
    }
}

/// A node's response head.
struct Response {
    /// What was read: the head and the first bytes after it.
    buf: Vec<u8>,
    head_len: usize,
    status: u16,
    body: Body,
    /// The node will close the connection after this response.
    close: bool,
}

/// Why an exchange with a node failed.
enum Failure {
    /// Nothing came back: the connection was broken, or closed before an
    /// answer (a pooled connection the node had just closed, a node killed).
    Broken,
    /// The node's answer could not be parsed, or took longer than `idle`.
    Bad,
    /// The client left while the node had not answered yet.
    ClientLeft,
}

fn response_head(buf: &[u8], head_only: bool) -> Result<Option<(usize, u16, Body, bool)>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        _ => return Err(Failure::Bad),
    };
    let status = resp.code.ok_or(Failure::Bad)?;
    if status < 200 {
        // Interim answers are only for requests with a body or an upgrade.
        return Err(Failure::Bad);
    }
    let mut length = None;
    let mut chunked = false;
    let mut close = resp.version == Some(0);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok());
            length = Some(n.ok_or(Failure::Bad)?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = has_token(h.value, "chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = has_token(h.value, "close") || (close && !has_token(h.value, "keep-alive"));
        }
    }
    let body = if head_only || status == 204 || status == 304 {
        Body::Length(0)
    } else if chunked {
        Body::Chunked(Default::default())
    } else if let Some(n) = length {
        Body::Length(n)
    } else {
        Body::UntilClose
    };
    Ok(Some((len, status, body, close)))
}

/// Sends the request head and reads the node's response head, watching the
/// client meanwhile: a client that closes abandons the request (as one
/// leaving a long poll does); bytes it sends are kept for the next request.
async fn exchange<C: AsyncRead + Unpin>(
    client: &mut C,
    early: &mut Vec<u8>,
    upstream: &mut TcpStream,
    head: &[u8],
    plain: &Plain<'_>,
    idle: Duration,
) -> Result<Response, Failure> {
    upstream.write_all(head).await.map_err(|_| Failure::Broken)?;
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let deadline = tokio::time::Instant::now() + idle;
    loop {
        let watching = early.is_empty();
        let mut probe = [0u8; 512];
        tokio::select! {
            biased;
            ready = tokio::time::timeout_at(deadline, upstream.readable()) => match ready {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Failure::Broken),
                Err(_) => return Err(Failure::Bad),
            },
            read = client.read(&mut probe), if watching => match read {
                Ok(0) | Err(_) => return Err(Failure::ClientLeft),
                Ok(n) => {
                    early.extend_from_slice(&probe[..n]);
                    continue;
                }
            },
        }
        match upstream.try_read_buf(&mut buf) {
            Ok(0) if buf.is_empty() => return Err(Failure::Broken),
            Ok(0) => return Err(Failure::Bad),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) if buf.is_empty() => return Err(Failure::Broken),
            Err(_) => return Err(Failure::Bad),
        }
        if let Some((head_len, status, body, close)) = response_head(&buf, plain.head_only)? {
            return Ok(Response { buf, head_len, status, body, close });
        }
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len());
        }
    }
}

async fn forward<C: AsyncRead + AsyncWrite + Unpin + Send>(
    cluster: &Arc<Cluster>,
    client: &mut C,
    head: &[u8],
    plain: &Plain<'_>,
    keep_alive: bool,
    done: &mut Done,
) {
    let request = &plain.request;
    let mut early: Vec<u8> = Vec::new();
    if !public_surface::serves(request.path()) {
        return refuse(client, &refusal::NOT_PUBLIC, done, keep_alive, &mut early).await;
    }
    if request.starts_connection() && !cluster.admit_new_connection(request.peer) {
        return refuse(client, &refusal::RATE_LIMITED, done, keep_alive, &mut early).await;
    }
    let (mut node, mut kind) = match connect::choose(cluster, request).await {
        Ok(chosen) => chosen,
        Err(refusal) => return refuse(client, refusal, done, keep_alive, &mut early).await,
    };
    let extra = admission::forwarded_lines(request.peer, request.host.as_deref(), request.tls);
    let out = with_headers(&without_forwarded(head), &extra);
    let idle = Duration::from_secs(cluster.cfg.idle_timeout_secs);
    let mut tried: Vec<String> = Vec::new();
    let mut may_reuse = true;
    let (mut upstream, resp, _in_flight, asked) = loop {
        let pooled = if may_reuse { pool::take(node.addr) } else { None };
        let reused = pooled.is_some();
        let upstream = match pooled {
            Some(stream) => stream,
            None => match connect::connect(cluster, node.clone(), kind, &mut tried).await {
                Ok((n, k, stream)) => {
                    (node, kind) = (n, k);
                    stream
                }
                Err(refusal) => return refuse(client, refusal, done, keep_alive, &mut early).await,
            },
        };
        let mut upstream = upstream;
        let in_flight = InFlight::new(node.clone());
        let asked = Instant::now();
        match exchange(client, &mut early, &mut upstream, &out, plain, idle).await {
            Ok(resp) => break (upstream, resp, in_flight, asked),
            Err(Failure::ClientLeft) => return,
            Err(Failure::Bad) => return refuse(client, &refusal::NODE_UNREACHABLE, done, keep_alive, &mut early).await,
            // A pooled connection the node closed as it was taken: a fresh
            // one to the same node.
            Err(Failure::Broken) if reused && plain.retriable => may_reuse = false,
            // A negotiate whose node went away with it in flight goes to the
            // next node, as a failed connect does: nothing of it reached the
            // client, so the client cannot tell.
            Err(Failure::Broken) if request.kind == "negotiate" => {
                tracing::debug!(node = %node.record.node_id, "negotiate failed in flight");
                match cluster.reroute(&node, RouteKind::New, &mut tried) {
                    Some((next, _)) => {
                        (node, kind) = (next, RouteKind::New);
                        may_reuse = true;
                    }
                    None => return refuse(client, &refusal::NODE_UNREACHABLE, done, keep_alive, &mut early).await,
                }
            }
            Err(Failure::Broken) => {
                return refuse(client, &refusal::NODE_UNREACHABLE, done, keep_alive, &mut early).await
            }
        }
    };
    cluster.metrics.upstream_latency.observe(asked.elapsed().as_secs_f64());
    let Response { mut buf, head_len, status, mut body, close } = resp;
    done.status = status;
    done.node = Some((node.clone(), kind));

    let keep_alive = keep_alive && !close && !matches!(body, Body::UntilClose);
    let mut added = String::new();
    if kind == RouteKind::New {
        added.push_str("Set-Cookie: ");
        added.push_str(&set_cookie_header(&cluster.cfg.cookie_name, &node.cookie));
        added.push_str("\r\n");
    }
    if !keep_alive && !close {
        added.push_str("Connection: close\r\n");
    }
    let out_head = if added.is_empty() { None } else { Some(with_headers(&buf[..head_len], &added)) };
    let Ok(taken) = body.feed(&buf[head_len..]) else {
        return refuse(client, &refusal::NODE_UNREACHABLE, done, keep_alive, &mut early).await;
    };
    let mut clean = head_len + taken == buf.len();
    let first: &[u8] = out_head.as_deref().unwrap_or(&buf[..head_len]);
    if !send(client, &[first, &buf[head_len..head_len + taken]], idle).await {
        return;
    }
    done.bytes_out = taken as u64;

    // The rest of the body, as it comes, still watching the client: one
    // that leaves an event stream ends it now, not at the next write.
    while !body.is_done() {
        buf.clear();
        buf.reserve(READ_CHUNK);
        let mut probe = [0u8; 512];
        let n = tokio::select! {
            biased;
            read = tokio::time::timeout(idle, upstream.read_buf(&mut buf)) => match read {
                Ok(Ok(n)) => n,
                _ => return,
            },
            read = client.read(&mut probe), if early.is_empty() => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    early.extend_from_slice(&probe[..n]);
                    continue;
                }
            },
        };
        if n == 0 {
            // The end of a body framed by the close; a cut one otherwise.
            if matches!(body, Body::UntilClose) {
                break;
            }
            return;
        }
        let Ok(taken) = body.feed(&buf) else { return };
        clean &= taken == n;
        if !send(client, &[&buf[..taken]], idle).await {
            return;
        }
        done.bytes_out += taken as u64;
    }
    if clean && !close && !plain.close && body.is_done() {
        pool::put(node.addr, upstream);
    }
    if keep_alive {
        done.next = Next::KeepAlive(early);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: Origin<'static> = Origin { peer: None, tls: false, cookie_name: "switchboard_affinity" };

    #[test]
    fn bodyless_http11_requests_are_taken() {
        let negotiate = b"POST /chathub/negotiate?negotiateVersion=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n";
        let p = Plain::parse(negotiate, ORIGIN).unwrap();
        assert_eq!(p.request.kind, "negotiate");
        assert!(p.retriable && !p.close && !p.head_only);
        let poll = b"GET /chathub?id=abc HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
        let p = Plain::parse(poll, ORIGIN).unwrap();
        assert_eq!(p.request.kind, "long_poll");
        assert!(p.close);
        assert!(Plain::parse(b"HEAD /health HTTP/1.1\r\n\r\n", ORIGIN).unwrap().head_only);
        // A POST without a length has no body in HTTP/1.1.
        assert!(!Plain::parse(b"POST /chathub?id=a HTTP/1.1\r\nHost: h\r\n\r\n", ORIGIN).unwrap().retriable);
    }

    #[test]
    fn requests_with_a_body_or_anything_unusual_go_to_the_proxy() {
        for head in [
            &b"POST /chathub?id=a HTTP/1.1\r\nContent-Length: 5\r\n\r\n"[..],
            b"POST /chathub?id=a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /chathub?id=a HTTP/1.1\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(Plain::parse(head, ORIGIN).is_none(), "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn a_response_head_says_how_its_body_ends() {
        let parse = |h: &[u8], head_only| response_head(h, head_only).ok().flatten();
        let (len, status, body, close) = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nbody", false).unwrap();
        assert_eq!((len, status, body, close), (39, 200, Body::Length(12), false));
        let (_, _, body, _) = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false).unwrap();
        assert!(matches!(body, Body::Chunked(_)));
        let (_, _, body, close) = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false).unwrap();
        assert_eq!((body, close), (Body::UntilClose, true));
        let (_, _, body, _) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).unwrap();
        assert_eq!(body, Body::Length(0));
        let (_, _, body, _) = parse(b"HTTP/1.1 204 No Content\r\n\r\n", false).unwrap();
        assert_eq!(body, Body::Length(0));
        let (_, _, _, close) = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false).unwrap();
        assert!(close);
        assert!(matches!(response_head(b"HTTP/1.1 200 OK\r\nContent-Le", false), Ok(None)));
        assert!(response_head(b"HTTP/1.1 100 Continue\r\n\r\n", false).is_err());
        assert!(response_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
        assert!(response_head(b"garbage\r\n\r\n", false).is_err());
    }
}
