//! The long-polling transport. The first poll answers 200 at once with an
//! empty body (that is how the client learns the connection started); each
//! later poll waits until frames are queued (200 with all of them), the poll
//! timeout passes (200, empty), a newer poll supersedes it (204), or the
//! connection is closed and drained (204). Polls are counted so the sweeper
//! can drop a connection nobody polls any more.

use crate::app::App;
use crate::connection::{now_ms, Connection};
use crate::outbox::{Batch, OutFrame};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Marks a poll as active for its lifetime, however it ends.
struct ActivePoll<'a>(&'a Connection);

impl<'a> ActivePoll<'a> {
    fn start(conn: &'a Connection) -> Self {
        conn.long_poll.active.fetch_add(1, Ordering::AcqRel);
        ActivePoll(conn)
    }
}

impl Drop for ActivePoll<'_> {
    fn drop(&mut self) {
        self.0.long_poll.last_poll_ms.store(now_ms(), Ordering::Release);
        self.0.long_poll.active.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn superseded(conn: &Connection, generation: u64) {
    loop {
        let notified = conn.long_poll.superseded.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if conn.long_poll.generation.load(Ordering::Acquire) != generation {
            return;
        }
        notified.await;
    }
}

fn data(frames: Vec<OutFrame>) -> Response {
    let mut body = Vec::with_capacity(frames.iter().map(|f| f.bytes.len()).sum());
    for f in &frames {
        body.extend_from_slice(&f.bytes);
    }
    ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
}

pub async fn poll(app: Arc<App>, conn: Arc<Connection>) -> Response {
    let lp = &conn.long_poll;
    let _active = ActivePoll::start(&conn);
    if !lp.started.swap(true, Ordering::AcqRel) {
        return StatusCode::OK.into_response();
    }
    let generation = lp.generation.fetch_add(1, Ordering::AcqRel) + 1;
    lp.superseded.notify_waiters();
    let timeout = app.cfg.duration(app.cfg.long_poll_secs);
    tokio::select! {
        biased;
        _ = superseded(&conn, generation) => StatusCode::NO_CONTENT.into_response(),
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
