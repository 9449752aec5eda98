//! The balancer's settings: built-in defaults, then `--config FILE` (TOML, see
//! `config/balancer.toml`), then `SWITCHBOARD_…` environment variables, then
//! command-line flags. One validated `BalancerConfig` comes out; the services
//! are built from it.

pub use crate::access_log::AccessLogFormat;
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
pub use switchboard_common::config::LogFormat;
use switchboard_common::config::{load_file, require_positive, ConfigError};
use switchboard_common::overlay;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalancerConfig {
    pub listen: SocketAddr,
    pub tls_listen: String,
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_redirect: bool,
    pub admin_listen: SocketAddr,
    pub redis: String,
    pub key_prefix: String,
    pub discovery_interval_ms: u64,
    pub missing_grace_ms: u64,
    pub health_interval_ms: u64,
    pub health_timeout_ms: u64,
    pub health_rise: usize,
    pub health_fall: usize,
    pub connect_timeout_ms: u64,
    pub idle_timeout_secs: u64,
    pub request_head_timeout_secs: u64,
    pub keepalive_timeout_secs: u64,
    pub max_request_head_bytes: usize,
    pub cookie_name: String,
    pub cookie_secret: String,
    pub rate_limit_per_ip: u32,
    pub max_connections: usize,
    pub fd_reserve: u64,
    pub node_admission_rate: u32,
    pub slow_start_secs: u64,
    pub admission_wait_ms: u64,
    pub admin_max_connections: usize,
    pub admin_token: String,
    pub threads: usize,
    pub work_stealing: bool,
    pub grace_period_secs: u64,
    pub shutdown_timeout_secs: u64,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub log_format: LogFormat,
    pub access_log: String,
    pub access_log_format: AccessLogFormat,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8888)),
            tls_listen: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_redirect: false,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            redis: "redis://127.0.0.1:6379".into(),
            key_prefix: switchboard_common::registry::DEFAULT_PREFIX.into(),
            discovery_interval_ms: 2000,
            missing_grace_ms: 20_000,
            health_interval_ms: 1000,
            health_timeout_ms: 500,
            health_rise: 1,
            health_fall: 2,
            connect_timeout_ms: 1000,
            idle_timeout_secs: 120,
            request_head_timeout_secs: 20,
            keepalive_timeout_secs: 60,
            max_request_head_bytes: 32 * 1024,
            cookie_name: "switchboard_affinity".into(),
            cookie_secret: String::new(),
            rate_limit_per_ip: 0,
            max_connections: 100_000,
            fd_reserve: 256,
            node_admission_rate: 1000,
            slow_start_secs: 10,
            admission_wait_ms: 2000,
            admin_max_connections: 64,
            admin_token: String::new(),
            threads: 2,
            work_stealing: false,
            grace_period_secs: 5,
            shutdown_timeout_secs: 10,
            pid_file: "/tmp/switchboard-balancer.pid".into(),
            upgrade_sock: "/tmp/switchboard-balancer-upgrade.sock".into(),
            log_format: LogFormat::Text,
            access_log: String::new(),
            access_log_format: AccessLogFormat::Json,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "switchboard-balancer",
    version,
    args_override_self = true,
    about = "Switchboard load balancer: Pingora proxy with Redis-watched discovery and SignalR-aware affinity"
)]
pub struct Cli {
    /// TOML configuration file (see config/balancer.toml)
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Public address [default: 0.0.0.0:8888]
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTPS address serving what the public address serves (wss, SSE and long polling too), e.g. 0.0.0.0:8443; empty = no HTTPS [default: empty]
    #[arg(long, env = "SWITCHBOARD_TLS_LISTEN")]
    pub tls_listen: Option<String>,
    /// PEM file with the certificate chain, leaf first; reloaded when it changes or on SIGHUP [default: empty]
    #[arg(long, env = "SWITCHBOARD_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1) [default: empty]
    #[arg(long, env = "SWITCHBOARD_TLS_KEY")]
    pub tls_key: Option<String>,
    /// Redirect plain-HTTP requests (except /health) to the HTTPS port with 308 [default: false]
    #[arg(long, env = "SWITCHBOARD_TLS_REDIRECT")]
    pub tls_redirect: Option<bool>,
    /// Admin address: /dashboard, /api/backends, /metrics [default: 127.0.0.1:8080]
    #[arg(long, env = "SWITCHBOARD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Redis URL of the node registry, or redis+sentinel://[:password@]host:26379[,host:26379…]/service[/db] [default: redis://127.0.0.1:6379]
    #[arg(long, env = "SWITCHBOARD_REDIS")]
    pub redis: Option<String>,
    /// Prefix of registry keys and channels [default: switchboard]
    #[arg(long, env = "SWITCHBOARD_KEY_PREFIX")]
    pub key_prefix: Option<String>,
    /// Full re-read of the registry every N ms, besides announcements [default: 2000]
    #[arg(long, env = "SWITCHBOARD_DISCOVERY_INTERVAL_MS")]
    pub discovery_interval_ms: Option<u64>,
    /// Keep a node whose registry key vanished (e.g. Redis restarted empty) this long, if it stays healthy [default: 20000]
    #[arg(long, env = "SWITCHBOARD_MISSING_GRACE_MS")]
    pub missing_grace_ms: Option<u64>,
    /// Active health check interval in ms [default: 1000]
    #[arg(long, env = "SWITCHBOARD_HEALTH_INTERVAL_MS")]
    pub health_interval_ms: Option<u64>,
    /// Health check timeout in ms [default: 500]
    #[arg(long, env = "SWITCHBOARD_HEALTH_TIMEOUT_MS")]
    pub health_timeout_ms: Option<u64>,
    /// Consecutive passing checks to mark a node healthy [default: 1]
    #[arg(long, env = "SWITCHBOARD_HEALTH_RISE")]
    pub health_rise: Option<usize>,
    /// Consecutive failing checks to mark a node unhealthy [default: 2]
    #[arg(long, env = "SWITCHBOARD_HEALTH_FALL")]
    pub health_fall: Option<usize>,
    /// Upstream connect timeout in ms [default: 1000]
    #[arg(long, env = "SWITCHBOARD_CONNECT_TIMEOUT_MS")]
    pub connect_timeout_ms: Option<u64>,
    /// Close an upgraded or streaming connection idle this long, in seconds; also the longest upstream wait [default: 120]
    #[arg(long, env = "SWITCHBOARD_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// A request head must arrive whole within this many seconds, counted from the connection's start for its first request and from the first byte for later ones [default: 20]
    #[arg(long, env = "SWITCHBOARD_REQUEST_HEAD_TIMEOUT_SECS")]
    pub request_head_timeout_secs: Option<u64>,
    /// Close a kept-alive client connection idle this long between requests, in seconds [default: 60]
    #[arg(long, env = "SWITCHBOARD_KEEPALIVE_TIMEOUT_SECS")]
    pub keepalive_timeout_secs: Option<u64>,
    /// Largest request head (request line and headers) in bytes; larger ones get 431 [default: 32768]
    #[arg(long, env = "SWITCHBOARD_MAX_REQUEST_HEAD_BYTES")]
    pub max_request_head_bytes: Option<usize>,
    /// Affinity cookie name [default: switchboard_affinity]
    #[arg(long, env = "SWITCHBOARD_COOKIE_NAME")]
    pub cookie_name: Option<String>,
    /// Secret key of the affinity cookie's HMAC, at least 16 characters; give every balancer replica the same one. Empty: a random one per process (cookies then work with this process only) [default: empty]
    #[arg(long, env = "SWITCHBOARD_COOKIE_SECRET", hide_env_values = true)]
    pub cookie_secret: Option<String>,
    /// New SignalR connections per second per client IP; 0 = off [default: 0]
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT_PER_IP")]
    pub rate_limit_per_ip: Option<u32>,
    /// Open client connections (WebSockets included) before answering 503; lowered further to what the open-file limit allows [default: 100000]
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Descriptors kept free for the admin port, health checks, Redis and upstream pools; the rest allow two per client connection [default: 256]
    #[arg(long, env = "SWITCHBOARD_FD_RESERVE")]
    pub fd_reserve: Option<u64>,
    /// New SignalR connections (negotiates, WebSockets without an id) each node takes a second; one that finds its node's turn taken goes to another node, or waits up to admission_wait_ms, then gets 503; 0 = no limit [default: 1000]
    #[arg(long, env = "SWITCHBOARD_NODE_ADMISSION_RATE")]
    pub node_admission_rate: Option<u32>,
    /// A node that joins or comes back ramps its admission rate up from a tenth over this many seconds; 0 = at once [default: 10]
    #[arg(long, env = "SWITCHBOARD_SLOW_START_SECS")]
    pub slow_start_secs: Option<u64>,
    /// How long a new connection may wait for its node's admission turn [default: 2000]
    #[arg(long, env = "SWITCHBOARD_ADMISSION_WAIT_MS")]
    pub admission_wait_ms: Option<u64>,
    /// Open connections to the admin port, counted apart from client connections (whose descriptors never go to it); past it the admin port answers 503 [default: 64]
    #[arg(long, env = "SWITCHBOARD_ADMIN_MAX_CONNECTIONS")]
    pub admin_max_connections: Option<usize>,
    /// Token for the admin port's /dashboard, /api/* and /metrics (Bearer, or Basic auth with it as the password). Without one, only loopback clients are served [default: none]
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Proxy worker threads [default: 2]
    #[arg(long, env = "SWITCHBOARD_THREADS")]
    pub threads: Option<usize>,
    /// Let proxy threads steal each other's connections (one work-stealing runtime) instead of one single-threaded proxy per thread, each with its own listening socket (SO_REUSEPORT) and node pool, owning its connections from accept to close [default: false]
    #[arg(long, env = "SWITCHBOARD_WORK_STEALING")]
    pub work_stealing: Option<bool>,
    /// On SIGTERM, keep accepting this many seconds (lets a replacement take over) [default: 5]
    #[arg(long, env = "SWITCHBOARD_GRACE_PERIOD_SECS")]
    pub grace_period_secs: Option<u64>,
    /// Then let open connections finish for at most this many seconds [default: 10]
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Pid file (used by graceful upgrade) [default: /tmp/switchboard-balancer.pid]
    #[arg(long, env = "SWITCHBOARD_PID_FILE")]
    pub pid_file: Option<String>,
    /// Socket the listening sockets are handed over on during a graceful upgrade [default: /tmp/switchboard-balancer-upgrade.sock]
    #[arg(long, env = "SWITCHBOARD_UPGRADE_SOCK")]
    pub upgrade_sock: Option<String>,
    /// Take over the listening sockets of a running balancer (send it SIGQUIT after starting this one)
    #[arg(long, env = "SWITCHBOARD_UPGRADE")]
    pub upgrade: bool,
    /// Validate the merged settings (file, environment, flags) and the TLS files, print them with secrets masked, and exit: 0 when valid, 2 otherwise
    #[arg(long)]
    pub check_config: bool,
    /// Log format [default: text]
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Access log, one line per request when it ends: "stdout", a file path (appended to), or empty for none; connection ids, access tokens and cookies are never written [default: empty]
    #[arg(long, env = "SWITCHBOARD_ACCESS_LOG")]
    pub access_log: Option<String>,
    /// Access log lines: json, or common (nginx's format plus node, route, duration and bytes) [default: json]
    #[arg(long, env = "SWITCHBOARD_ACCESS_LOG_FORMAT")]
    pub access_log_format: Option<AccessLogFormat>,
}

