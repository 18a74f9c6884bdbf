//! One client connection, start to finish: PROXY header (from trusted
//! peers), ClientHello, route, dial, replay, forward, and the access log.
//! On a terminate listener the connection is handed to
//! [`crate::terminate`] once its ClientHello is in.
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
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use crate::choice;
use crate::context::{self, Kind, ListenerConfig, ListenerCtx, Record, Refusal, SendProxy};
use crate::forward::{self, End};
use crate::proxy_protocol::{self as pp, Command, Header};
use crate::resolver::Transport;
use crate::session::{Handoff, Info as SessionInfo, Open, Transport as SessionTransport};
use crate::sniff::{self, SniffError};
use crate::terminate::{self, Tls};
use crate::upstream;

/// Serve one accepted connection to the end. `tls` is the listener's TLS
/// state when it terminates TLS (None: passthrough).
pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    tls: Option<Arc<Tls>>,
    id: u64,
) {
    let span = tracing::info_span!("conn", id, peer = %peer, client = Empty, vpce = Empty, listener = %ctx.config.name);
    async move {
        let started = Instant::now();
        ctx.metrics.accepted(&ctx.config.name);
        let mut rec = Record::default();
        let end = serve(client, peer, &ctx, tls.as_deref(), started, &mut rec, id).await;
        finish(&ctx, &rec, id, started, end);
    }
    .instrument(span)
    .await
}

/// A passthrough connection handed over by the previous process of a live
/// upgrade.
#[derive(Debug)]
pub struct Adopted {
    /// What the access log says about it (its id is kept).
    pub info: SessionInfo,
    /// The client's socket.
    pub client: std::net::TcpStream,
    /// The agent's socket.
    pub agent: std::net::TcpStream,
    /// What each direction holds: written first.
    pub paused: forward::Paused,
    /// Bytes (to the agent, to the client) moved by the previous process.
    pub bytes: (u64, u64),
    /// How long ago it was accepted.
    pub age: std::time::Duration,
}

/// Go on forwarding a connection the previous process handed over, on
/// the listener it came from: the same span fields and id, its pool slot
/// and client share taken again (even above a cap: it is established),
/// and at its end a `closed` line with the whole session's totals.
pub fn adopt(ctx: Arc<ListenerCtx>, a: Adopted, guard: crate::shutdown::Guard) {
    let info = &a.info;
    let span = tracing::info_span!("conn", id = info.id, peer = %info.peer, client = %info.client, vpce = Empty, listener = %ctx.config.name);
    if let Some(v) = &info.vpce {
        span.record("vpce", v.as_str());
    }
    tokio::spawn(
        async move {
            let now = Instant::now();
            let started = now.checked_sub(a.age).unwrap_or(now);
            let id = a.info.id;
            let counters = Arc::new(forward::Counters::default());
            counters
                .to_agent
                .store(a.bytes.0, std::sync::atomic::Ordering::Relaxed);
            counters
                .to_client
                .store(a.bytes.1, std::sync::atomic::Ordering::Relaxed);
            let rec = Record {
                sni: a.info.sni.clone(),
                alpn: a.info.alpn.clone(),
                route: Some(a.info.route.clone()),
                agent: Some(a.info.agent.clone()),
                bytes: Some(crate::counters::Bytes::Stream(Arc::clone(&counters))),
                dynamic: a.info.dynamic,
                ..Record::default()
            };
            let key = (
                ctx.config.name.clone(),
                a.info.route.clone(),
                rec.metrics_agent().to_owned(),
            );
            ctx.metrics.adopted(id, key, Arc::clone(&counters));
            let streams = a
                .client
                .set_nonblocking(true)
                .and_then(|()| a.agent.set_nonblocking(true))
                .and_then(|()| TcpStream::from_std(a.client))
                .and_then(|c| Ok((c, TcpStream::from_std(a.agent)?)));
            let (client, agent) = match streams {
                Ok(s) => s,
                Err(e) => {
                    let end = Ok(End::Failed(forward::PumpError::Read {
                        side: forward::Side::Client,
                        source: e,
                    }));
                    finish(&ctx, &rec, id, started, end);
                    return;
                }
            };
            let agent_slot = a
                .info
                .pool
                .as_deref()
                .and_then(|pool| ctx.routes.current().adopt_slot(pool, &a.info.agent));
            let client_slot = ctx.limits.adopt_client(a.info.client.ip());
            let permit = ctx.limits.try_admit();
            let open = ctx.sessions.open(crate::session::New {
                info: a.info,
                bytes: crate::session::Bytes::Stream(Arc::clone(&counters)),
                movable: matches!(
                    ctx.config.engine,
                    forward::Engine::Splice | forward::Engine::Copy
                ),
                span: tracing::Span::current(),
                progress: ctx.config.log_progress_interval,
            });
            let ready = Ready {
                client,
                agent,
                counters,
                open,
                from: Some(Box::new(a.paused)),
                _agent_slot: agent_slot,
                _client_slot: client_slot,
            };
            crate::access::adopted(false);
            let end = forward_until_end(&ctx, ready, started).await;
            finish(&ctx, &rec, id, started, Ok(end));
            drop(permit);
            drop(guard);
        }
        .instrument(span),
    );
}

