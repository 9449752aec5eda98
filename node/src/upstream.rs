//! Upstream events, in Azure SignalR Service's upstream format: with
//! `upstream_url` set, the node tells the application's backend what its
//! clients do, by `POST`ing to that URL with the headers `X-ASRS-Hub`,
//! `X-ASRS-Category` (`connections` or `messages`), `X-ASRS-Event`
//! (`connected`, `disconnected`, or the invoked method's name),
//! `X-ASRS-Connection-Id`, `X-ASRS-User-Id` (when the connection is a
//! user's) and `X-ASRS-Signature` (`sha256=` and the hex HMAC-SHA256 of the
//! connection id with the access key).
//!
//! - `connected` (body `{}`) and `disconnected` (body `{"error": null}`)
//!   are fired and forgotten, retried `upstream_retries` times after a
//!   failure or a 5xx; the backend may answer `connected` with
//!   `{"groups": ["…"]}`, and the connection joins those groups.
//! - An invocation of a method the hub does not define goes upstream (body:
//!   the invocation as JSON, `{"type":1,"invocationId":…,"target":…,
//!   "arguments":[…]}`); a 2xx answer's JSON body is the completion's result
//!   (an empty body: none), any other status, a body that is not JSON or
//!   larger than half the connection's byte budget, or
//!   `upstream_timeout_secs` passing is an error completion; an invocation
//!   without an id gets none.
//!
//! Events run in tasks of their own; an invocation is awaited by its
//! connection's hub loop, as ASP.NET Core runs one invocation of a client at
//! a time, so a client cannot have more calls in flight than one, and waits
//! for its answers rather than piling them up. Other connections never
//! wait for the backend. At most `upstream_concurrency` calls are in flight
//! per node; events past `MAX_WAITING` waiting ones are dropped and counted,
//! so a dead backend costs bounded memory.

use crate::api::auth::AccessKey;
use futures_util::future::BoxFuture;
use prometheus::IntCounterVec;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Events that may wait for a turn at once; more are dropped.
const MAX_WAITING: usize = 10_000;
/// Largest answer to an event read from the backend.
const MAX_EVENT_ANSWER_BYTES: usize = 64 * 1024;

pub struct Upstream {
    url: String,
    client: reqwest::Client,
    key: AccessKey,
    turns: Semaphore,
    waiting: AtomicUsize,
    timeout: Duration,
    retries: u32,
    /// Largest answer to an invocation: half a connection's byte budget, as
    /// a `GetHistory` page.
    max_answer: usize,
    /// Calls by category and outcome.
    calls: IntCounterVec,
}

/// Why a call did not give an answer.
#[derive(Debug)]
enum Failure {
    Timeout,
    Unreachable(String),
    Status(u16),
    NotJson,
    TooLarge,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("the application's backend did not answer in time"),
            Failure::Unreachable(e) => write!(f, "the application's backend is unreachable ({e})"),
            Failure::Status(s) => write!(f, "the application's backend answered {s}"),
            Failure::NotJson => f.write_str("the application's backend answered with a body that is not JSON"),
            Failure::TooLarge => f.write_str("the application's backend answered with a body too large to pass on"),
        }
    }
}

impl Failure {
    fn label(&self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Unreachable(_) => "unreachable",
            Failure::Status(_) => "status",
            Failure::NotJson => "not_json",
            Failure::TooLarge => "too_large",
        }
    }
}

