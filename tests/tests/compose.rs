//! The Docker Compose cluster as users run it: `up --build --scale node=3`
//! (with the HTTPS override, docker-compose.https.yml, and a test
//! certificate: negotiate and /nodes over TLS), history kept across
//! `restart redis`,
//! rescale to 7 and to 2 without touching the balancer, `docker kill` a node,
//! and `down -v` leaves nothing behind. Runs against the machine's Docker
//! engine; it skips, loudly, only where no engine answers. Base images come
//! from the registry or from scripts/build-base-images.sh (scripts/test.sh runs
//! it when the engine cannot pull).

use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;
use switchboard_tests::tls::TestCa;
use switchboard_tests::{eventually, free_port, HubClient, TransportKind, WAIT};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `docker compose` (v2) where present, else the standalone `docker-compose`.
fn compose_program() -> Option<Vec<&'static str>> {
    let works = |p: &[&str]| Command::new(p[0]).args(&p[1..]).arg("version").output().is_ok_and(|o| o.status.success());
    [vec!["docker", "compose"], vec!["docker-compose"]].into_iter().find(|p| works(p))
}

/// One compose project; cloneable so a rescale can run on another thread.
#[derive(Clone)]
struct Compose {
    program: Vec<&'static str>,
    name: String,
    public: u16,
    admin: u16,
    https: u16,
    /// Where the test certificate is (docker-compose.https.yml mounts it).
    tls_dir: PathBuf,
    /// `--env-file`, for the Redis Cluster profile.
    env_file: Option<PathBuf>,
}

/// Owns the project: `down -v` when dropped, even when the test fails.
struct Project(Compose);

impl std::ops::Deref for Project {
    type Target = Compose;
    fn deref(&self) -> &Compose {
        &self.0
    }
}

const ADMIN_TOKEN: &str = "compose-test-token";

impl Compose {
    /// A project named `name` and this process's id, on free ports, with a
    /// certificate from `ca` written into `tls_dir` for its HTTPS listener.
    fn project(
        program: Vec<&'static str>,
        name: &str,
        ca: &TestCa,
        tls_dir: PathBuf,
        env_file: Option<PathBuf>,
    ) -> Project {
        std::fs::create_dir_all(&tls_dir).expect("certificate dir");
        ca.write_leaf(&tls_dir.join("cert.pem"), &tls_dir.join("key.pem"));
        let name = format!("{name}{}", std::process::id());
        Project(Compose {
            program,
            name,
            public: free_port(),
            admin: free_port(),
            https: free_port(),
            tls_dir,
            env_file,
        })
    }

