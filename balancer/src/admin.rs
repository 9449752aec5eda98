//! The admin port (default 8080, the seed's Traefik dashboard port):
//! `/api/backends` (JSON: every node with url, status, health, open
//! connections, last seen and routing counts), `/api/history` (the last
//! minutes, one sample a second, and the changes seen: `history`),
//! `/dashboard` (a page that draws its charts from those two, with its
//! script and style as files of their own), `/metrics` (Prometheus text)
//! and `/health` (the balancer's own liveness). Every answer carries a
//! strict Content-Security-Policy: the page runs only its own script.
//!
//! Everything but `/health` shows the cluster's inner workings, so it is
//! served only to loopback clients asking for `localhost` or the port's own
//! address (a `Host` of any other name is a DNS-rebinding page in a local
//! browser), or, with `admin_token` set, to clients that present it
//! (`Authorization: Bearer …`, or Basic auth with the token as the password,
//! which a browser asks for by itself on the dashboard). A wrong token is
//! answered only after `WRONG_TOKEN_DELAY`, and past `WRONG_TOKENS_PER_SEC`
//! wrong tokens (from anyone) with 429, so guessing is slow everywhere.
//!
//! `AdminFront` owns each admin connection as the public port's front does:
//! at most `admin_max_connections` at once (503 past it, with descriptors of
//! their own apart from the client connections'), each request head within
//! the public port's time and size limits (408, 431), kept-alive connections
//! closed after the keep-alive time; every request is then answered by
//! `AdminPages` through Pingora's HTTP session.

use crate::admission::Admission;
use crate::cluster::Cluster;
use crate::front::{self, Head, HeadLimits};
use crate::refusal;
use crate::routing::Readiness;
use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use serde_json::json;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use switchboard_common::registry::rfc3339;

use base64::Engine;

/// How long a request with a wrong admin token waits for its 401.
const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(250);
/// Wrong admin tokens the balancer answers with 401 per second, from all
/// clients together (twice that at once); past that, 429.
const WRONG_TOKENS_PER_SEC: u32 = 10;

/// The admin port's pages and API.
pub struct AdminPages {
    pub cluster: Arc<Cluster>,
    /// Wrong admin tokens answered so far (see `WRONG_TOKENS_PER_SEC`).
    wrong_tokens: DefaultDirectRateLimiter,
}

impl AdminPages {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        let rate = NonZeroU32::new(WRONG_TOKENS_PER_SEC).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(2 * WRONG_TOKENS_PER_SEC).unwrap_or(NonZeroU32::MIN);
        AdminPages { cluster, wrong_tokens: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)) }
    }
}

/// The admin listener's front door (see the module's doc).
pub struct AdminFront {
    pages: Arc<AdminPages>,
    connections: Admission,
}

impl AdminFront {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        let connections = Admission::new(0, cluster.cfg.admin_max_connections);
        AdminFront { pages: Arc::new(AdminPages::new(cluster)), connections }
    }

    fn refuse(&self, reason: &str) {
        self.pages.cluster.metrics.refused.with_label_values(&[reason]).inc();
    }
}

#[async_trait]
impl ServerApp for AdminFront {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let mut conn = front::downcast::<L4Stream>(stream)?;
        let cfg = &self.pages.cluster.cfg;
        let limits =
            HeadLimits { time: Duration::from_secs(cfg.request_head_timeout_secs), bytes: cfg.max_request_head_bytes };
        let Some(_permit) = self.connections.try_connect() else {
            self.refuse("admin_max_connections");
            let brief = HeadLimits { time: front::REFUSAL_READ, ..limits };
            let _ = front::read_head(&mut *conn, brief, None).await;
            front::answer(&mut *conn, &refusal::TOO_MANY_CONNECTIONS).await;
            return None;
        };
        let keepalive = Duration::from_secs(cfg.keepalive_timeout_secs);
        let mut idle = None;
        loop {
            let head = match front::read_head(&mut *conn, limits, idle).await {
                Head::Complete(head) => head,
                Head::Closed => return None,
                Head::TimedOut => {
                    self.refuse("admin_head_timeout");
                    front::answer(&mut *conn, &refusal::HEAD_TIMEOUT).await;
                    return None;
                }
                Head::TooLarge => {
                    self.refuse("admin_head_too_large");
                    front::answer(&mut *conn, &refusal::HEAD_TOO_LARGE).await;
                    return None;
                }
            };
            conn.rewind(&head);
            let mut session = ServerSession::new_http1(conn);
            session.set_keepalive((!*shutdown.borrow()).then_some(cfg.keepalive_timeout_secs));
            let reused = self.pages.process_new_http(session, shutdown).await?;
            let (stream, _) = reused.consume();
            conn = front::downcast::<L4Stream>(stream)?;
            idle = Some(keepalive);
        }
    }
}

