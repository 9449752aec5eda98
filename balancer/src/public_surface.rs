//! What the public port forwards to nodes: the chat page and its files, the
//! SignalR hub, `/health`, the `/nodes` listing and the page's sign-in
//! helpers (`/auth/info`, and `/auth/dev-token` where a node enables it). Everything else a node
//! serves (`/metrics` today) is for the cluster's insiders (Prometheus
//! scrapes each node on its own address) and gets a 404 from the balancer.
//! It is an allowlist, so a route added to the nodes later stays private
//! until someone decides to publish it here.

/// Whether the public port forwards `path` (without its query) to a node.
pub fn serves(path: &str) -> bool {
    matches!(path, "/" | "/chathub" | "/chathub/negotiate" | "/health" | "/nodes" | "/auth/info" | "/auth/dev-token")
        || path.strip_prefix("/static/").is_some_and(|file| !file.is_empty() && !file.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chat_page_and_the_hub_are_public() {
        for p in ["/", "/chathub", "/chathub/negotiate", "/health", "/nodes", "/static/chat.js", "/auth/info"] {
            assert!(serves(p), "{p}");
        }
    }

    #[test]
    fn metrics_and_anything_unknown_are_not() {
        for p in
            ["/metrics", "/metrics/", "//metrics", "/%6detrics", "/static/", "/static/../metrics", "/api/backends", ""]
        {
            assert!(!serves(p), "{p}");
        }
    }
}
