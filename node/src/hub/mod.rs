//! The chat hub: what each hub message means. Transports hand raw bytes to
//! `on_data`; it splits records, answers the handshake, parses messages and
//! runs invocations through the table of methods in `methods` (chat,
//! groups, direct messages, history and `Resume`, `Echo`, presence). Chat messages are
//! not delivered here: they are stored and published (`backplane`), and every
//! node, this one too, delivers them in id order as they come back. Method names match
//! case-insensitively, as in ASP.NET Core. An unknown method or bad arguments
//! earn a Completion with an error and the connection stays open; bytes that
//! are not the protocol close the connection with an error.

use crate::app::App;
use crate::connection::{Connection, Transport};
use crate::outbox::OutFrame;
use crate::protocol::{handshake_response, parse_handshake, transfer_format_error, HubMessage, ProtocolError};
use crate::replay;
use crate::stateful::{Receive, Stateful};
use bytes::Bytes;
use methods::Answer;
use std::sync::Arc;

mod methods;

pub use crate::connection::Flow;

/// Feeds bytes a client sent; afterwards the outbox says whether it lives on.
/// Holding the reader for the whole batch processes one connection's records
/// in order, and makes a concurrent long-polling send wait for the one before.
/// Between records it pauses while the outbox is full (after processing at
/// least one, so every call makes progress), which bounds what a client's
/// pipelined requests can make the node hold.
pub async fn on_data(app: &Arc<App>, conn: &Arc<Connection>, data: &[u8]) -> Flow {
    conn.touch_received();
    let mut reader = conn.reader().await;
    reader.feed(data);
    let mut first = true;
    loop {
        if conn.outbox.is_closed() {
            return Flow::Done;
        }
        // A `Resume` replaying goes on before anything the client sent after it.
        if replay::continue_replay(app, conn).await == Flow::Paused {
            return Flow::Paused;
        }
        if !first && !conn.outbox.has_room() {
            return Flow::Paused;
        }
        first = false;
        let record = match reader.next_record() {
            Ok(Some(r)) => r,
            Ok(None) => return Flow::Done,
            Err(e) => {
                protocol_error(app, conn, &e);
                return Flow::Done;
            }
        };
        if !conn.is_handshaken() {
            if handshake(app, conn, &record).await {
                // Whatever follows the handshake in this feed is in the new protocol.
                reader.set_framing(conn.protocol().framing());
            }
            continue;
        }
        app.metrics.messages_received.inc();
        let msg = match conn.protocol().parse(&record) {
            Ok(msg) => msg,
            Err(e) => {
                protocol_error(app, conn, &e);
                return Flow::Done;
            }
        };
        if let Some(st) = conn.stateful() {
            match st.on_receive(&msg) {
                Ok(Receive::Process) => {}
                Ok(Receive::Skip) => continue,
                Err(e) => {
                    protocol_error(app, conn, &ProtocolError::InvalidMessage(e));
                    return Flow::Done;
                }
            }
        }
        on_message(app, conn, msg).await;
    }
}

fn protocol_error(app: &App, conn: &Connection, e: &ProtocolError) {
    let kind = match e {
        ProtocolError::TooLarge { .. } => "too_large",
        ProtocolError::InvalidJson(_) => "invalid_json",
        ProtocolError::InvalidMessage(_) => "invalid_message",
        ProtocolError::Handshake(_) => "handshake",
    };
    app.metrics.protocol_errors.with_label_values(&[kind]).inc();
    // Client text (a protocol name, a bad target) may be in the error: logged
    // escaped (Debug), so it can neither forge a line nor send terminal escapes.
    tracing::info!(connection = %conn.connection_id, error = ?e.to_string(), "closing connection after a protocol error");
    app.close(conn, Some(format!("Connection closed with an error. {e}")), false);
}

