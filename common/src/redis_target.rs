//! Where Redis is, and the command connection to it. One server,
//! `redis://[:password@]host:port[/db]`; a service watched by Redis
//! Sentinel, `redis+sentinel://[:password@]host1:26379,host2:26379/service[/db]`
//! (the password and db are for the data nodes; the sentinels are asked
//! without one); or a Redis Cluster,
//! `redis+cluster://[:password@]host1:port1,host2:port2,…` (any members; the
//! rest of the cluster is learned from them).
//!
//! With Sentinel, every new connection asks the sentinels for the current
//! master (redis-rs's `SentinelClient`), and a program marks its connections
//! stale after a Redis error so the next use reconnects to whichever server
//! is master by then. With a cluster, redis-rs's cluster connection routes
//! each command to the master of its key's slot, follows `MOVED` and `ASK`
//! and learns the new owner of a slot after a failover by itself; every key
//! a program writes shares one hash tag (`key_prefix` below), so every
//! multi-key step (a pipeline, a transaction, the store-and-publish script)
//! stays on one slot. Pub/sub connections (`client`) go to one member at a
//! time, the next one after each failure: a classic `PUBLISH` reaches
//! subscribers on every member of a cluster. The node's chat goes over
//! sharded pub/sub instead (`SPUBLISH`, and `shard_subscriber`'s
//! `SSUBSCRIBE`), which the shard that owns the channel's slot serves alone,
//! without copying every message to every member over the cluster bus.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Client, Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline, RedisConnectionInfo, RedisError, RedisFuture,
    RedisResult, Value,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const SENTINEL_SCHEME: &str = "redis+sentinel://";
const CLUSTER_SCHEME: &str = "redis+cluster://";

pub enum RedisTarget {
    Direct(Client),
    Sentinel {
        sentinels: tokio::sync::Mutex<SentinelClient>,
        service: String,
    },
    Cluster {
        /// The members named in the URL, password included.
        members: Vec<ConnectionInfo>,
        password: Option<String>,
        /// The member the next pub/sub connection goes to.
        next: AtomicUsize,
    },
}

/// A cluster connection for sharded subscriptions, and the receiver of the
/// pushes it gets (`RedisTarget::shard_subscriber`).
pub type ShardSubscriber = (ClusterConnection, tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>);

/// How long a program waits on Redis: to connect, and for an answer.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

fn invalid(kind: &'static str, why: String) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, kind, why))
}

/// `user:password` or `:password` before the `@`, and what follows.
fn split_auth(rest: &str) -> (Option<&str>, &str) {
    match rest.rsplit_once('@') {
        Some((auth, rest)) => {
            let password = auth.split_once(':').map_or(auth, |(_, p)| p);
            ((!password.is_empty()).then_some(password), rest)
        }
        None => (None, rest),
    }
}

