//! The QUIC relay: UDP listeners that route each new client flow by the SNI
//! in its QUIC Initial, then relay its datagrams untouched.
//!
//! A flow is keyed by the client's address and port. Its first datagrams
//! go through [`crate::quic::InitialSniffer`] (held meanwhile, at most
//! [`HELD_MAX`]), its ClientHello through the same route table as TCP
//! ([`crate::route`], pools included); then it gets a UDP socket of its own
//! connected to the agent ([`flow::Flow`]), so the kernel demultiplexes the
//! agent's replies. From there nothing is parsed: client datagrams arrive in
//! batches (`recvmmsg`) on the listener's socket and go to the flow's
//! socket; the agent's come back in batches (`sendmmsg`) through the
//! listener's socket. A flow ends when nothing moved for `idle_timeout`, or
//! at the drain deadline.
//!
//! Refusals (no route, a datagram that is not a valid Initial, a hello that
//! does not complete in `hello_timeout`) are logged once per flow and the
//! flow's address is remembered for `hello_timeout`, so its later datagrams
//! are dropped without a log line and none ever reaches an agent.

mod batch;
mod flow;
mod handover;
mod spin;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

pub use flow::{DatagramCounters, Flow, FlowEnd};
use handover::Handing;
pub use handover::{AdoptedFlow, Handover, HandoverAsk, PausedFlows};

use crate::context::ACCESS_LOG;
use crate::metrics::Metrics;
use crate::outcome::Kind;
use crate::quic::{InitialError, InitialSniffer};
use crate::resolver::Transport;
use crate::route::Target;
use crate::routing::SharedRoutes;
use crate::session::{self, Open, Session, Sessions};
use crate::shutdown::{wait_true, Drain, Tracker};
use batch::with_batch;

/// Default `idle_timeout`: an AWS NLB forgets an idle UDP flow after
/// 120 s, and any QUIC connection that is alive sends something well
/// within that (its own idle timeout is shorter).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(120);
/// Default `hello_timeout`: a QUIC ClientHello takes one or two datagrams.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `max_flows`.
pub const DEFAULT_MAX_FLOWS: usize = 65_536;
/// Default `max_flows_per_client`.
pub const DEFAULT_MAX_FLOWS_PER_CLIENT: usize = 256;
/// Datagrams held for a flow while its ClientHello completes and its agent
/// is chosen.
pub const HELD_MAX: usize = 16;
/// Time allowed to resolve an agent's name and open its socket.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// A `[[udp_listener]]`.
#[derive(Debug, Clone)]
pub struct UdpListenerConfig {
    /// Name in logs and metrics.
    pub name: String,
    /// Addresses to bind.
    pub bind: Vec<SocketAddr>,
    /// Time from a flow's first datagram for its ClientHello to complete.
    pub hello_timeout: Duration,
    /// Largest ClientHello accepted.
    pub hello_max_bytes: usize,
    /// A flow ends when no datagram moved either way for this long.
    pub idle_timeout: Duration,
    /// Flows (routed, pending and refused) held at once.
    pub max_flows: usize,
    /// Flows per client IP address.
    pub max_flows_per_client: usize,
    /// UDP port on the agent (default: the route's port; DCV's
    /// `quic-port` is its `web-port`, 8443, unless configured otherwise).
    pub agent_port: Option<u16>,
    /// Low-latency mode: the listener's thread polls its sockets for this
    /// long after datagrams moved before it sleeps (None: off).
    pub spin: Option<Duration>,
    /// A `progress` access-log line this often for each routed flow
    /// (None: off).
    pub log_progress_interval: Option<Duration>,
}

impl UdpListenerConfig {
    /// Defaults for a listener named `name` on `bind`.
    pub fn with_defaults(name: &str, bind: Vec<SocketAddr>) -> Self {
        UdpListenerConfig {
            name: name.to_owned(),
            bind,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            hello_max_bytes: 16 * 1024,
            idle_timeout: DEFAULT_IDLE,
            max_flows: DEFAULT_MAX_FLOWS,
            max_flows_per_client: DEFAULT_MAX_FLOWS_PER_CLIENT,
            agent_port: None,
            spin: None,
            log_progress_interval: Some(crate::context::DEFAULT_PROGRESS),
        }
    }
}

