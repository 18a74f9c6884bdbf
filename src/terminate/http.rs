//! The HTTP/1.x request head: parse it, rewrite it for the agent, read the
//! agent's response head, and render the proxy's own responses. Pure: no
//! I/O.
//!
//! Parsing is `httparse`'s (the parser behind hyper, fuzzed upstream),
//! wrapped in splicegate's own stricter checks: line ends are CRLF only (a
//! bare CR or LF, or a NUL, is refused, so no agent can split the head
//! differently), at most [`MAX_HEADERS`] header lines, exactly one `Host`
//! for HTTP/1.1, one `Content-Length` value, `Transfer-Encoding: chunked`
//! only, and never both. The whole pass — checks, parse, rewrite — is
//! linear in the head's size.
//!
//! Only the head is parsed. The body, and everything after the agent's
//! `101 Switching Protocols`, is forwarded as bytes. The request sent to the
//! agent carries `Connection: close` (or `Connection: Upgrade` for a
//! WebSocket), so each client connection carries one request to one agent;
//! see docs/terminate-mode.md for why.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use crate::outcome::Kind;

/// Most header lines a request head may carry (Apache's default
/// `LimitRequestFields` is 100); more is answered with 431.
pub const MAX_HEADERS: usize = 128;

/// Headers a client can never have removed by naming them in
/// `Connection`: the agent needs them to frame and route the request.
const PROTECTED: [&str; 3] = ["host", "content-length", "transfer-encoding"];

/// Headers a proxy consumes rather than forwards (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
];

/// Headers that say who the client is. With `forwarded_headers` on,
/// splicegate removes the client's copies and sets its own, so a client
/// cannot choose the address an agent sees.
const FORWARDING: [&str; 6] = [
    "x-real-ip",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "forwarded",
];

/// Why a request head was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The request line is not `METHOD SP TARGET SP HTTP/1.x`.
    #[error("malformed request line {0:?}")]
    RequestLine(String),
    /// Not HTTP/1.0 or HTTP/1.1.
    #[error("unsupported protocol version {0:?} (HTTP/1.0 and HTTP/1.1 are served)")]
    Version(String),
    /// A request target that cannot be routed (`*`, authority form).
    #[error("request target {0:?} is not a path (origin form `/...` or absolute form `https://host/...`)")]
    Target(String),
    /// A header line is not `name: value`, or folds onto the next line.
    #[error("malformed header line {0:?}")]
    Header(String),
    /// A line end that is not CRLF, or a NUL byte.
    #[error("{what} at offset {offset} of the request head (lines must end with CRLF)")]
    LineEnd {
        /// `bare CR`, `bare LF` or `NUL byte`.
        what: &'static str,
        /// Offset in the head.
        offset: usize,
    },
    /// More header lines than [`MAX_HEADERS`].
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    /// HTTP/1.1 without exactly one Host header.
    #[error("HTTP/1.1 request needs exactly one Host header, found {0}")]
    Host(usize),
    /// Both Content-Length and Transfer-Encoding (request smuggling).
    #[error("request has both Content-Length and Transfer-Encoding")]
    Framing,
    /// A Transfer-Encoding other than `chunked`, or one in HTTP/1.0.
    #[error("unsupported Transfer-Encoding {0:?} (only \"chunked\", in HTTP/1.1)")]
    TransferCoding(String),
    /// A request target that is not UTF-8.
    #[error("request target is not valid text")]
    Encoding,
    /// A Content-Length that is not one decimal number.
    #[error("invalid or conflicting Content-Length {0:?}")]
    Length(String),
}

impl HeadError {
    /// The outcome this refusal closes the connection with; its
    /// [`Kind::http_status`] is the status the client is answered with.
    pub fn kind(&self) -> Kind {
        match self {
            HeadError::TooManyHeaders => Kind::TooManyHeaders,
            _ => Kind::BadRequest,
        }
    }
}

/// How long the request body is, from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body: neither Content-Length nor Transfer-Encoding.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`: until the client stops sending.
    Chunked,
}

/// A parsed request head, borrowing from the buffer it was read into.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The request target as the agent should see it before routing
    /// rewrites: origin form, even when the client sent absolute form.
    pub target: &'a str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Headers in order; values without surrounding blanks.
    pub headers: Vec<(&'a str, &'a [u8])>,
    /// `Upgrade: websocket` with `Connection: upgrade` on a GET without a
    /// body.
    pub websocket: bool,
    /// The body's framing.
    pub body: Body,
    /// Length of the head including the blank line; body bytes follow.
    pub len: usize,
}

/// The end of the head (index after `\r\n\r\n`), if the buffer holds it.
/// `from` lets a caller resume the scan where the last one stopped.
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    buf.get(start..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| start + i + 4)
}

