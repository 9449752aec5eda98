//! Chat messages and their history in a capped Redis Stream
//! (`{prefix}:history`). Every chat message, broadcast or group, gets one
//! cluster-wide id when it is stored: its stream entry id. A Lua script
//! stores it and publishes it on the backplane in one atomic step, so the
//! order on the backplane is the order in history, and it is idempotent: the
//! message's own random `uid`, chosen before the first attempt, marks it as
//! stored, so a publish retried after a timeout neither stores nor delivers
//! it twice. Reading walks history in pages, newest first (`GetHistory`) or
//! oldest first after an id (catching up, `Resume`), so a reader holds one
//! page at a time, never the whole capped stream. Entries read back are
//! untrusted: a malformed one is skipped and logged, not returned
//! half-filled.

use redis::streams::{StreamId, StreamRangeReply};
use redis::{AsyncCommands, RedisResult};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::{HashSet, VecDeque};
use switchboard_common::redis_target::RedisConn;

/// One chat message as stored, published and replayed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatMessage {
    /// Stream entry id, once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Chosen by the sending node before the first store attempt.
    #[serde(default)]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A direct message's recipient (a user; see `users`); `user` is its
    /// sender's (empty for one the server API sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The one connection (by id) a server API message is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    /// A server API message's hub method (`target`) and arguments: the
    /// event clients get instead of a chat event. Its `user`, `message` and
    /// `connectionId` are empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Vec<Value>>,
    /// Connections (by id) a server API send to everyone or a group leaves out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
    pub user: String,
    pub message: String,
    pub connection_id: String,
    pub node_id: String,
    /// RFC 3339 UTC.
    #[serde(default)]
    pub timestamp: String,
}

/// Whom a message is for: everyone, a group's members, a user's
/// connections (and, for a direct message, its sender's other ones), or one
/// connection. Delivery, replay, history pages and the backplane's channels
/// all go by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Address<'a> {
    All,
    Group(&'a str),
    /// `from` is empty for a message from the server API.
    User {
        to: &'a str,
        from: &'a str,
    },
    Connection(&'a str),
}

impl ChatMessage {
    /// Whether the connection `connection_id`, whose user is `user`, may be
    /// shown this message in a replay or a history page: what is addressed to
    /// everyone, to it, or to its user; a direct message to or from its user
    /// but not the one it sent itself; nothing it was excluded from. (Group
    /// messages are filtered by membership apart.)
    pub fn visible_to(&self, connection_id: &str, user: Option<&str>) -> bool {
        if self.excluded.iter().any(|e| e == connection_id) {
            return false;
        }
        match self.address() {
            Address::All | Address::Group(_) => true,
            Address::User { to, from } => {
                user.is_some_and(|u| u == to || u == from) && self.connection_id != connection_id
            }
            Address::Connection(id) => id == connection_id,
        }
    }

    pub fn address(&self) -> Address<'_> {
        match (&self.group, &self.to, &self.connection) {
            (Some(g), _, _) => Address::Group(g),
            (None, Some(to), _) => Address::User { to, from: &self.user },
            (None, None, Some(c)) => Address::Connection(c),
            (None, None, None) => Address::All,
        }
    }

    /// The hub event clients receive; with `with_id`, the message id is one
    /// extra last argument (for connections that opted in with `messageIds`);
    /// a direct message's recipient follows it there, so that the sender's
    /// other connections can tell whom it went to.
    pub fn event(&self, with_id: bool) -> crate::protocol::HubMessage {
        if let Some(target) = &self.target {
            let mut args = self.arguments.clone().unwrap_or_default();
            if with_id {
                args.push(self.id.clone().map_or(Value::Null, Value::String));
            }
            return crate::protocol::HubMessage::event(target, args);
        }
        let mut args: Vec<Value> = Vec::with_capacity(6);
        if let Some(g) = &self.group {
            args.push(g.clone().into());
        }
        args.extend([
            self.user.clone().into(),
            self.message.clone().into(),
            self.connection_id.clone().into(),
            self.node_id.clone().into(),
        ]);
        if with_id {
            args.push(self.id.clone().map_or(Value::Null, Value::String));
            if let Some(to) = &self.to {
                args.push(to.clone().into());
            }
        }
        let target = match (&self.group, &self.to) {
            (Some(_), _) => "ReceiveGroupMessage",
            (None, Some(_)) => "ReceivePrivateMessage",
            (None, None) => "ReceiveMessage",
        };
        crate::protocol::HubMessage::event(target, args)
    }

    fn from_entry(e: &StreamId) -> Option<Self> {
        let field = |name: &str| e.get::<String>(name);
        Some(ChatMessage {
            id: Some(e.id.clone()),
            uid: field("uid").unwrap_or_default(),
            group: field("group").filter(|g| !g.is_empty()),
            to: field("to").filter(|t| !t.is_empty()),
            connection: field("connection").filter(|c| !c.is_empty()),
            target: field("target").filter(|t| !t.is_empty()),
            arguments: match field("arguments") {
                Some(json) => Some(serde_json::from_str(&json).ok()?),
                None => None,
            },
            excluded: match field("excluded") {
                Some(json) => serde_json::from_str(&json).ok()?,
                None => Vec::new(),
            },
            user: field("user")?,
            message: field("message")?,
            connection_id: field("connectionId")?,
            node_id: field("nodeId")?,
            timestamp: field("timestamp").unwrap_or_default(),
        })
    }
}

