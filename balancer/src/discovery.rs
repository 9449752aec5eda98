//! Where backends come from: the Redis node registry.
//!
//! `RegistryWatcher` (a Pingora background service) subscribes to the
//! registry channel and re-reads every node's hash (the ids from the
//! registry's index, see `switchboard_common::registry`) on each
//! announcement and every `discovery_interval_ms`; announcements are hints,
//! the hashes are the truth. Each read builds a new `RoutingTable` and
//! swaps it in whole, then lets pingora-load-balancing's `Backends` pick up
//! the change through `RegistryDiscovery`. While Redis is unreachable the last
//! table stays (static stability). A node whose key vanishes without a `down`
//! announcement — as when Redis restarts empty — stays for `missing_grace_ms`
//! while it passes health checks, so a Redis restart does not empty the
//! cluster before the nodes' next heartbeat.

use crate::cluster::Cluster;
use crate::routing::affinity_cookie;
use crate::routing::Readiness;
use crate::table::{RouteNode, RoutingTable};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use futures_util::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::Backend;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_common::redis_target::{RedisConn, RedisTarget, Timeouts};
use switchboard_common::registry::{registry_channel, NodeRecord, RegistryEvent, RegistryEventKind};

const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Hands the routing table's nodes to pingora-load-balancing.
pub struct RegistryDiscovery {
    table: Arc<ArcSwap<RoutingTable>>,
}

impl RegistryDiscovery {
    pub fn new(table: Arc<ArcSwap<RoutingTable>>) -> Self {
        RegistryDiscovery { table }
    }
}

#[async_trait]
impl ServiceDiscovery for RegistryDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let backends = self.table.load().nodes.iter().map(|n| n.backend.clone()).collect();
        Ok((backends, HashMap::new()))
    }
}

/// `host:port` of an `http://host:port[/…]` URL.
pub fn authority(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?;
    let auth = rest.split(['/', '?', '#']).next()?;
    (!auth.is_empty() && !auth.contains('@')).then_some(auth)
}

async fn resolve(url: &str) -> Option<SocketAddr> {
    let auth = authority(url)?;
    if let Ok(addr) = auth.parse() {
        return Some(addr);
    }
    let lookup = tokio::time::timeout(REDIS_TIMEOUT, tokio::net::lookup_host(auth)).await.ok()?.ok()?;
    let addrs: Vec<SocketAddr> = lookup.collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied()
}

pub struct RegistryWatcher {
    cluster: Arc<Cluster>,
    target: RedisTarget,
    /// The key prefix as written in Redis (hash-tagged in a Redis Cluster).
    prefix: String,
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

impl RegistryWatcher {
    pub fn new(cluster: Arc<Cluster>) -> Result<Self, redis::RedisError> {
        let target = RedisTarget::open(cluster.cfg.redis.as_str())?;
        let prefix = target.key_prefix(&cluster.cfg.key_prefix);
        Ok(RegistryWatcher { cluster, target, prefix })
    }

    /// A client for one server: the current one (with Sentinel, the
    /// current master; in a cluster, the next member in turn).
    async fn client(&self) -> redis::RedisResult<redis::Client> {
        self.target.client(REDIS_TIMEOUT * 2).await
    }

    async fn read_registry(&self, conn: &mut Option<RedisConn>) -> redis::RedisResult<Vec<NodeRecord>> {
        if conn.is_none() {
            *conn = Some(self.target.connect(Timeouts { connect: REDIS_TIMEOUT, response: REDIS_TIMEOUT }).await?);
        }
        let Some(c) = conn.as_mut() else { return Ok(Vec::new()) };
        switchboard_common::registry::read_all(c, &self.prefix).await
    }

