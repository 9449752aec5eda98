//! The WebSocket transport: one task per socket that both reads (feeding the
//! hub) and writes (draining the outbox), so an idle connection costs one
//! task and no timers. The socket's buffers are kept small; tungstenite's
//! default 128 KiB read buffer per socket would dominate memory at scale.
//! WebSocket pings are answered by tungstenite itself. JSON goes in text
//! frames and MessagePack in binary ones. With stateful reconnect the writer
//! pauses while too much is unacknowledged, and a socket that drops without a
//! close leaves the connection waiting for the client's new socket. A frame
//! the WebSocket layer refuses is answered with the close code RFC 6455 gives
//! it (1007 for a text frame that is not UTF-8, 1009 for one over the size
//! limit, 1002 for a framing error) before the socket closes, as ASP.NET
//! Core's does.

use crate::app::App;
use crate::connection::{now_ms, Connection};
use crate::hub::{self, Flow};
use crate::outbox::{Batch, OutFrame};
use crate::protocol::HubProtocol;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::SinkExt;
use std::sync::Arc;

const READ_BUFFER: usize = 1024;
/// How long the Close answering a refused frame may take to write.
const CLOSE_WRITE: std::time::Duration = std::time::Duration::from_secs(1);
const WRITE_BUFFER: usize = 0; // write through; frames are batched by the outbox

pub fn upgrade(app: Arc<App>, conn: Arc<Connection>, upgrade: WebSocketUpgrade, generation: u64) -> Response {
    // Messages above the hub limit still get a SignalR Close; far larger
    // frames are refused by the socket layer before they are buffered.
    let socket_limit = app.cfg.max_message_bytes.saturating_mul(4).max(64 * 1024);
    let failed = (app.clone(), conn.clone());
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(socket_limit)
        .max_frame_size(socket_limit)
        .on_failed_upgrade(move |e| {
            tracing::info!(error = %e, "websocket upgrade failed");
            ended(&failed.0, &failed.1, generation, false);
        })
        .on_upgrade(move |socket| run(app, conn, socket, generation))
}

/// The Close that answers a read error, by RFC 6455 §7.4.1: `None` when the
/// connection itself failed (nothing can be sent, and a stateful connection
/// waits for the client's next socket): an I/O error, or a socket dropped
/// without a close, which tungstenite reports as a protocol error.
fn close_for(e: axum::Error) -> Option<CloseFrame> {
    use tungstenite::error::{CapacityError, Error, ProtocolError};
    let (code, reason) = match e.into_inner().downcast::<Error>().ok().map(|e| *e)? {
        Error::Utf8(_) => (1007, "invalid UTF-8 in a text frame"),
        Error::Capacity(CapacityError::MessageTooLong { .. }) => (1009, "message too big"),
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => return None,
        Error::Capacity(_) | Error::Protocol(_) => (1002, "protocol error"),
        _ => return None,
    };
    Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) })
}

/// A frame as a WebSocket message: text for JSON, binary for MessagePack.
fn message(protocol: HubProtocol, frame: Bytes) -> Option<Message> {
    if protocol.is_binary() {
        return Some(Message::Binary(frame));
    }
    // JSON records are serialized by serde_json, always UTF-8.
    Utf8Bytes::try_from(frame).ok().map(Message::Text)
}

/// Writes a batch; false when the socket failed.
async fn write(socket: &mut WebSocket, conn: &Connection, frames: Vec<OutFrame>) -> bool {
    if let Some(st) = conn.stateful() {
        // Counted before writing: what is taken is either on the wire or,
        // if the socket fails, kept for the resume.
        if let Some(last) = frames.iter().map(|f| f.seq).max() {
            st.written(last);
        }
    }
    let protocol = conn.protocol();
    for joined in join_frames(frames) {
        let Some(msg) = message(protocol, joined) else { continue };
        if socket.feed(msg).await.is_err() {
            return false;
        }
    }
    socket.flush().await.is_ok()
}

/// The largest WebSocket message `join_frames` builds from several frames.
const MAX_JOINED: usize = 64 * 1024;

/// The frames of a batch as few WebSocket messages: SignalR lets one message
/// carry several records (JSON records end with a record separator,
/// MessagePack ones start with their length), so a connection that fell
/// behind catches up with one write per batch instead of one per record. A
/// lone frame is passed on without copying; joined messages stay under
/// `MAX_JOINED` bytes unless a single frame is larger.
fn join_frames(frames: Vec<OutFrame>) -> Vec<Bytes> {
    if frames.len() == 1 {
        return frames.into_iter().map(|f| f.bytes).collect();
    }
    let mut out = Vec::new();
    let mut current = bytes::BytesMut::new();
    for f in frames {
        if !current.is_empty() && current.len() + f.bytes.len() > MAX_JOINED {
            out.push(current.split().freeze());
        }
        current.extend_from_slice(&f.bytes);
    }
    if !current.is_empty() {
        out.push(current.freeze());
    }
    out
}

