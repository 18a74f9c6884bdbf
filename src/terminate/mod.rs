//! Terminate mode: TLS ends at splicegate, the agent is chosen from the
//! first HTTP request line, and the rest of the connection is streamed.
//!
//! One connection's way, after the PROXY header and the sniffed
//! ClientHello (shared with passthrough in [`crate::conn`]):
//! 1. TLS handshake with the client ([`certs`]: certificate by SNI);
//! 2. read the request head, bounded in size and time, and parse it
//!    ([`http`]);
//! 3. route its path ([`crate::route::path`]): answer `/health`, a
//!    redirect or an error page locally, or name a target;
//! 4. choose and connect its agent ([`crate::choice::choose`]: a session
//!    named in the request through [`crate::resolver`], a pool's agent by
//!    policy), TLS to the agent ([`crate::upstream::tls`]) unless
//!    `upstream_tls = "off"`;
//! 5. send the rewritten head (`Connection: close`, or the WebSocket
//!    upgrade) and any body bytes already read;
//! 6. stream both ways ([`stream`]) until the agent's response ends, or,
//!    after the agent's `101`, until either side closes or the tunnel is
//!    idle for `idle_timeout`.
//!
//! Each client connection carries exactly one request to one agent, so a
//! client that reuses its connection gets its second request routed afresh
//! on a new connection: see docs/terminate-mode.md.

pub mod certs;
pub mod http;
mod io;
mod prefixed;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::choice::{self, ChoiceError};
use crate::context::{self, Kind, ListenerCtx, Record, Refusal, TerminateConfig};
use crate::forward::{self, Counters, End, PumpError, SendError, Side};
use crate::resolver::Transport;
use crate::route::path::{client_named, under_web_url_path, PathDecision};
use crate::route::Target;
use crate::routing::Routing;
use crate::session::Transport as SessionTransport;
use crate::shutdown::Stop;
use crate::upstream;
use crate::upstream::tls::UpstreamTls;
use certs::CertStore;
pub use io::reply_plain_http;
use io::{read_request, read_response, write_and_close, Agent};
use prefixed::Prefixed;
use stream::{Seen, StreamOptions};

type ClientStream = TlsStream<Prefixed<TcpStream>>;

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

/// Why a request is not forwarded: answered with an error page when
/// `status` is set, else just closed (the client is gone or already
/// answered).
struct Fail {
    refusal: Refusal,
    status: Option<u16>,
}

impl Fail {
    /// Answered with the page for `kind`'s status.
    fn page(kind: Kind, why: impl Into<String>) -> Fail {
        Fail {
            status: kind.http_status(),
            refusal: Refusal::new(kind, why),
        }
    }

    /// Closed without an answer.
    fn quiet(kind: Kind, why: impl Into<String>) -> Fail {
        Fail {
            status: None,
            refusal: Refusal::new(kind, why),
        }
    }
}

/// Longest wait for a session lookup: the resolver bounds its own
/// requests by its `timeout`; this caps a wait on a request another
/// connection started.
const RESOLVE_WAIT: Duration = Duration::from_secs(10);

impl From<ChoiceError> for Fail {
    fn from(e: ChoiceError) -> Fail {
        let timed_out = e.timed_out();
        let mut fail = Fail::page(e.kind(), e.to_string());
        if timed_out {
            fail.status = Some(504);
        }
        fail
    }
}

/// What an error page tells the client: the reason for its own request's
/// refusal (4xx), but only a generic sentence for the agent's failures
/// (5xx) — agent addresses and OS errors go to the log, under the
/// connection id the page shows.
fn shown_reason(status: u16, why: &str) -> &str {
    match status {
        504 => "the agent did not answer in time",
        503 => "the session could not be looked up; try again shortly",
        500.. => "the agent could not be reached or did not answer properly",
        _ => why,
    }
}

