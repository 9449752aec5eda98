//! The MessagePack hub protocol (HubProtocol.md, "MessagePack Encoding"):
//! each message is one MessagePack array whose first element is the message
//! type, framed by a VarInt length (see `framing`). Decoding and encoding use
//! the `rmpv` crate; this module only maps the arrays to and from `HubMessage`:
//!
//! - Invocation `[1, Headers, InvocationId|nil, Target, [Arguments], [StreamIds]?]`
//! - StreamItem `[2, Headers, InvocationId, Item]`
//! - Completion `[3, Headers, InvocationId, ResultKind, Result?]` (1 error, 2 void, 3 result)
//! - StreamInvocation `[4, Headers, InvocationId, Target, [Arguments], [StreamIds]?]`
//! - CancelInvocation `[5, Headers, InvocationId]`, Ping `[6]`
//! - Close `[7, Error|nil, AllowReconnect?]`, Ack `[8, SequenceId]`, Sequence `[9, SequenceId]`
//!
//! Hub arguments are JSON values inside the node (that is what the backplane
//! carries); MessagePack binary becomes a base64 string, as .NET would
//! serialize a `byte[]` to JSON, and map keys that are not strings are
//! written out as text.

use super::framing::write_varint;
use super::{HubMessage, ProtocolError};
use base64::Engine;
use rmpv::Value as Mp;
use serde_json::{Map, Number, Value as Json};

/// Nesting deeper than this is refused instead of recursing further.
const MAX_DEPTH: usize = 100;

fn invalid(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidMessage(msg.into())
}

