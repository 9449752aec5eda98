//! Cross-origin pages (`allowed_origins`). A browser request to the hub
//! carries `Origin`; it is the page's own origin when it equals the origin the
//! request was sent to (the Host, and the scheme the balancer reports in
//! `X-Forwarded-Proto`), and such a page is always served. Another origin is
//! served only when listed (or with `*`): its preflights (`OPTIONS`) are
//! answered and its responses carry `Access-Control-Allow-Origin` with
//! credentials, as ASP.NET Core's CORS policy for SignalR does. Any other
//! origin is refused with 403 and no CORS headers, WebSocket upgrades
//! included (browsers do not apply CORS to WebSockets, so the server must).
//! A request without `Origin` (a non-browser client) is not affected.
//! This module judges; the middleware that applies it is `http`'s.

use axum::http::{header, HeaderMap, HeaderValue};

/// `scheme://host[:port]` in lower case with the scheme's default port
/// dropped, or `None` when `text` is not a web origin.
pub fn normalise(text: &str) -> Option<String> {
    let (scheme, rest) = text.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    let host_port = rest.strip_suffix('/').unwrap_or(rest).to_ascii_lowercase();
    let valid = |c: char| c.is_ascii_alphanumeric() || "-.:[]_".contains(c);
    if host_port.is_empty() || !host_port.chars().all(valid) {
        return None;
    }
    let host_port = match host_port.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            if port.is_empty() || port.parse::<u16>().is_err() {
                return None;
            }
            if port == default_port {
                host.to_string()
            } else {
                host_port.clone()
            }
        }
        _ => host_port,
    };
    Some(format!("{scheme}://{host_port}"))
}

/// The origin this request was addressed to.
fn own_origin(headers: &HeaderMap) -> Option<String> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let scheme = get("x-forwarded-proto").unwrap_or("http");
    let host = get("x-forwarded-host").or_else(|| get("host"))?;
    normalise(&format!("{scheme}://{host}"))
}

/// `allowed_origins`, normalised once at start.
#[derive(Debug, Default)]
pub struct AllowedOrigins {
    any: bool,
    listed: Vec<String>,
}

impl AllowedOrigins {
    pub fn new(setting: &[String]) -> Self {
        AllowedOrigins {
            any: setting.iter().any(|o| o == "*"),
            listed: setting.iter().filter_map(|o| normalise(o)).collect(),
        }
    }

    fn allows(&self, normal: &str) -> bool {
        self.any || self.listed.iter().any(|a| a == normal)
    }
}

/// What to do with a request's `Origin`.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No `Origin`, or the page's own: nothing to add.
    SameOrigin,
    /// A listed origin: answer with CORS headers for it.
    Allowed(HeaderValue),
    Refused,
}

pub fn judge(allowed: &AllowedOrigins, headers: &HeaderMap) -> Verdict {
    let Some(origin) = headers.get(header::ORIGIN) else { return Verdict::SameOrigin };
    let Some(normal) = origin.to_str().ok().and_then(normalise) else { return Verdict::Refused };
    if own_origin(headers).as_deref() == Some(normal.as_str()) {
        return Verdict::SameOrigin;
    }
    if allowed.allows(&normal) {
        Verdict::Allowed(origin.clone())
    } else {
        Verdict::Refused
    }
}

pub fn allow(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn origins_normalise() {
        assert_eq!(normalise("HTTPS://Chat.Example:443/").as_deref(), Some("https://chat.example"));
        assert_eq!(normalise("http://127.0.0.1:8888").as_deref(), Some("http://127.0.0.1:8888"));
        assert_eq!(normalise("http://[::1]:80").as_deref(), Some("http://[::1]"));
        for bad in ["null", "ftp://x", "http://", "http://a b", "http://x:99999", "http://x:"] {
            assert_eq!(normalise(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_same_origin_and_listed_ones_are_served_others_refused() {
        let list = AllowedOrigins::new(&["HTTPS://App.Example:443".to_string()]);
        assert_eq!(judge(&list, &headers(&[("host", "chat.example")])), Verdict::SameOrigin);
        let same = headers(&[("host", "chat.example:8888"), ("origin", "http://chat.example:8888")]);
        assert_eq!(judge(&list, &same), Verdict::SameOrigin);
        // Behind the balancer's HTTPS port.
        let tls =
            headers(&[("host", "chat.example"), ("x-forwarded-proto", "https"), ("origin", "https://chat.example")]);
        assert_eq!(judge(&list, &tls), Verdict::SameOrigin);
        let listed = headers(&[("host", "chat.example"), ("origin", "https://app.example")]);
        assert!(matches!(judge(&list, &listed), Verdict::Allowed(_)));
        let other = headers(&[("host", "chat.example"), ("origin", "https://evil.example")]);
        assert_eq!(judge(&list, &other), Verdict::Refused);
        assert_eq!(judge(&AllowedOrigins::default(), &headers(&[("host", "h"), ("origin", "null")])), Verdict::Refused);
        assert!(matches!(judge(&AllowedOrigins::new(&["*".to_string()]), &other), Verdict::Allowed(_)));
    }
}
