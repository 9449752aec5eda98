//! The long-polling transport. The first poll answers 200 at once with an
//! empty body (that is how the client learns the connection started); each
//! later poll waits until frames are queued (200 with all of them), the poll
//! timeout passes (200, empty), a newer poll supersedes it (204), or the
//! connection is closed and drained (204). Polls are counted so the sweeper
//! can drop a connection nobody polls any more.

use crate::app::App;
use crate::connection::Connection;
use crate::outbox::{Batch, OutFrame};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

fn data(frames: Vec<OutFrame>) -> Response {
    let mut body = Vec::with_capacity(frames.iter().map(|f| f.bytes.len()).sum());
    for f in &frames {
        body.extend_from_slice(&f.bytes);
    }
    ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
}

pub async fn poll(app: Arc<App>, conn: Arc<Connection>) -> Response {
    let (_running, first) = conn.start_poll();
    if first {
        return StatusCode::OK.into_response();
    }
    let generation = conn.supersede_polls();
    let timeout = app.cfg.duration(app.cfg.long_poll_secs);
    tokio::select! {
        biased;
        _ = conn.superseded(generation) => StatusCode::NO_CONTENT.into_response(),
        batch = conn.outbox.next_batch(0) => match batch {
            Batch::Frames(frames) => data(frames),
            Batch::Closed | Batch::Superseded => {
                app.disconnect(&conn);
                StatusCode::NO_CONTENT.into_response()
            }
        },
        _ = tokio::time::sleep(timeout) => StatusCode::OK.into_response(),
    }
}
