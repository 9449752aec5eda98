//! Choosing a tunnel's node and connecting to it: the route (token → cookie
//! → least loaded), the admission turn a new connection waits for, and on a
//! failed connect the retries `Cluster::reroute` allows (the same node for a
//! token route, the next least-loaded one otherwise).

use crate::cluster::Cluster;
use crate::refusal::{self, Refusal};
use crate::request::Request;
use crate::routing::{RouteDecision, RouteKind};
use crate::table::RouteNode;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Chooses a node and connects to it, retrying other nodes as
/// `Cluster::reroute` allows.
pub(super) async fn connect(
    cluster: &Cluster,
    req: &Request<'_>,
) -> Result<(Arc<RouteNode>, RouteKind, TcpStream), &'static Refusal> {
    let (mut node, mut kind) = match cluster.route(req) {
        RouteDecision::Node { node, kind } => (node, kind),
        RouteDecision::UnknownConnection => return Err(&refusal::UNKNOWN_CONNECTION),
        RouteDecision::NoNodeAvailable => return Err(&refusal::NO_NODE),
    };
    // A WebSocket without an id starts a connection: it waits for its node's
    // admission turn (or goes to another node), as a negotiate does.
    if req.starts_connection() {
        (node, kind) = cluster.admit(node, kind).await.ok_or(&refusal::NODES_BUSY)?;
    }
    let timeout = Duration::from_millis(cluster.cfg.connect_timeout_ms);
    let mut tried: Vec<String> = Vec::new();
    loop {
        match tokio::time::timeout(timeout, TcpStream::connect(node.addr)).await {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                return Ok((node, kind, upstream));
            }
            Ok(Err(e)) => tracing::debug!(node = %node.record.node_id, error = %e, "websocket connect failed"),
            Err(_) => tracing::debug!(node = %node.record.node_id, "websocket connect timed out"),
        }
        match cluster.reroute(&node, kind, &mut tried) {
            Some((next, wait)) => {
                tokio::time::sleep(wait).await;
                if kind != RouteKind::Token {
                    kind = RouteKind::New;
                }
                node = next;
            }
            // A connection whose node cannot be reached now is not unknown:
            // 502, which the client may retry, never 404.
            None => return Err(&refusal::NODE_UNREACHABLE),
        }
    }
}
