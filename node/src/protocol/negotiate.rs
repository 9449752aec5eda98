//! The negotiate answer. Version 1 carries a secret `connectionToken` the
//! client then sends as `?id=`, beside the public `connectionId`; version 0
//! (what a client that sends no `negotiateVersion` gets) has no token, and
//! the client sends its `connectionId` as `?id=`. So a v0 answer's
//! `connectionId` is the secret token too: the id the hub shows other
//! clients (in events, presence and `GetNodeInfo`) is always the public id,
//! which never opens a transport. A client asking for a newer version than 1
//! gets version 1. Stateful reconnect is offered from version 1 on, as
//! ASP.NET Core does: a client that asked for it (on a node that allows it)
//! sees `"useStatefulReconnect":true`. Never includes
//! `ProtocolVersion`, which clients take for classic ASP.NET SignalR.

use serde::Serialize;
use switchboard_common::token::ConnectionToken;

pub const SERVER_NEGOTIATE_VERSION: u32 = 1;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NegotiateResponse<'a> {
    negotiate_version: u32,
    connection_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_token: Option<&'a str>,
    available_transports: serde_json::Value,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    use_stateful_reconnect: bool,
}

/// Reads `negotiateVersion` from the query value: absent means 0.
pub fn requested_version(value: Option<&str>) -> Result<u32, String> {
    match value {
        None => Ok(0),
        Some(v) => v
            .parse::<u32>()
            .map(|v| v.min(SERVER_NEGOTIATE_VERSION))
            .map_err(|_| "The client requested an invalid protocol version".to_string()),
    }
}

pub fn negotiate_body(version: u32, token: &ConnectionToken, stateful_reconnect: bool) -> String {
    let body = NegotiateResponse {
        negotiate_version: version,
        connection_id: if version >= 1 { &token.connection_id } else { &token.token },
        connection_token: (version >= 1).then_some(token.token.as_str()),
        available_transports: serde_json::json!([
            {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
            {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
            {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
        ]),
        use_stateful_reconnect: stateful_reconnect && version >= 1,
    };
    serde_json::to_string(&body).unwrap_or_default()
}

/// Negotiate errors travel as HTTP 200 with `{"error":"…"}`.
pub fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn version_zero_has_no_token_and_its_connection_id_is_the_secret_not_the_public_id() {
        let t = ConnectionToken::issue("n");
        let v = parse(&negotiate_body(0, &t, true));
        assert_eq!(v["negotiateVersion"], 0);
        assert_eq!(v["connectionId"], t.token.as_str(), "the v0 client's ?id= must be the secret");
        assert_ne!(v["connectionId"], t.connection_id.as_str(), "never the id other clients see");
        assert!(v.get("useStatefulReconnect").is_none(), "stateful reconnect needs negotiate v1");
        assert!(v.get("connectionToken").is_none());
        assert!(v.get("ProtocolVersion").is_none());
        assert_eq!(v["availableTransports"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn version_one_carries_the_token() {
        let t = ConnectionToken::issue("n");
        let v = parse(&negotiate_body(1, &t, false));
        assert_eq!(v["negotiateVersion"], 1);
        assert_eq!(v["connectionToken"], t.token.as_str());
        assert_eq!(v["connectionId"], t.connection_id.as_str());
        assert!(v.get("useStatefulReconnect").is_none());
        let v = parse(&negotiate_body(1, &t, true));
        assert_eq!(v["useStatefulReconnect"], true);
    }

    #[test]
    fn requested_versions() {
        assert_eq!(requested_version(None), Ok(0));
        assert_eq!(requested_version(Some("1")), Ok(1));
        assert_eq!(requested_version(Some("7")), Ok(1));
        assert!(requested_version(Some("x")).is_err());
    }
}
