//! One client connection, start to finish: PROXY header (from trusted
//! peers), ClientHello, route, connect, replay, forward, and the access log.
//!
//! Each connection runs in one tracing span `conn{id, peer, client, vpce}`:
//! `peer` is the TCP peer (the NLB over PrivateLink), `client` the real
//! client from the PROXY header (or the peer without one) and `vpce` the
//! PrivateLink endpoint id. It writes exactly two access events: `routed`
//! once an agent is connected, and `closed` at the end with bytes, duration
//! and the close reason. Nothing is logged per chunk of data.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use crate::config::{ListenerConfig, SendProxy};
use crate::forward::{self, Counters};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::proxy_protocol::{self as pp, Command, Header};
use crate::route::Target;
use crate::server::SharedRoutes;
use crate::sniff::{self, ClientHello, SniffError};
use crate::upstream;

/// What every connection accepted on one listener shares.
pub struct ListenerCtx {
    /// The listener's settings.
    pub config: ListenerConfig,
    /// The routing table (replaced on reload).
    pub routes: Arc<SharedRoutes>,
    /// Turns true when the drain deadline passes.
    pub drain: watch::Receiver<bool>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Connection limits.
    pub limits: Arc<Limits>,
    /// TLS state when the listener terminates TLS (None: passthrough).
    pub tls: Option<Arc<crate::terminate::Tls>>,
}

/// What the access log says about a connection.
#[derive(Default)]
pub(crate) struct Record {
    pub(crate) hello: Option<ClientHello>,
    pub(crate) route: Option<String>,
    pub(crate) agent: Option<String>,
    pub(crate) counters: Option<Arc<Counters>>,
    /// A LOCAL header followed by a close: a load-balancer health probe.
    pub(crate) probe: bool,
    /// Terminate mode: the request path (without the query string, which
    /// may carry DCV auth tokens).
    pub(crate) path: Option<String>,
    /// Terminate mode: the response status (the agent's, or splicegate's
    /// own for errors, health and redirects).
    pub(crate) status: Option<u16>,
    /// The agent came from the client's name or path (agent-in-name,
    /// agent-in-path): metrics label it `dynamic`, so a client cannot make
    /// one time series per address an `allow` network holds.
    pub(crate) dynamic: bool,
}

impl Record {
    /// The `agent` label for `/metrics`.
    pub(crate) fn metrics_agent(&self) -> &str {
        if self.dynamic {
            "dynamic"
        } else {
            self.agent.as_deref().unwrap_or("-")
        }
    }
}

