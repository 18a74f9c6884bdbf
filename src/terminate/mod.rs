//! Terminate mode: TLS ends at splicegate, the agent is chosen from the
//! first HTTP request line, and the rest of the connection is streamed.
//!
//! One connection's way, after the PROXY header and the sniffed
//! ClientHello (shared with passthrough in [`crate::conn`]):
//! 1. TLS handshake with the client ([`certs`]: certificate by SNI);
//! 2. read the request head, bounded in size and time ([`http`]);
//! 3. route its path ([`crate::route::path`]): answer `/health`, a
//!    redirect or an error page locally, or choose an agent;
//! 4. connect (directly or through a pool), TLS to the agent
//!    ([`crate::upstream::tls`]) unless `upstream_tls = "off"`;
//! 5. send the rewritten head (`Connection: close`, or the WebSocket
//!    upgrade) and any body bytes already read;
//! 6. stream both ways ([`crate::forward::stream`]) until the agent's
//!    response ends, or, after a WebSocket upgrade, until either side
//!    closes or the tunnel is idle for `idle_timeout`.
//!
//! Each client connection carries exactly one request to one agent, so a
//! client that reuses its connection gets its second request routed afresh
//! on a new connection: see docs/terminate-mode.md.

pub mod certs;
pub mod http;
mod prefixed;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::TerminateConfig;
use crate::conn::{self, ListenerCtx, Record, Refusal};
use crate::forward::stream::{self, Seen, StreamOptions};
use crate::forward::{Counters, End};
use crate::route::path::PathDecision;
use crate::route::Target;
use crate::upstream::pool::PoolError;
use crate::upstream::tls::UpstreamTls;
use crate::upstream::{self, ConnectError};
use certs::CertStore;
use prefixed::Prefixed;

type ClientStream = TlsStream<Prefixed<TcpStream>>;

