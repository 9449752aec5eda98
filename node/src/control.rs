//! What arrives from the backplane, handed to this node (`Deliver` for
//! `App`): chat and server API messages to deliver, other nodes' presence
//! changes, and the server API's commands (see `command`): put a connection
//! in a group or take it out, close it, ask whether it exists; the same for
//! every connection of a user, a group or everyone. A command about a
//! connection reaches the node its id names (ids carry their node, see
//! `switchboard_common::token`), which answers whether it found it; one
//! about a user, a group or everyone reaches every node that holds one of
//! theirs. `apply` carries a command out on this node's connections; the
//! API calls it directly for a connection of its own node.

use crate::app::App;
use crate::backplane::{Deliver, PresenceChange};
use crate::command::Command;
use crate::connection::Connection;
use crate::history::ChatMessage;
use futures_util::future::BoxFuture;
use std::sync::Arc;

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

impl Deliver for App {
    fn control(self: Arc<Self>, command: Command) -> BoxFuture<'static, bool> {
        Box::pin(async move { apply(&self, &command).await })
    }

    fn deliver(&self, message: &ChatMessage) {
        self.deliver_chat(message);
    }

    fn local_groups(&self) -> Vec<String> {
        self.groups.groups()
    }

    fn local_users(&self) -> Vec<String> {
        self.users.users()
    }

    fn presence(&self, change: &PresenceChange) {
        if crate::user_name::validate_shown(&change.user).is_ok() && !change.node.is_empty() {
            self.presence.apply_remote(&change.node, &change.user, change.online)
        } else {
            self.metrics.backplane().invalid.inc();
            tracing::warn!("ignoring a presence change with an invalid name");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_reason_is_trimmed_and_bounded() {
        assert_eq!(close_error(None), "Connection closed by the application.");
        assert_eq!(close_error(Some("  ")), "Connection closed by the application.");
        assert_eq!(close_error(Some("maintenance")), "Connection closed by the application: maintenance");
        assert_eq!(close_error(Some(&"x".repeat(2000))).len(), "Connection closed by the application: ".len() + 512);
    }
}
