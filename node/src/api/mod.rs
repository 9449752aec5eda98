//! The server API for application backends: the paths, bodies and status
//! codes of Azure SignalR Service's data-plane REST API (api-version
//! 2022-06-01) for the hub `chathub`, served by every node (and through the
//! balancer's public port, by any node: everything it does is cluster-wide).
//!
//! Messages go out through the node's one delivery path by address (stored
//! and published like chat messages, so they get ids and history and a
//! resuming client sees them); group membership, closing and existence
//! checks of a connection go to the node its id names (`control`), and of a
//! user to the nodes that hold one of the user's connections. Without an
//! access key (`api_access_key`) every path here answers 404 and nothing
//! else changes; with one, a request needs a token signed with it (`auth`).

pub mod auth;
pub mod client;

use crate::app::App;
use crate::command::Command;
use crate::control;
use crate::history::ChatMessage;
use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

pub use auth::HUB;
/// How long a user stays in a group the API put it in, without `ttl`: a
/// year, as Azure does.
const DEFAULT_USER_GROUP_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest group name (Azure's limit is 1,024; the hub's own is lower).
const MAX_NAME_BYTES: usize = crate::groups::MAX_GROUP_NAME;

/// What one request asks for, from its method and path.
#[derive(Debug, PartialEq, Eq)]
enum Operation {
    Health,
    SendAll,
    SendUser(String),
    SendGroup(String),
    SendConnection(String),
    ConnectionExists(String),
    CloseConnection(String),
    LeaveAllGroups(String),
    GroupExists(String),
    AddToGroup { group: String, connection: String },
    RemoveFromGroup { group: String, connection: String },
    UserExists(String),
    CloseUser(String),
    UserInGroup { user: String, group: String },
    AddUserToGroup { user: String, group: String },
    RemoveUserFromGroup { user: String, group: String },
    RemoveUserFromAllGroups(String),
    CloseAll,
    CloseGroup(String),
}

impl Operation {
    /// The metrics label: a bounded set whatever the path.
    fn label(&self) -> &'static str {
        match self {
            Operation::Health => "health",
            Operation::SendAll => "send_all",
            Operation::SendUser(_) => "send_user",
            Operation::SendGroup(_) => "send_group",
            Operation::SendConnection(_) => "send_connection",
            Operation::ConnectionExists(_) => "connection_exists",
            Operation::CloseConnection(_) => "close_connection",
            Operation::LeaveAllGroups(_) => "connection_leave_all_groups",
            Operation::GroupExists(_) => "group_exists",
            Operation::AddToGroup { .. } => "group_add_connection",
            Operation::RemoveFromGroup { .. } => "group_remove_connection",
            Operation::UserExists(_) => "user_exists",
            Operation::CloseUser(_) => "close_user",
            Operation::UserInGroup { .. } => "user_in_group",
            Operation::AddUserToGroup { .. } => "group_add_user",
            Operation::RemoveUserFromGroup { .. } => "group_remove_user",
            Operation::RemoveUserFromAllGroups(_) => "user_leave_all_groups",
            Operation::CloseAll => "close_all",
            Operation::CloseGroup(_) => "close_group",
        }
    }
}

/// An answer: its status and, for an error, what went wrong.
struct Answer(StatusCode, Option<String>);

impl Answer {
    fn ok(status: StatusCode) -> Self {
        Answer(status, None)
    }

    fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Answer(status, Some(message.into()))
    }

    fn found(found: bool) -> Self {
        if found {
            Answer::ok(StatusCode::OK)
        } else {
            Answer::error(StatusCode::NOT_FOUND, "not found")
        }
    }
}

