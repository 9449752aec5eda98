//! The node registry as stored in Redis: one hash per node at
//! `{prefix}:nodes:{nodeId}` (refreshed on every heartbeat, with a TTL so a node
//! that dies silently disappears), an index of the node ids at
//! `{prefix}:nodes` (a sorted set scored by each hash's expiry, Unix ms), and
//! announcements on `{prefix}:registry` so the balancer reacts within
//! milliseconds. Readers take the ids from the index and read each hash: a
//! keyed read, which a Redis Cluster routes to the slot's owner and
//! redirects after a failover, where a SCAN for `{prefix}:nodes:*` would
//! walk the whole keyspace and, in a cluster, answer nothing from a member
//! that no longer owns the slot. The hashes stay the truth: an id whose hash
//! expired is skipped, and writers prune ids long expired. Records read back
//! from Redis are untrusted input: parsing rejects a record with missing or
//! malformed fields instead of guessing.

use crate::redis_target::RedisConn;
use chrono::{DateTime, SecondsFormat, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const DEFAULT_PREFIX: &str = "switchboard";

pub fn node_key(prefix: &str, node_id: &str) -> String {
    format!("{prefix}:nodes:{node_id}")
}

/// The index of node ids (see the module's doc).
pub fn index_key(prefix: &str) -> String {
    format!("{prefix}:nodes")
}

/// How long past its expiry (by the writer's clock) an id stays in the
/// index: readers skip it as soon as its hash is gone, so this only bounds
/// the index, generously, for clocks that disagree.
pub const INDEX_SLACK_MS: i64 = 60_000;

pub fn registry_channel(prefix: &str) -> String {
    format!("{prefix}:registry")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Healthy,
    Draining,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Healthy => "healthy",
            NodeStatus::Draining => "draining",
        }
    }
}

