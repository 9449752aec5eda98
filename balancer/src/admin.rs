//! The admin port (default 8080, the seed's Traefik dashboard port):
//! `/api/backends` (JSON: every node with url, status, health, open
//! connections, last seen and routing counts), `/dashboard` (a page that
//! refreshes itself from that API), `/metrics` (Prometheus text) and
//! `/health` (the balancer's own liveness).

use crate::cluster::Cluster;
use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use switchboard_common::registry::rfc3339;

pub struct AdminApp {
    pub cluster: Arc<Cluster>,
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("Content-Length", body.len())
        .header("Cache-Control", "no-store")
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
            "clientRequestsInFlight": cluster.protection.open(),
        },
        "registry": if cluster.redis_up() { "up" } else { "down" },
        "generatedAt": rfc3339(chrono::Utc::now()),
    })
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/api/backends" => {
                reply(StatusCode::OK, "application/json", backends_json(&self.cluster).to_string().into_bytes())
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
