//! The JSON hub protocol: one JSON object per record, its `type` field
//! choosing among Invocation (1), StreamItem (2), Completion (3),
//! StreamInvocation (4), CancelInvocation (5), Ping (6), Close (7), Ack (8) and
//! Sequence (9). An optional `headers` object is accepted and ignored. Unknown
//! types parse to `Unknown` so the hub can ignore them, as the spec asks of
//! forward-compatible peers. Writing always appends the record separator.

use super::framing::frame;
use super::ProtocolError;
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum HubMessage {
    Invocation {
        invocation_id: Option<String>,
        target: String,
        arguments: Vec<Value>,
    },
    /// An invocation that also opens client-to-server streams; the chat hub
    /// has no streaming parameters, so it is answered with an error.
    InvocationWithStreams {
        invocation_id: Option<String>,
        target: String,
        streams: usize,
    },
    StreamItem {
        invocation_id: String,
        item: Value,
    },
    Completion {
        invocation_id: String,
        /// `Some(Value::Null)` writes `"result":null`; `None` writes no result.
        result: Option<Value>,
        error: Option<String>,
    },
    StreamInvocation {
        invocation_id: String,
        target: String,
        arguments: Vec<Value>,
    },
    CancelInvocation {
        invocation_id: String,
    },
    Ping,
    Close {
        error: Option<String>,
        allow_reconnect: bool,
    },
    Ack {
        sequence_id: u64,
    },
    Sequence {
        sequence_id: u64,
    },
    Unknown(i64),
}

fn invalid(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidMessage(msg.into())
}

fn string_field(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, ProtocolError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(format!("'{name}' must be a string"))),
    }
}

fn required_string(obj: &Map<String, Value>, name: &str) -> Result<String, ProtocolError> {
    string_field(obj, name)?.ok_or_else(|| invalid(format!("missing required property '{name}'")))
}

fn arguments(obj: &mut Map<String, Value>) -> Result<Vec<Value>, ProtocolError> {
    match obj.remove("arguments") {
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(invalid("'arguments' must be an array")),
        None => Err(invalid("missing required property 'arguments'")),
    }
}

fn sequence_id(obj: &Map<String, Value>) -> Result<u64, ProtocolError> {
    obj.get("sequenceId").and_then(Value::as_u64).ok_or_else(|| invalid("'sequenceId' must be a non-negative integer"))
}

