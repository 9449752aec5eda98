//! Where the node's shared state lives in Redis: the one place that knows
//! its key and channel names, all under the configured prefix
//! (`switchboard` by default).
//!
//! On one Redis (or Sentinel's master) history is one stream and every chat
//! message's id comes from it:
//!
//! ```text
//! {prefix}:history            stream: every chat message, capped; its entry ids are the message ids
//! {prefix}:stored:{uid}       a stored message's id, for a retried store (expires)
//! {prefix}:bp:all             channel: broadcasts, `<id> <json>`
//! {prefix}:bp:group:{name}    channel per group, subscribed while this node has members
//! {prefix}:bp:user:{name}     channel per user, subscribed while this node has one of its connections
//! {prefix}:bp:node:{id}       channel per node: server API messages to one of its connections, commands, answers
//! {prefix}:ugroups:{user}     sorted set: the groups the server API put a user in, scored by expiry (Unix ms)
//! {prefix}:presence           sorted set: `{node}\n{user}` scored by expiry (Unix ms)
//! {prefix}:presence:changes   channel: presence changes, JSON `{"node","user","online"}`
//! ```
//!
//! On a Redis Cluster (`per_group`) each group is a scope of its own, on
//! the slot of its name, and the broadcast scope (with presence) on the
//! prefix's slot; the channels are shard channels (`SPUBLISH`/`SSUBSCRIBE`)
//! that only the slot's master carries, so a group's traffic loads one
//! shard and only the nodes with members. The store-and-publish script
//! touches a scope's stream, its uid markers and its channel, so each
//! scope's three share a hash tag; a message's id is its scope's stream id.
//!
//! ```text
//! {prefix}:history, {prefix}:stored:{uid}, {prefix}:bp:all, {prefix}:presence…   slot of the prefix
//! prefix:g:{#name}:history    stream: the group's messages
//! prefix:g:{#name}:stored:{uid}
//! prefix:g:{#name}:bp         shard channel: the group's messages
//! <channel>:echo:{tag}        shard channel: a subscriber's liveness probe, one per master it listens to
//! ```
//!
//! A direct message (`SendToUser`) is stored in the broadcast scope, so its
//! id is in the order every client resumes from and a replay needs no scope
//! per user or per pair; it is published on its sender's and its
//! recipient's user channels only, so only nodes where one of the two is
//! connected receive it. On a Redis Cluster the user channels are shard
//! channels on the prefix's slot, beside the broadcast stream the script
//! writes (a script's keys and shard channels must share a slot): direct
//! messages load that one master, as broadcasts do.
//!
//! (A configured prefix that holds a hash tag of its own keeps every name on
//! that one slot, groups included.)
//!
//! The registry's keys (`{prefix}:nodes:{id}`, `{prefix}:registry`), which
//! the balancer reads too, are in `switchboard_common::registry`.

/// The names for one prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
    /// Groups are scopes of their own (on a Redis Cluster).
    per_group: bool,
    /// What group names go under when `per_group`: the prefix without the
    /// braces that made it a hash tag.
    group_base: String,
    history: String,
    all: String,
    group_prefix: String,
    user_prefix: String,
    node_prefix: String,
    presence: String,
    presence_changes: String,
}

impl Layout {
    /// `prefix` as written in Redis (in a cluster, `{switchboard}`).
    pub fn new(prefix: &str, per_group: bool) -> Self {
        let bare = prefix.strip_prefix('{').and_then(|p| p.strip_suffix('}')).filter(|p| !p.contains(['{', '}']));
        let group_base = bare.unwrap_or(prefix).to_string();
        Layout {
            prefix: prefix.to_string(),
            per_group,
            group_prefix: if per_group { format!("{group_base}:g:{{#") } else { format!("{prefix}:bp:group:") },
            group_base,
            history: format!("{prefix}:history"),
            all: format!("{prefix}:bp:all"),
            user_prefix: format!("{prefix}:bp:user:"),
            node_prefix: format!("{prefix}:bp:node:"),
            presence: format!("{prefix}:presence"),
            presence_changes: format!("{prefix}:presence:changes"),
        }
    }

    /// Whether each group is a scope with its own stream and ids.
    pub fn per_group(&self) -> bool {
        self.per_group
    }

