//! The handshake: the client's first record (always JSON, ended by 0x1E)
//! names the hub protocol and its version; the server answers `{}` or
//! `{"error":"…"}` (never with a `type` field) and, on error, closes. As in
//! the official server, protocol names match case-insensitively and every
//! version up to the server's own is accepted (`IsVersionSupported(v) => v <=
//! Version`): 0 and 1 for plain clients, 2 for clients that asked for stateful
//! reconnect. A binary protocol on a text-only transport is refused with the
//! official wording.

use super::framing::frame;
use super::{HubProtocol, ProtocolError};
use serde::Deserialize;

/// The highest hub protocol version this server speaks, JSON and MessagePack
/// alike (2 adds Ack and Sequence for stateful reconnect).
pub const MAX_VERSION: u32 = 2;

#[derive(Debug, Deserialize, PartialEq, Eq)]
struct Wire {
    protocol: String,
    version: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeRequest {
    pub protocol: HubProtocol,
    pub version: u32,
}

pub fn parse_handshake(record: &[u8]) -> Result<HandshakeRequest, ProtocolError> {
    let req: Wire = serde_json::from_slice(record)
        .map_err(|e| ProtocolError::Handshake(format!("Handshake request is invalid: {e}")))?;
    let name: String = req.protocol.chars().take(64).collect();
    let Some(protocol) = HubProtocol::from_name(&req.protocol) else {
        return Err(ProtocolError::Handshake(format!("The protocol '{name}' is not supported.")));
    };
    if req.version > MAX_VERSION {
        return Err(ProtocolError::Handshake(format!(
            "The server does not support version {} of the '{name}' protocol.",
            req.version
        )));
    }
    Ok(HandshakeRequest { protocol, version: req.version })
}

/// The official refusal of a binary protocol on a text-only transport.
pub fn transfer_format_error(protocol: HubProtocol) -> ProtocolError {
    ProtocolError::Handshake(format!(
        "Cannot use the '{}' protocol on the current transport. The transport does not support 'Binary' transfer format.",
        protocol.name()
    ))
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

    fn parse(text: &str) -> Result<HandshakeRequest, ProtocolError> {
        parse_handshake(text.as_bytes())
    }

    #[test]
    fn every_version_up_to_ours_is_accepted_for_both_protocols() {
        for (name, protocol) in [("json", HubProtocol::Json), ("messagepack", HubProtocol::MessagePack)] {
            for v in 0..=MAX_VERSION {
                let r = parse(&format!("{{\"protocol\":\"{name}\",\"version\":{v}}}")).unwrap();
                assert_eq!(r, HandshakeRequest { protocol, version: v });
            }
        }
        assert_eq!(parse(r#"{"protocol":"MessagePack","version":1}"#).unwrap().protocol, HubProtocol::MessagePack);
        assert_eq!(parse(r#"{"protocol":"JSON","version":1}"#).unwrap().protocol, HubProtocol::Json);
    }

    #[test]
    fn bad_handshakes_explain_themselves() {
        let e = parse(r#"{"protocol":"protobuf","version":1}"#).unwrap_err();
        assert_eq!(e.to_string(), "The protocol 'protobuf' is not supported.");
        let e = parse(r#"{"protocol":"json","version":3}"#).unwrap_err();
        assert_eq!(e.to_string(), "The server does not support version 3 of the 'json' protocol.");
        assert!(parse(r#"{"protocol":"json","version":-1}"#).is_err());
        assert!(parse(r#"{"protocol":"json"}"#).is_err());
        assert!(parse("hello").is_err());
        assert_eq!(
            transfer_format_error(HubProtocol::MessagePack).to_string(),
            "Cannot use the 'messagepack' protocol on the current transport. The transport does not support 'Binary' transfer format."
        );
    }

    #[test]
    fn responses_have_no_type_field() {
        assert_eq!(handshake_response(None), b"{}\x1e");
        assert_eq!(handshake_response(Some("no")), b"{\"error\":\"no\"}\x1e");
    }
}