/// Refuse any line end but CRLF, and NUL, anywhere in `head`: agents that
/// split lines on a bare CR or LF would otherwise see other headers (or
/// another request) than splicegate checked.
fn check_line_ends(head: &[u8]) -> Result<(), HeadError> {
    let mut prev = 0u8;
    for (i, &b) in head.iter().enumerate() {
        let bad = match b {
            0 => Some("NUL byte"),
            b'\n' if prev != b'\r' => Some("bare LF"),
            _ if prev == b'\r' && b != b'\n' => Some("bare CR"),
            _ => None,
        };
        if let Some(what) = bad {
            let offset = if what == "bare CR" { i - 1 } else { i };
            return Err(HeadError::LineEnd { what, offset });
        }
        prev = b;
    }
    if prev == b'\r' {
        return Err(HeadError::LineEnd {
            what: "bare CR",
            offset: head.len() - 1,
        });
    }
    Ok(())
}

/// Parse a complete head (`buf` must end at or after its blank line).
pub fn parse(buf: &[u8]) -> Result<RequestHead<'_>, HeadError> {
    let len = head_end(buf, 0).ok_or_else(|| HeadError::RequestLine(String::new()))?;
    let raw = &buf[..len];
    let first = raw.split(|&b| b == b'\r').next().unwrap_or_default();
    let bad_line = || HeadError::RequestLine(clip(&String::from_utf8_lossy(first)));
    if first.is_empty() {
        // An empty line before the request line.
        return Err(bad_line());
    }
    check_line_ends(raw)?;

    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(raw) {
        Ok(httparse::Status::Complete(n)) if n == len => {}
        Ok(_) => return Err(bad_line()),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(httparse::Error::Version) => {
            let v = first.rsplit(|&b| b == b' ').next().unwrap_or_default();
            return Err(HeadError::Version(clip(&String::from_utf8_lossy(v))));
        }
        Err(httparse::Error::HeaderName | httparse::Error::HeaderValue) => {
            return Err(HeadError::Header(bad_header_line(raw)))
        }
        Err(_) if std::str::from_utf8(first).is_err() => return Err(HeadError::Encoding),
        Err(_) => return Err(bad_line()),
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(bad_line());
    };
    let target = origin_form(target).ok_or_else(|| HeadError::Target(clip(target)))?;

    let mut headers = Vec::with_capacity(req.headers.len());
    let (mut hosts, mut length, mut chunked) = (0, None::<u64>, false);
    let (mut upgrade_ws, mut conn_upgrade) = (false, false);
    for h in req.headers.iter() {
        let (name, value) = (h.name, trim(h.value));
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = (!value.is_empty() && value.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(value).ok()?.parse().ok())
                .flatten()
                .ok_or_else(|| HeadError::Length(clip(&String::from_utf8_lossy(value))))?;
            if length.is_some_and(|m| m != n) {
                return Err(HeadError::Length(clip(&String::from_utf8_lossy(value))));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || minor == 0 || !value.eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::TransferCoding(clip(&String::from_utf8_lossy(
                    value,
                ))));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            conn_upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
        }
        headers.push((name, value));
    }
    if minor == 1 && hosts != 1 {
        return Err(HeadError::Host(hosts));
    }
    if length.is_some() && chunked {
        return Err(HeadError::Framing);
    }
    let body = match (length, chunked) {
        (Some(n), _) => Body::Length(n),
        (None, true) => Body::Chunked,
        (None, false) => Body::None,
    };
    Ok(RequestHead {
        method,
        target,
        minor,
        headers,
        websocket: upgrade_ws
            && conn_upgrade
            && minor == 1
            && method == "GET"
            && body == Body::None,
        body,
        len,
    })
}

/// The first header line that is not `token ":" value`, for the error
/// message (only computed on the error path).
fn bad_header_line(head: &[u8]) -> String {
    let text = String::from_utf8_lossy(head);
    let line = text
        .split("\r\n")
        .skip(1)
        .find(|l| match l.split_once(':') {
            Some((n, _)) => n.is_empty() || !n.bytes().all(is_tchar),
            None => !l.is_empty(),
        })
        .unwrap_or_default();
    clip(line)
}

/// Comma-separated list elements, without surrounding blanks, empty ones
/// skipped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|t| !t.is_empty())
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t');
    let end = v.iter().rposition(|&b| b != b' ' && b != b'\t');
    match (start, end) {
        (Some(s), Some(e)) => &v[s..=e],
        _ => &[],
    }
}

/// A header name compared and hashed without regard to ASCII case.
#[derive(Debug, Clone, Copy)]
struct NoCase<'a>(&'a [u8]);

impl PartialEq for NoCase<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(other.0)
    }
}

impl Eq for NoCase<'_> {}

impl Hash for NoCase<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.0.len());
        for b in self.0 {
            state.write_u8(b.to_ascii_lowercase());
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Set lookups and list elements visited by [`rewrite`], so a test can
    /// check that its work is linear in the head.
    pub(crate) static REWRITE_STEPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[inline]
fn step() {
    #[cfg(test)]
    REWRITE_STEPS.with(|c| c.set(c.get() + 1));
}

/// Client information set on the forwarded request: `X-Real-IP`,
/// `X-Forwarded-For` and `X-Forwarded-Proto`, replacing whatever the
/// client sent in those and in `Forwarded`, `X-Forwarded-Host` and
/// `X-Forwarded-Port`.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded {
    /// The real client address (from the PROXY header, else the peer).
    pub client: IpAddr,
}

