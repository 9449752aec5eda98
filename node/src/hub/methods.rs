//! The chat hub's methods, as one table (`METHODS`): each entry is the name
//! clients invoke (matched case-insensitively, as in ASP.NET Core), and a
//! handler that receives its arguments already bound to Rust types (`Args`),
//! with the official server's errors for a wrong count or type. The table is
//! also the bounded label set of the invocation metrics, so a method cannot
//! be served without being counted under its name, and the docs point here.

use crate::app::App;
use crate::config::AuthMode;
use crate::connection::Connection;
use crate::groups;
use crate::history::ChatMessage;
use crate::protocol::HubMessage;
use crate::replay;
use crate::user_name;
use futures_util::future::BoxFuture;
use serde_json::Value;
use std::sync::Arc;

/// How an invocation is answered, when the client gave it an id.
pub(super) enum Answer {
    /// A Completion without a result.
    Empty,
    /// A Completion with this result.
    With(Value),
    /// The method queued its Completion itself.
    Queued,
}

type Outcome = Result<Answer, String>;

/// A handler as the table holds it: the invocation's arguments still unbound.
type Run = for<'a> fn(&'a Arc<App>, &'a Arc<Connection>, Option<&'a str>, Vec<Value>) -> BoxFuture<'a, Outcome>;

/// One hub method: its name and its handler (arguments unbound; see `method!`).
pub(super) struct Method {
    pub name: &'static str,
    pub run: Run,
}

/// A table entry for `handler`, whose last parameter is its bound arguments.
macro_rules! method {
    ($name:literal, $handler:ident) => {
        Method {
            name: $name,
            run: |app, conn, invocation_id, args| {
                Box::pin(async move { $handler(app, conn, invocation_id, Args::bind(args)?).await })
            },
        }
    };
}

/// Every method the chat hub serves.
pub(super) const METHODS: &[Method] = &[
    method!("SendMessage", send_message),
    method!("GetNodeInfo", get_node_info),
    method!("JoinGroup", join_group),
    method!("LeaveGroup", leave_group),
    method!("SendMessageToGroup", send_message_to_group),
    method!("SendToUser", send_to_user),
    method!("GetHistory", get_history),
    method!("Echo", echo),
    method!("Resume", resume),
    method!("SetUser", set_user),
    method!("GetOnlineUsers", get_online_users),
];

/// The method a client's `target` names, if any.
pub(super) fn find(target: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.name.eq_ignore_ascii_case(target))
}

/// A method's arguments, bound from the invocation's as the official server
/// binds them: the count first, then each one's type.
pub(super) trait Args: Sized {
    fn bind(args: Vec<Value>) -> Result<Self, String>;
}

fn arity<const N: usize>(args: Vec<Value>) -> Result<[Value; N], String> {
    let n = args.len();
    args.try_into()
        .map_err(|_| format!("InvalidDataException: Invocation provides {n} argument(s) but target expects {N}."))
}

fn string(v: Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s),
        _ => Err(crate::protocol::BINDING_ERROR.into()),
    }
}

impl Args for () {
    fn bind(args: Vec<Value>) -> Result<Self, String> {
        arity::<0>(args).map(|_| ())
    }
}

/// One argument of any JSON type, checked by the method itself.
impl Args for Value {
    fn bind(args: Vec<Value>) -> Result<Self, String> {
        arity::<1>(args).map(|[v]| v)
    }
}

impl Args for String {
    fn bind(args: Vec<Value>) -> Result<Self, String> {
        arity::<1>(args).and_then(|[a]| string(a))
    }
}

impl Args for (String, String) {
    fn bind(args: Vec<Value>) -> Result<Self, String> {
        let [a, b] = arity::<2>(args)?;
        Ok((string(a)?, string(b)?))
    }
}

impl Args for (String, String, String) {
    fn bind(args: Vec<Value>) -> Result<Self, String> {
        let [a, b, c] = arity::<3>(args)?;
        Ok((string(a)?, string(b)?, string(c)?))
    }
}

