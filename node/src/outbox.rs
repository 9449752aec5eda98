//! A connection's queue of outgoing frames. Whatever the transport, the hub
//! pushes serialized records here and exactly one consumer drains them: the
//! WebSocket task, the SSE body stream, or the current long poll. An empty
//! outbox owns no heap memory, which matters at tens of thousands of idle
//! connections, and a frame shared by a broadcast is reference-counted, not
//! copied. When more than `limit` frames or `byte_limit` bytes wait, the
//! client is too slow and the push fails so the caller can disconnect it
//! instead of growing without bound.
//!
//! Each frame carries its stateful-reconnect sequence id (0 when it has none)
//! so the writer can account for what it put on the wire. A stateful
//! connection that resumes on a new transport `reset`s the outbox to the
//! frames it must resend and bumps its generation; a consumer of an older
//! generation then gets `Superseded` instead of frames, so two sockets never
//! drain one outbox.

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

/// One serialized message on its way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutFrame {
    pub bytes: Bytes,
    /// Stateful-reconnect sequence id, 0 for frames that have none.
    pub seq: u64,
}

impl OutFrame {
    pub fn plain(bytes: Bytes) -> Self {
        OutFrame { bytes, seq: 0 }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    Frames(Vec<OutFrame>),
    /// Closed and fully drained: the transport should finish.
    Closed,
    /// A newer transport took the connection over.
    Superseded,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    Closed,
    Full,
}

#[derive(Default)]
struct State {
    frames: VecDeque<OutFrame>,
    bytes: usize,
    closed: bool,
    generation: u64,
}

pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    limit: usize,
    byte_limit: usize,
}

impl Outbox {
    pub fn new(limit: usize, byte_limit: usize) -> Self {
        Outbox { state: Mutex::new(State::default()), notify: Notify::new(), limit, byte_limit }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, frame: OutFrame) -> Result<(), PushError> {
        self.push_inner(frame, true)
    }

    /// Queues a reply the client asked for (a completion, the handshake
    /// answer). It is not refused when the outbox is full: a client that
    /// pipelines invocations gets every answer, and the transports bound it by
    /// reading no more from the client until the outbox has room (`wait_room`).
    pub fn push_reply(&self, frame: OutFrame) -> Result<(), PushError> {
        self.push_inner(frame, false)
    }

    fn push_inner(&self, frame: OutFrame, limited: bool) -> Result<(), PushError> {
        {
            let mut s = self.lock();
            if s.closed {
                return Err(PushError::Closed);
            }
            if limited && (s.frames.len() >= self.limit || s.bytes + frame.bytes.len() > self.byte_limit) {
                return Err(PushError::Full);
            }
            s.bytes += frame.bytes.len();
            s.frames.push_back(frame);
        }
        self.notify.notify_waiters();
        Ok(())
    }

    /// Replaces whatever waits with `frames` for a new transport and returns
    /// the generation that transport consumes. Closed outboxes stay closed.
    pub fn reset(&self, frames: Vec<OutFrame>) -> u64 {
        let generation = {
            let mut s = self.lock();
            s.generation += 1;
            s.bytes = frames.iter().map(|f| f.bytes.len()).sum();
            s.frames = frames.into();
            s.generation
        };
        self.notify.notify_waiters();
        generation
    }

    /// Whether fewer frames than the limit wait, so more client input may be read.
    pub fn has_room(&self) -> bool {
        let s = self.lock();
        s.closed || (s.frames.len() < self.limit && s.bytes < self.byte_limit)
    }

    /// Waits until `has_room` (or the outbox closes).
    pub async fn wait_room(&self) {
        self.wait_for(|| self.has_room().then_some(())).await
    }

