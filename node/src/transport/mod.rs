//! The `/chathub` HTTP surface: negotiate, and the three transports that move
//! frames between a client and its connection's outbox and the hub. This file
//! routes each request by method and headers and applies the status codes of
//! the SignalR transport spec and the official server (400 missing id, 404
//! unknown id, 409 second socket, 405 POST to a WebSocket connection); the
//! transport modules do the streaming. As in the official server, a send may
//! come before the first poll (it is processed and its answers wait in the
//! outbox), concurrent sends on one connection are taken in turn rather than
//! refused, and a second WebSocket for a stateful-reconnect connection takes
//! the connection over instead of being refused.

pub mod long_polling;
pub mod sse;
pub mod websocket;

use crate::app::App;
use crate::auth::{AuthError, Identity};
use crate::connection::{AttachError, Connection, ConnectionOptions, Transport};
use crate::hub;
use crate::protocol::{negotiate, HubMessage};
use axum::body::Bytes;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::Arc;
use switchboard_common::token::{ConnectionToken, MAX_TOKEN_LEN};

type Params = Query<HashMap<String, String>>;

/// Every way a `/chathub` request can be refused, with the status code and
/// text the SignalR transport spec (and the official server) give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    MissingId,
    UnknownId,
    AlreadyConnected,
    WrongTransport,
    PostToWebSocket,
    NotLongPolling,
    Draining,
}

impl IntoResponse for TransportError {
    fn into_response(self) -> Response {
        use TransportError::*;
        let (status, body) = match self {
            MissingId => (StatusCode::BAD_REQUEST, "Connection ID required"),
            UnknownId => (StatusCode::NOT_FOUND, "No Connection with that ID"),
            AlreadyConnected => (StatusCode::CONFLICT, "Another connection with this ID is already active"),
            WrongTransport => (StatusCode::BAD_REQUEST, "Cannot change transports mid-connection"),
            PostToWebSocket => {
                (StatusCode::METHOD_NOT_ALLOWED, "POST requests are not allowed for WebSocket connections.")
            }
            NotLongPolling => (StatusCode::BAD_REQUEST, "Cannot terminate this connection using the DELETE endpoint."),
            Draining => {
                (StatusCode::SERVICE_UNAVAILABLE, "This node is draining; negotiate again to reach another node.")
            }
        };
        (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let (status, challenge) = match &self {
            AuthError::Missing => (StatusCode::UNAUTHORIZED, "Bearer".to_string()),
            AuthError::Invalid(_) => (StatusCode::UNAUTHORIZED, "Bearer error=\"invalid_token\"".to_string()),
            AuthError::OtherUser => (StatusCode::FORBIDDEN, "Bearer error=\"insufficient_scope\"".to_string()),
        };
        let headers =
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8".to_string()), (header::WWW_AUTHENTICATE, challenge)];
        (status, headers, format!("{self}\n")).into_response()
    }
}

/// Any refusal of a `/chathub` request: the transport's or the sign-in's.
#[derive(Debug)]
pub enum Refused {
    Transport(TransportError),
    Auth(AuthError),
}

impl From<TransportError> for Refused {
    fn from(e: TransportError) -> Self {
        Refused::Transport(e)
    }
}

impl From<AuthError> for Refused {
    fn from(e: AuthError) -> Self {
        Refused::Auth(e)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Transport(e) => e.into_response(),
            Refused::Auth(e) => e.into_response(),
        }
    }
}

/// Which name the hub was reached by: `/chathub`, whose sign-in is the
/// `auth` setting's, or Azure's client endpoint `/client/`, whose is an
/// access token signed with the server API's key (see `api::client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Hub,
    Client,
}

impl Endpoint {
    fn of(uri: &Uri) -> Self {
        if crate::api::client::is_client_path(uri.path()) {
            Endpoint::Client
        } else {
            Endpoint::Hub
        }
    }
}

