//! Protection against one client overwhelming the cluster, and the balancer
//! against running out of descriptors: a cap on open client connections
//! (a permit per accepted socket, released on drop; 503 past it) and an
//! optional per-IP limit on new SignalR connections per second (429 past it),
//! counted in one-second windows.
//!
//! The cap is the smaller of `max_connections` and what the open-file limit
//! allows: every client connection may hold a second descriptor to its node
//! (a WebSocket tunnel always does), and `fd_reserve` descriptors stay free
//! for the admin port, health checks, Redis and pooled upstream connections,
//! so the balancer can always accept, answer 503 and report on itself.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

pub struct Protection {
    per_ip_per_sec: u32,
    cap: usize,
    open: AtomicUsize,
    windows: Mutex<(Instant, HashMap<IpAddr, u32>)>,
}

/// One open client connection, counted until dropped.
pub struct ConnectionPermit<'a>(&'a AtomicUsize);

impl Drop for ConnectionPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open-file limit after raising the soft limit to the hard one (as
/// nginx's `worker_rlimit_nofile` or Go's runtime do), or `None` when it
/// cannot be read.
pub fn open_file_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}

/// Client connections the descriptor limit allows, keeping `reserve` free.
pub fn descriptor_cap(limit: u64, reserve: u64) -> usize {
    (limit.saturating_sub(reserve) / 2).max(1).try_into().unwrap_or(usize::MAX)
}

impl Protection {
    pub fn new(per_ip_per_sec: u32, cap: usize) -> Self {
        Protection {
            per_ip_per_sec,
            cap,
            open: AtomicUsize::new(0),
            windows: Mutex::new((Instant::now(), HashMap::new())),
        }
    }

    /// Counts a newly accepted client connection; `None` when the cap is reached.
    pub fn try_connect(&self) -> Option<ConnectionPermit<'_>> {
        let permit = ConnectionPermit(&self.open);
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
        if self.per_ip_per_sec == 0 {
            return true;
        }
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if w.0.elapsed().as_secs() >= 1 {
            *w = (Instant::now(), HashMap::new());
        }
        let n = w.1.entry(ip).or_insert(0);
        *n += 1;
        *n <= self.per_ip_per_sec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_open_connections_and_permits_release_themselves() {
        let p = Protection::new(0, 2);
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
        let p = Protection::new(2, 10);
        let (x, y) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(p.allow_new(x) && p.allow_new(x));
        assert!(!p.allow_new(x));
        assert!(p.allow_new(y));
        assert!(Protection::new(0, 1).allow_new(x));
    }
}
