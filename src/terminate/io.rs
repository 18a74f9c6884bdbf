//! Terminate mode's bounded reads and writes around the exchange: the
//! client's request head, the agent's answer to a WebSocket handshake,
//! splicegate's own complete responses, and the agent leg as one stream
//! type whether it is TLS or plain TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::http;
use super::{ClientStream, Fail};
use crate::context::{Kind, TerminateConfig};

/// The agent leg: plain TCP or TLS.
pub(super) enum Agent {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Agent {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Agent::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Agent::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Agent {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Agent::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Agent::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Agent::Plain(s) => Pin::new(s).poll_flush(cx),
            Agent::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Agent::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Agent::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The request as read: the head, and any body bytes after it.
pub(super) struct Request {
    pub(super) buf: Vec<u8>,
    pub(super) head_len: usize,
}

/// How reading the request head failed.
enum HeadRead {
    TooLarge(usize),
    Timeout(usize),
    Closed(usize),
    Io(io::Error),
}

/// Read the request head, bounded by `head_max_bytes` and `head_timeout`.
pub(super) async fn read_request(
    client: &mut ClientStream,
    set: &TerminateConfig,
) -> Result<Request, Fail> {
    let mut buf = Vec::with_capacity(2048);
    match read_head(client, &mut buf, set.head_max_bytes, set.head_timeout).await {
        Ok(head_len) => Ok(Request { buf, head_len }),
        Err(HeadRead::TooLarge(n)) => Err(Fail::page(
            Kind::HeadTooLarge,
            format!(
                "http: request head exceeds {} bytes ({n} read without its end)",
                set.head_max_bytes
            ),
        )),
        Err(HeadRead::Timeout(n)) => Err(Fail::page(
            Kind::HeadTimeout,
            format!(
                "http: request head not complete within {:?} ({n} bytes received)",
                set.head_timeout
            ),
        )),
        Err(HeadRead::Closed(0)) => Err(Fail::quiet(
            Kind::NoRequest,
            "http: client closed the connection without sending a request",
        )),
        Err(HeadRead::Closed(n)) => Err(Fail::quiet(
            Kind::Truncated,
            format!("http: client closed after {n} bytes of an incomplete request head"),
        )),
        Err(HeadRead::Io(e)) => Err(Fail::quiet(
            Kind::IoError,
            format!("http: read from client failed before the request head was complete: {e}"),
        )),
    }
}

/// Read until the end of the request head; returns the head's length
/// (`buf` may hold body bytes after it).
async fn read_head(
    client: &mut ClientStream,
    buf: &mut Vec<u8>,
    cap: usize,
    timeout: Duration,
) -> Result<usize, HeadRead> {
    let deadline = Instant::now() + timeout;
    let mut scanned = 0;
    loop {
        if let Some(end) = http::head_end(buf, scanned) {
            return Ok(end);
        }
        if buf.len() >= cap {
            return Err(HeadRead::TooLarge(buf.len()));
        }
        scanned = buf.len();
        let room = (cap - buf.len()).min(4096);
        let old = buf.len();
        buf.resize(old + room, 0);
        let read = tokio::time::timeout_at(deadline, client.read(&mut buf[old..])).await;
        let n = match read {
            Err(_) => {
                buf.truncate(old);
                return Err(HeadRead::Timeout(old));
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Ok(Err(e)) => return Err(HeadRead::Io(e)),
            Ok(Ok(n)) => n,
        };
        buf.truncate(old + n);
        if n == 0 {
            return Err(HeadRead::Closed(old));
        }
    }
}

/// Read the agent's response head (bounded in size and time). Returns it
/// parsed, with every byte read (the head and any body bytes after it).
pub(super) async fn read_response<A: AsyncRead + Unpin>(
    agent: &mut A,
    wait: Duration,
) -> Result<(http::ResponseHead, Vec<u8>), Fail> {
    let mut buf = Vec::with_capacity(1024);
    let work = async {
        let mut scanned = 0;
        loop {
            if let Some(end) = http::head_end(&buf, scanned) {
                return match http::parse_response(&buf[..end]) {
                    Ok(Some(head)) => Ok(head),
                    Ok(None) => Err(format!("response head ends at {end} but is incomplete")),
                    Err(e) => Err(e),
                };
            }
            if buf.len() >= http::MAX_RESPONSE_HEAD {
                return Err(format!(
                    "response head larger than {} bytes",
                    http::MAX_RESPONSE_HEAD
                ));
            }
            scanned = buf.len();
            if buf.capacity() == buf.len() {
                buf.reserve(4096.min(http::MAX_RESPONSE_HEAD - buf.len()));
            }
            match agent.read_buf(&mut buf).await {
                Ok(0) => return Err("agent closed the connection without a response".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("read from agent failed: {e}")),
            }
        }
    };
    match tokio::time::timeout(wait, work).await {
        Ok(Ok(head)) => Ok((head, buf)),
        Ok(Err(why)) => Err(Fail::page(
            Kind::BadResponse,
            format!("upstream: WebSocket handshake: {why}"),
        )),
        Err(_) => Err(Fail::page(
            Kind::AgentTimeout,
            format!("upstream: WebSocket handshake: no response from the agent within {wait:?}"),
        )),
    }
}

/// Write a complete response and close (TLS close_notify, then FIN),
/// bounded in time so a client that does not read cannot hold the task.
pub(super) async fn write_and_close(client: &mut ClientStream, bytes: &[u8], limit: Duration) {
    let work = async {
        client.write_all(bytes).await?;
        client.shutdown().await
    };
    if let Ok(Err(e)) | Err(e) = tokio::time::timeout(limit, work)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))
    {
        tracing::debug!(error = %e, "could not deliver the response");
    }
}

/// Answer plain HTTP sent to a terminate listener's TLS port, as nginx's
/// "plain HTTP request was sent to HTTPS port".
pub async fn reply_plain_http(client: &mut TcpStream, id: u64) {
    let page = http::error_page(
        400,
        "this port speaks HTTPS: the request was sent as plain HTTP",
        id,
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        client.write_all(&page).await?;
        client.shutdown().await
    })
    .await;
}