/// Answers the handshake; true when it succeeded.
async fn handshake(app: &Arc<App>, conn: &Arc<Connection>, record: &[u8]) -> bool {
    let accepted = parse_handshake(record).and_then(|req| {
        if req.protocol.is_binary() && conn.transport().is_some_and(|t| !t.carries_binary()) {
            return Err(transfer_format_error(req.protocol));
        }
        Ok(req)
    });
    match accepted {
        Ok(req) => {
            conn.set_protocol(req.protocol);
            // As in the official server: only a client that negotiated it and
            // speaks version 2 gets stateful reconnect, and only on WebSockets.
            if conn.wants_stateful() && req.version >= 2 && conn.transport().is_some_and(Transport::can_be_stateful) {
                conn.enable_stateful(Stateful::new(
                    app.cfg.stateful_buffer_bytes,
                    app.metrics.stateful_buffer_bytes.clone(),
                ));
            }
            // A signed-in connection is online as its token's user from now
            // on, and the user's direct messages reach this node before the
            // client hears that it is in.
            if let Some(user) = conn.user() {
                app.become_user(conn, user).await;
            }
            let _ = conn.send(Bytes::from(handshake_response(None)), false, true);
            conn.complete_handshake();
            if let Some(upstream) = &app.upstream {
                let (app, conn) = (app.clone(), conn.clone());
                upstream.connected(conn.connection_id.clone(), app.user_of(&conn), move |groups| {
                    Box::pin(async move {
                        for group in groups {
                            if let Err(e) = app.join_group(&conn, &group).await {
                                tracing::info!(connection = %conn.connection_id, error = %e, "could not join a group the backend named");
                            }
                        }
                    })
                });
            }
            tracing::debug!(connection = %conn.connection_id, protocol = req.protocol.name(), version = req.version, stateful = conn.stateful().is_some(), "handshake");
            true
        }
        Err(e) => {
            app.metrics.protocol_errors.with_label_values(&["handshake"]).inc();
            tracing::info!(connection = %conn.connection_id, error = ?e.to_string(), "handshake refused");
            conn.outbox.close(Some(OutFrame::plain(Bytes::from(handshake_response(Some(&e.to_string()))))));
            false
        }
    }
}

async fn on_message(app: &Arc<App>, conn: &Arc<Connection>, msg: HubMessage) {
    match msg {
        HubMessage::Invocation { invocation_id, target, arguments } => {
            let method = methods::find(&target);
            let outcome = match (method, &app.upstream) {
                (Some(m), _) => (m.run)(app, conn, invocation_id.as_deref(), arguments).await,
                // Not the hub's: the application's backend answers it (see `upstream`).
                (None, Some(upstream)) => {
                    let user = app.user_of(conn);
                    let caller = (conn.connection_id.as_str(), user.as_deref());
                    let answer = upstream.invoke(caller, invocation_id.as_deref(), &target, arguments).await;
                    answer.map(|v| if v.is_null() { Answer::Empty } else { Answer::With(v) })
                }
                (None, None) => Err("HubException: Method does not exist.".into()),
            };
            let label = if outcome.is_ok() { "ok" } else { "error" };
            // The table's names, "upstream" or "unknown": a bounded label set whatever a client sends.
            let name = method.map_or(if app.upstream.is_some() { "upstream" } else { "unknown" }, |m| m.name);
            app.metrics.invocations.with_label_values(&[name, label]).inc();
            if let Err(e) = &outcome {
                tracing::debug!(connection = %conn.connection_id, ?target, error = ?e, "invocation failed");
            }
            if let Some(id) = invocation_id {
                let (result, error) = match outcome {
                    Ok(Answer::Queued) => return,
                    Ok(Answer::Empty) => (None, None),
                    Ok(Answer::With(v)) => (Some(v), None),
                    Err(e) => (None, Some(format!("Failed to invoke '{target}' due to an error on the server. {e}"))),
                };
                app.reply(conn, HubMessage::Completion { invocation_id: id, result, error });
            }
        }
        HubMessage::InvocationWithStreams { invocation_id, target, streams } => {
            // As the official server: the method has no stream parameters.
            if let Some(invocation_id) = invocation_id {
                let error = Some(format!(
                    "Failed to invoke '{target}' due to an error on the server. HubException: Client sent {streams} stream(s), Hub method expects 0."
                ));
                app.reply(conn, HubMessage::Completion { invocation_id, result: None, error });
            }
        }
        HubMessage::StreamInvocation { invocation_id, target, .. } => {
            let error = Some(format!("Failed to invoke '{target}' due to an error on the server. HubException: '{target}' is not a streaming method."));
            app.reply(conn, HubMessage::Completion { invocation_id, result: None, error });
        }
        HubMessage::Close { .. } => app.close(conn, None, false),
        HubMessage::Ping | HubMessage::CancelInvocation { .. } => {}
        // Client results and client streams are not offered; Ack and
        // Sequence only mean something with stateful reconnect, which
        // handled them before this point.
        HubMessage::Completion { .. }
        | HubMessage::StreamItem { .. }
        | HubMessage::Ack { .. }
        | HubMessage::Sequence { .. } => {
            tracing::debug!(connection = %conn.connection_id, "ignoring a message type this hub does not use");
        }
        HubMessage::Unknown(t) => {
            tracing::info!(connection = %conn.connection_id, message_type = t, "ignoring unknown message type");
        }
    }
}