/// Failure before forwarding: (short kind, full reason).
pub(crate) type Refusal = (&'static str, String);

/// Serve one accepted connection to the end.
pub async fn handle(client: TcpStream, peer: SocketAddr, ctx: Arc<ListenerCtx>, id: u64) {
    let span = tracing::info_span!("conn", id, peer = %peer, client = Empty, vpce = Empty, listener = %ctx.config.name);
    async move {
        let started = Instant::now();
        let name = ctx.config.name.as_str();
        ctx.metrics.accepted(name);
        let mut rec = Record::default();
        let (outcome, reason) = match serve(client, peer, &ctx, started, &mut rec, id).await {
            Ok(end) => (end.kind(), end.to_string()),
            Err(refusal) => refusal,
        };
        let route = rec.route.as_deref().unwrap_or("-");
        let agent = rec.agent.as_deref().unwrap_or("-");
        ctx.metrics
            .closed(id, name, route, rec.metrics_agent(), outcome);
        if let Some(code) = rec.status {
            ctx.metrics.http_status(name, code);
        }
        let sni = rec
            .hello
            .as_ref()
            .and_then(|h| h.sni.as_deref())
            .unwrap_or("-");
        let alpn = rec
            .hello
            .as_ref()
            .map_or_else(|| "-".to_owned(), ClientHello::alpn_display);
        let (to_agent, to_client) = rec.counters.as_ref().map_or((0, 0), |c| {
            use std::sync::atomic::Ordering::Relaxed;
            (c.to_agent.load(Relaxed), c.to_client.load(Relaxed))
        });
        let duration_ms = started.elapsed().as_millis() as u64;
        let path = rec.path.as_deref().unwrap_or("-");
        let status = rec.status.map_or_else(|| "-".to_owned(), |s| s.to_string());
        macro_rules! closed {
            ($level:ident) => {
                tracing::$level!(
                    event = "closed",
                    sni,
                    alpn = %alpn,
                    route,
                    agent,
                    path,
                    status = %status,
                    bytes_to_agent = to_agent,
                    bytes_to_client = to_client,
                    duration_ms,
                    outcome,
                    reason = %reason,
                    "connection closed"
                )
            };
        }
        // Health probes arrive every few seconds per load balancer node;
        // like HAProxy's `dontlognull` they stay out of the access log.
        if rec.probe {
            closed!(debug);
        } else {
            closed!(info);
        }
    }
    .instrument(span)
    .await
}

async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    ctx: &ListenerCtx,
    started: Instant,
    rec: &mut Record,
    id: u64,
) -> Result<forward::End, Refusal> {
    let cfg = &ctx.config;
    let name = cfg.name.as_str();
    // TCP_NODELAY and keepalive were set on the listening socket and are
    // inherited by accepted sockets: no setsockopt here.

    // PROXY header: required from trusted peers, refused from anyone else.
    let trusted = cfg.proxy_protocol != pp::Mode::Off
        && cfg.proxy_trusted.iter().any(|c| c.contains(peer.ip()));
    let (header, early) = if trusted {
        match pp::read_header(&mut client, cfg.proxy_protocol, started, cfg.hello_timeout).await {
            Ok((h, rest)) => {
                let outcome = match (h.command, h.version) {
                    (Command::Local, _) => "local",
                    (_, 1) => "ok_v1",
                    _ => "ok_v2",
                };
                ctx.metrics.proxy_header(name, outcome);
                (Some(h), rest)
            }
            Err(e) => {
                ctx.metrics.proxy_header(name, e.kind());
                return Err((proxy_kind(e.kind()), format!("proxy header: {e}")));
            }
        }
    } else {
        (None, Vec::new())
    };
    let real_client = header.as_ref().and_then(|h| h.source).unwrap_or(peer);
    let vpce = header.as_ref().and_then(|h| h.tlvs.vpce_id.clone());
    let span = tracing::Span::current();
    span.record("client", tracing::field::display(real_client));
    if let Some(v) = &vpce {
        span.record("vpce", v.as_str());
    }
    // The endpoint allowlist is decided now and enforced once the hello
    // is in: a refused client then gets a TLS alert saying so, and a LOCAL
    // header followed by a close (the NLB's TCP health check, which carries
    // no endpoint id) stays a health probe.
    let vpce_refusal = (!cfg.allowed_vpce.is_empty()
        && !vpce.as_ref().is_some_and(|v| cfg.allowed_vpce.contains(v)))
    .then(|| {
        let seen = vpce
            .as_deref()
            .unwrap_or("none: no PROXY v2 header with an AWS endpoint id");
        (
            "vpce_not_allowed",
            format!("vpce: endpoint {seen} is not allowed on this listener"),
        )
    });
    let local = header.as_ref().is_some_and(|h| h.command == Command::Local);

    let _client_slot = if vpce_refusal.is_none() {
        ctx.limits.enter_client(real_client.ip()).map_err(|n| {
            (
                "client_limit",
                format!(
                    "limits: client {} already has {n} connections (max_per_client)",
                    real_client.ip()
                ),
            )
        })?
    } else {
        None
    };

    let hello = sniff::read_client_hello(
        &mut client,
        early,
        started,
        cfg.hello_timeout,
        cfg.hello_max_bytes,
    )
    .await;
    let (hello, replay) = match hello {
        Ok(ok) => ok,
        Err(SniffError::Truncated { received: 0 }) if local => {
            rec.probe = true;
            return Err((
                "health_probe",
                "PROXY LOCAL header then close: load balancer health probe".into(),
            ));
        }
        Err(_) if vpce_refusal.is_some() => {
            return Err(vpce_refusal.unwrap_or_default());
        }
        Err(SniffError::ProxyHeader) => {
            ctx.metrics.hello(name, "proxy_header", None);
            let why = if header.is_some() {
                "a second PROXY header follows the first; only the first, from a trusted peer, is honoured".to_owned()
            } else if cfg.proxy_protocol == pp::Mode::Off {
                "PROXY header on a listener with proxy_protocol off".to_owned()
            } else {
                format!("PROXY header from untrusted source {peer}; see proxy_trusted")
            };
            return Err(("proxy_untrusted", format!("proxy header: {why}")));
        }
        Err(e) => {
            ctx.metrics.hello(name, e.kind(), None);
            if ctx.tls.is_some() && e.plain_http() {
                crate::terminate::reply_plain_http(&mut client, id).await;
                rec.status = Some(400);
            }
            return Err((e.kind(), format!("hello: {e}")));
        }
    };
    let hello_wait = started.elapsed();
    let hello_outcome = if hello.sni.is_some() { "ok" } else { "no_sni" };
    ctx.metrics.hello(name, hello_outcome, Some(hello_wait));
    let health_only = match vpce_refusal {
        // The load balancer's own HTTPS health check on a terminate
        // listener: it may ask for the health path and nothing else.
        Some(_) if local && ctx.tls.is_some() => true,
        Some(refusal) => {
            rec.hello = Some(hello);
            return Err(refuse(&client, refusal));
        }
        None => false,
    };
    if let Some(tls) = &ctx.tls {
        rec.hello = Some(hello);
        let out_header = outgoing_header(cfg, header.as_ref(), real_client, &client);
        return crate::terminate::serve(
            client,
            replay,
            ctx,
            tls,
            started,
            rec,
            id,
            real_client,
            out_header,
            health_only,
        )
        .await;
    }
    let routing = ctx.routes.current();
    let decision = routing
        .table
        .resolve_from(hello.sni.as_deref(), vpce.as_deref());
    rec.hello = Some(hello);
    let decision = decision.map_err(|e| refuse(&client, (e.kind(), format!("route: {e}"))))?;
    rec.route = Some(decision.route.to_string());
    rec.agent = Some(decision.target.to_string());
    rec.dynamic = matches!(decision.route, crate::route::RouteKind::AgentInName(_));

    // Direct agent, or the pool's choice with retries before the first
    // byte: the client sees nothing until an agent accepts.
    let (mut agent, _slot, attempt) = match &decision.target {
        Target::Pool(name) => {
            let Some(pool) = routing.pools.get(name).cloned() else {
                return Err(refuse(
                    &client,
                    ("no_route", format!("route: pool {name} does not exist")),
                ));
            };
            drop(routing);
            let c = pool
                .connect(real_client.ip(), cfg.connect_timeout, cfg.keepalive)
                .await
                .map_err(|e| refuse(&client, (e.kind(), format!("upstream: {e}"))))?;
            rec.agent = Some(c.slot.agent().name.clone());
            (c.stream, Some(c.slot), c.attempt)
        }
        target => {
            let target = target.clone();
            drop(routing);
            let s = upstream::connect(&target, cfg.connect_timeout, cfg.keepalive)
                .await
                .map_err(|e| refuse(&client, (e.kind(), format!("upstream: {e}"))))?;
            (s, None, 1)
        }
    };
    let connect_time = started.elapsed() - hello_wait;

    // PROXY header to the agent, then every byte read while sniffing,
    // before any spliced byte.
    let counters = register(ctx, rec, id, connect_time);
    let out_header = outgoing_header(cfg, header.as_ref(), real_client, &client);
    // Bounded: an agent that accepts and never reads must not hold the
    // connection before forwarding (and its idle timeout) begins.
    for bytes in [out_header.as_slice(), replay.as_slice()] {
        forward::send_within(&mut agent, bytes, cfg.connect_timeout, &counters.to_agent)
            .await
            .map_err(|e| {
                let kind = match e {
                    forward::SendError::TimedOut(_) => "agent_timeout",
                    forward::SendError::Io(_) => "io_error",
                };
                refuse(
                    &client,
                    (
                        kind,
                        format!("upstream: sending the ClientHello to the agent: {e}"),
                    ),
                )
            })?;
    }
    drop(replay);

    let hello = rec.hello.as_ref();
    tracing::info!(
        event = "routed",
        sni = hello.and_then(|h| h.sni.as_deref()).unwrap_or("-"),
        alpn = %hello.map_or_else(|| "-".to_owned(), ClientHello::alpn_display),
        route = rec.route.as_deref().unwrap_or("-"),
        agent = rec.agent.as_deref().unwrap_or("-"),
        attempt,
        hello_us = hello_wait.as_micros() as u64,
        connect_us = connect_time.as_micros() as u64,
        "connection routed"
    );

    let opts = forward::Options {
        engine: cfg.engine,
        pipe_size: cfg.pipe_size,
        idle_timeout: cfg.idle_timeout,
    };
    let mut drain = ctx.drain.clone();
    Ok(forward::run(&client, &agent, opts, &mut drain, &counters).await)
}

