//! ClientHello sniffing: buffer the client's first bytes until one complete
//! TLS ClientHello handshake message is available, then extract SNI and ALPN.
//!
//! A ClientHello may arrive in any number of TCP segments (down to one byte
//! each) and may span several TLS records. [`HelloParser`] reassembles the
//! handshake message incrementally, record by record, so feeding it a growing
//! buffer costs time proportional to the bytes received, not to their square.
//! [`read_client_hello`] drives it from a socket under a size cap and a total
//! deadline. Every byte read is kept so the caller can replay it to the agent.

use std::time::Duration;

use tls_parser::{
    parse_tls_extension_alpn_content, parse_tls_extension_sni_content,
    parse_tls_handshake_client_hello, TlsExtension,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::outcome::{Alert, Kind};

/// TLS record header: type (1), legacy version (2), length (2).
const RECORD_HEADER: usize = 5;
/// Largest plaintext record fragment allowed by RFC 8446 section 5.1.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
/// Handshake message header: type (1), length (3).
const HANDSHAKE_HEADER: usize = 4;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_ALERT: u8 = 21;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_ECH: u16 = 0xfe0d;

/// What the proxy learned from a complete ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name, normalised: lower case, one trailing dot removed.
    /// Under ECH this is the outer, public name.
    pub sni: Option<String>,
    /// ALPN protocol names offered by the client, in order.
    pub alpn: Vec<String>,
    /// The client sent an Encrypted Client Hello extension.
    pub ech: bool,
}

impl ClientHello {
    /// ALPN list joined with commas, for logs (`-` when empty).
    pub fn alpn_display(&self) -> String {
        if self.alpn.is_empty() {
            "-".to_owned()
        } else {
            self.alpn.join(",")
        }
    }
}

/// Why sniffing did not produce a ClientHello. Each variant is a distinct
/// close reason; [`SniffError::kind`] gives a stable label for counting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniffError {
    /// The first bytes are not a TLS handshake record.
    #[error("not TLS: {0}")]
    NotTls(String),
    /// The handshake message (or its raw framing) exceeds the configured cap.
    #[error("ClientHello too large: {what} of {len} bytes exceeds the cap of {cap} bytes")]
    TooLarge {
        /// Which size was too large.
        what: &'static str,
        /// The size announced or reached.
        len: usize,
        /// The configured cap.
        cap: usize,
    },
    /// The deadline passed before a complete ClientHello arrived.
    #[error(
        "timed out after {after:?} waiting for a complete ClientHello ({received} bytes received)"
    )]
    Timeout {
        /// Time allowed from accept.
        after: Duration,
        /// Bytes received when the deadline passed.
        received: usize,
    },
    /// The client closed before the ClientHello was complete.
    #[error("client closed after {received} bytes, before the ClientHello was complete")]
    Truncated {
        /// Bytes received before EOF.
        received: usize,
    },
    /// The bytes are TLS records but not a well-formed ClientHello.
    #[error("malformed ClientHello: {0}")]
    Malformed(String),
    /// The socket failed while reading.
    #[error("read error while waiting for the ClientHello: {0}")]
    Io(String),
    /// A PROXY protocol header arrived where a ClientHello was expected.
    #[error("a PROXY protocol header where a ClientHello was expected")]
    ProxyHeader,
}

impl SniffError {
    /// The outcome this failure closes the connection with.
    pub fn kind(&self) -> Kind {
        match self {
            SniffError::NotTls(_) => Kind::NotTls,
            SniffError::TooLarge { .. } => Kind::TooLarge,
            SniffError::Timeout { .. } => Kind::Timeout,
            SniffError::Truncated { .. } => Kind::Truncated,
            SniffError::Malformed(_) => Kind::Malformed,
            SniffError::Io(_) => Kind::Io,
            SniffError::ProxyHeader => Kind::ProxyUntrusted,
        }
    }

