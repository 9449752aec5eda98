//! The admission policy both public paths share (the Pingora proxy and the
//! WebSocket tunnel): a cap on open client connections (a permit per
//! accepted socket, released on drop; 503 past it), an optional per-IP limit
//! on new SignalR connections per second (governor's GCRA: a burst of the
//! limit, then the limit per second; 429 past it), the `X-Forwarded-*`
//! headers a node receives (the client's own are replaced, never passed on),
//! and the status classes metrics count.
//!
//! The cap is the smaller of `max_connections` and what the open-file limit
//! allows: every client connection may hold a second descriptor to its node
//! (a WebSocket tunnel always does), and `fd_reserve` descriptors stay free
//! for the admin port, health checks, Redis and pooled upstream connections,
//! so the balancer can always accept, answer 503 and report on itself.

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Forget addresses idle this many checks apart (governor's keyed state grows
/// with every address until `retain_recent` runs).
const RETAIN_EVERY: usize = 4096;

pub struct Admission {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    checks: AtomicUsize,
    cap: usize,
    open: Arc<AtomicUsize>,
}

/// One open client connection, counted until dropped.
/// Owned, so that a WebSocket tunnel's own task can hold it after the
/// connection's first task has ended.
pub struct ConnectionPermit(Arc<AtomicUsize>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open-file limit after raising the soft limit to the hard one (as
/// nginx's `worker_rlimit_nofile` or Go's runtime do), or `None` when it
/// cannot be read.
pub fn raise_open_file_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}

/// Client connections the descriptor limit allows, keeping `reserve` free.
pub fn descriptor_cap(limit: u64, reserve: u64) -> usize {
    (limit.saturating_sub(reserve) / 2).max(1).try_into().unwrap_or(usize::MAX)
}

/// The headers the balancer sets on every request to a node; a client's own
/// are removed first, so a node can trust them.
pub const FORWARDED_HEADERS: [&str; 3] = ["X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"];

/// The values of `FORWARDED_HEADERS` for a client at `peer` that sent `host`,
/// over TLS or not.
pub fn forwarded(peer: Option<IpAddr>, host: Option<&str>, tls: bool) -> Vec<(&'static str, String)> {
    let mut h = Vec::with_capacity(3);
    if let Some(ip) = peer {
        h.push((FORWARDED_HEADERS[0], ip.to_canonical().to_string()));
    }
    h.push((FORWARDED_HEADERS[1], if tls { "https" } else { "http" }.to_string()));
    if let Some(host) = host {
        h.push((FORWARDED_HEADERS[2], host.to_string()));
    }
    h
}

/// `forwarded` as header lines (`Name: value\r\n`), for the paths that
/// write heads themselves (the tunnel and the forwarder).
pub fn forwarded_lines(peer: Option<IpAddr>, host: Option<&str>, tls: bool) -> String {
    let mut lines = String::with_capacity(128);
    for (name, value) in forwarded(peer, host, tls) {
        lines.push_str(name);
        lines.push_str(": ");
        lines.push_str(&value);
        lines.push_str("\r\n");
    }
    lines
}

impl Admission {
    pub fn new(per_ip_per_sec: u32, cap: usize) -> Self {
        let per_ip = NonZeroU32::new(per_ip_per_sec).map(|n| RateLimiter::keyed(Quota::per_second(n)));
        Admission { per_ip, checks: AtomicUsize::new(0), cap, open: Arc::new(AtomicUsize::new(0)) }
    }

    /// Counts a newly accepted client connection; `None` when the cap is reached.
    pub fn try_connect(&self) -> Option<ConnectionPermit> {
        let permit = ConnectionPermit(self.open.clone());
        (self.open.fetch_add(1, Ordering::AcqRel) < self.cap).then_some(permit)
    }

    /// Open client connections.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Counts a new connection from `ip`; false when over the per-second limit.
    pub fn allow_new(&self, ip: IpAddr) -> bool {
        let Some(limiter) = &self.per_ip else { return true };
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            limiter.retain_recent();
        }
        limiter.check_key(&ip.to_canonical()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_open_connections_and_permits_release_themselves() {
        let p = Admission::new(0, 2);
        let (a, b) = (p.try_connect(), p.try_connect());
        assert!(a.is_some() && b.is_some());
        assert!(p.try_connect().is_none());
        assert_eq!(p.open(), 2, "a refused attempt holds nothing");
        drop(a);
        assert!(p.try_connect().is_some());
        drop(b);
        assert_eq!(p.open(), 0);
    }

    #[test]
    fn the_descriptor_budget_keeps_a_reserve_and_two_per_connection() {
        assert_eq!(descriptor_cap(1024, 256), 384);
        assert_eq!(descriptor_cap(1_048_576, 256), 524_160);
        assert_eq!(descriptor_cap(100, 256), 1, "never zero");
    }

    #[test]
    fn the_rate_limit_is_per_ip() {
        let p = Admission::new(2, 10);
        let (x, y) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(p.allow_new(x) && p.allow_new(x));
        assert!(!p.allow_new(x));
        assert!(p.allow_new(y));
        // The same address written as IPv4-mapped IPv6 is the same client.
        assert!(!p.allow_new("::ffff:10.0.0.1".parse().unwrap()));
        assert!(Admission::new(0, 1).allow_new(x));
    }

    #[test]
    fn forwarded_headers_name_the_peer_and_the_scheme() {
        let h = forwarded(Some("::ffff:10.1.2.3".parse().unwrap()), Some("chat.example"), false);
        assert_eq!(
            h,
            [
                ("X-Forwarded-For", "10.1.2.3".to_string()),
                ("X-Forwarded-Proto", "http".to_string()),
                ("X-Forwarded-Host", "chat.example".to_string())
            ]
        );
        assert_eq!(forwarded(None, None, true), [("X-Forwarded-Proto", "https".to_string())]);
    }
}
