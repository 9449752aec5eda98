//! What operators monitor with. The alerting rules (`config/alerts.yml`)
//! with Prometheus's own tool: `promtool check config` on the compose
//! profile's Prometheus settings (which loads the rules), `promtool test
//! rules` on the series in `tests/prometheus/alerts_test.yml` (each alert
//! fires on what should fire it, after its `for`, and not on healthy
//! series). The Grafana dashboard (`deploy/grafana/switchboard.json`) is an
//! importable dashboard (a Prometheus data source input, panels with ids and
//! queries). And every metric the rules and the dashboard's queries name is
//! one a running node and balancer actually expose.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use switchboard_tests::{get_text, RedisServer, TestBalancer, TestNode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool").args(args).current_dir(repo()).output().unwrap_or_else(|e| {
        panic!("promtool is required (apt-get install prometheus; scripts/test.sh installs it): {e}")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_rules_load_and_fire_on_the_series_that_should_fire_them() {
    let checked = promtool(&["check", "config", "config/prometheus.yml"]);
    assert!(checked.contains("10 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "tests/prometheus/alerts_test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every `switchboard_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("switchboard_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Names in a scrape: a sample line's name, without a histogram's suffixes.
fn scraped_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| l.starts_with("switchboard_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .flat_map(|n| {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| n.strip_suffix(s)).unwrap_or(n);
            [n.to_string(), base.to_string()]
        })
        .collect()
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/switchboard.json")).expect("the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every query of every panel.
fn dashboard_queries(d: &serde_json::Value) -> Vec<String> {
    let panels = d["panels"].as_array().into_iter().flatten();
    panels
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .map(String::from)
        .collect()
}

#[test]
fn the_grafana_dashboard_is_importable() {
    let d = dashboard();
    let inputs = d["__inputs"].as_array().expect("__inputs, for Grafana's import");
    assert!(inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"), "{inputs:?}");
    assert!(d["title"].is_string() && d["uid"].is_string());
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "the built-in dashboard's views: {}", panels.len());
    let ids: BTreeSet<i64> = panels.iter().filter_map(|p| p["id"].as_i64()).collect();
    assert_eq!(ids.len(), panels.len(), "every panel has its own id");
    for p in panels {
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        let targets =
            p["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{} has no query", p["title"]));
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(expr.contains("switchboard_"), "{}: {expr:?}", p["title"]);
        }
        for key in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][key].is_u64(), "{} gridPos.{key}", p["title"]);
        }
    }
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_name_is_exposed() {
    let redis = RedisServer::start();
    let node = TestNode::start(&redis, "alerts-node", &[]).await;
    let balancer = TestBalancer::start(&redis, &[]).await;
    balancer.wait_accepting(&["alerts-node"]).await;
    // Traffic, so that labelled series exist: a request through the
    // balancer, and a refusal (a head over the size limit).
    let http = reqwest::Client::new();
    let health = http.get(format!("{}/health", balancer.base)).send().await.expect("GET /health");
    assert!(health.status().is_success());
    let addr = balancer.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(200_000));
    let _ = s.write_all(big.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 431"), "an oversized head is refused");

    let rules = std::fs::read_to_string(repo().join("config/alerts.yml")).expect("config/alerts.yml");
    let mut wanted = metric_names(&rules);
    assert!(wanted.len() >= 10, "{wanted:?}");
    let queries = dashboard_queries(&dashboard());
    let named = metric_names(&queries.join("\n"));
    assert!(named.len() >= 20, "{named:?}");
    wanted.extend(named);
    // Scraped until every name is there (gauges set by a health check may
    // lag a moment), for at most 15 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let missing = loop {
        let scrape =
            get_text(&format!("{}/metrics", balancer.admin)).await + &get_text(&format!("{}/metrics", node.base)).await;
        let exposed = scraped_names(&scrape);
        let missing: Vec<&String> = wanted.iter().filter(|n| !exposed.contains(*n)).collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(missing.is_empty(), "named by the rules or the dashboard but not exposed: {missing:?}");
}