/// Stores (XADD, capped) and publishes (`<id> <json>`) one message, once per
/// uid: a retry finds the uid's marker and returns the id it was given.
pub const STORE_AND_PUBLISH: &str = include_str!("store_and_publish.lua");

/// The script as it runs: on a Redis Cluster (`sharded`) it publishes with
/// `SPUBLISH`, so that only the shard that owns the history's slot carries
/// the message (a classic `PUBLISH` is copied to every member).
pub fn script(sharded: bool) -> std::borrow::Cow<'static, str> {
    if sharded {
        STORE_AND_PUBLISH.replacen("redis.call('PUBLISH'", "redis.call('SPUBLISH'", 1).into()
    } else {
        STORE_AND_PUBLISH.into()
    }
}

/// Loads the script into Redis's script cache; answers its SHA1 for `EVALSHA`.
/// In a cluster, loaded on the master that holds `key` (the history
/// stream), where it runs; a master that takes over after a failover answers
/// `NOSCRIPT` and the script is loaded again.
pub async fn load_script(conn: &mut RedisConn, key: &str, sharded: bool) -> RedisResult<String> {
    conn.query_at(redis::cmd("SCRIPT").arg("LOAD").arg(script(sharded).as_ref()), key).await
}

/// Adds the atomic store-and-publish of `m` to a pipeline (`EVALSHA` of the
/// loaded script, `sha`); it answers the id. It is published on each of
/// `channels` (one, or a direct message's two users'), separated by `\n`
/// (which no channel name holds: user and group names exclude control
/// characters).
pub fn store_and_publish(
    pipe: &mut redis::Pipeline,
    sha: &str,
    layout: &crate::backplane::layout::Layout,
    cap: usize,
    channels: &str,
    m: &ChatMessage,
) {
    let payload = serde_json::to_string(m).unwrap_or_default();
    let scope = layout.scope_of(m.group.as_deref());
    let cmd = pipe
        .cmd("EVALSHA")
        .arg(sha)
        .arg(2)
        .arg(layout.history(scope).as_ref())
        .arg(layout.stored_marker(scope, &m.uid))
        .arg(cap)
        .arg(channels)
        .arg(payload)
        .arg("uid")
        .arg(&m.uid)
        .arg("user")
        .arg(&m.user)
        .arg("message")
        .arg(&m.message)
        .arg("connectionId")
        .arg(&m.connection_id)
        .arg("nodeId")
        .arg(&m.node_id)
        .arg("timestamp")
        .arg(&m.timestamp);
    if let Some(g) = &m.group {
        cmd.arg("group").arg(g);
    }
    if let Some(to) = &m.to {
        cmd.arg("to").arg(to);
    }
    if let Some(connection) = &m.connection {
        cmd.arg("connection").arg(connection);
    }
    if !m.excluded.is_empty() {
        cmd.arg("excluded").arg(serde_json::to_string(&m.excluded).unwrap_or_default());
    }
    if let Some(target) = &m.target {
        let arguments = serde_json::to_string(m.arguments.as_deref().unwrap_or_default()).unwrap_or_default();
        cmd.arg("target").arg(target).arg("arguments").arg(arguments);
    }
}

/// Parses a backplane payload `<id> <json>`.
pub fn parse_published(payload: &[u8]) -> Option<ChatMessage> {
    let text = std::str::from_utf8(payload).ok()?;
    let (id, json) = text.split_once(' ')?;
    parse_id(id)?;
    let mut m: ChatMessage = serde_json::from_str(json).ok()?;
    m.id = Some(id.to_string());
    Some(m)
}

/// A stream entry id `ms-seq`.
pub fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Orders two valid ids; invalid ones compare as equal (callers validate).
pub fn cmp_ids(a: &str, b: &str) -> Ordering {
    match (parse_id(a), parse_id(b)) {
        (Some(a), Some(b)) => a.cmp(&b),
        _ => Ordering::Equal,
    }
}

fn collect(reply: StreamRangeReply) -> Vec<ChatMessage> {
    reply
        .ids
        .iter()
        .filter_map(|e| {
            let m = ChatMessage::from_entry(e);
            if m.is_none() {
                tracing::warn!(id = %e.id, "skipping malformed history entry");
            }
            m
        })
        .collect()
}

