//! The node's reads of chat history (`Resume`'s check and pages,
//! `GetHistory`'s pages), bounded and shared. At most `MAX_AT_ONCE` run
//! at once; and identical reads in flight at the same time are one read:
//! when a node dies, its clients reconnect to the others within a few
//! milliseconds and resume from the same last id, so a storm of resumes
//! costs Redis one read per distinct question, not one per client. The
//! first asker's read is shared (`futures_util::future::Shared`) with every
//! asker that comes while it runs, and forgotten when it ends, so nothing
//! is cached: an answer is never older than the question.

use crate::backplane::{Backplane, HistoryError};
use crate::history::{ChatMessage, ResumeError};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// History reads one node runs at once.
pub const MAX_AT_ONCE: usize = 4;

type Page = Result<Arc<Vec<ChatMessage>>, String>;
type Point = Result<Result<String, ResumeError>, String>;

/// Reads in flight by their question, shared with whoever asks the same.
struct InFlight<K, V: Clone> {
    reads: Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> InFlight<K, V> {
    fn new() -> Self {
        InFlight { reads: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Shared<BoxFuture<'static, V>>>> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer to `key`: the read in flight for it, or `read` started
    /// now (dropped unpolled when one is in flight); and whether it joined one.
    async fn ask(&self, key: K, read: BoxFuture<'static, V>) -> (V, bool) {
        let (shared, joined) = {
            let mut reads = self.lock();
            match reads.get(&key) {
                Some(running) => (running.clone(), true),
                None => {
                    let started = read.shared();
                    reads.insert(key.clone(), started.clone());
                    (started, false)
                }
            }
        };
        let answer = shared.clone().await;
        let mut reads = self.lock();
        if reads.get(&key).is_some_and(|r| r.ptr_eq(&shared)) {
            reads.remove(&key);
        }
        (answer, joined)
    }
}

pub struct HistoryReads {
    permits: Arc<Semaphore>,
    older: InFlight<(Option<String>, usize), Page>,
    points: InFlight<String, Point>,
    ranges: InFlight<(String, String, usize), Page>,
    /// Reads answered by another asker's read.
    shared: prometheus::IntCounter,
}

impl HistoryReads {
    pub fn new(shared: prometheus::IntCounter) -> Self {
        HistoryReads {
            permits: Arc::new(Semaphore::new(MAX_AT_ONCE)),
            older: InFlight::new(),
            points: InFlight::new(),
            ranges: InFlight::new(),
            shared,
        }
    }

    /// `read`, under a permit, shared with identical reads in flight
    /// (`flights`, keyed by `key`); a shared answer is counted.
    async fn read<K: Hash + Eq + Clone, V: Clone + Send + Sync + 'static>(
        &self,
        flights: &InFlight<K, V>,
        key: K,
        read: impl std::future::Future<Output = V> + Send + 'static,
    ) -> V {
        let permits = self.permits.clone();
        let under_permit = async move {
            let _permit = permits.acquire_owned().await;
            read.await
        };
        let (answer, joined) = flights.ask(key, under_permit.boxed()).await;
        if joined {
            self.shared.inc();
        }
        answer
    }

    /// Up to `count` messages older than `before` (the newest when `None`), newest first.
    pub async fn older(&self, backplane: &Backplane, before: Option<&str>, count: usize) -> Page {
        let (bp, b) = (backplane.clone(), before.map(String::from));
        let read = async move { bp.older(b.as_deref(), count).await.map(Arc::new).map_err(text) };
        self.read(&self.older, (before.map(String::from), count), read).await
    }

    /// Whether a replay after `last` is possible; if so, where it ends.
    pub async fn resume_point(&self, backplane: &Backplane, last: &str) -> Point {
        let (bp, l) = (backplane.clone(), last.to_string());
        let read = async move { bp.resume_point(&l).await.map_err(text) };
        self.read(&self.points, last.to_string(), read).await
    }

    /// Up to `count` messages after `after` through `through`, oldest first.
    pub async fn range(&self, backplane: &Backplane, after: &str, through: &str, count: usize) -> Page {
        let (bp, a, t) = (backplane.clone(), after.to_string(), through.to_string());
        let read = async move { bp.range(&a, &t, count).await.map(Arc::new).map_err(text) };
        self.read(&self.ranges, (after.to_string(), through.to_string(), count), read).await
    }
}

fn text(e: HistoryError) -> String {
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn identical_questions_in_flight_share_one_read_and_later_ones_read_again() {
        let flights: Arc<InFlight<u32, u32>> = Arc::new(InFlight::new());
        let reads = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let ask = |key: u32| {
            let (flights, reads, mut gate) = (flights.clone(), reads.clone(), gate.clone());
            tokio::spawn(async move {
                let read = async move {
                    reads.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.wait_for(|open| *open).await;
                    key * 10
                };
                flights.ask(key, read.boxed()).await
            })
        };
        let askers: Vec<_> = (0..20).map(|i| ask(if i < 15 { 1 } else { 2 })).collect();
        tokio::task::yield_now().await;
        release.send(true).unwrap();
        let mut answers = Vec::new();
        for a in askers {
            answers.push(a.await.unwrap());
        }
        assert!(answers[..15].iter().all(|(v, _)| *v == 10) && answers[15..].iter().all(|(v, _)| *v == 20));
        assert_eq!(answers.iter().filter(|(_, joined)| *joined).count(), 18, "two reads for two questions");
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        assert!(flights.lock().is_empty(), "nothing kept once answered");
        assert_eq!(ask(1).await.unwrap(), (10, false), "a later question reads again");
    }
}