    /// Label for `splicegate_client_hello_total`.
    pub fn metric(&self) -> &'static str {
        match self {
            SniffError::ProxyHeader => "proxy_header",
            other => other.kind().as_str(),
        }
    }

    /// The client sent plain text that looks like an HTTP request: a
    /// terminate listener answers it with a 400 saying the port speaks TLS.
    pub fn plain_http(&self) -> bool {
        matches!(self, SniffError::NotTls(m) if m.starts_with("plain text"))
    }
}

/// Result of feeding bytes to a [`HelloParser`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed.
    Incomplete,
    /// The ClientHello is complete.
    Done(ClientHello),
}

/// Incremental ClientHello reassembler.
///
/// Call [`HelloParser::advance`] with the whole buffer received so far each
/// time it grows; the parser remembers how far it got.
#[derive(Debug)]
pub struct HelloParser {
    cap: usize,
    /// Raw bytes consumed as complete records.
    consumed: usize,
    /// Reassembled handshake bytes from complete records.
    handshake: Vec<u8>,
}

impl HelloParser {
    /// A parser that refuses handshake messages larger than `cap` bytes.
    pub fn new(cap: usize) -> Self {
        HelloParser {
            cap,
            consumed: 0,
            handshake: Vec::new(),
        }
    }

    /// Raw bytes consumed as complete records so far; after
    /// [`Progress::Done`], where the bytes after the hello's records begin.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// Largest raw buffer worth reading for a handshake cap: every handshake
    /// byte could travel in its own record with a 5-byte header.
    pub fn raw_limit(cap: usize) -> usize {
        cap.saturating_mul(RECORD_HEADER + 1)
    }

    /// Continue parsing. `buf` must start with the same bytes as every
    /// earlier call's `buf` (it only grows).
    pub fn advance(&mut self, buf: &[u8]) -> Result<Progress, SniffError> {
        if self.consumed == 0 {
            check_first_bytes(buf)?;
            if crate::proxy_protocol::header_start(buf).is_some() {
                return Ok(Progress::Incomplete);
            }
        }
        loop {
            let rest = &buf[self.consumed..];
            if rest.len() < RECORD_HEADER {
                return Ok(Progress::Incomplete);
            }
            match rest[0] {
                CONTENT_HANDSHAKE => {}
                CONTENT_ALERT => {
                    return Err(SniffError::Malformed(
                        "alert record before the ClientHello was complete".into(),
                    ))
                }
                other => {
                    return Err(SniffError::Malformed(format!(
                        "record of content type {other} before the ClientHello was complete"
                    )))
                }
            }
            if rest[1] != 3 {
                return Err(SniffError::Malformed(format!(
                    "record version {}.{} is not TLS",
                    rest[1], rest[2]
                )));
            }
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            if len == 0 {
                return Err(SniffError::Malformed("empty handshake record".into()));
            }
            if len > MAX_RECORD_PAYLOAD {
                return Err(SniffError::Malformed(format!(
                    "record length {len} exceeds the TLS maximum of {MAX_RECORD_PAYLOAD}"
                )));
            }
            let available = rest.len() - RECORD_HEADER;
            let payload = &rest[RECORD_HEADER..RECORD_HEADER + available.min(len)];
            // Check the handshake header as soon as it is visible, even in a
            // partial record, so an oversized hello is refused early.
            self.check_handshake_header(payload)?;
            if available < len {
                return Ok(Progress::Incomplete);
            }
            self.handshake.extend_from_slice(payload);
            self.consumed += RECORD_HEADER + len;
            if let Some(total) = self.message_len() {
                if self.handshake.len() >= total {
                    return parse_client_hello(&self.handshake[..total]).map(Progress::Done);
                }
            }
        }
    }

    /// Total length of the handshake message (header included), once known.
    fn message_len(&self) -> Option<usize> {
        let h = self.handshake.get(..HANDSHAKE_HEADER)?;
        Some(HANDSHAKE_HEADER + u24(h[1], h[2], h[3]))
    }

