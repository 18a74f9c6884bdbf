//! Reading a PROXY header from a socket: required from trusted peers of a
//! listener, optional on the admin listener; bounded in bytes and time.

use super::{header_start, parse, Header, Mode, Parsed, ProxyError, V2_MAX};

/// Why no PROXY header was read from a trusted peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The header is invalid.
    #[error("{0}")]
    Protocol(#[from] ProxyError),
    /// The deadline passed first.
    #[error("timed out after {after:?} waiting for the PROXY header ({received} bytes received)")]
    Timeout {
        /// Time allowed from accept.
        after: std::time::Duration,
        /// Bytes received.
        received: usize,
    },
    /// The peer closed before the header was complete.
    #[error("peer closed after {received} bytes, before the PROXY header was complete")]
    Truncated {
        /// Bytes received.
        received: usize,
    },
    /// The socket failed.
    #[error("read error while waiting for the PROXY header: {0}")]
    Io(String),
}

impl ReadError {
    /// The outcome this failure closes the connection with.
    pub fn outcome(&self) -> crate::outcome::Kind {
        use crate::outcome::Kind;
        match self {
            ReadError::Protocol(_) => Kind::ProxyInvalid,
            ReadError::Timeout { .. } => Kind::ProxyTimeout,
            ReadError::Truncated { .. } => Kind::ProxyTruncated,
            ReadError::Io(_) => Kind::Io,
        }
    }

    /// Label for `splicegate_proxy_header_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::Protocol(e) => e.kind(),
            ReadError::Timeout { .. } => "timeout",
            ReadError::Truncated { .. } => "truncated",
            ReadError::Io(_) => "io",
        }
    }
}

/// Read a header from `stream` before `started + timeout`. Returns it and
/// the bytes that followed it in the same reads (the start of the hello).
/// Reads in small steps so no more than [`V2_MAX`] bytes are buffered.
pub async fn read_header<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    mode: Mode,
    started: tokio::time::Instant,
    timeout: std::time::Duration,
) -> Result<(Header, Vec<u8>), ReadError> {
    let (h, rest) = read_until(stream, started, timeout, |buf| match parse(buf, mode)? {
        Parsed::Done(h, used) => Ok(Some((Some(h), used))),
        Parsed::Incomplete => Ok(None),
    })
    .await?;
    // `decide` above only ever stops with a header.
    let h = h.ok_or(ReadError::Truncated {
        received: rest.len(),
    })?;
    Ok((h, rest))
}

/// Read a PROXY header of either version if `stream` starts with one, for
/// listeners where it is optional (the admin listener: the NLB's health
/// checks send one, a Prometheus scraper does not). Reads only until the
/// first bytes decide: an HTTP request is known at its first byte. Returns
/// the header, if any, and every byte read after it.
pub async fn read_optional<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    started: tokio::time::Instant,
    timeout: std::time::Duration,
) -> Result<(Option<Header>, Vec<u8>), ReadError> {
    read_until(stream, started, timeout, |buf| match header_start(buf) {
        None if !buf.is_empty() => Ok(Some((None, 0))),
        Some(true) => match parse(buf, Mode::Any)? {
            Parsed::Done(h, used) => Ok(Some((Some(h), used))),
            Parsed::Incomplete => Ok(None),
        },
        _ => Ok(None),
    })
    .await
}

/// Read from `stream` until `decide` (given every byte read so far) returns
/// a header (or none) and how many bytes it took, at most [`V2_MAX`] bytes
/// and before `started + timeout`. Returns that and the bytes after it.
async fn read_until<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    started: tokio::time::Instant,
    timeout: std::time::Duration,
    mut decide: impl FnMut(&[u8]) -> Result<Option<(Option<Header>, usize)>, ProxyError>,
) -> Result<(Option<Header>, Vec<u8>), ReadError> {
    use tokio::io::AsyncReadExt;
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let work = async {
        loop {
            if let Some(found) = decide(&buf)? {
                return Ok(found);
            }
            if buf.len() >= V2_MAX {
                return Err(ProxyError::TooLong {
                    len: buf.len(),
                    cap: V2_MAX,
                }
                .into());
            }
            if buf.capacity() == buf.len() {
                buf.reserve(512.min(V2_MAX - buf.len()));
            }
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| ReadError::Io(e.to_string()))?;
            if n == 0 {
                return Err(ReadError::Truncated {
                    received: buf.len(),
                });
            }
        }
    };
    match tokio::time::timeout_at(started + timeout, work).await {
        Ok(Ok((h, used))) => {
            buf.drain(..used);
            Ok((h, buf))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ReadError::Timeout {
            after: timeout,
            received: buf.len(),
        }),
    }
}
