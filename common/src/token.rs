//! Connection ids and tokens that name their owning node.
//!
//! A node issues both at negotiate time as `<owner>.<random>`, where `<owner>`
//! is the node id in unpadded base64url. SignalR clients echo the token back
//! as `?id=` on every transport request (a negotiate-v1 client gets it as
//! `connectionToken`; a v0 client, which sends its `connectionId`, is given
//! the token in that field), so the balancer can read the owner from the
//! request alone: no per-connection table, correct across balancer restarts
//! and replicas. The random part of the token is 192 bits and is the secret.
//! The connection id is public (other clients see it) and never opens a
//! transport, so its random part is shorter. Forging an owner only sends a
//! request to a node that answers 404.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Longest `?id=` value either program accepts; anything longer is malformed.
pub const MAX_TOKEN_LEN: usize = 512;

/// A freshly issued pair for one SignalR connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionToken {
    /// Public id, used for addressing and shown to other clients.
    pub connection_id: String,
    /// Secret used as `?id=` by every client (the `connectionId` a
    /// negotiate-v0 client is given).
    pub token: String,
}

impl ConnectionToken {
    pub fn issue(node_id: &str) -> Self {
        let owner = URL_SAFE_NO_PAD.encode(node_id.as_bytes());
        let id_rand: [u8; 12] = rand::random();
        let token_rand: [u8; 24] = rand::random();
        ConnectionToken {
            connection_id: format!("{owner}.{}", URL_SAFE_NO_PAD.encode(id_rand)),
            token: format!("{owner}.{}", URL_SAFE_NO_PAD.encode(token_rand)),
        }
    }
}

/// The node id encoded in an `?id=` value, or `None` when it is malformed.
pub fn owner_of(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > MAX_TOKEN_LEN {
        return None;
    }
    let (owner, rest) = id.split_once('.')?;
    if owner.is_empty() || rest.is_empty() || rest.contains('.') {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(owner).ok()?;
    let node = String::from_utf8(bytes).ok()?;
    (!node.is_empty()).then_some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_ids_and_tokens_name_their_node() {
        let t = ConnectionToken::issue("node-a.example:5000");
        assert_eq!(owner_of(&t.connection_id).as_deref(), Some("node-a.example:5000"));
        assert_eq!(owner_of(&t.token).as_deref(), Some("node-a.example:5000"));
        assert_ne!(t.connection_id, t.token);
        assert_ne!(ConnectionToken::issue("n").token, ConnectionToken::issue("n").token);
    }

    #[test]
    fn issued_values_are_url_safe() {
        let t = ConnectionToken::issue("ünïcode node/with spaces");
        for s in [&t.connection_id, &t.token] {
            assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{s}");
        }
    }

    #[test]
    fn malformed_ids_have_no_owner() {
        for bad in ["", "abc", ".abc", "abc.", "!!!.abc", "YQ.b.c", &"a".repeat(600)] {
            assert_eq!(owner_of(bad), None, "{bad}");
        }
        // Valid base64 that is not UTF-8.
        assert_eq!(owner_of("_w.abc"), None);
    }
}
