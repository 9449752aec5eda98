//! The backplane's one subscription connection, of either kind: classic
//! pub/sub (`SUBSCRIBE`) to one server or Sentinel's master, or, on a Redis
//! Cluster, sharded pub/sub (`SSUBSCRIBE`) through redis-rs's cluster
//! connection, which sends each subscription to the master of its channel's
//! slot and hands what arrives over as RESP3 pushes.
//!
//! Both are proven alive the same way from the outside (`probe`, every
//! second, bounded by a deadline), but what proves it differs. A classic
//! connection answers a `PING`. A sharded subscription can be silently
//! orphaned: after a failover the promoted replica owns the slot, and
//! redis-rs neither moves the subscription there nor says so; a `PING` would
//! still be answered by some member. So the sharded probe publishes a token
//! on a channel of the subscriber's own, in the same slot as the chat
//! channels, and waits to hear it back: heard, the master that owns the
//! slot now delivers to this very connection; `SPUBLISH` answering zero
//! receivers, or no echo within the deadline, and the subscriber makes a new
//! connection (which learns the new owner) and catches up from history. A
//! subscription the server drops by itself (`sunsubscribe` when a slot
//! migrates) is taken as lost in the same way.

use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, RedisResult, Value};
use std::collections::HashSet;
use tokio::sync::mpsc::UnboundedReceiver;

pub enum Subscription {
    Classic(PubSubSink, PubSubStream),
    Sharded(Sharded),
}

pub struct Sharded {
    conn: ClusterConnection,
    pushes: UnboundedReceiver<PushInfo>,
    /// This subscriber's own channel, for `probe`.
    echo: String,
    /// The last token sent on it.
    token: u64,
    /// Channels this side unsubscribed from (their `sunsubscribe` is expected).
    leaving: HashSet<Vec<u8>>,
}

/// What one push says.
enum Push {
    Message(String, Vec<u8>),
    /// The subscription ended without being asked to (the connection
    /// dropped, or the server moved a channel's slot away).
    Lost,
    Other,
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

impl Sharded {
    pub fn new(conn: ClusterConnection, pushes: UnboundedReceiver<PushInfo>, echo: String) -> Self {
        Sharded { conn, pushes, echo, token: 0, leaving: HashSet::new() }
    }

    /// The channel `probe` listens on.
    pub fn echo(&self) -> &str {
        &self.echo
    }

    fn read(&mut self, push: Option<PushInfo>) -> Push {
        let Some(push) = push else { return Push::Lost };
        match push.kind {
            PushKind::SMessage => match (push.data.first().and_then(bytes), push.data.get(1).and_then(bytes)) {
                (Some(c), Some(p)) => Push::Message(String::from_utf8_lossy(c).into_owned(), p.to_vec()),
                _ => Push::Other,
            },
            PushKind::SUnsubscribe => {
                let channel = push.data.first().and_then(bytes).map(<[u8]>::to_vec).unwrap_or_default();
                if self.leaving.remove(&channel) {
                    Push::Other
                } else {
                    Push::Lost
                }
            }
            PushKind::Disconnection => Push::Lost,
            _ => Push::Other,
        }
    }
}

impl Subscription {
    /// Subscribes to `channels` (on a cluster, all in one slot).
    pub async fn subscribe(&mut self, channels: &[String]) -> RedisResult<()> {
        match self {
            Subscription::Classic(sink, _) => sink.subscribe(channels).await,
            Subscription::Sharded(s) => {
                for c in channels {
                    s.leaving.remove(c.as_bytes());
                }
                s.conn.ssubscribe(channels).await
            }
        }
    }

    pub async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Subscription::Classic(sink, _) => sink.unsubscribe(channel).await,
            Subscription::Sharded(s) => {
                s.leaving.insert(channel.as_bytes().to_vec());
                s.conn.sunsubscribe(channel).await
            }
        }
    }

    /// The next message (channel, payload); `None` once the subscription is lost.
    pub async fn next(&mut self) -> Option<(String, Vec<u8>)> {
        match self {
            Subscription::Classic(_, stream) => futures_util::StreamExt::next(stream)
                .await
                .map(|m| (m.get_channel_name().to_string(), m.get_payload_bytes().to_vec())),
            Subscription::Sharded(s) => loop {
                let push = s.pushes.recv().await;
                match s.read(push) {
                    Push::Message(c, p) => return Some((c, p)),
                    Push::Lost => return None,
                    Push::Other => {}
                }
            },
        }
    }

    /// Whether the subscription still delivers (see the module's doc); a
    /// message that arrives meanwhile goes to `deliver`. The caller bounds
    /// how long this may take.
    pub async fn probe(&mut self, mut deliver: impl FnMut(&str, &[u8])) -> bool {
        match self {
            Subscription::Classic(sink, _) => sink.ping::<Value>().await.is_ok(),
            Subscription::Sharded(s) => {
                s.token += 1;
                let token = s.token.to_string();
                let receivers: RedisResult<i64> =
                    redis::cmd("SPUBLISH").arg(&s.echo).arg(&token).query_async(&mut s.conn).await;
                if !matches!(receivers, Ok(n) if n > 0) {
                    return false; // the slot's master has no subscription of ours
                }
                loop {
                    let push = s.pushes.recv().await;
                    match s.read(push) {
                        Push::Message(c, p) if c == s.echo => {
                            if p == token.as_bytes() {
                                return true;
                            }
                        }
                        Push::Message(c, p) => deliver(&c, &p),
                        Push::Lost => return false,
                        Push::Other => {}
                    }
                }
            }
        }
    }
}
