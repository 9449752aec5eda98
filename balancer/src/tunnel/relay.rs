//! A tunnel's relay once the node said 101: bytes both ways until either
//! side closes or nothing has moved for the idle limit.
//!
//! The relay runs one loop per direction, each owning its buffer from the
//! read until the write has finished: a byte read is always written before
//! that loop looks at anything else, and only the wait for readiness (which
//! holds no data) is ever raced against the end of the tunnel. When one
//! direction ends, the other finishes what it is writing and stops; only the
//! idle watchdog's expiry (nothing moved, or a write stuck, for the idle
//! limit) abandons a write. A buffer is allocated only while data moves, and
//! the watchdog's is the tunnel's one timer, so an idle tunnel holds two
//! sockets and one small task (about 2.3 KB in all at 9,500 tunnels, measured
//! before the two frame positions added their 64 bytes). Over
//! TLS the client side is read through rustls, which has no readiness to wait
//! on: that direction keeps one small buffer (and rustls its own state) for
//! the tunnel's life.
//!
//! When the balancer itself ends a tunnel (the node went away, or the idle
//! limit passed) the client gets a Close frame (1001) first, and on expiry
//! the node too, if the direction is between frames (`frames`); a tunnel
//! that a side closed is closed as that side did.

use super::frames::{self, Cursors, FrameCursor};
use pingora::protocols::l4::stream::Stream as L4Stream;
use std::future::{poll_fn, Future};
use std::io::ErrorKind;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

pub(super) const RELAY_CHUNK: usize = 16 * 1024;
/// The decrypted read buffer of a TLS tunnel, held for its whole life.
const TLS_READ_CHUNK: usize = 4 * 1024;

/// Writes all of `data`, trying first and waiting for writability only when
/// the socket is full. The wait is `poll_write_ready`, which keeps no waiter
/// in the future: a tunnel's futures stay small while it lives.
pub(super) async fn write_all(to: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => poll_fn(|cx| to.poll_write_ready(cx)).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The client side of a tunnel while it is set up: plain TCP or TLS.
pub trait Downstream: Send {
    /// Writes all of `data` to the client.
    fn send(&mut self, data: &[u8]) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl Downstream for TcpStream {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        write_all(self, data).await
    }
}

/// A socket both directions of a plain tunnel share.
impl Downstream for &TcpStream {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        write_all(self, data).await
    }
}

impl Downstream for TlsStream<Box<L4Stream>> {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write_all(data).await?;
        self.flush().await
    }
}

/// The writing half of a TLS tunnel's client side.
impl Downstream for WriteHalf<TlsStream<Box<L4Stream>>> {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write_all(data).await?;
        self.flush().await
    }
}

/// The shared state of one tunnel's relay: both directions and the idle
/// watchdog run in one task (`tokio::join!`, which polls every unfinished
/// branch each time the task wakes), so ending needs no list of waiters:
/// whoever ends the tunnel sets `state` and wakes the task, and the others
/// see it when they are polled next.
///
/// Two ways to end: `ENDED` (a side closed or failed) stops reads that are
/// waiting, but a write in progress still finishes; `EXPIRED` (the watchdog
/// found the tunnel idle, or a write stuck) stops writes too. So no write
/// carries a timer of its own, and an idle tunnel holds one timer in all.
struct Relay {
    state: std::sync::atomic::AtomicU8,
    epoch: Instant,
    idle: Duration,
    /// When a byte last moved either way (ms since `epoch`).
    last: std::sync::atomic::AtomicU64,
    /// Per direction: when its write in progress began (ms since `epoch`, plus
    /// one), or 0 when it is not writing.
    writing: [std::sync::atomic::AtomicU64; 2],
    /// The node's side went away (read or write failed on it): the client
    /// is owed a Close.
    node_gone: std::sync::atomic::AtomicBool,
}

/// Whether the side that failed is the node's, when direction `dir` (0:
/// client → node, 1: node → client) fails to read (its source) or to write
/// (its destination).
fn is_node_side(dir: usize, reading: bool) -> bool {
    (dir == 1) == reading
}

const RUNNING: u8 = 0;
const ENDED: u8 = 1;
const EXPIRED: u8 = 2;

