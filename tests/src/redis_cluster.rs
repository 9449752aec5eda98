//! A throw-away Redis Cluster on loopback: three masters with one replica
//! each, `redis-server` processes on free ports (each with its cluster bus
//! port, `port + 10000`, free too), joined by `redis-cli --cluster create`
//! and quick to fail over (`cluster-node-timeout` 1 s; replicas are in sync
//! before `start` returns). Like `RedisServer`,
//! every member can be killed (a master's death promotes its replica) and
//! everything is stopped when dropped.

use crate::redis_server::RedisServer;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct RedisCluster {
    pub members: Vec<RedisServer>,
    /// Every member's `requirepass` (and `masterauth`), if any.
    password: Option<String>,
}

/// `n` ports whose cluster bus ports (`+ 10000`) are free as well; every
/// listener is held until all are chosen.
fn cluster_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..2000 {
        if ports.len() == n {
            break;
        }
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else { continue };
        let Ok(port) = l.local_addr().map(|a| a.port()) else { continue };
        let Some(bus) = port.checked_add(10_000) else { continue };
        let Ok(b) = TcpListener::bind(("127.0.0.1", bus)) else { continue };
        ports.push(port);
        held.push((l, b));
    }
    assert_eq!(ports.len(), n, "free ports for a Redis Cluster");
    ports
}

/// One line's value from `CLUSTER INFO` or `INFO`.
fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(|v| v.trim().to_string())
}

impl RedisCluster {
    /// Three masters and three replicas, every slot covered, every member
    /// agreeing the cluster is ok.
    pub fn start() -> Self {
        Self::start_with_password(None)
    }

    /// The same with every member requiring `password`.
    pub fn start_with_password(password: Option<&str>) -> Self {
        let ports = cluster_ports(6);
        let members: Vec<RedisServer> = ports
            .iter()
            .map(|p| {
                let conf = format!("nodes-{p}.conf");
                // A replica syncs at once (not after diskless sync's 5 s
                // wait for more replicas), and may take over however long
                // its master has been gone.
                let extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-replica-validity-factor",
                    "0",
                    "--repl-diskless-sync-delay",
                    "0",
                ];
                RedisServer::start_on(*p, &extra, password)
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        create.args(ports.iter().map(|p| format!("127.0.0.1:{p}")));
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        if let Some(pw) = password {
            create.args(["-a", pw, "--no-auth-warning"]);
        }
        let out = create.output().expect("redis-cli must be installed (scripts/test.sh installs redis-server)");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = RedisCluster { members, password: password.map(String::from) };
        cluster.wait_ok(Duration::from_secs(30));
        cluster.wait_replicas_synced(Duration::from_secs(30));
        cluster
    }

    /// Waits until every running replica has its master's data
    /// (`master_link_status:up`), so that a killed master can be replaced.
    pub fn wait_replicas_synced(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let synced = self.members.iter().filter(|m| m.is_running()).all(|m| {
                let info = self.text(m.port, &redis::cmd("INFO").arg("replication").to_owned()).unwrap_or_default();
                info_field(&info, "role").as_deref() != Some("slave")
                    || info_field(&info, "master_link_status").as_deref() == Some("up")
            });
            if synced {
                return;
            }
            assert!(Instant::now() < deadline, "Redis Cluster replicas not in sync within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,…`: every member, as a
    /// node or balancer is configured.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
        format!("redis+cluster://{}{}", self.auth(), hosts.join(","))
    }

    /// The running members' `redis://` addresses, for redis-rs's cluster client.
    pub fn nodes(&self) -> Vec<String> {
        let auth = self.auth();
        self.members.iter().filter(|m| m.is_running()).map(|m| format!("redis://{auth}127.0.0.1:{}", m.port)).collect()
    }

    /// `:password@`, or nothing.
    fn auth(&self) -> String {
        self.password.as_ref().map(|p| format!(":{p}@")).unwrap_or_default()
    }

    /// A command's answer from the member on `port`.
    pub fn query_member(&self, port: u16, cmd: &redis::Cmd) -> Option<redis::Value> {
        let client = redis::Client::open(format!("redis://{}127.0.0.1:{port}", self.auth())).ok()?;
        let mut c = client.get_connection_with_timeout(Duration::from_secs(1)).ok()?;
        cmd.query(&mut c).ok()
    }

    fn text(&self, port: u16, cmd: &redis::Cmd) -> Option<String> {
        match self.query_member(port, cmd)? {
            redis::Value::BulkString(b) => String::from_utf8(b).ok(),
            redis::Value::VerbatimString { text, .. } => Some(text),
            redis::Value::SimpleString(s) => Some(s),
            _ => None,
        }
    }

    /// Waits until every running member says `cluster_state:ok`.
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ok = self.members.iter().filter(|m| m.is_running()).all(|m| {
                self.text(m.port, &redis::cmd("CLUSTER").arg("INFO").to_owned())
                    .and_then(|i| info_field(&i, "cluster_state"))
                    .as_deref()
                    == Some("ok")
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the Redis Cluster did not become ok within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index in `members` of the running master that serves `key`'s slot now.
    pub fn master_of(&self, key: &str) -> Option<usize> {
        let slot = self.members.iter().filter(|m| m.is_running()).find_map(|m| {
            match self.query_member(m.port, &redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).to_owned())? {
                redis::Value::Int(s) => Some(s),
                _ => None,
            }
        })?;
        self.members.iter().position(|m| {
            m.is_running()
                && self
                    .text(m.port, &redis::cmd("INFO").arg("replication").to_owned())
                    .and_then(|i| info_field(&i, "role"))
                    .as_deref()
                    == Some("master")
                && self.owns(m.port, slot)
        })
    }

    /// Whether the member on `port` serves `slot`, by its own `CLUSTER SLOTS`.
    fn owns(&self, port: u16, slot: i64) -> bool {
        let Some(redis::Value::Array(ranges)) = self.query_member(port, &redis::cmd("CLUSTER").arg("SLOTS").to_owned())
        else {
            return false;
        };
        ranges.iter().any(|r| {
            let redis::Value::Array(r) = r else { return false };
            let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi)), Some(redis::Value::Array(master))) =
                (r.first(), r.get(1), r.get(2))
            else {
                return false;
            };
            (*lo..=*hi).contains(&slot) && matches!(master.get(1), Some(redis::Value::Int(p)) if *p == port as i64)
        })
    }

    /// Kills member `i` (`kill -9`, as a crash would).
    pub fn kill(&mut self, i: usize) {
        self.members[i].stop();
    }

    /// Waits until another running member masters `key`'s slot (the dead
    /// master's replica promoted) and the cluster is ok again; its index.
    pub fn wait_failover(&self, key: &str, dead: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.master_of(key).filter(|i| *i != dead) {
                self.wait_ok(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1)));
                return i;
            }
            assert!(Instant::now() < deadline, "no replica took over {key}'s slot within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_read_by_name() {
        let info = "# Cluster\r\ncluster_state:ok\r\ncluster_slots_assigned:16384\r\n";
        assert_eq!(info_field(info, "cluster_state").as_deref(), Some("ok"));
        assert_eq!(info_field(info, "cluster_slots"), None);
    }
}
