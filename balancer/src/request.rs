//! The facts of one client request, extracted once from its head: who sent
//! it (peer address, TLS), what it asks for (method, target, and from the
//! target its path and SignalR connection id), the Host it names, the node
//! its affinity cookie names, its user agent and what kind of SignalR request
//! it is. Routing (`Cluster::route`), the forwarded headers and the access
//! log's entry (`access_log::Entry`) all take this one value, so the
//! WebSocket tunnel, the proxied HTTP path and the front's own answers pick
//! nothing out of a head for themselves. Fields borrow from the head while it
//! is at hand; a tunnel that outlives its head keeps an owned copy
//! (`into_owned`).

use crate::routing::cookie_value;
use std::borrow::Cow;
use std::net::IpAddr;

/// One request's facts (see the module's comment).
#[derive(Debug, Clone, PartialEq)]
pub struct Request<'a> {
    pub peer: Option<IpAddr>,
    pub tls: bool,
    /// `-` when the head could not be parsed.
    pub method: Cow<'a, str>,
    /// Path and query as sent (the access log redacts it); `-` when unparsed.
    pub target: Cow<'a, str>,
    pub host: Option<Cow<'a, str>>,
    /// The affinity cookie's value (the first one found across `Cookie` headers).
    pub cookie: Option<Cow<'a, str>>,
    pub user_agent: Option<Cow<'a, str>>,
    /// `websocket`, `sse`, `long_poll`, `send`, `close`, `negotiate` or `http`.
    pub kind: &'static str,
}

/// Where the request came from, known before its head is read.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'c> {
    pub peer: Option<IpAddr>,
    pub tls: bool,
    /// The affinity cookie's name.
    pub cookie_name: &'c str,
}

impl<'a> Request<'a> {
    /// A request whose head was not read or could not be parsed (the front's
    /// refusals before a head, a malformed one).
    pub fn unparsed(peer: Option<IpAddr>, tls: bool) -> Request<'static> {
        Request {
            peer,
            tls,
            method: Cow::Borrowed("-"),
            target: Cow::Borrowed("-"),
            host: None,
            cookie: None,
            user_agent: None,
            kind: "http",
        }
    }

    /// From a head `httparse` read (the front's own paths and the tunnel's);
    /// `None` without a method or target.
    pub fn from_parsed(req: &httparse::Request<'_, 'a>, origin: Origin<'_>, upgrade: bool) -> Option<Self> {
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
        };
        let cookie = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .find_map(|h| cookie_value(h, origin.cookie_name));
        Some(Self::new(
            origin,
            req.method?,
            req.path?,
            header("host"),
            cookie,
            header("user-agent"),
            header("accept"),
            upgrade,
        ))
    }

    /// From the head Pingora read (the proxied HTTP path).
    pub fn from_header(req: &'a pingora::http::RequestHeader, origin: Origin<'_>, upgrade: bool) -> Self {
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        let cookie = req
            .headers
            .get_all("cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|h| cookie_value(h, origin.cookie_name));
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        Self::new(
            origin,
            req.method.as_str(),
            target,
            header("host"),
            cookie,
            header("user-agent"),
            header("accept"),
            upgrade,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        origin: Origin<'_>,
        method: &'a str,
        target: &'a str,
        host: Option<&'a str>,
        cookie: Option<&'a str>,
        user_agent: Option<&'a str>,
        accept: Option<&str>,
        upgrade: bool,
    ) -> Self {
        Request {
            peer: origin.peer,
            tls: origin.tls,
            kind: if upgrade { "websocket" } else { kind_of(method, target, accept) },
            method: Cow::Borrowed(method),
            target: Cow::Borrowed(target),
            host: host.map(Cow::Borrowed),
            cookie: cookie.map(Cow::Borrowed),
            user_agent: user_agent.map(Cow::Borrowed),
        }
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The SignalR connection id (`id=` in the query), if any.
    pub fn id(&self) -> Option<&str> {
        query_id(self.target.split_once('?').map(|(_, q)| q))
    }

    /// Whether this request starts a SignalR connection: a negotiate, or a
    /// WebSocket without an id (a client that skips negotiation).
    pub fn starts_connection(&self) -> bool {
        self.kind == "negotiate" || (self.kind == "websocket" && self.id().is_none())
    }

    /// A copy that no longer borrows the head.
    pub fn into_owned(self) -> Request<'static> {
        let own = |c: Cow<'a, str>| Cow::Owned(c.into_owned());
        Request {
            peer: self.peer,
            tls: self.tls,
            method: own(self.method),
            target: own(self.target),
            host: self.host.map(own),
            cookie: self.cookie.map(own),
            user_agent: self.user_agent.map(own),
            kind: self.kind,
        }
    }
}

/// The `id` query parameter, if present.
pub fn query_id(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|pair| pair.strip_prefix("id="))
}

