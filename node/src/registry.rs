//! This node's entry in the registry: the heartbeat that refreshes
//! `{prefix}:nodes:{nodeId}` with a TTL and the node's id in the index
//! `{prefix}:nodes`, the announcements on `{prefix}:registry` (up when first
//! registered or re-registered after a Redis outage, draining, down), and
//! the listing behind `/nodes` (see `switchboard_common::registry`).

use crate::app::App;
use chrono::Utc;
use redis::RedisResult;
use std::sync::Arc;
use switchboard_common::registry::{
    index_key, node_key, registry_channel, write_record, NodeRecord, NodeStatus, RegistryEvent, RegistryEventKind,
};

pub fn record(app: &App) -> NodeRecord {
    NodeRecord {
        node_id: app.node_id.clone(),
        name: app.name.clone(),
        description: app.cfg.description.clone(),
        url: app.url.clone(),
        status: if app.is_draining() { NodeStatus::Draining } else { NodeStatus::Healthy },
        connections: app.connections.len() as u64,
        last_seen: Utc::now(),
        started_at: app.started_at,
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Writes the record with its TTL, plus an announcement when given.
pub async fn beat(app: &App, announce: Option<RegistryEventKind>) -> RedisResult<()> {
    let ttl_ms = (app.cfg.ttl_secs * 1000.0).ceil() as i64;
    let mut pipe = redis::pipe();
    pipe.atomic();
    write_record(&mut pipe, &app.cfg.key_prefix, &record(app), ttl_ms, Utc::now().timestamp_millis());
    if let Some(kind) = announce {
        let event = RegistryEvent { event: kind, node_id: app.node_id.clone() };
        pipe.publish(registry_channel(&app.cfg.key_prefix), event.to_json()).ignore();
    }
    let result = match app.redis.conn().await {
        Ok(mut c) => pipe.query_async(&mut c).await,
        Err(e) => Err(e),
    };
    app.redis.observe(&result);
    result
}

/// How often the connection count is looked at between heartbeats: a
/// changed count is written at once instead of at the next heartbeat, so
/// `/nodes` and the balancer's dashboard are at most about a second behind.
const COUNT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Heartbeats until the task is aborted; announces after every
/// (re)registration. Between heartbeats, rewrites the record when the
/// connection count changed (one pipelined write, at most once a second).
pub async fn heartbeat(app: Arc<App>) {
    let mut registered = false;
    let every = app.cfg.duration(app.cfg.heartbeat_secs);
    let check = every.min(COUNT_CHECK);
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat: Option<tokio::time::Instant> = None;
    let mut written_count = usize::MAX;
    loop {
        tick.tick().await;
        let count = app.connections.len();
        let due = last_beat.is_none_or(|t| t.elapsed() + check / 2 >= every);
        if !due && registered && count == written_count {
            continue;
        }
        let announce = (!registered).then_some(if app.is_draining() {
            RegistryEventKind::Draining
        } else {
            RegistryEventKind::Up
        });
        match beat(&app, announce).await {
            Ok(()) => {
                if !registered {
                    tracing::info!(node = %app.node_id, url = %app.url, "registered in the node registry");
                }
                registered = true;
                written_count = count;
                app.metrics.registry_written.set(Utc::now().timestamp());
                last_beat = Some(tokio::time::Instant::now());
            }
            Err(e) => {
                if registered {
                    tracing::warn!(error = %e, "registry heartbeat failed; will re-register");
                }
                registered = false;
            }
        }
    }
}

/// Removes the key and announces `down`.
pub async fn deregister(app: &App) -> RedisResult<()> {
    let key = node_key(&app.cfg.key_prefix, &app.node_id);
    let event = RegistryEvent { event: RegistryEventKind::Down, node_id: app.node_id.clone() };
    let mut pipe = redis::pipe();
    pipe.del(&key)
        .ignore()
        .zrem(index_key(&app.cfg.key_prefix), &app.node_id)
        .ignore()
        .publish(registry_channel(&app.cfg.key_prefix), event.to_json())
        .ignore();
    let mut c = app.redis.conn().await?;
    pipe.query_async(&mut c).await
}

/// Every valid record in the registry, for `/nodes`.
pub async fn list_nodes(app: &App) -> RedisResult<Vec<NodeRecord>> {
    let mut c = app.redis.conn().await?;
    switchboard_common::registry::read_all(&mut c, &app.cfg.key_prefix).await
}