/// Who sent a request, by its bearer token (see `auth`).
fn identify(
    app: &App,
    endpoint: Endpoint,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Result<Option<Identity>, AuthError> {
    let result = match endpoint {
        Endpoint::Hub => {
            let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            app.auth.authenticate(authorization, params)
        }
        Endpoint::Client => crate::api::client::identify(app, headers, params),
    };
    if let Err(e) = &result {
        app.metrics.auth_refused.with_label_values(&[e.label()]).inc();
    }
    result
}

/// Looks up `?id=` for a request that must also be from the connection's user.
fn lookup_as(
    app: &App,
    endpoint: Endpoint,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Result<Arc<Connection>, Refused> {
    let who = identify(app, endpoint, headers, params)?;
    let conn = lookup(app, params)?;
    conn.admits(who.as_ref()).inspect_err(|e| app.metrics.auth_refused.with_label_values(&[e.label()]).inc())?;
    Ok(conn)
}

/// A query parameter by name, ignoring case as ASP.NET Core's query does.
fn param<'a>(params: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    params
        .get(name)
        .or_else(|| params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
        .map(String::as_str)
}

/// `?messageIds=true` on the hub URL (so on negotiate, and on the socket
/// of a client that skips negotiation): chat events carry the message id.
fn wants_message_ids(params: &HashMap<String, String>) -> bool {
    param(params, "messageIds").is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Looks up `?id=`.
fn lookup(app: &App, params: &HashMap<String, String>) -> Result<Arc<Connection>, TransportError> {
    let id = params.get("id").ok_or(TransportError::MissingId)?;
    if id.len() > MAX_TOKEN_LEN {
        return Err(TransportError::UnknownId);
    }
    app.connections.get(id).ok_or(TransportError::UnknownId)
}

fn attach(app: &App, conn: &Connection, t: Transport) -> Result<(), TransportError> {
    let first = conn.transport().is_none();
    conn.attach(t).map_err(|e| match e {
        AttachError::AlreadyConnected => TransportError::AlreadyConnected,
        AttachError::WrongTransport => TransportError::WrongTransport,
    })?;
    if first {
        app.metrics.connections.with_label_values(&[t.label()]).inc();
        app.metrics.connections_opened.with_label_values(&[t.label()]).inc();
    }
    Ok(())
}

/// `POST /chathub/negotiate[?negotiateVersion=N]`; the body is ignored.
pub async fn negotiate(State(app): State<Arc<App>>, uri: Uri, Query(params): Params, headers: HeaderMap) -> Response {
    if app.is_draining() {
        return TransportError::Draining.into_response();
    }
    let who = match identify(&app, Endpoint::of(&uri), &headers, &params) {
        Ok(who) => who,
        Err(e) => return e.into_response(),
    };
    let version = match negotiate::requested_version(param(&params, "negotiateVersion")) {
        Ok(v) => v,
        Err(e) => return json(negotiate::error_body(&e)),
    };
    // As ASP.NET Core: stateful reconnect only from negotiate v1 on.
    let stateful = app.cfg.stateful_reconnect
        && version >= 1
        && param(&params, "useStatefulReconnect").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let token = ConnectionToken::issue(&app.node_id);
    // The `?id=` key is always the secret token (a v0 client is told it as
    // its `connectionId`); the public id is only ever shown, never looked up.
    let options = ConnectionOptions { stateful_reconnect: stateful, message_ids: wants_message_ids(&params) };
    let conn = app.new_connection(token.connection_id.clone(), token.token.clone(), options);
    if let Some(who) = &who {
        conn.sign_in(who);
    }
    json(negotiate::negotiate_body(version, &token, stateful))
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn is_websocket_request(headers: &HeaderMap) -> bool {
    headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"))
}

/// `GET /chathub`: WebSocket upgrade, event stream, or long poll.
pub async fn connect(
    State(app): State<Arc<App>>,
    uri: Uri,
    Query(params): Params,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if is_websocket_request(&headers) {
        let upgrade = match upgrade {
            Ok(u) => u,
            Err(rejection) => return rejection.into_response(),
        };
        return match open_websocket(&app, Endpoint::of(&uri), &params, &headers) {
            Ok((conn, generation)) => websocket::upgrade(app, conn, upgrade, generation),
            Err(e) => e.into_response(),
        };
    }
    let conn = match lookup_as(&app, Endpoint::of(&uri), &headers, &params) {
        Ok(conn) => conn,
        Err(refused) => return refused.into_response(),
    };
    let t = if wants_event_stream(&headers) { Transport::ServerSentEvents } else { Transport::LongPolling };
    let result = attach(&app, &conn, t).map(|()| (conn, t));
    match result {
        Ok((conn, Transport::ServerSentEvents)) => sse::stream(app, conn),
        Ok((conn, _)) => long_polling::poll(app, conn).await,
        Err(e) => e.into_response(),
    }
}

/// The connection a WebSocket request serves, and the outbox generation the
/// socket drains: 0 for a new connection, a fresh one for a resume.
fn open_websocket(
    app: &App,
    endpoint: Endpoint,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(Arc<Connection>, u64), Refused> {
    let conn = if params.contains_key("id") {
        lookup_as(app, endpoint, headers, params)?
    } else {
        // skipNegotiation: the connection starts with the socket.
        if app.is_draining() {
            return Err(TransportError::Draining.into());
        }
        let who = identify(app, endpoint, headers, params)?;
        let token = ConnectionToken::issue(&app.node_id);
        let options = ConnectionOptions { stateful_reconnect: false, message_ids: wants_message_ids(params) };
        let conn = app.new_connection(token.connection_id, token.token, options);
        if let Some(who) = &who {
            conn.sign_in(who);
        }
        conn
    };
    if conn.transport().is_some_and(Transport::can_be_stateful) && !conn.outbox.is_closed() {
        if let Some(st) = conn.stateful() {
            // Stateful reconnect: this socket takes the connection over, the
            // old one (dead or not) is superseded, and what the client has not
            // acknowledged is sent again after a Sequence.
            let protocol = conn.protocol();
            let (generation, resent) =
                st.resume(&conn.outbox, |id| protocol.encode(&HubMessage::Sequence { sequence_id: id }).into());
            conn.touch_received();
            app.metrics.stateful_resumes.inc();
            app.metrics.stateful_resent.inc_by(resent as u64);
            tracing::info!(connection = %conn.connection_id, resent, "stateful connection resumed on a new WebSocket");
            return Ok((conn, generation));
        }
    }
    attach(app, &conn, Transport::WebSockets)?;
    Ok((conn, 0))
}

/// `POST /chathub?id=…`: one or more records from an SSE or long-polling client.
pub async fn send(
    State(app): State<Arc<App>>,
    uri: Uri,
    Query(params): Params,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Refused> {
    let conn = lookup_as(&app, Endpoint::of(&uri), &headers, &params)?;
    if conn.transport().is_some_and(|t| !t.takes_posts()) {
        return Err(TransportError::PostToWebSocket.into());
    }
    // Backpressure, as the official server's pipe gives: a send waits until
    // the replies to earlier ones have been polled.
    conn.outbox.wait_room().await;
    if conn.outbox.is_closed() {
        return Err(TransportError::UnknownId.into());
    }
    // The send answers once all of its records are processed; while the
    // client's replies fill the outbox, the rest waits for its polls.
    let mut flow = hub::on_data(&app, &conn, &body).await;
    while flow == hub::Flow::Paused {
        conn.outbox.wait_room().await;
        if conn.outbox.is_closed() {
            break;
        }
        flow = hub::on_data(&app, &conn, &[]).await;
    }
    Ok(StatusCode::OK)
}

/// `DELETE /chathub?id=…`: ends a long-polling connection.
pub async fn delete(
    State(app): State<Arc<App>>,
    uri: Uri,
    Query(params): Params,
    headers: HeaderMap,
) -> Result<StatusCode, Refused> {
    let conn = lookup_as(&app, Endpoint::of(&uri), &headers, &params)?;
    if !conn.transport().is_some_and(Transport::is_polled) {
        return Err(TransportError::NotLongPolling.into());
    }
    app.disconnect(&conn);
    conn.supersede_polls();
    Ok(StatusCode::ACCEPTED)
}