/// What a UDP listener shares with the rest of the proxy.
pub struct UdpCtx {
    /// Its settings.
    pub config: UdpListenerConfig,
    /// The live routing table.
    pub routes: Arc<SharedRoutes>,
    /// Drain state.
    pub drain: Drain,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Live flows count as connections for the drain.
    pub tracker: Tracker,
    /// The open sessions of the process (routed flows are sessions).
    pub sessions: Arc<Sessions>,
}

/// A flow the listener knows.
enum Entry {
    /// Reading its Initial packets.
    Pending(Pending),
    /// Routed; its agent's socket is being opened.
    Dialling(Pending),
    /// Relaying.
    Active(Active),
    /// Refused: its datagrams are dropped until the entry expires.
    Refused { id: u64 },
}

struct Pending {
    id: u64,
    started: Instant,
    span: tracing::Span,
    sniffer: Option<InitialSniffer>,
    held: Vec<Vec<u8>>,
    sni: Option<String>,
    alpn: Vec<String>,
}

/// A routed flow: its sockets and counters, its session, its span.
struct Active {
    flow: Arc<Flow>,
    session: Arc<Session>,
    span: tracing::Span,
}

enum Event {
    /// A flow's agent socket is open (or could not be).
    Dialled {
        client: SocketAddr,
        id: u64,
        route: String,
        agent: String,
        pool: Option<String>,
        result: Result<Box<Flow>, (Kind, String)>,
    },
    /// A flow's task ended.
    Closed { client: SocketAddr, id: u64 },
    /// A flow's task stopped for a live upgrade; the flow goes on.
    Paused { id: u64, open: Open },
}

struct Relay {
    ctx: Arc<UdpCtx>,
    sock: Arc<UdpSocket>,
    flows: HashMap<SocketAddr, Entry>,
    per_client: HashMap<IpAddr, usize>,
    /// (when, client, id) of pending and refused entries, in time order.
    expiry: VecDeque<(Instant, SocketAddr, u64)>,
    events: mpsc::UnboundedSender<Event>,
    accepting: bool,
    last_limit_log: Option<Instant>,
    /// Datagrams dropped without a flow, by [`DROP_REASONS`] index; added
    /// to `/metrics` on each sweep, not under its lock per datagram.
    dropped: [u64; DROP_REASONS.len()],
    /// A live upgrade in progress: the sockets are not read.
    handing: Option<Handing>,
}

/// Why a client datagram had no flow to carry it.
const DROP_REASONS: [&str; 5] = [
    "draining",
    "flow_limit",
    "client_limit",
    "refused",
    "truncated",
];
const DRAINING: usize = 0;
const FLOW_LIMIT: usize = 1;
const CLIENT_LIMIT: usize = 2;
const REFUSED: usize = 3;
const TRUNCATED: usize = 4;

/// Serve `sock` on a thread of its own, with a single-threaded runtime:
/// the listener's datagrams, its flows' agent sockets and their timers all
/// wake that one thread, so relaying a datagram never hands work to another
/// core (the way an nginx worker serves its sockets). The thread ends with
/// [`serve`].
pub fn spawn(
    sock: std::net::UdpSocket,
    ctx: Arc<UdpCtx>,
    stop: watch::Receiver<bool>,
    handover: Handover,
) -> io::Result<std::thread::JoinHandle<()>> {
    let mut rt = tokio::runtime::Builder::new_current_thread();
    rt.enable_all();
    let spin = ctx.config.spin;
    if spin.is_some() {
        rt.on_thread_park(spin::park);
    }
    let rt = rt.build()?;
    let name = format!("udp-{}", ctx.config.name);
    let watched = match spin {
        Some(w) => Some((sock.try_clone()?, w)),
        None => None,
    };
    std::thread::Builder::new().name(name).spawn(move || {
        if let Some((sock, window)) = watched {
            spin::enable(sock, window);
        }
        rt.block_on(async move {
            match UdpSocket::from_std(sock) {
                Ok(sock) => serve(sock, ctx, stop, handover).await,
                Err(e) => {
                    tracing::error!(event = "udp_listener_failed", listener = %ctx.config.name, error = %e, "cannot register the UDP socket");
                }
            }
        });
        spin::disable();
    })
}

