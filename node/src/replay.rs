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
//!
//! Where each group has its own stream and ids (a Redis Cluster; see
//! `history::Scope`), a replay is one per scope, one after another: the
//! broadcasts, then each of the connection's groups, each in id order and
//! each from the client's own position in it.

use crate::app::App;
use crate::connection::{ChatDelivery, Connection, Flow};
use crate::history::{self, ChatMessage, Replay, ResumeError, Scope, ScopeReplay};
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
/// Where a client names no position in a scope it is in, the replay starts
/// this long before the oldest position it named (see `start_resume`).
const UNNAMED_SCOPE_MARGIN_MS: u64 = 5_000;

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
/// (see docs/scaling.md, "The message-id question"); as (scope, id) pairs.
/// With one stream for everything (`per_group` false) delivery is in id
/// order, so a client has seen everything meant for it up to the newest id
/// it names: that one is where the replay starts. With a stream per group
/// each id counts in its own scope, and a lone id cannot say which.
pub fn resume_position(position: Value, per_group: bool) -> Result<Vec<(Scope, String)>, String> {
    const SHAPE: &str = "Resume takes the last message id seen, or {\"all\": id, \"groups\": {\"group\": id}}";
    let bad = || format!("HubException: {SHAPE}.");
    let ids: Vec<(Scope, String)> = match position {
        Value::String(id) if !per_group => return Ok(vec![(None, id)]),
        Value::String(_) => {
            return Err("HubException: each group has message ids of its own here, so Resume takes \
                {\"all\": id, \"groups\": {\"group\": id}} (the newest id seen in each)."
                .into())
        }
        Value::Object(mut scopes) => {
            let mut ids = Vec::new();
            if let Some(all) = scopes.remove("all") {
                ids.push((None, all.as_str().ok_or_else(bad)?.to_string()));
            }
            if let Some(groups) = scopes.remove("groups") {
                for (g, id) in groups.as_object().ok_or_else(bad)? {
                    ids.push((Some(g.clone()), id.as_str().ok_or_else(bad)?.to_string()));
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
    if let Some((_, malformed)) = ids.iter().find(|(_, id)| history::parse_id(id).is_none()) {
        let shown: String = malformed.chars().take(64).collect();
        return Err(format!("HubException: cannot resume after '{shown}': {}.", ResumeError::Malformed));
    }
    if per_group {
        return if ids.is_empty() { Err(bad()) } else { Ok(ids) };
    }
    let newest = ids.into_iter().map(|(_, id)| id).max_by(|a, b| history::cmp_ids(a, b)).ok_or_else(bad)?;
    Ok(vec![(None, newest)])
}

/// The scopes a replay for `conn` covers and where each starts: the one
/// stream from the position given; or, per group, the broadcasts and each
/// of the connection's groups, from the client's position in it. A scope
/// it is in but names no position for has had nothing reach the client
/// since it joined (anything would have left an id), so that replay starts
/// a margin before the oldest position it named: what it missed while away
/// is in there, and what is older is from before it joined. The bool says
/// whether the client named the position.
fn replay_starts(app: &App, conn: &Connection, positions: Vec<(Scope, String)>) -> Vec<(Scope, String, bool)> {
    if !app.backplane.per_group() {
        return positions.into_iter().map(|(scope, id)| (scope, id, true)).collect();
    }
    let oldest = positions.iter().filter_map(|(_, id)| history::parse_id(id)).map(|(ms, _)| ms).min().unwrap_or(0);
    let unnamed = format!("{}-0", oldest.saturating_sub(UNNAMED_SCOPE_MARGIN_MS));
    let mut groups: Vec<String> = app.groups.of_connection(&conn.key).into_iter().collect();
    groups.sort();
    std::iter::once(None)
        .chain(groups.into_iter().map(Some))
        .map(|scope| match positions.iter().find(|(s, _)| *s == scope) {
            Some((_, id)) => (scope, id.clone(), true),
            None => (scope, unnamed.clone(), false),
        })
        .collect()
}

/// `Resume(position)`: checks that a replay from each position is possible
/// and, if so, starts it on `conn` (the hub's loop runs it;
/// `continue_replay`). Live chat messages are held from now until it ends.
pub async fn start_resume(
    app: &App,
    conn: &Connection,
    invocation_id: Option<&str>,
    positions: Vec<(Scope, String)>,
) -> Result<(), String> {
    conn.begin_resume();
    let mut scopes = VecDeque::new();
    for (scope, after, named) in replay_starts(app, conn, positions) {
        match app.history_reads.resume_point(&app.backplane, scope.as_deref(), &after).await {
            Ok(Ok(through)) => {
                let live_from = conn.first_live_id(scope.as_deref());
                scopes.push_back(ScopeReplay { scope, after, through, live_from, newest: None });
            }
            // Nothing stored since then in a scope the client named nothing
            // in; or a group's stream that expired after a week without a
            // message (`GROUP_HISTORY_IDLE`): nothing after its id to miss.
            Ok(Err(ResumeError::Future)) if !named || scope.is_some() => {}
            Ok(Err(e)) => {
                app.release_held(conn, &[]);
                return Err(format!(
                    "HubException: cannot resume after '{}': {e}.",
                    after.chars().take(64).collect::<String>()
                ));
            }
            Err(e) => {
                app.release_held(conn, &[]);
                return Err(format!("HubException: message history is unavailable ({e})."));
            }
        }
    }
    conn.set_replay(Replay {
        invocation_id: invocation_id.map(String::from),
        scopes,
        passed: Vec::new(),
        groups: app.groups.of_connection(&conn.key).into_iter().collect(),
        user: app.user_of(conn),
        page: VecDeque::new(),
        done_reading: false,
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
    let per_group = app.backplane.per_group();
    let mut first = true;
    loop {
        if conn.outbox.is_closed() {
            return Flow::Done; // the connection is ending; nothing more to send
        }
        if replay.scopes.is_empty() {
            finish(app, conn, replay, Ok(()));
            return Flow::Done;
        }
        let Some(m) = replay.page.pop_front() else {
            if replay.done_reading {
                // This scope is done; on to the next.
                if let Some(done) = replay.scopes.pop_front() {
                    replay.passed.extend(done.newest.map(|id| (done.scope, id)));
                }
                replay.done_reading = false;
                continue;
            }
            if let Err(e) = read_page(app, &mut replay).await {
                finish(app, conn, replay, Err(format!("HubException: message history is unavailable ({e}).")));
                return Flow::Done;
            }
            continue;
        };
        let Some(id) = m.id.clone() else { continue };
        let Some(current) = replay.scopes.front_mut() else { continue };
        let live_already = current.live_from.as_deref().is_some_and(|f| history::cmp_ids(&id, f).is_ge());
        if live_already && !conn.missed_before_join(m.group.as_deref(), &id) {
            if !per_group && conn.has_late_joins() {
                // A group joined after live delivery began may still have
                // older messages in the one stream: read on, skipping this one.
                current.newest = Some(id);
                continue;
            }
            // Delivered live already, as is everything after it in this scope.
            replay.page.clear();
            replay.done_reading = true;
            continue;
        }
        let mine = m.group.as_ref().is_none_or(|g| replay.groups.contains(g));
        if !mine || !m.visible_to(&conn.connection_id, replay.user.as_deref()) {
            current.newest = Some(id);
            continue;
        }
        if !first && !conn.outbox.has_room() {
            replay.page.push_front(m);
            conn.set_replay(replay);
            return Flow::Paused;
        }
        first = false;
        current.newest = Some(id);
        // A reply to the client's own request: queued past the outbox's
        // limit, which the pause above keeps to one message.
        let d = ChatDelivery::new(m, per_group);
        app.reply_to(conn, d.for_connection(conn));
        replay.replayed += 1;
    }
}

/// Reads the next page of the replay's current scope (shared with identical reads in flight).
async fn read_page(app: &App, replay: &mut Replay) -> Result<(), String> {
    let Some(current) = replay.scopes.front_mut() else {
        replay.done_reading = true;
        return Ok(());
    };
    let count = page_count(REPLAY_PAGE_BYTES, replay.seen_bytes, replay.seen_entries);
    let page = app
        .history_reads
        .range(&app.backplane, current.scope.as_deref(), &current.after, &current.through, count)
        .await?;
    replay.done_reading = page.len() < count;
    if let Some(last) = page.last().and_then(|m| m.id.clone()) {
        current.after = last;
    }
    replay.seen_entries += page.len();
    replay.seen_bytes += page.iter().map(size_of).sum::<usize>();
    replay.page = page.iter().cloned().collect();
    Ok(())
}

/// Ends a replay: its Completion (how many were replayed, or the error) and
/// the live messages held meanwhile that are newer than what it passed.
fn finish(app: &App, conn: &Connection, mut replay: Replay, outcome: Result<(), String>) {
    if let Some(id) = replay.invocation_id.take() {
        let (result, error) = match outcome {
            Ok(()) => (Some(Value::from(replay.replayed)), None),
            Err(e) => (None, Some(format!("Failed to invoke 'Resume' due to an error on the server. {e}"))),
        };
        app.reply(conn, HubMessage::Completion { invocation_id: id, result, error });
    }
    let unfinished = replay.scopes.drain(..).filter_map(|s| s.newest.map(|id| (s.scope, id)));
    replay.passed.extend(unfinished);
    app.release_held(conn, &replay.passed);
}

/// `GetHistory(count)`: the newest `count` messages that fit in `budget`
/// bytes (as the JSON the client gets), oldest first, each with its `id`
/// (and `group`). With a stream per group: the newest of the broadcasts and
/// of `conn`'s groups together, ordered by id (their ids are times).
pub async fn history_page(app: &App, conn: &Connection, count: usize, budget: usize) -> Result<Vec<Value>, String> {
    let mut scopes: Vec<Scope> = vec![None];
    if app.backplane.per_group() {
        let mut groups: Vec<String> = app.groups.of_connection(&conn.key).into_iter().collect();
        groups.sort();
        scopes.extend(groups.into_iter().map(Some));
    }
    // The newest that fit so far, newest first: each scope's read is merged
    // in and cut back to the page at once, so a connection in many groups
    // holds at most this page and one scope's read, not one per scope.
    let user = app.user_of(conn);
    let visible = |m: &ChatMessage| m.visible_to(&conn.connection_id, user.as_deref());
    let mut kept: Vec<((u64, u64), Value, usize)> = Vec::new();
    for scope in &scopes {
        kept.extend(newest_of(app, scope.as_deref(), count, budget, &visible).await?);
        kept.sort_by_key(|e| std::cmp::Reverse(e.0));
        let mut used = 0;
        let fits = kept.iter().take(count).take_while(|e| {
            used += e.2;
            used <= budget
        });
        let n = fits.count();
        kept.truncate(n);
    }
    let mut page: Vec<Value> = kept.into_iter().map(|(_, v, _)| v).collect();
    page.reverse();
    Ok(page)
}

/// The newest messages of one scope, newest first, up to `count` and
/// `budget` bytes as JSON: (id, the JSON, its size), of those `visible`
/// passes (other users' direct messages are not). Read newest first in
/// pages until either is met; the pages walk at most the whole capped
/// history.
async fn newest_of(
    app: &App,
    scope: Option<&str>,
    count: usize,
    budget: usize,
    visible: &(dyn Fn(&ChatMessage) -> bool + Sync),
) -> Result<Vec<((u64, u64), Value, usize)>, String> {
    let (mut used, mut seen_bytes, mut seen_entries) = (0, 0, 0);
    let mut before: Option<String> = None;
    let mut page = Vec::new();
    'reading: while page.len() < count {
        let want = page_count(budget.saturating_sub(used), seen_bytes, seen_entries).min(count - page.len());
        let entries = app
            .history_reads
            .older(&app.backplane, scope, before.as_deref(), want)
            .await
            .map_err(|e| format!("HubException: message history is unavailable ({e})."))?;
        let end = entries.len() < want;
        seen_entries += entries.len();
        seen_bytes += entries.iter().map(size_of).sum::<usize>();
        for m in entries.iter() {
            before = m.id.clone();
            if !visible(m) {
                continue;
            }
            let id = m.id.as_deref().and_then(history::parse_id).unwrap_or_default();
            let Ok(mut v) = serde_json::to_value(m) else { continue };
            if let Some(o) = v.as_object_mut() {
                o.remove("uid"); // internal
            }
            let size = v.to_string().len() + 1;
            used += size;
            if used > budget {
                break 'reading;
            }
            page.push((id, v, size));
        }
        if end {
            break;
        }
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_position_is_one_id_or_the_newest_of_a_scope_map() {
        use serde_json::json;
        let one = |id: &str| Ok(vec![(None, id.to_string())]);
        assert_eq!(resume_position(json!("5-1"), false), one("5-1"));
        let map = json!({"all": "5-1", "groups": {"ops": "12-0", "dev": "9-3"}});
        assert_eq!(resume_position(map, false), one("12-0"), "compared as ids, not as text");
        assert_eq!(resume_position(json!({"groups": {"ops": "7-0"}}), false), one("7-0"));
        for per_group in [false, true] {
            for bad in [json!({}), json!({"all": 5}), json!({"groups": ["1-0"]}), json!({"all": "1-0", "x": 1})] {
                assert!(resume_position(bad.clone(), per_group).unwrap_err().contains("Resume takes"), "{bad}");
            }
            for neither in [json!(5), json!(null), json!(["1-0"])] {
                let e = resume_position(neither.clone(), per_group).unwrap_err();
                assert!(e.contains("Error binding arguments"), "{neither}");
            }
            assert!(resume_position(json!({"all": "nope"}), per_group).unwrap_err().contains("malformed"));
        }
    }

    #[test]
    fn with_a_stream_per_group_each_id_keeps_its_scope_and_a_lone_id_is_refused() {
        use serde_json::json;
        let map = json!({"all": "5-1", "groups": {"ops": "12-0"}});
        let ids = resume_position(map, true).unwrap();
        assert_eq!(ids, vec![(None, "5-1".to_string()), (Some("ops".to_string()), "12-0".to_string())]);
        assert!(resume_position(json!("5-1"), true).unwrap_err().contains("message ids of its own"));
    }

    #[test]
    fn pages_ask_for_as_many_entries_as_fill_their_bytes() {
        assert_eq!(page_count(64 * 1024, 0, 0), FIRST_PAGE, "sizes unknown yet");
        assert_eq!(page_count(64 * 1024, 16 * 30_000, 16), 3, "30 KB entries");
        assert_eq!(page_count(64 * 1024, 100 * 16, 16), MAX_PAGE, "tiny entries");
        assert_eq!(page_count(0, 100, 1), 1, "always at least one");
    }
}
