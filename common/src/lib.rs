//! What the Switchboard balancer and chat node really share: the shape of the
//! node registry in Redis (records, keys, announcements), the connection-token
//! format that lets the balancer route a SignalR transport request to the node
//! that owns it without per-connection state, and the plumbing that loads a TOML
//! configuration file with clear errors, and where Redis is (one server or a
//! Sentinel service). Nothing else belongs here.

pub mod config;
pub mod metrics;
pub mod redis_state;
pub mod redis_target;
pub mod registry;
pub mod token;