/// Hub and delivery over the in-memory backplane: two nodes sharing one
/// `MemoryBus`, clients fed bytes as a transport would feed them, and what
/// each connection's outbox holds read back. No Redis, no sockets.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::memory::{MemoryBackplane, MemoryBus};
    use crate::backplane::{Backplane, Deliver};
    use crate::connection::{ConnectionOptions, Transport};
    use crate::outbox::Batch;
    use futures_util::FutureExt;
    use serde_json::{json, Value};

    /// A node on `bus`, with its presence writer running (a refresh every 50 ms).
    fn node(bus: &Arc<MemoryBus>, id: &str) -> Arc<App> {
        let cfg = crate::config::NodeConfig { node_id: Some(id.into()), heartbeat_secs: 0.05, ..Default::default() };
        let app = App::with_backplane(cfg, |_, _, _| Backplane::Memory(MemoryBackplane::attach(bus))).unwrap();
        let sink: Arc<dyn Deliver> = app.clone();
        app.backplane.start(Arc::downgrade(&sink));
        let tasks = app.presence_tasks.lock().unwrap().take().unwrap();
        tokio::spawn(crate::presence_sync::write_forever(app.clone(), tasks.writes));
        tokio::spawn(crate::presence_sync::notify_forever(Arc::downgrade(&app), tasks.events));
        app
    }

    /// The records queued for `conn` until one matches `done` (at most 5 s).
    async fn until(conn: &Connection, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut got = Vec::new();
        for _ in 0..500 {
            got.extend(take(conn));
            if got.iter().any(&done) {
                return got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("not seen in 5 s: {got:?}");
    }

    /// A client on `app` over WebSockets with the JSON protocol, handshaken.
    async fn client(app: &Arc<App>, name: &str, message_ids: bool) -> Arc<Connection> {
        let options = ConnectionOptions { message_ids, ..Default::default() };
        let conn = app.new_connection(name.into(), format!("key-{name}"), options);
        conn.attach(Transport::WebSockets).unwrap();
        on_data(app, &conn, b"{\"protocol\":\"json\",\"version\":1}\x1e").await;
        assert_eq!(take(&conn), [json!({})], "handshake answer");
        conn
    }

    async fn invoke(app: &Arc<App>, conn: &Arc<Connection>, id: &str, target: &str, args: Value) {
        let msg = json!({"type": 1, "invocationId": id, "target": target, "arguments": args});
        on_data(app, conn, format!("{msg}\x1e").as_bytes()).await;
    }

    /// Every record queued for `conn` so far.
    fn take(conn: &Connection) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(Batch::Frames(frames)) = conn.outbox.next_batch(0).now_or_never() {
            for f in frames {
                for r in f.bytes.split(|b| *b == 0x1e).filter(|r| !r.is_empty()) {
                    out.push(serde_json::from_slice(r).unwrap());
                }
            }
        }
        out
    }

    fn events<'a>(records: &'a [Value], target: &str) -> Vec<&'a Value> {
        records.iter().filter(|r| r["type"] == 1 && r["target"] == target).collect()
    }

    #[tokio::test]
    async fn a_message_reaches_every_client_on_every_node_once_and_the_sender_gets_its_completion() {
        let bus = MemoryBus::new(100);
        let (a, b) = (node(&bus, "a"), node(&bus, "b"));
        let (ca, cb) = (client(&a, "ca", false).await, client(&b, "cb", false).await);
        invoke(&a, &ca, "1", "SendMessage", json!(["ann", "hello"])).await;
        let (got_a, got_b) = (take(&ca), take(&cb));
        for got in [&got_a, &got_b] {
            let received = events(got, "ReceiveMessage");
            assert_eq!(received.len(), 1, "{got:?}");
            assert_eq!(received[0]["arguments"], json!(["ann", "hello", "ca", "a"]), "no id unless asked for");
        }
        assert!(got_a.iter().any(|r| r["type"] == 3 && r["invocationId"] == "1"), "{got_a:?}");
    }

    #[tokio::test]
    async fn group_messages_reach_members_only_across_nodes() {
        let bus = MemoryBus::new(100);
        let (a, b) = (node(&bus, "a"), node(&bus, "b"));
        let (member, outsider, sender) =
            (client(&a, "m", false).await, client(&a, "o", false).await, client(&b, "s", false).await);
        invoke(&a, &member, "1", "JoinGroup", json!(["ops"])).await;
        invoke(&b, &sender, "2", "SendMessageToGroup", json!(["ops", "sam", "deploying"])).await;
        let got = take(&member);
        assert_eq!(events(&got, "ReceiveGroupMessage")[0]["arguments"], json!(["ops", "sam", "deploying", "s", "b"]));
        assert!(events(&take(&outsider), "ReceiveGroupMessage").is_empty());
    }

    #[tokio::test]
    async fn resume_replays_exactly_what_was_missed_then_live_messages_follow_once() {
        let bus = MemoryBus::new(100);
        let (a, b) = (node(&bus, "a"), node(&bus, "b"));
        let sender = client(&a, "s", false).await;
        let first = client(&b, "first", true).await;
        invoke(&b, &first, "r0", "Resume", json!(["0-0"])).await;
        for i in 0..3 {
            invoke(&a, &sender, &i.to_string(), "SendMessage", json!(["s", format!("m{i}")])).await;
        }
        let seen = take(&first);
        let ids: Vec<&Value> = events(&seen, "ReceiveMessage").iter().map(|r| &r["arguments"][4]).collect();
        assert_eq!(ids.len(), 3, "{seen:?}");
        // Its node goes away after the first message; it comes back elsewhere.
        let back = client(&a, "back", true).await;
        invoke(&a, &back, "r1", "Resume", json!([ids[0]])).await;
        invoke(&a, &sender, "3", "SendMessage", json!(["s", "m3"])).await;
        let got = take(&back);
        let texts: Vec<&Value> = events(&got, "ReceiveMessage").iter().map(|r| &r["arguments"][1]).collect();
        assert_eq!(texts, [&json!("m1"), &json!("m2"), &json!("m3")], "{got:?}");
        let done = got.iter().find(|r| r["type"] == 3 && r["invocationId"] == "r1").unwrap();
        assert_eq!(done["result"], 2, "how many were replayed");
        // The same from its newest id per scope.
        let again = client(&a, "again", true).await;
        invoke(&a, &again, "r3", "Resume", json!([{"all": ids[0], "groups": {}}])).await;
        let texts: Vec<Value> =
            events(&take(&again), "ReceiveMessage").iter().map(|r| r["arguments"][1].clone()).collect();
        assert_eq!(texts, [json!("m1"), json!("m2"), json!("m3")]);
        // An id newer than anything stored is refused clearly.
        invoke(&a, &back, "r2", "Resume", json!(["9-9"])).await;
        let refused = take(&back);
        assert!(refused[0]["error"].as_str().unwrap().contains("newer than any stored message"), "{refused:?}");
    }

    /// With a stream per group (as on a Redis Cluster) ids repeat across
    /// scopes: Resume takes a position per scope and replays each from its
    /// own, and GetHistory merges the broadcasts and the caller's groups.
    #[tokio::test]
    async fn per_group_resume_replays_each_scope_from_its_own_position() {
        let bus = MemoryBus::per_group(100);
        let (a, b) = (node(&bus, "a"), node(&bus, "b"));
        let sender = client(&a, "s", false).await;
        let first = client(&b, "first", true).await;
        for (i, g) in ["ops", "dev"].iter().enumerate() {
            invoke(&b, &first, &format!("j{i}"), "JoinGroup", json!([g])).await;
        }
        invoke(&b, &first, "r0", "Resume", json!([{"all": "0-0"}])).await;
        let sends = [(None, "m0"), (Some("ops"), "o0"), (Some("dev"), "d0"), (Some("qa"), "q0")];
        let sends = sends.iter().chain(&[(None, "m1"), (Some("ops"), "o1")]);
        for (i, (group, text)) in sends.enumerate() {
            let (target, args) = match group {
                Some(g) => ("SendMessageToGroup", json!([g, "s", text])),
                None => ("SendMessage", json!(["s", text])),
            };
            invoke(&a, &sender, &i.to_string(), target, args).await;
        }
        let seen = take(&first);
        let id_of = |text: &str| {
            let r = seen.iter().find(|r| r["type"] == 1 && r["arguments"].as_array().unwrap().contains(&json!(text)));
            r.unwrap_or_else(|| panic!("{text} not seen: {seen:?}"))["arguments"].as_array().unwrap().last().cloned()
        };
        let (m0, o0, d0) = (id_of("m0").unwrap(), id_of("o0").unwrap(), id_of("d0").unwrap());
        assert_eq!((&m0, &o0, &d0), (&json!("1-1"), &json!("1-1"), &json!("1-1")), "each scope counts its own");
        // Its node goes away after m0, o0 and d0; it comes back on a.
        let back = client(&a, "back", true).await;
        for (i, g) in ["ops", "dev"].iter().enumerate() {
            invoke(&a, &back, &format!("k{i}"), "JoinGroup", json!([g])).await;
        }
        invoke(&a, &back, "r1", "Resume", json!([{"all": m0, "groups": {"ops": o0, "dev": d0}}])).await;
        invoke(&a, &sender, "live", "SendMessageToGroup", json!(["ops", "s", "o2"])).await;
        let got = take(&back);
        let text = |r: &Value| r["arguments"][if r["target"] == "ReceiveGroupMessage" { 2 } else { 1 }].clone();
        let texts: Vec<Value> = got.iter().filter(|r| r["type"] == 1).map(text).collect();
        let texts: Vec<&str> = texts.iter().filter_map(Value::as_str).collect();
        assert!(["m1", "o1", "o2"].iter().all(|t| texts.iter().filter(|x| *x == t).count() == 1), "{got:?}");
        assert!(!texts.iter().any(|t| ["m0", "o0", "d0", "q0"].contains(t)), "nothing seen, nothing of qa: {got:?}");
        let done = got.iter().find(|r| r["type"] == 3 && r["invocationId"] == "r1").unwrap();
        assert_eq!(done["result"], 2, "m1 and o1 replayed: {got:?}");
        // A group it names no position in replays from before the oldest it names.
        let other = client(&a, "other", true).await;
        invoke(&a, &other, "k", "JoinGroup", json!(["dev"])).await;
        invoke(&a, &other, "r2", "Resume", json!([{"all": m0}])).await;
        let got = take(&other);
        assert_eq!(got.iter().find(|r| r["invocationId"] == "r2").unwrap()["result"], 2, "m1 and d0: {got:?}");
        // A group stream with nothing after the id named (it expired, say): nothing to replay.
        invoke(&a, &other, "r4", "Resume", json!([{"all": m0, "groups": {"dev": "9-9"}}])).await;
        let got = take(&other);
        assert_eq!(got.iter().find(|r| r["invocationId"] == "r4").unwrap()["result"], 1, "m1 only: {got:?}");
        // A lone id cannot say which scope it counts in.
        invoke(&a, &other, "r3", "Resume", json!(["1-1"])).await;
        let refused = take(&other);
        assert!(refused[0]["error"].as_str().unwrap().contains("message ids of its own"), "{refused:?}");
        // History: the broadcasts and the caller's groups, not qa's.
        invoke(&a, &back, "h", "GetHistory", json!([50])).await;
        let page = take(&back)[0]["result"].as_array().unwrap().clone();
        let mut texts: Vec<&str> = page.iter().filter_map(|m| m["message"].as_str()).collect();
        texts.sort();
        assert_eq!(texts, ["d0", "m0", "m1", "o0", "o1", "o2"], "{page:?}");
    }

    /// A client on `app` that is `user`'s (auth is off: its SetUser name).
    async fn user_client(app: &Arc<App>, key: &str, user: &str, message_ids: bool) -> Arc<Connection> {
        let conn = client(app, key, message_ids).await;
        invoke(app, &conn, "u", "SetUser", json!([user])).await;
        if message_ids {
            // Live messages are held for such a client until it resumes or reads history.
            invoke(app, &conn, "h0", "GetHistory", json!([0])).await;
        }
        let done = take(&conn);
        assert!(done.iter().any(|r| r["invocationId"] == "u" && r.get("error").is_none()), "{done:?}");
        conn
    }

    #[tokio::test]
    async fn a_direct_message_reaches_both_users_other_connections_on_every_node_and_only_them() {
        let bus = MemoryBus::new(100);
        let (a, b) = (node(&bus, "a"), node(&bus, "b"));
        let ana1 = user_client(&a, "ana1", "ana", true).await;
        let ana2 = user_client(&b, "ana2", "ana", false).await;
        let bob1 = user_client(&a, "bob1", "bob", false).await;
        let bob2 = user_client(&b, "bob2", "bob", true).await;
        let cat = user_client(&b, "cat", "cat", true).await;
        let nobody = client(&a, "nobody", true).await;
        invoke(&a, &ana1, "s", "SendToUser", json!(["bob", "psst"])).await;
        let sent = take(&ana1);
        assert!(sent.iter().any(|r| r["invocationId"] == "s" && r.get("error").is_none()), "{sent:?}");
        assert!(events(&sent, "ReceivePrivateMessage").is_empty(), "the sending connection has its completion");
        let plain = json!(["ana", "psst", "ana1", "a"]);
        for (conn, who) in [(&bob1, "bob1"), (&ana2, "ana2")] {
            let got = take(conn);
            let dms = events(&got, "ReceivePrivateMessage");
            assert_eq!(dms.len(), 1, "{who}: {got:?}");
            assert_eq!(dms[0]["arguments"], plain, "{who}");
        }
        let got = take(&bob2);
        let dm = events(&got, "ReceivePrivateMessage")[0]["arguments"].clone();
        let id = dm[4].clone();
        assert_eq!(dm, json!(["ana", "psst", "ana1", "a", id, "bob"]), "with the id, then the recipient");
        for (conn, who) in [(&cat, "cat"), (&nobody, "nobody")] {
            assert!(events(&take(conn), "ReceivePrivateMessage").is_empty(), "{who} is neither");
        }
        invoke(&a, &ana1, "b", "SendMessage", json!(["ana", "to all"])).await;
        // Resume and GetHistory show it to the two users only.
        let replays = |app: Arc<App>, conn: Arc<Connection>| async move {
            invoke(&app, &conn, "r", "Resume", json!(["0-0"])).await;
            let got = take(&conn);
            let texts: Vec<Value> = got.iter().filter(|r| r["type"] == 1).map(|r| r["arguments"][1].clone()).collect();
            invoke(&app, &conn, "h", "GetHistory", json!([10])).await;
            let page = take(&conn)[0]["result"].as_array().unwrap().clone();
            let history: Vec<Value> = page.iter().map(|m| m["message"].clone()).collect();
            (texts, history, page)
        };
        let bob3 = user_client(&a, "bob3", "bob", true).await;
        let (texts, history, page) = replays(a.clone(), bob3).await;
        assert_eq!((texts, history), (vec![json!("psst"), json!("to all")], vec![json!("psst"), json!("to all")]));
        assert_eq!((&page[0]["user"], &page[0]["to"]), (&json!("ana"), &json!("bob")), "{page:?}");
        let ana3 = user_client(&b, "ana3", "ana", true).await;
        assert_eq!(replays(b.clone(), ana3).await.0, [json!("psst"), json!("to all")], "the sender's other connection");
        for (app, conn) in [(&b, cat), (&a, nobody), (&a, ana1)] {
            let (texts, history, _) = replays(app.clone(), conn).await;
            assert_eq!((texts, history), (vec![json!("to all")], vec![json!("to all")]));
        }
        // A connection that is nobody's address cannot send one.
        let anonymous = client(&b, "anon", false).await;
        invoke(&b, &anonymous, "x", "SendToUser", json!(["bob", "hi"])).await;
        assert!(take(&anonymous)[0]["error"].as_str().unwrap().contains("SetUser"));
        // A rename moves the address: bob2 becomes dan's and no longer gets bob's.
        invoke(&b, &bob2, "n", "SetUser", json!(["dan"])).await;
        take(&bob2);
        let ana4 = user_client(&a, "ana4", "ana", false).await;
        invoke(&a, &ana4, "s2", "SendToUser", json!(["bob", "again"])).await;
        assert_eq!(events(&take(&bob1), "ReceivePrivateMessage").len(), 1);
        assert!(events(&take(&bob2), "ReceivePrivateMessage").is_empty());
    }

    #[tokio::test]
    async fn presence_crosses_nodes_both_ways_and_a_node_that_starts_later_reads_it() {
        let bus = MemoryBus::new(100);
        let (a, b) = (node(&bus, "a"), node(&bus, "b"));
        let watcher = client(&b, "w", false).await;
        invoke(&b, &watcher, "1", "GetOnlineUsers", json!([])).await;
        let answer = until(&watcher, |r| r["invocationId"] == "1").await;
        assert_eq!(answer.iter().find(|r| r["invocationId"] == "1").unwrap()["result"], json!([]));
        let ann = client(&a, "ann", false).await;
        invoke(&a, &ann, "2", "SetUser", json!(["ann"])).await;
        let joined = until(&watcher, |r| r["target"] == "UserJoined").await;
        let name = events(&joined, "UserJoined")[0]["arguments"][0].clone();
        assert!(name.as_str().unwrap().contains("ann"), "{joined:?}");
        // A node started now hears of ann from its first refresh, not from
        // a change it was not there for.
        let c = node(&bus, "c");
        let late = client(&c, "late", false).await;
        let mut online = json!([]);
        for _ in 0..100 {
            invoke(&c, &late, "3", "GetOnlineUsers", json!([])).await;
            let got = until(&late, |r| r["invocationId"] == "3").await;
            online = got.iter().find(|r| r["invocationId"] == "3").unwrap()["result"].clone();
            if online != json!([]) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(online, json!([name]));
        // Ann's last connection goes: every other node hears she left.
        a.disconnect(&ann);
        for (conn, who) in [(&watcher, "b"), (&late, "c")] {
            let left = until(conn, |r| r["target"] == "UserLeft").await;
            assert_eq!(events(&left, "UserLeft")[0]["arguments"], json!([name]), "on {who}");
        }
    }

    #[tokio::test]
    async fn history_is_oldest_first_with_ids_and_trimmed_to_its_length() {
        let bus = MemoryBus::new(2);
        let a = node(&bus, "a");
        let c = client(&a, "c", false).await;
        for i in 0..3 {
            invoke(&a, &c, &i.to_string(), "SendMessage", json!(["c", format!("m{i}")])).await;
        }
        take(&c);
        invoke(&a, &c, "h", "GetHistory", json!([10])).await;
        let got = take(&c);
        let page = got[0]["result"].as_array().unwrap();
        let texts: Vec<&Value> = page.iter().map(|m| &m["message"]).collect();
        assert_eq!(texts, [&json!("m1"), &json!("m2")]);
        assert!(page.iter().all(|m| m["id"].is_string() && m.get("uid").is_none()), "{page:?}");
    }
}
