//! The public proxy: Pingora `ProxyHttp` hooks around `Cluster::route`, for
//! the requests the balancer does not forward itself (`tunnel` owns
//! WebSocket upgrades, `forward` requests without a body): those with a body
//! (long-poll sends), HTTP/1.0, `Expect` and pipelined heads. The policy is
//! the one in `admission` and `Cluster::reroute` that the other paths share.
//!
//! ```text
//! request_filter      public paths only; per-IP rate → route
//!                     (token → cookie → least loaded) → per-node admission
//!                     of new connections → 404 / 503 / 429 early
//! upstream_peer       the chosen node; connect timeout, idle-bounded reads
//! fail_to_connect     count the failure against the node; retry a token
//!                     route on its node after a short wait, any other
//!                     request on the next least-loaded node
//! error_while_proxy   a negotiate whose node went away with it in flight
//!                     goes to the next node too
//! upstream_request_filter  X-Forwarded-* headers
//! response_filter     Set-Cookie for new assignments; latency
//! logging             status metrics; the ctx drop releases counters
//! ```
//!
//! Server-Sent Events streams and long polls pass through Pingora's streaming
//! body path unbuffered; their idle limit is `idle_timeout_secs` on both
//! sides instead of Pingora's 60 s default. (A request asking for some other
//! upgrade than WebSocket would pass the same way; none of the nodes' routes
//! accepts one.)

use crate::access_log::{self, Entry};
use crate::admission;
use crate::cluster::Cluster;
use crate::public_surface;
use crate::refusal::{self, Refusal};
use crate::request::{Origin, Request};
use crate::routing::{set_cookie_header, RouteDecision, RouteKind};
use crate::table::RouteNode;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const POOLED_IDLE: Duration = Duration::from_secs(15);

pub struct SwitchboardProxy {
    cluster: Arc<Cluster>,
}

impl SwitchboardProxy {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        SwitchboardProxy { cluster }
    }
}

/// One in-flight request counted against a node, released on drop.
pub struct InFlight {
    node: Arc<RouteNode>,
}

impl InFlight {
    pub fn new(node: Arc<RouteNode>) -> Self {
        node.stats.open.fetch_add(1, Ordering::Relaxed);
        node.open_gauge.inc();
        InFlight { node }
    }

    pub fn node(&self) -> &Arc<RouteNode> {
        &self.node
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.node.stats.open.fetch_sub(1, Ordering::Relaxed);
        self.node.open_gauge.dec();
    }
}

#[derive(Default)]
pub struct RequestCtx {
    node: Option<Arc<RouteNode>>,
    kind: Option<RouteKind>,
    tried: Vec<String>,
    set_cookie: bool,
    in_flight: Option<InFlight>,
    upstream_start: Option<Instant>,
    /// When the request began, for the access log.
    started: Option<Instant>,
    /// How long to wait before the next connect (a token route's retry).
    retry_wait: Option<Duration>,
    /// The `X-Forwarded-*` headers, from the request's facts (set on every
    /// attempt's upstream request).
    forwarded: Vec<(&'static str, String)>,
}

async fn respond(session: &mut Session, refusal: &Refusal) -> Result<bool> {
    let mut resp = ResponseHeader::build(refusal.status, Some(4))?;
    resp.insert_header("Content-Type", refusal.content_type)?;
    resp.insert_header("Content-Length", refusal.body.len().to_string())?;
    resp.insert_header("Cache-Control", "no-store")?;
    if refusal.retry_after() {
        resp.insert_header("Retry-After", "1")?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(Bytes::from_static(refusal.body.as_bytes())), true).await?;
    Ok(true)
}

#[async_trait]
impl ProxyHttp for SwitchboardProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let cluster = &self.cluster;
        if cluster.access_log.is_some() {
            ctx.started = Some(Instant::now());
        }
        let is_upgrade = session.is_upgrade_req();
        let request = facts(session, &cluster.cfg.cookie_name, is_upgrade);
        if !public_surface::serves(request.path()) {
            return respond(session, &refusal::NOT_PUBLIC).await;
        }
        let starts_connection = request.starts_connection();
        if starts_connection && !cluster.admit_new_connection(request.peer) {
            return respond(session, &refusal::RATE_LIMITED).await;
        }
        ctx.forwarded = admission::forwarded(request.peer, request.host.as_deref(), request.tls);
        match cluster.route(&request) {
            RouteDecision::Node { node, kind } => {
                // A new SignalR connection waits for its node's admission
                // turn (or goes to another node); an existing one never does.
                let admitted = if starts_connection && kind != RouteKind::Token {
                    cluster.admit(node, kind).await
                } else {
                    Some((node, kind))
                };
                let Some((node, kind)) = admitted else { return respond(session, &refusal::NODES_BUSY).await };
                ctx.set_cookie = kind == RouteKind::New;
                ctx.kind = Some(kind);
                ctx.node = Some(node);
            }
            RouteDecision::UnknownConnection => return respond(session, &refusal::UNKNOWN_CONNECTION).await,
            RouteDecision::NoNodeAvailable => return respond(session, &refusal::NO_NODE).await,
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        if let Some(wait) = ctx.retry_wait.take() {
            tokio::time::sleep(wait).await;
        }
        let node =
            ctx.node.clone().ok_or_else(|| Error::explain(pingora::ErrorType::InternalError, "no route chosen"))?;
        let cfg = &self.cluster.cfg;
        let mut peer = HttpPeer::new(node.addr, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_millis(cfg.connect_timeout_ms));
        peer.options.read_timeout = Some(Duration::from_secs(cfg.idle_timeout_secs));
        // Pooled connections idle for less than the nodes' head timeout
        // (30 s by default), so a node never closes one as it is reused.
        peer.options.idle_timeout = Some(POOLED_IDLE);
        ctx.in_flight = Some(InFlight::new(node));
        ctx.upstream_start = Some(Instant::now());
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let Some(node) = ctx.node.take() else { return e };
        tracing::debug!(node = %node.record.node_id, error = %e, "connect failed");
        ctx.in_flight = None;
        let kind = ctx.kind.unwrap_or(RouteKind::New);
        if let Some((next, wait)) = self.cluster.reroute(&node, kind, &mut ctx.tried) {
            if kind != RouteKind::Token {
                ctx.kind = Some(RouteKind::New);
                ctx.set_cookie = true;
            }
            ctx.node = Some(next);
            ctx.retry_wait = (!wait.is_zero()).then_some(wait);
            e.set_retry(true);
        }
        e
    }