/// The head sent to the agent: the request line with `path`; the client's
/// headers minus hop-by-hop ones and those the client lists in
/// `Connection` (never `Host`, `Content-Length` or `Transfer-Encoding`),
/// minus the forwarding headers when splicegate sets its own; then
/// `Connection: close`, or `Connection: Upgrade` with `Upgrade: websocket`
/// for a WebSocket handshake. One pass over the headers with a set of the
/// `Connection` tokens: linear in the head's size.
pub fn rewrite(head: &RequestHead<'_>, path: &str, fwd: Option<Forwarded>) -> Vec<u8> {
    let mut listed: HashSet<NoCase<'_>> = HashSet::new();
    for (name, value) in &head.headers {
        step();
        if name.eq_ignore_ascii_case("connection") {
            for t in tokens(value) {
                step();
                listed.insert(NoCase(t));
            }
        }
    }
    let mut out = Vec::with_capacity(head.len + 160);
    let _ = write!(
        Out(&mut out),
        "{} {} HTTP/1.{}\r\n",
        head.method,
        path,
        head.minor
    );
    for (name, value) in &head.headers {
        step();
        let is = |list: &[&str]| list.iter().any(|h| name.eq_ignore_ascii_case(h));
        let drop = if is(&PROTECTED) {
            false
        } else {
            is(&HOP_BY_HOP)
                || (fwd.is_some() && is(&FORWARDING))
                || listed.contains(&NoCase(name.as_bytes()))
        };
        if !drop {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
    if let Some(f) = fwd {
        let _ = write!(
            Out(&mut out),
            "X-Real-IP: {ip}\r\nX-Forwarded-For: {ip}\r\nX-Forwarded-Proto: https\r\n",
            ip = f.client
        );
    }
    if head.websocket {
        out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    } else {
        out.extend_from_slice(b"Connection: close\r\n\r\n");
    }
    out
}

/// `fmt::Write` into a byte vector.
struct Out<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Out<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// What the agent answered: its status and where its body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// Body bytes after the head, when the head says (`Content-Length`, or
    /// 0 for 1xx, 204 and 304); None when the body runs until the agent
    /// closes or is chunked.
    pub body: Option<u64>,
    /// Length of the head including the blank line.
    pub len: usize,
}

/// Largest response head splicegate reads from an agent.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Parse the agent's response head from the bytes received so far:
/// `Ok(None)` while incomplete, an error message when it is not HTTP.
pub fn parse_response(buf: &[u8]) -> Result<Option<ResponseHead>, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => {
            return Err(format!(
                "response head larger than {MAX_RESPONSE_HEAD} bytes"
            ))
        }
        Err(e) => return Err(format!("response head does not parse: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let mut body = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            body = std::str::from_utf8(trim(h.value))
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        }
    }
    if (100..200).contains(&status) || status == 204 || status == 304 {
        body = Some(0);
    } else if chunked {
        body = None;
    }
    Ok(Some(ResponseHead { status, body, len }))
}

/// The status code of a response's first line (`HTTP/1.1 101 ...`).
pub fn response_status(first: &[u8]) -> Option<u16> {
    let rest = first.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// A complete response from splicegate itself, closing the connection.
/// the connection id an operator can find in the access log.
pub fn error_page(status: u16, reason: &str, id: u64) -> Vec<u8> {
    let title = status_text(status);
    let body = format!(
        "<!DOCTYPE html>\n<html><head><title>{status} {title}</title></head><body>\n<h1>{status} {title}</h1>\n<p>splicegate: {}</p>\n<p>connection {id}</p>\n</body></html>\n",
        escape(reason)
    );
    let mut out = format!(
        "HTTP/1.1 {status} {title}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.push_str(&body);
    out.into_bytes()
}

/// A redirect to `location` (a path on this proxy).
pub fn redirect(location: &str) -> Vec<u8> {
    format!("HTTP/1.1 301 Moved Permanently\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
}

/// The health answer: 200 `ok`, or 503 with why (draining, or a required
/// pool without a healthy agent).
pub fn health(unhealthy: Option<&str>) -> Vec<u8> {
    let (status, body) = match unhealthy {
        Some(why) => (503, format!("{why}\n")),
        None => (200, "ok\n".to_owned()),
    };
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        status_text(status),
        body.len()
    )
    .into_bytes()
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// Origin form as is; absolute form (`https://host:port/p?q`) reduced to
/// its path and query, as RFC 9112 §3.2.2 asks servers to accept.
fn origin_form(target: &str) -> Option<&str> {
    if target.starts_with('/') {
        return Some(target);
    }
    let rest = target
        .strip_prefix("https://")
        .or_else(|| target.strip_prefix("http://"))?;
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => Some(&rest[i..]),
        Some(_) => None,
        None => Some("/"),
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// At most 80 characters of `s`, for error messages.
fn clip(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests;
