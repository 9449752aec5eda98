//! What the Switchboard balancer and chat node really share, and nothing else:
//!
//! - `registry`: the shape of the node registry in Redis (records, keys,
//!   announcements);
//! - `token`: the connection-token format that lets the balancer route a
//!   SignalR transport request to the node that owns it without
//!   per-connection state;
//! - `config`: loading a TOML configuration file with clear errors, and the
//!   check that defaults, the shipped files and `--help` agree;
//! - `redis_target`: where Redis is (one server or a Sentinel service);
//! - `redis_state`: whether Redis is reachable, what a failed call means
//!   (`Failure`: retry or not, and what to log);
//! - `metrics`: Prometheus helpers both programs' metrics are made with.

pub mod config;
pub mod metrics;
pub mod redis_state;
pub mod redis_target;
pub mod registry;
pub mod token;
