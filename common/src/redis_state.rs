//! Whether one program can reach Redis, and what it says about it. Both
//! programs keep serving while Redis is away, so the state is only logged
//! and exported: once when it goes down (the first failure after start
//! included) and once when it comes back. Redis refusing the program (a
//! wrong password, a missing ACL permission, a server that does not speak
//! Redis) will not heal by waiting, so it is logged as an error with its
//! reason, once per distinct reason, even while the state does not change.
//! Passing server answers (a script cache emptied by a restart, a dataset
//! still loading, a failover under way) are neither: they count as down
//! until the next success and are logged like an outage. `Failure` is the
//! one place that tells these apart, for the log here and for the callers
//! deciding whether to retry.

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

/// What a failed Redis call means: the one classifier both programs use,
/// for what to log and for whether to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The network: refused, reset, timed out, dropped.
    Network,
    /// A server state that passes by itself: a dataset still loading
    /// (`LOADING`), a script cache a restart emptied (`NOSCRIPT`), a failover
    /// under way (`READONLY` from a demoted master, `MASTERDOWN`, `TRYAGAIN`,
    /// `CLUSTERDOWN`, Sentinel not knowing the master yet), and a cluster's
    /// `MOVED`/`ASK` that redis-rs gave up following (a slot whose master
    /// just died is still pointed at it until a replica takes over).
    Passing,
    /// Redis (or whatever listens there) refuses this program:
    /// authentication, permissions, or not speaking Redis. Waiting will not
    /// help; the settings must change.
    Refusal,
    /// Anything else (a command the server rejects): not retried.
    Other,
}

impl Failure {
    pub fn of(e: &RedisError) -> Self {
        use redis::{ErrorKind, ServerErrorKind};
        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
            return Failure::Network;
        }
        let refused = matches!(
            e.kind(),
            ErrorKind::AuthenticationFailed
                | ErrorKind::InvalidClientConfig
                | ErrorKind::Parse
                | ErrorKind::RESP3NotSupported
                | ErrorKind::Server(ServerErrorKind::NoPerm)
        ) || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"));
        if refused {
            return Failure::Refusal;
        }
        let passing = matches!(
            e.code(),
            Some("LOADING" | "NOSCRIPT" | "READONLY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "MOVED" | "ASK")
        ) || matches!(e.kind(), ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::EmptySentinelList);
        if passing {
            Failure::Passing
        } else {
            Failure::Other
        }
    }

    /// Whether the same call may succeed later.
    pub fn retryable(self) -> bool {
        matches!(self, Failure::Network | Failure::Passing)
    }
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
        match err.map(|e| (e, Failure::of(e))) {
            Some((e, failure @ (Failure::Refusal | Failure::Other))) => {
                let reason = e.to_string();
                if last.as_deref() != Some(reason.as_str()) {
                    if failure == Failure::Refusal {
                        tracing::error!(reason = %reason, "redis refuses this program (check the URL's password, user and permissions); {}", self.meanwhile);
                    } else {
                        tracing::warn!(reason = %reason, "redis answered an error; {}", self.meanwhile);
                    }
                    *last = Some(reason);
                }
            }
            Some((e, Failure::Passing)) if was != DOWN => {
                tracing::warn!(reason = %e, "redis is not ready yet (loading, restarted or failing over); {}", self.meanwhile)
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
    fn each_failure_lands_where_the_doc_says() {
        use redis::{ErrorKind, ServerErrorKind};
        let server = |kind| RedisError::from((ErrorKind::Server(kind), "from the server"));
        let io = |kind| RedisError::from(std::io::Error::from(kind));
        assert_eq!(Failure::of(&io(std::io::ErrorKind::ConnectionRefused)), Failure::Network);
        assert_eq!(Failure::of(&io(std::io::ErrorKind::TimedOut)), Failure::Network);
        for kind in [
            ServerErrorKind::NoScript,
            ServerErrorKind::BusyLoading,
            ServerErrorKind::ReadOnly,
            ServerErrorKind::MasterDown,
            ServerErrorKind::TryAgain,
            ServerErrorKind::ClusterDown,
            ServerErrorKind::Moved,
            ServerErrorKind::Ask,
        ] {
            assert_eq!(Failure::of(&server(kind)), Failure::Passing, "{kind:?}");
        }
        let sentinel = RedisError::from((ErrorKind::MasterNameNotFoundBySentinel, "no master yet"));
        assert_eq!(Failure::of(&sentinel), Failure::Passing);
        let wrong_password =
            RedisError::from((ErrorKind::AuthenticationFailed, "WRONGPASS invalid username-password pair"));
        assert_eq!(Failure::of(&wrong_password), Failure::Refusal);
        assert_eq!(Failure::of(&server(ServerErrorKind::NoPerm)), Failure::Refusal);
        assert_eq!(Failure::of(&server(ServerErrorKind::ResponseError)), Failure::Other);
        assert!(Failure::Network.retryable() && Failure::Passing.retryable());
        assert!(!Failure::Refusal.retryable() && !Failure::Other.retryable());
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
