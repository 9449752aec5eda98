//! Answers that read history, held to the connection's byte budget:
//! `Resume`'s replay and `GetHistory`'s page. Both read Redis in pages sized
//! by the bytes they aim for (the average entry seen so far says how many
//! entries that is), never the whole capped stream, through
//! `history_reads` (at most four at once, identical ones shared). A replay
//! is a cursor kept on the connection: it queues messages while the outbox
//! has room and then pauses, like a client's pipelined requests do (`Flow::Paused`), and
//! the transport continues it once the client has read some. So a client
//! that reads gets everything it missed, in order and once, however much
//! that is; one that does not read holds one outbox and one page.

use crate::app::App;
use crate::connection::{ChatDelivery, Connection, Flow};
use crate::history::{self, ChatMessage, Replay};
use crate::protocol::HubMessage;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;

/// Bytes one page of a replay aims at.
const REPLAY_PAGE_BYTES: usize = 64 * 1024;
/// Entries the first page of a read asks for, before sizes are known, and
/// the most any page asks for.
const FIRST_PAGE: usize = 16;
const MAX_PAGE: usize = 256;

/// How many entries fill `bytes` at the average size seen so far.
fn page_count(bytes: usize, seen_bytes: usize, seen_entries: usize) -> usize {
    if seen_entries == 0 || seen_bytes == 0 {
        return FIRST_PAGE;
    }
    let average = (seen_bytes / seen_entries).max(1);
    (bytes / average + 1).clamp(1, MAX_PAGE)
}

/// Roughly what a message costs to hold and send.
fn size_of(m: &ChatMessage) -> usize {
    m.message.len() + m.user.len() + m.connection_id.len() + m.node_id.len() + 64
}

/// Where `Resume`'s argument says the client is: one message id (the newest
/// it saw), or its newest id per scope, `{"all": id, "groups": {"ops": id}}`
/// (see docs/scaling.md, "The message-id question"). History is one stream
/// here and delivery is in id order, so a client has seen everything meant
/// for it up to the newest id it names: that one is where the replay starts.
pub fn resume_position(position: Value) -> Result<String, String> {
    const SHAPE: &str = "Resume takes the last message id seen, or {\"all\": id, \"groups\": {\"group\": id}}";
    let bad = || format!("HubException: {SHAPE}.");
    let ids: Vec<String> = match position {
        Value::String(id) => return Ok(id),
        Value::Object(mut scopes) => {
            let mut ids = Vec::new();
            if let Some(all) = scopes.remove("all") {
                ids.push(all.as_str().ok_or_else(bad)?.to_string());
            }
            if let Some(groups) = scopes.remove("groups") {
                for (_, id) in groups.as_object().ok_or_else(bad)? {
                    ids.push(id.as_str().ok_or_else(bad)?.to_string());
                }
            }
            if !scopes.is_empty() {
                return Err(bad());
            }
            ids
        }
        // Neither form: the official server's binding error, as for any method.
        _ => return Err(crate::protocol::BINDING_ERROR.into()),
    };
    if let Some(malformed) = ids.iter().find(|id| history::parse_id(id).is_none()) {
        let shown: String = malformed.chars().take(64).collect();
        return Err(format!("HubException: cannot resume after '{shown}': {}.", history::ResumeError::Malformed));
    }
    ids.into_iter().max_by(|a, b| history::cmp_ids(a, b)).ok_or_else(bad)
}

/// `Resume(last)`: checks that a replay from `last` is possible and, if so,
/// starts it on `conn` (the hub's loop runs it; `continue_replay`). Live
/// chat messages are held from now until it ends.
pub async fn start_resume(app: &App, conn: &Connection, invocation_id: Option<&str>, last: &str) -> Result<(), String> {
    conn.begin_resume();
    let through = match app.history_reads.resume_point(&app.backplane, last).await {
        Ok(Ok(through)) => through,
        Ok(Err(e)) => {
            app.release_held(conn, None);
            return Err(format!(
                "HubException: cannot resume after '{}': {e}.",
                last.chars().take(64).collect::<String>()
            ));
        }
        Err(e) => {
            app.release_held(conn, None);
            return Err(format!("HubException: message history is unavailable ({e})."));
        }
    };
    conn.set_replay(Replay {
        invocation_id: invocation_id.map(String::from),
        after: last.to_string(),
        through,
        live_from: conn.first_live_id().map(String::from),
        groups: app.groups.of_connection(&conn.key).into_iter().collect(),
        page: VecDeque::new(),
        done_reading: false,
        newest: None,
        replayed: 0,
        seen_bytes: 0,
        seen_entries: 0,
    });
    Ok(())
}