    /// A negotiate whose node went away with the request in flight (a pooled
    /// connection to a node that was just killed, say) is tried again on the
    /// next node, as a failed connect is: it has no body and nothing of the
    /// answer has reached the client, so the client cannot tell. Anything
    /// else keeps Pingora's rule (idempotent requests on reused connections
    /// only), because a node may already have acted on it.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let req = session.req_header();
        let negotiate = req.method == http::Method::POST && req.uri.path().ends_with("/negotiate");
        let untouched = session.response_written().is_none() && !session.as_ref().retry_buffer_truncated();
        if !(negotiate && untouched) {
            if !req.method.is_idempotent() || session.as_ref().retry_buffer_truncated() {
                e.set_retry(false);
            } else {
                e.retry.decide_reuse(client_reused);
            }
            return e;
        }
        let Some(node) = ctx.node.take() else { return e };
        tracing::debug!(node = %node.record.node_id, error = %e, "negotiate failed in flight");
        ctx.in_flight = None;
        match self.cluster.reroute(&node, RouteKind::New, &mut ctx.tried) {
            Some((next, _)) => {
                ctx.kind = Some(RouteKind::New);
                ctx.set_cookie = true;
                ctx.node = Some(next);
                e.set_retry(true);
            }
            None => e.set_retry(false),
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // `insert_header` replaces whatever the client sent under these names.
        for (name, value) in &ctx.forwarded {
            upstream.insert_header(*name, value.as_str())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(start) = ctx.upstream_start.take() {
            self.cluster.metrics.upstream_latency.observe(start.elapsed().as_secs_f64());
        }
        if ctx.set_cookie {
            if let Some(node) = &ctx.node {
                resp.append_header("Set-Cookie", set_cookie_header(&self.cluster.cfg.cookie_name, &node.cookie))?;
            }
        }
        Ok(())
    }

    /// A client abandoning a long poll or event stream is normal SignalR
    /// behaviour, not an error worth an ERROR line.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        error.esource() == &pingora::ErrorSource::Downstream && error.etype() == &pingora::ErrorType::ConnectionClosed
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map(|r| r.status.as_u16()).unwrap_or(0);
        self.cluster.metrics.count_request(status);
        if let (Some(log), Some(started)) = (&self.cluster.access_log, ctx.started) {
            let request = facts(session, &self.cluster.cfg.cookie_name, session.is_upgrade_req());
            log.record(&Entry {
                request: &request,
                // No answer was written: the client left first (nginx's 499).
                status: if status == 0 { access_log::CLIENT_LEFT } else { status },
                node: ctx.node.as_ref().map(|n| n.record.node_id.as_str()),
                route: ctx.kind.map_or("-", RouteKind::label),
                duration: started.elapsed(),
                bytes_in: session.body_bytes_read() as u64,
                bytes_out: session.body_bytes_sent() as u64,
            });
        }
    }
}

/// The facts of the request a session holds (borrowed from its head).
fn facts<'s>(session: &'s Session, cookie_name: &str, upgrade: bool) -> Request<'s> {
    let origin = Origin {
        peer: session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()),
        tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
        cookie_name,
    };
    Request::from_header(session.req_header(), origin, upgrade)
}
