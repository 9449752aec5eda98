//! Starting the project's programs for a test: `TestNode` runs a
//! `switchboard-node` on a free loopback port against the test's Redis, with
//! short registry timings (0.3 s heartbeat, 1.5 s TTL, 1 s drain) so a test
//! can watch a node appear, drain and expire within seconds.

use crate::process::{free_port, Process};
use crate::{eventually, RedisServer};
use std::time::Duration;

pub struct TestNode {
    pub id: String,
    pub port: u16,
    pub base: String,
    pub process: Process,
}

impl TestNode {
    pub async fn start(redis: &RedisServer, id: &str, extra: &[&str]) -> Self {
        Self::start_with_redis_url(&redis.url(), id, extra).await
    }

    pub async fn start_with_redis_url(redis_url: &str, id: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut args: Vec<String> = [
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--redis",
            redis_url,
            "--node-id",
            id,
            "--advertise-url",
            &base,
            "--heartbeat-secs",
            "0.3",
            "--ttl-secs",
            "1.5",
            "--drain-secs",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = Process::spawn("switchboard-node", &format!("node-{id}"), &args);
        let http = reqwest::Client::new();
        let url = format!("{base}/health");
        eventually(Duration::from_secs(15), &format!("node {id} to answer /health"), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                http.get(url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status() == 200)
                    .map(|_| ())
            }
        })
        .await;
        TestNode {
            id: id.to_string(),
            port,
            base,
            process,
        }
    }
}