/// What kind of SignalR request this is, from its method, target and
/// `Accept` header (a WebSocket upgrade is told apart before this).
fn kind_of(method: &str, target: &str, accept: Option<&str>) -> &'static str {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let has_id = query.split('&').any(|p| p.starts_with("id="));
    if path.ends_with("/negotiate") {
        "negotiate"
    } else if has_id && method == "GET" && accept.is_some_and(|a| a.contains("text/event-stream")) {
        "sse"
    } else if has_id && method == "GET" {
        "long_poll"
    } else if has_id && method == "POST" {
        "send"
    } else if has_id && method == "DELETE" {
        "close"
    } else {
        "http"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: Origin<'static> = Origin { peer: None, tls: true, cookie_name: "switchboard_affinity" };

    fn parsed(head: &[u8], upgrade: bool) -> Option<Request<'static>> {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(head).ok()?;
        Request::from_parsed(&req, ORIGIN, upgrade).map(Request::into_owned)
    }

    #[test]
    fn the_id_parameter_is_found_among_others() {
        assert_eq!(query_id(Some("id=abc")), Some("abc"));
        assert_eq!(query_id(Some("x=1&id=abc&y")), Some("abc"));
        assert_eq!(query_id(Some("xid=abc")), None);
        assert_eq!(query_id(None), None);
    }

    #[test]
    fn request_kinds_are_told_apart() {
        assert_eq!(kind_of("POST", "/chathub/negotiate?negotiateVersion=1", None), "negotiate");
        assert_eq!(kind_of("GET", "/chathub?id=x", Some("text/event-stream")), "sse");
        assert_eq!(kind_of("GET", "/chathub?id=x&_=1", Some("*/*")), "long_poll");
        assert_eq!(kind_of("POST", "/chathub?id=x", None), "send");
        assert_eq!(kind_of("DELETE", "/chathub?id=x", None), "close");
        assert_eq!(kind_of("GET", "/", None), "http");
    }

    #[test]
    fn one_head_gives_every_fact_both_parsers_agree_on() {
        let head = b"GET /chathub?x=1&id=abc HTTP/1.1\r\nHost: chat.example\r\nCookie: a=1\r\n\
                     Cookie: switchboard_affinity=n2; b=2\r\nUser-Agent: ua/1\r\nAccept: text/event-stream\r\n\r\n";
        let r = parsed(head, false).unwrap();
        assert_eq!((r.method.as_ref(), r.path(), r.id()), ("GET", "/chathub", Some("abc")));
        assert_eq!((r.host.as_deref(), r.cookie.as_deref()), (Some("chat.example"), Some("n2")));
        assert_eq!((r.user_agent.as_deref(), r.kind, r.tls), (Some("ua/1"), "sse", true));
        assert!(!r.starts_connection());

        let mut pingora_head = pingora::http::RequestHeader::build("GET", b"/chathub?x=1&id=abc", None).unwrap();
        for (name, value) in [
            ("Host", "chat.example"),
            ("Cookie", "a=1"),
            ("Cookie", "switchboard_affinity=n2; b=2"),
            ("User-Agent", "ua/1"),
            ("Accept", "text/event-stream"),
        ] {
            pingora_head.append_header(name, value).unwrap();
        }
        assert_eq!(Request::from_header(&pingora_head, ORIGIN, false), r);
    }

    #[test]
    fn connections_are_started_by_a_negotiate_or_a_websocket_without_an_id() {
        let negotiate = parsed(b"POST /chathub/negotiate?negotiateVersion=1 HTTP/1.1\r\n\r\n", false).unwrap();
        assert!(negotiate.starts_connection());
        let fresh = parsed(b"GET /chathub HTTP/1.1\r\n\r\n", true).unwrap();
        assert_eq!(fresh.kind, "websocket");
        assert!(fresh.starts_connection());
        assert!(!parsed(b"GET /chathub?id=t HTTP/1.1\r\n\r\n", true).unwrap().starts_connection());
        assert!(!parsed(b"GET /chathub HTTP/1.1\r\n\r\n", false).unwrap().starts_connection());
        assert_eq!(parsed(b"\x00garbage\r\n\r\n", false), None);
        assert_eq!(Request::unparsed(None, false).path(), "-");
    }
}
