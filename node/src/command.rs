//! What the server API asks of connections and users wherever they are in
//! the cluster (see `control`, which carries it out, and `api`, which asks):
//! the commands, where each goes, and the envelope one crosses the
//! backplane in, with where to answer.

use serde::{Deserialize, Serialize};

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
}
