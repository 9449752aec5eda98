//! The dashboard's short memory: one sample of the cluster per second for
//! the last five minutes, and the changes seen between samples (a node
//! joining the routing table, starting to drain, failing its checks,
//! becoming healthy again, leaving), served as `/api/history` so a freshly
//! opened dashboard draws its charts at once. A sample holds, per node, the
//! connections open through this balancer and the node's own count, and,
//! cluster-wide, what happened during that second: requests, WebSocket
//! upgrades, refusals by reason, failed health checks and retries on
//! another node. Counters are read from the Prometheus metrics, so the
//! charts and `/metrics` never disagree. Memory is bounded: at most
//! `SAMPLES` samples and `EVENTS` changes. What a sample holds is given to
//! `History::record` (the cluster takes it, `Cluster::sample_history`), so
//! this module knows the metrics but not the cluster.

use crate::metrics::Metrics;
use prometheus::core::Collector;
use prometheus::IntCounterVec;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use switchboard_common::registry::NodeStatus;

/// Five minutes of one-second samples.
pub const SAMPLES: usize = 300;
/// Changes kept.
pub const EVENTS: usize = 200;
pub const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSample {
    pub id: String,
    pub name: String,
    /// Connections open through this balancer (WebSockets included).
    pub open: i64,
    /// The node's own count, from its registry record.
    pub on_node: u64,
    pub state: &'static str,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// Unix milliseconds.
    pub t: i64,
    pub nodes: Vec<NodeSample>,
    /// What happened since the previous sample.
    pub requests: u64,
    pub upgrades: u64,
    pub refused: BTreeMap<String, u64>,
    pub health_failures: u64,
    pub retries: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub t: i64,
    pub node: String,
    pub name: String,
    /// `joined`, `draining`, `down`, `healthy` or `left`.
    pub what: &'static str,
}

/// Running totals, to turn counters into per-second amounts.
#[derive(Default, Clone)]
pub struct Totals {
    requests: u64,
    upgrades: u64,
    refused: BTreeMap<String, u64>,
    health_failures: u64,
    retries: u64,
}

#[derive(Default)]
struct Inner {
    samples: VecDeque<Sample>,
    changes: VecDeque<Change>,
    totals: Option<Totals>,
    /// Node id → (name, state) at the previous sample.
    states: HashMap<String, (String, &'static str)>,
}

#[derive(Default)]
pub struct History(Mutex<Inner>);

/// Every label value of `vec` with its count.
fn by_label(vec: &IntCounterVec) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for family in vec.collect() {
        for m in family.get_metric() {
            let label = m.get_label().first().map(|l| l.value().to_string()).unwrap_or_default();
            *out.entry(label).or_insert(0) += m.get_counter().value() as u64;
        }
    }
    out
}

impl Totals {
    /// The counters' values now.
    pub fn of(m: &Metrics) -> Self {
        Totals {
            requests: by_label(&m.requests).values().sum(),
            upgrades: m.upgrades.get(),
            refused: by_label(&m.refused),
            health_failures: by_label(&m.health_failures).values().sum(),
            retries: m.retries.get(),
        }
    }
}

/// The state a node is shown in: down unless it passes its checks.
pub fn state_of(ready: bool, status: NodeStatus) -> &'static str {
    if !ready {
        "down"
    } else if status == NodeStatus::Draining {
        "draining"
    } else {
        "healthy"
    }
}

/// The changes between two sets of node states.
fn diff(
    t: i64,
    before: &HashMap<String, (String, &'static str)>,
    now: &HashMap<String, (String, &'static str)>,
) -> Vec<Change> {
    let mut out = Vec::new();
    let mut ids: Vec<&String> = now.keys().collect();
    ids.sort();
    for id in ids {
        let (name, state) = &now[id];
        let what = match before.get(id) {
            None => "joined",
            Some((_, old)) if old != state => state,
            Some(_) => continue,
        };
        out.push(Change { t, node: id.clone(), name: name.clone(), what });
        // A node that joins already draining or down says so too.
        if what == "joined" && *state != "healthy" {
            out.push(Change { t, node: id.clone(), name: name.clone(), what: state });
        }
    }
    let mut gone: Vec<(&String, &(String, &'static str))> =
        before.iter().filter(|(id, _)| !now.contains_key(*id)).collect();
    gone.sort_by_key(|(id, _)| *id);
    for (id, (name, _)) in gone {
        out.push(Change { t, node: id.clone(), name: name.clone(), what: "left" });
    }
    out
}

impl History {
    /// Records one sample at `t` (Unix ms): the counters' totals now and
    /// every node as it stands.
    pub fn record(&self, t: i64, totals: Totals, nodes: Vec<NodeSample>) {
        let states: HashMap<String, (String, &'static str)> =
            nodes.iter().map(|n| (n.id.clone(), (n.name.clone(), n.state))).collect();
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let prev = inner.totals.clone().unwrap_or_else(|| totals.clone());
        let sample = Sample {
            t,
            nodes,
            requests: totals.requests.saturating_sub(prev.requests),
            upgrades: totals.upgrades.saturating_sub(prev.upgrades),
            refused: totals
                .refused
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(prev.refused.get(k).copied().unwrap_or(0))))
                .filter(|(_, v)| *v > 0)
                .collect(),
            health_failures: totals.health_failures.saturating_sub(prev.health_failures),
            retries: totals.retries.saturating_sub(prev.retries),
        };
        let changes = diff(t, &inner.states, &states);
        inner.states = states;
        inner.totals = Some(totals);
        inner.samples.push_back(sample);
        while inner.samples.len() > SAMPLES {
            inner.samples.pop_front();
        }
        inner.changes.extend(changes);
        while inner.changes.len() > EVENTS {
            inner.changes.pop_front();
        }
    }

    /// The `/api/history` document: samples and changes newer than `since`
    /// (Unix ms; all when `None`).
    pub fn json(&self, since: Option<i64>) -> serde_json::Value {
        let inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let after = |t: i64| since.is_none_or(|s| t > s);
        let samples: Vec<&Sample> = inner.samples.iter().filter(|s| after(s.t)).collect();
        let changes: Vec<&Change> = inner.changes.iter().filter(|c| after(c.t)).collect();
        serde_json::json!({
            "intervalMs": INTERVAL.as_millis() as u64,
            "keptSamples": SAMPLES,
            "samples": samples,
            "changes": changes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(list: &[(&str, &'static str)]) -> HashMap<String, (String, &'static str)> {
        list.iter().map(|(id, s)| (id.to_string(), (format!("Node {id}"), *s))).collect()
    }

    fn whats(changes: &[Change]) -> Vec<(String, &'static str)> {
        changes.iter().map(|c| (c.node.clone(), c.what)).collect()
    }

    #[test]
    fn joins_state_changes_and_departures_are_told_apart() {
        let none = states(&[]);
        let three = states(&[("a", "healthy"), ("b", "healthy"), ("c", "draining")]);
        assert_eq!(
            whats(&diff(1, &none, &three)),
            [("a".into(), "joined"), ("b".into(), "joined"), ("c".into(), "joined"), ("c".into(), "draining")]
        );
        let later = states(&[("a", "healthy"), ("b", "down")]);
        assert_eq!(whats(&diff(2, &three, &later)), [("b".into(), "down"), ("c".into(), "left")]);
        assert!(diff(3, &later, &later).is_empty());
        let back = states(&[("a", "healthy"), ("b", "healthy")]);
        assert_eq!(whats(&diff(4, &later, &back)), [("b".into(), "healthy")]);
    }
}