impl Relay {
    fn new(idle: Duration) -> Self {
        Relay {
            state: RUNNING.into(),
            epoch: Instant::now(),
            idle,
            last: 0.into(),
            writing: [0.into(), 0.into()],
            node_gone: false.into(),
        }
    }

    /// Ends the tunnel because a side went away (`node`: the node's).
    async fn side_ended(&self, node: bool) {
        if node {
            self.node_gone.store(true, std::sync::atomic::Ordering::Release);
        }
        self.end(ENDED).await
    }

    /// The Close the balancer owes each side as the tunnel ends, if any: the
    /// client's when the node went away or the tunnel expired, the node's
    /// when it expired; only on a direction between frames (`cursors`: 0 the
    /// client's bytes to the node, 1 the node's to the client).
    fn closes_owed(&self, cursors: &Cursors) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let expired = self.expired();
        let node_gone = self.node_gone.load(std::sync::atomic::Ordering::Acquire);
        let reason = if expired { "idle timeout" } else { "node went away" };
        let to_client = ((expired || node_gone) && cursors[1].may_close())
            .then(|| frames::close_frame(frames::GOING_AWAY, reason, None));
        let to_node = (expired && cursors[0].may_close())
            .then(|| frames::close_frame(frames::GOING_AWAY, reason, Some(frames::mask_key())));
        (to_client, to_node)
    }

    fn ended(&self) -> bool {
        self.state.load(std::sync::atomic::Ordering::Acquire) != RUNNING
    }

    fn expired(&self) -> bool {
        self.state.load(std::sync::atomic::Ordering::Acquire) == EXPIRED
    }

    /// Ends the tunnel (`ENDED` or `EXPIRED`; expiry is never undone). Only
    /// to be awaited inside the tunnel's task.
    async fn end(&self, how: u8) {
        self.state.fetch_max(how, std::sync::atomic::Ordering::AcqRel);
        poll_fn(|cx| {
            cx.waker().wake_by_ref();
            Poll::Ready(())
        })
        .await
    }

    /// Milliseconds since the relay began.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn moved(&self) {
        self.last.store(self.now(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `write` for direction `dir`, marked as in progress for the
    /// watchdog; `false` when it failed or the tunnel expired first (bytes
    /// not yet written are then dropped with the tunnel).
    async fn write<F: Future<Output = std::io::Result<()>>>(&self, dir: usize, write: F) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let began = self.now();
        self.last.store(began, Relaxed);
        self.writing[dir].store(began + 1, Relaxed);
        let mut write = std::pin::pin!(write);
        let done = poll_fn(|cx| match self.expired() {
            true => Poll::Ready(false),
            false => write.as_mut().poll(cx).map(|r| r.is_ok()),
        })
        .await;
        self.writing[dir].store(0, Relaxed);
        self.moved();
        done
    }

    /// Milliseconds (since `epoch`) at which the tunnel expires unless
    /// something moves: `idle` after the last byte moved, or after the
    /// oldest write in progress began.
    fn expiry(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let idle = self.idle.as_millis() as u64;
        let oldest = self.writing.iter().map(|w| w.load(Relaxed)).filter(|&w| w > 0).map(|w| w - 1).min();
        let since = oldest.map_or(self.last.load(Relaxed), |w| w.min(self.last.load(Relaxed)));
        since.saturating_add(idle)
    }
}

