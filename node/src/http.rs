//! The node's HTTP surface: the `/chathub` endpoints (see `transport`), and
//! with an access key the server API (`/api/`, see `api`) and Azure's client
//! endpoint (`/client/`, the hub under that name),
//! `/health` for the balancer's checks, `/nodes` in the seed's shape (less
//! the nodes' internal URLs, which are the balancer's business and shown on
//! its admin port), `/metrics` for Prometheus (the balancer does not pass it
//! on from its public port), and `/`, the web client.

use crate::app::App;
use crate::config::AuthMode;
use crate::cors;
use crate::registry;
use crate::transport;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use switchboard_common::registry::rfc3339;

/// Largest POST body accepted; hub messages are limited separately.
const MAX_POST_BODY: usize = 1024 * 1024;

pub fn router(app: Arc<App>) -> Router {
    // Preflights are answered by the origin guard before reaching a handler.
    let preflight = || async { StatusCode::NO_CONTENT };
    let mut hub = Router::new()
        .route("/chathub/negotiate", post(transport::negotiate).options(preflight))
        .route("/chathub", get(transport::connect).post(transport::send).delete(transport::delete).options(preflight));
    if app.api_enabled() {
        // Azure's client endpoint: the hub by another name, signed in with
        // access tokens from the application's backend (see `api::client`).
        let transports = || get(transport::connect).post(transport::send).delete(transport::delete).options(preflight);
        hub = hub
            .route("/client/negotiate", post(transport::negotiate).options(preflight))
            .route("/client/", transports())
            .route("/client", transports());
    }
    let hub = hub.route_layer(axum::middleware::from_fn_with_state(app.clone(), origin_guard));
    Router::new()
        .merge(hub)
        .route("/auth/info", get(auth_info))
        .route("/auth/dev-token", post(dev_token))
        .route("/health", get(health))
        .route("/nodes", get(nodes))
        .route("/metrics", get(metrics))
        .route("/api/{*rest}", axum::routing::any(crate::api::serve))
        .route("/", get(index))
        .route("/static/{file}", get(asset))
        .layer(DefaultBodyLimit::max(MAX_POST_BODY))
        .with_state(app)
}

/// 200 while the node can serve, 503 while draining. A Redis outage, or a
/// backplane subscription not (yet) proven live, shows as `degraded` but
/// stays 200: one shared dependency failing must not make the balancer drop
/// every node. The status is also in the `X-Switchboard-Status` header, so
/// the balancer's check reads it without the body and sends new clients to
/// nodes that are not degraded while there are any.
async fn health(State(app): State<Arc<App>>) -> Response {
    let redis_up = app.redis.is_up() && app.backplane.is_live();
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
    (code, [("X-Switchboard-Status", status)], Json(body)).into_response()
}

/// What the chat page needs to know to offer sign-in.
async fn auth_info(State(app): State<Arc<App>>) -> Response {
    let mode = match app.auth.mode {
        AuthMode::Off => "off",
        AuthMode::Optional => "optional",
        AuthMode::Required => "required",
    };
    Json(json!({ "mode": mode, "devSignIn": app.cfg.auth_dev_sign_in })).into_response()
}

/// `POST /auth/dev-token?user=NAME`: a one-hour token for any name, only
/// with the explicit development setting `auth_dev_sign_in`.
async fn dev_token(
    State(app): State<Arc<App>>,
    axum::extract::Query(params): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    if !app.cfg.auth_dev_sign_in {
        return (StatusCode::NOT_FOUND, "Development sign-in is off.\n").into_response();
    }
    let user = match crate::user_name::validate(params.get("user").map(String::as_str).unwrap_or_default()) {
        Ok(user) => user,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("user: {e}\n")).into_response(),
    };
    match app.auth.issue(user, 3600) {
        Ok(token) => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], token)
                .into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn nodes(State(app): State<Arc<App>>) -> Response {
    match registry::list_nodes(&app).await {
        Ok(records) => {
            let available: Vec<_> = records
                .iter()
                .map(|r| {
                    // This node's own count is read live; the others' are at
                    // most about a second old (see `registry::heartbeat`).
                    let connections =
                        if r.node_id == app.node_id { app.connections.len() as u64 } else { r.connections };
                    json!({
                        "id": r.node_id,
                        "name": r.name,
                        "description": r.description,
                        "lastSeen": rfc3339(r.last_seen),
                        "status": r.status.as_str(),
                        "connections": connections,
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
    app.metrics.backplane_live.set(app.backplane.is_live() as i64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

/// The web client's files, compiled into the binary so a node needs nothing
/// on disk and the page works without any other network.
const ASSETS: &[(&str, &str, &str)] = &[
    ("chat.css", "text/css; charset=utf-8", include_str!("../static/chat.css")),
    ("signalr.js", "text/javascript; charset=utf-8", include_str!("../static/signalr.js")),
    ("chat.js", "text/javascript; charset=utf-8", include_str!("../static/chat.js")),
];

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    let mut resp = page("text/html; charset=utf-8", include_str!("../static/index.html"));
    // Scripts and styles only from this origin, no inline script: a message
    // that slipped through as HTML still could not run anything.
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'",
        ),
    );
    resp
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => page(content_type, body),
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

/// The middleware on `/chathub` and `/chathub/negotiate`: refuses origins
/// `allowed_origins` does not list (see `cors`) and answers preflights.
async fn origin_guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let origin = match cors::judge(&app.origins, request.headers()) {
        cors::Verdict::Refused => {
            app.metrics.origin_refused.inc();
            let body = "This origin may not use the hub (see allowed_origins).\n";
            return (StatusCode::FORBIDDEN, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body)
                .into_response();
        }
        cors::Verdict::SameOrigin => None,
        cors::Verdict::Allowed(origin) => Some(origin),
    };
    if request.method() == Method::OPTIONS {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
        // The headers the client asked for (the SignalR client sends
        // X-Requested-With, X-SignalR-User-Agent, Authorization, Content-Type).
        if let Some(asked) = request.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
        }
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        if let Some(origin) = origin {
            cors::allow(h, origin);
        }
        return resp;
    }
    let mut resp = next.run(request).await;
    if let Some(origin) = origin {
        cors::allow(resp.headers_mut(), origin);
    }
    resp
}
