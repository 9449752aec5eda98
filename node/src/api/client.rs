//! Azure SignalR Service's client endpoint, so a serverless backend can hand
//! out connections: its own negotiate answers `{"url":
//! "<cluster>/client/?hub=chathub", "accessToken": "<jwt>"}`, and the
//! official clients follow it here. `/client/negotiate?hub=…` and
//! `/client/?hub=…` are the hub's endpoints under another name (the
//! transports serve them alike); what differs is who the client is: an
//! access token signed with the server API's access key, whose `aud` is the
//! client URL and whose user is its `nameid` claim (or .NET's long
//! NameIdentifier claim type; a token naming nobody is refused), whatever
//! the hub's own `auth` setting. A
//! connection made here is a full member: a user's address when the token
//! names one, in groups, seen by the server API, closed when the token
//! expires.

use crate::app::App;
use crate::auth::{AuthError, Identity};
use axum::http::{header, HeaderMap};
use std::collections::HashMap;

/// Whether a request's path is the client endpoint's.
pub fn is_client_path(path: &str) -> bool {
    path == "/client" || path.starts_with("/client/")
}

/// Who a client endpoint request is, by its access token (required).
pub fn identify(
    app: &App,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Result<Option<Identity>, AuthError> {
    let Some(key) = &app.api_key else { return Err(AuthError::Invalid("this cluster has no client endpoint".into())) };
    let hub = params.iter().find(|(k, _)| k.eq_ignore_ascii_case("hub")).map(|(_, v)| v.as_str());
    if !hub.is_some_and(|h| h.eq_ignore_ascii_case(super::HUB)) {
        return Err(AuthError::Invalid(format!("the client endpoint serves ?hub={} only", super::HUB)));
    }
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = crate::auth::bearer(authorization, params).ok_or(AuthError::Missing)?;
    let claims = key.client(token, &super::request_urls(app, headers, "/client/")).map_err(AuthError::Invalid)?;
    Ok(Some(Identity { name: claims.user, expires: Some(claims.expires) }))
}