/// Copies `from` → `to` (direction `dir`) until either side closes or the
/// tunnel ends. Never abandons bytes it has read: the write is raced only
/// against expiry (a write that makes no progress for `idle` ends the tunnel).
///
/// While data flows it reads again straight after each write and keeps its
/// buffer; only when a read finds nothing does it free the buffer and park
/// on readiness (the one wait raced against the end of the tunnel). A busy
/// direction so costs no wake-up per message, and an idle one holds nothing.
async fn one_way<W: Downstream>(
    from: &TcpStream,
    to: &mut W,
    relay: &Relay,
    dir: usize,
    cursor: &mut FrameCursor,
) -> u64 {
    let mut buf: Vec<u8> = Vec::new();
    let mut moved = 0u64;
    let gone = loop {
        if relay.ended() {
            return moved;
        }
        if buf.capacity() == 0 {
            buf.reserve_exact(RELAY_CHUNK);
        }
        buf.clear();
        match from.try_read_buf(&mut buf) {
            Ok(0) => break is_node_side(dir, true),
            Ok(_) => {
                if !relay.write(dir, to.send(&buf)).await {
                    cursor.lose_position();
                    break is_node_side(dir, false);
                }
                cursor.feed(&buf);
                moved += buf.len() as u64;
                // Yields to the thread's other tasks once tokio's cooperative
                // budget is spent, so a direction that never runs dry cannot
                // starve them.
                tokio::task::coop::consume_budget().await;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                buf = Vec::new();
                let ready = poll_fn(|cx| match relay.ended() {
                    true => Poll::Ready(None),
                    false => from.poll_read_ready(cx).map(Some),
                })
                .await;
                match ready {
                    None => return moved,
                    Some(Ok(())) => {}
                    Some(Err(_)) => break is_node_side(dir, true),
                }
            }
            Err(_) => break is_node_side(dir, true),
        }
    };
    relay.side_ended(gone).await;
    moved
}

/// Expires the tunnel once nothing has moved either way for `idle`, or a
/// write has been in progress that long.
async fn watchdog(relay: &Relay) {
    loop {
        let deadline = relay.epoch + Duration::from_millis(relay.expiry());
        let sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(sleep);
        let ended = poll_fn(|cx| match relay.ended() {
            true => Poll::Ready(true),
            false => sleep.as_mut().poll(cx).map(|()| false),
        })
        .await;
        if ended {
            return;
        }
        // Writes that began after the sleep was set only move the expiry
        // later (each began with a byte moving), so looking again now is
        // never too late.
        if relay.now() >= relay.expiry() {
            tracing::debug!("closing idle or stuck websocket tunnel");
            relay.end(EXPIRED).await;
            return;
        }
    }
}

/// Relays a plain tunnel; `cursors` have followed what went each way
/// before it (the request's and the 101's trailing bytes).
pub(super) async fn relay(client: TcpStream, upstream: TcpStream, idle: Duration, cursors: Cursors) -> (u64, u64) {
    let relay = Relay::new(idle);
    let (mut to_client, mut to_upstream) = (&client, &upstream);
    let [mut up_cursor, mut down_cursor] = cursors;
    let (up, down, ()) = tokio::join!(
        one_way(&client, &mut to_upstream, &relay, 0, &mut up_cursor),
        one_way(&upstream, &mut to_client, &relay, 1, &mut down_cursor),
        watchdog(&relay)
    );
    // One non-blocking attempt each: a Close is a few bytes, and a side that
    // cannot take them now is not reading anyway.
    let (to_client, to_node) = relay.closes_owed(&[up_cursor, down_cursor]);
    if let Some(close) = to_client {
        let _ = client.try_write(&close);
    }
    if let Some(close) = to_node {
        let _ = upstream.try_write(&close);
    }
    (up, down)
}

/// Decrypted client bytes → node. The read buffer lives as long as the
/// tunnel (a TLS stream has no readiness to wait on without reading); the
/// read is the only thing raced against the end of the tunnel, and a read
/// that was cancelled has taken nothing.
async fn client_to_node<R: AsyncRead + Unpin>(
    mut from: R,
    to: &TcpStream,
    relay: &Relay,
    cursor: &mut FrameCursor,
) -> u64 {
    let mut buf = vec![0u8; TLS_READ_CHUNK];
    let mut moved = 0u64;
    let gone = loop {
        let mut read = ReadBuf::new(&mut buf);
        let ended = poll_fn(|cx| match relay.ended() {
            true => Poll::Ready(None),
            false => Pin::new(&mut from).poll_read(cx, &mut read).map(Some),
        })
        .await;
        let n = match ended {
            None => return moved,
            Some(Ok(())) if !read.filled().is_empty() => read.filled().len(),
            Some(_) => break false,
        };
        if !relay.write(0, write_all(to, &buf[..n])).await {
            cursor.lose_position();
            break true;
        }
        cursor.feed(&buf[..n]);
        moved += n as u64;
    };
    relay.side_ended(gone).await;
    moved
}

