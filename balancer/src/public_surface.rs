//! What the public port forwards to nodes: the chat page and its files, the
//! SignalR hub, `/health`, the `/nodes` listing, the page's sign-in
//! helpers (`/auth/info`, and `/auth/dev-token` where a node enables it)
//! and the server API for application backends (`/api/hubs/…` and
//! `/api/health`) with Azure's client endpoint (`/client/`, the hub by
//! another name), which the nodes answer 404 unless an access key is set
//! and guard with tokens signed with it. Everything else a node
//! serves (`/metrics` today) is for the cluster's insiders (Prometheus
//! scrapes each node on its own address) and gets a 404 from the balancer.
//! It is an allowlist, so a route added to the nodes later stays private
//! until someone decides to publish it here.

/// Whether the public port forwards `path` (without its query) to a node.
pub fn serves(path: &str) -> bool {
    matches!(path, "/" | "/chathub" | "/chathub/negotiate" | "/health" | "/nodes" | "/auth/info" | "/auth/dev-token")
        || path.strip_prefix("/static/").is_some_and(|file| !file.is_empty() && !file.contains('/'))
        || matches!(path, "/client" | "/client/" | "/client/negotiate")
        || path == "/api/health"
        || path
            .strip_prefix("/api/hubs/")
            .is_some_and(|rest| !rest.is_empty() && !rest.split('/').any(|s| s == ".." || s == "."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chat_page_and_the_hub_are_public() {
        for p in [
            "/",
            "/chathub",
            "/chathub/negotiate",
            "/health",
            "/nodes",
            "/static/chat.js",
            "/auth/info",
            "/api/hubs/chathub/:send",
            "/api/hubs/chathub/users/ana/groups/ops",
            "/api/health",
            "/client/",
            "/client/negotiate",
        ] {
            assert!(serves(p), "{p}");
        }
    }

    #[test]
    fn metrics_and_anything_unknown_are_not() {
        for p in
            ["/metrics", "/metrics/", "//metrics", "/%6detrics", "/static/", "/static/../metrics", "/api/backends", ""]
                .into_iter()
                .chain(["/api/hubs/", "/api/hubs/../../metrics", "/api/hubs/x/./y", "/api/"])
        {
            assert!(!serves(p), "{p}");
        }
    }
}