/// One node's registry hash.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub node_id: String,
    pub name: String,
    pub description: String,
    /// Base URL the balancer dials, e.g. `http://node-1:5000`.
    pub url: String,
    pub status: NodeStatus,
    pub connections: u64,
    pub last_seen: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub version: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecordError {
    #[error("field {0} is missing")]
    Missing(&'static str),
    #[error("field {field} is invalid: {value:?}")]
    Invalid { field: &'static str, value: String },
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl NodeRecord {
    /// Field/value pairs for `HSET`.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("nodeId", self.node_id.clone()),
            ("name", self.name.clone()),
            ("description", self.description.clone()),
            ("url", self.url.clone()),
            ("status", self.status.as_str().to_string()),
            ("connections", self.connections.to_string()),
            ("lastSeen", rfc3339(self.last_seen)),
            ("startedAt", rfc3339(self.started_at)),
            ("version", self.version.clone()),
        ]
    }

    /// Parses an `HGETALL` result. Unknown extra fields are ignored so newer
    /// nodes can add fields without breaking older balancers.
    pub fn from_fields(fields: &HashMap<String, String>) -> Result<Self, RecordError> {
        let get = |name: &'static str| fields.get(name).ok_or(RecordError::Missing(name));
        let invalid =
            |field: &'static str, value: &str| RecordError::Invalid { field, value: value.chars().take(64).collect() };
        let time = |name: &'static str| -> Result<DateTime<Utc>, RecordError> {
            let v = get(name)?;
            DateTime::parse_from_rfc3339(v).map(|t| t.with_timezone(&Utc)).map_err(|_| invalid(name, v))
        };
        let node_id = get("nodeId")?.clone();
        if node_id.is_empty() {
            return Err(invalid("nodeId", ""));
        }
        let url = get("url")?.clone();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid("url", &url));
        }
        let status = match get("status")?.as_str() {
            "healthy" => NodeStatus::Healthy,
            "draining" => NodeStatus::Draining,
            other => return Err(invalid("status", other)),
        };
        let conns = get("connections")?;
        Ok(NodeRecord {
            name: fields.get("name").cloned().unwrap_or_else(|| node_id.clone()),
            description: fields.get("description").cloned().unwrap_or_default(),
            node_id,
            url,
            status,
            connections: conns.parse().map_err(|_| invalid("connections", conns))?,
            last_seen: time("lastSeen")?,
            started_at: time("startedAt")?,
            version: fields.get("version").cloned().unwrap_or_default(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryEventKind {
    Up,
    Draining,
    Down,
}

/// An announcement on the registry channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryEvent {
    pub event: RegistryEventKind,
    pub node_id: String,
}

impl RegistryEvent {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn parse(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

/// Adds to `pipe` what (re)registers `record` for `ttl_ms` from `now_ms`
/// (Unix ms): its hash with that TTL, its id in the index scored by the
/// hash's expiry, and the pruning of ids long expired.
pub fn write_record(pipe: &mut redis::Pipeline, prefix: &str, record: &NodeRecord, ttl_ms: i64, now_ms: i64) {
    let (key, index) = (node_key(prefix, &record.node_id), index_key(prefix));
    pipe.hset_multiple(&key, &record.to_fields())
        .ignore()
        .pexpire(&key, ttl_ms)
        .ignore()
        .zadd(&index, &record.node_id, now_ms + ttl_ms)
        .ignore()
        .zrembyscore(&index, "-inf", now_ms - INDEX_SLACK_MS)
        .ignore();
}

/// Every well-formed record under `prefix`: the index's ids, each hash read
/// in one pipeline. Ids whose hash expired, malformed entries and keys of
/// the wrong type are skipped: they are garbage under our prefix, not an
/// outage. Sorted by node id.
pub async fn read_all(conn: &mut RedisConn, prefix: &str) -> redis::RedisResult<Vec<NodeRecord>> {
    let ids: Vec<String> = conn.zrange(index_key(prefix), 0, -1).await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    // A key of another type answers WRONGTYPE in its place; that entry is
    // garbage, the rest of the read stands.
    pipe.ignore_errors();
    for id in &ids {
        pipe.hgetall(node_key(prefix, id));
    }
    let answers: Vec<redis::RedisResult<HashMap<String, String>>> = pipe.query_async(conn).await?;
    let mut records = Vec::with_capacity(ids.len());
    for answer in answers {
        let fields = match answer {
            Ok(fields) => fields,
            Err(e) if e.code() == Some("WRONGTYPE") => continue,
            Err(e) => return Err(e),
        };
        if let Ok(r) = NodeRecord::from_fields(&fields) {
            records.push(r);
        }
    }
    records.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeRecord {
        let t = DateTime::parse_from_rfc3339("2026-11-22T10:00:00.123Z").unwrap().with_timezone(&Utc);
        NodeRecord {
            node_id: "n1".into(),
            name: "Node n1".into(),
            description: "chat node".into(),
            url: "http://n1:5000".into(),
            status: NodeStatus::Draining,
            connections: 42,
            last_seen: t,
            started_at: t,
            version: "0.1.0".into(),
        }
    }

    fn as_map(r: &NodeRecord) -> HashMap<String, String> {
        r.to_fields().into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn record_round_trips_through_hash_fields() {
        let r = sample();
        assert_eq!(NodeRecord::from_fields(&as_map(&r)).unwrap(), r);
    }

    #[test]
    fn garbage_records_are_rejected() {
        let mut m = as_map(&sample());
        m.insert("connections".into(), "-1".into());
        assert!(matches!(NodeRecord::from_fields(&m), Err(RecordError::Invalid { .. })));
        let mut m = as_map(&sample());
        m.insert("url".into(), "javascript:alert(1)".into());
        assert!(NodeRecord::from_fields(&m).is_err());
        let mut m = as_map(&sample());
        m.insert("lastSeen".into(), "yesterday".into());
        assert!(NodeRecord::from_fields(&m).is_err());
        let mut m = as_map(&sample());
        m.remove("status");
        assert_eq!(NodeRecord::from_fields(&m), Err(RecordError::Missing("status")));
    }

    #[test]
    fn events_round_trip_and_garbage_fails() {
        let e = RegistryEvent { event: RegistryEventKind::Draining, node_id: "x".into() };
        assert_eq!(e.to_json(), r#"{"event":"draining","nodeId":"x"}"#);
        assert_eq!(RegistryEvent::parse(e.to_json().as_bytes()).unwrap(), e);
        assert!(RegistryEvent::parse(b"{\"event\":\"exploded\"}").is_err());
        assert!(RegistryEvent::parse(b"\xff\xfe").is_err());
    }
}
