//! How a request picks its node, in the order of the design: (1) a SignalR
//! transport request's `?id=` names its owner node, and goes there — draining
//! included — or gets a fast 404 when that node is gone; (2) a valid affinity
//! cookie naming a live, non-draining node; (3) otherwise the least-loaded
//! node that accepts new clients, ties broken at random, with a new cookie.
//!
//! Pure decisions over a table snapshot: whether a node is ready or accepts
//! new clients is asked of a `Readiness` (the cluster's health state, or a
//! test's), ties are broken by numbers the caller draws, and nothing is
//! counted here (`Cluster::route` counts).

use crate::table::{RouteNode, RoutingTable};
use std::sync::Arc;
use switchboard_common::token;

/// The affinity cookie value for a node: HMAC-SHA256 of its id under the
/// cookie secret, the first 128 bits in hex. Opaque (never an address),
/// unforgeable without the secret (a client cannot pick its node), and the
/// same on every balancer replica that shares the secret.
pub fn affinity_cookie(secret: &str, node_id: &str) -> String {
    use hmac::{Hmac, Mac};
    // HMAC takes keys of any length, so this cannot fail.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(node_id.as_bytes());
    mac.finalize().into_bytes()[..16].iter().map(|b| format!("{b:02x}")).collect()
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
    Token = 0,
    Cookie = 1,
    New = 2,
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

/// What routing needs to know of a node's health.
pub trait Readiness {
    /// Alive: may carry its existing connections (draining included).
    fn ready(&self, node: &RouteNode) -> bool;
    /// May receive new clients: ready and not draining.
    fn accepts_new(&self, node: &RouteNode) -> bool;
    /// Serving, but cut off from the rest of the cluster (Redis): new
    /// clients go to it only when every node that accepts them is.
    fn degraded(&self, _node: &RouteNode) -> bool {
        false
    }
}

/// Decides for a request with query `?id=` (if any) and affinity cookie (if
/// any); `tie` draws the numbers that break ties between equally loaded nodes
/// (the lowest wins).
pub fn decide(
    table: &RoutingTable,
    health: &impl Readiness,
    id: Option<&str>,
    cookie: Option<&str>,
    tie: &mut impl FnMut() -> u32,
) -> RouteDecision {
    if let Some(id) = id {
        return match token::owner_of(id).and_then(|owner| table.by_id(&owner)) {
            Some(node) if health.ready(node) => RouteDecision::Node { node: node.clone(), kind: RouteKind::Token },
            _ => RouteDecision::UnknownConnection,
        };
    }
    if let Some(node) = cookie.and_then(|c| table.by_cookie(c)) {
        if health.accepts_new(node) && !health.degraded(node) {
            return RouteDecision::Node { node: node.clone(), kind: RouteKind::Cookie };
        }
    }
    match least_loaded(table, health, &[], tie) {
        Some(node) => RouteDecision::Node { node, kind: RouteKind::New },
        None => RouteDecision::NoNodeAvailable,
    }
}

/// The node accepting new clients with the lowest load, skipping `exclude`;
/// a degraded node only when every other candidate is degraded too.
pub fn least_loaded(
    table: &RoutingTable,
    health: &impl Readiness,
    exclude: &[String],
    tie: &mut impl FnMut() -> u32,
) -> Option<Arc<RouteNode>> {
    // Ranked by (degraded, load, tie draw): the smallest wins.
    type Rank = (bool, u64, u32);
    let mut best: Option<(&Arc<RouteNode>, Rank)> = None;
    for node in &table.nodes {
        if exclude.contains(&node.record.node_id) || !health.accepts_new(node) {
            continue;
        }
        let rank = (health.degraded(node), node.load(), tie());
        if best.is_none_or(|(_, b)| rank < b) {
            best = Some((node, rank));
        }
    }
    best.map(|(n, _)| n.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::NodeStats;
    use pingora_load_balancing::Backend;
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;
    use switchboard_common::registry::{NodeRecord, NodeStatus};

    /// Health as a test states it: ready nodes, and which of them are draining or degraded.
    #[derive(Default)]
    struct Health {
        down: HashSet<&'static str>,
        draining: HashSet<&'static str>,
        degraded: HashSet<&'static str>,
    }

    impl Readiness for Health {
        fn ready(&self, n: &RouteNode) -> bool {
            !self.down.contains(n.record.node_id.as_str())
        }
        fn accepts_new(&self, n: &RouteNode) -> bool {
            self.ready(n) && !self.draining.contains(n.record.node_id.as_str())
        }
        fn degraded(&self, n: &RouteNode) -> bool {
            self.degraded.contains(n.record.node_id.as_str())
        }
    }

    /// Nodes with these ids and registry connection counts, in this order.
    fn table(nodes: &[(&str, u64)]) -> RoutingTable {
        let nodes = nodes
            .iter()
            .enumerate()
            .map(|(i, (id, connections))| {
                let addr: std::net::SocketAddr = format!("127.0.0.1:{}", 5000 + i).parse().unwrap();
                let record = NodeRecord {
                    node_id: id.to_string(),
                    name: id.to_string(),
                    description: String::new(),
                    url: format!("http://{addr}"),
                    status: NodeStatus::Healthy,
                    connections: *connections,
                    last_seen: chrono::Utc::now(),
                    started_at: chrono::Utc::now(),
                    version: "0".into(),
                };
                Arc::new(RouteNode {
                    record,
                    backend: Backend::new(&addr.to_string()).unwrap(),
                    addr,
                    cookie: affinity_cookie("s", id),
                    stats: Arc::new(NodeStats::default()),
                    open_gauge: prometheus::IntGauge::new("open", "open").unwrap(),
                    missing_since: None,
                })
            })
            .collect();
        RoutingTable::new(nodes)
    }

    /// Tie-breaking numbers drawn in order: 0, 1, 2, … (the first candidate wins ties).
    fn in_order() -> impl FnMut() -> u32 {
        let mut n = 0;
        move || {
            n += 1;
            n
        }
    }

    fn chosen(d: RouteDecision) -> Option<(String, RouteKind)> {
        match d {
            RouteDecision::Node { node, kind } => Some((node.record.node_id.clone(), kind)),
            _ => None,
        }
    }

    fn token_for(node: &str) -> String {
        switchboard_common::token::ConnectionToken::issue(node).token
    }

    #[test]
    fn a_token_goes_to_its_node_even_draining_and_is_refused_when_the_node_is_gone() {
        let t = table(&[("a", 0), ("b", 9)]);
        let mut h = Health::default();
        h.draining.insert("b");
        let d = decide(&t, &h, Some(&token_for("b")), None, &mut in_order());
        assert_eq!(chosen(d), Some(("b".into(), RouteKind::Token)));
        h.down.insert("b");
        assert!(matches!(
            decide(&t, &h, Some(&token_for("b")), None, &mut in_order()),
            RouteDecision::UnknownConnection
        ));
        let d = decide(&t, &h, Some(&token_for("zz")), None, &mut in_order());
        assert!(matches!(d, RouteDecision::UnknownConnection), "a node never known");
        assert!(matches!(decide(&t, &h, Some("garbage"), None, &mut in_order()), RouteDecision::UnknownConnection));
    }

    #[test]
    fn a_cookie_wins_over_load_unless_its_node_drains_or_is_down() {
        let t = table(&[("a", 0), ("b", 9)]);
        let mut h = Health::default();
        let cookie = affinity_cookie("s", "b");
        assert_eq!(chosen(decide(&t, &h, None, Some(&cookie), &mut in_order())), Some(("b".into(), RouteKind::Cookie)));
        h.draining.insert("b");
        assert_eq!(chosen(decide(&t, &h, None, Some(&cookie), &mut in_order())), Some(("a".into(), RouteKind::New)));
        let forged = decide(&t, &Health::default(), None, Some("0000000000000000"), &mut in_order());
        assert_eq!(chosen(forged), Some(("a".into(), RouteKind::New)), "an unknown cookie is a new client");
    }

    #[test]
    fn new_clients_go_to_the_least_loaded_node_that_accepts_them() {
        let t = table(&[("a", 5), ("b", 2), ("c", 7)]);
        let mut h = Health::default();
        assert_eq!(chosen(decide(&t, &h, None, None, &mut in_order())), Some(("b".into(), RouteKind::New)));
        // Connections opened through this balancer count as load too, before
        // the node's registry record catches up.
        t.by_id("b").unwrap().stats.assigned_since_record.store(4, Ordering::Relaxed);
        assert_eq!(chosen(decide(&t, &h, None, None, &mut in_order())), Some(("a".into(), RouteKind::New)));
        h.draining.insert("a");
        h.down.insert("b");
        assert_eq!(chosen(decide(&t, &h, None, None, &mut in_order())), Some(("c".into(), RouteKind::New)));
        h.down.insert("c");
        assert!(matches!(decide(&t, &h, None, None, &mut in_order()), RouteDecision::NoNodeAvailable));
        let excluded = least_loaded(&t, &Health::default(), &["b".to_string()], &mut in_order());
        assert_eq!(excluded.map(|n| n.record.node_id.clone()), Some("a".into()));
    }

    #[test]
    fn degraded_nodes_get_new_clients_only_when_every_node_is_degraded_and_keep_their_own() {
        let t = table(&[("a", 0), ("b", 9)]);
        let mut h = Health::default();
        h.degraded.insert("a");
        assert_eq!(chosen(decide(&t, &h, None, None, &mut in_order())), Some(("b".into(), RouteKind::New)));
        let cookie = affinity_cookie("s", "a");
        assert_eq!(chosen(decide(&t, &h, None, Some(&cookie), &mut in_order())), Some(("b".into(), RouteKind::New)));
        let token = switchboard_common::token::ConnectionToken::issue("a").token;
        assert_eq!(chosen(decide(&t, &h, Some(&token), None, &mut in_order())), Some(("a".into(), RouteKind::Token)));
        // Redis is down for everyone: everyone is degraded, and load decides again.
        h.degraded.insert("b");
        assert_eq!(chosen(decide(&t, &h, None, None, &mut in_order())), Some(("a".into(), RouteKind::New)));
    }

    #[test]
    fn ties_are_broken_by_the_lowest_draw() {
        let t = table(&[("a", 3), ("b", 3), ("c", 3)]);
        let h = Health::default();
        for (draws, want) in [([5, 1, 9], "b"), ([2, 8, 3], "a"), ([7, 7, 1], "c")] {
            let mut it = draws.into_iter();
            let d = decide(&t, &h, None, None, &mut || it.next().unwrap());
            assert_eq!(chosen(d).map(|(n, _)| n), Some(want.to_string()), "{draws:?}");
        }
    }

    #[test]
    fn cookies_are_opaque_stable_and_keyed() {
        let a = affinity_cookie("s", "node-1");
        assert_eq!(a, affinity_cookie("s", "node-1"));
        assert_ne!(a, affinity_cookie("s", "node-2"));
        assert_ne!(a, affinity_cookie("other", "node-1"));
        assert!(!a.contains("node") && a.len() == 32);
        // RFC 4231 test case 2 (key "Jefe"), first 128 bits.
        assert_eq!(affinity_cookie("Jefe", "what do ya want for nothing?"), "5bdcc146bf60754e6a042426089575c7");
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