/// The hub's handling of received bytes, boxed: its future is several KB,
/// and inline it would size every socket's task for its whole life, idle or
/// not; boxed it exists only while a message is being handled.
async fn on_data(app: &Arc<App>, conn: &Arc<Connection>, data: &[u8]) -> Flow {
    Box::pin(hub::on_data(app, conn, data)).await
}

async fn run(app: Arc<App>, conn: Arc<Connection>, mut socket: WebSocket, generation: u64) {
    // Records already read but not processed while the outbox was full.
    let mut paused = false;
    let graceful = loop {
        // A stateful writer pauses while too much is unacknowledged, unless
        // the connection is closing: then what is queued and the Close go out.
        let may_write = conn.stateful().is_none_or(|st| st.may_write()) || conn.outbox.is_closed();
        // Backpressure: while the client's replies fill the outbox, read no
        // more of its requests (it is not disconnected for asking); but a
        // stateful writer waiting for an Ack must still read the Ack.
        let room = conn.outbox.has_room();
        let may_read = !paused && (room || !may_write);
        // Pending records go on when there is room again (or, for a writer
        // waiting for an Ack, one at a time: the Ack may be among them).
        let may_resume = paused && (room || !may_write);
        tokio::select! {
            () = std::future::ready(()), if may_resume => {
                paused = on_data(&app, &conn, &[]).await == Flow::Paused;
            }
            incoming = socket.recv(), if may_read => match incoming {
                Some(Ok(Message::Text(t))) => paused = on_data(&app, &conn, t.as_bytes()).await == Flow::Paused,
                Some(Ok(Message::Binary(b))) => paused = on_data(&app, &conn, &b).await == Flow::Paused,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => conn.touch_received(),
                Some(Ok(Message::Close(_))) => break true,
                None => break false,
                Some(Err(e)) => {
                    tracing::debug!(connection = %conn.connection_id, error = ?e.to_string(), "websocket read failed");
                    let Some(close) = close_for(e) else { break false };
                    // Bounded: a client that reads nothing must not hold the task.
                    let _ = tokio::time::timeout(CLOSE_WRITE, socket.send(Message::Close(Some(close)))).await;
                    break true;
                }
            },
            batch = conn.outbox.next_batch(generation), if may_write => match batch {
                Batch::Frames(frames) => {
                    if !write(&mut socket, &conn, frames).await {
                        break false;
                    }
                }
                Batch::Closed => {
                    let _ = socket.send(Message::Close(None)).await;
                    break true;
                }
                // A newer socket resumed this connection; it owns it now.
                Batch::Superseded => return,
            },
            () = conn.outbox.closed_or_superseded(generation), if !may_write => {}
        }
    };
    ended(&app, &conn, generation, graceful);
}

/// The socket of `generation` is gone. A stateful connection whose socket
/// dropped without a close waits for the client to resume it; anything else
/// is over.
fn ended(app: &App, conn: &Connection, generation: u64, graceful: bool) {
    if conn.outbox.generation() != generation {
        return; // superseded while it ended
    }
    if let Some(st) = conn.stateful() {
        if !graceful && !conn.outbox.is_closed() {
            tracing::debug!(connection = %conn.connection_id, "websocket dropped; waiting for the client to resume");
            st.disconnected(now_ms());
            return;
        }
    }
    app.disconnect(conn);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(sizes: &[usize]) -> Vec<OutFrame> {
        sizes.iter().enumerate().map(|(i, &n)| OutFrame::plain(Bytes::from(vec![b'a' + i as u8; n]))).collect()
    }

    #[test]
    fn refused_frames_get_their_close_codes_and_a_dropped_socket_none() {
        use tungstenite::error::{CapacityError, Error, ProtocolError};
        let code = |e: Error| close_for(axum::Error::new(e)).map(|c| c.code);
        assert_eq!(code(Error::Utf8("invalid".into())), Some(1007));
        assert_eq!(code(Error::Capacity(CapacityError::MessageTooLong { size: 10, max_size: 5 })), Some(1009));
        assert_eq!(code(Error::Protocol(ProtocolError::UnmaskedFrameFromClient)), Some(1002));
        // A client gone without a close may come back (stateful reconnect).
        assert_eq!(code(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)), None);
        assert_eq!(code(Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset))), None);
    }

    #[test]
    fn a_batch_becomes_as_few_messages_as_fit_and_keeps_every_byte_in_order() {
        let batch = frames(&[10, 20, 30]);
        let all: Vec<u8> = batch.iter().flat_map(|f| f.bytes.to_vec()).collect();
        let joined = join_frames(batch);
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0].to_vec(), all);

        let big = frames(&[MAX_JOINED - 5, 10, MAX_JOINED + 1, 3]);
        let all: Vec<u8> = big.iter().flat_map(|f| f.bytes.to_vec()).collect();
        let joined = join_frames(big);
        let lens: Vec<usize> = joined.iter().map(|b| b.len()).collect();
        assert_eq!(lens, vec![MAX_JOINED - 5, 10, MAX_JOINED + 1, 3]);
        assert_eq!(joined.concat(), all);
        assert!(join_frames(Vec::new()).is_empty());
    }
}