/// Register a connection that starts forwarding with `/metrics` and the
/// access record; returns its byte counters.
pub(crate) fn register(
    ctx: &ListenerCtx,
    rec: &mut Record,
    id: u64,
    connect_time: std::time::Duration,
) -> Arc<Counters> {
    let counters = Arc::new(Counters::default());
    let key = (
        ctx.config.name.clone(),
        rec.route.clone().unwrap_or_default(),
        rec.metrics_agent().to_owned(),
    );
    ctx.metrics
        .forwarding(id, key, connect_time, Arc::clone(&counters));
    rec.counters = Some(Arc::clone(&counters));
    counters
}

/// Refuse a client whose ClientHello is complete with the TLS alert that
/// says why, so `openssl s_client` and browsers show a reason instead of a
/// bare connection reset; passes the refusal on.
fn refuse(client: &TcpStream, refusal: Refusal) -> Refusal {
    let desc = match refusal.0 {
        "no_route" | "no_sni" => sniff::Alert::UnrecognizedName,
        "agent_not_allowed" | "vpce_not_allowed" => sniff::Alert::AccessDenied,
        _ => sniff::Alert::InternalError,
    };
    // Seven bytes into an empty send buffer: one non-blocking write, and
    // a client that does not read loses nothing but the reason.
    let _ = client.try_write(&sniff::alert(desc));
    let _ = socket2::SockRef::from(client).shutdown(std::net::Shutdown::Write);
    refusal
}

/// Map PROXY read failures to outcome labels distinct from the ClientHello's.
fn proxy_kind(kind: &'static str) -> &'static str {
    match kind {
        "timeout" => "proxy_timeout",
        "truncated" => "proxy_truncated",
        "io" => "io",
        _ => "proxy_invalid",
    }
}

/// The PROXY header for the agent: the real client and the address it
/// connected to (from the received header, else this socket's own).
fn outgoing_header(
    cfg: &ListenerConfig,
    received: Option<&Header>,
    client: SocketAddr,
    sock: &TcpStream,
) -> Vec<u8> {
    if cfg.send_proxy == SendProxy::Off {
        return Vec::new();
    }
    let dst = received
        .and_then(|h| h.destination)
        .or_else(|| sock.local_addr().ok())
        .unwrap_or(client);
    match cfg.send_proxy {
        SendProxy::V1 => pp::encode_v1(client, dst),
        _ => {
            let tlvs = match received {
                Some(h) if cfg.send_proxy_tlvs => h.tlvs.raw.as_slice(),
                _ => &[],
            };
            pp::encode_v2(client, dst, tlvs, false)
        }
    }
}