    /// Re-reads the registry and swaps in a new table; on failure keeps the old one.
    async fn refresh(&self, conn: &mut Option<RedisConn>, gone: &mut HashSet<String>) {
        let cluster = &self.cluster;
        let records = match self.read_registry(conn).await {
            Ok(r) => r,
            Err(e) => {
                if self.target.follows_failover() {
                    // The master may have moved: ask the sentinels next time.
                    *conn = None;
                }
                cluster.set_redis_up(false, Some(&e));
                cluster.metrics.discovery_events.with_label_values(&["refresh_failed"]).inc();
                tracing::debug!(error = %e, "registry read failed");
                return;
            }
        };
        cluster.set_redis_up(true, None);
        let old = cluster.table.load_full();
        let mut nodes: Vec<Arc<RouteNode>> = Vec::with_capacity(records.len());
        let mut seen: HashSet<String> = HashSet::new();
        for record in records {
            let id = record.node_id.clone();
            if !seen.insert(id.clone()) {
                continue;
            }
            gone.remove(&id);
            let previous = old.by_id(&id);
            let addr = match resolve(&record.url).await {
                Some(a) => a,
                None => match previous.filter(|p| p.record.url == record.url) {
                    Some(p) => p.addr,
                    None => {
                        tracing::warn!(node = %id, url = %record.url, "cannot resolve node url; not routing to it");
                        continue;
                    }
                },
            };
            let Ok(backend) = Backend::new(&addr.to_string()) else {
                continue;
            };
            let stats = cluster.stats_for(&id);
            if previous.is_none_or(|p| p.record.last_seen != record.last_seen) {
                stats.assigned_since_record.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            if previous.is_none() {
                // A node that joins a running cluster takes new clients slowly at first.
                if cluster.table_loaded.load(std::sync::atomic::Ordering::Acquire) {
                    stats.gate.restart_slowly(crate::node_admission::now_ms());
                }
                cluster.metrics.discovery_events.with_label_values(&["added"]).inc();
                tracing::info!(node = %id, %addr, status = record.status.as_str(), "node added");
            } else if previous.is_some_and(|p| p.record.status != record.status) {
                tracing::info!(node = %id, status = record.status.as_str(), "node status changed");
            }
            nodes.push(Arc::new(RouteNode {
                cookie: affinity_cookie(&cluster.cfg.cookie_secret, &id),
                record,
                backend,
                addr,
                stats,
                open_gauge: cluster.metrics.open_connections.with_label_values(&[&id]),
                missing_since: None,
            }));
        }
        // Nodes whose key vanished: keep them briefly unless they said goodbye or fail checks.
        let grace = Duration::from_millis(cluster.cfg.missing_grace_ms);
        for prev in old.nodes.iter().filter(|n| !seen.contains(&n.record.node_id)) {
            let since = prev.missing_since.unwrap_or_else(Instant::now);
            let keep = !gone.contains(&prev.record.node_id) && since.elapsed() < grace && cluster.ready(prev);
            if keep {
                nodes.push(Arc::new(RouteNode { missing_since: Some(since), ..RouteNode::clone(prev) }));
            } else {
                cluster.metrics.discovery_events.with_label_values(&["removed"]).inc();
                let _ = cluster.metrics.open_connections.remove_label_values(&[&prev.record.node_id]);
                tracing::info!(node = %prev.record.node_id, "node removed");
            }
        }
        nodes.sort_by(|a, b| a.record.node_id.cmp(&b.record.node_id));
        let ids: HashSet<String> = nodes.iter().map(|n| n.record.node_id.clone()).collect();
        cluster.metrics.nodes.set(nodes.len() as i64);
        cluster.table.store(Arc::new(RoutingTable::new(nodes)));
        cluster.table_loaded.store(true, std::sync::atomic::Ordering::Release);
        cluster.forget_stats_except(&ids);
        if let Err(e) = cluster.backends.update(|_| {}).await {
            tracing::warn!(error = %e, "backend update failed");
        }
    }

    async fn subscribe(&self) -> redis::RedisResult<redis::aio::PubSubStream> {
        let client = self.client().await?;
        let mut pubsub =
            tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub()).await.map_err(|_| timed_out())??;
        pubsub.subscribe(registry_channel(&self.prefix)).await?;
        Ok(pubsub.into_on_message())
    }

    async fn watch(&self) {
        let mut conn: Option<RedisConn> = None;
        let mut gone: HashSet<String> = HashSet::new();
        let mut events: Option<redis::aio::PubSubStream> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(self.cluster.cfg.discovery_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if events.is_none() {
                match self.subscribe().await {
                    Ok(s) => {
                        events = Some(s);
                        tracing::info!("watching registry announcements");
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "registry subscribe failed");
                        self.cluster.set_redis_up(false, Some(&e));
                    }
                }
            }
            let next_event = async {
                match events.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => self.refresh(&mut conn, &mut gone).await,
                msg = next_event => match msg {
                    Some(msg) => {
                        match RegistryEvent::parse(msg.get_payload_bytes()) {
                            Ok(ev) => {
                                let label = match ev.event {
                                    RegistryEventKind::Up => "up",
                                    RegistryEventKind::Draining => "draining",
                                    RegistryEventKind::Down => "down",
                                };
                                self.cluster.metrics.discovery_events.with_label_values(&[label]).inc();
                                tracing::debug!(node = %ev.node_id, event = label, "registry announcement");
                                if ev.event == RegistryEventKind::Down {
                                    gone.insert(ev.node_id);
                                }
                            }
                            Err(e) => {
                                self.cluster.metrics.discovery_events.with_label_values(&["invalid"]).inc();
                                tracing::warn!(error = %e, "ignoring malformed registry announcement");
                                continue;
                            }
                        }
                        self.refresh(&mut conn, &mut gone).await;
                    }
                    None => {
                        events = None;
                        self.cluster.set_redis_up(false, None);
                    }
                }
            }
        }
    }
}

#[async_trait]
impl BackgroundService for RegistryWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = self.watch() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::authority;

    #[test]
    fn authorities_are_extracted_from_http_urls_only() {
        assert_eq!(authority("http://node-1:5000"), Some("node-1:5000"));
        assert_eq!(authority("http://127.0.0.1:5000/x?y"), Some("127.0.0.1:5000"));
        assert_eq!(authority("https://x:1"), None);
        assert_eq!(authority("http://user@x:1"), None);
        assert_eq!(authority("http://"), None);
    }
}
