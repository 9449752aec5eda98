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
//! served only to loopback clients, or, with `admin_token` set, to clients
//! that present it (`Authorization: Bearer …`, or Basic auth with the token
//! as the password, which a browser asks for by itself on the dashboard).

use crate::cluster::Cluster;
use crate::routing::Readiness;
use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use switchboard_common::registry::rfc3339;

use base64::Engine;

pub struct AdminApp {
    pub cluster: Arc<Cluster>,
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

/// Why a request for a protected path is refused, if it is.
fn refusal(token: &str, loopback_peer: bool, authorization: Option<&str>) -> Option<Response<Vec<u8>>> {
    if token.is_empty() {
        return (!loopback_peer).then(|| {
            let body = b"The admin port answers other hosts only when admin_token is set.\n".to_vec();
            reply(StatusCode::FORBIDDEN, "text/plain; charset=utf-8", body)
        });
    }
    if authorization.is_some_and(|a| presents_token(a, token)) {
        return None;
    }
    let mut resp =
        reply(StatusCode::UNAUTHORIZED, "text/plain; charset=utf-8", b"The admin token is required.\n".to_vec());
    if let Ok(v) = http::HeaderValue::from_str(r#"Basic realm="switchboard admin", charset="UTF-8""#) {
        resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    Some(resp)
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        if path != "/health" {
            let loopback =
                session.client_addr().and_then(|a| a.as_inet()).is_some_and(|a| a.ip().to_canonical().is_loopback());
            let authorization = session.req_header().headers.get(http::header::AUTHORIZATION);
            let authorization = authorization.and_then(|v| v.to_str().ok());
            if let Some(refused) = refusal(&self.cluster.cfg.admin_token, loopback, authorization) {
                return refused;
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

    #[test]
    fn without_a_token_only_loopback_is_served() {
        assert!(refusal("", true, None).is_none());
        assert_eq!(refusal("", false, None).map(|r| r.status()), Some(StatusCode::FORBIDDEN));
    }

    #[test]
    fn with_a_token_everyone_must_present_it() {
        let t = "s3cret";
        for ok in ["Bearer s3cret", "bearer  s3cret", &basic("admin:s3cret"), &basic(":s3cret")] {
            assert!(refusal(t, false, Some(ok)).is_none(), "{ok}");
        }
        for bad in ["Bearer s3cre", "Bearer s3cret2", &basic("s3cret"), &basic("admin:x"), "Basic !!", "s3cret"] {
            assert_eq!(refusal(t, true, Some(bad)).map(|r| r.status()), Some(StatusCode::UNAUTHORIZED), "{bad}");
        }
        let asked = refusal(t, true, None).unwrap();
        assert!(asked.headers()[http::header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Basic"));
    }
}
