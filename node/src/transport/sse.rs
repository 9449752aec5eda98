//! The Server-Sent Events transport: a streaming response (axum's `Sse`)
//! that turns every outbox frame into one event, and ends when the
//! connection closes. The client sends with POST. When the client goes away
//! the body stream is dropped, and with it the connection.

use crate::app::App;
use crate::connection::Connection;
use crate::outbox::Batch;
use axum::http::HeaderValue;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use std::convert::Infallible;
use std::sync::Arc;

/// Forgets the connection when the response body is dropped.
struct StreamGuard {
    app: Arc<App>,
    conn: Arc<Connection>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.app.disconnect(&self.conn);
    }
}

/// One outbox frame as an event. Frames on this transport are JSON text
/// (MessagePack is refused at the handshake), so they are valid UTF-8; a
/// frame never holds a line break, but `Event::data` would split one into
/// several `data:` fields as the format requires.
pub fn event(frame: &[u8]) -> Event {
    Event::default().data(String::from_utf8_lossy(frame))
}

pub fn stream(app: Arc<App>, conn: Arc<Connection>) -> Response {
    let guard = StreamGuard { app, conn };
    let batches = futures_util::stream::unfold(guard, |guard| async move {
        match guard.conn.outbox.next_batch(0).await {
            Batch::Frames(frames) => {
                let events: Vec<Result<Event, Infallible>> = frames.iter().map(|f| Ok(event(&f.bytes))).collect();
                Some((futures_util::stream::iter(events), guard))
            }
            Batch::Closed | Batch::Superseded => None,
        }
    });
    let mut resp = Sse::new(batches.flatten()).into_response();
    // Tells nginx-style proxies in front not to buffer the stream.
    resp.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

#[cfg(test)]
mod tests {
    use super::event;
    use axum::response::IntoResponse;

    async fn wire(frames: &[&[u8]]) -> String {
        let events: Vec<Result<_, std::convert::Infallible>> = frames.iter().map(|f| Ok(event(f))).collect();
        let resp = axum::response::sse::Sse::new(futures_util::stream::iter(events)).into_response();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn frames_become_data_lines() {
        assert_eq!(wire(&[b"{}\x1e", b"a\nb"]).await, "data: {}\x1e\n\ndata: a\ndata: b\n\n");
    }
}