/// A MessagePack value as the JSON value the hub works with.
pub fn to_json(v: Mp) -> Json {
    match v {
        Mp::Nil => Json::Null,
        Mp::Boolean(b) => Json::Bool(b),
        Mp::Integer(i) => {
            if let Some(n) = i.as_u64() {
                Json::Number(n.into())
            } else if let Some(n) = i.as_i64() {
                Json::Number(n.into())
            } else {
                Json::Null
            }
        }
        Mp::F32(f) => Number::from_f64(f64::from(f)).map_or(Json::Null, Json::Number),
        Mp::F64(f) => Number::from_f64(f).map_or(Json::Null, Json::Number),
        Mp::String(s) => match s.into_str() {
            Some(s) => Json::String(s),
            None => Json::Null,
        },
        Mp::Binary(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Mp::Array(a) => Json::Array(a.into_iter().map(to_json).collect()),
        Mp::Map(m) => {
            let mut out = Map::with_capacity(m.len());
            for (k, v) in m {
                let key = match k {
                    Mp::String(s) => s.into_str().unwrap_or_default(),
                    other => other.to_string(),
                };
                out.insert(key, to_json(v));
            }
            Json::Object(out)
        }
        Mp::Ext(_, data) => Json::String(base64::engine::general_purpose::STANDARD.encode(data)),
    }
}

/// A JSON value as MessagePack.
pub fn from_json(v: &Json) -> Mp {
    match v {
        Json::Null => Mp::Nil,
        Json::Bool(b) => Mp::Boolean(*b),
        Json::Number(n) => {
            if let Some(u) = n.as_u64() {
                Mp::from(u)
            } else if let Some(i) = n.as_i64() {
                Mp::from(i)
            } else {
                Mp::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Json::String(s) => Mp::from(s.as_str()),
        Json::Array(a) => Mp::Array(a.iter().map(from_json).collect()),
        Json::Object(o) => Mp::Map(o.iter().map(|(k, v)| (Mp::from(k.as_str()), from_json(v))).collect()),
    }
}

fn string(v: &Mp, name: &str) -> Result<String, ProtocolError> {
    match v {
        Mp::String(s) => s.as_str().map(str::to_string).ok_or_else(|| invalid(format!("'{name}' is not valid UTF-8"))),
        _ => Err(invalid(format!("Reading '{name}' as String failed."))),
    }
}

fn optional_string(v: &Mp, name: &str) -> Result<Option<String>, ProtocolError> {
    match v {
        Mp::Nil => Ok(None),
        other => string(other, name).map(Some),
    }
}

fn sequence_id(v: Option<&Mp>) -> Result<u64, ProtocolError> {
    v.and_then(Mp::as_u64).ok_or_else(|| invalid("'sequenceId' must be a non-negative integer"))
}

fn headers(v: Option<&Mp>) -> Result<(), ProtocolError> {
    match v {
        None => Err(invalid("missing headers")),
        Some(Mp::Map(_) | Mp::Nil) => Ok(()),
        Some(_) => Err(invalid("headers must be a map")),
    }
}

/// Field `i`, or an error naming it.
fn field<'a>(items: &'a [Mp], i: usize, name: &str) -> Result<&'a Mp, ProtocolError> {
    items.get(i).ok_or_else(|| invalid(format!("missing '{name}'")))
}

fn arguments(items: &mut [Mp], i: usize) -> Result<Vec<Json>, ProtocolError> {
    match items.get_mut(i) {
        Some(Mp::Array(a)) => Ok(std::mem::take(a).into_iter().map(to_json).collect()),
        Some(_) => Err(invalid("arguments must be an array")),
        None => Err(invalid("missing 'arguments'")),
    }
}

/// How many client-to-server streams the invocation opens.
fn streams(items: &[Mp], i: usize) -> Result<usize, ProtocolError> {
    match items.get(i) {
        None | Some(Mp::Nil) => Ok(0),
        Some(Mp::Array(a)) if a.iter().all(Mp::is_str) => Ok(a.len()),
        Some(_) => Err(invalid("stream ids must be an array of strings")),
    }
}

/// Parses one message (the bytes after its length prefix).
pub fn parse_message(payload: &[u8]) -> Result<HubMessage, ProtocolError> {
    let mut rd = payload;
    let value = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH)
        .map_err(|e| invalid(format!("malformed MessagePack: {e}")))?;
    let Mp::Array(mut items) = value else {
        return Err(invalid("a message is not a MessagePack array"));
    };
    let ty = items.first().and_then(Mp::as_i64).ok_or_else(|| invalid("missing or non-integer message type"))?;
    let len = items.len();
    Ok(match ty {
        1 | 4 => {
            headers(items.get(1))?;
            let id = field(&items, 2, "invocationId")?;
            let id = if ty == 1 { optional_string(id, "invocationId")? } else { Some(string(id, "invocationId")?) };
            let target = string(field(&items, 3, "target")?, "target")?;
            let arguments = arguments(&mut items, 4)?;
            let streams = streams(&items, 5)?;
            if ty == 1 && streams > 0 {
                return Ok(HubMessage::InvocationWithStreams { invocation_id: id, target, streams });
            }
            match (ty, id) {
                (1, invocation_id) => HubMessage::Invocation { invocation_id, target, arguments },
                (_, id) => HubMessage::StreamInvocation { invocation_id: id.unwrap_or_default(), target, arguments },
            }
        }
        2 => {
            headers(items.get(1))?;
            let invocation_id = string(field(&items, 2, "invocationId")?, "invocationId")?;
            let item = items
                .get_mut(3)
                .map(|v| to_json(std::mem::replace(v, Mp::Nil)))
                .ok_or_else(|| invalid("missing 'item'"))?;
            HubMessage::StreamItem { invocation_id, item }
        }
        3 => {
            headers(items.get(1))?;
            let invocation_id = string(field(&items, 2, "invocationId")?, "invocationId")?;
            let kind = field(&items, 3, "resultKind")?.as_u64();
            match kind {
                Some(1) => HubMessage::Completion {
                    invocation_id,
                    result: None,
                    error: Some(string(field(&items, 4, "error")?, "error")?),
                },
                Some(2) => HubMessage::Completion { invocation_id, result: None, error: None },
                Some(3) if len > 4 => {
                    let result = to_json(std::mem::replace(&mut items[4], Mp::Nil));
                    HubMessage::Completion { invocation_id, result: Some(result), error: None }
                }
                _ => return Err(invalid("invalid completion result kind")),
            }
        }
        5 => {
            headers(items.get(1))?;
            HubMessage::CancelInvocation { invocation_id: string(field(&items, 2, "invocationId")?, "invocationId")? }
        }
        6 => HubMessage::Ping,
        7 => HubMessage::Close {
            error: optional_string(field(&items, 1, "error")?, "error")?,
            allow_reconnect: items.get(2).and_then(Mp::as_bool).unwrap_or(false),
        },
        8 => HubMessage::Ack { sequence_id: sequence_id(items.get(1))? },
        9 => HubMessage::Sequence { sequence_id: sequence_id(items.get(1))? },
        other => HubMessage::Unknown(other),
    })
}

fn no_headers() -> Mp {
    Mp::Map(Vec::new())
}

fn id_value(id: &Option<String>) -> Mp {
    id.as_deref().map_or(Mp::Nil, Mp::from)
}

