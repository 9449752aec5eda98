//! Which local connections belong to which groups. Membership is per
//! connection and therefore local to the node that holds the connection; what
//! makes groups cluster-wide is that a group send is published on the group's
//! backplane channel, to which every node with at least one local member is
//! subscribed. `join` and `leave` report when a group gains its first or
//! loses its last local member, which is when the node (un)subscribes.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

pub const MAX_GROUP_NAME: usize = 256;

#[derive(Default)]
pub struct LocalGroups {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    members: HashMap<String, HashSet<String>>,
    of_connection: HashMap<String, HashSet<String>>,
}

pub fn validate_name(group: &str) -> Result<(), String> {
    if group.is_empty() || group.len() > MAX_GROUP_NAME || group.chars().any(char::is_control) {
        return Err(format!("group names are 1-{MAX_GROUP_NAME} bytes without control characters"));
    }
    Ok(())
}

impl LocalGroups {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `conn` (a connection key); true when the group had no local
    /// member. Refused when `conn` is already in `max` other groups.
    pub fn join(&self, group: &str, conn: &str, max: usize) -> Result<bool, String> {
        let mut g = self.lock();
        let mine = g.of_connection.entry(conn.to_string()).or_default();
        if !mine.contains(group) && mine.len() >= max {
            return Err(format!("a connection may be in at most {max} groups; leave one first"));
        }
        mine.insert(group.to_string());
        let set = g.members.entry(group.to_string()).or_default();
        let first = set.is_empty();
        set.insert(conn.to_string());
        Ok(first)
    }

    /// Removes `conn`; true when the group has no local member left.
    pub fn leave(&self, group: &str, conn: &str) -> bool {
        let mut g = self.lock();
        if let Some(gs) = g.of_connection.get_mut(conn) {
            gs.remove(group);
            if gs.is_empty() {
                g.of_connection.remove(conn);
            }
        }
        let Some(set) = g.members.get_mut(group) else {
            return false;
        };
        if !set.remove(conn) {
            return false;
        }
        let last = set.is_empty();
        if last {
            g.members.remove(group);
        }
        last
    }

    /// Removes `conn` from all its groups; returns the groups left empty.
    pub fn leave_all(&self, conn: &str) -> Vec<String> {
        let groups: Vec<String> =
            self.lock().of_connection.get(conn).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        groups.into_iter().filter(|g| self.leave(g, conn)).collect()
    }

    pub fn members(&self, group: &str) -> Vec<String> {
        self.lock().members.get(group).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// The groups `conn` is in now.
    pub fn of_connection(&self, conn: &str) -> std::collections::HashSet<String> {
        self.lock().of_connection.get(conn).cloned().unwrap_or_default()
    }

    pub fn groups(&self) -> Vec<String> {
        self.lock().members.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_members_are_reported() {
        let g = LocalGroups::default();
        assert_eq!(g.join("a", "c1", 10), Ok(true));
        assert_eq!(g.join("a", "c2", 10), Ok(false));
        assert_eq!(g.join("a", "c2", 10), Ok(false));
        assert!(!g.leave("a", "c1"));
        assert!(!g.leave("a", "nobody"));
        assert!(g.leave("a", "c2"));
        assert!(g.groups().is_empty());
    }

    #[test]
    fn leave_all_returns_emptied_groups() {
        let g = LocalGroups::default();
        g.join("a", "c1", 10).unwrap();
        g.join("b", "c1", 10).unwrap();
        g.join("b", "c2", 10).unwrap();
        assert_eq!(g.leave_all("c1"), vec!["a".to_string()]);
        assert_eq!(g.members("b"), vec!["c2".to_string()]);
    }

    #[test]
    fn a_connection_is_in_a_bounded_number_of_groups() {
        let g = LocalGroups::default();
        g.join("a", "c", 2).unwrap();
        g.join("b", "c", 2).unwrap();
        assert!(g.join("x", "c", 2).is_err());
        assert_eq!(g.join("a", "c", 2), Ok(false), "rejoining is not a new group");
        g.leave("a", "c");
        assert!(g.join("x", "c", 2).is_ok());
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("room-1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a\nb").is_err());
        assert!(validate_name(&"x".repeat(300)).is_err());
    }
}