/// The agent leg: plain TCP or TLS.
enum Agent {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The TLS state of one terminate listener.
pub struct Tls {
    /// The certificates it presents (reloaded on SIGHUP).
    pub store: Arc<CertStore>,
    acceptor: TlsAcceptor,
    upstream: Option<TlsConnector>,
    settings: TerminateConfig,
}

impl Tls {
    /// Load certificates and build the client- and agent-side TLS
    /// configurations. Errors name the file and what is wrong with it.
    pub fn new(settings: &TerminateConfig) -> Result<Tls, String> {
        let store = Arc::new(CertStore::load(settings.certs.clone()).map_err(|e| e.to_string())?);
        let server = certs::server_config(Arc::clone(&store)).map_err(|e| e.to_string())?;
        let upstream = upstream::tls::connector(&settings.upstream_tls)?;
        if settings.upstream_tls == UpstreamTls::Insecure {
            tracing::warn!(
                event = "upstream_insecure",
                "upstream_tls = insecure: agent certificates are NOT verified"
            );
        }
        Ok(Tls {
            store,
            acceptor: TlsAcceptor::from(server),
            upstream,
            settings: settings.clone(),
        })
    }
}

/// How reading the request head failed.
enum HeadRead {
    TooLarge(usize),
    Timeout(usize),
    Closed(usize),
    Io(std::io::Error),
}

/// Serve a terminate-mode connection whose ClientHello (`replay`, every
/// byte read so far) has been sniffed.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    client: TcpStream,
    replay: Vec<u8>,
    ctx: &ListenerCtx,
    tls: &Tls,
    started: Instant,
    rec: &mut Record,
    id: u64,
    real_client: SocketAddr,
    out_header: Vec<u8>,
) -> Result<End, Refusal> {
    let cfg = &ctx.config;
    let set = &tls.settings;
    let left = cfg.hello_timeout.saturating_sub(started.elapsed());
    let accept = tls.acceptor.accept(Prefixed::new(replay, client));
    let mut client = match tokio::time::timeout(left, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err((
                "tls_handshake",
                format!("tls: handshake with the client failed: {e}"),
            ))
        }
        Err(_) => {
            return Err((
                "tls_handshake",
                format!(
                    "tls: handshake with the client not finished within {:?} of accept",
                    cfg.hello_timeout
                ),
            ))
        }
    };

    let mut buf = Vec::with_capacity(2048);
    let head_len = match read_head(&mut client, &mut buf, set.head_max_bytes, set.head_timeout)
        .await
    {
        Ok(n) => n,
        Err(HeadRead::TooLarge(n)) => {
            let why = format!(
                "http: request head exceeds {} bytes ({n} read without its end)",
                set.head_max_bytes
            );
            return Err(reply_error(&mut client, rec, 400, "head_too_large", why, id).await);
        }
        Err(HeadRead::Timeout(n)) => {
            let why = format!(
                "http: request head not complete within {:?} ({n} bytes received)",
                set.head_timeout
            );
            return Err(reply_error(&mut client, rec, 408, "head_timeout", why, id).await);
        }
        Err(HeadRead::Closed(0)) => {
            return Err((
                "no_request",
                "http: client closed the connection without sending a request".into(),
            ))
        }
        Err(HeadRead::Closed(n)) => {
            return Err((
                "truncated",
                format!("http: client closed after {n} bytes of an incomplete request head"),
            ))
        }
        Err(HeadRead::Io(e)) => {
            return Err((
                "io_error",
                format!("http: read from client failed before the request head was complete: {e}"),
            ))
        }
    };
    let head = match http::parse(&buf[..head_len]) {
        Ok(h) => h,
        Err(e) => {
            let why = format!("http: {e}");
            return Err(reply_error(&mut client, rec, 400, "bad_request", why, id).await);
        }
    };
    let path_only = head.target.split('?').next().unwrap_or("/");
    rec.path = Some(path_only.to_owned());

    let routing = ctx.routes.current();
    let decision = match routing.paths.resolve(head.target) {
        Ok(d) => d,
        Err(e) => {
            drop(routing);
            let why = format!("route: {e}");
            return Err(reply_error(&mut client, rec, e.status(), e.kind(), why, id).await);
        }
    };
    let (route, target, path) = match decision {
        PathDecision::Health => {
            let why = routing.unhealthy(ctx.metrics.draining());
            drop(routing);
            rec.status = Some(if why.is_some() { 503 } else { 200 });
            write_and_close(&mut client, &http::health(why.as_deref()), set.head_timeout).await;
            return Err(("health", "health answered locally".into()));
        }
        PathDecision::Redirect(location) => {
            drop(routing);
            rec.status = Some(301);
            write_and_close(&mut client, &http::redirect(&location), set.head_timeout).await;
            return Err(("redirect", format!("redirected to {location}")));
        }
        PathDecision::Forward {
            route,
            target,
            path,
        } => (route, target, path),
    };
    rec.route = Some(route);
    rec.agent = Some(target.to_string());

    let hello_wait = started.elapsed();
    let (tcp, _slot, attempt, agent_target) = match &target {
        Target::Pool(name) => {
            let Some(pool) = routing.pools.get(name).cloned() else {
                drop(routing);
                let why = format!("route: pool {name} does not exist");
                return Err(reply_error(&mut client, rec, 502, "no_route", why, id).await);
            };
            drop(routing);
            match pool
                .connect(real_client.ip(), cfg.connect_timeout, cfg.keepalive)
                .await
            {
                Ok(c) => {
                    let t = c.slot.agent().config.target.clone();
                    rec.agent = Some(c.slot.agent().name.clone());
                    (c.stream, Some(c.slot), c.attempt, t)
                }
                Err(e) => {
                    let status = match &e {
                        PoolError::AllFailed {
                            last: ConnectError::Timeout { .. },
                            ..
                        } => 504,
                        _ => 502,
                    };
                    let why = format!("upstream: {e}");
                    return Err(reply_error(&mut client, rec, status, e.kind(), why, id).await);
                }
            }
        }
        t => {
            drop(routing);
            match upstream::connect(t, cfg.connect_timeout, cfg.keepalive).await {
                Ok(s) => (s, None, 1, t.clone()),
                Err(e) => {
                    let status = if matches!(e, ConnectError::Timeout { .. }) {
                        504
                    } else {
                        502
                    };
                    let why = format!("upstream: {e}");
                    return Err(reply_error(&mut client, rec, status, e.kind(), why, id).await);
                }
            }
        }
    };
    let mut tcp = tcp;
    if !out_header.is_empty() {
        if let Err(e) = tcp.write_all(&out_header).await {
            let why = format!("upstream: writing the PROXY header to the agent failed: {e}");
            return Err(reply_error(&mut client, rec, 502, "io_error", why, id).await);
        }
    }

    let fwd = set.forwarded_headers.then_some(http::Forwarded {
        client: real_client.ip(),
    });
    // Only the request's own body goes to the agent: bytes after it (a
    // pipelined or smuggled second request) are dropped. A WebSocket is a
    // stream after the 101; a chunked body is forwarded until the client
    // stops, since finding its end would mean parsing the chunks.
    let mut client_limit = match (head.websocket, head.body) {
        (true, _) | (_, http::Body::Chunked) => None,
        (false, http::Body::None) => Some(0),
        (false, http::Body::Length(n)) => Some(n),
    };
    let mut first = http::rewrite(&head, &path, fwd);
    let early = &buf[head_len..];
    let early = match client_limit.as_mut() {
        Some(left) => {
            let keep = early
                .len()
                .min(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= keep as u64;
            &early[..keep]
        }
        None => early,
    };
    first.extend_from_slice(early);
    let websocket = head.websocket;
    let method = head.method.to_owned();
    drop(buf);

    let opts = StreamOptions {
        idle_timeout: if websocket {
            cfg.idle_timeout
        } else {
            set.request_idle_timeout
        },
        end_with_agent: !websocket,
        client_limit,
    };
    let mut agent = match &tls.upstream {
        None => Agent::Plain(tcp),
        Some(connector) => {
            let name = set.upstream_server_name.as_deref();
            match upstream::tls::handshake(connector, tcp, &agent_target, name, cfg.connect_timeout)
                .await
            {
                Ok(s) => Agent::Tls(Box::new(s)),
                Err(e) => {
                    let why = format!("upstream: {e}");
                    return Err(reply_error(&mut client, rec, 502, "agent_tls", why, id).await);
                }
            }
        }
    };
    let connect_time = started.elapsed() - hello_wait;
    let counters = conn::register(ctx, rec, id, connect_time);
    tracing::info!(
        event = "routed",
        sni = rec.hello.as_ref().and_then(|h| h.sni.as_deref()).unwrap_or("-"),
        method = %method,
        path = rec.path.as_deref().unwrap_or("-"),
        websocket,
        route = rec.route.as_deref().unwrap_or("-"),
        agent = rec.agent.as_deref().unwrap_or("-"),
        attempt,
        hello_us = hello_wait.as_micros() as u64,
        connect_us = connect_time.as_micros() as u64,
        "request routed"
    );
    let mut drain = ctx.drain.clone();
    let mut seen = Seen::default();
    let end = match &mut agent {
        Agent::Plain(s) => {
            forward(
                &mut client,
                s,
                &first,
                opts,
                &mut drain,
                &counters,
                &mut seen,
            )
            .await
        }
        Agent::Tls(s) => {
            forward(
                &mut client,
                s.as_mut(),
                &first,
                opts,
                &mut drain,
                &counters,
                &mut seen,
            )
            .await
        }
    };
    rec.status = seen.status;
    use std::sync::atomic::Ordering::Relaxed;
    if matches!(end, End::Done) && counters.to_client.load(Relaxed) == 0 {
        return Err((
            "agent_empty",
            "upstream: agent closed the connection without a response".into(),
        ));
    }
    Ok(end)
}

