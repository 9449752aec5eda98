//! The access log: one line per client request, off by default
//! (`access_log = "stdout"` or a file path), as JSON lines or in the common
//! log format nginx and Traefik write (with the node, route kind, duration
//! and bytes appended). A request is logged when it ends, so a WebSocket, an
//! event stream or a long poll appears once, with how long it lasted and the
//! bytes moved each way.
//!
//! What identifies a client's connection or session never reaches the log:
//! the values of the `id` and `access_token` query parameters (however their
//! names are encoded) and any value shaped like a JWT or a connection token
//! are replaced by `REDACTED` (see `redact`), and no header is logged but the user agent (cookies and
//! `Authorization` never). Lines go to a writer thread through a bounded
//! queue, so a slow disk never holds up a request; lines that do not fit are
//! counted (`switchboard_balancer_access_log_dropped_total`) and dropped.

use crate::request::Request;
use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

/// Lines waiting for the writer, at most.
const QUEUE: usize = 16 * 1024;

/// The status logged for a request whose client left before any answer was
/// written (an abandoned long poll, say), as nginx logs it.
pub const CLIENT_LEFT: u16 = 499;

/// Query parameters whose values are secrets or connection credentials.
const REDACTED_PARAMS: [&str; 2] = ["id", "access_token"];

/// How each line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    Json,
    /// `client - - [time] "request" status bytes "-" "agent"` and key=value fields.
    Common,
}

/// One finished request: its facts and how it ended.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub request: &'a Request<'a>,
    pub status: u16,
    /// The node's id, when one was chosen.
    pub node: Option<&'a str>,
    /// `token`, `cookie` or `new`; `-` when no node was chosen.
    pub route: &'a str,
    /// How long it lasted; the line's time is when it began (now − this).
    pub duration: Duration,
    /// Bytes from the client (request bodies; both-way traffic of a WebSocket).
    pub bytes_in: u64,
    /// Bytes to the client (response bodies; for a WebSocket, after the 101).
    pub bytes_out: u64,
}

/// The target with every credential in its query replaced: the values of
/// `id` and `access_token` however their names are written (compared after
/// percent-decoding, `%61ccess_token` included), and any value shaped like
/// a JWT or a connection token whatever its name. Pairs are split at `&`
/// and at `;` (which some parsers also take as a separator), so no parser
/// can find a credential the log shows.
pub fn redact(target: &str) -> Cow<'_, str> {
    let Some((path, query)) = target.split_once('?') else { return Cow::Borrowed(target) };
    let pairs = || query.split(['&', ';']);
    if !pairs().any(is_credential) {
        return Cow::Borrowed(target);
    }
    let mut out = String::with_capacity(target.len());
    out.push_str(path);
    out.push('?');
    let mut rest = query;
    for pair in pairs() {
        match pair.split_once('=') {
            Some((name, _)) if is_credential(pair) => {
                out.push_str(name);
                out.push_str("=REDACTED");
            }
            None if is_credential(pair) => out.push_str("REDACTED"),
            _ => out.push_str(pair),
        }
        rest = &rest[pair.len()..];
        if let Some(separator) = rest.chars().next() {
            out.push(separator);
            rest = &rest[1..];
        }
    }
    Cow::Owned(out)
}

/// Whether one `name=value` pair of a query carries a credential.
fn is_credential(pair: &str) -> bool {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    match pair.split_once('=') {
        Some((name, value)) => {
            let name = decode(name);
            REDACTED_PARAMS.iter().any(|p| name.trim().eq_ignore_ascii_case(p)) || looks_like_credential(&decode(value))
        }
        // A bare word has no value; it is a secret only if it looks like one.
        None => looks_like_credential(&decode(pair)),
    }
}

/// A JWT (three base64url parts, the header a JSON object) or a token or
/// id a node issued (`<owner>.<random>`).
fn looks_like_credential(value: &str) -> bool {
    let jwt = value.starts_with("eyJ") && value.split('.').count() == 3;
    jwt || switchboard_common::token::owner_of(value).is_some()
}