    fn run(&self, args: &[&str]) -> Output {
        let (file, https) = (repo().join("docker-compose.yml"), repo().join("docker-compose.https.yml"));
        let env_file = self.env_file.iter().flat_map(|f| ["--env-file".to_string(), f.to_string_lossy().into_owned()]);
        Command::new(self.program[0])
            .args(&self.program[1..])
            .args(env_file)
            .args(["-p", &self.name, "-f", &file.to_string_lossy(), "-f", &https.to_string_lossy()])
            .args(args)
            .env("SWITCHBOARD_PUBLIC_PORT", self.public.to_string())
            .env("SWITCHBOARD_HTTPS_PORT", self.https.to_string())
            .env("SWITCHBOARD_TLS_DIR", &self.tls_dir)
            .env("SWITCHBOARD_ADMIN_PORT", self.admin.to_string())
            .env("SWITCHBOARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .expect("run compose")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "compose {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn container_ids(&self, service: &str) -> Vec<String> {
        self.ok(&["ps", "-q", service]).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.public)
    }

    async fn accepting(&self) -> Vec<String> {
        let url = format!("http://127.0.0.1:{}/api/backends", self.admin);
        // Published from a container, the admin port wants its token.
        let v: Value = match reqwest::Client::new().get(url).bearer_auth(ADMIN_TOKEN).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => return Vec::new(),
        };
        v["nodes"]
            .as_array()
            .map(|ns| {
                ns.iter()
                    .filter(|n| n["acceptsNewClients"] == true)
                    .filter_map(|n| n["nodeId"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn wait_accepting(&self, count: usize) -> Vec<String> {
        eventually(Duration::from_secs(60), &format!("{count} routable nodes"), || async {
            let ids = self.accepting().await;
            (ids.len() == count).then_some(ids)
        })
        .await
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.run(&["down", "-v", "--remove-orphans", "--timeout", "5"]);
        let _ = std::fs::remove_dir_all(&self.tls_dir);
    }
}

fn inspect(id: &str, format: &str) -> String {
    let out = Command::new("docker").args(["inspect", "-f", format, id]).output().expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn node_of(c: &mut HubClient) -> String {
    c.send("GetNodeInfo", vec![]).await;
    c.expect_event("NodeInfo", WAIT).await.expect("NodeInfo")[0].as_str().unwrap_or_default().to_string()
}

async fn connect(base: &str) -> (HubClient, String) {
    let mut c = HubClient::connect(&reqwest::Client::new(), base, TransportKind::WebSockets)
        .await
        .expect("connect through the balancer");
    let node = node_of(&mut c).await;
    (c, node)
}

/// Two clients through the balancer at `base` on different nodes, once a
/// message (`{text} {i}`) from the first has reached the second; each with
/// its node.
async fn chat_crosses(base: &str, text: &str) -> ((HubClient, String), (HubClient, String)) {
    let (a, node_a) = connect(base).await;
    let (mut b, mut node_b) = connect(base).await;
    while node_b == node_a {
        (b, node_b) = connect(base).await;
    }
    let mut crossed = false;
    for i in 0..50 {
        a.send("SendMessage", vec![json!("a"), json!(format!("{text} {i}"))]).await;
        if b.expect(Duration::from_millis(300), |v| v["target"] == "ReceiveMessage").await.is_some() {
            crossed = true;
            break;
        }
    }
    assert!(crossed, "{text}: a message from {node_a} never reached {node_b}");
    ((a, node_a), (b, node_b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_scales_3_to_7_to_2_without_touching_the_balancer() {
    let docker_answers = Command::new("docker").arg("info").output().is_ok_and(|o| o.status.success());
    let Some(program) = compose_program().filter(|_| docker_answers) else {
        eprintln!("\n*** SKIPPED compose test: no Docker engine answers on this machine ***\n");
        return;
    };
    // HTTPS too, with a certificate from a throwaway authority.
    let tls_dir = std::env::temp_dir().join(format!("sbtest-tls-{}", std::process::id()));
    let ca = TestCa::new();
    let project = Compose::project(program, "sbtest", &ca, tls_dir.clone(), None);
    let base = project.base();

    // up --build --scale node=3
    project.ok(&["up", "-d", "--build", "--scale", "node=3"]);
    let first = project.wait_accepting(3).await;
    let nodes: Value = eventually(Duration::from_secs(60), "/nodes to list 3", || async {
        let v: Value = reqwest::get(format!("{base}/nodes")).await.ok()?.json().await.ok()?;
        (v["active_count"] == 3).then_some(v)
    })
    .await;
    assert_eq!(nodes["available_nodes"].as_array().map(Vec::len), Some(3));
    // Each replica is named after its container (project-node-N with Compose
    // v2, project_node_N with v1), from Docker's reverse DNS.
    let mut names: Vec<String> = nodes["available_nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str().map(String::from))
        .collect();
    names.sort();
    let readable = |n: &String| {
        ["-node-", "_node_"].iter().any(|sep| {
            n.strip_prefix(&project.name)
                .and_then(|rest| rest.strip_prefix(sep))
                .is_some_and(|num| num.parse::<u32>().is_ok())
        })
    };
    assert!(names.len() == 3 && names.iter().all(readable), "node names should be container names: {names:?}");

    // The same cluster over HTTPS (docker-compose.https.yml).
    let tls = ca.client(&[&rustls::version::TLS13]);
    let (status, text) = tls.request(project.https, "POST", "/chathub/negotiate?negotiateVersion=1", &[]).await;
    assert_eq!(status, 200, "negotiate over HTTPS: {text}");
    let (status, text) = tls.request(project.https, "GET", "/nodes", &[]).await;
    assert!(status == 200 && text.contains("\"active_count\":3"), "/nodes over HTTPS: {text}");

    // Two clients on different nodes exchange a message.
    let ((mut a, node_a), (b, node_b)) = chat_crosses(&base, "hello").await;

    // History is durable: after `docker compose restart redis` (an
    // append-only file on a named volume), GetHistory still has the message.
    project.ok(&["restart", "redis"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let kept = loop {
        if let Ok(h) = a.invoke("GetHistory", vec![json!(100)]).await {
            let has = |m: &Value| m["message"].as_str().is_some_and(|t| t.starts_with("hello "));
            if h.as_array().is_some_and(|ms| ms.iter().any(has)) {
                break true;
            }
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(kept, "the history did not survive a Redis restart");
    let balancer = project.container_ids("balancer").pop().expect("balancer container");
    let balancer_started = inspect(&balancer, "{{.State.StartedAt}}");

    // --scale node=7: the new nodes are found and take the next clients.
    project.ok(&["up", "-d", "--no-recreate", "--scale", "node=7"]);
    let seven = project.wait_accepting(7).await;
    let new_nodes: HashSet<String> = seven.iter().filter(|n| !first.contains(n)).cloned().collect();
    assert_eq!(new_nodes.len(), 4, "{seven:?} vs {first:?}");
    let mut on_new = 0;
    let mut clients: Vec<(HubClient, String)> = Vec::new();
    for _ in 0..4 {
        let (c, n) = connect(&base).await;
        on_new += new_nodes.contains(&n) as usize;
        clients.push((c, n));
    }
    assert!(on_new >= 3, "new clients should go to the empty new nodes, got {on_new} of 4");
    assert_eq!(project.container_ids("balancer"), vec![balancer.clone()], "balancer container replaced");
    assert_eq!(inspect(&balancer, "{{.State.StartedAt}}"), balancer_started, "balancer restarted");

    // --scale node=2: removed nodes drain; their clients are told to reconnect and do.
    clients.push((a, node_a));
    clients.push((b, node_b));
    project.ok(&["up", "-d", "--no-recreate", "--scale", "node=2"]);
    let two = project.wait_accepting(2).await;
    let mut survivors: Vec<HubClient> = Vec::new();
    let mut reconnected = 0;
    for (mut c, n) in clients {
        if two.contains(&n) {
            assert_eq!(
                c.invoke("Echo", vec![json!("still")]).await,
                Ok(json!("still")),
                "client on remaining node {n}"
            );
            survivors.push(c);
            continue;
        }
        // The drain finished before compose returned, so the Close is already here.
        let close =
            c.expect_close(Duration::from_secs(5)).await.unwrap_or_else(|| panic!("no Close from drained node {n}"));
        assert_eq!(close["allowReconnect"], true, "{close}");
        let (c2, n2) = connect(&base).await;
        assert!(two.contains(&n2), "reconnected onto {n2}, not a remaining node");
        reconnected += 1;
        survivors.push(c2);
    }
    assert!(reconnected > 0, "no client was on a removed node");
    // No message sent after the rescale is lost.
    let sender = &survivors[0];
    for i in 0..20 {
        sender.send("SendMessage", vec![json!("after"), json!(format!("after-{i}"))]).await;
    }
    for (k, c) in survivors.iter_mut().enumerate() {
        for i in 0..20 {
            let text = format!("after-{i}");
            c.expect(WAIT, |v| v["arguments"][1] == text.as_str())
                .await
                .unwrap_or_else(|| panic!("client {k} lost {text}"));
        }
    }

    // docker kill of one node: it leaves rotation within seconds.
    let victim = project.container_ids("node").pop().expect("a node");
    let victim_host = inspect(&victim, "{{.Config.Hostname}}");
    assert!(Command::new("docker").args(["kill", &victim]).status().is_ok_and(|s| s.success()));
    let left = project.wait_accepting(1).await;
    assert!(!left.contains(&victim_host), "{left:?}");
    for _ in 0..4 {
        assert_eq!(connect(&base).await.1, left[0]);
    }

    // down -v leaves nothing behind.
    project.ok(&["down", "-v", "--remove-orphans", "--timeout", "5"]);
    let leftovers = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=com.docker.compose.project={}", project.name)])
        .output()
        .expect("docker ps");
    assert!(String::from_utf8_lossy(&leftovers.stdout).trim().is_empty(), "containers left behind");
    let volumes = Command::new("docker")
        .args(["volume", "ls", "-q", "--filter", &format!("label=com.docker.compose.project={}", project.name)])
        .output()
        .expect("docker volume ls");
    assert!(String::from_utf8_lossy(&volumes.stdout).trim().is_empty(), "volumes left behind");
    let program = project.program.clone();
    drop(project);

    on_the_redis_cluster_profile(program, tls_dir).await;
}

/// The Redis Cluster profile, on the image the test above built: the
/// one-shot service joins six servers into a cluster, two nodes and the
/// balancer find each other through it, a message crosses nodes, and the
/// history stream sits under the prefix's hash tag.
async fn on_the_redis_cluster_profile(program: Vec<&'static str>, tls_dir: PathBuf) {
    let env_file = Some(repo().join("config/redis-cluster.env"));
    let project = Compose::project(program, "sbtestrc", &TestCa::new(), tls_dir, env_file);
    project.ok(&["up", "-d", "--scale", "node=2"]);
    project.wait_accepting(2).await;
    chat_crosses(&project.base(), "on the cluster").await;
    let member = project.container_ids("redis-cluster-1").pop().expect("a cluster member");
    let out = Command::new("docker")
        .args(["exec", &member, "redis-cli", "-c", "xlen", "{switchboard}:history"])
        .output()
        .expect("docker exec");
    let len: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    assert!(len >= 1, "the history stream under the hash tag: {}", String::from_utf8_lossy(&out.stdout));
}
