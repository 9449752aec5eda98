//! Commands the server API (`api`) gives connections and users wherever
//! they are in the cluster: put a connection in a group or take it out,
//! close it, ask whether it exists; the same for every connection of a user.
//! A command about a connection goes to the node its id names (ids carry
//! their node, see `switchboard_common::token`), which answers whether it
//! found it; a command about a user goes over the user's channel to every
//! node that holds one of the user's connections (see `backplane`). `apply`
//! carries a command out on this node's connections.

use crate::app::App;
use crate::connection::Connection;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Command {
    JoinGroup { connection: String, group: String },
    LeaveGroup { connection: String, group: String },
    LeaveAllGroups { connection: String },
    Close { connection: String, reason: Option<String> },
    Exists { connection: String },
    UserJoinGroup { user: String, group: String },
    UserLeaveGroups { user: String, groups: Vec<String> },
    CloseUser { user: String, reason: Option<String> },
    CloseGroup { group: String, reason: Option<String>, excluded: Vec<String> },
    CloseAll { reason: Option<String>, excluded: Vec<String> },
}

/// Where a command goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Target<'a> {
    Connection(&'a str),
    User(&'a str),
    /// Every node with a member of the group.
    Group(&'a str),
    /// Every node.
    All,
}

impl Command {
    pub fn target(&self) -> Target<'_> {
        match self {
            Command::JoinGroup { connection, .. }
            | Command::LeaveGroup { connection, .. }
            | Command::LeaveAllGroups { connection }
            | Command::Close { connection, .. }
            | Command::Exists { connection } => Target::Connection(connection),
            Command::UserJoinGroup { user, .. }
            | Command::UserLeaveGroups { user, .. }
            | Command::CloseUser { user, .. } => Target::User(user),
            Command::CloseGroup { group, .. } => Target::Group(group),
            Command::CloseAll { .. } => Target::All,
        }
    }
}

/// A command as it crosses the backplane, with where to answer: the asking
/// node and its request's number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub command: Command,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub node: String,
    pub request: u64,
}

/// The text a connection closed by the server API gets in its `Close`.
fn close_error(reason: Option<&str>) -> String {
    match reason.map(str::trim).filter(|r| !r.is_empty()) {
        Some(r) => format!("Connection closed by the application: {}", r.chars().take(512).collect::<String>()),
        None => "Connection closed by the application.".into(),
    }
}

/// Carries `command` out on this node's connections; for a command about a
/// connection, whether this node has it.
pub async fn apply(app: &Arc<App>, command: &Command) -> bool {
    match command {
        Command::JoinGroup { connection, group } => match app.connections.by_id(connection) {
            Some(c) => {
                if let Err(e) = app.join_group(&c, group).await {
                    tracing::info!(connection = %c.connection_id, error = %e, "server API could not add a connection to a group");
                }
                true
            }
            None => false,
        },
        Command::LeaveGroup { connection, group } => {
            app.connections.by_id(connection).inspect(|c| app.leave_group(c, group)).is_some()
        }
        Command::LeaveAllGroups { connection } => app
            .connections
            .by_id(connection)
            .inspect(|c| {
                for group in app.groups.of_connection(&c.key) {
                    app.leave_group(c, &group);
                }
            })
            .is_some(),
        Command::Close { connection, reason } => app
            .connections
            .by_id(connection)
            .inspect(|c| app.close(c, Some(close_error(reason.as_deref())), false))
            .is_some(),
        Command::Exists { connection } => app.connections.by_id(connection).is_some_and(|c| !c.is_removed()),
        Command::UserJoinGroup { user, group } => {
            for c in user_connections(app, user) {
                if let Err(e) = app.join_group(&c, group).await {
                    tracing::info!(connection = %c.connection_id, error = %e, "could not add a user's connection to a group");
                }
            }
            true
        }
        Command::UserLeaveGroups { user, groups } => {
            for c in user_connections(app, user) {
                for group in groups {
                    app.leave_group(&c, group);
                }
            }
            true
        }
        Command::CloseUser { user, reason } => {
            for c in user_connections(app, user) {
                app.close(&c, Some(close_error(reason.as_deref())), false);
            }
            true
        }
        Command::CloseGroup { group, reason, excluded } => {
            let members = app.groups.members(group).into_iter().filter_map(|k| app.connections.get(&k));
            for c in members.filter(|c| !excluded.contains(&c.connection_id)) {
                app.close(&c, Some(close_error(reason.as_deref())), false);
            }
            true
        }
        Command::CloseAll { reason, excluded } => {
            for c in app.connections.all().into_iter().filter(|c| !excluded.contains(&c.connection_id)) {
                app.close(&c, Some(close_error(reason.as_deref())), false);
            }
            true
        }
    }
}

fn user_connections(app: &App, user: &str) -> Vec<Arc<Connection>> {
    app.users.connections(user).into_iter().filter_map(|k| app.connections.get(&k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_name_their_target() {
        let e = Envelope {
            command: Command::Close { connection: "bm9kZQ.x".into(), reason: Some("bye".into()) },
            reply: Some(Reply { node: "n1".into(), request: 7 }),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"command":{"op":"close","connection":"bm9kZQ.x","reason":"bye"},"reply":{"node":"n1","request":7}}"#
        );
        assert_eq!(serde_json::from_str::<Envelope>(&text).unwrap(), e);
        let user = Command::UserLeaveGroups { user: "ana".into(), groups: vec!["g".into()] };
        assert_eq!(user.target(), Target::User("ana"));
        assert!(serde_json::from_str::<Envelope>(r#"{"command":{"op":"format"}}"#).is_err());
    }

    #[test]
    fn a_close_reason_is_trimmed_and_bounded() {
        assert_eq!(close_error(None), "Connection closed by the application.");
        assert_eq!(close_error(Some("  ")), "Connection closed by the application.");
        assert_eq!(close_error(Some("maintenance")), "Connection closed by the application: maintenance");
        assert_eq!(close_error(Some(&"x".repeat(2000))).len(), "Connection closed by the application: ".len() + 512);
    }
}
