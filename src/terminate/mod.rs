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
use crate::forward::{Counters, End, PumpError, SendError, Side};
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

/// Why a request is not forwarded: answered with an error page when
/// `status` is set, else just closed (the client is gone or already
/// answered).
struct Fail {
    status: Option<u16>,
    kind: &'static str,
    why: String,
}

impl Fail {
    fn page(status: u16, kind: &'static str, why: String) -> Fail {
        Fail {
            status: Some(status),
            kind,
            why,
        }
    }

    fn quiet(kind: &'static str, why: String) -> Fail {
        Fail {
            status: None,
            kind,
            why,
        }
    }
}

/// The request as read.
struct Request {
    /// The head as read (body bytes may follow it in `buf`).
    buf: Vec<u8>,
    head_len: usize,
}

/// Serve a terminate-mode connection whose ClientHello (`replay`, every
/// byte read so far) has been sniffed: TLS handshake, then one request.
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
    health_only: bool,
) -> Result<End, Refusal> {
    let left = ctx.config.hello_timeout.saturating_sub(started.elapsed());
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
                    ctx.config.hello_timeout
                ),
            ))
        }
    };
    let job = Job {
        ctx,
        tls,
        started,
        id,
        real_client,
        health_only,
    };
    match job.exchange(&mut client, rec, out_header).await {
        Ok(end) => Ok(end),
        Err(Fail {
            status: Some(status),
            kind,
            why,
        }) => {
            rec.status = Some(status);
            let page = http::error_page(status, shown_reason(status, &why), id);
            write_and_close(&mut client, &page, Duration::from_secs(5)).await;
            Err((kind, why))
        }
        Err(Fail { kind, why, .. }) => Err((kind, why)),
    }
}

/// What an error page tells the client: the reason for its own request's
/// refusal (4xx), but only a generic sentence for the agent's failures
/// (5xx) — agent addresses and OS errors go to the log, under the
/// connection id the page shows.
fn shown_reason(status: u16, why: &str) -> &str {
    match status {
        504 => "the agent did not answer in time",
        500.. => "the agent could not be reached or did not answer properly",
        _ => why,
    }
}

/// One connection's context through the steps of [`serve`].
struct Job<'a> {
    ctx: &'a ListenerCtx,
    tls: &'a Tls,
    started: Instant,
    id: u64,
    real_client: SocketAddr,
    /// A LOCAL PROXY header on a listener with `allowed_vpce`: the load
    /// balancer's own health check, which may ask for the health path only.
    health_only: bool,
}

