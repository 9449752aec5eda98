//! Choosing a request's node and connecting to it, for the two paths the
//! balancer forwards itself (WebSocket tunnels and plain requests): the route
//! (token → cookie → least loaded), the admission turn a new connection
//! waits for, and on a failed connect the retries `Cluster::reroute` allows
//! (the same node for a token route, the next least-loaded one otherwise).

use crate::cluster::Cluster;
use crate::refusal::{self, Refusal};
use crate::request::Request;
use crate::routing::{RouteDecision, RouteKind};
use crate::table::RouteNode;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Chooses the node for `req`. A request that starts a SignalR connection
/// (a negotiate, a WebSocket without an id) waits for its node's admission
/// turn or goes to another node; one a node already owns never waits.
pub async fn choose(cluster: &Cluster, req: &Request<'_>) -> Result<(Arc<RouteNode>, RouteKind), &'static Refusal> {
    let (node, kind) = match cluster.route(req) {
        RouteDecision::Node { node, kind } => (node, kind),
        RouteDecision::UnknownConnection => return Err(&refusal::UNKNOWN_CONNECTION),
        RouteDecision::NoNodeAvailable => return Err(&refusal::NO_NODE),
    };
    if req.starts_connection() && kind != RouteKind::Token {
        return cluster.admit(node, kind).await.ok_or(&refusal::NODES_BUSY);
    }
    Ok((node, kind))
}

/// Connects to `node`, and on failure to the nodes `Cluster::reroute`
/// allows; returns the node that answered and how it was chosen (a rerouted
/// request that had no token becomes a new client of its node).
pub async fn connect(
    cluster: &Cluster,
    mut node: Arc<RouteNode>,
    mut kind: RouteKind,
    tried: &mut Vec<String>,
) -> Result<(Arc<RouteNode>, RouteKind, TcpStream), &'static Refusal> {
    let timeout = Duration::from_millis(cluster.cfg.connect_timeout_ms);
    loop {
        match tokio::time::timeout(timeout, TcpStream::connect(node.addr)).await {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                return Ok((node, kind, upstream));
            }
            Ok(Err(e)) => tracing::debug!(node = %node.record.node_id, error = %e, "connect failed"),
            Err(_) => tracing::debug!(node = %node.record.node_id, "connect timed out"),
        }
        match cluster.reroute(&node, kind, tried) {
            Some((next, wait)) => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
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