/// A new chat message from `conn`, with its uid chosen before any attempt to
/// store it. A signed-in connection speaks as its token's user, whatever
/// `user` the client passed; an anonymous one by the name it gives, checked
/// and marked as anonymous where signed-in users may be about (`user_name`).
fn chat_message(
    app: &App,
    conn: &Connection,
    group: Option<String>,
    user: String,
    message: String,
) -> Result<ChatMessage, String> {
    let user = match conn.user() {
        Some(signed_in) => signed_in.to_string(),
        None => anonymous_name(app, &user)?,
    };
    Ok(ChatMessage {
        id: None,
        uid: format!("{:032x}", rand::random::<u128>()),
        group,
        user,
        message,
        connection_id: conn.connection_id.clone(),
        node_id: app.node_id.clone(),
        timestamp: switchboard_common::registry::rfc3339(chrono::Utc::now()),
        ..Default::default()
    })
}

/// The name an anonymous client goes by, as others are shown it.
fn anonymous_name(app: &App, given: &str) -> Result<String, String> {
    let name = user_name::validate(given).map_err(|e| format!("HubException: {e}."))?;
    Ok(user_name::shown_anonymous(name, app.auth.mode != AuthMode::Off))
}

/// `SendMessage(user, message)`: to everyone, on every node.
async fn send_message(app: &Arc<App>, conn: &Arc<Connection>, _: Option<&str>, args: (String, String)) -> Outcome {
    let (user, message) = args;
    app.backplane.send(chat_message(app, conn, None, user, message)?);
    Ok(Answer::Empty)
}

/// `GetNodeInfo()`: the caller gets `NodeInfo(nodeId, connectionId)`.
async fn get_node_info(app: &Arc<App>, conn: &Arc<Connection>, _: Option<&str>, (): ()) -> Outcome {
    let info = vec![Value::String(app.node_id.clone()), Value::String(conn.connection_id.clone())];
    app.reply(conn, HubMessage::event("NodeInfo", info));
    Ok(Answer::Empty)
}

/// `JoinGroup(group)`: completes once the group's messages reach this node.
async fn join_group(app: &Arc<App>, conn: &Arc<Connection>, _: Option<&str>, group: String) -> Outcome {
    app.join_group(conn, &group).await.map_err(|e| format!("HubException: {e}"))?;
    Ok(Answer::Empty)
}

/// `LeaveGroup(group)`.
async fn leave_group(app: &Arc<App>, conn: &Arc<Connection>, _: Option<&str>, group: String) -> Outcome {
    app.leave_group(conn, &group);
    Ok(Answer::Empty)
}

/// `SendMessageToGroup(group, user, message)`: to the group's members on every node.
async fn send_message_to_group(
    app: &Arc<App>,
    conn: &Arc<Connection>,
    _: Option<&str>,
    args: (String, String, String),
) -> Outcome {
    let (group, user, message) = args;
    groups::validate_name(&group).map_err(|e| format!("HubException: {e}"))?;
    app.backplane.send(chat_message(app, conn, Some(group), user, message)?);
    Ok(Answer::Empty)
}

/// `SendToUser(user, message)`: a direct message to every connection of
/// `user` and to the sender's other connections, on every node. Only a
/// connection that is a user's address may send one (signed in, or with
/// auth off after `SetUser`), and it speaks as that user.
async fn send_to_user(app: &Arc<App>, conn: &Arc<Connection>, _: Option<&str>, args: (String, String)) -> Outcome {
    let (to, message) = args;
    let Some(from) = app.user_of(conn) else {
        return Err(if app.auth.mode == AuthMode::Off {
            "HubException: say who you are first (SetUser): direct messages go from one user to another.".into()
        } else {
            "HubException: sign in first: direct messages go from one signed-in user to another.".into()
        });
    };
    let to = user_name::validate(&to).map_err(|e| format!("HubException: {e}."))?.to_string();
    let mut m = chat_message(app, conn, None, from.clone(), message)?;
    m.user = from;
    m.to = Some(to);
    app.backplane.send(m);
    Ok(Answer::Empty)
}

