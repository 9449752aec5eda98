//! The heads a tunnel reads and writes: the client's upgrade request (what
//! routing needs of it), the request as forwarded (the client's own
//! `X-Forwarded-*` lines dropped, the balancer's added) and the node's
//! response head, read with a bound on its size.

use crate::admission::FORWARDED_HEADERS;
use crate::request::{Origin, Request};
use std::io::ErrorKind;
use tokio::net::TcpStream;

const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// An upgrade request: its head's length and its facts.
#[derive(Debug, PartialEq)]
pub struct UpgradeRequest {
    pub head_len: usize,
    pub request: Request<'static>,
}

/// Whether a comma-separated header value holds `token` (any case).
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value).map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))).unwrap_or(false)
}

impl UpgradeRequest {
    /// `Some` for a complete `GET` head asking to upgrade to WebSocket.
    pub fn parse(buf: &[u8], origin: Origin<'_>) -> Option<Self> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(head_len) = req.parse(buf).ok()? else {
            return None;
        };
        if req.method != Some("GET") {
            return None;
        }
        let upgrade =
            req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("upgrade") && has_token(h.value, "websocket"));
        let connection =
            req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("connection") && has_token(h.value, "upgrade"));
        if !(upgrade && connection) {
            return None;
        }
        let request = Request::from_parsed(&req, origin, true)?.into_owned();
        Some(UpgradeRequest { head_len, request })
    }
}

/// `head` without the client's own `X-Forwarded-*` lines (the balancer sets
/// them; a client must not be able to forge its address to the node).
pub(crate) fn without_forwarded(head: &[u8]) -> Vec<u8> {
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

/// Inserts header lines before the blank line that ends `head`, which may
/// be `\r\n` or a bare `\n` (httparse accepts both, and the client's last
/// header line must keep its own end).
pub(crate) fn with_headers(head: &[u8], extra: &str) -> Vec<u8> {
    let blank = if head.ends_with(b"\r\n") { 2 } else { usize::from(head.ends_with(b"\n")) };
    let mut out = Vec::with_capacity(head.len() + extra.len());
    out.extend_from_slice(&head[..head.len() - blank]);
    out.extend_from_slice(extra.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// Reads a response head; returns (bytes read, head length, status, content length).
pub(super) async fn read_response_head(upstream: &TcpStream) -> Option<(Vec<u8>, usize, u16, Option<usize>)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: Origin<'static> = Origin { peer: None, tls: false, cookie_name: "switchboard_affinity" };

    const WS: &[u8] = b"GET /chathub?id=YQ.x&v=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nCookie: a=1\r\nCookie: switchboard_affinity=ff\r\nSec-WebSocket-Key: k\r\n\r\nextra";

    #[test]
    fn websocket_upgrades_are_recognised() {
        let r = UpgradeRequest::parse(WS, ORIGIN).unwrap();
        assert_eq!(r.request.id(), Some("YQ.x"));
        assert_eq!(r.request.path(), "/chathub");
        assert_eq!(r.request.kind, "websocket");
        assert_eq!(r.head_len, WS.len() - 5);
        assert_eq!(r.request.cookie.as_deref(), Some("ff"));
    }

    #[test]
    fn other_requests_are_not_upgrades() {
        assert!(UpgradeRequest::parse(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", ORIGIN).is_none());
        assert!(UpgradeRequest::parse(
            b"POST /chathub HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            ORIGIN
        )
        .is_none());
        assert!(
            UpgradeRequest::parse(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n", ORIGIN).is_none()
        );
        assert!(UpgradeRequest::parse(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n", ORIGIN).is_none());
        assert!(UpgradeRequest::parse(b"\x00\x01garbage\r\n\r\n", ORIGIN).is_none());
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

    #[test]
    fn headers_are_inserted_whole_into_a_head_with_bare_line_feeds() {
        let head = b"GET /chathub HTTP/1.1\nHost: h\nSec-WebSocket-Version: 13\n\n";
        let forwarded = with_headers(head, "X-Forwarded-For: 10.0.0.1\r\n");
        assert_eq!(
            forwarded,
            b"GET /chathub HTTP/1.1\nHost: h\nSec-WebSocket-Version: 13\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
        );
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(&forwarded).unwrap().is_complete());
        let names: Vec<&str> = req.headers.iter().map(|h| h.name).collect();
        assert_eq!(names, ["Host", "Sec-WebSocket-Version", "X-Forwarded-For"]);
        // Mixed: the blank line alone is bare.
        assert_eq!(
            with_headers(b"GET / HTTP/1.1\r\nA: b\r\n\n", "C: d\r\n"),
            b"GET / HTTP/1.1\r\nA: b\r\nC: d\r\n\r\n"
        );
    }
}