impl Job<'_> {
    /// Read the request, route it, connect, forward.
    async fn exchange(
        &self,
        client: &mut ClientStream,
        rec: &mut Record,
        out_header: Vec<u8>,
    ) -> Result<End, Fail> {
        let set = &self.tls.settings;
        let req = read_request(client, set).await?;
        let head = http::parse(&req.buf[..req.head_len])
            .map_err(|e| Fail::page(e.status(), e.kind(), format!("http: {e}")))?;
        rec.path = Some(
            crate::logging::printable(head.target.split('?').next().unwrap_or("/")).into_owned(),
        );

        let routing = self.ctx.routes.current();
        let decision = routing
            .paths
            .resolve(head.target)
            .map_err(|e| Fail::page(e.status(), e.kind(), format!("route: {e}")))?;
        if self.health_only && decision != PathDecision::Health {
            return Err(Fail::page(
                403,
                "vpce_not_allowed",
                "vpce: a connection without an endpoint id (a load balancer health check) may ask for the health path only".into(),
            ));
        }
        let (route, target, path) = match decision {
            PathDecision::Health => {
                let why = routing.unhealthy(self.ctx.metrics.draining());
                drop(routing);
                rec.status = Some(if why.is_some() { 503 } else { 200 });
                write_and_close(client, &http::health(why.as_deref()), set.head_timeout).await;
                return Err(Fail::quiet("health", "health answered locally".into()));
            }
            PathDecision::Redirect(location) => {
                drop(routing);
                rec.status = Some(301);
                write_and_close(client, &http::redirect(&location), set.head_timeout).await;
                return Err(Fail::quiet("redirect", format!("redirected to {location}")));
            }
            PathDecision::Forward {
                route,
                target,
                path,
            } => (route, target, path),
        };
        rec.dynamic = route == crate::route::path::AGENT_IN_PATH;
        rec.route = Some(route);
        rec.agent = Some(target.to_string());
        let request_wait = self.started.elapsed();
        let (mut agent, _slot, attempt) = self.connect(&routing, &target, out_header, rec).await?;
        drop(routing);
        let connect_time = self.started.elapsed() - request_wait;

        // Only the request's own body goes to the agent: bytes after it (a
        // pipelined or smuggled second request) are dropped. A WebSocket
        // handshake has no body; bytes the client sends after it wait for
        // the agent's 101 and are dropped without one. A chunked body is
        // forwarded until the client stops.
        let fwd = set.forwarded_headers.then_some(http::Forwarded {
            client: self.real_client.ip(),
        });
        let mut first = http::rewrite(&head, &path, fwd);
        let early = &req.buf[req.head_len..];
        let (client_limit, after_upgrade) = if head.websocket {
            (Some(0), early.to_vec())
        } else {
            let limit = match head.body {
                http::Body::Chunked => None,
                http::Body::None => Some(0),
                http::Body::Length(n) => Some(n),
            };
            let keep = limit.map_or(early.len(), |n| {
                early.len().min(usize::try_from(n).unwrap_or(usize::MAX))
            });
            first.extend_from_slice(&early[..keep]);
            (limit.map(|n| n - keep as u64), Vec::new())
        };
        let websocket = head.websocket;
        tracing::info!(
            event = "routed",
            sni = rec
                .hello
                .as_ref()
                .and_then(|h| h.sni.as_deref())
                .unwrap_or("-"),
            method = head.method,
            path = rec.path.as_deref().unwrap_or("-"),
            websocket,
            route = rec.route.as_deref().unwrap_or("-"),
            agent = rec.agent.as_deref().unwrap_or("-"),
            attempt,
            request_us = request_wait.as_micros() as u64,
            connect_us = connect_time.as_micros() as u64,
            "request routed"
        );
        drop(req);

        let counters = conn::register(self.ctx, rec, self.id, connect_time);
        let mut drain = self.ctx.drain.clone();
        let mut seen = Seen::default();
        let end = match &mut agent {
            Agent::Plain(s) => {
                self.forward(
                    client,
                    s,
                    (&first, &after_upgrade),
                    websocket,
                    client_limit,
                    &mut drain,
                    &counters,
                    &mut seen,
                )
                .await
            }
            Agent::Tls(s) => {
                self.forward(
                    client,
                    s.as_mut(),
                    (&first, &after_upgrade),
                    websocket,
                    client_limit,
                    &mut drain,
                    &counters,
                    &mut seen,
                )
                .await
            }
        };
        rec.status = seen.status;
        let end = end?;
        use std::sync::atomic::Ordering::Relaxed;
        if matches!(end, End::Done) && counters.to_client.load(Relaxed) == 0 {
            return Err(Fail::quiet(
                "agent_empty",
                "upstream: agent closed the connection without a response".into(),
            ));
        }
        Ok(end)
    }

    /// Send `first` (the rewritten head and early body bytes), then stream.
    /// A WebSocket handshake becomes a tunnel only once the agent answers
    /// `101 Switching Protocols`; any other answer is forwarded and ends
    /// the exchange, and nothing more from the client reaches the agent.
    #[allow(clippy::too_many_arguments)]
    async fn forward<A: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut ClientStream,
        agent: &mut A,
        (first, after_upgrade): (&[u8], &[u8]),
        websocket: bool,
        client_limit: Option<u64>,
        drain: &mut tokio::sync::watch::Receiver<bool>,
        counters: &Counters,
        seen: &mut Seen,
    ) -> Result<End, Fail> {
        use std::sync::atomic::Ordering::Relaxed;
        let set = &self.tls.settings;
        let cfg = &self.ctx.config;
        // An agent that accepts and never reads must not hold the task.
        let limit = cfg.connect_timeout;
        crate::forward::send_within(agent, first, limit, &counters.to_agent)
            .await
            .map_err(|e| match e {
                SendError::TimedOut(_) => Fail::page(
                    504,
                    "agent_timeout",
                    format!("upstream: the agent did not take the request: {e}"),
                ),
                SendError::Io(_) => Fail::page(
                    502,
                    "io_error",
                    format!("upstream: sending the request to the agent failed: {e}"),
                ),
            })?;
        let mut opts = StreamOptions {
            idle_timeout: set.request_idle_timeout,
            end_with_agent: true,
            client_limit,
            agent_limit: None,
            probe_status: true,
        };
        if websocket {
            let wait = set.request_idle_timeout.unwrap_or(Duration::from_secs(300));
            let (resp, bytes) = read_response(agent, wait).await?;
            seen.status = Some(resp.status);
            let extra = (bytes.len() - resp.len) as u64;
            let upgraded = resp.status == 101;
            let show = match resp.body {
                Some(n) if !upgraded => resp.len + extra.min(n) as usize,
                _ => bytes.len(),
            };
            let write = async {
                client.write_all(&bytes[..show]).await?;
                client.flush().await
            };
            match tokio::time::timeout(wait, write).await {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    return Ok(End::Failed(PumpError::Write {
                        side: Side::Client,
                        source,
                    }))
                }
                Err(_) => return Ok(End::Idle(wait)),
            }
            counters.to_client.fetch_add(show as u64, Relaxed);
            opts.probe_status = false;
            if upgraded {
                let sent =
                    crate::forward::send_within(agent, after_upgrade, limit, &counters.to_agent);
                if let Err(e) = sent.await {
                    let source = match e {
                        SendError::Io(e) => e,
                        timeout => std::io::Error::new(std::io::ErrorKind::TimedOut, timeout),
                    };
                    return Ok(End::Failed(PumpError::Write {
                        side: Side::Agent,
                        source,
                    }));
                }
                opts.idle_timeout = cfg.idle_timeout;
                opts.end_with_agent = false;
                opts.client_limit = None;
            } else {
                // Not upgraded: the agent's answer ends the exchange. It
                // may keep its connection open; the client's further bytes
                // are discarded.
                opts.client_limit = Some(0);
                opts.agent_limit = resp.body.map(|n| n.saturating_sub(extra));
            }
        }
        let end = stream::run(client, agent, opts, drain, counters, seen).await;
        Ok(end)
    }

    /// Connect to the target (through its pool, with retries), send the
    /// PROXY header if configured, then TLS to the agent unless
    /// `upstream_tls = "off"`. Returns the agent leg, the pool slot held
    /// for the connection's life, and the attempt that succeeded.
    async fn connect(
        &self,
        routing: &crate::server::Routing,
        target: &Target,
        out_header: Vec<u8>,
        rec: &mut Record,
    ) -> Result<(Agent, Option<crate::upstream::pool::Slot>, usize), Fail> {
        let cfg = &self.ctx.config;
        let (mut tcp, slot, attempt, agent_target) = match target {
            Target::Pool(name) => {
                let pool = routing.pools.get(name).cloned().ok_or_else(|| {
                    Fail::page(
                        502,
                        "no_route",
                        format!("route: pool {name} does not exist"),
                    )
                })?;
                let c = pool
                    .connect(self.real_client.ip(), cfg.connect_timeout, cfg.keepalive)
                    .await
                    .map_err(|e| {
                        let status = match &e {
                            PoolError::AllFailed {
                                last: ConnectError::Timeout { .. },
                                ..
                            } => 504,
                            _ => 502,
                        };
                        Fail::page(status, e.kind(), format!("upstream: {e}"))
                    })?;
                let t = c.slot.agent().config.target.clone();
                rec.agent = Some(c.slot.agent().name.clone());
                (c.stream, Some(c.slot), c.attempt, t)
            }
            t => {
                let s = upstream::connect(t, cfg.connect_timeout, cfg.keepalive)
                    .await
                    .map_err(|e| {
                        let status = if matches!(e, ConnectError::Timeout { .. }) {
                            504
                        } else {
                            502
                        };
                        Fail::page(status, e.kind(), format!("upstream: {e}"))
                    })?;
                (s, None, 1, t.clone())
            }
        };
        if !out_header.is_empty() {
            tcp.write_all(&out_header).await.map_err(|e| {
                Fail::page(
                    502,
                    "io_error",
                    format!("upstream: writing the PROXY header to the agent failed: {e}"),
                )
            })?;
        }
        let set = &self.tls.settings;
        let agent = match &self.tls.upstream {
            None => Agent::Plain(tcp),
            Some(connector) => {
                let name = set.upstream_server_name.as_deref();
                let s = upstream::tls::handshake(
                    connector,
                    tcp,
                    &agent_target,
                    name,
                    cfg.connect_timeout,
                )
                .await
                .map_err(|e| Fail::page(502, "agent_tls", format!("upstream: {e}")))?;
                Agent::Tls(Box::new(s))
            }
        };
        Ok((agent, slot, attempt))
    }
}