/// A path segment, percent-decoded.
fn decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The operation `method` and `path` name: `Err` with the status for a path
/// that is not one (404) or a method the path does not take (405).
fn route(method: &Method, path: &str) -> Result<Operation, Answer> {
    let not_found = || Answer::error(StatusCode::NOT_FOUND, "no such API path");
    let raw: Vec<&str> = path.strip_prefix("/api/").ok_or_else(not_found)?.split('/').collect();
    let segments: Vec<String> = raw.iter().map(|s| decode(s)).collect::<Option<_>>().ok_or_else(not_found)?;
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    if s == ["health"] {
        return if matches!(*method, Method::HEAD | Method::GET) {
            Ok(Operation::Health)
        } else {
            Err(Answer::error(StatusCode::METHOD_NOT_ALLOWED, "HEAD /api/health"))
        };
    }
    let ["hubs", hub, rest @ ..] = s.as_slice() else { return Err(not_found()) };
    if !hub.eq_ignore_ascii_case(HUB) {
        return Err(Answer::error(StatusCode::NOT_FOUND, format!("this cluster serves the hub '{HUB}' only")));
    }
    if let Some(op) = operation(method, rest) {
        return Ok(op);
    }
    // A path some other method takes: 405, else 404.
    let methods = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::HEAD];
    if methods.iter().any(|m| operation(m, rest).is_some()) {
        Err(Answer::error(StatusCode::METHOD_NOT_ALLOWED, "that method does not apply to this path"))
    } else {
        Err(not_found())
    }
}

/// The operation `method` on the path under the hub (`rest`, decoded) is.
fn operation(method: &Method, rest: &[&str]) -> Option<Operation> {
    let owned = |v: &str| v.to_string();
    Some(match (rest, method.clone()) {
        ([":send"], Method::POST) => Operation::SendAll,
        ([":closeConnections"], Method::POST) => Operation::CloseAll,
        (["groups", g, ":closeConnections"], Method::POST) => Operation::CloseGroup(owned(g)),
        (["users", u, ":send"], Method::POST) => Operation::SendUser(owned(u)),
        (["groups", g, ":send"], Method::POST) => Operation::SendGroup(owned(g)),
        (["connections", c, ":send"], Method::POST) => Operation::SendConnection(owned(c)),
        (["connections", c], Method::HEAD) => Operation::ConnectionExists(owned(c)),
        (["connections", c], Method::DELETE) => Operation::CloseConnection(owned(c)),
        (["connections", c, "groups"], Method::DELETE) => Operation::LeaveAllGroups(owned(c)),
        (["groups", g], Method::HEAD) => Operation::GroupExists(owned(g)),
        (["groups", g, "connections", c], Method::PUT) => {
            Operation::AddToGroup { group: owned(g), connection: owned(c) }
        }
        (["groups", g, "connections", c], Method::DELETE) => {
            Operation::RemoveFromGroup { group: owned(g), connection: owned(c) }
        }
        (["users", u], Method::HEAD) => Operation::UserExists(owned(u)),
        (["users", u, ":closeConnections"], Method::POST) => Operation::CloseUser(owned(u)),
        (["users", u, "groups", g], Method::HEAD) => Operation::UserInGroup { user: owned(u), group: owned(g) },
        (["users", u, "groups", g], Method::PUT) => Operation::AddUserToGroup { user: owned(u), group: owned(g) },
        (["users", u, "groups", g], Method::DELETE) => {
            Operation::RemoveUserFromGroup { user: owned(u), group: owned(g) }
        }
        (["users", u, "groups"], Method::DELETE) => Operation::RemoveUserFromAllGroups(owned(u)),
        _ => return None,
    })
}

/// The URLs a request may have been sent to, for its token's `aud`: as the
/// operator says the public one is, as the balancer forwarded it, as it
/// arrived, and under the connection string's endpoint.
pub fn request_urls(app: &App, headers: &HeaderMap, path: &str) -> Vec<String> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let mut urls = Vec::new();
    if !app.cfg.api_audience.is_empty() {
        urls.push(format!("{}{path}", app.cfg.api_audience.trim_end_matches('/')));
    }
    if let Some(endpoint) = app.api_key.as_ref().and_then(|k| k.endpoint.as_deref()) {
        urls.push(format!("{endpoint}{path}"));
    }
    if let Some(host) = text("x-forwarded-host").and_then(|h| h.split(',').next()) {
        let proto = text("x-forwarded-proto").and_then(|p| p.split(',').next()).unwrap_or("http");
        urls.push(format!("{}://{}{path}", proto.trim(), host.trim()));
    }
    if let Some(host) = text("host") {
        urls.push(format!("http://{host}{path}"));
        urls.push(format!("https://{host}{path}"));
    }
    urls
}

