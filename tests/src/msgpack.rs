//! The MessagePack hub protocol for the test client, written from
//! HubProtocol.md rather than from the node's code: hub messages in the JSON
//! protocol's object shape (`{"type":1,"target":…}`) are encoded as VarInt-
//! prefixed MessagePack arrays, and incoming arrays are turned back into that
//! shape, so a test asserts the same way whichever protocol it speaks.

use rmpv::Value as Mp;
use serde_json::{json, Map, Value};

pub fn varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        out.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            return;
        }
    }
}

pub fn to_mp(v: &Value) -> Mp {
    match v {
        Value::Null => Mp::Nil,
        Value::Bool(b) => Mp::Boolean(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Mp::from(u),
            (_, Some(i)) => Mp::from(i),
            _ => Mp::F64(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => Mp::from(s.as_str()),
        Value::Array(a) => Mp::Array(a.iter().map(to_mp).collect()),
        Value::Object(o) => Mp::Map(o.iter().map(|(k, v)| (Mp::from(k.as_str()), to_mp(v))).collect()),
    }
}

pub fn to_json(v: &Mp) -> Value {
    match v {
        Mp::Nil => Value::Null,
        Mp::Boolean(b) => json!(b),
        Mp::Integer(i) => i.as_u64().map(|u| json!(u)).or_else(|| i.as_i64().map(|i| json!(i))).unwrap_or(Value::Null),
        Mp::F32(f) => json!(f),
        Mp::F64(f) => json!(f),
        Mp::String(s) => json!(s.as_str().unwrap_or_default()),
        Mp::Binary(b) => json!(b),
        Mp::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Mp::Map(m) => {
            let mut o = Map::new();
            for (k, v) in m {
                o.insert(k.as_str().map(String::from).unwrap_or_else(|| k.to_string()), to_json(v));
            }
            Value::Object(o)
        }
        Mp::Ext(_, d) => json!(d),
    }
}

fn s(v: &Value, k: &str) -> Mp {
    v.get(k).and_then(Value::as_str).map_or(Mp::Nil, Mp::from)
}

/// Encodes a hub message given in the JSON protocol's shape, length prefix included.
pub fn encode(m: &Value) -> Vec<u8> {
    let headers = Mp::Map(vec![]);
    let ty = m["type"].as_u64().unwrap_or(0);
    let array = match ty {
        1 | 4 => {
            vec![Mp::from(ty), headers, s(m, "invocationId"), s(m, "target"), to_mp(&m["arguments"]), Mp::Array(vec![])]
        }
        2 => vec![Mp::from(2), headers, s(m, "invocationId"), to_mp(&m["item"])],
        3 => {
            let mut a = vec![Mp::from(3), headers, s(m, "invocationId")];
            if let Some(e) = m.get("error") {
                a.extend([Mp::from(1), to_mp(e)]);
            } else if let Some(r) = m.get("result") {
                a.extend([Mp::from(3), to_mp(r)]);
            } else {
                a.push(Mp::from(2));
            }
            a
        }
        5 => vec![Mp::from(5), headers, s(m, "invocationId")],
        6 => vec![Mp::from(6)],
        7 => vec![Mp::from(7), s(m, "error"), Mp::Boolean(m["allowReconnect"].as_bool().unwrap_or(false))],
        8 | 9 => vec![Mp::from(ty), to_mp(&m["sequenceId"])],
        other => vec![Mp::from(other)],
    };
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &Mp::Array(array)).expect("encode into a Vec");
    let mut out = Vec::new();
    varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// Turns one decoded message array into the JSON protocol's shape.
pub fn message_to_json(v: &Mp) -> Value {
    let Mp::Array(a) = v else { return json!({ "unparsed": to_json(v) }) };
    let get = |i: usize| a.get(i).map(to_json).unwrap_or(Value::Null);
    let ty = a.first().and_then(Mp::as_u64).unwrap_or(0);
    match ty {
        1 | 4 => {
            let mut o = json!({"type": ty, "target": get(3), "arguments": get(4)});
            if !get(2).is_null() {
                o["invocationId"] = get(2);
            }
            o
        }
        2 => json!({"type": 2, "invocationId": get(2), "item": get(3)}),
        3 => match a.get(3).and_then(Mp::as_u64) {
            Some(1) => json!({"type": 3, "invocationId": get(2), "error": get(4)}),
            Some(3) => json!({"type": 3, "invocationId": get(2), "result": get(4)}),
            _ => json!({"type": 3, "invocationId": get(2)}),
        },
        5 => json!({"type": 5, "invocationId": get(2)}),
        6 => json!({"type": 6}),
        7 => {
            let mut o = json!({"type": 7, "allowReconnect": a.get(2).and_then(Mp::as_bool).unwrap_or(false)});
            if !get(1).is_null() {
                o["error"] = get(1);
            }
            o
        }
        8 | 9 => json!({"type": ty, "sequenceId": get(1)}),
        _ => json!({ "type": ty, "raw": to_json(v) }),
    }
}

/// Splits length-prefixed messages; the incomplete tail stays in `buf`.
pub fn take_messages(buf: &mut Vec<u8>) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let (mut len, mut used) = (0usize, 0usize);
        let mut complete = false;
        for (i, b) in buf.iter().take(5).enumerate() {
            len |= ((b & 0x7f) as usize) << (7 * i);
            used = i + 1;
            if b & 0x80 == 0 {
                complete = true;
                break;
            }
        }
        if !complete || buf.len() < used + len {
            return out;
        }
        let mut payload = &buf[used..used + len];
        let v = rmpv::decode::read_value(&mut payload)
            .map(|v| message_to_json(&v))
            .unwrap_or_else(|e| json!({ "unparsed": e.to_string() }));
        out.push(v);
        buf.drain(..used + len);
    }
}
