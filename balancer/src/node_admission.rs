//! How fast each node takes new SignalR connections. When a node dies its
//! clients come back to the others within milliseconds, all negotiating at
//! once; a node that has just joined, being the least loaded, would be sent
//! every one of them. So each node admits new connections at a bounded rate
//! (`node_admission_rate` a second, a token bucket holding one second's
//! worth), and a node that joined or came back within `slow_start_secs`
//! admits at a rate that ramps up from a tenth to all of it over that window.
//! A new connection whose node has no token now goes to another node that
//! has one, or else waits for its node's turn for at most
//! `admission_wait_ms`; past that, or when as many are waiting as the node
//! admits in that time, it gets 503 with `Retry-After`. Requests of
//! connections a node already owns (token routes) never pass through here.
//!
//! The policy (`Bucket`) is a pure function of time and counts; `NodeGate`
//! keeps one node's bucket and how many wait for it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Milliseconds since the process started: the clock of every bucket.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// The slowest a node in slow start admits, as a share of the full rate.
const SLOW_START_FLOOR: f64 = 0.1;

/// The admission settings, as the balancer's configuration gives them.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// New connections a second a node admits; 0 admits all at once.
    pub rate: u32,
    /// How long a ramp-up after a node joins or comes back lasts, in ms.
    pub slow_start_ms: u64,
    /// How long a new connection may wait for its node's turn, in ms.
    pub max_wait_ms: u64,
}

impl Policy {
    /// The rate a node admits at `now_ms`, having (re)joined at `joined_ms`.
    pub fn rate_at(&self, now_ms: u64, joined_ms: Option<u64>) -> f64 {
        let full = f64::from(self.rate);
        match joined_ms {
            Some(joined) if self.slow_start_ms > 0 => {
                let share = now_ms.saturating_sub(joined) as f64 / self.slow_start_ms as f64;
                full * share.clamp(SLOW_START_FLOOR, 1.0)
            }
            _ => full,
        }
    }

    /// How many may wait for one node at a rate of `rate` a second.
    pub fn max_waiting(&self, rate: f64) -> usize {
        (rate * self.max_wait_ms as f64 / 1000.0).ceil().max(1.0) as usize
    }
}

/// One node's token bucket: up to one second of its current rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    updated_ms: u64,
    /// When the node joined or came back, while that is recent.
    joined_ms: Option<u64>,
}

impl Bucket {
    /// A node known from the start: full, no ramp.
    pub fn full(policy: &Policy, now_ms: u64) -> Self {
        Bucket { tokens: f64::from(policy.rate), updated_ms: now_ms, joined_ms: None }
    }

    /// A node that joined or came back at `now_ms`: one token (the next new
    /// client goes to it at once, as the least loaded), then ramping up.
    pub fn joined(now_ms: u64) -> Self {
        Bucket { tokens: 1.0, updated_ms: now_ms, joined_ms: Some(now_ms) }
    }

    fn refill(&mut self, policy: &Policy, now_ms: u64) -> f64 {
        let rate = policy.rate_at(now_ms, self.joined_ms);
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        self.updated_ms = self.updated_ms.max(now_ms);
        if self.joined_ms.is_some_and(|j| now_ms.saturating_sub(j) >= policy.slow_start_ms) {
            self.joined_ms = None;
        }
        rate
    }

    /// Takes a token at `now_ms`: `Ok`, or the ms until one is due.
    pub fn take(&mut self, policy: &Policy, now_ms: u64) -> Result<(), u64> {
        if policy.rate == 0 {
            return Ok(());
        }
        let rate = self.refill(policy, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err((((1.0 - self.tokens) / rate.max(f64::MIN_POSITIVE)) * 1000.0).ceil() as u64)
    }

    /// The rate now, for the dashboard.
    pub fn rate_now(&self, policy: &Policy, now_ms: u64) -> f64 {
        policy.rate_at(now_ms, self.joined_ms)
    }

    pub fn ramping(&self) -> bool {
        self.joined_ms.is_some()
    }
}

/// One node's admission state, shared by every request thread.
pub struct NodeGate {
    bucket: Mutex<Option<Bucket>>,
    /// New connections waiting for this node's turn now.
    pub waiting: AtomicUsize,
}

impl Default for NodeGate {
    fn default() -> Self {
        NodeGate { bucket: Mutex::new(None), waiting: AtomicUsize::new(0) }
    }
}

impl NodeGate {
    fn with<T>(&self, policy: &Policy, now_ms: u64, f: impl FnOnce(&mut Bucket) -> T) -> T {
        let mut guard = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.get_or_insert_with(|| Bucket::full(policy, now_ms)))
    }