impl Upstream {
    /// The upstream the settings name, if any (validated by `config`).
    pub fn new(cfg: &crate::config::NodeConfig, calls: IntCounterVec) -> Result<Option<Arc<Self>>, String> {
        if cfg.upstream_url.is_empty() {
            return Ok(None);
        }
        let key = AccessKey::parse(&cfg.api_access_key).map_err(|e| format!("api_access_key: {e}"))?;
        let timeout = cfg.duration(cfg.upstream_timeout_secs);
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("upstream client: {e}"))?;
        Ok(Some(Arc::new(Upstream {
            url: cfg.upstream_url.trim().to_string(),
            client,
            key,
            turns: Semaphore::new(cfg.upstream_concurrency.max(1)),
            waiting: AtomicUsize::new(0),
            timeout,
            retries: cfg.upstream_retries,
            max_answer: (cfg.max_buffered_bytes / 2).max(1),
            calls,
        })))
    }

    /// One call: its answer's JSON (`Null` for an empty body), within the
    /// timeout (waiting for a turn included).
    async fn call(
        &self,
        category: &str,
        event: &str,
        connection_id: &str,
        user: Option<&str>,
        body: Vec<u8>,
        max_answer: usize,
    ) -> Result<Value, Failure> {
        let attempt = async {
            let _turn = self.turns.acquire().await.map_err(|_| Failure::Unreachable("shutting down".into()))?;
            let mut request = self
                .client
                .post(&self.url)
                .header("Content-Type", "application/json")
                .header("X-ASRS-Hub", crate::api::auth::HUB)
                .header("X-ASRS-Category", category)
                .header("X-ASRS-Event", event)
                .header("X-ASRS-Connection-Id", connection_id)
                .header("X-ASRS-Signature", self.key.signature(connection_id));
            if let Some(user) = user {
                request = request.header("X-ASRS-User-Id", user);
            }
            let mut response = request.body(body).send().await.map_err(|e| Failure::Unreachable(e.to_string()))?;
            let status = response.status();
            if !status.is_success() {
                return Err(Failure::Status(status.as_u16()));
            }
            // Read as it comes, never past the limit (a chunked answer has no length to check first).
            let mut bytes = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| Failure::Unreachable(e.to_string()))? {
                if bytes.len() + chunk.len() > max_answer {
                    return Err(Failure::TooLarge);
                }
                bytes.extend_from_slice(&chunk);
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            serde_json::from_slice(&bytes).map_err(|_| Failure::NotJson)
        };
        let outcome = tokio::time::timeout(self.timeout, attempt).await.unwrap_or(Err(Failure::Timeout));
        let label = outcome.as_ref().map_or_else(Failure::label, |_| "ok");
        self.calls.with_label_values(&[category, label]).inc();
        outcome
    }

    /// An event, retried after failures (not after a 4xx: the backend said no).
    async fn event(&self, event: &str, connection_id: &str, user: Option<&str>, body: Value) -> Option<Value> {
        let body = body.to_string().into_bytes();
        let mut delay = Duration::from_millis(200);
        for attempt in 0..=self.retries {
            match self.call("connections", event, connection_id, user, body.clone(), MAX_EVENT_ANSWER_BYTES).await {
                Ok(answer) => return Some(answer),
                Err(Failure::Status(s)) if (400..500).contains(&s) => return None,
                Err(e) if attempt == self.retries => {
                    tracing::info!(event, error = %e, "upstream event not delivered");
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        None
    }

    /// Runs `work` in a task of its own, unless too many already wait.
    fn spawn_event(self: &Arc<Self>, work: impl std::future::Future<Output = ()> + Send + 'static) {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.calls.with_label_values(&["connections", "dropped"]).inc();
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            work.await;
            this.waiting.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// `connected`, once a connection completed its handshake; `join`
    /// gets the groups the backend answers with.
    pub fn connected(
        self: &Arc<Self>,
        connection_id: String,
        user: Option<String>,
        join: impl FnOnce(Vec<String>) -> BoxFuture<'static, ()> + Send + 'static,
    ) {
        let this = self.clone();
        self.spawn_event(async move {
            let answer = this.event("connected", &connection_id, user.as_deref(), json!({})).await;
            let groups = answer.as_ref().and_then(|a| a.get("groups")).and_then(Value::as_array).cloned();
            let groups: Vec<String> =
                groups.unwrap_or_default().iter().filter_map(Value::as_str).map(String::from).collect();
            if !groups.is_empty() {
                join(groups).await;
            }
        });
    }

    /// `disconnected`, once `conn` is gone.
    pub fn disconnected(self: &Arc<Self>, connection_id: String, user: Option<String>) {
        let this = self.clone();
        self.spawn_event(async move {
            this.event("disconnected", &connection_id, user.as_deref(), json!({"error": null})).await;
        });
    }

    /// An invocation of a method the hub does not define, by the connection
    /// `connection_id` (of `user`): the backend's answer, the completion's
    /// result (`Null`: none), or why there is none.
    pub async fn invoke(
        &self,
        (connection_id, user): (&str, Option<&str>),
        invocation_id: Option<&str>,
        target: &str,
        arguments: Vec<Value>,
    ) -> Result<Value, String> {
        let body = json!({"type": 1, "invocationId": invocation_id, "target": target, "arguments": arguments});
        let body = body.to_string().into_bytes();
        let answer = self.call("messages", target, connection_id, user, body, self.max_answer).await;
        answer.map_err(|e| format!("HubException: {e}."))
    }
}
