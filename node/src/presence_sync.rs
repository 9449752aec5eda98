//! The node's two presence tasks, between the view (`presence`), the
//! backplane and the watching connections: one writes this node's changes
//! through the backplane in order and refreshes its entries every heartbeat;
//! the other sends each change of the view to the connections watching it.
//! They live here, not in `presence`, so that the view knows nothing of the
//! node's state (`App`) that holds it.

use crate::app::App;
use crate::backplane::PresenceWrite;
use crate::presence::{Event, Write};
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;

/// Writes this node's presence through the backplane in order, batching
/// what is queued, and every heartbeat rewrites its entries with a
/// fresh expiry, drops expired ones and reads everyone's into the view. Runs
/// until the node's state is gone. A failed write is repaired by the next
/// refresh.
pub async fn write_forever(app: Arc<App>, mut writes: mpsc::UnboundedReceiver<Write>) {
    let ttl_ms = (app.cfg.ttl_secs * 1000.0).ceil() as i64;
    let mut tick = tokio::time::interval(app.cfg.duration(app.cfg.heartbeat_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            // Both are cancel-safe: nothing is taken unless its branch runs.
            w = writes.recv() => match w {
                Some(w) => batch.push(w),
                None => return,
            },
            _ = tick.tick() => batch.push(Write::Refresh),
        }
        while batch.len() < 1024 {
            match writes.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let mut write = PresenceWrite { node: app.node_id.clone(), ttl_ms, ..PresenceWrite::default() };
        let mut refresh = false;
        let mut flushed = Vec::new();
        for w in batch {
            match w {
                Write::Change { user, online } => write.changes.push((user, online)),
                Write::Refresh => refresh = true,
                Write::Flush(done) => flushed.push(done),
            }
        }
        let mut since = 0;
        if refresh {
            // Taken now, after every change queued before it was applied to
            // the view, so this write never re-adds a user who just left.
            write.refresh = Some(app.presence.local_users());
            since = app.presence.resync_start();
        }
        match app.backplane.write_presence(write).await {
            Ok(members) if refresh => app.presence.resync(since, &members),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "presence write failed; the next refresh repairs it"),
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

/// Sends each change of the view to the connections watching it, in order.
pub async fn notify_forever(app: Weak<App>, mut events: mpsc::UnboundedReceiver<(u64, Event)>) {
    use crate::protocol::{HubMessage, Outgoing};
    while let Some((seq, event)) = events.recv().await {
        let Some(app) = app.upgrade() else { return };
        let (target, user) = event.target_and_user();
        let out = Outgoing::new(HubMessage::event(target, vec![serde_json::Value::String(user.to_string())]));
        // Queued under the presence lock, and a too-slow watcher closed
        // after it, since closing a connection updates presence.
        for conn in app.presence.notify(seq, |conn| app.try_send_to(conn, &out)) {
            app.too_slow(&conn);
        }
    }
}
