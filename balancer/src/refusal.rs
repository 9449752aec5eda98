//! The answers the balancer gives itself instead of a node's, in one place so
//! that the Pingora proxy and the WebSocket tunnel say exactly the same thing.

pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

const TEXT: &str = "text/plain; charset=utf-8";

/// `?id=` names no live node: SignalR clients negotiate again on a 404.
pub const UNKNOWN_CONNECTION: Refusal = Refusal {
    status: 404,
    reason: "Not Found",
    content_type: TEXT,
    body: "No connection with that id (its node is gone); negotiate again.\n",
};

pub const NO_NODE: Refusal = Refusal {
    status: 503,
    reason: "Service Unavailable",
    content_type: "application/json",
    body: "{\"error\":\"no healthy chat node is available\"}",
};

pub const TOO_MANY_CONNECTIONS: Refusal = Refusal {
    status: 503,
    reason: "Service Unavailable",
    content_type: TEXT,
    body: "Too many connections; retry shortly.\n",
};

/// Every node that could take a new connection is taking them as fast as
/// its admission rate allows, and the wait for a turn ran out.
pub const NODES_BUSY: Refusal = Refusal {
    status: 503,
    reason: "Service Unavailable",
    content_type: TEXT,
    body: "The chat nodes are taking new connections as fast as they can; retry shortly.\n",
};

pub const RATE_LIMITED: Refusal = Refusal {
    status: 429,
    reason: "Too Many Requests",
    content_type: TEXT,
    body: "Too many new connections from this address; retry shortly.\n",
};

pub const HEAD_TIMEOUT: Refusal = Refusal {
    status: 408,
    reason: "Request Timeout",
    content_type: TEXT,
    body: "The request head did not arrive in time.\n",
};

pub const HEAD_TOO_LARGE: Refusal = Refusal {
    status: 431,
    reason: "Request Header Fields Too Large",
    content_type: TEXT,
    body: "The request head is too large.\n",
};

/// A path the nodes serve only to the cluster's insiders (`/metrics`).
pub const NOT_PUBLIC: Refusal = Refusal { status: 404, reason: "Not Found", content_type: TEXT, body: "Not found.\n" };

pub const NODE_UNREACHABLE: Refusal = Refusal {
    status: 502,
    reason: "Bad Gateway",
    content_type: TEXT,
    body: "The chat node could not be reached or did not answer.\n",
};

impl Refusal {
    /// Whether a client should be told to come back in a second.
    pub fn retry_after(&self) -> bool {
        matches!(self.status, 429 | 503)
    }

    /// The whole response, for the paths that write raw HTTP/1.1 (the
    /// front door and the tunnel); the connection closes after it.
    pub fn to_http(&self) -> String {
        self.response(true)
    }

    /// The whole response; `close`: it says the connection closes after it
    /// (otherwise the connection may carry the client's next request).
    pub fn response(&self, close: bool) -> String {
        let retry = if self.retry_after() { "Retry-After: 1\r\n" } else { "" };
        let connection = if close { "Connection: close\r\n" } else { "" };
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{retry}{connection}\r\n{}",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            self.body
        )
    }
}

/// The answer to a plain-HTTP request when HTTPS is enforced (`tls_redirect`):
/// 308 keeps the method and body, so a POST is repeated over HTTPS.
pub fn redirect(location: &str) -> String {
    let body = "Use HTTPS.\n";
    format!(
        "HTTP/1.1 308 Permanent Redirect\r\nLocation: {location}\r\nContent-Type: {TEXT}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
