//! Message history in a capped Redis Stream (`{prefix}:history`), so
//! `GetHistory` and late joiners see recent messages on any node. Entries are
//! written in the same MULTI as the backplane publish; reading returns the
//! newest `count` entries oldest first. Entries read back are untrusted: a
//! malformed one is skipped and logged, not returned half-filled.

use redis::aio::ConnectionManager;
use redis::streams::StreamRangeReply;
use redis::{AsyncCommands, RedisResult};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub user: String,
    pub message: String,
    pub connection_id: String,
    pub node_id: String,
    /// RFC 3339 UTC.
    pub timestamp: String,
}

pub fn stream_key(prefix: &str) -> String {
    format!("{prefix}:history")
}

/// Adds `XADD key MAXLEN ~ cap * field value …` to a pipeline.
pub fn append(pipe: &mut redis::Pipeline, key: &str, cap: usize, e: &HistoryEntry) {
    pipe.cmd("XADD")
        .arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(cap)
        .arg("*")
        .arg("user")
        .arg(&e.user)
        .arg("message")
        .arg(&e.message)
        .arg("connectionId")
        .arg(&e.connection_id)
        .arg("nodeId")
        .arg(&e.node_id)
        .arg("timestamp")
        .arg(&e.timestamp)
        .ignore();
}

pub async fn recent(conn: &mut ConnectionManager, key: &str, count: usize) -> RedisResult<Vec<HistoryEntry>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let reply: StreamRangeReply = conn.xrevrange_count(key, "+", "-", count).await?;
    let mut out: Vec<HistoryEntry> = reply
        .ids
        .iter()
        .filter_map(|id| {
            let field = |name: &str| id.get::<String>(name);
            let entry = Some(HistoryEntry {
                user: field("user")?,
                message: field("message")?,
                connection_id: field("connectionId")?,
                node_id: field("nodeId")?,
                timestamp: field("timestamp").unwrap_or_default(),
            });
            if entry.is_none() {
                tracing::warn!(id = %id.id, "skipping malformed history entry");
            }
            entry
        })
        .collect();
    out.reverse();
    Ok(out)
}