/// Keeps a logged string on one line and printable.
fn clean(s: &str) -> Cow<'_, str> {
    if s.chars().all(|c| !c.is_control() && c != '"') {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.chars().map(|c| if c.is_control() || c == '"' { '?' } else { c }).collect())
}

/// A JSON line, serialised straight from borrowed fields (no map is built).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonLine<'a> {
    time: String,
    client: String,
    method: &'a str,
    target: &'a str,
    status: u16,
    node: Option<&'a str>,
    route: &'a str,
    kind: &'a str,
    duration_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    tls: bool,
    user_agent: Option<&'a str>,
}

impl<'a> Entry<'a> {
    /// The entry for an answer the balancer gave itself (no node, no body counted).
    pub fn answered(request: &'a Request<'a>, status: u16, duration: Duration) -> Self {
        Entry { request, status, node: None, route: "-", duration, bytes_in: 0, bytes_out: 0 }
    }

    /// The line for `format`, without its newline.
    pub fn format(&self, format: AccessLogFormat) -> String {
        let request = self.request;
        let target = redact(&request.target);
        let time = chrono::DateTime::<chrono::Utc>::from(SystemTime::now() - self.duration);
        let client = request.peer.map_or_else(|| "-".to_string(), |ip| ip.to_canonical().to_string());
        let millis = self.duration.as_secs_f64() * 1000.0;
        match format {
            AccessLogFormat::Json => {
                let line = JsonLine {
                    time: time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                    client,
                    method: &request.method,
                    target: &target,
                    status: self.status,
                    node: self.node,
                    route: self.route,
                    kind: request.kind,
                    duration_ms: (millis * 1000.0).round() / 1000.0,
                    bytes_in: self.bytes_in,
                    bytes_out: self.bytes_out,
                    tls: request.tls,
                    user_agent: request.user_agent.as_deref(),
                };
                serde_json::to_string(&line).unwrap_or_default()
            }
            AccessLogFormat::Common => format!(
                "{client} - - [{}] \"{} {} HTTP/1.1\" {} {} \"-\" \"{}\" node={} route={} kind={} duration_ms={:.3} bytes_in={} tls={}",
                time.format("%d/%b/%Y:%H:%M:%S %z"),
                clean(&request.method),
                clean(&target),
                self.status,
                self.bytes_out,
                clean(request.user_agent.as_deref().unwrap_or("-")),
                self.node.map_or(Cow::Borrowed("-"), clean),
                self.route,
                request.kind,
                millis,
                self.bytes_in,
                request.tls,
            ),
        }
    }
}

/// The open log: a queue to the writer thread.
pub struct AccessLog {
    format: AccessLogFormat,
    queue: SyncSender<String>,
    dropped: IntCounter,
}