/// The end of a connection: `/metrics`, and the access log's `closed`
/// line (or, for one that moved to the new process of a live upgrade, a
/// debug line: the new process writes its `closed`).
pub(crate) fn finish(
    ctx: &ListenerCtx,
    rec: &Record,
    id: u64,
    started: Instant,
    end: Result<End, Refusal>,
) {
    let name = ctx.config.name.as_str();
    let (outcome, reason) = match end {
        Ok(End::HandedOver) => {
            ctx.metrics.handed_over(id, name);
            crate::access::handed_over(false);
            return;
        }
        Ok(end) => (end.kind(), end.to_string()),
        Err(refusal) => (refusal.kind, refusal.why),
    };
    let route = rec.route.as_deref().unwrap_or("-");
    ctx.metrics
        .closed(id, name, route, rec.metrics_agent(), outcome);
    if let Some(code) = rec.status {
        ctx.metrics.http_status(name, code);
    }
    crate::access::closed(rec, started.elapsed(), outcome, &reason);
}

/// A passthrough connection ready to forward: both legs, and what must
/// live as long as they do.
pub(crate) struct Ready {
    pub(crate) client: TcpStream,
    pub(crate) agent: TcpStream,
    pub(crate) counters: Arc<forward::Counters>,
    /// Its entry among the open sessions.
    pub(crate) open: Open,
    /// What each direction holds (a session adopted from the previous
    /// process of a live upgrade; None for a new one).
    pub(crate) from: Option<Box<forward::Paused>>,
    pub(crate) _agent_slot: Option<upstream::pool::Slot>,
    pub(crate) _client_slot: Option<crate::limits::ClientSlot>,
}

/// How the first steps ended.
enum Prepared {
    /// Passthrough: forward.
    Ready(Ready),
    /// A terminate listener's connection, served to its end.
    Served(forward::End),
}

async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    ctx: &ListenerCtx,
    tls: Option<&Tls>,
    started: Instant,
    rec: &mut Record,
    id: u64,
) -> Result<forward::End, Refusal> {
    // The first steps run boxed: their state is freed once the connection
    // forwards, so an idle connection's task holds only what forwarding
    // needs.
    // The prepared `Ready` is a temporary of this statement: it does not
    // also take room in this future while the forwarding future (which
    // owns it) runs.
    let forwarding = match Box::pin(prepare(client, peer, ctx, tls, started, rec, id)).await? {
        Prepared::Ready(r) => forward_until_end(ctx, r, started),
        Prepared::Served(end) => return Ok(end),
    };
    Ok(forwarding.await)
}

/// Forward until the connection ends or moves to the new process of a
/// live upgrade. A pause whose handoff the upgrade gives back (the new
/// process did not take it) goes on here from where it stopped.
///
/// A plain function returning an `async move` block: an `async fn` would
/// hold its `Ready` argument twice in its future (argument and body local),
/// and every idle connection's task holds this future.
pub(crate) fn forward_until_end(
    ctx: &ListenerCtx,
    mut ready: Ready,
    started: Instant,
) -> impl std::future::Future<Output = End> + '_ {
    let cfg = &ctx.config;
    let opts = forward::Options {
        engine: cfg.engine,
        pipe_size: cfg.pipe_size,
        idle_timeout: cfg.idle_timeout,
        spin: cfg.spin,
    };
    async move {
        // The slots in `ready` are held until the session ends here or
        // moves.
        loop {
            let session = ready.open.session();
            let from = ready.from.take();
            let (client, agent, counters) = (&ready.client, &ready.agent, &ready.counters);
            let end = forward::run(client, agent, opts, &session.stop, counters, from).await;
            let End::Paused(paused) = end else {
                return end;
            };
            // Boxed: an idle connection's task does not carry the handoff.
            let offered = Box::pin(offer(ctx, ready, paused, started));
            ready = match offered.await {
                Ok(end) => return end,
                Err(back) => back,
            };
        }
    }
}