    fn check_handshake_header(&self, partial: &[u8]) -> Result<(), SniffError> {
        let mut header = [0u8; HANDSHAKE_HEADER];
        let have = self.handshake.len().min(HANDSHAKE_HEADER);
        header[..have].copy_from_slice(&self.handshake[..have]);
        let take = (HANDSHAKE_HEADER - have).min(partial.len());
        header[have..have + take].copy_from_slice(&partial[..take]);
        let known = have + take;
        if known >= 1 && header[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(SniffError::Malformed(format!(
                "first handshake message has type {}, not ClientHello",
                header[0]
            )));
        }
        if known == HANDSHAKE_HEADER {
            let total = HANDSHAKE_HEADER + u24(header[1], header[2], header[3]);
            if total > self.cap {
                return Err(SniffError::TooLarge {
                    what: "handshake message",
                    len: total,
                    cap: self.cap,
                });
            }
        }
        Ok(())
    }
}

fn u24(a: u8, b: u8, c: u8) -> usize {
    (usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c)
}

/// Tell "not TLS at all" apart from "TLS but broken" from the first bytes.
fn check_first_bytes(buf: &[u8]) -> Result<(), SniffError> {
    let Some(&first) = buf.first() else {
        return Ok(());
    };
    match crate::proxy_protocol::header_start(buf) {
        Some(true) => return Err(SniffError::ProxyHeader),
        Some(false) => return Ok(()),
        None => {}
    }
    if first == CONTENT_HANDSHAKE {
        if let Some(&major) = buf.get(1) {
            if major != 3 {
                return Err(SniffError::NotTls(format!(
                    "handshake record with version major {major}"
                )));
            }
        }
        return Ok(());
    }
    // SSLv2-compatible hello: two-byte length with the high bit set, then
    // message type 1 (CLIENT-HELLO).
    if first & 0x80 != 0 && buf.get(2).is_none_or(|&t| t == 1) {
        return Err(SniffError::NotTls("SSLv2-style ClientHello".into()));
    }
    if first.is_ascii_uppercase() {
        let word: String = buf
            .iter()
            .take(8)
            .take_while(|b| b.is_ascii_alphabetic())
            .map(|&b| char::from(b))
            .collect();
        return Err(SniffError::NotTls(format!(
            "plain text starting with {word:?} (an HTTP request?)"
        )));
    }
    Err(SniffError::NotTls(format!(
        "first byte 0x{first:02x} is not a TLS handshake record"
    )))
}

/// A fatal alert record as a server sends it before its first handshake
/// message: plaintext, record version TLS 1.2 (RFC 8446 §5.1).
pub fn alert(desc: Alert) -> [u8; 7] {
    [CONTENT_ALERT, 3, 3, 0, 2, 2, desc as u8]
}

/// Parse one complete handshake message (4-byte header included) that
/// arrived without TLS records — QUIC carries it in CRYPTO frames. `msg`
/// must hold exactly the message the header announces.
pub fn parse_handshake(msg: &[u8]) -> Result<ClientHello, SniffError> {
    let Some(h) = msg.get(..HANDSHAKE_HEADER) else {
        return Err(SniffError::Malformed("truncated handshake header".into()));
    };
    if h[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(SniffError::Malformed(format!(
            "first handshake message has type {}, not ClientHello",
            h[0]
        )));
    }
    if msg.len() != HANDSHAKE_HEADER + u24(h[1], h[2], h[3]) {
        return Err(SniffError::Malformed(
            "handshake length does not match its header".into(),
        ));
    }
    parse_client_hello(msg)
}

