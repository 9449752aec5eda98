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
//! on a channel of the subscriber's own on every master it listens to (one
//! per master, named after the first channel subscribed there, so on that
//! channel's slot), and waits to hear each back: heard, the master that
//! owns the slot now delivers to this very connection; `SPUBLISH` answering
//! zero receivers, or no echo within the deadline, and the subscriber makes
//! a new connection (which learns the new owners) and catches up from
//! history. Channels in different slots are subscribed one by one (a
//! cluster refuses one `SSUBSCRIBE` across slots), all at once. A
//! subscription the server drops by itself (`sunsubscribe` when a slot
//! migrates) is taken as lost in the same way.

use super::layout::Layout;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{PushInfo, PushKind, RedisResult, Value};
use std::collections::{HashMap, HashSet};
use tokio::sync::mpsc::UnboundedReceiver;

pub enum Subscription {
    Classic(PubSubSink, PubSubStream),
    Sharded(Sharded),
}

/// One message as it arrived, owned and not copied.
pub enum Received {
    Classic(redis::Msg),
    Sharded { channel: String, payload: Vec<u8> },
}

impl Received {
    pub fn channel(&self) -> &str {
        match self {
            Received::Classic(m) => m.get_channel_name(),
            Received::Sharded { channel, .. } => channel,
        }
    }

    pub fn payload(&self) -> &[u8] {
        match self {
            Received::Classic(m) => m.get_payload_bytes(),
            Received::Sharded { payload, .. } => payload,
        }
    }
}

pub struct Sharded {
    conn: ClusterConnection,
    pushes: UnboundedReceiver<PushInfo>,
    /// This subscriber's own tag, in its probe channels' names.
    tag: String,
    /// Its probe channel on each master it listens to, by the master's node id.
    probes: HashMap<String, String>,
    /// The last token sent on them.
    token: u64,
    /// Channels this side unsubscribed from (their `sunsubscribe` is expected).
    leaving: HashSet<Vec<u8>>,
}

/// What one push says.
enum Push {
    Message(Received),
    /// The subscription ended without being asked to (the connection
    /// dropped, or the server moved a channel's slot away).
    Lost,
    Other,
}

/// A push's bytes, taken out of it.
fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

impl Sharded {
    pub fn new(conn: ClusterConnection, pushes: UnboundedReceiver<PushInfo>, tag: String) -> Self {
        Sharded { conn, pushes, tag, probes: HashMap::new(), token: 0, leaving: HashSet::new() }
    }

    /// Whether `channel` is one of this subscriber's probe channels.
    fn is_probe(&self, channel: &str) -> bool {
        channel.strip_suffix(self.tag.as_str()).is_some_and(|c| c.ends_with(":echo:"))
    }

    /// Subscribes `channel` and answers the node id of the master that
    /// serves its slot (the same routing sends both there).
    async fn subscribe_one(mut conn: ClusterConnection, channel: &str) -> RedisResult<String> {
        let route =
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(channel, SlotAddr::Master)));
        let id = conn.route_command(redis::cmd("CLUSTER").arg("MYID").clone(), route).await?;
        conn.ssubscribe(channel).await?;
        redis::from_redis_value(id).map_err(Into::into)
    }

    fn read(&mut self, push: Option<PushInfo>) -> Push {
        let Some(push) = push else { return Push::Lost };
        let mut data = push.data.into_iter().map(bytes);
        match push.kind {
            PushKind::SMessage => match (data.next().flatten(), data.next().flatten()) {
                (Some(c), Some(payload)) => {
                    let channel = String::from_utf8(c).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into());
                    Push::Message(Received::Sharded { channel, payload })
                }
                _ => Push::Other,
            },
            PushKind::SUnsubscribe => {
                let channel = data.next().flatten().unwrap_or_default();
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
    /// Subscribes to `channels` (on a cluster, also a probe channel on
    /// each master not listened to before).
    pub async fn subscribe(&mut self, channels: &[String]) -> RedisResult<()> {
        match self {
            Subscription::Classic(sink, _) => sink.subscribe(channels).await,
            Subscription::Sharded(s) => {
                for c in channels {
                    s.leaving.remove(c.as_bytes());
                }
                let each = channels.iter().map(|c| Sharded::subscribe_one(s.conn.clone(), c));
                let masters = futures_util::future::try_join_all(each).await?;
                for (master, channel) in masters.into_iter().zip(channels) {
                    if !s.probes.contains_key(&master) {
                        let echo = Layout::echo_channel(channel, &s.tag);
                        s.conn.ssubscribe(&echo).await?;
                        s.probes.insert(master, echo);
                    }
                }
                Ok(())
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

    /// The next message; `None` once the subscription is lost.
    pub async fn next(&mut self) -> Option<Received> {
        match self {
            Subscription::Classic(_, stream) => futures_util::StreamExt::next(stream).await.map(Received::Classic),
            Subscription::Sharded(s) => loop {
                let push = s.pushes.recv().await;
                match s.read(push) {
                    Push::Message(m) => return Some(m),
                    Push::Lost => return None,
                    Push::Other => {}
                }
            },
        }
    }

    /// Whether the subscription still delivers (see the module's doc); a
    /// message that arrives meanwhile goes to `deliver`. The caller bounds
    /// how long this may take.
    pub async fn probe(&mut self, mut deliver: impl FnMut(&Received)) -> bool {
        match self {
            Subscription::Classic(sink, _) => sink.ping::<Value>().await.is_ok(),
            Subscription::Sharded(s) => {
                s.token += 1;
                let token = s.token.to_string();
                let mut waiting: HashSet<String> = HashSet::new();
                for echo in s.probes.values() {
                    let receivers: RedisResult<i64> =
                        redis::cmd("SPUBLISH").arg(echo).arg(&token).query_async(&mut s.conn).await;
                    if !matches!(receivers, Ok(n) if n > 0) {
                        return false; // the slot's master has no subscription of ours
                    }
                    waiting.insert(echo.clone());
                }
                while !waiting.is_empty() {
                    let push = s.pushes.recv().await;
                    match s.read(push) {
                        Push::Message(m) if s.is_probe(m.channel()) => {
                            if m.payload() == token.as_bytes() {
                                waiting.remove(m.channel());
                            }
                        }
                        Push::Message(m) => deliver(&m),
                        Push::Lost => return false,
                        Push::Other => {}
                    }
                }
                true
            }
        }
    }
}
