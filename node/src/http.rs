//! The node's HTTP surface: the `/chathub` endpoints (see `transport`),
//! `/health` for the balancer's checks, `/nodes` in the seed's shape,
//! `/metrics` for Prometheus, and `/`, the web client.

use crate::app::App;
use crate::registry;
use crate::transport;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use switchboard_common::registry::rfc3339;

/// Largest POST body accepted; hub messages are limited separately.
const MAX_POST_BODY: usize = 1024 * 1024;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/chathub/negotiate", post(transport::negotiate))
        .route("/chathub", get(transport::connect).post(transport::send).delete(transport::delete))
        .route("/health", get(health))
        .route("/nodes", get(nodes))
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .layer(DefaultBodyLimit::max(MAX_POST_BODY))
        .with_state(app)
}

/// 200 while the node can serve, 503 while draining. A Redis outage shows as
/// `degraded` but stays 200: one shared dependency failing must not make the
/// balancer drop every node.
async fn health(State(app): State<Arc<App>>) -> Response {
    let redis_up = app.redis.is_up();
    let status = if app.is_draining() {
        "draining"
    } else if redis_up {
        "healthy"
    } else {
        "degraded"
    };
    let code = if app.is_draining() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let body = json!({
        "status": status,
        "nodeId": app.node_id,
        "redis": if redis_up { "up" } else { "down" },
        "connections": app.connections.len(),
        "startedAt": rfc3339(app.started_at),
        "version": env!("CARGO_PKG_VERSION"),
    });
    (code, Json(body)).into_response()
}

async fn nodes(State(app): State<Arc<App>>) -> Response {
    match registry::list_nodes(&app).await {
        Ok(records) => {
            let available: Vec<_> = records
                .iter()
                .map(|r| {
                    json!({
                        "id": r.node_id,
                        "name": r.name,
                        "description": r.description,
                        "lastSeen": rfc3339(r.last_seen),
                        "url": r.url,
                        "status": r.status.as_str(),
                        "connections": r.connections,
                    })
                })
                .collect();
            Json(json!({
                "available_nodes": available,
                "current_node": app.node_id,
                "active_count": records.len(),
                "timestamp": rfc3339(chrono::Utc::now()),
            }))
            .into_response()
        }
        Err(e) => {
            app.redis.set_up(false, Some(&e));
            let body =
                json!({ "error": "the node registry is unavailable (Redis unreachable)", "current_node": app.node_id });
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn index() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")],
        include_str!("../static/index.html"),
    )
        .into_response()
}