/// Offer a paused connection to the live upgrade in progress. Taken:
/// [`End::HandedOver`]. Given back: the connection, with what each
/// direction holds, to go on here.
async fn offer(
    ctx: &ListenerCtx,
    ready: Ready,
    paused: Box<forward::Paused>,
    started: Instant,
) -> Result<End, Ready> {
    let failed = |source| {
        End::Failed(forward::PumpError::Read {
            side: forward::Side::Client,
            source,
        })
    };
    let Ready {
        client,
        agent,
        counters,
        open,
        from: _,
        _agent_slot,
        _client_slot,
    } = ready;
    let (c, a) = match client.into_std().and_then(|c| Ok((c, agent.into_std()?))) {
        Ok(s) => s,
        Err(e) => return Ok(failed(e)),
    };
    let session = Arc::clone(open.session());
    let handoff = Handoff {
        session: Arc::clone(&session),
        client: c,
        agent: a,
        paused: *paused,
        age: started.elapsed(),
    };
    let back = match ctx.sessions.hand_off(handoff).await {
        Ok(()) => return Ok(End::HandedOver),
        Err(back) => back,
    };
    session.stop.withdraw(crate::shutdown::Halt::Handover);
    match TcpStream::from_std(back.client).and_then(|c| Ok((c, TcpStream::from_std(back.agent)?))) {
        Ok((client, agent)) => Err(Ready {
            client,
            agent,
            counters,
            open,
            from: Some(Box::new(back.paused)),
            _agent_slot,
            _client_slot,
        }),
        Err(e) => Ok(failed(e)),
    }
}