    /// The scope a message to `group` (`None`: everyone) is stored in:
    /// `None` for the broadcast (or only) stream, the group on `per_group`.
    pub fn scope_of<'g>(&self, group: Option<&'g str>) -> Option<&'g str> {
        group.filter(|_| self.per_group)
    }

    /// A group scope's names start with this. The `#` keeps the hash tag
    /// from being empty (a name starting with `}`), which would hash the
    /// whole name instead and split the scope over slots.
    fn group_root(&self, group: &str) -> String {
        format!("{}:g:{{#{group}}}", self.group_base)
    }

    /// A scope's history stream.
    pub fn history(&self, scope: Option<&str>) -> std::borrow::Cow<'_, str> {
        match scope {
            Some(g) if self.per_group => format!("{}:history", self.group_root(g)).into(),
            _ => self.history.as_str().into(),
        }
    }

    /// The marker a stored message's uid leaves in its scope (see `history::store_and_publish`).
    pub fn stored_marker(&self, scope: Option<&str>, uid: &str) -> String {
        match scope {
            Some(g) if self.per_group => format!("{}:stored:{uid}", self.group_root(g)),
            _ => format!("{}:stored:{uid}", self.prefix),
        }
    }

    /// The broadcast channel.
    pub fn all_channel(&self) -> &str {
        &self.all
    }

    /// A group's channel.
    pub fn group_channel(&self, group: &str) -> String {
        if self.per_group {
            format!("{}:bp", self.group_root(group))
        } else {
            format!("{}{group}", self.group_prefix)
        }
    }

    /// The group a channel carries, if it is a group channel.
    pub fn group_of<'c>(&self, channel: &'c str) -> Option<&'c str> {
        let rest = channel.strip_prefix(self.group_prefix.as_str())?;
        if self.per_group {
            rest.strip_suffix("}:bp")
        } else {
            Some(rest)
        }
    }

    /// A user's channel (its direct messages, sent and received).
    pub fn user_channel(&self, user: &str) -> String {
        format!("{}{user}", self.user_prefix)
    }

    /// The user a channel carries, if it is a user channel.
    pub fn user_of<'c>(&self, channel: &'c str) -> Option<&'c str> {
        channel.strip_prefix(self.user_prefix.as_str())
    }

    /// A node's own channel: server API messages to one of its connections
    /// (stored, so on the broadcasts' slot), and commands and their answers.
    pub fn node_channel(&self, node: &str) -> String {
        format!("{}{node}", self.node_prefix)
    }

    /// Whether `channel` is a node's channel.
    pub fn is_node_channel(&self, channel: &str) -> bool {
        channel.starts_with(self.node_prefix.as_str())
    }

    /// The sorted set of the groups the server API put `user` in.
    pub fn user_groups(&self, user: &str) -> String {
        format!("{}:ugroups:{user}", self.prefix)
    }

    /// A probe channel on the same slot as `channel`, for the subscriber
    /// whose tag is `tag`.
    pub fn echo_channel(channel: &str, tag: &str) -> String {
        format!("{channel}:echo:{tag}")
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
        let l = Layout::new("sb", false);
        assert_eq!(l.history(None), "sb:history");
        assert_eq!(l.history(Some("ops")), "sb:history", "one stream for all");
        assert_eq!(l.scope_of(Some("ops")), None);
        assert_eq!(l.stored_marker(None, "u1"), "sb:stored:u1");
        assert_eq!(l.all_channel(), "sb:bp:all");
        assert_eq!(l.group_channel("ops"), "sb:bp:group:ops");
        assert_eq!(l.group_of("sb:bp:group:ops"), Some("ops"));
        assert_eq!(l.group_of("sb:bp:all"), None);
        assert_eq!(l.user_channel("ann b"), "sb:bp:user:ann b");
        assert_eq!(l.user_of("sb:bp:user:ann b"), Some("ann b"));
        assert_eq!(l.node_channel("n1"), "sb:bp:node:n1");
        assert!(l.is_node_channel("sb:bp:node:n1") && !l.is_node_channel("sb:bp:user:n1"));
        assert_eq!(l.user_groups("ana"), "sb:ugroups:ana");
        assert_eq!((l.user_of("sb:bp:all"), l.group_of(&l.user_channel("x"))), (None, None));
        assert_eq!((l.presence(), l.presence_changes()), ("sb:presence", "sb:presence:changes"));
        assert_eq!(Layout::echo_channel("sb:bp:all", "7"), "sb:bp:all:echo:7");
    }

    /// The slot Redis Cluster puts a name on: its hash tag's, when it has one.
    fn tag(name: &str) -> &str {
        match name.find('{').and_then(|o| name[o + 1..].find('}').map(|c| (o, c))) {
            Some((o, c)) if c > 0 => &name[o + 1..o + 1 + c],
            _ => name,
        }
    }

    #[test]
    fn per_group_a_groups_names_share_its_own_slot_and_broadcasts_the_prefixs() {
        let l = Layout::new("{sb}", true);
        assert_eq!(l.scope_of(Some("ops")), Some("ops"));
        assert_eq!(l.scope_of(None), None);
        assert_eq!(l.history(Some("ops")), "sb:g:{#ops}:history");
        assert_eq!(l.group_channel("ops"), "sb:g:{#ops}:bp");
        assert_eq!(l.group_of("sb:g:{#ops}:bp"), Some("ops"));
        assert_eq!(l.group_of(l.all_channel()), None);
        // A name with braces of its own still keeps its names together.
        for g in ["ops", "a}b", "{x}", "}", "a b"] {
            let names = [l.history(Some(g)).to_string(), l.stored_marker(Some(g), "u"), l.group_channel(g)];
            let probe = Layout::echo_channel(&names[2], "t");
            assert!(names.iter().chain([&probe]).all(|n| tag(n) == tag(&names[0])), "{g}: {names:?}");
            assert_eq!(l.group_of(&l.group_channel(g)), Some(g));
        }
        for name in [
            l.history(None).to_string(),
            l.stored_marker(None, "u"),
            l.all_channel().into(),
            l.presence().into(),
            l.user_channel("a}b{c}"),
            l.node_channel("n1"),
            l.user_groups("a{b}"),
        ] {
            assert_eq!(tag(&name), "sb", "{name}");
        }
        // A prefix with a tag of its own: everything on that slot.
        let tagged = Layout::new("app{x}", true);
        assert_eq!(tag(&tagged.history(Some("ops"))), "x");
    }

    #[test]
    fn presence_members_round_trip_and_are_checked() {
        assert_eq!(parse_presence_member(&presence_member("n1", "ann b")), Some(("n1", "ann b")));
        assert_eq!(parse_presence_member("garbage"), None);
        assert_eq!(parse_presence_member("\nann"), None);
    }
}