/// Every request under `/api/`.
pub async fn serve(State(app): State<Arc<App>>, request: Request) -> Response {
    if app.api_key.is_none() {
        return (StatusCode::NOT_FOUND, "Not found.\n").into_response();
    }
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let (label, answer) = match route(&parts.method, &path) {
        Err(answer) => ("unknown", answer),
        Ok(op) => {
            let label = op.label();
            (label, authorized(&app, &parts.headers, &path, &parts.uri, op, body).await)
        }
    };
    let Answer(status, message) = answer;
    app.metrics.api_requests.with_label_values(&[label, status.as_str()]).inc();
    if status.is_success() || parts.method == Method::HEAD {
        return status.into_response();
    }
    let message = message.unwrap_or_default();
    let code = status.canonical_reason().unwrap_or("Error").replace(' ', "");
    if status == StatusCode::UNAUTHORIZED {
        let challenge = format!("Bearer error=\"invalid_token\", error_description=\"{message}\"");
        return (
            status,
            [(header::WWW_AUTHENTICATE, challenge)],
            axum::Json(json!({"code": code, "message": message})),
        )
            .into_response();
    }
    (status, axum::Json(json!({"code": code, "message": message}))).into_response()
}

/// Checks the token, then carries the operation out.
async fn authorized(
    app: &Arc<App>,
    headers: &HeaderMap,
    path: &str,
    uri: &axum::http::Uri,
    op: Operation,
    body: Body,
) -> Answer {
    let query = uri.query();
    let Some(key) = &app.api_key else { return Answer::error(StatusCode::NOT_FOUND, "no server API") };
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Err(why) = key.check(authorization, &request_urls(app, headers, path)) {
        tracing::info!(reason = %why, "server API request refused");
        return Answer::error(StatusCode::UNAUTHORIZED, why);
    }
    let params: Vec<(String, String)> = match query {
        None => Default::default(),
        Some(_) => match axum::extract::Query::try_from_uri(uri) {
            Ok(axum::extract::Query(p)) => p,
            Err(_) => return Answer::error(StatusCode::BAD_REQUEST, "the query string is malformed"),
        },
    };
    // Boxed: the operations' futures nest deep enough to overflow the
    // compiler's layout query when inlined into the handler's.
    match Box::pin(perform(app, op, &params, body)).await {
        Ok(answer) => answer,
        Err(answer) => answer,
    }
}

/// A message body: `{"target": "...", "arguments": [...]}`, within the size limit.
async fn payload(app: &App, body: Body) -> Result<(String, Vec<Value>), Answer> {
    let limit = app.cfg.api_max_body_bytes;
    let bytes = to_bytes(body, limit)
        .await
        .map_err(|_| Answer::error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than {limit} bytes")))?;
    let bad = |why: String| Answer::error(StatusCode::BAD_REQUEST, why);
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(bad("the body is a JSON object {\"target\": \"…\", \"arguments\": […]}".into()));
    };
    let target = match object.remove("target") {
        Some(Value::String(t)) if !t.trim().is_empty() && t.len() <= 256 && !t.chars().any(char::is_control) => t,
        _ => return Err(bad("target is a method name: a non-empty string of at most 256 bytes".into())),
    };
    let arguments = match object.remove("arguments") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("arguments is an array".into())),
    };
    Ok((target, arguments))
}

/// A user or group name from the path, checked.
fn name(kind: &str, value: &str) -> Result<(), Answer> {
    let valid = if kind == "user" {
        crate::user_name::validate(value).is_ok_and(|v| v == value)
    } else {
        crate::groups::validate_name(value).is_ok() && value.len() <= MAX_NAME_BYTES
    };
    if valid {
        Ok(())
    } else {
        Err(Answer::error(StatusCode::BAD_REQUEST, format!("that is not a valid {kind} name")))
    }
}

/// A server API message to `address`, with a fresh uid (see `ChatMessage`).
fn message(app: &App, target: String, arguments: Vec<Value>) -> ChatMessage {
    ChatMessage {
        uid: format!("{:032x}", rand::random::<u128>()),
        node_id: app.node_id.clone(),
        timestamp: switchboard_common::registry::rfc3339(chrono::Utc::now()),
        target: Some(target),
        arguments: Some(arguments),
        ..Default::default()
    }
}

fn unavailable(e: impl std::fmt::Display) -> Answer {
    Answer::error(StatusCode::SERVICE_UNAVAILABLE, format!("the cluster's shared state is unavailable: {e}"))
}