/// Send `first` (the rewritten head and early body bytes), then stream.
async fn forward<A: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientStream,
    agent: &mut A,
    first: &[u8],
    opts: StreamOptions,
    drain: &mut tokio::sync::watch::Receiver<bool>,
    counters: &Counters,
    seen: &mut Seen,
) -> End {
    let sent = async {
        agent.write_all(first).await?;
        agent.flush().await
    };
    if let Err(source) = sent.await {
        return End::Failed(crate::forward::PumpError::Write {
            side: crate::forward::Side::Agent,
            source,
        });
    }
    counters
        .to_agent
        .fetch_add(first.len() as u64, std::sync::atomic::Ordering::Relaxed);
    stream::run(client, agent, opts, drain, counters, seen).await
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
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Ok(Err(e)) => return Err(HeadRead::Io(e)),
            Ok(Ok(n)) => n,
        };
        buf.truncate(old + n);
        if n == 0 {
            return Err(HeadRead::Closed(old));
        }
    }
}

/// Answer with an error page, log-ready: returns the refusal for the
/// access log and records the status.
async fn reply_error(
    client: &mut ClientStream,
    rec: &mut Record,
    status: u16,
    kind: &'static str,
    reason: String,
    id: u64,
) -> Refusal {
    rec.status = Some(status);
    let page = http::error_page(status, &reason, id);
    write_and_close(client, &page, Duration::from_secs(5)).await;
    (kind, reason)
}

/// Write a complete response and close (TLS close_notify, then FIN),
/// bounded in time so a client that does not read cannot hold the task.
async fn write_and_close(client: &mut ClientStream, bytes: &[u8], limit: Duration) {
    let work = async {
        client.write_all(bytes).await?;
        client.shutdown().await
    };
    if let Ok(Err(e)) | Err(e) = tokio::time::timeout(limit, work)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))
    {
        tracing::debug!(error = %e, "could not deliver the response");
    }
}

/// Answer plain HTTP sent to a terminate listener's TLS port, as nginx's
/// "plain HTTP request was sent to HTTPS port".
pub(crate) async fn reply_plain_http(client: &mut TcpStream, id: u64) {
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