    /// Takes a token now, or says how long until one is due.
    pub fn take(&self, policy: &Policy, now_ms: u64) -> Result<(), u64> {
        self.with(policy, now_ms, |b| b.take(policy, now_ms))
    }

    /// The node joined or came back: it ramps up from now.
    pub fn restart_slowly(&self, now_ms: u64) {
        *self.bucket.lock().unwrap_or_else(|p| p.into_inner()) = Some(Bucket::joined(now_ms));
    }

    /// (rate now, ramping up, waiting), for the dashboard and the API.
    pub fn state(&self, policy: &Policy, now_ms: u64) -> (f64, bool, usize) {
        let (rate, ramping) = self.with(policy, now_ms, |b| (b.rate_now(policy, now_ms), b.ramping()));
        (rate, ramping, self.waiting.load(Ordering::Relaxed))
    }

    /// Counts a waiter unless `max` already wait; the guard uncounts it.
    pub fn enqueue(&self, max: usize) -> Option<Waiting<'_>> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let guard = Waiting(self);
        (before < max).then_some(guard)
    }
}

/// A new connection waiting for its node's turn, uncounted when dropped.
pub struct Waiting<'a>(&'a NodeGate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy { rate: 100, slow_start_ms: 10_000, max_wait_ms: 2_000 };

    #[test]
    fn a_known_node_admits_a_seconds_worth_at_once_then_at_its_rate() {
        let mut b = Bucket::full(&POLICY, 0);
        for _ in 0..100 {
            assert_eq!(b.take(&POLICY, 0), Ok(()));
        }
        assert_eq!(b.take(&POLICY, 0), Err(10), "the next token is 10 ms away at 100/s");
        assert_eq!(b.take(&POLICY, 10), Ok(()));
        assert!(b.take(&POLICY, 10).is_err());
        // A quiet second refills it, but never past one second's worth.
        let admitted = (0..300).filter(|_| b.take(&POLICY, 5_000).is_ok()).count();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn a_node_that_just_joined_ramps_up_from_a_tenth_over_the_window() {
        assert_eq!(POLICY.rate_at(0, Some(0)), 10.0);
        assert_eq!(POLICY.rate_at(5_000, Some(0)), 50.0);
        assert_eq!(POLICY.rate_at(20_000, Some(0)), 100.0);
        assert_eq!(POLICY.rate_at(0, None), 100.0);
        let mut b = Bucket::joined(0);
        assert_eq!(b.take(&POLICY, 0), Ok(()), "the first new client goes to it at once");
        assert_eq!(b.take(&POLICY, 0), Err(100), "the next token is 100 ms away at 10/s");
        // In its first second it admits about a tenth of the full rate.
        let first_second = (0..=1000).step_by(10).filter(|t| b.take(&POLICY, *t).is_ok()).count();
        assert!((9..=12).contains(&first_second), "{first_second}");
        // After the window it admits the full rate and is no longer ramping.
        assert!(b.take(&POLICY, 10_000).is_ok());
        assert!(!b.ramping());
    }

    #[test]
    fn off_admits_everything_and_waiters_are_bounded() {
        let off = Policy { rate: 0, ..POLICY };
        let mut b = Bucket::full(&off, 0);
        assert!((0..10_000).all(|_| b.take(&off, 0).is_ok()));
        assert_eq!(POLICY.max_waiting(100.0), 200, "two seconds at 100/s");
        assert_eq!(POLICY.max_waiting(0.5), 1);
        let gate = NodeGate::default();
        let first = gate.enqueue(1);
        assert!(first.is_some());
        assert!(gate.enqueue(1).is_none(), "the queue holds one");
        assert_eq!(gate.waiting.load(Ordering::Relaxed), 1, "a refused waiter is uncounted at once");
        drop(first);
        assert_eq!(gate.waiting.load(Ordering::Relaxed), 0);
    }
}