/// Only the page's own script, style and API calls; no inline code, no
/// framing, nothing from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("Content-Length", body.len())
        .header("Cache-Control", "no-store")
        .header("Content-Security-Policy", CSP)
        .header("X-Content-Type-Options", "nosniff")
        .header("Referrer-Policy", "no-referrer")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

/// The `/api/backends` document.
pub fn backends_json(cluster: &Cluster) -> serde_json::Value {
    let table = cluster.table.load();
    let nodes: Vec<_> = table
        .nodes
        .iter()
        .map(|n| {
            let s = &n.stats;
            json!({
                "nodeId": n.record.node_id,
                "name": n.record.name,
                "url": n.record.url,
                "address": n.addr.to_string(),
                "status": n.record.status.as_str(),
                "healthy": cluster.ready(n),
                "degraded": n.stats.is_degraded(),
                "admission": admission_json(cluster, n),
                "acceptsNewClients": cluster.accepts_new(n),
                "inRegistry": n.missing_since.is_none(),
                "openConnections": s.open.load(Ordering::Relaxed),
                "nodeConnections": n.record.connections,
                "lastSeen": rfc3339(n.record.last_seen),
                "startedAt": rfc3339(n.record.started_at),
                "version": n.record.version,
                "routed": {
                    "token": s.routed_token.load(Ordering::Relaxed),
                    "cookie": s.routed_cookie.load(Ordering::Relaxed),
                    "new": s.routed_new.load(Ordering::Relaxed),
                },
            })
        })
        .collect();
    json!({
        "nodes": nodes,
        "totals": {
            "nodes": table.nodes.len(),
            "healthy": table.nodes.iter().filter(|n| cluster.ready(n)).count(),
            "acceptingNewClients": table.nodes.iter().filter(|n| cluster.accepts_new(n)).count(),
            "openConnections": table.nodes.iter().map(|n| n.stats.open.load(Ordering::Relaxed)).sum::<i64>(),
            "clientConnections": cluster.admission.open(),
            "connectionCap": cluster.admission.cap(),
        },
        "registry": if cluster.redis_up() { "up" } else { "down" },
        "generatedAt": rfc3339(chrono::Utc::now()),
    })
}

/// A node's admission of new connections now: its rate (lower while it
/// starts slowly), whether it is ramping up, and how many wait for a turn.
fn admission_json(cluster: &Cluster, n: &crate::table::RouteNode) -> serde_json::Value {
    let (rate, ramping, waiting) = n.stats.gate.state(&cluster.admission_policy(), crate::node_admission::now_ms());
    json!({ "ratePerSec": rate.round(), "slowStart": ramping, "waiting": waiting })
}

/// Compares without stopping at the first difference.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `Authorization` header value carries `token`.
fn presents_token(authorization: &str, token: &str) -> bool {
    let (scheme, value) = authorization.trim().split_once(' ').unwrap_or((authorization, ""));
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return same_secret(value.as_bytes(), token.as_bytes());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(value) else { return false };
        let password = decoded.iter().position(|b| *b == b':').map_or(&decoded[..0], |i| &decoded[i + 1..]);
        return same_secret(password, token.as_bytes());
    }
    false
}

/// Whether a `Host` names this machine's loopback or the admin port's own
/// address (any port): what a page a local browser loaded from elsewhere
/// can never send, however its name resolves.
fn local_host(host: &str, bound: IpAddr) -> bool {
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None if host.matches(':').count() == 1 => host.split(':').next().unwrap_or(host),
        None => host,
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback() || ip == bound)
}

/// Why a request for a protected path is refused, if it is.
enum Refused {
    /// Not from loopback, or for a name that is not this machine's (no token set).
    NotLocal,
    /// No token (the browser then asks for one).
    TokenMissing,
    /// A token that is not the admin token.
    WrongToken,
}

fn refusal(
    token: &str,
    loopback_peer: bool,
    host: Option<&str>,
    bound: IpAddr,
    authorization: Option<&str>,
) -> Option<Refused> {
    if token.is_empty() {
        let local = loopback_peer && host.is_none_or(|h| local_host(h, bound));
        return (!local).then_some(Refused::NotLocal);
    }
    match authorization {
        Some(a) if presents_token(a, token) => None,
        Some(_) => Some(Refused::WrongToken),
        None => Some(Refused::TokenMissing),
    }
}

