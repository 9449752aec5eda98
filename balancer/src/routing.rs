//! How a request picks its node, in the order of the design: (1) a SignalR
//! transport request's `?id=` names its owner node, and goes there — draining
//! included — or gets a fast 404 when that node is gone; (2) a valid affinity
//! cookie naming a live, non-draining node; (3) otherwise the least-loaded
//! node that accepts new clients, ties broken at random, with a new cookie.
//! Pure decisions over a table snapshot; no I/O.

use crate::cluster::{Cluster, RouteNode, RoutingTable};
use std::sync::Arc;
use switchboard_common::token;

/// The affinity cookie value for a node: a keyed FNV-1a hash, opaque (never an
/// address) and the same on every balancer replica that shares the secret.
pub fn affinity_cookie(secret: &str, node_id: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in secret.bytes().chain([0u8]).chain(node_id.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Longest cookie value considered; anything longer is tampering.
const MAX_COOKIE_VALUE: usize = 64;

/// Finds `name` in a `Cookie` header value.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').map(str::trim).find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"')).filter(|v| v.len() <= MAX_COOKIE_VALUE)
    })
}

pub fn set_cookie_header(name: &str, value: &str) -> String {
    format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Token,
    Cookie,
    New,
}

impl RouteKind {
    pub fn label(self) -> &'static str {
        match self {
            RouteKind::Token => "token",
            RouteKind::Cookie => "cookie",
            RouteKind::New => "new",
        }
    }
}

pub enum RouteDecision {
    Node {
        node: Arc<RouteNode>,
        kind: RouteKind,
    },
    /// `?id=` names no live node: the client must negotiate again (404).
    UnknownConnection,
    /// No node accepts new clients (503).
    NoNodeAvailable,
}

/// Decides for a request with query `?id=` (if any) and affinity cookie (if
/// any). Refusals are counted here; routed requests are counted by the caller,
/// which may still retry elsewhere (`Cluster::count_route`).
pub fn decide(cluster: &Cluster, table: &RoutingTable, id: Option<&str>, cookie: Option<&str>) -> RouteDecision {
    let decision = choose(cluster, table, id, cookie);
    let refused = match decision {
        RouteDecision::Node { .. } => None,
        RouteDecision::UnknownConnection => Some("unknown_connection"),
        RouteDecision::NoNodeAvailable => Some("no_node"),
    };
    if let Some(kind) = refused {
        cluster.metrics.routing_decisions.with_label_values(&[kind]).inc();
    }
    decision
}

fn choose(cluster: &Cluster, table: &RoutingTable, id: Option<&str>, cookie: Option<&str>) -> RouteDecision {
    if let Some(id) = id {
        return match token::owner_of(id).and_then(|owner| table.by_id(&owner)) {
            Some(node) if cluster.ready(node) => RouteDecision::Node { node: node.clone(), kind: RouteKind::Token },
            _ => RouteDecision::UnknownConnection,
        };
    }
    if let Some(node) = cookie.and_then(|c| table.by_cookie(c)) {
        if cluster.accepts_new(node) {
            return RouteDecision::Node { node: node.clone(), kind: RouteKind::Cookie };
        }
    }
    match least_loaded(cluster, table, &[]) {
        Some(node) => RouteDecision::Node { node, kind: RouteKind::New },
        None => RouteDecision::NoNodeAvailable,
    }
}

/// The node accepting new clients with the lowest load, skipping `exclude`.
pub fn least_loaded(cluster: &Cluster, table: &RoutingTable, exclude: &[String]) -> Option<Arc<RouteNode>> {
    let mut best: Option<(&Arc<RouteNode>, u64, u32)> = None;
    for node in &table.nodes {
        if exclude.contains(&node.record.node_id) || !cluster.accepts_new(node) {
            continue;
        }
        let load = node.load();
        let tie: u32 = rand::random();
        if best.is_none_or(|(_, l, t)| load < l || (load == l && tie < t)) {
            best = Some((node, load, tie));
        }
    }
    best.map(|(n, _, _)| n.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_opaque_stable_and_keyed() {
        let a = affinity_cookie("s", "node-1");
        assert_eq!(a, affinity_cookie("s", "node-1"));
        assert_ne!(a, affinity_cookie("s", "node-2"));
        assert_ne!(a, affinity_cookie("other", "node-1"));
        assert!(!a.contains("node") && a.len() == 16);
    }

    #[test]
    fn cookie_values_are_found_and_oversized_ones_ignored() {
        let h = "a=1; switchboard_affinity=abc ; b=2";
        assert_eq!(cookie_value(h, "switchboard_affinity"), Some("abc"));
        assert_eq!(cookie_value(h, "missing"), None);
        assert_eq!(cookie_value("garbage", "a"), None);
        let long = format!("x={}", "f".repeat(100));
        assert_eq!(cookie_value(&long, "x"), None);
    }

    #[test]
    fn set_cookie_has_the_required_attributes() {
        let c = set_cookie_header("n", "v");
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.contains("Path=/"));
    }
}
