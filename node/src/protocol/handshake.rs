//! The handshake: the client's first record names the hub protocol and its
//! version; the server answers `{}` or `{"error":"…"}` (never with a `type`
//! field) and, on error, closes. Only the JSON protocol is spoken for now;
//! versions 1 and 2 are accepted (2 is what clients send when they asked for
//! stateful reconnect; without it negotiated, version 2 behaves like 1).

use super::framing::frame;
use super::ProtocolError;
use serde::Deserialize;

pub const SUPPORTED_PROTOCOL: &str = "json";
pub const MAX_VERSION: u32 = 2;

#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct HandshakeRequest {
    pub protocol: String,
    pub version: u32,
}

pub fn parse_handshake(record: &[u8]) -> Result<HandshakeRequest, ProtocolError> {
    let req: HandshakeRequest = serde_json::from_slice(record)
        .map_err(|e| ProtocolError::Handshake(format!("Handshake request is invalid: {e}")))?;
    if req.protocol != SUPPORTED_PROTOCOL {
        return Err(ProtocolError::Handshake(format!(
            "The protocol '{}' is not supported.",
            req.protocol.chars().take(64).collect::<String>()
        )));
    }
    if req.version == 0 || req.version > MAX_VERSION {
        return Err(ProtocolError::Handshake(format!(
            "The server does not support version {} of the '{}' protocol.",
            req.version, req.protocol
        )));
    }
    Ok(req)
}

/// `{}` + 0x1E on success, `{"error":"…"}` + 0x1E on failure.
pub fn handshake_response(error: Option<&str>) -> Vec<u8> {
    let body = match error {
        None => b"{}".to_vec(),
        Some(e) => serde_json::to_vec(&serde_json::json!({ "error": e })).unwrap_or_default(),
    };
    frame(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_v1_and_v2_are_accepted() {
        for v in [1, 2] {
            let r = parse_handshake(format!("{{\"protocol\":\"json\",\"version\":{v}}}").as_bytes());
            assert_eq!(r.unwrap().version, v);
        }
    }

    #[test]
    fn bad_handshakes_explain_themselves() {
        let e = parse_handshake(br#"{"protocol":"messagepack","version":1}"#).unwrap_err();
        assert_eq!(e.to_string(), "The protocol 'messagepack' is not supported.");
        assert!(parse_handshake(br#"{"protocol":"json","version":9}"#).is_err());
        assert!(parse_handshake(br#"{"protocol":"json"}"#).is_err());
        assert!(parse_handshake(b"hello").is_err());
    }

    #[test]
    fn responses_have_no_type_field() {
        assert_eq!(handshake_response(None), b"{}\x1e");
        assert_eq!(handshake_response(Some("no")), b"{\"error\":\"no\"}\x1e");
    }
}
