//! The node's command connection to Redis. The first connection is made
//! lazily and retried on every use, so a node starts and serves its local
//! clients even while Redis is down; after that, redis-rs's
//! `ConnectionManager` reconnects by itself. Short connect and response
//! timeouts keep a dead Redis from hanging a hub call. The up/down state
//! (`RedisState`: changes logged, refusals logged with their reason) is
//! exported in `/health` and metrics.

use prometheus::IntGauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisResult};
use std::time::Duration;
use switchboard_common::redis_state::RedisState;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisLink {
    pub client: Client,
    manager: tokio::sync::Mutex<Option<ConnectionManager>>,
    state: RedisState,
    gauge: IntGauge,
}

impl RedisLink {
    pub fn new(client: Client, gauge: IntGauge) -> Self {
        RedisLink {
            client,
            manager: tokio::sync::Mutex::new(None),
            state: RedisState::new("serving local clients only"),
            gauge,
        }
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
        self.gauge.set(self.state.record(up, err) as i64);
    }

    pub fn is_up(&self) -> bool {
        self.state.is_up()
    }
}