/// Read the request head, bounded by `head_max_bytes` and `head_timeout`.
async fn read_request(client: &mut ClientStream, set: &TerminateConfig) -> Result<Request, Fail> {
    let mut buf = Vec::with_capacity(2048);
    match read_head(client, &mut buf, set.head_max_bytes, set.head_timeout).await {
        Ok(head_len) => Ok(Request { buf, head_len }),
        Err(HeadRead::TooLarge(n)) => Err(Fail::page(
            400,
            "head_too_large",
            format!(
                "http: request head exceeds {} bytes ({n} read without its end)",
                set.head_max_bytes
            ),
        )),
        Err(HeadRead::Timeout(n)) => Err(Fail::page(
            408,
            "head_timeout",
            format!(
                "http: request head not complete within {:?} ({n} bytes received)",
                set.head_timeout
            ),
        )),
        Err(HeadRead::Closed(0)) => Err(Fail::quiet(
            "no_request",
            "http: client closed the connection without sending a request".into(),
        )),
        Err(HeadRead::Closed(n)) => Err(Fail::quiet(
            "truncated",
            format!("http: client closed after {n} bytes of an incomplete request head"),
        )),
        Err(HeadRead::Io(e)) => Err(Fail::quiet(
            "io_error",
            format!("http: read from client failed before the request head was complete: {e}"),
        )),
    }
}

/// Read the agent's response head (bounded in size and time). Returns it
/// parsed, with every byte read (the head and any body bytes after it).
async fn read_response<A: AsyncRead + Unpin>(
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
            502,
            "bad_response",
            format!("upstream: WebSocket handshake: {why}"),
        )),
        Err(_) => Err(Fail::page(
            504,
            "agent_timeout",
            format!("upstream: WebSocket handshake: no response from the agent within {wait:?}"),
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