fn unauthorized() -> Response<Vec<u8>> {
    let mut resp =
        reply(StatusCode::UNAUTHORIZED, "text/plain; charset=utf-8", b"The admin token is required.\n".to_vec());
    if let Ok(v) = http::HeaderValue::from_str(r#"Basic realm="switchboard admin", charset="UTF-8""#) {
        resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    resp
}

impl AdminPages {
    /// The answer to a refused request: a wrong token waits, and past the
    /// rate of wrong tokens gets 429.
    async fn refused(&self, why: Refused) -> Response<Vec<u8>> {
        match why {
            Refused::NotLocal => {
                let body = b"Without admin_token the admin port answers only loopback clients asking for localhost or its own address.\n";
                reply(StatusCode::FORBIDDEN, "text/plain; charset=utf-8", body.to_vec())
            }
            Refused::TokenMissing => unauthorized(),
            Refused::WrongToken => {
                self.cluster.metrics.refused.with_label_values(&["admin_wrong_token"]).inc();
                tokio::time::sleep(WRONG_TOKEN_DELAY).await;
                if self.wrong_tokens.check().is_ok() {
                    return unauthorized();
                }
                let body = b"Too many wrong admin tokens; retry later.\n".to_vec();
                let mut resp = reply(StatusCode::TOO_MANY_REQUESTS, "text/plain; charset=utf-8", body);
                resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                resp
            }
        }
    }
}

#[async_trait]
impl ServeHttp for AdminPages {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        if path != "/health" {
            let loopback =
                session.client_addr().and_then(|a| a.as_inet()).is_some_and(|a| a.ip().to_canonical().is_loopback());
            let header = |name| session.req_header().headers.get(name).and_then(|v| v.to_str().ok());
            let why = refusal(
                &self.cluster.cfg.admin_token,
                loopback,
                header(http::header::HOST),
                self.cluster.cfg.admin_listen.ip(),
                header(http::header::AUTHORIZATION),
            );
            if let Some(why) = why {
                return self.refused(why).await;
            }
        }
        match path.as_str() {
            "/api/backends" => {
                reply(StatusCode::OK, "application/json", backends_json(&self.cluster).to_string().into_bytes())
            }
            "/api/history" => {
                let query = session.req_header().uri.query();
                let since = query.and_then(|q| q.split('&').find_map(|p| p.strip_prefix("since=")?.parse().ok()));
                reply(StatusCode::OK, "application/json", self.cluster.history.json(since).to_string().into_bytes())
            }
            "/dashboard.js" => reply(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                include_bytes!("../static/dashboard.js").to_vec(),
            ),
            "/dashboard.css" => {
                reply(StatusCode::OK, "text/css; charset=utf-8", include_bytes!("../static/dashboard.css").to_vec())
            }
            "/metrics" => {
                self.cluster.refresh_gauges();
                reply(StatusCode::OK, "text/plain; version=0.0.4", self.cluster.metrics.render().into_bytes())
            }
            "/dashboard" | "/dashboard/" => {
                reply(StatusCode::OK, "text/html; charset=utf-8", include_bytes!("../static/dashboard.html").to_vec())
            }
            "/health" => reply(StatusCode::OK, "application/json", br#"{"status":"ok"}"#.to_vec()),
            "/" => Response::builder()
                .status(StatusCode::FOUND)
                .header("Location", "/dashboard")
                .header("Content-Length", 0)
                .body(Vec::new())
                .unwrap_or_else(|_| Response::new(Vec::new())),
            _ => reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", b"Not found\n".to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_pass: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_pass))
    }

    const BOUND: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn status(r: Option<Refused>) -> &'static str {
        match r {
            None => "served",
            Some(Refused::NotLocal) => "not local",
            Some(Refused::TokenMissing) => "token missing",
            Some(Refused::WrongToken) => "wrong token",
        }
    }

    #[test]
    fn without_a_token_only_loopback_clients_asking_for_a_local_name_are_served() {
        assert_eq!(status(refusal("", true, None, BOUND, None)), "served");
        for host in ["localhost", "localhost:8080", "127.0.0.1:8080", "[::1]:8080", "LOCALHOST", "127.0.0.2"] {
            assert_eq!(status(refusal("", true, Some(host), BOUND, None)), "served", "{host}");
        }
        for host in ["evil.example", "evil.example:8080", "localhost.evil.example", "10.0.0.1:8080", ""] {
            assert_eq!(status(refusal("", true, Some(host), BOUND, None)), "not local", "{host}");
        }
        let bound = "10.1.2.3".parse().unwrap();
        assert_eq!(status(refusal("", true, Some("10.1.2.3:8080"), bound, None)), "served");
        assert_eq!(status(refusal("", false, Some("localhost"), BOUND, None)), "not local");
    }

    #[test]
    fn with_a_token_everyone_must_present_it() {
        let t = "s3cret";
        for ok in ["Bearer s3cret", "bearer  s3cret", &basic("admin:s3cret"), &basic(":s3cret")] {
            assert_eq!(status(refusal(t, false, Some("evil.example"), BOUND, Some(ok))), "served", "{ok}");
        }
        for bad in ["Bearer s3cre", "Bearer s3cret2", &basic("s3cret"), &basic("admin:x"), "Basic !!", "s3cret"] {
            assert_eq!(status(refusal(t, true, None, BOUND, Some(bad))), "wrong token", "{bad}");
        }
        assert_eq!(status(refusal(t, true, None, BOUND, None)), "token missing");
        assert!(unauthorized().headers()[http::header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Basic"));
    }
}