/// PROXY header, ClientHello, route, dial and replay: everything before
/// bytes flow (or, on a terminate listener, the whole exchange).
async fn prepare(
    mut client: TcpStream,
    peer: SocketAddr,
    ctx: &ListenerCtx,
    tls: Option<&Tls>,
    started: Instant,
    rec: &mut Record,
    id: u64,
) -> Result<Prepared, Refusal> {
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
                return Err(Refusal::new(e.outcome(), format!("proxy header: {e}")));
            }
        }
    } else {
        (None, Vec::new())
    };
    let real_client = header.as_ref().and_then(|h| h.source).unwrap_or(peer);
    let vpce = header.as_ref().and_then(|h| h.tlvs.vpce_id.clone());
    let parties = context::Parties {
        peer,
        client: real_client,
        vpce: vpce.clone(),
    };
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
        Refusal::new(
            Kind::VpceNotAllowed,
            format!("vpce: endpoint {seen} is not allowed on this listener"),
        )
    });
    let local = header.as_ref().is_some_and(|h| h.command == Command::Local);

    let client_slot = if vpce_refusal.is_none() {
        ctx.limits.enter_client(real_client.ip()).map_err(|n| {
            Refusal::new(
                Kind::ClientLimit,
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
            return Err(Refusal::new(
                Kind::HealthProbe,
                "PROXY LOCAL header then close: load balancer health probe",
            ));
        }
        Err(e) => {
            if let Some(refusal) = vpce_refusal {
                return Err(refusal);
            }
            ctx.metrics.hello(name, e.metric(), None);
            let why = match &e {
                SniffError::ProxyHeader if header.is_some() => "proxy header: a second PROXY header follows the first; only the first, from a trusted peer, is honoured".to_owned(),
                SniffError::ProxyHeader if cfg.proxy_protocol == pp::Mode::Off => {
                    "proxy header: PROXY header on a listener with proxy_protocol off".to_owned()
                }
                SniffError::ProxyHeader => format!(
                    "proxy header: PROXY header from untrusted source {peer}; see proxy_trusted"
                ),
                e => {
                    if tls.is_some() && e.plain_http() {
                        terminate::reply_plain_http(&mut client, id).await;
                        rec.status = Some(400);
                    }
                    format!("hello: {e}")
                }
            };
            return Err(Refusal::new(e.kind(), why));
        }
    };
    let hello_wait = started.elapsed();
    let hello_outcome = if hello.sni.is_some() { "ok" } else { "no_sni" };
    ctx.metrics.hello(name, hello_outcome, Some(hello_wait));
    rec.sni = hello.sni;
    rec.alpn = hello.alpn;
    let out_header = outgoing_header(cfg, header.as_ref(), real_client, &client);
    if let Some(tls) = tls {
        // A LOCAL connection on a listener with `allowed_vpce` is the load
        // balancer's own HTTPS health check: the health path only.
        let health_only = match vpce_refusal {
            Some(_) if local => true,
            Some(refusal) => return Err(refuse(&client, refusal)),
            None => false,
        };
        let job = terminate::Job {
            ctx,
            tls,
            started,
            id,
            parties: &parties,
            health_only,
        };
        return job
            .serve(client, replay, rec, out_header)
            .await
            .map(Prepared::Served);
    }
    if let Some(refusal) = vpce_refusal {
        return Err(refuse(&client, refusal));
    }

    let routing = ctx.routes.current();
    let sni = rec.sni.as_deref();
    let decision = routing
        .table
        .resolve_from(sni, vpce.as_deref())
        .map_err(|e| refuse(&client, Refusal::new(e.kind(), format!("route: {e}"))))?;
    rec.route = Some(decision.route.to_string());
    rec.agent = Some(decision.target.to_string());
    rec.dynamic = decision.client_named();
    // The ClientHello waits for a session lookup within its deadline.
    let ask = choice::Ask {
        routing: &routing,
        drained: &ctx.routes.drained,
        target: decision.target,
        client: real_client.ip(),
        transport: Transport::Http,
        deadline: started + cfg.hello_timeout,
    };
    let dial = choice::Tcp {
        timeout: cfg.connect_timeout,
        keepalive: cfg.keepalive,
    };
    let dialled = choice::choose(ask, &dial)
        .await
        .map_err(|e| refuse(&client, Refusal::new(e.kind(), e.to_string())))?;
    drop(routing);
    let pool = dialled.pool.clone();
    let mut agent = dialled.conn;
    rec.agent = Some(dialled.agent);
    let connect_time = started.elapsed() - hello_wait;

    // PROXY header to the agent, then every byte read while sniffing,
    // before any spliced byte. Bounded: an agent that accepts and never
    // reads must not hold the connection before forwarding (and its idle
    // timeout) begins.
    let movable = matches!(cfg.engine, forward::Engine::Splice | forward::Engine::Copy);
    let reg = context::register(
        ctx,
        rec,
        context::Registration {
            id,
            connect: connect_time,
            age: started.elapsed(),
            parties: &parties,
            pool,
            transport: SessionTransport::Tcp,
            movable,
        },
    );
    let counters = reg.counters;
    for bytes in [out_header.as_slice(), replay.as_slice()] {
        forward::send_within(&mut agent, bytes, cfg.connect_timeout, &counters.to_agent)
            .await
            .map_err(|e| {
                let kind = match e {
                    forward::SendError::TimedOut(_) => Kind::AgentTimeout,
                    forward::SendError::Io(_) => Kind::IoError,
                };
                let why = format!("upstream: sending the ClientHello to the agent: {e}");
                refuse(&client, Refusal::new(kind, why))
            })?;
    }
    context::routed(
        rec,
        dialled.attempt,
        connect_time,
        context::Waited::Hello(hello_wait),
    );
    Ok(Prepared::Ready(Ready {
        client,
        agent,
        counters,
        open: reg.open,
        from: None,
        _agent_slot: dialled.slot,
        _client_slot: client_slot,
    }))
}

/// Refuse a client whose ClientHello is complete with the TLS alert that
/// says why, so `openssl s_client` and browsers show a reason instead of a
/// bare connection reset; passes the refusal on.
fn refuse(client: &TcpStream, refusal: Refusal) -> Refusal {
    if let Some(desc) = refusal.kind.tls_alert() {
        // Seven bytes into an empty send buffer: one non-blocking write,
        // and a client that does not read loses nothing but the reason.
        let _ = client.try_write(&sniff::alert(desc));
    }
    let _ = socket2::SockRef::from(client).shutdown(std::net::Shutdown::Write);
    refusal
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Caps, Limits};
    use crate::route::path::PathTable;
    use crate::route::RouteTable;
    use crate::routing::{Routing, SharedRoutes};
    use crate::shutdown::Drain;

    /// What a connection's task holds while it is idle is mostly this
    /// future (its buffers are the worker's, see `forward::copy`).
    #[tokio::test]
    async fn a_connection_task_is_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let routing = Routing::start(RouteTable::new(), PathTable::new(), &[], Vec::new());
        let ctx = Arc::new(ListenerCtx {
            config: ListenerConfig::with_defaults("t", Vec::new()),
            routes: Arc::new(SharedRoutes::new(routing)),
            drain: Drain::default(),
            metrics: Arc::default(),
            limits: Arc::new(Limits::new(Caps::default())),
            sessions: Arc::default(),
        });
        let peer = "127.0.0.1:1".parse().unwrap();
        let size = std::mem::size_of_val(&handle(c, peer, ctx, None, 1));
        eprintln!("connection future: {size} bytes");
        assert!(size <= 1536, "{size}");
    }
}