impl RedisTarget {
    /// Parses a Redis, Redis Sentinel or Redis Cluster URL (nothing is
    /// contacted yet).
    pub fn open(url: &str) -> RedisResult<Self> {
        if let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) {
            return Self::open_cluster(rest);
        }
        let Some(rest) = url.strip_prefix(SENTINEL_SCHEME) else { return Client::open(url).map(RedisTarget::Direct) };
        let invalid = |why: String| invalid("invalid Redis Sentinel URL", why);
        let (password, rest) = split_auth(rest);
        let (hosts, path) = rest.split_once('/').ok_or_else(|| invalid("no /service after the sentinels".into()))?;
        let mut parts = path.split('/');
        let service = parts.next().filter(|s| !s.is_empty()).ok_or_else(|| invalid("no service name".into()))?;
        let db: i64 = match parts.next().filter(|d| !d.is_empty()) {
            Some(d) => d.parse().map_err(|_| invalid(format!("{d:?} is not a database number")))?,
            None => 0,
        };
        let sentinels: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| if h.contains(':') { format!("redis://{h}") } else { format!("redis://{h}:26379") })
            .collect();
        if sentinels.is_empty() {
            return Err(invalid("no sentinel addresses".into()));
        }
        let mut info = RedisConnectionInfo::default().set_db(db);
        if let Some(password) = password {
            // Percent-decoding is left to the user.
            info = info.set_password(password);
        }
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
        let client = SentinelClient::build(sentinels, service.to_string(), Some(node), SentinelServerType::Master)?;
        Ok(RedisTarget::Sentinel { sentinels: tokio::sync::Mutex::new(client), service: service.to_string() })
    }

    /// `host1:port1,host2:port2,…` (a host alone means port 6379), after the
    /// optional password, with nothing after the members: a cluster has one
    /// database.
    fn open_cluster(rest: &str) -> RedisResult<Self> {
        let invalid = |why: String| invalid("invalid Redis Cluster URL", why);
        let (password, rest) = split_auth(rest);
        let hosts = rest.strip_suffix('/').unwrap_or(rest);
        if hosts.contains('/') || hosts.contains('?') {
            return Err(invalid("a cluster URL names members only (no /db, no options)".into()));
        }
        let mut members = Vec::new();
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            let url = if host.contains(':') { format!("redis://{host}") } else { format!("redis://{host}:6379") };
            let info = url.as_str().into_connection_info().map_err(|e| invalid(format!("member {host:?}: {e}")))?;
            let settings = info.redis_settings().clone();
            let settings = match password {
                Some(p) => settings.set_password(p),
                None => settings,
            };
            members.push(info.set_redis_settings(settings));
        }
        if members.is_empty() {
            return Err(invalid("no cluster members".into()));
        }
        // Each program starts at a member of its own, so that the nodes'
        // subscriptions spread over the cluster instead of all landing on the
        // first member named.
        let next = AtomicUsize::new(rand::random::<u32>() as usize);
        Ok(RedisTarget::Cluster { members, password: password.map(str::to_string), next })
    }

    /// A client for one server to use now: the one server, the master the
    /// sentinels name at this moment (asking them takes at most `within`),
    /// or, in a cluster, the next member in turn (for pub/sub).
    pub async fn client(&self, within: std::time::Duration) -> RedisResult<Client> {
        match self {
            RedisTarget::Direct(c) => Ok(c.clone()),
            RedisTarget::Sentinel { sentinels, .. } => {
                let asked = tokio::time::timeout(within, async { sentinels.lock().await.async_get_client().await });
                asked.await.map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
            }
            RedisTarget::Cluster { members, next, .. } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % members.len();
                Client::open(members[i].clone())
            }
        }
    }

    /// A command connection: a `ConnectionManager` to the one server (or the
    /// sentinels' master), or a cluster connection that reaches every shard.
    pub async fn connect(&self, t: Timeouts) -> RedisResult<RedisConn> {
        match self {
            RedisTarget::Cluster { members, password, .. } => {
                let mut builder = ClusterClient::builder(members.clone())
                    .connection_timeout(t.connect)
                    .response_timeout(t.response)
                    .retries(2);
                if let Some(p) = password {
                    builder = builder.password(p.clone());
                }
                let conn = builder.build()?.get_async_connection().await?;
                Ok(RedisConn::Cluster(conn))
            }
            _ => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(t.connect))
                    .set_response_timeout(Some(t.response))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                let client = self.client(t.connect * 2).await?;
                Ok(RedisConn::Single(client.get_connection_manager_with_config(config).await?))
            }
        }
    }

    /// In a cluster, a connection for sharded subscriptions: `SSUBSCRIBE`s
    /// on it go to the master of each channel's slot, and what they receive
    /// arrives on the receiver as RESP3 pushes. redis-rs does not move such a
    /// subscription to a replica promoted after a failover (see
    /// `tests/tests/redis_cluster.rs`): its user proves it alive (a message
    /// of its own coming back) and makes a new one when it is not. `None`
    /// for a single server or Sentinel, which use `client`'s classic pub/sub.
    pub async fn shard_subscriber(&self, t: Timeouts) -> RedisResult<Option<ShardSubscriber>> {
        let RedisTarget::Cluster { members, password, .. } = self else { return Ok(None) };
        let (pushes, received) = tokio::sync::mpsc::unbounded_channel();
        let mut builder = ClusterClient::builder(members.clone())
            .connection_timeout(t.connect)
            .response_timeout(t.response)
            .retries(1)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(pushes);
        if let Some(p) = password {
            builder = builder.password(p.clone());
        }
        let conn = builder.build()?.get_async_connection().await?;
        Ok(Some((conn, received)))
    }

    /// Whether connections must be made again after an error (the master
    /// may have moved). A cluster connection follows a failover itself.
    pub fn follows_failover(&self) -> bool {
        matches!(self, RedisTarget::Sentinel { .. })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster { .. })
    }

    /// The key prefix as written in Redis: the configured one, and in a
    /// cluster the same in braces (`{switchboard}`), a hash tag that puts
    /// every key and channel a program names on one slot, so that the
    /// multi-key steps stay legal there. A prefix that already holds a tag
    /// is kept as written.
    pub fn key_prefix(&self, configured: &str) -> String {
        if self.is_cluster() && !configured.contains('{') {
            format!("{{{configured}}}")
        } else {
            configured.to_string()
        }
    }
}

