//! The Redis backplane that fans hub messages out to every node.
//!
//! Channels: `{prefix}:bp:all` for broadcasts and `{prefix}:bp:group:{name}`
//! per group (a node subscribes only while it has local members). Every
//! payload is an `Envelope` naming the sending instance; the sender delivers to
//! its own clients directly and ignores its own echo, so each client receives
//! each message exactly once.
//!
//! Publishing goes through a bounded queue drained by one task, which batches
//! what is waiting into one pipeline (publish + history append) and, while
//! Redis is unreachable, retries the batch with backoff instead of dropping it.
//! Local clients keep being served meanwhile; only a queue overflow drops
//! messages, and that is counted. The subscriber task reconnects with backoff
//! and resubscribes to the broadcast channel and every current group.

use crate::app::App;
use crate::history::{self, HistoryEntry};
use crate::protocol::{HubMessage, HubProtocol, Outgoing, RECORD_SEPARATOR};
use crate::redis_link::CONNECT_TIMEOUT;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

const QUEUE_CAPACITY: usize = 10_000;
const BATCH: usize = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// Sending node instance.
    origin: String,
    /// One JSON hub-protocol record, separator included. JSON is the
    /// backplane's neutral form: each receiving node encodes it once per
    /// protocol its clients speak.
    frame: String,
}

pub struct Publication {
    channel: String,
    payload: String,
    history: Option<HistoryEntry>,
}

enum SubCommand {
    Subscribe(String),
    Unsubscribe(String),
}

pub struct Backplane {
    /// Unique per process, so a restarted node with the same id is still "other".
    instance: String,
    all_channel: String,
    group_prefix: String,
    history_key: String,
    queue: mpsc::Sender<Publication>,
    queue_rx: Mutex<Option<mpsc::Receiver<Publication>>>,
    subs: mpsc::UnboundedSender<SubCommand>,
    subs_rx: Mutex<Option<mpsc::UnboundedReceiver<SubCommand>>>,
    pending: AtomicUsize,
}

fn backoff(current: Duration) -> Duration {
    (current * 2).min(MAX_BACKOFF)
}

impl Backplane {
    pub fn new(prefix: &str, node_id: &str) -> Self {
        let (queue, queue_rx) = mpsc::channel(QUEUE_CAPACITY);
        let (subs, subs_rx) = mpsc::unbounded_channel();
        let nonce: u64 = rand::random();
        Backplane {
            instance: format!("{node_id}/{nonce:016x}"),
            all_channel: format!("{prefix}:bp:all"),
            group_prefix: format!("{prefix}:bp:group:"),
            history_key: history::stream_key(prefix),
            queue,
            queue_rx: Mutex::new(Some(queue_rx)),
            subs,
            subs_rx: Mutex::new(Some(subs_rx)),
            pending: AtomicUsize::new(0),
        }
    }

    pub fn history_key(&self) -> &str {
        &self.history_key
    }

    fn group_channel(&self, group: &str) -> String {
        format!("{}{group}", self.group_prefix)
    }

    fn enqueue(&self, app: &App, channel: String, out: &Outgoing, history: Option<HistoryEntry>) {
        let frame = out.bytes(HubProtocol::Json);
        let envelope = Envelope { origin: self.instance.clone(), frame: String::from_utf8_lossy(&frame).into_owned() };
        let payload = serde_json::to_string(&envelope).unwrap_or_default();
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.queue.try_send(Publication { channel, payload, history }).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            app.metrics.backplane_dropped.inc();
            tracing::error!("backplane publish queue is full; message not sent to other nodes");
        }
    }

    /// Sends a record to every other node's clients (and records history).
    pub fn broadcast(&self, app: &App, out: &Outgoing, history: Option<HistoryEntry>) {
        self.enqueue(app, self.all_channel.clone(), out, history);
    }

    pub fn to_group(&self, app: &App, group: &str, out: &Outgoing) {
        self.enqueue(app, self.group_channel(group), out, None);
    }

    pub fn subscribe_group(&self, group: &str) {
        let _ = self.subs.send(SubCommand::Subscribe(group.to_string()));
    }

    pub fn unsubscribe_group(&self, group: &str) {
        let _ = self.subs.send(SubCommand::Unsubscribe(group.to_string()));
    }

    /// Waits until every accepted publication reached Redis, or `limit` passes.
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pending.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Starts the publisher and subscriber tasks.
    pub fn spawn(app: &Arc<App>) {
        let bp = &app.backplane;
        let queue_rx = bp.queue_rx.lock().ok().and_then(|mut g| g.take());
        let subs_rx = bp.subs_rx.lock().ok().and_then(|mut g| g.take());
        if let (Some(q), Some(s)) = (queue_rx, subs_rx) {
            tokio::spawn(publisher(app.clone(), q));
            tokio::spawn(subscriber(app.clone(), s));
        }
    }

    /// Delivers a payload received from Redis to local clients.
    fn receive(&self, app: &App, channel: &str, payload: &[u8]) {
        let target = if channel == self.all_channel {
            None
        } else if let Some(g) = channel.strip_prefix(&self.group_prefix) {
            Some(g)
        } else {
            return;
        };
        let envelope: Envelope = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                app.metrics.backplane_invalid.inc();
                tracing::warn!(%channel, error = %e, "ignoring malformed backplane payload");
                return;
            }
        };
        if envelope.origin == self.instance {
            return;
        }
        // Only well-formed invocations are forwarded to clients.
        let record = envelope.frame.as_bytes();
        let message = match record.split_last() {
            Some((&RECORD_SEPARATOR, body)) => HubProtocol::Json.parse(body).ok(),
            _ => None,
        };
        let Some(message @ HubMessage::Invocation { .. }) = message else {
            app.metrics.backplane_invalid.inc();
            tracing::warn!(%channel, origin = %envelope.origin, "ignoring backplane payload that is not one hub invocation");
            return;
        };
        app.metrics.backplane_received.inc();
        let out = Outgoing::with_json(message, Bytes::from(envelope.frame));
        match target {
            None => app.deliver_all(&out),
            Some(g) => app.deliver_group(g, &out),
        }
    }
}

