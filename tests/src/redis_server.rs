//! A throw-away `redis-server` on a free loopback port, never 6379, with
//! persistence off. It can be stopped and started again on the same port to
//! test how nodes and the balancer live through a Redis outage.

use crate::process::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// What comes before `--port` (a Sentinel's config file) and after it.
    before: Vec<String>,
    after: Vec<String>,
    /// The server's `requirepass`, if any (in `url()` too).
    password: Option<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with extra arguments, for example `--replicaof 127.0.0.1 PORT`.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_with_password(extra, None)
    }

    /// A server that requires `password` (`requirepass`; `masterauth` too,
    /// for a replica or a promoted one).
    pub fn start_with_password(extra: &[&str], password: Option<&str>) -> Self {
        Self::start_on(free_port(), extra, password)
    }

    /// A server on `port` (a Redis Cluster member needs `port + 10000` free too).
    pub fn start_on(port: u16, extra: &[&str], password: Option<&str>) -> Self {
        let mut after: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let Some(pw) = password {
            after.extend(["--requirepass", pw, "--masterauth", pw].map(String::from));
        }
        let password = password.map(String::from);
        let mut s = RedisServer { port, child: None, before: Vec::new(), after, password };
        s.spawn();
        s
    }

    /// Whether the process is running (not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A Redis Sentinel watching the master on `master_port` as `service`,
    /// alone (quorum 1) and quick to decide (down after 1 s).
    pub fn start_sentinel(master_port: u16, service: &str, auth_pass: Option<&str>) -> Self {
        let port = free_port();
        let conf = std::env::temp_dir().join(format!("sb-sentinel-{port}.conf"));
        let mut text = format!(
            "sentinel monitor {service} 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds {service} 1000\n\
             sentinel failover-timeout {service} 3000\n\
             sentinel parallel-syncs {service} 1\n"
        );
        if let Some(pw) = auth_pass {
            text.push_str(&format!("sentinel auth-pass {service} {pw}\n"));
        }
        std::fs::write(&conf, text).expect("sentinel config");
        let before = vec![conf.to_string_lossy().into_owned(), "--sentinel".to_string()];
        let mut s = RedisServer { port, child: None, before, after: Vec::new(), password: None };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    fn spawn(&mut self) {
        let mut args = self.before.clone();
        args.extend(["--port", &self.port.to_string(), "--bind", "127.0.0.1"].map(String::from));
        if self.before.is_empty() {
            // A replica still writes the master's snapshot to disk: into a
            // directory of its own, not the test's working directory.
            let dir = data_dir(self.port);
            let _ = std::fs::create_dir_all(&dir);
            args.extend(["--save", "", "--appendonly", "no", "--dir"].map(String::from));
            args.push(dir.to_string_lossy().into_owned());
        }
        args.extend(self.after.iter().cloned());
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut c) = redis::Client::open(self.url()).and_then(|c| c.get_connection()) {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Kills the server (as an outage would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("test redis reachable")
    }

    /// Waits until `n` clients (nodes) subscribe to `channel`: an observable
    /// condition instead of a sleep after `JoinGroup`.
    pub async fn wait_subscribers(&self, channel: &str, n: i64) {
        let c = self.connection().await;
        crate::eventually(crate::WAIT, &format!("{n} subscribers of {channel}"), || {
            let mut c = c.clone();
            async move {
                let v: Vec<(String, i64)> =
                    redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut c).await.ok()?;
                (v.first().map(|(_, k)| *k) == Some(n)).then_some(())
            }
        })
        .await;
    }

    /// Waits until the chat history (`switchboard:history`) holds `n` messages.
    pub async fn wait_history_len(&self, n: usize) {
        let c = self.connection().await;
        crate::eventually(crate::WAIT, &format!("{n} messages in history"), || {
            let mut c = c.clone();
            async move {
                let len: usize = redis::cmd("XLEN").arg("switchboard:history").query_async(&mut c).await.ok()?;
                (len == n).then_some(())
            }
        })
        .await;
    }
}

/// Where the server on `port` may write (a replica's copy of the master's snapshot).
fn data_dir(port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sb-redis-{port}"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        match self.before.first() {
            Some(conf) => drop(std::fs::remove_file(conf)),
            None => drop(std::fs::remove_dir_all(data_dir(self.port))),
        }
    }
}