/// Parses one record (without its separator).
pub fn parse_message(record: &[u8]) -> Result<HubMessage, ProtocolError> {
    let value: Value = serde_json::from_slice(record).map_err(|e| ProtocolError::InvalidJson(e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(invalid("message is not a JSON object"));
    };
    if let Some(h) = obj.get("headers") {
        if !h.is_object() && !h.is_null() {
            return Err(invalid("'headers' must be an object"));
        }
    }
    let ty = obj.get("type").and_then(Value::as_i64).ok_or_else(|| invalid("missing or non-integer 'type'"))?;
    Ok(match ty {
        1 => {
            let streams = match obj.get("streamIds") {
                None | Some(Value::Null) => 0,
                Some(Value::Array(a)) if a.iter().all(Value::is_string) => a.len(),
                Some(_) => return Err(invalid("'streamIds' must be an array of strings")),
            };
            if streams > 0 {
                return Ok(HubMessage::InvocationWithStreams {
                    invocation_id: string_field(&obj, "invocationId")?,
                    target: required_string(&obj, "target")?,
                    streams,
                });
            }
            HubMessage::Invocation {
                invocation_id: string_field(&obj, "invocationId")?,
                target: required_string(&obj, "target")?,
                arguments: arguments(&mut obj)?,
            }
        }
        2 => HubMessage::StreamItem {
            invocation_id: required_string(&obj, "invocationId")?,
            item: obj.remove("item").unwrap_or(Value::Null),
        },
        3 => {
            let error = string_field(&obj, "error")?;
            let result = obj.remove("result");
            if error.is_some() && result.is_some() {
                return Err(invalid("a completion has either 'result' or 'error', not both"));
            }
            HubMessage::Completion { invocation_id: required_string(&obj, "invocationId")?, result, error }
        }
        4 => HubMessage::StreamInvocation {
            invocation_id: required_string(&obj, "invocationId")?,
            target: required_string(&obj, "target")?,
            arguments: arguments(&mut obj)?,
        },
        5 => HubMessage::CancelInvocation { invocation_id: required_string(&obj, "invocationId")? },
        6 => HubMessage::Ping,
        7 => HubMessage::Close {
            error: string_field(&obj, "error")?,
            allow_reconnect: obj.get("allowReconnect").and_then(Value::as_bool).unwrap_or(false),
        },
        8 => HubMessage::Ack { sequence_id: sequence_id(&obj)? },
        9 => HubMessage::Sequence { sequence_id: sequence_id(&obj)? },
        other => HubMessage::Unknown(other),
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Wire<'a> {
    #[serde(rename = "type")]
    ty: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    invocation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a [Value]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_reconnect: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence_id: Option<u64>,
}

impl Wire<'_> {
    fn of(ty: u8) -> Self {
        Wire {
            ty,
            invocation_id: None,
            target: None,
            arguments: None,
            item: None,
            result: None,
            error: None,
            allow_reconnect: None,
            sequence_id: None,
        }
    }
}

impl HubMessage {
    /// Serializes to one record, separator included.
    pub fn to_record(&self) -> Vec<u8> {
        let wire = match self {
            HubMessage::Invocation { invocation_id, target, arguments } => Wire {
                invocation_id: invocation_id.as_deref(),
                target: Some(target),
                arguments: Some(arguments),
                ..Wire::of(1)
            },
            HubMessage::InvocationWithStreams { invocation_id, target, .. } => Wire {
                invocation_id: invocation_id.as_deref(),
                target: Some(target),
                arguments: Some(&[]),
                ..Wire::of(1)
            },
            HubMessage::StreamItem { invocation_id, item } => {
                Wire { invocation_id: Some(invocation_id), item: Some(item), ..Wire::of(2) }
            }
            HubMessage::Completion { invocation_id, result, error } => Wire {
                invocation_id: Some(invocation_id),
                // The spec forbids both; an error wins.
                result: if error.is_some() { None } else { result.as_ref() },
                error: error.as_deref(),
                ..Wire::of(3)
            },
            HubMessage::StreamInvocation { invocation_id, target, arguments } => Wire {
                invocation_id: Some(invocation_id),
                target: Some(target),
                arguments: Some(arguments),
                ..Wire::of(4)
            },
            HubMessage::CancelInvocation { invocation_id } => {
                Wire { invocation_id: Some(invocation_id), ..Wire::of(5) }
            }
            HubMessage::Ping => Wire::of(6),
            HubMessage::Close { error, allow_reconnect } => {
                Wire { error: error.as_deref(), allow_reconnect: allow_reconnect.then_some(true), ..Wire::of(7) }
            }
            HubMessage::Ack { sequence_id } => Wire { sequence_id: Some(*sequence_id), ..Wire::of(8) },
            HubMessage::Sequence { sequence_id } => Wire { sequence_id: Some(*sequence_id), ..Wire::of(9) },
            HubMessage::Unknown(_) => Wire::of(0),
        };
        frame(serde_json::to_vec(&wire).unwrap_or_default())
    }

    /// Whether stateful reconnect numbers this message (and buffers it until
    /// acknowledged): invocations, stream items, completions and cancels, the
    /// official `HubInvocationMessage` types; not Ping, Close, Ack or Sequence.
    pub fn is_sequenced(&self) -> bool {
        matches!(
            self,
            HubMessage::Invocation { .. }
                | HubMessage::InvocationWithStreams { .. }
                | HubMessage::StreamItem { .. }
                | HubMessage::Completion { .. }
                | HubMessage::StreamInvocation { .. }
                | HubMessage::CancelInvocation { .. }
        )
    }

    /// A server-to-client invocation with no reply expected.
    pub fn event(target: &str, arguments: Vec<Value>) -> Self {
        HubMessage::Invocation { invocation_id: None, target: target.to_string(), arguments }
    }
}

/// One message of every kind the server sends or parses, for the round-trip
/// tests of both protocols.
#[cfg(test)]
pub fn every_kind() -> Vec<HubMessage> {
    use serde_json::json;
    vec![
        HubMessage::event("ReceiveMessage", vec![json!("u"), json!({"nested": [1, -2, 2.5, null, true]})]),
        HubMessage::Invocation { invocation_id: Some("3".into()), target: "Echo".into(), arguments: vec![] },
        HubMessage::StreamItem { invocation_id: "1".into(), item: json!(5) },
        HubMessage::Completion { invocation_id: "1".into(), result: Some(json!([1])), error: None },
        HubMessage::Completion { invocation_id: "1".into(), result: Some(serde_json::Value::Null), error: None },
        HubMessage::Completion { invocation_id: "1".into(), result: None, error: Some("bad".into()) },
        HubMessage::Completion { invocation_id: "1".into(), result: None, error: None },
        HubMessage::StreamInvocation { invocation_id: "2".into(), target: "S".into(), arguments: vec![] },
        HubMessage::CancelInvocation { invocation_id: "2".into() },
        HubMessage::Ping,
        HubMessage::Close { error: Some("e".into()), allow_reconnect: true },
        HubMessage::Close { error: None, allow_reconnect: false },
        HubMessage::Ack { sequence_id: 3 },
        HubMessage::Sequence { sequence_id: 1 << 40 },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(m: &HubMessage) -> String {
        String::from_utf8(m.to_record()).unwrap()
    }

    #[test]
    fn invocation_with_and_without_id() {
        let m =
            parse_message(br#"{"type":1,"invocationId":"7","target":"Echo","arguments":["x"],"headers":{"a":"b"}}"#)
                .unwrap();
        assert_eq!(
            m,
            HubMessage::Invocation {
                invocation_id: Some("7".into()),
                target: "Echo".into(),
                arguments: vec![json!("x")]
            }
        );
        let m = parse_message(br#"{"type":1,"target":"SendMessage","arguments":[]}"#).unwrap();
        assert!(matches!(m, HubMessage::Invocation { invocation_id: None, .. }));
    }

    #[test]
    fn every_type_round_trips() {
        for m in every_kind() {
            let rec = m.to_record();
            assert_eq!(rec.last(), Some(&0x1e));
            assert_eq!(parse_message(&rec[..rec.len() - 1]).unwrap(), m, "{}", text(&m));
        }
    }

    #[test]
    fn wire_shapes_match_the_spec() {
        assert_eq!(text(&HubMessage::Ping), "{\"type\":6}\u{1e}");
        assert_eq!(
            text(&HubMessage::Close { error: None, allow_reconnect: true }),
            "{\"type\":7,\"allowReconnect\":true}\u{1e}"
        );
        let c = HubMessage::Completion { invocation_id: "1".into(), result: Some(Value::Null), error: None };
        assert_eq!(text(&c), "{\"type\":3,\"invocationId\":\"1\",\"result\":null}\u{1e}");
    }

    #[test]
    fn invocations_that_open_streams_are_recognised() {
        let m = parse_message(br#"{"type":1,"invocationId":"1","target":"Up","arguments":[],"streamIds":["a","b"]}"#)
            .unwrap();
        assert_eq!(
            m,
            HubMessage::InvocationWithStreams { invocation_id: Some("1".into()), target: "Up".into(), streams: 2 }
        );
        let m = parse_message(br#"{"type":1,"target":"Up","arguments":[],"streamIds":[]}"#).unwrap();
        assert!(matches!(m, HubMessage::Invocation { .. }));
        assert!(parse_message(br#"{"type":1,"target":"Up","arguments":[],"streamIds":[1]}"#).is_err());
    }

    #[test]
    fn unknown_types_are_not_errors() {
        assert_eq!(parse_message(br#"{"type":99}"#).unwrap(), HubMessage::Unknown(99));
    }

    #[test]
    fn malformed_messages_are_errors() {
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"target":"x"}"#,
            br#"{"type":"1"}"#,
            br#"{"type":1,"arguments":[]}"#,
            br#"{"type":1,"target":"x"}"#,
            br#"{"type":1,"target":"x","arguments":{}}"#,
            br#"{"type":1,"target":5,"arguments":[]}"#,
            br#"{"type":1,"target":"x","arguments":[],"headers":3}"#,
            br#"{"type":3,"invocationId":"1","result":1,"error":"e"}"#,
            br#"{"type":8,"sequenceId":-1}"#,
        ] {
            assert!(parse_message(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
