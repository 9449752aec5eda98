//! Protection against one client overwhelming the cluster: a cap on
//! concurrent client requests (open WebSockets included; 503 past it) and an
//! optional per-IP limit on new SignalR connections per second (429 past it),
//! counted in one-second windows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

pub struct Protection {
    per_ip_per_sec: u32,
    max_connections: usize,
    open: AtomicUsize,
    windows: Mutex<(Instant, HashMap<IpAddr, u32>)>,
}

impl Protection {
    pub fn new(per_ip_per_sec: u32, max_connections: usize) -> Self {
        Protection {
            per_ip_per_sec,
            max_connections,
            open: AtomicUsize::new(0),
            windows: Mutex::new((Instant::now(), HashMap::new())),
        }
    }

    /// Takes a concurrency slot; false when the cap is reached. Either way
    /// the caller must `leave` once (the proxy does it when its context drops).
    pub fn try_enter(&self) -> bool {
        self.open.fetch_add(1, Ordering::AcqRel) < self.max_connections
    }

    pub fn leave(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
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
    fn the_cap_counts_open_slots() {
        let p = Protection::new(0, 2);
        assert!(p.try_enter() && p.try_enter());
        assert!(!p.try_enter());
        p.leave();
        p.leave();
        assert!(p.try_enter());
        assert_eq!(p.open(), 2);
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
