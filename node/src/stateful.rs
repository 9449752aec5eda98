//! Stateful reconnect (SignalR 8) for one connection, the server half of the
//! official `MessageBuffer`: messages the node sends that carry meaning
//! (invocations, stream items, completions, cancels) are numbered 1, 2, 3…
//! and kept until the client acknowledges them with `Ack`; messages the
//! client sends are counted the same way, duplicates after a reconnect are
//! dropped, and the node acknowledges what it received about once a second.
//! When the client's WebSocket drops without a close, the connection waits
//! for it within the reconnect window; the new socket starts with `Sequence`
//! (the first id being resent) and every unacknowledged message, and the
//! client likewise. Unacknowledged bytes already written are bounded: above
//! the limit the writer pauses until an Ack, as the official server's
//! backpressure does, and what queues behind it is bounded by the outbox.

use crate::outbox::{OutFrame, Outbox, PushError};
use crate::protocol::HubMessage;
use bytes::Bytes;
use prometheus::IntGauge;
use std::collections::VecDeque;
use std::sync::Mutex;

pub struct Stateful {
    state: Mutex<State>,
    limit: usize,
    /// Node-wide total of unacknowledged bytes, for `/metrics`.
    gauge: IntGauge,
}

#[derive(Default)]
struct State {
    /// Id of the newest numbered message sent.
    last_sent: u64,
    unacked: VecDeque<(u64, Bytes)>,
    unacked_bytes: usize,
    /// Highest id handed to the current transport, and the bytes of the
    /// unacknowledged messages up to it.
    written_upto: u64,
    written_bytes: usize,
    /// Id the next numbered message from the client will have.
    recv_next: u64,
    /// Newest id received from the client, and the newest acknowledged to it.
    recv_latest: u64,
    acked_to_client: u64,
    /// After a reconnect, client messages before its `Sequence` are ignored.
    wait_for_sequence: bool,
    /// When the transport dropped, while the connection waits for a new one.
    disconnected_at_ms: Option<u64>,
}

/// What the hub should do with a message the client sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Receive {
    Process,
    /// A duplicate, an Ack or Sequence (handled here), or a message that came
    /// before the `Sequence` after a reconnect.
    Skip,
}