fn retryable(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

async fn publisher(app: Arc<App>, mut rx: mpsc::Receiver<Publication>) {
    let bp = &app.backplane;
    let mut batch: Vec<Publication> = Vec::with_capacity(BATCH);
    let mut delay = Duration::from_millis(100);
    loop {
        if batch.is_empty() && rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        for p in &batch {
            pipe.publish(&p.channel, &p.payload).ignore();
            if let Some(h) = &p.history {
                history::append(&mut pipe, &bp.history_key, app.cfg.history_len, h);
            }
        }
        let result: redis::RedisResult<()> = match app.redis.conn().await {
            Ok(mut c) => pipe.query_async(&mut c).await,
            Err(e) => Err(e),
        };
        app.redis.observe(&result);
        match result {
            Ok(()) => {
                app.metrics.backplane_published.inc_by(batch.len() as u64);
                delay = Duration::from_millis(100);
            }
            Err(e) if retryable(&e) => {
                app.metrics.backplane_publish_failures.inc();
                tracing::debug!(error = %e, queued = batch.len(), "publish failed; retrying");
                tokio::time::sleep(delay).await;
                delay = backoff(delay);
                continue;
            }
            Err(e) => {
                app.metrics.backplane_dropped.inc_by(batch.len() as u64);
                tracing::error!(error = %e, "redis refused a publish batch; dropped");
            }
        }
        bp.pending.fetch_sub(batch.len(), Ordering::AcqRel);
        batch.clear();
    }
}

async fn subscriber(app: Arc<App>, mut cmds: mpsc::UnboundedReceiver<SubCommand>) {
    let bp = &app.backplane;
    let mut delay = Duration::from_millis(100);
    loop {
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, app.redis.client.get_async_pubsub()).await;
        if let Ok(Ok(pubsub)) = connected {
            let (mut sink, mut stream) = pubsub.split();
            let mut channels = vec![bp.all_channel.clone()];
            channels.extend(app.groups.groups().iter().map(|g| bp.group_channel(g)));
            match sink.subscribe(&channels).await {
                Ok(()) => {
                    app.redis.set_up(true, None);
                    tracing::info!(channels = channels.len(), "backplane subscribed");
                    delay = Duration::from_millis(100);
                    loop {
                        tokio::select! {
                            msg = stream.next() => match msg {
                                Some(m) => bp.receive(&app, m.get_channel_name(), m.get_payload_bytes()),
                                None => break,
                            },
                            cmd = cmds.recv() => {
                                let r = match cmd {
                                    Some(SubCommand::Subscribe(g)) => sink.subscribe(bp.group_channel(&g)).await,
                                    Some(SubCommand::Unsubscribe(g)) => sink.unsubscribe(bp.group_channel(&g)).await,
                                    None => return,
                                };
                                if r.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    app.redis.set_up(false, None);
                    tracing::warn!("backplane subscription lost; reconnecting");
                }
                Err(e) => app.redis.set_up(false, Some(&e)),
            }
        } else if let Ok(Err(e)) = connected {
            app.redis.set_up(false, Some(&e));
        } else {
            app.redis.set_up(false, None);
        }
        tokio::time::sleep(delay).await;
        delay = backoff(delay);
    }
}