/// Up to `count` messages older than `before` (exclusive; the newest when
/// `None`), newest first: one page of a read that walks history backwards.
pub async fn older(
    conn: &mut RedisConn,
    key: &str,
    before: Option<&str>,
    count: usize,
) -> RedisResult<Vec<ChatMessage>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let end = before.map_or_else(|| "+".to_string(), |id| format!("({id}"));
    let reply: StreamRangeReply = conn.xrevrange_count(key, end, "-", count).await?;
    Ok(collect(reply))
}

/// Up to `count` messages after `after` (exclusive) up to `through`
/// (inclusive; `+` for the newest), oldest first.
pub async fn after(
    conn: &mut RedisConn,
    key: &str,
    after: &str,
    through: &str,
    count: usize,
) -> RedisResult<Vec<ChatMessage>> {
    let reply: StreamRangeReply = conn.xrange_count(key, format!("({after}"), through, count).await?;
    Ok(collect(reply))
}

/// The id of the newest entry, or `0-0` for an empty history.
pub async fn last_id(conn: &mut RedisConn, key: &str) -> RedisResult<String> {
    let reply: StreamRangeReply = conn.xrevrange_count(key, "+", "-", 1).await?;
    Ok(reply.ids.first().map_or_else(|| "0-0".to_string(), |e| e.id.clone()))
}

/// Which history a message id belongs to: `None` the broadcast stream (or,
/// on one Redis, the only one), `Some(group)` that group's stream when each
/// group has its own (`Layout::per_group`). Ids are ordered within a scope.
pub type Scope = Option<String>;

/// The scope a message to `group` (`None`: everyone) counts its id in:
/// the group's own where each group has its own stream (`per_group`), else
/// the broadcasts' (the only stream).
pub fn scope_of(group: Option<&str>, per_group: bool) -> Option<&str> {
    group.filter(|_| per_group)
}

/// A `Resume` in progress (`replay` runs it): where it is, where it ends,
/// and what it has sent. Kept on its connection between pauses.
pub struct Replay {
    pub invocation_id: Option<String>,
    /// The scopes still to replay, one after another; the first is under way.
    pub scopes: VecDeque<ScopeReplay>,
    /// The newest id passed in each scope replayed so far.
    pub passed: Vec<(Scope, String)>,
    /// The connection's groups (one stream holds every group's messages).
    pub groups: HashSet<String>,
    /// The user the connection is an address of: direct messages to or
    /// from it are replayed, other users' are not.
    pub user: Option<String>,
    pub page: VecDeque<ChatMessage>,
    pub done_reading: bool,
    pub replayed: usize,
    pub seen_bytes: usize,
    pub seen_entries: usize,
}

/// One scope of a replay.
pub struct ScopeReplay {
    pub scope: Scope,
    /// The last id read; the next page starts after it.
    pub after: String,
    /// The newest id stored when the replay began: anything newer arrives
    /// live (held until the replay ends).
    pub through: String,
    /// Live delivery in this scope began here before the replay: it and
    /// all after it were delivered.
    pub live_from: Option<String>,
    /// The newest id the replay passed (sent, or not this connection's).
    pub newest: Option<String>,
}

/// Why `Resume` cannot replay from an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeError {
    Malformed,
    Future,
    Gone,
}

impl std::fmt::Display for ResumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResumeError::Malformed => f.write_str("the message id is malformed (expected <milliseconds>-<sequence>)"),
            ResumeError::Future => f.write_str("the message id is newer than any stored message"),
            ResumeError::Gone => f.write_str("messages after that id have left the capped history; some are missing"),
        }
    }
}

/// Checks that replaying after `from` is possible, and answers the newest
/// stored id, where the replay ends: a well-formed id, not
/// newer than the newest entry, and no entry after it trimmed away. Redis
/// trims only the oldest entries, so there is a gap when `from` is older
/// than the oldest entry left and some entries were trimmed (`entries-added`
/// above `length`). (A client whose last id is exactly the newest trimmed
/// entry is told so too, though it missed nothing; it is a rare edge.)
pub async fn check_resume(conn: &mut RedisConn, key: &str, from: &str) -> RedisResult<Result<String, ResumeError>> {
    if parse_id(from).is_none() {
        return Ok(Err(ResumeError::Malformed));
    }
    let newest = last_id(conn, key).await?;
    if cmp_ids(from, &newest) == Ordering::Greater {
        return Ok(Err(ResumeError::Future));
    }
    let first: StreamRangeReply = conn.xrange_count(key, "-", "+", 1).await?;
    let Some(first) = first.ids.first().map(|e| e.id.clone()) else { return Ok(Ok(newest)) };
    if cmp_ids(from, &first) != Ordering::Less {
        return Ok(Ok(newest));
    }
    let info: redis::Value = redis::cmd("XINFO").arg("STREAM").arg(key).query_async(conn).await?;
    let number = |name: &str| info_field(&info, name).and_then(|v| v.parse::<u64>().ok());
    let trimmed = match (number("entries-added"), number("length")) {
        (Some(added), Some(len)) => added > len,
        _ => true, // Redis before 7: assume the worst
    };
    Ok(if trimmed { Err(ResumeError::Gone) } else { Ok(newest) })
}

