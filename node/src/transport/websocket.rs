//! The WebSocket transport: one task per socket that both reads (feeding the
//! hub) and writes (draining the outbox), so an idle connection costs one
//! task and no timers. The socket's buffers are kept small; tungstenite's
//! default 128 KiB read buffer per socket would dominate memory at scale.
//! WebSocket pings are answered by tungstenite itself.

use crate::app::App;
use crate::connection::Connection;
use crate::hub;
use crate::outbox::Batch;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::SinkExt;
use std::sync::Arc;

const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 0; // write through; frames are batched by the outbox

pub fn upgrade(app: Arc<App>, conn: Arc<Connection>, upgrade: WebSocketUpgrade) -> Response {
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
            failed.0.disconnect(&failed.1);
        })
        .on_upgrade(move |socket| run(app, conn, socket))
}

async fn run(app: Arc<App>, conn: Arc<Connection>, mut socket: WebSocket) {
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(t))) => hub::on_data(&app, &conn, t.as_bytes()).await,
                Some(Ok(Message::Binary(b))) => hub::on_data(&app, &conn, &b).await,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => conn.touch_received(),
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    tracing::debug!(connection = %conn.connection_id, error = %e, "websocket read failed");
                    break;
                }
            },
            batch = conn.outbox.next_batch() => match batch {
                Batch::Frames(frames) => {
                    let mut ok = true;
                    for f in frames {
                        let msg = match Utf8Bytes::try_from(f) {
                            Ok(t) => Message::Text(t),
                            Err(_) => continue, // records are serialized JSON, always UTF-8
                        };
                        if socket.feed(msg).await.is_err() {
                            ok = false;
                            break;
                        }
                    }
                    if !ok || socket.flush().await.is_err() {
                        break;
                    }
                }
                Batch::Closed => {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
            }
        }
    }
    app.disconnect(&conn);
}