/// `GetHistory(count)`: the newest stored messages, oldest first.
async fn get_history(app: &Arc<App>, conn: &Arc<Connection>, _: Option<&str>, count: Value) -> Outcome {
    let count = count
        .as_u64()
        .ok_or("InvalidDataException: Error binding arguments. 'count' must be a non-negative integer.")?;
    let count = count.min(app.cfg.history_len as u64) as usize;
    // The newest entries that fit in half the connection's byte
    // budget: a page, so one call cannot make the node hold more.
    let page = replay::history_page(app, conn, count, app.cfg.max_buffered_bytes / 2).await?;
    // A client that reads history instead of resuming gets live messages now.
    if conn.message_ids() && conn.is_holding() {
        app.release_held(conn, &[]);
    }
    Ok(Answer::With(Value::Array(page)))
}

/// `Echo(payload)`: the payload back, unchanged (used by benchmarks).
async fn echo(_: &Arc<App>, _: &Arc<Connection>, _: Option<&str>, payload: Value) -> Outcome {
    Ok(Answer::With(payload))
}

/// `Resume(position)`: replays, as ordinary events in id order, every stored
/// message after the position this connection would have received; the
/// hub's loop runs it and queues its Completion (see `replay`).
async fn resume(app: &Arc<App>, conn: &Arc<Connection>, invocation_id: Option<&str>, position: Value) -> Outcome {
    let positions = replay::resume_position(position, app.backplane.per_group())?;
    replay::start_resume(app, conn, invocation_id, positions).await.map(|()| Answer::Queued)
}

/// `SetUser(name)`: an anonymous connection's name (a signed-in one keeps its token's).
async fn set_user(app: &Arc<App>, conn: &Arc<Connection>, _: Option<&str>, user: String) -> Outcome {
    let name = user_name::validate(&user).map_err(|e| format!("HubException: {e}."))?;
    match conn.user() {
        Some(signed_in) if signed_in != name => {
            Err(format!("HubException: signed in as '{signed_in}': the name comes from the sign-in token."))
        }
        Some(_) => Ok(Answer::Empty),
        None => {
            // Each rename is two presence events for every watcher
            // in the cluster: a connection may rename only so often.
            if !conn.may_rename() {
                return Err("HubException: renaming too often; try again in a moment.".into());
            }
            // With auth off the name is the connection's address too: its
            // direct messages reach this node once this completes.
            app.become_user(conn, &anonymous_name(app, name)?).await;
            Ok(Answer::Empty)
        }
    }
}

/// `GetOnlineUsers()`: who is online across the cluster; `UserJoined` and
/// `UserLeft` events follow every later change.
async fn get_online_users(app: &Arc<App>, conn: &Arc<Connection>, invocation_id: Option<&str>, (): ()) -> Outcome {
    // Answered under the lock presence events are queued under, so
    // each change is either in the answer or queued after it. A
    // reply is never refused for a full outbox, so queuing it never
    // closes the connection (which would take that lock again).
    app.presence.watch(Arc::downgrade(conn), |users| {
        if let Some(id) = invocation_id {
            let users = Value::Array(users.into_iter().map(Value::String).collect());
            app.reply(conn, HubMessage::Completion { invocation_id: id.to_string(), result: Some(users), error: None });
        }
    });
    Ok(Answer::Queued)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_are_unique_and_found_whatever_their_case() {
        let names: std::collections::HashSet<String> = METHODS.iter().map(|m| m.name.to_lowercase()).collect();
        assert_eq!(names.len(), METHODS.len());
        assert_eq!(find("sendmessagetogroup").map(|m| m.name), Some("SendMessageToGroup"));
        assert!(find("Nope").is_none());
    }

    #[test]
    fn arguments_bind_with_the_official_servers_errors() {
        let count = <(String, String)>::bind(vec![json!("a")]).unwrap_err();
        assert_eq!(count, "InvalidDataException: Invocation provides 1 argument(s) but target expects 2.");
        let kind = <(String, String)>::bind(vec![json!("a"), json!(5)]).unwrap_err();
        assert!(kind.starts_with("InvalidDataException: Error binding arguments."), "{kind}");
        assert_eq!(<(String, String, String)>::bind(vec![json!("g"), json!("u"), json!("m")]).unwrap().2, "m");
        assert!(<()>::bind(vec![json!(1)]).unwrap_err().contains("expects 0"));
        assert_eq!(Value::bind(vec![json!({"any": 1})]).unwrap(), json!({"any": 1}));
        assert!(String::bind(vec![json!(null)]).is_err());
    }
}
