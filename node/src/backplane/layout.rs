//! Where the node's shared state lives in Redis: the one place that knows
//! its key and channel names, all under the configured prefix
//! (`switchboard` by default).
//!
//! ```text
//! {prefix}:history            stream: every chat message, capped; its entry ids are the message ids
//! {prefix}:stored:{uid}       a stored message's id, for a retried store (expires)
//! {prefix}:bp:all             channel: broadcasts, `<id> <json>`
//! {prefix}:bp:group:{name}    channel per group, subscribed while this node has members
//! {prefix}:presence           sorted set: `{node}\n{user}` scored by expiry (Unix ms)
//! {prefix}:presence:changes   channel: presence changes, JSON `{"node","user","online"}`
//! {prefix}:bp:echo:{tag}      channel: a subscriber's own liveness probe (on a Redis Cluster)
//! ```
//!
//! On a Redis Cluster the prefix is a hash tag (`{switchboard}`), so all of
//! these are on one slot, and the channels are shard channels
//! (`SPUBLISH`/`SSUBSCRIBE`) that only the slot's master carries.
//!
//! The registry's keys (`{prefix}:nodes:{id}`, `{prefix}:registry`), which
//! the balancer reads too, are in `switchboard_common::registry`.

/// The names for one prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
    history: String,
    all: String,
    group_prefix: String,
    presence: String,
    presence_changes: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        Layout {
            prefix: prefix.to_string(),
            history: format!("{prefix}:history"),
            all: format!("{prefix}:bp:all"),
            group_prefix: format!("{prefix}:bp:group:"),
            presence: format!("{prefix}:presence"),
            presence_changes: format!("{prefix}:presence:changes"),
        }
    }

    /// The history stream.
    pub fn history(&self) -> &str {
        &self.history
    }

    /// The marker a stored message's uid leaves (see `history::store_and_publish`).
    pub fn stored_marker(&self, uid: &str) -> String {
        format!("{}:stored:{uid}", self.prefix)
    }

    /// The broadcast channel.
    pub fn all_channel(&self) -> &str {
        &self.all
    }

    /// A group's channel.
    pub fn group_channel(&self, group: &str) -> String {
        format!("{}{group}", self.group_prefix)
    }

    /// The group a channel carries, if it is a group channel.
    pub fn group_of<'c>(&self, channel: &'c str) -> Option<&'c str> {
        channel.strip_prefix(self.group_prefix.as_str())
    }

    /// A subscriber's own channel, on which it hears its liveness probes.
    pub fn echo_channel(&self, tag: &str) -> String {
        format!("{}:bp:echo:{tag}", self.prefix)
    }

    /// The presence sorted set.
    pub fn presence(&self) -> &str {
        &self.presence
    }

    /// The channel presence changes are published on.
    pub fn presence_changes(&self) -> &str {
        &self.presence_changes
    }
}

/// The presence set's member for `user` on `node`.
pub fn presence_member(node: &str, user: &str) -> String {
    format!("{node}\n{user}")
}

/// (node, user) from a presence set member.
pub fn parse_presence_member(m: &str) -> Option<(&str, &str)> {
    m.split_once('\n').filter(|(n, u)| !n.is_empty() && !u.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_under_the_prefix() {
        let l = Layout::new("sb");
        assert_eq!(l.history(), "sb:history");
        assert_eq!(l.stored_marker("u1"), "sb:stored:u1");
        assert_eq!(l.all_channel(), "sb:bp:all");
        assert_eq!(l.group_channel("ops"), "sb:bp:group:ops");
        assert_eq!(l.group_of("sb:bp:group:ops"), Some("ops"));
        assert_eq!(l.group_of("sb:bp:all"), None);
        assert_eq!((l.presence(), l.presence_changes()), ("sb:presence", "sb:presence:changes"));
        assert_eq!(l.echo_channel("7"), "sb:bp:echo:7");
    }

    #[test]
    fn presence_members_round_trip_and_are_checked() {
        assert_eq!(parse_presence_member(&presence_member("n1", "ann b")), Some(("n1", "ann b")));
        assert_eq!(parse_presence_member("garbage"), None);
        assert_eq!(parse_presence_member("\nann"), None);
    }
}
