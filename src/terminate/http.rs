//! The HTTP/1.x request head: parse the request line and headers that
//! routing needs, rewrite the head for the agent, and render the proxy's
//! own responses. Pure: no I/O.
//!
//! Only the head is parsed. The body, and everything after the agent's
//! `101 Switching Protocols`, is forwarded as bytes. The request sent to the
//! agent carries `Connection: close` (or `Connection: Upgrade` for a
//! WebSocket), so each client connection carries one request to one agent;
//! see docs/terminate-mode.md for why.

use std::fmt::Write as _;
use std::net::IpAddr;

/// Why a request head was rejected (all answered with 400).
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
    /// HTTP/1.1 without exactly one Host header.
    #[error("HTTP/1.1 request needs exactly one Host header, found {0}")]
    Host(usize),
    /// Both Content-Length and Transfer-Encoding (request smuggling).
    #[error("request has both Content-Length and Transfer-Encoding")]
    Framing,
    /// Bytes that are not text.
    #[error("request head is not valid text")]
    Encoding,
    /// A Content-Length that is not one decimal number.
    #[error("invalid or conflicting Content-Length {0:?}")]
    Length(String),
}

/// How long the request body is, from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body: neither Content-Length nor Transfer-Encoding.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding` (chunked): until the client stops sending.
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
    /// Headers in order.
    pub headers: Vec<(&'a str, &'a str)>,
    /// `Upgrade: websocket` with `Connection: upgrade`.
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

/// Parse a complete head (`buf` must end at or after its blank line).
pub fn parse(buf: &[u8]) -> Result<RequestHead<'_>, HeadError> {
    let len = head_end(buf, 0).ok_or_else(|| HeadError::RequestLine(String::new()))?;
    let text = std::str::from_utf8(&buf[..len]).map_err(|_| HeadError::Encoding)?;
    let mut lines = text[..len - 4].split("\r\n");
    let line = lines.next().unwrap_or("");
    let bad_line = || HeadError::RequestLine(clip(line));
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad_line());
    };
    if method.is_empty() || !method.bytes().all(is_tchar) || target.is_empty() {
        return Err(bad_line());
    }
    if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad_line());
    }
    let minor = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        v => return Err(HeadError::Version(clip(v))),
    };
    let target = origin_form(target).ok_or_else(|| HeadError::Target(clip(target)))?;

    let mut headers = Vec::new();
    let (mut hosts, mut length, mut chunked) = (0, None::<u64>, false);
    let (mut upgrade_ws, mut conn_upgrade) = (false, false);
    for l in lines {
        // Bare CR, LF or NUL inside a line would let a client smuggle a
        // header (or a request) past the rewrite to agents that split on
        // them; folded lines are obsolete (RFC 9112 §5.2).
        if l.starts_with([' ', '\t']) || l.contains(['\r', '\n', '\0']) {
            return Err(HeadError::Header(clip(l)));
        }
        let (name, value) = l
            .split_once(':')
            .ok_or_else(|| HeadError::Header(clip(l)))?;
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(HeadError::Header(clip(l)));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| value.parse().ok())
                .flatten()
                .ok_or_else(|| HeadError::Length(clip(value)))?;
            if length.is_some_and(|m| m != n) {
                return Err(HeadError::Length(clip(value)));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            conn_upgrade |= has_token(value, "upgrade");
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
        websocket: upgrade_ws && conn_upgrade && minor == 1 && method == "GET",
        body,
        len,
    })
}

/// Headers a proxy consumes rather than forwards (RFC 9110 §7.6.1), plus
/// the forwarding headers splicegate sets itself when asked to.
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Client information added to the forwarded request, as nginx's
/// `X-Real-IP`, `X-Forwarded-For` (appended) and `X-Forwarded-Proto`.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded {
    /// The real client address.
    pub client: IpAddr,
}

