//! Whether one program can reach Redis, and what it says about it. Both
//! programs keep serving while Redis is away, so the state is only logged
//! and exported: once when it goes down (the first failure after start
//! included) and once when it comes back. Redis refusing the program (a
//! wrong password, a missing ACL permission, a server that does not speak
//! Redis) will not heal by waiting, so it is logged as an error with its
//! reason, once per distinct reason, even while the state does not change.
//! Passing server answers (a script cache emptied by a restart, a dataset
//! still loading) are neither: they count as down until the next success.

use redis::RedisError;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

pub struct RedisState {
    state: AtomicU8,
    /// The last non-network reason logged, so that it is logged once.
    last_reason: Mutex<Option<String>>,
    /// What the program does while Redis is down, for the log line.
    meanwhile: &'static str,
}

/// A failure of the network (refused, reset, timed out) rather than of
/// Redis refusing this program.
pub fn is_network_failure(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// Redis (or whatever listens there) refuses this program: authentication,
/// permissions, or a connection that fails for a reason other than the
/// network. Waiting will not help; the settings must change.
pub fn is_refusal(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed
            | ErrorKind::InvalidClientConfig
            | ErrorKind::Parse
            | ErrorKind::RESP3NotSupported
            | ErrorKind::Server(ServerErrorKind::NoPerm)
    ) || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
}

impl RedisState {
    pub fn new(meanwhile: &'static str) -> Self {
        RedisState { state: AtomicU8::new(UNKNOWN), last_reason: Mutex::new(None), meanwhile }
    }

    /// Records an outcome and logs what changed; returns whether Redis is up.
    pub fn record(&self, up: bool, err: Option<&RedisError>) -> bool {
        let was = self.state.swap(if up { UP } else { DOWN }, Ordering::AcqRel);
        let mut last = self.last_reason.lock().unwrap_or_else(|p| p.into_inner());
        if up {
            *last = None;
            if was != UP {
                tracing::info!("redis is reachable");
            }
            return true;
        }
        match err {
            Some(e) if !is_network_failure(e) => {
                let reason = e.to_string();
                if last.as_deref() != Some(reason.as_str()) {
                    tracing::error!(reason = %reason, "redis refuses this program (check the URL's password, user and permissions); {}", self.meanwhile);
                    *last = Some(reason);
                }
            }
            _ if was != DOWN => {
                tracing::warn!(error = ?err.map(ToString::to_string), "redis is unreachable; {}", self.meanwhile)
            }
            _ => {}
        }
        false
    }

    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Acquire) == UP
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_failures_are_told_from_refusals() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_network_failure(&refused));
        let timeout = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(is_network_failure(&timeout));
        let auth =
            RedisError::from((redis::ErrorKind::AuthenticationFailed, "WRONGPASS invalid username-password pair"));
        assert!(!is_network_failure(&auth));
    }

    #[test]
    fn the_state_follows_the_outcomes() {
        let s = RedisState::new("testing");
        assert!(!s.is_up());
        let auth = RedisError::from((redis::ErrorKind::AuthenticationFailed, "WRONGPASS"));
        assert!(!s.record(false, Some(&auth)));
        assert!(!s.record(false, Some(&auth)));
        assert!(s.record(true, None));
        assert!(s.is_up());
        assert!(!s.record(false, None));
        assert!(!s.is_up());
    }
}
