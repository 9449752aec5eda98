//! A connection's queue of outgoing frames. Whatever the transport, the hub
//! pushes serialized records here and exactly one consumer drains them: the
//! WebSocket task, the SSE body stream, or the current long poll. An empty
//! outbox owns no heap memory, which matters at tens of thousands of idle
//! connections, and a frame shared by a broadcast is reference-counted, not
//! copied. When more than `limit` frames wait, the client is too slow and the
//! push fails so the caller can disconnect it instead of growing without bound.

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    Frames(Vec<Bytes>),
    /// Closed and fully drained: the transport should finish.
    Closed,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    Closed,
    Full,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Bytes>,
    closed: bool,
}

pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    limit: usize,
}

impl Outbox {
    pub fn new(limit: usize) -> Self {
        Outbox { state: Mutex::new(State::default()), notify: Notify::new(), limit }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        {
            let mut s = self.lock();
            if s.closed {
                return Err(PushError::Closed);
            }
            if s.frames.len() >= self.limit {
                return Err(PushError::Full);
            }
            s.frames.push_back(frame);
        }
        self.notify.notify_waiters();
        Ok(())
    }

    /// Pushes a last frame (if any) and closes; later pushes fail.
    pub fn close(&self, last: Option<Bytes>) {
        {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            if let Some(f) = last {
                s.frames.push_back(f);
            }
            s.closed = true;
        }
        self.notify.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Takes everything queued now without waiting; `None` when nothing is.
    pub fn try_take(&self) -> Option<Batch> {
        let mut s = self.lock();
        if !s.frames.is_empty() {
            let frames: Vec<Bytes> = s.frames.drain(..).collect();
            s.frames = VecDeque::new(); // release capacity while idle
            return Some(Batch::Frames(frames));
        }
        s.closed.then_some(Batch::Closed)
    }

    /// Waits until frames are queued or the outbox is closed and drained.
    pub async fn next_batch(&self) -> Batch {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a push between check and await wakes us.
            notified.as_mut().enable();
            if let Some(b) = self.try_take() {
                return b;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_then_close_then_closed() {
        let o = Outbox::new(10);
        o.push(Bytes::from_static(b"a")).unwrap();
        o.close(Some(Bytes::from_static(b"bye")));
        assert_eq!(o.push(Bytes::from_static(b"late")), Err(PushError::Closed));
        assert_eq!(o.next_batch().await, Batch::Frames(vec![Bytes::from_static(b"a"), Bytes::from_static(b"bye")]));
        assert_eq!(o.next_batch().await, Batch::Closed);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken() {
        let o = std::sync::Arc::new(Outbox::new(10));
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.next_batch().await });
        tokio::task::yield_now().await;
        o.push(Bytes::from_static(b"x")).unwrap();
        assert_eq!(waiter.await.unwrap(), Batch::Frames(vec![Bytes::from_static(b"x")]));
    }

    #[test]
    fn a_full_outbox_refuses() {
        let o = Outbox::new(1);
        o.push(Bytes::new()).unwrap();
        assert_eq!(o.push(Bytes::new()), Err(PushError::Full));
    }
}