/// The head sent to the agent: the request line with `path`, the client's
/// headers minus hop-by-hop ones (and any listed in the `Connection`
/// header), then `Connection: close`, or `Connection: Upgrade` with
/// `Upgrade: websocket` for a WebSocket handshake.
pub fn rewrite(head: &RequestHead<'_>, path: &str, fwd: Option<Forwarded>) -> Vec<u8> {
    let mut out = String::with_capacity(head.len + 128);
    let _ = write!(out, "{} {} HTTP/1.{}\r\n", head.method, path, head.minor);
    let listed: Vec<&str> = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .collect();
    let mut xff: Option<&str> = None;
    for (name, value) in &head.headers {
        if hop_by_hop(name) || listed.iter().any(|l| l.eq_ignore_ascii_case(name)) {
            continue;
        }
        if fwd.is_some() {
            if name.eq_ignore_ascii_case("x-forwarded-for") {
                xff = Some(value);
                continue;
            }
            if name.eq_ignore_ascii_case("x-real-ip")
                || name.eq_ignore_ascii_case("x-forwarded-proto")
            {
                continue;
            }
        }
        let _ = write!(out, "{name}: {value}\r\n");
    }
    if let Some(f) = fwd {
        let _ = write!(out, "X-Real-IP: {}\r\n", f.client);
        match xff {
            Some(prev) => {
                let _ = write!(out, "X-Forwarded-For: {prev}, {}\r\n", f.client);
            }
            None => {
                let _ = write!(out, "X-Forwarded-For: {}\r\n", f.client);
            }
        }
        out.push_str("X-Forwarded-Proto: https\r\n");
    }
    if head.websocket {
        out.push_str("Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    } else {
        out.push_str("Connection: close\r\n\r\n");
    }
    out.into_bytes()
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
/// The body is a short HTML page a browser shows, naming the reason and
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

fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
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
mod tests {
    use super::*;

    #[test]
    fn parses_and_rewrites_a_websocket_handshake() {
        let raw = b"GET /10.0.0.1/ws?t=1 HTTP/1.1\r\nHost: proxy\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: abc\r\nX-Forwarded-For: 1.1.1.1\r\nKeep-Alive: 5\r\n\r\nBODY";
        let h = parse(raw).unwrap();
        assert_eq!(
            (h.method, h.target, h.minor),
            ("GET", "/10.0.0.1/ws?t=1", 1)
        );
        assert!(h.websocket);
        assert_eq!(&raw[h.len..], b"BODY");
        let out = rewrite(
            &h,
            "/ws?t=1",
            Some(Forwarded {
                client: "192.0.2.7".parse().unwrap(),
            }),
        );
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "GET /ws?t=1 HTTP/1.1\r\nHost: proxy\r\nSec-WebSocket-Key: abc\r\nX-Real-IP: 192.0.2.7\r\nX-Forwarded-For: 1.1.1.1, 192.0.2.7\r\nX-Forwarded-Proto: https\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        );
    }

    #[test]
    fn plain_requests_close_after_one_response() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n";
        let h = parse(raw).unwrap();
        assert!(!h.websocket);
        let out = String::from_utf8(rewrite(&h, "/", None)).unwrap();
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn body_framing() {
        let h =
            parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
                .unwrap();
        assert_eq!(h.body, Body::Length(5));
        let h = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(h.body, Body::Chunked);
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap().body,
            Body::None
        );
    }

    #[test]
    fn absolute_form_and_http10() {
        let h = parse(b"GET https://proxy:8443/desk1/x?y HTTP/1.1\r\nHost: proxy\r\n\r\n").unwrap();
        assert_eq!(h.target, "/desk1/x?y");
        let h = parse(b"GET http://proxy HTTP/1.1\r\nHost: proxy\r\n\r\n").unwrap();
        assert_eq!(h.target, "/");
        let h = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(h.minor, 0);
    }

    #[test]
    fn rejects_bad_heads() {
        for (raw, want) in [
            (&b"GET /\r\n\r\n"[..], "request line"),
            (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
            (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "version"),
            (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", "not a path"),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", "not a path"),
            (b"GET / HTTP/1.1\r\n\r\n", "Host"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
            (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "header line"),
            (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", "header line"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
            (b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", "text"),
            (b"GET / HTTP/1.1\r\nHost: a\nX-Real-IP: 1.2.3.4\r\n\r\n", "header line"),
            (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", "header line"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", "Content-Length"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length"),
        ] {
            let e = parse(raw).unwrap_err().to_string();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(raw));
        }
    }

    /// Random heads built from the bytes that matter to the parser never
    /// panic, and whatever parses routes without panicking too.
    #[test]
    fn random_heads_never_panic() {
        let alphabet: &[&[u8]] = &[
            b"GET",
            b"POST",
            b" ",
            b"/",
            b"?",
            b":",
            b"\r\n",
            b"\r",
            b"\n",
            b"\0",
            b"HTTP/1.1",
            b"HTTP/1.0",
            b"Host",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Upgrade",
            b"websocket",
            b"Connection",
            b"1",
            b"999",
            b".",
            b"10.150.248.180",
            b"\xff",
            b"\xc3\xa9",
            b"https://",
            b"\t",
            b",",
            b"*",
        ];
        let mut table = crate::route::path::PathTable::new();
        table.agent_in_path = Some(crate::route::path::PathAgent {
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            ports: vec![8443],
            strip: true,
        });
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            let mut head = b"GET /".to_vec();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for i in 0..(x % 40) {
                let k = (x.rotate_left(i as u32 * 5) % alphabet.len() as u64) as usize;
                head.extend_from_slice(alphabet[k]);
            }
            let target = String::from_utf8_lossy(&head[4..]).into_owned();
            let _ = table.resolve(&target);
            head.extend_from_slice(b"\r\n\r\n");
            if let Ok(h) = parse(&head) {
                let _ = rewrite(
                    &h,
                    h.target,
                    Some(Forwarded {
                        client: "192.0.2.1".parse().unwrap(),
                    }),
                );
                let _ = table.resolve(h.target);
            }
        }
    }

    #[test]
    fn head_end_resumes() {
        let buf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nx";
        assert_eq!(head_end(buf, 0), Some(buf.len() - 1));
        assert_eq!(head_end(buf, 26), Some(buf.len() - 1));
        assert_eq!(head_end(&buf[..20], 0), None);
    }

    #[test]
    fn statuses_and_pages() {
        assert_eq!(
            response_status(b"HTTP/1.1 101 Switching Protocols\r\n"),
            Some(101)
        );
        assert_eq!(response_status(b"HTTP/1.0 404 x"), Some(404));
        assert_eq!(response_status(b"\x16\x03\x01"), None);
        let page = String::from_utf8(error_page(403, "agent <x>", 7)).unwrap();
        assert!(page.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(page.contains("agent &lt;x&gt;") && page.contains("connection 7"));
    }
}