/// Serve one bound UDP socket until the drain: after `stop`, no new flow
/// starts and established ones run until they end or the drain deadline.
/// In a live upgrade the old process's relay hands its flows over when
/// asked and ends; the new process's starts with them.
pub async fn serve(
    sock: UdpSocket,
    ctx: Arc<UdpCtx>,
    mut stop: watch::Receiver<bool>,
    handover: Handover,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut deadline = ctx.drain.deadline();
    let mut relay = Relay {
        ctx,
        sock: Arc::new(sock),
        flows: HashMap::new(),
        per_client: HashMap::new(),
        expiry: VecDeque::new(),
        events: tx,
        accepting: true,
        last_limit_log: None,
        dropped: [0; DROP_REASONS.len()],
        handing: None,
    };
    if let Some(adopt) = handover.adopt {
        // Before the socket is read: the adopted flows' datagrams wait in
        // its buffer meanwhile.
        let flows = adopt.await.unwrap_or_default();
        let n = flows.len();
        for f in flows {
            relay.adopt(f);
        }
        tracing::info!(event = "udp_adopted", listener = %relay.ctx.config.name, flows = n, "UDP listener taken over with its QUIC flows");
    }
    let mut asks = handover.asks;
    let mut decided: Option<oneshot::Receiver<bool>> = None;
    let v6 = relay.sock.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // After the drain deadline the flows close themselves; this task (whose
    // runtime ends with it) waits for their last words, a bounded time.
    let mut give_up: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = wait_true(&mut stop), if relay.accepting => relay.accepting = false,
            _ = wait_true(&mut deadline), if give_up.is_none() => {
                relay.accepting = false;
                relay.forget_unrouted();
                give_up = Some(tokio::time::Instant::now() + Duration::from_secs(5));
            }
            _ = tokio::time::sleep_until(give_up.unwrap_or_else(tokio::time::Instant::now)), if give_up.is_some() => break,
            r = relay.sock.readable(), if relay.handing.is_none() => {
                if r.is_err() {
                    break;
                }
                relay.receive(v6);
            }
            Some(ev) = rx.recv() => {
                relay.event(ev);
                if let Some(r) = relay.offer() {
                    decided = Some(r);
                }
            }
            Some(ask) = async { asks.as_mut()?.recv().await }, if relay.handing.is_none() => {
                relay.begin_handover(ask);
                if let Some(r) = relay.offer() {
                    decided = Some(r);
                }
            }
            taken = async { decided.as_mut()?.await.ok() }, if decided.is_some() => {
                decided = None;
                if taken == Some(true) {
                    relay.handed_over();
                    break;
                }
                relay.resume();
            }
            _ = sweep.tick() => relay.expire(Instant::now()),
        }
        if !relay.accepting && relay.flows.is_empty() && relay.handing.is_none() {
            break;
        }
    }
    relay.flush_drops();
}

impl Relay {
    /// Read what is waiting, a bounded number of batches per wake-up.
    fn receive(&mut self, v6: bool) {
        let sock = Arc::clone(&self.sock);
        for _ in 0..16 {
            let r = sock.try_io(Interest::READABLE, || {
                with_batch(|b| {
                    let n = b.recv_from(&*sock, v6)?;
                    for i in 0..n {
                        let (d, from, truncated) = b.get(i);
                        match from {
                            Some(from) if !truncated => self.datagram(from, d),
                            _ => self.dropped[TRUNCATED] += 1,
                        }
                    }
                    spin::moved();
                    // A short batch emptied the socket: say so, and tokio
                    // clears its readiness without another `recvmmsg`
                    // (unless a new datagram was signalled meanwhile).
                    if n < batch::BATCH {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n)
                })
            });
            if r.is_err() {
                return;
            }
        }
    }