/// Parse one complete handshake message (header included) as a ClientHello.
fn parse_client_hello(msg: &[u8]) -> Result<ClientHello, SniffError> {
    let body = &msg[HANDSHAKE_HEADER..];
    let (_, hello) = parse_tls_handshake_client_hello(body)
        .map_err(|_| SniffError::Malformed("ClientHello body does not parse".into()))?;
    let mut out = ClientHello::default();
    let mut ext = hello.ext.unwrap_or_default();
    // Walk extensions generically so unknown ones (GREASE, ECH, anything
    // newer than our parser) are skipped rather than failing the hello.
    while !ext.is_empty() {
        if ext.len() < 4 {
            return Err(SniffError::Malformed("truncated extension header".into()));
        }
        let ty = u16::from_be_bytes([ext[0], ext[1]]);
        let len = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
        let Some(data) = ext.get(4..4 + len) else {
            return Err(SniffError::Malformed(format!(
                "extension 0x{ty:04x} overruns the ClientHello"
            )));
        };
        match ty {
            EXT_SERVER_NAME if out.sni.is_none() => out.sni = Some(parse_sni(data)?),
            EXT_ALPN => out.alpn = parse_alpn(data)?,
            EXT_ECH => out.ech = true,
            _ => {}
        }
        ext = &ext[4 + len..];
    }
    Ok(out)
}

fn parse_sni(data: &[u8]) -> Result<String, SniffError> {
    let bad = |why: &str| SniffError::Malformed(format!("server_name extension: {why}"));
    let (_, parsed) = parse_tls_extension_sni_content(data).map_err(|_| bad("does not parse"))?;
    let TlsExtension::SNI(names) = parsed else {
        return Err(bad("does not parse"));
    };
    let name = names
        .iter()
        .find(|(ty, _)| ty.0 == 0)
        .map(|(_, n)| *n)
        .ok_or_else(|| bad("no host_name entry"))?;
    normalise_sni(name).ok_or_else(|| bad("host name is empty or has invalid characters"))
}

/// Lower-case the name and strip one trailing dot; refuse anything that is
/// not a plausible DNS name.
pub fn normalise_sni(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    let valid = !raw.is_empty()
        && raw.len() <= 253
        && raw
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && raw.split(|&b| b == b'.').all(|label| !label.is_empty());
    valid.then(|| String::from_utf8_lossy(raw).to_ascii_lowercase())
}

fn parse_alpn(data: &[u8]) -> Result<Vec<String>, SniffError> {
    let bad = || SniffError::Malformed("ALPN extension does not parse".into());
    let (_, parsed) = parse_tls_extension_alpn_content(data).map_err(|_| bad())?;
    let TlsExtension::ALPN(protos) = parsed else {
        return Err(bad());
    };
    Ok(protos
        .iter()
        .map(|p| crate::logging::printable(&String::from_utf8_lossy(p)).into_owned())
        .collect())
}

/// Read from `stream` until a complete ClientHello is buffered.
///
/// `buf` holds bytes already read (what followed a PROXY header); the hello
/// starts at its beginning. Returns the hello and every byte of the hello
/// and after it read so far (to be replayed to the agent).
/// `deadline` bounds the total time, not each read, so a client trickling
/// one byte at a time cannot hold the connection open past it.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: Vec<u8>,
    started: Instant,
    timeout: Duration,
    cap: usize,
) -> Result<(ClientHello, Vec<u8>), SniffError> {
    let mut parser = HelloParser::new(cap);
    let raw_limit = HelloParser::raw_limit(cap);
    buf.reserve(2048);
    let work = async {
        if !buf.is_empty() {
            if let Progress::Done(hello) = parser.advance(&buf)? {
                return Ok(hello);
            }
        }
        loop {
            if buf.len() >= raw_limit {
                return Err(SniffError::TooLarge {
                    what: "record framing",
                    len: buf.len(),
                    cap: raw_limit,
                });
            }
            if buf.capacity() == buf.len() {
                buf.reserve(buf.len().min(raw_limit - buf.len()).max(1024));
            }
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| SniffError::Io(e.to_string()))?;
            if n == 0 {
                return Err(SniffError::Truncated {
                    received: buf.len(),
                });
            }
            if let Progress::Done(hello) = parser.advance(&buf)? {
                return Ok(hello);
            }
        }
    };
    match tokio::time::timeout_at(started + timeout, work).await {
        Ok(Ok(hello)) => Ok((hello, buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SniffError::Timeout {
            after: timeout,
            received: buf.len(),
        }),
    }
}

#[cfg(test)]
mod tests;