/// Runs `conn`'s replay, if it has one, while its outbox has room (queuing
/// at least one message per call, so every call makes progress): `Paused`
/// when the outbox filled first, `Done` when there is none or it finished
/// (its Completion queued, live delivery released).
pub async fn continue_replay(app: &Arc<App>, conn: &Arc<Connection>) -> Flow {
    let Some(mut replay) = conn.take_replay() else { return Flow::Done };
    let mut first = true;
    loop {
        if conn.outbox.is_closed() {
            return Flow::Done; // the connection is ending; nothing more to send
        }
        let Some(m) = replay.page.pop_front() else {
            if replay.done_reading {
                finish(app, conn, replay, Ok(()));
                return Flow::Done;
            }
            if let Err(e) = read_page(app, &mut replay).await {
                finish(app, conn, replay, Err(format!("HubException: message history is unavailable ({e}).")));
                return Flow::Done;
            }
            continue;
        };
        let Some(id) = m.id.clone() else { continue };
        let live_already = replay.live_from.as_deref().is_some_and(|f| history::cmp_ids(&id, f).is_ge());
        if live_already && !conn.missed_before_join(m.group.as_deref(), &id) {
            if conn.has_late_joins() {
                // A group joined after live delivery began may still have
                // older messages to replay: read on, skipping this one.
                replay.newest = Some(id);
                continue;
            }
            // Delivered live already, as is everything after it.
            replay.page.clear();
            replay.done_reading = true;
            continue;
        }
        if !m.group.as_ref().is_none_or(|g| replay.groups.contains(g)) {
            replay.newest = Some(id);
            continue;
        }
        if !first && !conn.outbox.has_room() {
            replay.page.push_front(m);
            conn.set_replay(replay);
            return Flow::Paused;
        }
        first = false;
        // A reply to the client's own request: queued past the outbox's
        // limit, which the pause above keeps to one message.
        let d = ChatDelivery::new(m);
        app.reply_to(conn, d.for_connection(conn));
        replay.newest = Some(id);
        replay.replayed += 1;
    }
}

/// Reads the replay's next page (shared with identical reads in flight).
async fn read_page(app: &App, replay: &mut Replay) -> Result<(), String> {
    let count = page_count(REPLAY_PAGE_BYTES, replay.seen_bytes, replay.seen_entries);
    let page = app.history_reads.range(&app.backplane, &replay.after, &replay.through, count).await?;
    replay.done_reading = page.len() < count;
    if let Some(last) = page.last().and_then(|m| m.id.clone()) {
        replay.after = last;
    }
    replay.seen_entries += page.len();
    replay.seen_bytes += page.iter().map(size_of).sum::<usize>();
    replay.page = page.iter().cloned().collect();
    Ok(())
}

/// Ends a replay: its Completion (how many were replayed, or the error) and
/// the live messages held meanwhile that are newer than what it passed.
fn finish(app: &App, conn: &Connection, replay: Replay, outcome: Result<(), String>) {
    if let Some(id) = replay.invocation_id {
        let (result, error) = match outcome {
            Ok(()) => (Some(Value::from(replay.replayed)), None),
            Err(e) => (None, Some(format!("Failed to invoke 'Resume' due to an error on the server. {e}"))),
        };
        app.reply(conn, HubMessage::Completion { invocation_id: id, result, error });
    }
    app.release_held(conn, replay.newest.as_deref());
}

/// `GetHistory(count)`: the newest `count` messages that fit in `budget`
/// bytes (as the JSON the client gets), oldest first, each with its `id`
/// (and `group`), read newest first in pages until the budget is met.
pub async fn history_page(app: &App, count: usize, budget: usize) -> Result<Vec<Value>, String> {
    let (mut used, mut seen_bytes, mut seen_entries) = (0, 0, 0);
    let mut before: Option<String> = None;
    let mut page = Vec::new();
    'reading: while page.len() < count {
        let want = page_count(budget.saturating_sub(used), seen_bytes, seen_entries).min(count - page.len());
        let entries = app
            .history_reads
            .older(&app.backplane, before.as_deref(), want)
            .await
            .map_err(|e| format!("HubException: message history is unavailable ({e})."))?;
        let end = entries.len() < want;
        seen_entries += entries.len();
        seen_bytes += entries.iter().map(size_of).sum::<usize>();
        for m in entries.iter() {
            before = m.id.clone();
            let Ok(mut v) = serde_json::to_value(m) else { continue };
            if let Some(o) = v.as_object_mut() {
                o.remove("uid"); // internal
            }
            used += v.to_string().len() + 1;
            if used > budget {
                break 'reading;
            }
            page.push(v);
        }
        if end {
            break;
        }
    }
    page.reverse();
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_position_is_one_id_or_the_newest_of_a_scope_map() {
        use serde_json::json;
        assert_eq!(resume_position(json!("5-1")), Ok("5-1".into()));
        let map = json!({"all": "5-1", "groups": {"ops": "12-0", "dev": "9-3"}});
        assert_eq!(resume_position(map), Ok("12-0".into()), "compared as ids, not as text");
        assert_eq!(resume_position(json!({"groups": {"ops": "7-0"}})), Ok("7-0".into()));
        for bad in [json!({}), json!({"all": 5}), json!({"groups": ["1-0"]}), json!({"all": "1-0", "x": 1})] {
            assert!(resume_position(bad.clone()).unwrap_err().contains("Resume takes"), "{bad}");
        }
        for neither in [json!(5), json!(null), json!(["1-0"])] {
            assert!(resume_position(neither.clone()).unwrap_err().contains("Error binding arguments"), "{neither}");
        }
        assert!(resume_position(json!({"all": "nope"})).unwrap_err().contains("malformed"));
    }

    #[test]
    fn pages_ask_for_as_many_entries_as_fill_their_bytes() {
        assert_eq!(page_count(64 * 1024, 0, 0), FIRST_PAGE, "sizes unknown yet");
        assert_eq!(page_count(64 * 1024, 16 * 30_000, 16), 3, "30 KB entries");
        assert_eq!(page_count(64 * 1024, 100 * 16, 16), MAX_PAGE, "tiny entries");
        assert_eq!(page_count(0, 100, 1), 1, "always at least one");
    }
}
