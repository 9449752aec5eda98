//! The node's reads of chat history (`Resume`'s check and pages,
//! `GetHistory`'s pages), bounded and shared. At most `MAX_AT_ONCE` run
//! at once; and identical reads in flight at the same time are one read:
//! when a node dies, its clients reconnect to the others within a few
//! milliseconds and resume from the same last id, so a storm of resumes
//! costs Redis one read per distinct question, not one per client. The
//! first asker's read is shared (`futures_util::future::Shared`) with every
//! asker that comes before it is sent to Redis (while it waits for its
//! permit), and forgotten when it ends, so nothing is cached: an answer is
//! never older than the question. That matters: a client resuming has just
//! joined its groups, so where its replay ends must be read after that, or
//! a message stored between an earlier asker's read and the join would be
//! neither replayed nor delivered live. Reads of a closed range of ids give
//! the same answer whenever they run, so those are shared until they end.

use crate::backplane::{Backplane, HistoryError};
use crate::history::{ChatMessage, ResumeError, Scope};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// History reads one node runs at once.
pub const MAX_AT_ONCE: usize = 4;

type Page = Result<Arc<Vec<ChatMessage>>, String>;
type Point = Result<Result<String, ResumeError>, String>;

/// A read in flight and whether it has been sent to Redis.
type Flight<V> = (Shared<BoxFuture<'static, V>>, Arc<AtomicBool>);

/// Reads in flight by their question, shared with whoever asks the same.
struct InFlight<K, V: Clone> {
    reads: Mutex<HashMap<K, Flight<V>>>,
    /// Whether the answer is the same whenever the read runs (a closed
    /// range), so a read already sent may be shared too.
    timeless: bool,
}

impl<K: Hash + Eq + Clone, V: Clone> InFlight<K, V> {
    fn new(timeless: bool) -> Self {
        InFlight { reads: Mutex::new(HashMap::new()), timeless }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Flight<V>>> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer to `key`: the read in flight for it when it may be shared
    /// (not yet sent, or timeless), or else `read` started now (dropped
    /// unpolled when one is shared); and whether it joined one. `sent` is
    /// set by `read` as it goes to Redis.
    async fn ask(&self, key: K, read: BoxFuture<'static, V>, sent: Arc<AtomicBool>) -> (V, bool) {
        let (shared, joined) = {
            let mut reads = self.lock();
            match reads.get(&key) {
                Some((running, s)) if self.timeless || !s.load(Ordering::Acquire) => (running.clone(), true),
                _ => {
                    let started = read.shared();
                    reads.insert(key.clone(), (started.clone(), sent));
                    (started, false)
                }
            }
        };
        let answer = shared.clone().await;
        let mut reads = self.lock();
        if reads.get(&key).is_some_and(|(r, _)| r.ptr_eq(&shared)) {
            reads.remove(&key);
        }
        (answer, joined)
    }
}

pub struct HistoryReads {
    permits: Arc<Semaphore>,
    older: InFlight<(Scope, Option<String>, usize), Page>,
    points: InFlight<(Scope, String), Point>,
    ranges: InFlight<(Scope, String, String, usize), Page>,
    /// Reads answered by another asker's read.
    shared: prometheus::IntCounter,
}

impl HistoryReads {
    pub fn new(shared: prometheus::IntCounter) -> Self {
        HistoryReads {
            permits: Arc::new(Semaphore::new(MAX_AT_ONCE)),
            older: InFlight::new(false),
            points: InFlight::new(false),
            ranges: InFlight::new(true),
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
        let sent = Arc::new(AtomicBool::new(false));
        let going = sent.clone();
        let under_permit = async move {
            let _permit = permits.acquire_owned().await;
            going.store(true, Ordering::Release);
            read.await
        };
        let (answer, joined) = flights.ask(key, under_permit.boxed(), sent).await;
        if joined {
            self.shared.inc();
        }
        answer
    }

    /// Up to `count` messages of `scope` older than `before` (the newest when `None`), newest first.
    pub async fn older(&self, backplane: &Backplane, scope: Option<&str>, before: Option<&str>, count: usize) -> Page {
        let (bp, sc, b) = (backplane.clone(), scope.map(String::from), before.map(String::from));
        let key = (sc.clone(), b.clone(), count);
        let read = async move { bp.older(sc.as_deref(), b.as_deref(), count).await.map(Arc::new).map_err(text) };
        self.read(&self.older, key, read).await
    }

    /// Whether a replay of `scope` after `last` is possible; if so, where it ends.
    pub async fn resume_point(&self, backplane: &Backplane, scope: Option<&str>, last: &str) -> Point {
        let (bp, sc, l) = (backplane.clone(), scope.map(String::from), last.to_string());
        let key = (sc.clone(), l.clone());
        let read = async move { bp.resume_point(sc.as_deref(), &l).await.map_err(text) };
        self.read(&self.points, key, read).await
    }

    /// Up to `count` messages of `scope` after `after` through `through`, oldest first.
    pub async fn range(
        &self,
        backplane: &Backplane,
        scope: Option<&str>,
        after: &str,
        through: &str,
        count: usize,
    ) -> Page {
        let (bp, sc, a, t) = (backplane.clone(), scope.map(String::from), after.to_string(), through.to_string());
        let key = (sc.clone(), a.clone(), t.clone(), count);
        let read = async move { bp.range(sc.as_deref(), &a, &t, count).await.map(Arc::new).map_err(text) };
        self.read(&self.ranges, key, read).await
    }
}

fn text(e: HistoryError) -> String {
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn identical_questions_in_flight_share_one_read_and_later_ones_read_again() {
        let flights: Arc<InFlight<u32, u32>> = Arc::new(InFlight::new(true));
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
                flights.ask(key, read.boxed(), Arc::new(AtomicBool::new(true))).await
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

    /// A question asked after a time-sensitive read went to Redis may have
    /// a newer answer: it is read again. Asked while the first still waits
    /// for its permit, it shares.
    #[tokio::test]
    async fn a_read_already_sent_is_not_shared_unless_its_answer_is_timeless() {
        for timeless in [false, true] {
            let flights: Arc<InFlight<u32, usize>> = Arc::new(InFlight::new(timeless));
            let reads = Arc::new(AtomicUsize::new(0));
            let (release, gate) = tokio::sync::watch::channel(false);
            let ask = |sent: Arc<AtomicBool>| {
                let (flights, reads, mut gate) = (flights.clone(), reads.clone(), gate.clone());
                tokio::spawn(async move {
                    let read = async move {
                        let n = reads.fetch_add(1, Ordering::SeqCst) + 1;
                        let _ = gate.wait_for(|open| *open).await;
                        n
                    };
                    flights.ask(7, read.boxed(), sent).await
                })
            };
            let first_sent = Arc::new(AtomicBool::new(false));
            let waiting = ask(first_sent.clone());
            tokio::task::yield_now().await;
            let joins_waiting = ask(Arc::new(AtomicBool::new(false)));
            tokio::task::yield_now().await;
            // The first read goes to Redis.
            first_sent.store(true, Ordering::Release);
            let after_sent = ask(Arc::new(AtomicBool::new(false)));
            tokio::task::yield_now().await;
            release.send(true).unwrap();
            let (a, b, c) = (waiting.await.unwrap(), joins_waiting.await.unwrap(), after_sent.await.unwrap());
            assert_eq!(b, (a.0, true), "a read still waiting for its permit is shared");
            if timeless {
                assert_eq!(c, (a.0, true), "a timeless read is shared even once sent");
                assert_eq!(reads.load(Ordering::SeqCst), 1);
            } else {
                assert!(!c.1 && c.0 != a.0, "a time-sensitive read already sent is read again: {c:?}");
                assert_eq!(reads.load(Ordering::SeqCst), 2);
            }
        }
    }
}