/// A field of an XINFO reply (a flat array or a RESP3 map) as text.
fn info_field(v: &redis::Value, name: &str) -> Option<String> {
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(i) => Some(i.to_string()),
        _ => None,
    };
    match v {
        redis::Value::Array(items) => items
            .chunks(2)
            .find(|kv| kv.len() == 2 && text(&kv[0]).as_deref() == Some(name))
            .and_then(|kv| text(&kv[1])),
        redis::Value::Map(pairs) => {
            pairs.iter().find(|(k, _)| text(k).as_deref() == Some(name)).and_then(|(_, v)| text(v))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(group: Option<&str>) -> ChatMessage {
        ChatMessage {
            id: Some("5-1".into()),
            uid: "u".into(),
            group: group.map(String::from),
            user: "a".into(),
            message: "m".into(),
            connection_id: "c".into(),
            node_id: "n".into(),
            timestamp: "t".into(),
            ..Default::default()
        }
    }

    #[test]
    fn events_carry_the_id_only_when_asked() {
        let text = |m: crate::protocol::HubMessage| String::from_utf8(m.to_record()).unwrap();
        assert_eq!(
            text(msg(None).event(false)),
            "{\"type\":1,\"target\":\"ReceiveMessage\",\"arguments\":[\"a\",\"m\",\"c\",\"n\"]}\u{1e}"
        );
        assert_eq!(
            text(msg(Some("g")).event(true)),
            "{\"type\":1,\"target\":\"ReceiveGroupMessage\",\"arguments\":[\"g\",\"a\",\"m\",\"c\",\"n\",\"5-1\"]}\u{1e}"
        );
        let direct = ChatMessage { to: Some("b".into()), ..msg(None) };
        assert_eq!(
            text(direct.event(false)),
            "{\"type\":1,\"target\":\"ReceivePrivateMessage\",\"arguments\":[\"a\",\"m\",\"c\",\"n\"]}\u{1e}"
        );
        let server =
            ChatMessage { target: Some("Notify".into()), arguments: Some(vec![1.into(), "x".into()]), ..msg(None) };
        assert_eq!(text(server.event(false)), "{\"type\":1,\"target\":\"Notify\",\"arguments\":[1,\"x\"]}\u{1e}");
        assert_eq!(
            text(server.event(true)),
            "{\"type\":1,\"target\":\"Notify\",\"arguments\":[1,\"x\",\"5-1\"]}\u{1e}"
        );
        assert_eq!(
            text(direct.event(true)),
            "{\"type\":1,\"target\":\"ReceivePrivateMessage\",\"arguments\":[\"a\",\"m\",\"c\",\"n\",\"5-1\",\"b\"]}\u{1e}"
        );
    }

    #[test]
    fn published_payloads_round_trip_and_junk_is_refused() {
        let server = ChatMessage {
            connection: Some("c1".into()),
            target: Some("T".into()),
            arguments: Some(vec![serde_json::json!({"a": [1]})]),
            excluded: vec!["c2".into()],
            ..msg(None)
        };
        for m in [msg(Some("g")), ChatMessage { to: Some("b".into()), ..msg(None) }, server] {
            let payload = format!("5-1 {}", serde_json::to_string(&m).unwrap());
            assert_eq!(parse_published(payload.as_bytes()), Some(m));
        }
        for junk in ["", "5-1", "x-1 {}", "5-1 {", "5-1 {\"user\":1}", "{\"origin\":\"x\"}"] {
            assert_eq!(parse_published(junk.as_bytes()), None, "{junk}");
        }
    }

    #[test]
    fn the_sharded_script_publishes_with_spublish_and_only_so() {
        assert!(!script(false).contains("SPUBLISH") && script(false).contains("redis.call('PUBLISH'"));
        assert!(script(true).contains("redis.call('SPUBLISH'") && !script(true).contains("redis.call('PUBLISH'"));
    }

    #[test]
    fn ids_are_compared_as_numbers() {
        assert_eq!(cmp_ids("10-0", "9-5"), Ordering::Greater);
        assert_eq!(cmp_ids("9-10", "9-9"), Ordering::Greater);
        assert_eq!(cmp_ids("9-0", "9-0"), Ordering::Equal);
        assert!(parse_id("9").is_none() && parse_id("a-1").is_none() && parse_id("1-").is_none());
    }
}