/// Serializes one message with its VarInt length prefix.
pub fn to_frame(m: &HubMessage) -> Vec<u8> {
    let array = match m {
        HubMessage::Invocation { invocation_id, target, arguments } => vec![
            Mp::from(1),
            no_headers(),
            id_value(invocation_id),
            Mp::from(target.as_str()),
            Mp::Array(arguments.iter().map(from_json).collect()),
            Mp::Array(Vec::new()),
        ],
        HubMessage::InvocationWithStreams { invocation_id, target, .. } => {
            vec![Mp::from(1), no_headers(), id_value(invocation_id), Mp::from(target.as_str()), Mp::Array(Vec::new())]
        }
        HubMessage::StreamItem { invocation_id, item } => {
            vec![Mp::from(2), no_headers(), Mp::from(invocation_id.as_str()), from_json(item)]
        }
        HubMessage::Completion { invocation_id, result, error } => {
            let mut a = vec![Mp::from(3), no_headers(), Mp::from(invocation_id.as_str())];
            match (error, result) {
                (Some(e), _) => a.extend([Mp::from(1), Mp::from(e.as_str())]),
                (None, None) => a.push(Mp::from(2)),
                (None, Some(r)) => a.extend([Mp::from(3), from_json(r)]),
            }
            a
        }
        HubMessage::StreamInvocation { invocation_id, target, arguments } => vec![
            Mp::from(4),
            no_headers(),
            Mp::from(invocation_id.as_str()),
            Mp::from(target.as_str()),
            Mp::Array(arguments.iter().map(from_json).collect()),
            Mp::Array(Vec::new()),
        ],
        HubMessage::CancelInvocation { invocation_id } => {
            vec![Mp::from(5), no_headers(), Mp::from(invocation_id.as_str())]
        }
        HubMessage::Ping => vec![Mp::from(6)],
        HubMessage::Close { error, allow_reconnect } => {
            vec![Mp::from(7), id_value(error), Mp::Boolean(*allow_reconnect)]
        }
        HubMessage::Ack { sequence_id } => vec![Mp::from(8), Mp::from(*sequence_id)],
        HubMessage::Sequence { sequence_id } => vec![Mp::from(9), Mp::from(*sequence_id)],
        HubMessage::Unknown(t) => vec![Mp::from(*t)],
    };
    let mut body = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut body, &Mp::Array(array));
    let mut out = Vec::with_capacity(body.len() + 5);
    write_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::framing::{Framing, RecordReader};
    use serde_json::json;

    fn unframe(frame: &[u8]) -> Vec<u8> {
        let mut r = RecordReader::new(1 << 20);
        r.set_framing(Framing::LengthPrefixed);
        r.feed(frame);
        let rec = r.next_record().unwrap().expect("one whole record");
        assert_eq!(r.next_record().unwrap(), None);
        rec
    }

    fn encode(v: Mp) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &v).unwrap();
        out
    }

    #[test]
    fn every_type_round_trips() {
        for m in super::super::messages::every_kind() {
            assert_eq!(parse_message(&unframe(&to_frame(&m))).unwrap(), m, "{m:?}");
        }
    }

    #[test]
    fn wire_shapes_match_the_spec() {
        // The spec's own examples.
        assert_eq!(to_frame(&HubMessage::Ping), vec![0x02, 0x91, 0x06]);
        let c = HubMessage::Completion { invocation_id: "xyz".into(), result: None, error: None };
        assert_eq!(to_frame(&c), vec![0x08, 0x94, 0x03, 0x80, 0xa3, b'x', b'y', b'z', 0x02]);
        let m = parse_message(&[
            0x95, 0x01, 0x80, 0xa3, b'x', b'y', b'z', 0xa6, b'm', b'e', b't', b'h', b'o', b'd', 0x91, 0x2a,
        ])
        .unwrap();
        assert_eq!(
            m,
            HubMessage::Invocation {
                invocation_id: Some("xyz".into()),
                target: "method".into(),
                arguments: vec![json!(42)]
            }
        );
    }

    #[test]
    fn binary_and_odd_keys_become_json() {
        let v = Mp::Map(vec![(Mp::from(1), Mp::Binary(vec![1, 2, 3])), (Mp::from("k"), Mp::F32(0.5))]);
        assert_eq!(to_json(v), json!({"1": "AQID", "k": 0.5}));
    }

    #[test]
    fn unknown_types_are_not_errors() {
        assert_eq!(parse_message(&encode(Mp::Array(vec![Mp::from(99)]))).unwrap(), HubMessage::Unknown(99));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let s = |t: &str| Mp::from(t);
        let args = || Mp::Array(vec![]);
        let bad = vec![
            encode(Mp::from(1)),                                                                 // not an array
            encode(Mp::Array(vec![])),                                                           // no type
            encode(Mp::Array(vec![s("1")])),                                                     // type not an integer
            encode(Mp::Array(vec![Mp::from(1), Mp::Map(vec![]), Mp::Nil, Mp::from(5), args()])), // target not a string
            encode(Mp::Array(vec![Mp::from(1), Mp::Map(vec![]), Mp::Nil, s("x")])),              // no arguments
            encode(Mp::Array(vec![Mp::from(1), Mp::Map(vec![]), Mp::Nil, s("x"), Mp::Map(vec![])])), // arguments not an array
            encode(Mp::Array(vec![Mp::from(1), Mp::from(3), Mp::Nil, s("x"), args()])), // headers not a map
            encode(Mp::Array(vec![
                Mp::from(1),
                Mp::Map(vec![]),
                Mp::Nil,
                s("x"),
                args(),
                Mp::Array(vec![Mp::from(1)]),
            ])),
            encode(Mp::Array(vec![Mp::from(3), Mp::Map(vec![]), s("1"), Mp::from(7)])), // bad result kind
            encode(Mp::Array(vec![Mp::from(3), Mp::Map(vec![]), s("1"), Mp::from(3)])), // result missing
            encode(Mp::Array(vec![Mp::from(8), Mp::from(-1)])),                         // negative ack
            encode(Mp::Array(vec![Mp::from(9)])),                                       // sequence without id
            vec![0x95, 0x01],                                                           // truncated
            vec![0xc1],                                                                 // reserved marker
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],                                         // 4 G elements, no data
            vec![0x91; 1000],                                                           // nested too deep
        ];
        for b in bad {
            assert!(parse_message(&b).is_err(), "{b:02x?}");
        }
    }
}