    /// One client datagram.
    fn datagram(&mut self, from: SocketAddr, d: &[u8]) {
        match self.flows.get_mut(&from) {
            Some(Entry::Active(a)) => {
                a.flow.to_agent(d);
                spin::note(&a.flow);
            }
            Some(Entry::Pending(_)) => self.pending(from, d),
            Some(Entry::Dialling(p)) => {
                if p.held.len() < HELD_MAX {
                    p.held.push(d.to_vec());
                }
            }
            Some(Entry::Refused { .. }) => self.dropped[REFUSED] += 1,
            None => self.new_flow(from, d),
        }
    }

    fn new_flow(&mut self, from: SocketAddr, d: &[u8]) {
        let cfg = &self.ctx.config;
        if !self.accepting {
            self.dropped[DRAINING] += 1;
            return;
        }
        let per_client = self.per_client.get(&from.ip()).copied().unwrap_or(0);
        let limit = if self.flows.len() >= cfg.max_flows {
            Some((FLOW_LIMIT, cfg.max_flows))
        } else if per_client >= cfg.max_flows_per_client {
            Some((CLIENT_LIMIT, cfg.max_flows_per_client))
        } else {
            None
        };
        if let Some((i, max)) = limit {
            self.dropped[i] += 1;
            let what = DROP_REASONS[i];
            let now = Instant::now();
            if self
                .last_limit_log
                .is_none_or(|t| now - t >= Duration::from_secs(10))
            {
                self.last_limit_log = Some(now);
                tracing::warn!(event = "udp_flow_limit", listener = %cfg.name, limit = what, max, client = %from, "new QUIC flows dropped at the {what} of {max} (logged at most every 10 s)");
            }
            return;
        }
        let id = crate::session::next_id();
        let span =
            tracing::info_span!("flow", id, listener = %cfg.name, client = %from, proto = "quic");
        *self.per_client.entry(from.ip()).or_default() += 1;
        let started = Instant::now();
        match InitialSniffer::start(d, cfg.hello_max_bytes) {
            Ok(s) => {
                self.flows.insert(
                    from,
                    Entry::Pending(Pending {
                        id,
                        started,
                        span,
                        sniffer: Some(s),
                        held: Vec::new(),
                        sni: None,
                        alpn: Vec::new(),
                    }),
                );
                self.expiry
                    .push_back((started + cfg.hello_timeout, from, id));
                self.pending(from, d);
            }
            Err(e) => {
                self.ctx.metrics.quic_initial(&cfg.name, e.kind());
                let p = Pending {
                    id,
                    started,
                    span,
                    sniffer: None,
                    held: Vec::new(),
                    sni: None,
                    alpn: Vec::new(),
                };
                self.refuse(from, &p, initial_kind(&e), &e.to_string());
            }
        }
    }

    /// A datagram of a flow whose ClientHello is not complete yet.
    fn pending(&mut self, from: SocketAddr, d: &[u8]) {
        let Some(Entry::Pending(p)) = self.flows.get_mut(&from) else {
            return;
        };
        let step = if p.held.len() >= HELD_MAX {
            Err((
                Kind::TooLarge,
                format!("no complete ClientHello in {HELD_MAX} datagrams"),
                None,
            ))
        } else {
            p.held.push(d.to_vec());
            match p.sniffer.as_mut().map(|s| s.feed(d)) {
                None | Some(Ok(None)) => return,
                Some(Ok(Some(hello))) => {
                    p.sni = hello.sni;
                    p.alpn = hello.alpn;
                    Ok(())
                }
                Some(Err(e)) => Err((initial_kind(&e), e.to_string(), Some(e.kind()))),
            }
        };
        let name = &self.ctx.config.name;
        match step {
            Ok(()) => {
                self.ctx.metrics.quic_initial(name, "ok");
                self.route(from);
            }
            Err((kind, reason, outcome)) => {
                if let Some(o) = outcome {
                    self.ctx.metrics.quic_initial(name, o);
                }
                self.refuse_entry(from, kind, &reason);
            }
        }
    }

