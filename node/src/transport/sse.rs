//! The Server-Sent Events transport: a streaming response that turns every
//! outbox frame into `data:` lines and a blank line, and ends when the
//! connection closes. The client sends with POST. When the client goes away
//! the body stream is dropped, and with it the connection.

use crate::app::App;
use crate::connection::Connection;
use crate::outbox::Batch;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
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

/// Formats one frame as an SSE event; a frame never legitimately holds line
/// breaks, but each line gets its own `data:` field if it does.
pub fn event(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 10);
    for line in frame.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

pub fn stream(app: Arc<App>, conn: Arc<Connection>) -> Response {
    let guard = StreamGuard { app, conn };
    let body = futures_util::stream::unfold(guard, |guard| async move {
        match guard.conn.outbox.next_batch(0).await {
            Batch::Frames(frames) => {
                let bytes: Vec<u8> = frames.iter().flat_map(|f| event(&f.bytes)).collect();
                Some((Ok::<_, Infallible>(Bytes::from(bytes)), guard))
            }
            Batch::Closed | Batch::Superseded => None,
        }
    });
    let mut resp = Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

#[cfg(test)]
mod tests {
    use super::event;

    #[test]
    fn frames_become_data_lines() {
        assert_eq!(event(b"{}\x1e"), b"data: {}\x1e\r\n\r\n");
        assert_eq!(event(b"a\nb"), b"data: a\r\ndata: b\r\n\r\n");
    }
}
