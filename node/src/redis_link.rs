//! The node's command connection to Redis. The first connection is made
//! lazily and retried on every use, so a node starts and serves its local
//! clients even while Redis is down; after that, redis-rs's
//! `ConnectionManager` reconnects by itself. Short connect and response
//! timeouts keep a dead Redis from hanging a hub call. The up/down state is
//! logged on every change and exported in `/health` and metrics.

use prometheus::IntGauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisResult};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisLink {
    pub client: Client,
    manager: tokio::sync::Mutex<Option<ConnectionManager>>,
    up: AtomicBool,
    gauge: IntGauge,
}

impl RedisLink {
    pub fn new(client: Client, gauge: IntGauge) -> Self {
        RedisLink { client, manager: tokio::sync::Mutex::new(None), up: AtomicBool::new(false), gauge }
    }

    /// A command connection; fails fast while Redis is unreachable.
    pub async fn conn(&self) -> RedisResult<ConnectionManager> {
        let mut guard = self.manager.lock().await;
        if let Some(m) = guard.as_ref() {
            return Ok(m.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let m = self.client.get_connection_manager_with_config(config).await;
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
        let was = self.up.swap(up, Ordering::AcqRel);
        self.gauge.set(up as i64);
        match (was, up) {
            (false, true) => tracing::info!("redis is reachable"),
            (true, false) => {
                tracing::warn!(error = ?err, "redis is unreachable; serving local clients only")
            }
            _ => {}
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}