/// `relay` for a TLS client side.
pub(super) async fn relay_tls(
    client: TlsStream<Box<L4Stream>>,
    upstream: TcpStream,
    idle: Duration,
    cursors: Cursors,
) -> (u64, u64) {
    let relay = Relay::new(idle);
    let (reader, mut writer) = tokio::io::split(client);
    let [mut up_cursor, mut down_cursor] = cursors;
    let (up, down, ()) = tokio::join!(
        client_to_node(reader, &upstream, &relay, &mut up_cursor),
        one_way(&upstream, &mut writer, &relay, 1, &mut down_cursor),
        watchdog(&relay)
    );
    let (to_client, to_node) = relay.closes_owed(&[up_cursor, down_cursor]);
    if let Some(close) = to_client {
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.send(&close)).await;
    }
    if let Some(close) = to_node {
        let _ = upstream.try_write(&close);
    }
    // A TLS close_notify, so the client reads a clean end of stream.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
    (up, down)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Two connected sockets: (the far end, the relay's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (far, near) = tokio::join!(TcpStream::connect(listener.local_addr().unwrap()), listener.accept());
        (far.unwrap(), near.unwrap().0)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add((i >> 12) as u8)).collect()
    }

    /// Reads exactly `len` bytes, pausing after every 256 KiB when `slow`.
    async fn read_len(from: &mut tokio::net::tcp::OwnedReadHalf, len: usize, slow: bool) -> Vec<u8> {
        let mut got = Vec::with_capacity(len);
        let mut chunk = vec![0u8; 16 * 1024];
        let mut since_pause = 0;
        while got.len() < len {
            let n = from.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the stream ended after {} of {len} bytes", got.len());
            got.extend_from_slice(&chunk[..n]);
            since_pause += n;
            if slow && since_pause >= 256 * 1024 {
                since_pause = 0;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        got
    }

    #[tokio::test]
    async fn both_directions_arrive_whole_while_the_node_reads_slowly() {
        let (client, client_end) = pair().await;
        let (node, node_end) = pair().await;
        let relaying = tokio::spawn(relay(client_end, node_end, Duration::from_secs(30), Default::default()));
        let (up, down) = (pattern(4 << 20, 1), pattern(1 << 20, 7));
        let ((mut client_r, mut client_w), (mut node_r, mut node_w)) = (client.into_split(), node.into_split());
        let (up_len, down_len) = (up.len(), down.len());
        let sending_up = tokio::spawn(async move { client_w.write_all(&up).await.map(|()| client_w) });
        let sending_down = tokio::spawn(async move { node_w.write_all(&down).await.map(|()| node_w) });
        let (at_node, at_client) =
            tokio::join!(read_len(&mut node_r, up_len, true), read_len(&mut client_r, down_len, false));
        assert!(at_node == pattern(4 << 20, 1), "the node got the client's bytes in order, none lost or repeated");
        assert!(at_client == pattern(1 << 20, 7), "the client got the node's bytes in order");
        let (_client_w, _node_w) = (sending_up.await.unwrap().unwrap(), sending_down.await.unwrap().unwrap());
        drop((client_r, _client_w));
        let moved = tokio::time::timeout(Duration::from_secs(10), relaying).await.expect("the relay ends").unwrap();
        assert_eq!(moved, (up_len as u64, down_len as u64));
    }

    /// Everything `from` sends until it closes (within 10 s).
    async fn read_to_end(from: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), from.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "the stream ended");
        got
    }

    /// A text frame as a node sends it.
    fn text(payload: &str) -> Vec<u8> {
        let mut f = vec![0x81, payload.len() as u8];
        f.extend_from_slice(payload.as_bytes());
        f
    }

    #[tokio::test]
    async fn an_idle_tunnel_is_closed_on_both_sides_with_a_close_frame() {
        let (mut client, client_end) = pair().await;
        let (mut node, node_end) = pair().await;
        let relaying = tokio::spawn(relay(client_end, node_end, Duration::from_millis(200), Default::default()));
        let moved = tokio::time::timeout(Duration::from_secs(10), relaying).await.expect("idle expiry").unwrap();
        assert_eq!(moved, (0, 0));
        let to_client = read_to_end(&mut client).await;
        assert_eq!(to_client, frames::close_frame(1001, "idle timeout", None), "the client gets 1001, unmasked");
        let to_node = read_to_end(&mut node).await;
        assert_eq!(&to_node[..2], &[0x88, 0x80 | 14], "the node gets a masked Close");
        let key = [to_node[2], to_node[3], to_node[4], to_node[5]];
        assert_eq!(to_node, frames::close_frame(1001, "idle timeout", Some(key)));
    }

    #[tokio::test]
    async fn a_node_that_goes_away_between_frames_leaves_its_client_a_close_after_every_frame() {
        let (mut client, client_end) = pair().await;
        let (mut node, node_end) = pair().await;
        // The 101's trailing bytes held a whole frame: the relay starts between frames.
        let mut cursors: Cursors = Default::default();
        cursors[1].feed(&text("{}\u{1e}"));
        let relaying = tokio::spawn(relay(client_end, node_end, Duration::from_secs(30), cursors));
        let frames_sent = [text("{\"type\":6}\u{1e}"), text("{\"type\":1,\"target\":\"x\"}\u{1e}")].concat();
        node.write_all(&frames_sent).await.unwrap();
        drop(node); // kill -9: FIN with no Close
        let got = read_to_end(&mut client).await;
        assert_eq!(got, [frames_sent, frames::close_frame(1001, "node went away", None)].concat());
        tokio::time::timeout(Duration::from_secs(10), relaying).await.expect("the relay ends").unwrap();
    }

    /// What the client reads when the node sends `bytes` and goes away.
    async fn client_reads_after_the_node_sends(bytes: &[u8]) -> Vec<u8> {
        let (mut client, client_end) = pair().await;
        let (mut node, node_end) = pair().await;
        let relaying = tokio::spawn(relay(client_end, node_end, Duration::from_secs(30), Default::default()));
        node.write_all(bytes).await.unwrap();
        drop(node);
        let got = read_to_end(&mut client).await;
        tokio::time::timeout(Duration::from_secs(10), relaying).await.expect("the relay ends").unwrap();
        got
    }

    #[tokio::test]
    async fn a_node_that_goes_away_inside_a_frame_or_after_its_own_close_gets_no_close_of_ours() {
        let partial = [&[0x81u8, 100][..], &[b'a'; 10]].concat(); // 100 bytes announced, 10 sent
        assert_eq!(client_reads_after_the_node_sends(&partial).await, partial, "a Close would read as payload");
        let close = frames::close_frame(1000, "", None);
        assert_eq!(client_reads_after_the_node_sends(&close).await, close, "one Close, the node's");
    }

    #[tokio::test]
    async fn a_client_that_goes_away_is_passed_on_as_it_did() {
        let (client, client_end) = pair().await;
        let (mut node, node_end) = pair().await;
        let relaying = tokio::spawn(relay(client_end, node_end, Duration::from_secs(30), Default::default()));
        drop(client);
        assert_eq!(read_to_end(&mut node).await, Vec::<u8>::new(), "the node sees the client's end, no Close of ours");
        tokio::time::timeout(Duration::from_secs(10), relaying).await.expect("the relay ends").unwrap();
    }

    #[tokio::test]
    async fn a_write_stuck_on_a_node_that_never_reads_ends_the_tunnel() {
        let (client, client_end) = pair().await;
        let (_node, node_end) = pair().await; // never read
        let relaying = tokio::spawn(relay(client_end, node_end, Duration::from_millis(300), Default::default()));
        let (_client_r, mut client_w) = client.into_split();
        let total = 256usize << 20;
        let writing = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            let mut sent = 0;
            while sent < total && client_w.write_all(&chunk).await.is_ok() {
                sent += chunk.len();
            }
            sent
        });
        let (up, down) = tokio::time::timeout(Duration::from_secs(20), relaying).await.expect("expiry").unwrap();
        assert!(up > 0 && (up as usize) < total, "the relay moved {up} bytes, then gave up on the stuck write");
        assert_eq!(down, 0);
        let sent = tokio::time::timeout(Duration::from_secs(10), writing).await.expect("the writer stops").unwrap();
        assert!(sent < total, "the client's writes fail once the tunnel is gone");
    }
}