/// One terminate-mode connection, from its sniffed ClientHello on.
pub struct Job<'a> {
    /// The listener that accepted it.
    pub ctx: &'a ListenerCtx,
    /// The listener's TLS state.
    pub tls: &'a Tls,
    /// When it was accepted.
    pub started: Instant,
    /// Its connection id.
    pub id: u64,
    /// Who the connection is between (the real client from the PROXY
    /// header, else the peer).
    pub parties: &'a context::Parties,
    /// A LOCAL PROXY header on a listener with `allowed_vpce`: the load
    /// balancer's own health check, which may ask for the health path only.
    pub health_only: bool,
}

impl Job<'_> {
    /// TLS handshake with the client (over `replay`, every byte read so
    /// far, then the socket), then one request. `out_header` is the PROXY
    /// header for the agent, if the listener sends one.
    pub async fn serve(
        self,
        client: TcpStream,
        replay: Vec<u8>,
        rec: &mut Record,
        out_header: Vec<u8>,
    ) -> Result<End, Refusal> {
        let limit = self.ctx.config.hello_timeout;
        let left = limit.saturating_sub(self.started.elapsed());
        let accept = self.tls.acceptor.accept(Prefixed::new(replay, client));
        let mut client = match tokio::time::timeout(left, accept).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Refusal::new(
                    Kind::TlsHandshake,
                    format!("tls: handshake with the client failed: {e}"),
                ))
            }
            Err(_) => {
                return Err(Refusal::new(
                    Kind::TlsHandshake,
                    format!(
                        "tls: handshake with the client not finished within {limit:?} of accept"
                    ),
                ))
            }
        };
        match self.exchange(&mut client, rec, out_header).await {
            Ok(end) => Ok(end),
            Err(Fail {
                refusal,
                status: Some(status),
            }) => {
                rec.status = Some(status);
                let page = http::error_page(status, shown_reason(status, &refusal.why), self.id);
                write_and_close(&mut client, &page, Duration::from_secs(5)).await;
                Err(refusal)
            }
            Err(Fail { refusal, .. }) => Err(refusal),
        }
    }

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
            .map_err(|e| Fail::page(e.kind(), format!("http: {e}")))?;
        rec.path = Some(
            crate::logging::printable(head.target.split('?').next().unwrap_or("/")).into_owned(),
        );

        let routing = self.ctx.routes.current();
        let header = |name: &str| {
            head.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        };
        let decision = routing
            .paths
            .resolve_request(head.target, header)
            .map_err(|e| Fail::page(e.kind(), format!("route: {e}")))?;
        if self.health_only && decision != PathDecision::Health {
            return Err(Fail::page(
                Kind::VpceNotAllowed,
                "vpce: a connection without an endpoint id (a load balancer health check) may ask for the health path only",
            ));
        }
        let (route, target, path) = match decision {
            PathDecision::Health => {
                let why = routing.unhealthy(self.ctx.drain.draining());
                drop(routing);
                rec.status = Some(if why.is_some() { 503 } else { 200 });
                write_and_close(client, &http::health(why.as_deref()), set.head_timeout).await;
                return Err(Fail::quiet(Kind::Health, "health answered locally"));
            }
            PathDecision::Redirect(location) => {
                drop(routing);
                rec.status = Some(301);
                write_and_close(client, &http::redirect(&location), set.head_timeout).await;
                return Err(Fail::quiet(
                    Kind::Redirect,
                    format!("redirected to {location}"),
                ));
            }
            PathDecision::Forward {
                route,
                target,
                path,
            } => (route, target, path),
        };
        rec.dynamic = client_named(&route, &target);
        rec.route = Some(route);
        rec.agent = Some(target.to_string());
        let request_wait = self.started.elapsed();
        let (mut agent, chosen) = self.connect(&routing, target, out_header, rec).await?;
        drop(routing);
        let path = match &chosen.web_url_path {
            Some(web) => under_web_url_path(web, &path),
            None => path,
        };
        let (pool, attempt, _slot) = (chosen.pool, chosen.attempt, chosen.slot);
        let connect_time = self.started.elapsed() - request_wait;

        // Only the request's own body goes to the agent: bytes after it (a
        // pipelined or smuggled second request) are dropped. A WebSocket
        // handshake has no body; bytes the client sends after it wait for
        // the agent's 101 and are dropped without one. A chunked body is
        // forwarded until the client stops.
        let fwd = set.forwarded_headers.then_some(http::Forwarded {
            client: self.parties.client.ip(),
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
        context::routed(
            rec,
            attempt,
            connect_time,
            context::Waited::Request {
                method: head.method,
                websocket,
                took: request_wait,
            },
        );
        drop(req);

        // Its TLS state lives in rustls inside this process: a terminate
        // session cannot move to a new process and stays to its end.
        let reg = context::register(
            self.ctx,
            rec,
            context::Registration {
                id: self.id,
                connect: connect_time,
                age: self.started.elapsed(),
                parties: self.parties,
                pool,
                transport: SessionTransport::Terminate,
                movable: false,
            },
        );
        let counters = &reg.counters;
        let mut seen = Seen::default();
        let end = self
            .forward(
                client,
                &mut agent,
                (&first, &after_upgrade),
                (websocket, client_limit),
                (counters, &reg.open.session().stop),
                &mut seen,
            )
            .await;
        rec.status = seen.status;
        let end = end?;
        use std::sync::atomic::Ordering::Relaxed;
        if matches!(end, End::Done) && counters.to_client.load(Relaxed) == 0 {
            return Err(Fail::quiet(
                Kind::AgentEmpty,
                "upstream: agent closed the connection without a response",
            ));
        }
        Ok(end)
    }

    /// Send `first` (the rewritten head and early body bytes), then stream.
    /// A WebSocket handshake becomes a tunnel only once the agent answers
    /// `101 Switching Protocols`; any other answer is forwarded and ends
    /// the exchange, and nothing more from the client reaches the agent.
    async fn forward<A: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut ClientStream,
        agent: &mut A,
        (first, after_upgrade): (&[u8], &[u8]),
        (websocket, client_limit): (bool, Option<u64>),
        (counters, stop): (&Counters, &Stop),
        seen: &mut Seen,
    ) -> Result<End, Fail> {
        use std::sync::atomic::Ordering::Relaxed;
        let set = &self.tls.settings;
        let cfg = &self.ctx.config;
        // An agent that accepts and never reads must not hold the task.
        let limit = cfg.connect_timeout;
        forward::send_within(agent, first, limit, &counters.to_agent)
            .await
            .map_err(|e| match e {
                SendError::TimedOut(_) => Fail::page(
                    Kind::AgentTimeout,
                    format!("upstream: the agent did not take the request: {e}"),
                ),
                SendError::Io(_) => Fail::page(
                    Kind::IoError,
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
                let sent = forward::send_within(agent, after_upgrade, limit, &counters.to_agent);
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
        Ok(stream::run(client, agent, opts, stop, counters, seen).await)
    }

    /// Dial the target (through its pool, with retries), send the PROXY
    /// header if configured, then TLS to the agent unless
    /// `upstream_tls = "off"`. Returns the agent leg, the pool slot held
    /// for the connection's life, and the attempt that succeeded.
    async fn connect(
        &self,
        routing: &Routing,
        target: Target,
        out_header: Vec<u8>,
        rec: &mut Record,
    ) -> Result<(Agent, choice::Chosen<()>), Fail> {
        let cfg = &self.ctx.config;
        let ask = choice::Ask {
            routing,
            drained: &self.ctx.routes.drained,
            target,
            client: self.parties.client.ip(),
            transport: Transport::Http,
            deadline: Instant::now() + RESOLVE_WAIT,
        };
        let dial = choice::Tcp {
            timeout: cfg.connect_timeout,
            keepalive: cfg.keepalive,
        };
        let dialled = choice::choose(ask, &dial).await?;
        rec.agent = Some(dialled.agent.clone());
        let (mut tcp, chosen) = dialled.split();
        if !out_header.is_empty() {
            tcp.write_all(&out_header).await.map_err(|e| {
                Fail::page(
                    Kind::IoError,
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
                    &chosen.target,
                    name,
                    cfg.connect_timeout,
                )
                .await
                .map_err(|e| Fail::page(Kind::AgentTls, format!("upstream: {e}")))?;
                Agent::Tls(Box::new(s))
            }
        };
        Ok((agent, chosen))
    }
}
