//! The node's command connection to Redis. The first connection is made
//! lazily and retried on every use, so a node starts and serves its local
//! clients even while Redis is down; after that, redis-rs's
//! `ConnectionManager` (or, on a Redis Cluster, its cluster connection)
//! reconnects by itself (with Sentinel, after an error the
//! next use asks the sentinels for the master again, see `RedisTarget`), and
//! after a timeout the next use connects anew (a silent connection is not
//! one the manager would replace). Short connect and response timeouts keep
//! a dead Redis from hanging a hub call. The up/down state
//! (`RedisState`: changes logged, refusals logged with their reason) is
//! exported in `/health` and metrics.

use prometheus::IntGauge;
use redis::{Client, RedisResult};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use switchboard_common::redis_state::RedisState;
use switchboard_common::redis_target::{RedisConn, RedisTarget, ShardSubscriber, Timeouts};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisLink {
    target: RedisTarget,
    manager: tokio::sync::Mutex<Option<RedisConn>>,
    /// With Sentinel: an error was seen, so the master may have moved and
    /// the next connection asks the sentinels again.
    stale: AtomicBool,
    state: RedisState,
    gauge: IntGauge,
}

impl RedisLink {
    pub fn new(target: RedisTarget, gauge: IntGauge) -> Self {
        RedisLink {
            target,
            manager: tokio::sync::Mutex::new(None),
            stale: AtomicBool::new(false),
            state: RedisState::new("serving local clients only"),
            gauge,
        }
    }

    /// A client for one server: the current one (with Sentinel, the current
    /// master; in a cluster, the next member in turn, for pub/sub).
    pub async fn client(&self) -> RedisResult<Client> {
        self.target.client(CONNECT_TIMEOUT * 2).await
    }

    /// On a Redis Cluster: a connection for sharded subscriptions and the
    /// receiver of what they carry (see `RedisTarget::shard_subscriber`).
    pub async fn shard_subscriber(&self) -> RedisResult<Option<ShardSubscriber>> {
        self.target.shard_subscriber(Timeouts { connect: CONNECT_TIMEOUT, response: RESPONSE_TIMEOUT }).await
    }

    /// Whether Redis is a cluster: chat then goes over sharded pub/sub.
    pub fn is_cluster(&self) -> bool {
        self.target.is_cluster()
    }

    /// A command connection; fails fast while Redis is unreachable.
    pub async fn conn(&self) -> RedisResult<RedisConn> {
        let mut guard = self.manager.lock().await;
        if self.stale.swap(false, Ordering::AcqRel) {
            *guard = None;
        }
        if let Some(m) = guard.as_ref() {
            return Ok(m.clone());
        }
        let m = self.target.connect(Timeouts { connect: CONNECT_TIMEOUT, response: RESPONSE_TIMEOUT }).await;
        self.observe(&m);
        let m = m?;
        *guard = Some(m.clone());
        Ok(m)
    }

    /// Records the outcome of a Redis operation, logging transitions.
    pub fn observe<T>(&self, result: &RedisResult<T>) {
        self.set_up(result.is_ok(), result.as_ref().err());
    }

    pub fn set_up(&self, up: bool, err: Option<&redis::RedisError>) {
        // A timeout may be a connection that went silent (a partition: TCP
        // retries for minutes, and the manager would wait on it rather than
        // reconnect), so the next use makes a new connection. With Sentinel,
        // any error may mean the master moved.
        let silent = err.is_some_and(|e| e.is_timeout());
        if !up && (silent || self.target.follows_failover()) {
            self.stale.store(true, Ordering::Release);
        }
        self.gauge.set(self.state.record(up, err) as i64);
    }

    pub fn is_up(&self) -> bool {
        self.state.is_up()
    }
}
