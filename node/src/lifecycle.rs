//! Start and stop. Start: spawn the heartbeat, backplane and keep-alive tasks.
//! Stop (SIGTERM or Ctrl-C): mark the node draining and announce it, so the
//! balancer sends no new clients and negotiate answers 503; keep serving
//! existing clients for the drain period (or until none is left); close every
//! client with a Close carrying `allowReconnect: true`; flush the backplane
//! queue so no accepted message is lost; delete the registry key and announce
//! `down`; then let the HTTP server finish.

use crate::app::App;
use crate::backplane::Deliver;
use crate::{keepalive, presence_sync, registry};
use std::sync::Arc;
use std::time::Duration;
use switchboard_common::registry::RegistryEventKind;

/// The tasks `drain` stops: the heartbeat first (the node announces its
/// drain itself), presence once its last changes are written.
pub struct Background {
    heartbeat: tokio::task::JoinHandle<()>,
    presence: Vec<tokio::task::JoinHandle<()>>,
}

pub fn start_background_tasks(app: &Arc<App>) -> Background {
    let sink: Arc<dyn Deliver> = app.clone();
    app.backplane.start(Arc::downgrade(&sink));
    tokio::spawn(keepalive::sweep_forever(app.clone()));
    let tasks = app.presence_tasks.lock().unwrap_or_else(|p| p.into_inner()).take();
    let presence = tasks.map_or_else(Vec::new, |tasks| {
        vec![
            tokio::spawn(presence_sync::write_forever(app.clone(), tasks.writes)),
            tokio::spawn(presence_sync::notify_forever(Arc::downgrade(app), tasks.events)),
        ]
    });
    Background { heartbeat: tokio::spawn(registry::heartbeat(app.clone())), presence }
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the node");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Closes every remaining client with `allowReconnect`, oldest first,
/// evenly over `spread`, so a drained node's clients reach the other nodes
/// as a steady stream rather than a storm. Closes go in small batches on a
/// tick of at least `MIN_TICK` (a timer per client would take a
/// millisecond or more each, stretching 7,000 closes over 5 s to 20 s), and
/// a late tick closes only its own batch, so a stalled moment never bunches
/// the rest together.
async fn close_spread(app: &App, spread: Duration) {
    let mut remaining = app.connections.all();
    remaining.sort_by_key(|c| std::cmp::Reverse(c.age_ms(crate::connection::now_ms())));
    if remaining.is_empty() {
        return;
    }
    tracing::info!(clients = remaining.len(), spread_secs = spread.as_secs_f64(), "closing the remaining clients");
    let (tick, batch) = spread_plan(spread, remaining.len());
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for chunk in remaining.chunks(batch) {
        ticks.tick().await;
        for conn in chunk {
            app.close(conn, None, true);
        }
    }
}

/// The shortest wait between two batches of closes.
const MIN_TICK: Duration = Duration::from_millis(10);

/// How often to close a batch and how many each time, to close `count`
/// clients evenly over `spread` (all at once when it is zero).
fn spread_plan(spread: Duration, count: usize) -> (Duration, usize) {
    let count = count.max(1);
    let gap = spread.checked_div(count as u32).unwrap_or_default();
    if gap.is_zero() && spread.is_zero() {
        return (MIN_TICK, count);
    }
    if gap >= MIN_TICK {
        return (gap, 1);
    }
    // Clients per MIN_TICK, rounded up (in whole nanoseconds, not floats).
    let batch = (count as u128 * MIN_TICK.as_nanos()).div_ceil(spread.as_nanos().max(1));
    let batch = (batch as usize).clamp(1, count);
    // The tick that spreads count / batch batches over the window.
    let batches = count.div_ceil(batch) as u32;
    (spread.checked_div(batches).unwrap_or(MIN_TICK).max(Duration::from_millis(1)), batch)
}

pub async fn drain(app: &Arc<App>, background: Background) {
    tracing::info!(connections = app.connections.len(), drain_secs = app.cfg.drain_secs, "draining");
    app.start_draining();
    background.heartbeat.abort();
    if let Err(e) = registry::beat(app, Some(RegistryEventKind::Draining)).await {
        tracing::warn!(error = %e, "could not announce draining");
    }
    let closing = tokio::time::Instant::now() + app.cfg.duration(app.cfg.drain_secs);
    while app.connections.len() > 0 && tokio::time::Instant::now() < closing {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    close_spread(app, Duration::try_from_secs_f64(app.cfg.drain_spread_secs).unwrap_or_default()).await;
    // Give transports a moment to deliver the Close.
    let settle = tokio::time::Instant::now() + Duration::from_secs(2);
    while app.connections.len() > 0 && tokio::time::Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every closed connection took its user offline here; Redis hears it
    // before the node goes (other nodes see them leave now, not at the TTL).
    if tokio::time::timeout(Duration::from_secs(2), app.presence.flush()).await.is_err() {
        tracing::warn!("presence not written before exit; this node's users expire with its TTL");
    }
    // No more refreshes: a stopped node must not keep anyone online.
    for task in background.presence {
        task.abort();
    }
    if !app.backplane.flush(Duration::from_secs(5)).await {
        tracing::error!("backplane queue not flushed before exit; some messages did not reach other nodes");
    }
    match registry::deregister(app).await {
        Ok(()) => tracing::info!("removed from the node registry"),
        Err(e) => {
            tracing::warn!(error = %e, "could not remove the registry key; it expires with its TTL")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_closes_one_at_a_time_when_there_is_room_and_in_batches_when_not() {
        // Ten clients over 5 s: one every half second.
        assert_eq!(spread_plan(Duration::from_secs(5), 10), (Duration::from_millis(500), 1));
        // 7,000 over 5 s: 14 every 10 ms, 500 batches in all.
        let (tick, batch) = spread_plan(Duration::from_secs(5), 7000);
        assert_eq!(batch, 14);
        assert_eq!(tick, Duration::from_millis(10));
        assert_eq!(7000usize.div_ceil(batch) as u32 * tick, Duration::from_secs(5));
        // No window: everyone at once.
        assert_eq!(spread_plan(Duration::ZERO, 300), (MIN_TICK, 300));
    }
}