impl Cli {
    pub fn resolve(self) -> Result<BalancerConfig, ConfigError> {
        let mut cfg: BalancerConfig = load_file(self.config.as_deref())?;
        let cli = self;
        overlay!(
            cfg,
            cli,
            listen,
            tls_listen,
            tls_cert,
            tls_key,
            tls_redirect,
            admin_listen,
            redis,
            key_prefix,
            discovery_interval_ms,
            missing_grace_ms,
            health_interval_ms,
            health_timeout_ms,
            health_rise,
            health_fall,
            connect_timeout_ms,
            idle_timeout_secs,
            request_head_timeout_secs,
            keepalive_timeout_secs,
            max_request_head_bytes,
            cookie_name,
            cookie_secret,
            rate_limit_per_ip,
            max_connections,
            fd_reserve,
            node_admission_rate,
            slow_start_secs,
            admission_wait_ms,
            admin_max_connections,
            admin_token,
            threads,
            work_stealing,
            grace_period_secs,
            shutdown_timeout_secs,
            pid_file,
            upgrade_sock,
            log_format,
            access_log,
            access_log_format
        );
        cfg.validate()?;
        Ok(cfg)
    }
}

impl BalancerConfig {
    /// The settings as TOML with `cookie_secret`, `admin_token` and the Redis
    /// password masked (`--check-config`).
    pub fn masked(&self) -> Result<String, String> {
        switchboard_common::config::masked_toml(self, &["cookie_secret", "admin_token"], &["redis"])
    }