/// Runs a command about a connection: here when this node holds it, else
/// on the node its id names. Whether the connection was found.
async fn on_connection(app: &Arc<App>, connection: &str, command: Command) -> Result<bool, Answer> {
    let owner = switchboard_common::token::owner_of(connection);
    if owner.as_deref() == Some(app.node_id.as_str()) {
        return Ok(Box::pin(control::apply(app, &command)).await);
    }
    match app.backplane.command(command).await {
        Ok(found) => Ok(found.unwrap_or(false)),
        Err(e) => Err(unavailable(e)),
    }
}

/// A query parameter's first value.
fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a String> {
    params.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

async fn perform(app: &Arc<App>, op: Operation, params: &[(String, String)], body: Body) -> Result<Answer, Answer> {
    let reason = param(params, "reason").cloned();
    // `excluded=<id>`, repeated: connections a send or a close leaves out.
    let excluded: Vec<String> = params.iter().filter(|(n, _)| n == "excluded").map(|(_, v)| v.clone()).collect();
    let send = |m: ChatMessage, address: &str| {
        app.metrics.api_messages.with_label_values(&[address]).inc();
        app.backplane.send(m);
        Answer::ok(StatusCode::ACCEPTED)
    };
    Ok(match op {
        Operation::Health => Answer::ok(StatusCode::OK),
        Operation::SendAll => {
            let (target, arguments) = payload(app, body).await?;
            send(ChatMessage { excluded, ..message(app, target, arguments) }, "all")
        }
        Operation::SendUser(user) => {
            name("user", &user)?;
            let (target, arguments) = payload(app, body).await?;
            send(ChatMessage { to: Some(user), ..message(app, target, arguments) }, "user")
        }
        Operation::SendGroup(group) => {
            name("group", &group)?;
            let (target, arguments) = payload(app, body).await?;
            send(ChatMessage { group: Some(group), excluded, ..message(app, target, arguments) }, "group")
        }
        Operation::SendConnection(connection) => {
            let (target, arguments) = payload(app, body).await?;
            if switchboard_common::token::owner_of(&connection).is_none() {
                // No node's id: nobody to deliver it to (as Azure, still 202).
                return Ok(Answer::ok(StatusCode::ACCEPTED));
            }
            send(ChatMessage { connection: Some(connection), ..message(app, target, arguments) }, "connection")
        }
        Operation::ConnectionExists(connection) => {
            Answer::found(on_connection(app, &connection, Command::Exists { connection: connection.clone() }).await?)
        }
        Operation::CloseConnection(connection) => {
            on_connection(app, &connection, Command::Close { connection: connection.clone(), reason }).await?;
            Answer::ok(StatusCode::OK)
        }
        Operation::LeaveAllGroups(connection) => {
            on_connection(app, &connection, Command::LeaveAllGroups { connection: connection.clone() }).await?;
            Answer::ok(StatusCode::OK)
        }
        Operation::GroupExists(group) => {
            name("group", &group)?;
            Answer::found(app.backplane.group_has_members(&group).await.map_err(unavailable)?)
        }
        Operation::AddToGroup { group, connection } => {
            name("group", &group)?;
            let command = Command::JoinGroup { connection: connection.clone(), group };
            Answer::found(on_connection(app, &connection, command).await?)
        }
        Operation::RemoveFromGroup { group, connection } => {
            name("group", &group)?;
            let command = Command::LeaveGroup { connection: connection.clone(), group };
            Answer::found(on_connection(app, &connection, command).await?)
        }
        Operation::UserExists(user) => {
            name("user", &user)?;
            Answer::found(app.backplane.user_is_connected(&user).await.map_err(unavailable)?)
        }
        Operation::CloseUser(user) => {
            name("user", &user)?;
            app.backplane.command(Command::CloseUser { user, reason }).await.map_err(unavailable)?;
            Answer::ok(StatusCode::NO_CONTENT)
        }
        Operation::UserInGroup { user, group } => {
            name("user", &user)?;
            name("group", &group)?;
            let groups = app.backplane.user_groups(&user).await.map_err(unavailable)?;
            Answer::found(groups.contains(&group))
        }
        Operation::AddUserToGroup { user, group } => {
            name("user", &user)?;
            name("group", &group)?;
            let ttl = match param(params, "ttl") {
                None => Some(DEFAULT_USER_GROUP_TTL),
                Some(t) => match t.parse::<u64>() {
                    Ok(0) => None, // only the connections there are now
                    Ok(secs) => Some(Duration::from_secs(secs)),
                    Err(_) => return Err(Answer::error(StatusCode::BAD_REQUEST, "ttl is a number of seconds")),
                },
            };
            if let Some(ttl) = ttl {
                app.backplane.add_user_group(&user, &group, ttl).await.map_err(unavailable)?;
            }
            app.backplane.command(Command::UserJoinGroup { user, group }).await.map_err(unavailable)?;
            Answer::ok(StatusCode::OK)
        }
        Operation::RemoveUserFromGroup { user, group } => {
            name("user", &user)?;
            name("group", &group)?;
            app.backplane.remove_user_groups(&user, Some(&group)).await.map_err(unavailable)?;
            app.backplane.command(Command::UserLeaveGroups { user, groups: vec![group] }).await.map_err(unavailable)?;
            Answer::ok(StatusCode::NO_CONTENT)
        }
        Operation::CloseAll => {
            app.backplane.command(Command::CloseAll { reason, excluded }).await.map_err(unavailable)?;
            Answer::ok(StatusCode::NO_CONTENT)
        }
        Operation::CloseGroup(group) => {
            name("group", &group)?;
            app.backplane.command(Command::CloseGroup { group, reason, excluded }).await.map_err(unavailable)?;
            Answer::ok(StatusCode::NO_CONTENT)
        }
        Operation::RemoveUserFromAllGroups(user) => {
            name("user", &user)?;
            let groups = app.backplane.remove_user_groups(&user, None).await.map_err(unavailable)?;
            if !groups.is_empty() {
                app.backplane.command(Command::UserLeaveGroups { user, groups }).await.map_err(unavailable)?;
            }
            Answer::ok(StatusCode::NO_CONTENT)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_methods_name_the_operations_of_azures_api() {
        let r = |m: Method, p: &str| route(&m, p);
        assert_eq!(r(Method::POST, "/api/hubs/chathub/:send").ok(), Some(Operation::SendAll));
        assert_eq!(
            r(Method::POST, "/api/hubs/ChatHub/users/ana%20b/:send").ok(),
            Some(Operation::SendUser("ana b".into()))
        );
        assert_eq!(
            r(Method::PUT, "/api/hubs/chathub/groups/a%2Fb/connections/c1").ok(),
            Some(Operation::AddToGroup { group: "a/b".into(), connection: "c1".into() })
        );
        assert_eq!(
            r(Method::DELETE, "/api/hubs/chathub/users/u/groups").ok(),
            Some(Operation::RemoveUserFromAllGroups("u".into()))
        );
        assert_eq!(r(Method::HEAD, "/api/health").ok(), Some(Operation::Health));
        let status = |m: Method, p: &str| r(m, p).err().map(|Answer(s, _)| s.as_u16());
        assert_eq!(status(Method::GET, "/api/hubs/chathub/:send"), Some(405));
        assert_eq!(status(Method::POST, "/api/hubs/other/:send"), Some(404));
        assert_eq!(status(Method::POST, "/api/hubs/chathub/nope"), Some(404));
        assert_eq!(status(Method::POST, "/api/hubs/chathub/users/%ZZ/:send"), Some(404));
        assert_eq!(status(Method::POST, "/api/v1/hubs/chathub"), Some(404));
    }

    #[test]
    fn operation_labels_are_distinct() {
        let ops = [
            Operation::Health,
            Operation::SendAll,
            Operation::SendUser(String::new()),
            Operation::SendGroup(String::new()),
            Operation::SendConnection(String::new()),
            Operation::ConnectionExists(String::new()),
            Operation::CloseConnection(String::new()),
            Operation::LeaveAllGroups(String::new()),
            Operation::GroupExists(String::new()),
            Operation::AddToGroup { group: String::new(), connection: String::new() },
            Operation::RemoveFromGroup { group: String::new(), connection: String::new() },
            Operation::UserExists(String::new()),
            Operation::CloseUser(String::new()),
            Operation::UserInGroup { user: String::new(), group: String::new() },
            Operation::AddUserToGroup { user: String::new(), group: String::new() },
            Operation::RemoveUserFromGroup { user: String::new(), group: String::new() },
            Operation::RemoveUserFromAllGroups(String::new()),
            Operation::CloseAll,
            Operation::CloseGroup(String::new()),
        ];
        let labels: std::collections::HashSet<&str> = ops.iter().map(Operation::label).collect();
        assert_eq!(labels.len(), ops.len());
    }
}