/// A command connection, to one server or to a cluster. Implements
/// redis-rs's `ConnectionLike`, so commands, pipelines and scripts run on
/// either unchanged.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// Runs a command that names no key (so a cluster would send it
    /// anywhere, or everywhere) on the server that holds `key`: in a
    /// cluster, the master of `key`'s slot; otherwise the one server.
    pub async fn query_at<T: redis::FromRedisValue>(&mut self, cmd: &Cmd, key: &str) -> RedisResult<T> {
        match self {
            RedisConn::Single(c) => cmd.query_async(c).await,
            RedisConn::Cluster(c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                Ok(redis::from_redis_value(c.route_command(cmd.clone(), routing).await?)?)
            }
        }
    }
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        match self {
            RedisTarget::Direct(c) => write!(f, "redis {}", c.get_connection_info().addr()),
            RedisTarget::Sentinel { service, .. } => write!(f, "redis sentinel service {service}"),
            RedisTarget::Cluster { members, .. } => {
                let addrs: Vec<String> = members.iter().map(|m| m.addr().to_string()).collect();
                write!(f, "redis cluster {}", addrs.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_names_its_members_and_hides_its_password() {
        let c = RedisTarget::open("redis+cluster://:s3cret@h1:7000,h2,h3:7002/").unwrap();
        let RedisTarget::Cluster { members, password, .. } = &c else { panic!("not a cluster") };
        let addrs: Vec<String> = members.iter().map(|m| m.addr().to_string()).collect();
        assert_eq!(addrs, ["h1:7000", "h2:6379", "h3:7002"]);
        assert_eq!(password.as_deref(), Some("s3cret"));
        assert!(members.iter().all(|m| m.redis_settings().password() == Some("s3cret")));
        assert!(!c.follows_failover() && c.is_cluster());
        assert!(!format!("{c:?}").contains("s3cret"));
        // Keys share one hash tag in a cluster only.
        assert_eq!(c.key_prefix("switchboard"), "{switchboard}");
        assert_eq!(c.key_prefix("{sb}x"), "{sb}x");
        assert_eq!(RedisTarget::open("redis://h").unwrap().key_prefix("switchboard"), "switchboard");
    }

    #[test]
    fn urls_of_both_kinds_parse_and_bad_ones_do_not() {
        assert!(matches!(RedisTarget::open("redis://127.0.0.1:6379").unwrap(), RedisTarget::Direct(_)));
        let s = RedisTarget::open("redis+sentinel://:secret@h1:26379,h2/mymaster/2").unwrap();
        assert!(s.follows_failover());
        assert!(!format!("{s:?}").contains("secret"));
        for bad in [
            "redis+sentinel://h1:26379",
            "redis+sentinel://h1:26379/",
            "redis+sentinel:///m",
            "redis+sentinel://h/m/x",
            "nope://x",
            "redis+cluster://",
            "redis+cluster://:pw@",
            "redis+cluster://h1:1,h2:2/0",
            "redis+cluster://h1:notaport",
        ] {
            assert!(RedisTarget::open(bad).is_err(), "{bad}");
        }
    }
}