    /// The HTTPS address, if HTTPS is on.
    pub fn tls_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.tls_listen.is_empty() {
            return Ok(None);
        }
        self.tls_listen
            .parse()
            .map(Some)
            .map_err(|e| ConfigError::Invalid { name: "tls_listen", reason: format!("{e}") })
    }

    /// The port plain-HTTP clients are redirected to.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_addr().ok().flatten().map(|a| a.port())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("discovery_interval_ms", self.discovery_interval_ms),
            ("health_interval_ms", self.health_interval_ms),
            ("health_timeout_ms", self.health_timeout_ms),
            ("health_rise", self.health_rise as u64),
            ("health_fall", self.health_fall as u64),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("request_head_timeout_secs", self.request_head_timeout_secs),
            ("keepalive_timeout_secs", self.keepalive_timeout_secs),
            ("max_connections", self.max_connections as u64),
            ("threads", self.threads as u64),
        ] {
            require_positive(name, v)?;
        }
        let token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if self.cookie_name.is_empty() || !self.cookie_name.chars().all(token_char) {
            return Err(ConfigError::Invalid { name: "cookie_name", reason: "must be a non-empty HTTP token".into() });
        }
        if self.max_request_head_bytes < 1024 {
            return Err(ConfigError::Invalid {
                name: "max_request_head_bytes",
                reason: "must be at least 1024".into(),
            });
        }
        if !self.cookie_secret.is_empty() && self.cookie_secret.len() < 16 {
            return Err(ConfigError::Invalid {
                name: "cookie_secret",
                reason: "must be at least 16 characters (or empty for a random one)".into(),
            });
        }
        if let Some(tls) = self.tls_addr()? {
            if tls == self.listen || tls == self.admin_listen {
                return Err(ConfigError::Invalid {
                    name: "tls_listen",
                    reason: "must differ from listen and admin_listen".into(),
                });
            }
            if self.tls_cert.is_empty() || self.tls_key.is_empty() {
                return Err(ConfigError::Invalid {
                    name: "tls_cert",
                    reason: "tls_listen needs tls_cert and tls_key".into(),
                });
            }
        } else if self.tls_redirect {
            return Err(ConfigError::Invalid { name: "tls_redirect", reason: "needs tls_listen".into() });
        }
        if self.listen == self.admin_listen {
            return Err(ConfigError::Invalid { name: "admin_listen", reason: "must differ from listen".into() });
        }
        if self.admin_max_connections == 0 {
            return Err(ConfigError::Invalid { name: "admin_max_connections", reason: "must be at least 1".into() });
        }
        switchboard_common::redis_target::RedisTarget::open(self.redis.as_str())
            .map_err(|e| ConfigError::Invalid { name: "redis", reason: e.to_string() })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_the_shipped_file_and_the_defaults_agree() {
        let text = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/balancer.toml"));
        let shipped: BalancerConfig = toml::from_str(text).unwrap();
        let help = Cli::command().render_help().to_string();
        let problems = switchboard_common::config::defaults_disagree(&BalancerConfig::default(), text, &shipped, &help);
        assert!(problems.is_empty(), "{problems:#?}");
    }

    fn parse(args: &[&str]) -> Result<BalancerConfig, ConfigError> {
        let mut all = vec!["switchboard-balancer"];
        all.extend_from_slice(args);
        Cli::parse_from(all).resolve()
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = parse(&[]).unwrap();
        assert_eq!((c.listen.port(), c.admin_listen.port()), (8888, 8080));
        assert!(c.health_interval_ms < 30_000);
        assert_eq!(c.idle_timeout_secs, 120);
        assert!(c.admin_listen.ip().is_loopback(), "the admin port is private unless configured otherwise");
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(parse(&["--health-interval-ms", "0"]).is_err());
        assert!(parse(&["--cookie-name", "a b"]).is_err());
        assert!(parse(&["--listen", "127.0.0.1:1", "--admin-listen", "127.0.0.1:1"]).is_err());
        assert!(parse(&["--redis", "nope://x"]).is_err());
        assert!(parse(&["--max-request-head-bytes", "100"]).is_err());
        assert!(parse(&["--cookie-secret", "switchboard"]).is_err(), "a short, guessable secret");
        assert!(parse(&["--cookie-secret", "0123456789abcdef"]).is_ok());
        assert!(parse(&["--request-head-timeout-secs", "0"]).is_err());
        assert!(parse(&["--tls-listen", "127.0.0.1:8443"]).is_err(), "HTTPS without a certificate");
        assert!(parse(&["--tls-listen", "nope", "--tls-cert", "c", "--tls-key", "k"]).is_err());
        assert!(parse(&["--tls-redirect", "true"]).is_err(), "a redirect to no HTTPS port");
        let tls =
            parse(&["--tls-listen", "127.0.0.1:8443", "--tls-cert", "c", "--tls-key", "k", "--tls-redirect", "true"]);
        assert_eq!(tls.unwrap().tls_port(), Some(8443));
    }

    #[test]
    fn shipped_config_file_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/balancer.toml");
        assert_eq!(parse(&["--config", path]).unwrap().listen.port(), 8888);
    }
}