impl AccessLog {
    /// Opens `target` (`"stdout"` or a file, appended to) and starts the
    /// writer; `None` when the log is off (`""`).
    pub fn open(target: &str, format: AccessLogFormat, dropped: IntCounter) -> Result<Option<Self>, String> {
        let out: Box<dyn Write + Send> = match target {
            "" => return Ok(None),
            "stdout" | "-" => Box::new(std::io::stdout()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open access_log {path}: {e}"))?,
            ),
        };
        let (queue, lines) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(lines, out))
            .map_err(|e| format!("cannot start the access log writer: {e}"))?;
        Ok(Some(AccessLog { format, queue, dropped }))
    }

    pub fn record(&self, entry: &Entry) {
        match self.queue.try_send(entry.format(self.format)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// How often the writer collects what was queued. It polls rather than
/// blocking on the queue: a blocked receiver must be woken by every line
/// (a system call on the request's thread), a polling one never is.
const COLLECT_EVERY: Duration = Duration::from_millis(50);

/// Writes what is queued, buffered, every `COLLECT_EVERY`, flushing each
/// time (a line is at most that late); ends when the log is dropped.
fn write_lines(lines: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failing = false;
    loop {
        let mut wrote = false;
        loop {
            match lines.try_recv() {
                Ok(l) => {
                    let ok = out.write_all(l.as_bytes()).and_then(|()| out.write_all(b"\n")).is_ok();
                    if !ok && !failing {
                        tracing::warn!("access log write failed; lines are lost until it works again");
                    }
                    failing = !ok;
                    wrote = true;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote {
            let _ = out.flush();
        }
        std::thread::sleep(COLLECT_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str) -> Request<'_> {
        Request {
            peer: Some("::ffff:10.1.2.3".parse().unwrap()),
            tls: false,
            method: "GET".into(),
            target: target.into(),
            host: None,
            cookie: None,
            user_agent: Some("Mozilla/5.0 \"x\"".into()),
            kind: "websocket",
        }
    }

    fn entry<'a>(request: &'a Request<'a>) -> Entry<'a> {
        Entry {
            request,
            status: 101,
            node: Some("n1"),
            route: "token",
            duration: Duration::from_millis(61_250),
            bytes_in: 120,
            bytes_out: 4096,
        }
    }

    #[test]
    fn connection_ids_and_access_tokens_are_redacted() {
        assert_eq!(
            redact("/chathub?id=abc.def&access_token=eyJ&x=1"),
            "/chathub?id=REDACTED&access_token=REDACTED&x=1"
        );
        assert_eq!(redact("/chathub?ID=abc"), "/chathub?ID=REDACTED");
        assert_eq!(redact("/chathub?idx=1&id"), "/chathub?idx=1&id");
        assert!(matches!(redact("/nodes?x=1"), Cow::Borrowed(_)));
    }

    #[test]
    fn credentials_are_redacted_however_their_names_are_encoded_or_separated() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbmEifQ.c2ln";
        let token = switchboard_common::token::ConnectionToken::issue("node-a").token;
        for target in [
            format!("/chathub?access%5Ftoken={jwt}"),
            format!("/chathub?%61ccess_token={jwt}"),
            format!("/chathub?%69d={token}"),
            format!("/chathub?x=1;id={token}"),
            format!("/chathub?x=1&whatever={jwt}"),
            format!("/chathub?x=1&other={token}"),
        ] {
            let logged = redact(&target);
            assert!(!logged.contains(jwt) && !logged.contains(&token), "{target} logged as {logged}");
            assert!(logged.contains("REDACTED"), "{logged}");
        }
        assert_eq!(redact(&format!("/chathub?x=1;id={token}&y=2")), "/chathub?x=1;id=REDACTED&y=2");
        assert!(matches!(redact("/chathub?negotiateVersion=1&name=a.b.c"), Cow::Borrowed(_)));
    }

    #[test]
    fn both_formats_carry_every_field_on_one_line() {
        let r = request("/chathub?id=s3cret");
        let e = entry(&r);
        let json: serde_json::Value = serde_json::from_str(&e.format(AccessLogFormat::Json)).unwrap();
        assert_eq!(json["target"], "/chathub?id=REDACTED");
        assert_eq!(
            (json["status"].as_u64(), json["node"].as_str(), json["route"].as_str()),
            (Some(101), Some("n1"), Some("token"))
        );
        assert_eq!((json["bytesIn"].as_u64(), json["bytesOut"].as_u64()), (Some(120), Some(4096)));
        assert_eq!(json["durationMs"].as_f64(), Some(61_250.0));
        assert_eq!(json["client"], "10.1.2.3");
        let common = e.format(AccessLogFormat::Common);
        assert!(common.starts_with("10.1.2.3 - - ["), "{common}");
        assert!(
            common.contains("\"GET /chathub?id=REDACTED HTTP/1.1\" 101 4096 \"-\" \"Mozilla/5.0 ?x?\""),
            "{common}"
        );
        assert!(
            common.ends_with("node=n1 route=token kind=websocket duration_ms=61250.000 bytes_in=120 tls=false"),
            "{common}"
        );
        assert!(!common.contains("s3cret") && !common.contains('\n'));
    }
}
