//! The node's settings: built-in defaults, then `--config FILE` (TOML, see
//! `config/node.toml`), then `SWITCHBOARD_…` environment variables, then
//! command-line flags, each overriding the one before. Durations are given in
//! seconds and may be fractional (tests use sub-second heartbeats).

use clap::Parser;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
pub use switchboard_common::config::LogFormat;
use switchboard_common::config::{load_file, require_positive, ConfigError};
use switchboard_common::overlay;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub redis: String,
    pub node_id: Option<String>,
    pub advertise_url: Option<String>,
    pub name: Option<String>,
    pub description: String,
    pub key_prefix: String,
    pub heartbeat_secs: f64,
    pub ttl_secs: f64,
    pub keepalive_secs: f64,
    pub client_timeout_secs: f64,
    pub handshake_timeout_secs: f64,
    pub request_head_timeout_secs: f64,
    pub max_request_head_bytes: usize,
    pub long_poll_secs: f64,
    pub long_poll_idle_secs: f64,
    pub drain_secs: f64,
    pub drain_spread_secs: f64,
    pub max_message_bytes: usize,
    pub max_buffered_frames: usize,
    pub max_buffered_bytes: usize,
    pub max_groups_per_connection: usize,
    pub history_len: usize,
    pub stateful_reconnect: bool,
    pub stateful_buffer_bytes: usize,
    pub reconnect_window_secs: f64,
    pub auth: AuthMode,
    pub auth_secret: String,
    pub auth_secret_file: String,
    pub auth_public_key_file: String,
    pub auth_issuer: String,
    pub auth_audience: String,
    pub auth_clock_skew_secs: u64,
    pub auth_dev_sign_in: bool,
    pub allowed_origins: Vec<String>,
    pub api_access_key: String,
    pub api_audience: String,
    pub api_max_body_bytes: usize,
    pub upstream_url: String,
    pub upstream_timeout_secs: f64,
    pub upstream_concurrency: usize,
    pub upstream_retries: u32,
    pub log_format: LogFormat,
}

/// Whether clients must sign in with a JWT bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Tokens are not looked at; `user` is whatever the client says.
    Off,
    /// Anonymous clients are served; a token, if sent, must be valid.
    Optional,
    /// Negotiate and every transport request need a valid token (401 without).
    Required,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            redis: "redis://127.0.0.1:6379".into(),
            node_id: None,
            advertise_url: None,
            name: None,
            description: "Switchboard chat node".into(),
            key_prefix: switchboard_common::registry::DEFAULT_PREFIX.into(),
            heartbeat_secs: 15.0,
            ttl_secs: 45.0,
            keepalive_secs: 15.0,
            client_timeout_secs: 30.0,
            handshake_timeout_secs: 15.0,
            request_head_timeout_secs: 30.0,
            max_request_head_bytes: 32 * 1024,
            long_poll_secs: 90.0,
            long_poll_idle_secs: 15.0,
            drain_secs: 10.0,
            drain_spread_secs: 15.0,
            max_message_bytes: 32 * 1024,
            max_buffered_frames: 1024,
            max_buffered_bytes: 1024 * 1024,
            max_groups_per_connection: 100,
            history_len: 1000,
            stateful_reconnect: true,
            stateful_buffer_bytes: 100_000,
            reconnect_window_secs: 15.0,
            auth: AuthMode::Off,
            auth_secret: String::new(),
            auth_secret_file: String::new(),
            auth_public_key_file: String::new(),
            auth_issuer: String::new(),
            auth_audience: String::new(),
            auth_clock_skew_secs: 30,
            auth_dev_sign_in: false,
            allowed_origins: Vec::new(),
            api_access_key: String::new(),
            api_audience: String::new(),
            api_max_body_bytes: 1024 * 1024,
            upstream_url: String::new(),
            upstream_timeout_secs: 5.0,
            upstream_concurrency: 64,
            upstream_retries: 2,
            log_format: LogFormat::Text,
        }
    }
}