    /// The hello is complete: choose the agent and open its socket.
    fn route(&mut self, from: SocketAddr) {
        let Some(Entry::Pending(mut p)) = self.flows.remove(&from) else {
            return;
        };
        p.sniffer = None;
        let routing = self.ctx.routes.current();
        let decision = match routing.table.resolve(p.sni.as_deref()) {
            Ok(d) => d,
            Err(e) => {
                self.refuse(from, &p, e.kind(), &e.to_string());
                return;
            }
        };
        let route = decision.route.to_string();
        // An agent named by the client is one series for all (as on TCP).
        let dynamic = matches!(
            decision.route,
            crate::route::RouteKind::AgentInName(_) | crate::route::RouteKind::SessionInName(_)
        );
        let pool = match &decision.target {
            Target::Pool(name) => Some(name.clone()),
            _ => None,
        };
        let target = match decision.target {
            Target::Pool(name) => {
                // The first agent by the pool's policy: `client_hash` on the
                // datagram's source address gives the agent the client's
                // TCP connection (hashed on its PROXY address) got.
                let now = tokio::time::Instant::now();
                let drained = &self.ctx.routes.drained;
                let pick = routing
                    .pools
                    .get(&name)
                    .ok_or_else(|| (Kind::PoolUnavailable, format!("pool {name:?} is gone")))
                    .and_then(|pool| {
                        pool.order(from.ip(), now, drained)
                            .map_err(|e| (e.kind(), e.to_string()))?
                            .first()
                            .map(|&i| pool.agents()[i].config.target.clone())
                            .ok_or_else(|| {
                                (
                                    Kind::PoolUnavailable,
                                    format!("pool {name}: no agent available"),
                                )
                            })
                    });
                match pick {
                    Ok(t) => t,
                    Err((kind, reason)) => {
                        self.refuse(from, &p, kind, &reason);
                        return;
                    }
                }
            }
            t @ (Target::Addr(_) | Target::Host { .. })
                if self.ctx.routes.drained.contains(&t.to_string()) =>
            {
                let reason = format!(
                    "agent {t} is drained (splicegate ctl drain-agent); the route has no other"
                );
                self.refuse(from, &p, Kind::AgentDraining, &reason);
                return;
            }
            t => t,
        };
        let port = self.ctx.config.agent_port;
        let (id, tx) = (p.id, self.events.clone());
        let span = p.span.clone();
        let agent_label = if dynamic {
            "dynamic".to_owned()
        } else {
            target.to_string()
        };
        self.flows.insert(from, Entry::Dialling(p));
        let routing = Arc::clone(&routing);
        tokio::spawn(
            async move {
                let dial = async {
                    let target = match target {
                        Target::Session(id) => {
                            let found = routing
                                .resolve_session(&id, Transport::Quic, Some(from.ip()))
                                .await;
                            found.map_err(|e| (e.kind(), e.to_string()))?.target
                        }
                        t => t,
                    };
                    drop(routing);
                    let addr = match target {
                        Target::Addr(a) => a,
                        Target::Host { name, port } => {
                            tokio::net::lookup_host((name.as_str(), port))
                                .await
                                .map_err(|e| {
                                    (Kind::AgentResolve, format!("cannot resolve {name}: {e}"))
                                })?
                                .next()
                                .ok_or_else(|| {
                                    (Kind::AgentResolve, format!("{name} has no address"))
                                })?
                        }
                        Target::Pool(_) | Target::Session(_) => {
                            return Err((
                                Kind::PoolUnavailable,
                                format!("{target} is not an agent"),
                            ))
                        }
                    };
                    let addr = SocketAddr::new(addr.ip(), port.unwrap_or(addr.port()));
                    Flow::connect(id, from, addr)
                        .await
                        .map(Box::new)
                        .map_err(|e| (Kind::AgentUnreachable, format!("UDP socket to {addr}: {e}")))
                };
                let result = tokio::time::timeout(DIAL_TIMEOUT, dial)
                    .await
                    .unwrap_or_else(|_| {
                        Err((
                            Kind::AgentTimeout,
                            format!("no agent socket within {DIAL_TIMEOUT:?}"),
                        ))
                    });
                let _ = tx.send(Event::Dialled {
                    client: from,
                    id,
                    route,
                    agent: agent_label,
                    pool,
                    result,
                });
            }
            .instrument(span),
        );
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Dialled {
                client,
                id,
                route,
                agent,
                pool,
                result,
            } => {
                let Some(Entry::Dialling(p)) = self.flows.remove(&client) else {
                    return;
                };
                if p.id != id {
                    self.flows.insert(client, Entry::Dialling(p));
                    return;
                }
                match result {
                    Ok(flow) => self.start(client, p, *flow, (route, agent, pool)),
                    Err((kind, reason)) => {
                        self.refuse(client, &p, kind, &reason);
                    }
                }
            }
            Event::Closed { client, id } => {
                if matches!(self.flows.get(&client), Some(Entry::Active(a)) if a.flow.id == id) {
                    self.flows.remove(&client);
                    self.release(client);
                    if let Some(h) = &mut self.handing {
                        h.running = h.running.saturating_sub(1);
                    }
                }
            }
            Event::Paused { id, open } => {
                if let Some(h) = &mut self.handing {
                    h.running = h.running.saturating_sub(1);
                    h.parked.insert(id, open);
                }
            }
        }
    }

    /// Relay the held datagrams and start the flow's task.
    fn start(
        &mut self,
        client: SocketAddr,
        p: Pending,
        flow: Flow,
        (route, agent, pool): (String, String, Option<String>),
    ) {
        let flow = Arc::new(flow);
        for d in &p.held {
            flow.to_agent(d);
        }
        let ctx = Arc::clone(&self.ctx);
        let name = ctx.config.name.clone();
        p.span.in_scope(|| {
            tracing::info!(
                target: ACCESS_LOG,
                event = "routed",
                sni = p.sni.as_deref().unwrap_or("-"),
                route = %route,
                agent = %flow.agent,
                hello_us = p.started.elapsed().as_micros() as u64,
                datagrams_held = p.held.len(),
                "QUIC flow routed"
            )
        });
        ctx.metrics.udp_flow_started(
            flow.id,
            (name.clone(), route.clone(), agent.clone()),
            Arc::clone(&flow.counters),
        );
        let info = session::Info {
            id: flow.id,
            transport: session::Transport::Quic,
            listener: name,
            peer: client,
            client,
            vpce: None,
            sni: p.sni,
            alpn: p.alpn,
            route,
            agent: flow.agent.to_string(),
            pool,
            dynamic: agent == "dynamic",
            started: std::time::SystemTime::now()
                .checked_sub(p.started.elapsed())
                .unwrap_or(std::time::UNIX_EPOCH),
        };
        let open = ctx.sessions.open(session::New {
            info,
            bytes: session::Bytes::Datagrams(Arc::clone(&flow.counters)),
            movable: false,
            span: p.span.clone(),
            progress: ctx.config.log_progress_interval,
        });
        self.spawn_task(client, flow, open, p.span);
    }

    /// Run a routed flow's task: the agent's datagrams back to the client
    /// until the flow ends (its `closed` line) or pauses for a live
    /// upgrade.
    fn spawn_task(&mut self, client: SocketAddr, flow: Arc<Flow>, open: Open, span: tracing::Span) {
        let session = Arc::clone(open.session());
        self.flows.insert(
            client,
            Entry::Active(Active {
                flow: Arc::clone(&flow),
                session: Arc::clone(&session),
                span: span.clone(),
            }),
        );
        let ctx = Arc::clone(&self.ctx);
        let guard = ctx.tracker.enter();
        let (sock, tx) = (Arc::clone(&self.sock), self.events.clone());
        tokio::spawn(
            async move {
                let end = flow
                    .run(&sock, ctx.config.idle_timeout, &session.stop)
                    .await;
                let outcome = match end {
                    FlowEnd::Paused => {
                        let _ = tx.send(Event::Paused { id: flow.id, open });
                        drop(guard);
                        return;
                    }
                    FlowEnd::Closed(kind) => kind,
                };
                let info = &session.info;
                let [pa, ba, pc, bc] = flow.counters.snapshot();
                let dropped = flow
                    .counters
                    .dropped
                    .load(std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    target: ACCESS_LOG,
                    event = "closed",
                    sni = info.sni.as_deref().unwrap_or("-"),
                    route = %info.route,
                    agent = %flow.agent,
                    packets_to_agent = pa,
                    bytes_to_agent = ba,
                    packets_to_client = pc,
                    bytes_to_client = bc,
                    dropped,
                    duration_ms = flow.age().as_millis() as u64,
                    outcome = outcome.as_str(),
                    "QUIC flow closed"
                );
                ctx.metrics
                    .udp_flow_closed(flow.id, &ctx.config.name, Some(outcome));
                let _ = tx.send(Event::Closed {
                    client: flow.client,
                    id: flow.id,
                });
                drop(open);
                drop(guard);
            }
            .instrument(span),
        );
    }

    /// Refuse the pending flow at `from` (its entry becomes a refusal).
    fn refuse_entry(&mut self, from: SocketAddr, kind: Kind, reason: &str) {
        let Some(Entry::Pending(p)) = self.flows.remove(&from) else {
            return;
        };
        self.refuse(from, &p, kind, reason);
    }

    /// Refuse the flow at `from`: its entry becomes `Refused` (its
    /// datagrams are dropped until it is forgotten after `hello_timeout`),
    /// logged and counted once.
    fn refuse(&mut self, from: SocketAddr, p: &Pending, kind: Kind, reason: &str) {
        self.flows.insert(from, Entry::Refused { id: p.id });
        let name = &self.ctx.config.name;
        p.span.in_scope(|| {
            tracing::info!(
                target: ACCESS_LOG,
                event = "closed",
                sni = p.sni.as_deref().unwrap_or("-"),
                packets_held = p.held.len(),
                duration_ms = p.started.elapsed().as_millis() as u64,
                outcome = kind.as_str(),
                reason = %crate::logging::printable(reason),
                "QUIC flow refused; no datagram reached an agent"
            )
        });
        self.ctx.metrics.udp_flow_refused(name, kind);
        self.expiry
            .push_back((Instant::now() + self.ctx.config.hello_timeout, from, p.id));
    }

    /// Add the drop counts to `/metrics`.
    fn flush_drops(&mut self) {
        for (i, n) in self.dropped.iter_mut().enumerate() {
            if *n > 0 {
                self.ctx
                    .metrics
                    .udp_dropped(&self.ctx.config.name, DROP_REASONS[i], *n);
                *n = 0;
            }
        }
    }

    /// Forget refusals whose time is up and refuse hellos that did not
    /// complete in time.
    fn expire(&mut self, now: Instant) {
        self.flush_drops();
        while let Some(&(when, client, id)) = self.expiry.front() {
            if when > now {
                break;
            }
            self.expiry.pop_front();
            match self.flows.get(&client) {
                Some(Entry::Refused { id: r }) if *r == id => {
                    self.flows.remove(&client);
                    self.release(client);
                }
                Some(Entry::Pending(p)) if p.id == id => {
                    let reason = format!(
                        "no complete ClientHello within {:?} ({} datagrams)",
                        self.ctx.config.hello_timeout,
                        p.held.len()
                    );
                    self.ctx
                        .metrics
                        .quic_initial(&self.ctx.config.name, "timeout");
                    self.refuse_entry(client, Kind::Timeout, &reason);
                }
                _ => {}
            }
        }
    }

    /// At the drain deadline: forget every flow that is not relaying.
    fn forget_unrouted(&mut self) {
        let gone: Vec<SocketAddr> = self
            .flows
            .iter()
            .filter(|(_, e)| !matches!(e, Entry::Active(_)))
            .map(|(a, _)| *a)
            .collect();
        for a in gone {
            self.flows.remove(&a);
            self.release(a);
        }
    }

    fn release(&mut self, client: SocketAddr) {
        if let Some(n) = self.per_client.get_mut(&client.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&client.ip());
            }
        }
    }
}

/// The outcome a refused Initial closes its flow with.
fn initial_kind(e: &InitialError) -> Kind {
    match e {
        InitialError::Hello(h) => h.kind(),
        InitialError::Malformed(_) => Kind::Malformed,
        _ => Kind::NotQuic,
    }
}