    /// Waits until `check` yields: it runs now and after every change
    /// (push, take, close, reset), registered before checking so no change
    /// between the check and the wait is missed.
    async fn wait_for<T>(&self, mut check: impl FnMut() -> Option<T>) -> T {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = check() {
                return v;
            }
            notified.await;
        }
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Pushes a last frame (if any) and closes; later pushes fail.
    pub fn close(&self, last: Option<OutFrame>) {
        {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            if let Some(f) = last {
                s.bytes += f.bytes.len();
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
    pub fn try_take(&self, generation: u64) -> Option<Batch> {
        let mut s = self.lock();
        if s.generation != generation {
            return Some(Batch::Superseded);
        }
        if !s.frames.is_empty() {
            let frames: Vec<OutFrame> = s.frames.drain(..).collect();
            s.frames = VecDeque::new(); // release capacity while idle
            s.bytes = 0;
            drop(s);
            self.notify.notify_waiters(); // room again for `wait_room`
            return Some(Batch::Frames(frames));
        }
        s.closed.then_some(Batch::Closed)
    }

    /// Waits until the outbox is closed or a newer generation took over (a
    /// writer that pauses for acknowledgements still notices a close).
    pub async fn closed_or_superseded(&self, generation: u64) {
        self.wait_for(|| {
            let s = self.lock();
            (s.closed || s.generation != generation).then_some(())
        })
        .await
    }

    /// Waits until frames are queued, the outbox is closed and drained, or a
    /// newer generation took over.
    pub async fn next_batch(&self, generation: u64) -> Batch {
        self.wait_for(|| self.try_take(generation)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(b: &'static [u8]) -> OutFrame {
        OutFrame::plain(Bytes::from_static(b))
    }

    #[tokio::test]
    async fn frames_then_close_then_closed() {
        let o = Outbox::new(10, 1 << 20);
        o.push(f(b"a")).unwrap();
        o.close(Some(f(b"bye")));
        assert_eq!(o.push(f(b"late")), Err(PushError::Closed));
        assert_eq!(o.next_batch(0).await, Batch::Frames(vec![f(b"a"), f(b"bye")]));
        assert_eq!(o.next_batch(0).await, Batch::Closed);
    }

    #[tokio::test]
    async fn a_reset_supersedes_the_old_consumer() {
        let o = std::sync::Arc::new(Outbox::new(10, 1 << 20));
        o.push(f(b"old")).unwrap();
        let o2 = o.clone();
        let g = o.reset(vec![f(b"resend")]);
        assert_eq!(g, 1);
        assert_eq!(o2.next_batch(0).await, Batch::Superseded);
        assert_eq!(o.next_batch(g).await, Batch::Frames(vec![f(b"resend")]));
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken() {
        let o = std::sync::Arc::new(Outbox::new(10, 1 << 20));
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.next_batch(0).await });
        tokio::task::yield_now().await;
        o.push(f(b"x")).unwrap();
        assert_eq!(waiter.await.unwrap(), Batch::Frames(vec![f(b"x")]));
    }

    #[test]
    fn a_full_outbox_refuses() {
        let o = Outbox::new(1, 1 << 20);
        o.push(f(b"")).unwrap();
        assert_eq!(o.push(f(b"")), Err(PushError::Full));
    }

    #[test]
    fn bytes_are_bounded_too() {
        let o = Outbox::new(100, 4);
        o.push(f(b"abc")).unwrap();
        assert_eq!(o.push(f(b"de")), Err(PushError::Full));
        assert!(o.has_room());
        o.push_reply(f(b"de")).unwrap();
        assert!(!o.has_room());
    }

    #[tokio::test]
    async fn replies_go_past_the_limit_and_readers_wait_for_room() {
        let o = std::sync::Arc::new(Outbox::new(1, 1 << 20));
        o.push(f(b"a")).unwrap();
        o.push_reply(f(b"reply")).unwrap();
        assert!(!o.has_room());
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.wait_room().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert_eq!(o.next_batch(0).await, Batch::Frames(vec![f(b"a"), f(b"reply")]));
        waiter.await.unwrap();
    }
}