impl Stateful {
    pub fn new(limit: usize, gauge: IntGauge) -> Self {
        Stateful { state: Mutex::new(State { recv_next: 1, ..State::default() }), limit, gauge }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers `frame`, keeps it until acknowledged, and queues it on `outbox`
    /// in the same step, so a concurrent resume sees it exactly once.
    pub fn push(&self, outbox: &Outbox, frame: Bytes, reply: bool) -> Result<(), PushError> {
        let mut s = self.lock();
        let seq = s.last_sent + 1;
        let out = OutFrame { bytes: frame.clone(), seq };
        if reply {
            outbox.push_reply(out)?;
        } else {
            outbox.push(out)?;
        }
        s.last_sent = seq;
        s.unacked_bytes += frame.len();
        self.gauge.add(frame.len() as i64);
        s.unacked.push_back((seq, frame));
        Ok(())
    }

    /// Whether the writer may put more on the wire now.
    pub fn may_write(&self) -> bool {
        self.lock().written_bytes < self.limit
    }

    /// The writer took frames up to id `upto` for its transport.
    pub fn written(&self, upto: u64) {
        let mut s = self.lock();
        if upto <= s.written_upto {
            return;
        }
        let from = s.written_upto;
        // Ids are ascending: only the tail past `from` is new.
        let added: usize = s
            .unacked
            .iter()
            .rev()
            .take_while(|(id, _)| *id > from)
            .filter(|(id, _)| *id <= upto)
            .map(|(_, f)| f.len())
            .sum();
        s.written_bytes += added;
        s.written_upto = upto;
    }

    /// The client acknowledged everything up to `upto`.
    fn ack(&self, s: &mut State, upto: u64) {
        while s.unacked.front().is_some_and(|(id, _)| *id <= upto) {
            let Some((id, f)) = s.unacked.pop_front() else { break };
            let len = f.len();
            if id <= s.written_upto {
                s.written_bytes -= len;
            }
            s.unacked_bytes -= len;
            self.gauge.sub(len as i64);
        }
    }

    /// Applies the sequence rules to a message from the client.
    pub fn on_receive(&self, m: &HubMessage) -> Result<Receive, String> {
        let mut s = self.lock();
        if s.wait_for_sequence && !matches!(m, HubMessage::Sequence { .. }) {
            return Ok(Receive::Skip);
        }
        match m {
            HubMessage::Sequence { sequence_id } => {
                if *sequence_id > s.recv_next || *sequence_id == 0 {
                    return Err("Sequence ID greater than amount of messages we've received.".into());
                }
                s.wait_for_sequence = false;
                s.recv_next = *sequence_id;
                Ok(Receive::Skip)
            }
            HubMessage::Ack { sequence_id } => {
                self.ack(&mut s, *sequence_id);
                Ok(Receive::Skip)
            }
            m if m.is_sequenced() => {
                let current = s.recv_next;
                s.recv_next += 1;
                if current <= s.recv_latest {
                    return Ok(Receive::Skip);
                }
                s.recv_latest = current;
                Ok(Receive::Process)
            }
            _ => Ok(Receive::Process),
        }
    }

    /// The id to acknowledge to the client, when there is something new and
    /// a transport to carry it.
    pub fn ack_due(&self) -> Option<u64> {
        let mut s = self.lock();
        if s.disconnected_at_ms.is_some() || s.recv_latest <= s.acked_to_client {
            return None;
        }
        s.acked_to_client = s.recv_latest;
        Some(s.recv_latest)
    }

    /// The transport dropped without a close; the connection now waits.
    pub fn disconnected(&self, now_ms: u64) {
        self.lock().disconnected_at_ms.get_or_insert(now_ms);
    }

    pub fn disconnected_since(&self) -> Option<u64> {
        self.lock().disconnected_at_ms
    }

    /// A new transport takes over: the outbox becomes `Sequence` plus every
    /// unacknowledged message (encoded by `sequence`), and client messages are
    /// ignored until the client's own `Sequence`. Returns the outbox
    /// generation for the new transport and how many messages are resent.
    pub fn resume(&self, outbox: &Outbox, sequence: impl Fn(u64) -> Bytes) -> (u64, usize) {
        let mut s = self.lock();
        let first = s.unacked.front().map_or(s.last_sent + 1, |(id, _)| *id);
        let mut frames = Vec::with_capacity(s.unacked.len() + 1);
        frames.push(OutFrame::plain(sequence(first)));
        frames.extend(s.unacked.iter().map(|(id, f)| OutFrame { bytes: f.clone(), seq: *id }));
        let generation = outbox.reset(frames);
        s.written_upto = first - 1;
        s.written_bytes = 0;
        s.wait_for_sequence = true;
        s.disconnected_at_ms = None;
        // Whatever was received may not have been acknowledged on the old socket.
        s.acked_to_client = 0;
        (generation, s.unacked.len())
    }

    #[cfg(test)]
    pub fn buffered_bytes(&self) -> usize {
        self.lock().unacked_bytes
    }
}

impl Drop for Stateful {
    fn drop(&mut self) {
        let bytes = self.lock().unacked_bytes;
        self.gauge.sub(bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Batch;

    fn setup(limit: usize) -> (Stateful, Outbox, IntGauge) {
        let gauge = IntGauge::new("g", "g").unwrap();
        (Stateful::new(limit, gauge.clone()), Outbox::new(100, 1 << 20), gauge)
    }

    fn inv() -> HubMessage {
        HubMessage::event("x", vec![])
    }

    fn seqs(b: Batch) -> Vec<u64> {
        match b {
            Batch::Frames(f) => f.iter().map(|f| f.seq).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn messages_are_numbered_kept_and_released_by_acks() {
        let (st, outbox, gauge) = setup(1000);
        for _ in 0..3 {
            st.push(&outbox, Bytes::from_static(b"abcd"), false).unwrap();
        }
        assert_eq!(seqs(outbox.next_batch(0).await), vec![1, 2, 3]);
        assert_eq!((st.buffered_bytes(), gauge.get()), (12, 12));
        st.on_receive(&HubMessage::Ack { sequence_id: 2 }).unwrap();
        assert_eq!((st.buffered_bytes(), gauge.get()), (4, 4));
        st.on_receive(&HubMessage::Ack { sequence_id: 99 }).unwrap();
        assert_eq!(st.buffered_bytes(), 0);
        drop(st);
        assert_eq!(gauge.get(), 0);
    }

    #[tokio::test]
    async fn resume_resends_from_the_first_unacknowledged() {
        let (st, outbox, _) = setup(1000);
        for _ in 0..4 {
            st.push(&outbox, Bytes::from_static(b"m"), false).unwrap();
        }
        let _ = outbox.next_batch(0).await;
        st.on_receive(&HubMessage::Ack { sequence_id: 1 }).unwrap();
        st.disconnected(5);
        assert_eq!(st.disconnected_since(), Some(5));
        let (generation, resent) = st.resume(&outbox, |id| Bytes::from(format!("seq{id}")));
        assert_eq!(resent, 3);
        assert_eq!(outbox.next_batch(0).await, Batch::Superseded);
        match outbox.next_batch(generation).await {
            Batch::Frames(f) => {
                assert_eq!(f[0].bytes, Bytes::from("seq2"));
                assert_eq!(f.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![0, 2, 3, 4]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(st.disconnected_since(), None);
        // With nothing unacknowledged the Sequence names the next id. (The
        // client's own Sequence comes first: until then everything is ignored.)
        st.on_receive(&HubMessage::Ack { sequence_id: 4 }).unwrap();
        assert_eq!(st.buffered_bytes(), 3, "an Ack before the client's Sequence is ignored");
        st.on_receive(&HubMessage::Sequence { sequence_id: 1 }).unwrap();
        st.on_receive(&HubMessage::Ack { sequence_id: 4 }).unwrap();
        let (g2, resent) = st.resume(&outbox, |id| Bytes::from(format!("seq{id}")));
        assert_eq!(resent, 0);
        assert_eq!(outbox.next_batch(g2).await, Batch::Frames(vec![OutFrame::plain(Bytes::from("seq5"))]));
    }

    #[test]
    fn duplicates_from_the_client_are_skipped() {
        let (st, _, _) = setup(1000);
        assert_eq!(st.on_receive(&inv()), Ok(Receive::Process)); // 1
        assert_eq!(st.on_receive(&inv()), Ok(Receive::Process)); // 2
        assert_eq!(st.on_receive(&HubMessage::Ping), Ok(Receive::Process));
        assert_eq!(st.ack_due(), Some(2));
        assert_eq!(st.ack_due(), None);
        // The client reconnects and resends from 2.
        st.on_receive(&HubMessage::Sequence { sequence_id: 2 }).unwrap();
        assert_eq!(st.on_receive(&inv()), Ok(Receive::Skip)); // 2 again
        assert_eq!(st.on_receive(&inv()), Ok(Receive::Process)); // 3
        assert_eq!(st.ack_due(), Some(3));
    }

    #[test]
    fn after_a_resume_client_messages_wait_for_its_sequence() {
        let (st, outbox, _) = setup(1000);
        st.on_receive(&inv()).unwrap();
        st.resume(&outbox, |_| Bytes::new());
        assert_eq!(st.on_receive(&inv()), Ok(Receive::Skip));
        assert_eq!(st.on_receive(&HubMessage::Sequence { sequence_id: 2 }), Ok(Receive::Skip));
        assert_eq!(st.on_receive(&inv()), Ok(Receive::Process));
    }

    #[test]
    fn a_sequence_beyond_what_was_received_is_an_error() {
        let (st, _, _) = setup(1000);
        st.on_receive(&inv()).unwrap();
        assert!(st.on_receive(&HubMessage::Sequence { sequence_id: 3 }).is_err());
        assert!(st.on_receive(&HubMessage::Sequence { sequence_id: 0 }).is_err());
        assert!(st.on_receive(&HubMessage::Sequence { sequence_id: 2 }).is_ok());
    }

    #[tokio::test]
    async fn the_writer_pauses_above_the_limit_until_an_ack() {
        let (st, outbox, _) = setup(10);
        for _ in 0..3 {
            st.push(&outbox, Bytes::from_static(b"12345"), false).unwrap();
        }
        assert!(st.may_write());
        st.written(2);
        assert!(!st.may_write(), "10 bytes written and unacknowledged");
        st.on_receive(&HubMessage::Ack { sequence_id: 1 }).unwrap();
        assert!(st.may_write());
        st.written(3);
        assert!(!st.may_write());
        st.on_receive(&HubMessage::Ack { sequence_id: 3 }).unwrap();
        assert!(st.may_write());
    }
}