/// Command line and environment; every flag overrides the file and defaults.
#[derive(Debug, Parser)]
#[command(
    args_override_self = true,
    name = "switchboard-node",
    version,
    about = "Switchboard chat node: an ASP.NET Core SignalR-compatible hub with a Redis backplane"
)]
pub struct Cli {
    /// TOML configuration file (see config/node.toml)
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:5000]
    #[arg(long, global = true, env = "SWITCHBOARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Redis URL, or redis+sentinel://[:password@]host:26379[,host:26379…]/service[/db] to follow a Sentinel-managed master [default: redis://127.0.0.1:6379]
    #[arg(long, global = true, env = "SWITCHBOARD_REDIS")]
    pub redis: Option<String>,
    /// Node id in the registry and in tokens [default: host name]
    #[arg(long, global = true, env = "SWITCHBOARD_NODE_ID")]
    pub node_id: Option<String>,
    /// Base URL the balancer dials [default: http://<host name>:<port>]
    #[arg(long, global = true, env = "SWITCHBOARD_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Display name [default: "Node <node id>"]
    #[arg(long, global = true, env = "SWITCHBOARD_NAME")]
    pub name: Option<String>,
    /// Description shown in /nodes [default: Switchboard chat node]
    #[arg(long, global = true, env = "SWITCHBOARD_DESCRIPTION")]
    pub description: Option<String>,
    /// Prefix of every Redis key and channel [default: switchboard]
    #[arg(long, global = true, env = "SWITCHBOARD_KEY_PREFIX")]
    pub key_prefix: Option<String>,
    /// Registry heartbeat interval in seconds [default: 15]
    #[arg(long, global = true, env = "SWITCHBOARD_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<f64>,
    /// Registry key TTL in seconds [default: 45]
    #[arg(long, global = true, env = "SWITCHBOARD_TTL_SECS")]
    pub ttl_secs: Option<f64>,
    /// Send a Ping after this many seconds without sending [default: 15]
    #[arg(long, global = true, env = "SWITCHBOARD_KEEPALIVE_SECS")]
    pub keepalive_secs: Option<f64>,
    /// Drop a client silent for this many seconds [default: 30]
    #[arg(long, global = true, env = "SWITCHBOARD_CLIENT_TIMEOUT_SECS")]
    pub client_timeout_secs: Option<f64>,
    /// Drop a connection whose handshake has not arrived after this many seconds [default: 15]
    #[arg(long, global = true, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT_SECS")]
    pub handshake_timeout_secs: Option<f64>,
    /// A request head must arrive whole within this many seconds, counted from when the connection is ready for it (idle kept-alive connections close after it too); longer than the balancer's pooled-connection idle time [default: 30]
    #[arg(long, global = true, env = "SWITCHBOARD_REQUEST_HEAD_TIMEOUT_SECS")]
    pub request_head_timeout_secs: Option<f64>,
    /// Largest request head (request line and headers) in bytes; larger ones get 431 [default: 32768]
    #[arg(long, global = true, env = "SWITCHBOARD_MAX_REQUEST_HEAD_BYTES")]
    pub max_request_head_bytes: Option<usize>,
    /// Longest a long poll waits for data, in seconds [default: 90]
    #[arg(long, global = true, env = "SWITCHBOARD_LONG_POLL_SECS")]
    pub long_poll_secs: Option<f64>,
    /// Drop a long-polling connection with no poll for this many seconds [default: 15]
    #[arg(long, global = true, env = "SWITCHBOARD_LONG_POLL_IDLE_SECS")]
    pub long_poll_idle_secs: Option<f64>,
    /// On SIGTERM, keep serving existing clients this many seconds before closing them [default: 10]
    #[arg(long, global = true, env = "SWITCHBOARD_DRAIN_SECS")]
    pub drain_secs: Option<f64>,
    /// After drain_secs, the clients still connected are closed one by one over this many seconds, oldest first and evenly spaced, instead of all at once (0: all together) [default: 15]
    #[arg(long, global = true, env = "SWITCHBOARD_DRAIN_SPREAD_SECS")]
    pub drain_spread_secs: Option<f64>,
    /// Largest incoming hub message in bytes [default: 32768]
    #[arg(long, global = true, env = "SWITCHBOARD_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Frames buffered for a slow client before it is disconnected [default: 1024]
    #[arg(long, global = true, env = "SWITCHBOARD_MAX_BUFFERED_FRAMES")]
    pub max_buffered_frames: Option<usize>,
    /// Bytes buffered for one client before it stops being read (its own
    /// replies) or is disconnected (traffic it did not ask for); a GetHistory
    /// answer is at most half of it [default: 1048576]
    #[arg(long, global = true, env = "SWITCHBOARD_MAX_BUFFERED_BYTES")]
    pub max_buffered_bytes: Option<usize>,
    /// Groups one connection may be in at once [default: 100]
    #[arg(long, global = true, env = "SWITCHBOARD_MAX_GROUPS_PER_CONNECTION")]
    pub max_groups_per_connection: Option<usize>,
    /// Messages kept in the Redis history stream [default: 1000]
    #[arg(long, global = true, env = "SWITCHBOARD_HISTORY_LEN")]
    pub history_len: Option<usize>,
    /// Offer stateful reconnect to clients that ask for it [default: true]
    #[arg(long, global = true, env = "SWITCHBOARD_STATEFUL_RECONNECT")]
    pub stateful_reconnect: Option<bool>,
    /// Unacknowledged bytes a stateful connection may have on the wire before sending pauses [default: 100000]
    #[arg(long, global = true, env = "SWITCHBOARD_STATEFUL_BUFFER_BYTES")]
    pub stateful_buffer_bytes: Option<usize>,
    /// How long a stateful connection whose socket dropped waits for the client to resume, in seconds [default: 15]
    #[arg(long, global = true, env = "SWITCHBOARD_RECONNECT_WINDOW_SECS")]
    pub reconnect_window_secs: Option<f64>,
    /// Sign-in with JWT bearer tokens: off, optional (a token, if sent, must be valid) or required [default: off]
    #[arg(long, global = true, env = "SWITCHBOARD_AUTH")]
    pub auth: Option<AuthMode>,
    /// HS256 secret tokens are signed with (at least 32 bytes) [default: empty]
    #[arg(long, global = true, env = "SWITCHBOARD_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// File holding the HS256 secret, instead of auth_secret [default: empty]
    #[arg(long, global = true, env = "SWITCHBOARD_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<String>,
    /// PEM public key (RSA for RS256, EC P-256 for ES256) tokens are checked with, instead of a secret [default: empty]
    #[arg(long, global = true, env = "SWITCHBOARD_AUTH_PUBLIC_KEY_FILE")]
    pub auth_public_key_file: Option<String>,
    /// Required `iss` of tokens; empty = not checked [default: empty]
    #[arg(long, global = true, env = "SWITCHBOARD_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    /// Required `aud` of tokens; empty = not checked [default: empty]
    #[arg(long, global = true, env = "SWITCHBOARD_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    /// Seconds of clock difference allowed when checking `exp` and `nbf` [default: 30]
    #[arg(long, global = true, env = "SWITCHBOARD_AUTH_CLOCK_SKEW_SECS")]
    pub auth_clock_skew_secs: Option<u64>,
    /// Development only: POST /auth/dev-token?user=NAME hands anyone a token for any name, and the chat page offers it [default: false]
    #[arg(long, global = true, env = "SWITCHBOARD_AUTH_DEV_SIGN_IN")]
    pub auth_dev_sign_in: Option<bool>,
    /// Other origins (scheme://host[:port]) whose pages may use the hub, comma-separated; "*" = any. Same origin is always allowed [default: none]
    #[arg(long, global = true, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// The server API's access key (32+ bytes), or an Azure SignalR connection string holding it (Endpoint=…;AccessKey=…;Version=1.0;); empty = no server API (404) [default: empty]
    #[arg(long, global = true, env = "SWITCHBOARD_API_ACCESS_KEY")]
    pub api_access_key: Option<String>,
    /// The public base URL (scheme://host[:port]) the server API's tokens name in `aud`, where it differs from what requests arrive with (empty: the URL they arrive with) [default: empty]
    #[arg(long, global = true, env = "SWITCHBOARD_API_AUDIENCE")]
    pub api_audience: Option<String>,
    /// Largest server API request body, in bytes (larger: 413) [default: 1048576]
    #[arg(long, global = true, env = "SWITCHBOARD_API_MAX_BODY_BYTES")]
    pub api_max_body_bytes: Option<usize>,
    /// The application backend's URL (http://…) that gets upstream events: connected, disconnected, and invocations of methods the hub does not define; needs api_access_key, which signs them [default: empty]
    #[arg(long, global = true, env = "SWITCHBOARD_UPSTREAM_URL")]
    pub upstream_url: Option<String>,
    /// How long an upstream call may take; an invocation then gets an error completion [default: 5]
    #[arg(long, global = true, env = "SWITCHBOARD_UPSTREAM_TIMEOUT_SECS")]
    pub upstream_timeout_secs: Option<f64>,
    /// Upstream calls in flight at once from one node; more wait their turn within the timeout [default: 64]
    #[arg(long, global = true, env = "SWITCHBOARD_UPSTREAM_CONCURRENCY")]
    pub upstream_concurrency: Option<usize>,
    /// How many times a connected or disconnected event is retried after a failure [default: 2]
    #[arg(long, global = true, env = "SWITCHBOARD_UPSTREAM_RETRIES")]
    pub upstream_retries: Option<u32>,
    /// Log format [default: text]
    #[arg(long, global = true, env = "SWITCHBOARD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Validate the merged settings (file, environment, flags) and the key files they name, print them with secrets masked, and exit: 0 when valid, 2 otherwise
    #[arg(long, global = true)]
    pub check_config: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the program does instead of serving.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a token signed with the configured auth_secret (for demos and tests)
    Token {
        /// The user name the token carries (`name` and `sub`)
        #[arg(long)]
        user: String,
        /// How long it is valid: 90s, 15m, 1h, 2d
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

impl Cli {
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let mut cfg: NodeConfig = load_file(self.config.as_deref())?;
        let cli = self;
        overlay!(
            cfg,
            cli,
            listen,
            redis,
            description,
            key_prefix,
            heartbeat_secs,
            ttl_secs,
            keepalive_secs,
            client_timeout_secs,
            handshake_timeout_secs,
            request_head_timeout_secs,
            max_request_head_bytes,
            long_poll_secs,
            long_poll_idle_secs,
            drain_secs,
            drain_spread_secs,
            max_message_bytes,
            max_buffered_frames,
            max_buffered_bytes,
            max_groups_per_connection,
            history_len,
            stateful_reconnect,
            stateful_buffer_bytes,
            reconnect_window_secs,
            auth,
            auth_secret,
            auth_secret_file,
            auth_public_key_file,
            auth_issuer,
            auth_audience,
            auth_clock_skew_secs,
            auth_dev_sign_in,
            allowed_origins,
            api_access_key,
            api_audience,
            api_max_body_bytes,
            upstream_url,
            upstream_timeout_secs,
            upstream_concurrency,
            upstream_retries,
            log_format
        );
        // An empty environment variable or "a,,b" lists nothing in between.
        cfg.allowed_origins.retain(|o| !o.trim().is_empty());
        if cli.node_id.is_some() {
            cfg.node_id = cli.node_id;
        }
        if cli.advertise_url.is_some() {
            cfg.advertise_url = cli.advertise_url;
        }
        if cli.name.is_some() {
            cfg.name = cli.name;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The sign-in keys the settings name (`NodeConfig::auth_keys`).
pub struct AuthKeys {
    /// The HS256 secret, which also signs the node's own tokens.
    pub secret: Option<Vec<u8>>,
    /// An RS256 or ES256 public key, which then verifies instead.
    pub public: Option<(DecodingKey, Algorithm)>,
}

fn secs(name: &'static str, v: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or(ConfigError::Invalid { name, reason: format!("{v} is not a positive number of seconds") })
}

impl NodeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("heartbeat_secs", self.heartbeat_secs),
            ("ttl_secs", self.ttl_secs),
            ("keepalive_secs", self.keepalive_secs),
            ("client_timeout_secs", self.client_timeout_secs),
            ("handshake_timeout_secs", self.handshake_timeout_secs),
            ("request_head_timeout_secs", self.request_head_timeout_secs),
            ("long_poll_secs", self.long_poll_secs),
            ("long_poll_idle_secs", self.long_poll_idle_secs),
            ("drain_secs", self.drain_secs),
            ("reconnect_window_secs", self.reconnect_window_secs),
        ] {
            secs(name, v)?;
        }
        if Duration::try_from_secs_f64(self.drain_spread_secs).is_err() {
            return Err(ConfigError::Invalid {
                name: "drain_spread_secs",
                reason: format!("{} is not a number of seconds (0 or more)", self.drain_spread_secs),
            });
        }
        require_positive("max_message_bytes", self.max_message_bytes as u64)?;
        if self.max_request_head_bytes < 1024 {
            return Err(ConfigError::Invalid {
                name: "max_request_head_bytes",
                reason: "must be at least 1024".into(),
            });
        }
        require_positive("max_buffered_frames", self.max_buffered_frames as u64)?;
        require_positive("max_groups_per_connection", self.max_groups_per_connection as u64)?;
        if self.max_buffered_bytes < 2 * self.max_message_bytes {
            return Err(ConfigError::Invalid {
                name: "max_buffered_bytes",
                reason: "must be at least twice max_message_bytes".into(),
            });
        }
        require_positive("history_len", self.history_len as u64)?;
        require_positive("stateful_buffer_bytes", self.stateful_buffer_bytes as u64)?;
        if self.ttl_secs <= self.heartbeat_secs {
            return Err(ConfigError::Invalid {
                name: "ttl_secs",
                reason: "must be longer than heartbeat_secs, or the key expires between heartbeats".into(),
            });
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid { name: "key_prefix", reason: "must be a non-empty word".into() });
        }
        if let Some(id) = &self.node_id {
            if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c == '*') {
                return Err(ConfigError::Invalid {
                    name: "node_id",
                    reason: "must be 1-128 printable characters, no '*'".into(),
                });
            }
        }
        switchboard_common::redis_target::RedisTarget::open(self.redis.as_str())
            .map_err(|e| ConfigError::Invalid { name: "redis", reason: e.to_string() })?;
        if !self.auth_secret.is_empty() && !self.auth_secret_file.is_empty() {
            return Err(ConfigError::Invalid {
                name: "auth_secret",
                reason: "set auth_secret or auth_secret_file, not both".into(),
            });
        }
        if self.auth_dev_sign_in && self.auth == AuthMode::Off {
            return Err(ConfigError::Invalid {
                name: "auth_dev_sign_in",
                reason: "needs auth = optional or required".into(),
            });
        }
        for origin in &self.allowed_origins {
            if origin != "*" && crate::cors::normalise(origin).is_none() {
                return Err(ConfigError::Invalid {
                    name: "allowed_origins",
                    reason: format!("{origin:?} is not an origin like https://chat.example.com[:port] or *"),
                });
            }
        }
        if !self.api_access_key.is_empty() {
            crate::api::auth::AccessKey::parse(&self.api_access_key)
                .map_err(|reason| ConfigError::Invalid { name: "api_access_key", reason })?;
        }
        if !self.api_audience.is_empty() && crate::cors::normalise(&self.api_audience).is_none() {
            return Err(ConfigError::Invalid {
                name: "api_audience",
                reason: format!("{:?} is not a base URL like https://chat.example.com[:port]", self.api_audience),
            });
        }
        require_positive("api_max_body_bytes", self.api_max_body_bytes as u64)?;
        if !self.upstream_url.is_empty() {
            if self.api_access_key.is_empty() {
                return Err(ConfigError::Invalid {
                    name: "upstream_url",
                    reason: "upstream events are signed with the access key: set api_access_key too".into(),
                });
            }
            let url = self.upstream_url.trim();
            if !url.starts_with("http://") || url.len() <= "http://".len() {
                return Err(ConfigError::Invalid {
                    name: "upstream_url",
                    reason: format!(
                        "{url:?} is not an http:// URL (upstream calls go over the cluster's private network)"
                    ),
                });
            }
        }
        secs("upstream_timeout_secs", self.upstream_timeout_secs)?;
        require_positive("upstream_concurrency", self.upstream_concurrency as u64)?;
        // Reading the keys is the final check (a missing file, a short secret, a bad PEM).
        self.auth_keys().map_err(|reason| ConfigError::Invalid { name: "auth", reason })?;
        Ok(())
    }

    /// The HS256 secret, from `auth_secret` or `auth_secret_file`, if any.
    /// The settings as TOML with `auth_secret` and the Redis password
    /// masked (`--check-config`).
    pub fn masked(&self) -> Result<String, String> {
        switchboard_common::config::masked_toml(self, &["auth_secret", "api_access_key"], &["redis"])
    }

    /// The key material the settings name, read and parsed (`auth` builds
    /// its validation from it): an unusable key, or auth on with no key, is
    /// an error.
    pub fn auth_keys(&self) -> Result<AuthKeys, String> {
        let secret = self.auth_secret()?;
        let public = if self.auth_public_key_file.is_empty() {
            None
        } else {
            let file = &self.auth_public_key_file;
            let pem = std::fs::read(file).map_err(|e| format!("auth_public_key_file {file}: {e}"))?;
            let (key, alg) = match DecodingKey::from_rsa_pem(&pem) {
                Ok(k) => (k, Algorithm::RS256),
                Err(_) => DecodingKey::from_ec_pem(&pem)
                    .map(|k| (k, Algorithm::ES256))
                    .map_err(|e| format!("auth_public_key_file {file}: not an RSA or EC public key ({e})"))?,
            };
            Some((key, alg))
        };
        if self.auth != AuthMode::Off && secret.is_none() && public.is_none() {
            return Err(
                "auth is on but no key is set: give auth_secret, auth_secret_file or auth_public_key_file".into()
            );
        }
        Ok(AuthKeys { secret, public })
    }

    pub fn auth_secret(&self) -> Result<Option<Vec<u8>>, String> {
        let secret = if !self.auth_secret_file.is_empty() {
            let text = std::fs::read_to_string(&self.auth_secret_file)
                .map_err(|e| format!("auth_secret_file {}: {e}", self.auth_secret_file))?;
            text.trim_end_matches(['\r', '\n']).as_bytes().to_vec()
        } else {
            self.auth_secret.as_bytes().to_vec()
        };
        if secret.is_empty() {
            return Ok(None);
        }
        if secret.len() < 32 {
            return Err(
                "the auth secret must be at least 32 bytes (HS256 keys shorter than the hash are guessable)".into()
            );
        }
        Ok(Some(secret))
    }

    pub fn duration(&self, v: f64) -> Duration {
        // Validated positive in `validate`.
        Duration::from_secs_f64(v)
    }

    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }

    pub fn advertise_url(&self) -> String {
        self.advertise_url.clone().unwrap_or_else(|| {
            format!("http://{}:{}", gethostname::gethostname().to_string_lossy(), self.listen.port())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_the_shipped_file_and_the_defaults_agree() {
        let text = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/node.toml"));
        let shipped: NodeConfig = toml::from_str(text).unwrap();
        let help = Cli::command().render_help().to_string();
        let problems = switchboard_common::config::defaults_disagree(&NodeConfig::default(), text, &shipped, &help);
        assert!(problems.is_empty(), "{problems:#?}");
    }

    fn parse(args: &[&str]) -> Result<NodeConfig, ConfigError> {
        let mut all = vec!["switchboard-node"];
        all.extend_from_slice(args);
        Cli::parse_from(all).resolve()
    }

    #[test]
    fn a_subcommand_takes_the_settings_before_or_after_its_name() {
        const SECRET: &str = "a-demo-secret-of-at-least-32-bytes";
        let before = Cli::try_parse_from(["n", "--auth-secret", SECRET, "token", "--user", "ana"]).unwrap();
        let after = Cli::try_parse_from(["n", "token", "--user", "ana", "--auth-secret", SECRET]).unwrap();
        for cli in [before, after] {
            assert!(matches!(&cli.command, Some(Command::Token { user, .. }) if user == "ana"));
            assert_eq!(cli.resolve().unwrap().auth_secret, SECRET);
        }
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert_eq!((c.heartbeat_secs, c.ttl_secs), (15.0, 45.0));
        assert_eq!(c.max_message_bytes, 32768);
    }

    #[test]
    fn flags_override_and_are_validated() {
        let c = parse(&["--heartbeat-secs", "0.2", "--ttl-secs", "0.6", "--node-id", "a"]).unwrap();
        assert_eq!(c.duration(c.heartbeat_secs), Duration::from_millis(200));
        assert_eq!(c.node_id(), "a");
        assert!(parse(&["--heartbeat-secs", "5", "--ttl-secs", "5"]).is_err());
        assert!(parse(&["--drain-secs=-1"]).is_err());
        assert!(parse(&["--redis", "ftp://nope"]).is_err());
        assert!(parse(&["--node-id", "a*b"]).is_err());
        assert!(parse(&["--auth", "required"]).is_err(), "auth without a key");
        assert!(parse(&["--auth", "required", "--auth-secret", "short"]).is_err());
        let secret = "0123456789abcdef0123456789abcdef";
        assert!(parse(&["--auth", "required", "--auth-secret", secret]).is_ok());
        assert!(parse(&["--auth-public-key-file", "/nonexistent.pem", "--auth", "optional"]).is_err());
        assert!(parse(&["--auth-dev-sign-in", "true"]).is_err(), "dev sign-in with auth off");
        assert!(parse(&["--allowed-origins", "https://a.example,http://b.example:8080"]).is_ok());
        assert!(parse(&["--allowed-origins", "not an origin"]).is_err());
        assert!(parse(&["--allowed-origins", ""]).unwrap().allowed_origins.is_empty(), "an empty variable lists none");
    }

    #[test]
    fn shipped_config_file_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/node.toml");
        let c = parse(&["--config", path]).unwrap();
        assert_eq!(c.listen.port(), 5000);
    }
}
