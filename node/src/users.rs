//! Which local connections belong to which user: a user is an address
//! across the cluster (`SendToUser`), as a group is. A connection has at
//! most one user: its sign-in token's (the name others see), or, with
//! `auth = "off"` (where nobody is signed in and names are whatever clients
//! say), its `SetUser` name; an anonymous connection while sign-in is on has
//! none and cannot be addressed. What makes a user reachable from every node
//! is the user's backplane channel, which a node follows while it holds at
//! least one of the user's connections: `set` and `remove` report when a
//! user gains its first or loses its last local connection.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

#[derive(Default)]
pub struct LocalUsers {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// user → its local connections' keys.
    connections: HashMap<String, HashSet<String>>,
    /// connection key → its user.
    user_of: HashMap<String, String>,
}

/// What a change of a connection's user means for the node's channels.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// The user gained its first local connection: follow its channel.
    pub first: Option<String>,
    /// The connection's previous user lost its last one: stop following.
    pub last: Option<String>,
}

impl LocalUsers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `conn` (a connection key) one of `user`'s, instead of any user it had.
    pub fn set(&self, conn: &str, user: &str) -> Change {
        let mut inner = self.lock();
        if inner.user_of.get(conn).is_some_and(|u| u == user) {
            return Change::default();
        }
        let last = inner.take(conn);
        let set = inner.connections.entry(user.to_string()).or_default();
        let first = set.is_empty().then(|| user.to_string());
        set.insert(conn.to_string());
        inner.user_of.insert(conn.to_string(), user.to_string());
        Change { first, last }
    }

    /// Forgets `conn`: the user it was of, and whether that was the user's
    /// last local connection (its channel is then no longer followed).
    pub fn remove(&self, conn: &str) -> Option<(String, bool)> {
        let mut inner = self.lock();
        let user = inner.user_of.get(conn).cloned()?;
        let last = inner.take(conn).is_some();
        Some((user, last))
    }

    /// The keys of `user`'s local connections.
    pub fn connections(&self, user: &str) -> Vec<String> {
        self.lock().connections.get(user).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// The user `conn` belongs to, if any.
    pub fn user_of(&self, conn: &str) -> Option<String> {
        self.lock().user_of.get(conn).cloned()
    }

    /// Every user with a local connection (followed again after the backplane reconnects).
    pub fn users(&self) -> Vec<String> {
        self.lock().connections.keys().cloned().collect()
    }
}

impl Inner {
    /// Takes `conn` from its user; that user when it has no local connection left.
    fn take(&mut self, conn: &str) -> Option<String> {
        let user = self.user_of.remove(conn)?;
        let set = self.connections.get_mut(&user)?;
        set.remove(conn);
        if !set.is_empty() {
            return None;
        }
        self.connections.remove(&user);
        Some(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_connections_of_a_user_are_reported() {
        let u = LocalUsers::default();
        assert_eq!(u.set("c1", "ana"), Change { first: Some("ana".into()), last: None });
        assert_eq!(u.set("c2", "ana"), Change::default());
        assert_eq!(u.set("c2", "ana"), Change::default(), "the same user again changes nothing");
        let mut both = u.connections("ana");
        both.sort();
        assert_eq!(both, ["c1", "c2"]);
        // A rename (auth off) moves the connection; ana keeps c1.
        assert_eq!(u.set("c2", "bob"), Change { first: Some("bob".into()), last: None });
        assert_eq!(u.user_of("c2").as_deref(), Some("bob"));
        assert_eq!(u.set("c1", "bob"), Change { first: None, last: Some("ana".into()) });
        assert!(u.connections("ana").is_empty());
        assert_eq!(u.remove("c1"), Some(("bob".into(), false)));
        assert_eq!(u.set("c3", "bob"), Change::default());
        assert_eq!(u.remove("c3"), Some(("bob".into(), false)));
        assert_eq!(u.remove("c2"), Some(("bob".into(), true)));
        assert_eq!(u.remove("c2"), None, "forgetting twice is harmless");
        assert!(u.users().is_empty() && u.user_of("c1").is_none());
    }
}
