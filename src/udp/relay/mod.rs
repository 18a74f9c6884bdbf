//! One UDP listener socket's relay: its flow table, the way of a client's
//! datagram (an Active flow's, a pending hello's, or a new flow's first),
//! routing a complete hello through [`crate::choice::choose`], and the
//! tasks that carry the agents' datagrams back.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use super::batch::{self, with_batch, Out};
use super::drops::{Dropped, Drops};
use super::flow::Flow;
use super::handover::{Handing, Handover};
use super::limits::{Caps, Full};
use super::pending::{Budget, Pending};
use super::{spin, UdpCtx, HELD_MAX};
use crate::access;
use crate::choice::{self, Chosen};
use crate::outcome::Kind;
use crate::quic::InitialSniffer;
use crate::resolver::Transport;
use crate::session::{self, Open, Session};
use crate::shutdown::wait_true;
use crate::upstream::pool::Slot;
use crate::upstream::ConnectError;

mod flows;
mod upgrade;

/// Time allowed to place a session, resolve an agent's name and open its
/// socket.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// A flow the relay knows.
pub(super) enum Entry {
    /// Reading its Initial packets.
    Pending(Box<Pending>),
    /// Routed; its agent is being chosen and its socket opened.
    Dialling(Box<Pending>),
    /// Relaying.
    Active(Active),
    /// Refused after a complete hello: its retransmitted Initials are
    /// dropped quietly until the entry expires (`hello_timeout`).
    Refused {
        /// Session id it had.
        id: u64,
    },
}

/// A routed flow: its sockets and counters, its session, its span, and
/// its pool slot (held for the flow's life).
pub(super) struct Active {
    pub(super) flow: Arc<Flow>,
    pub(super) session: Arc<Session>,
    pub(super) span: tracing::Span,
    pub(super) slot: Option<Slot>,
}

pub(super) enum Event {
    /// A flow's agent is chosen and its socket open (or not).
    Dialled {
        client: SocketAddr,
        id: u64,
        route: String,
        dynamic: bool,
        result: Result<Box<Chosen<Flow>>, (Kind, String)>,
    },
    /// A flow's task ended.
    Closed { client: SocketAddr, id: u64 },
    /// A flow's task stopped for a live upgrade; the flow goes on.
    Paused { id: u64, open: Open },
}

pub(super) struct Relay {
    pub(super) ctx: Arc<UdpCtx>,
    pub(super) out: Arc<Out>,
    pub(super) flows: HashMap<SocketAddr, Entry>,
    pub(super) budget: Budget,
    /// (until, client, id) of refused entries, in time order.
    pub(super) refused: VecDeque<(Instant, SocketAddr, u64)>,
    pub(super) events: mpsc::UnboundedSender<Event>,
    rx: Option<mpsc::UnboundedReceiver<Event>>,
    pub(super) accepting: bool,
    drops: Drops,
    last_limit_log: Option<Instant>,
    /// A live upgrade in progress: the socket is not read.
    pub(super) handing: Option<Handing>,
}

/// The UDP socket toward one agent address, for [`choice::choose`].
struct UdpDial {
    id: u64,
    client: SocketAddr,
    /// The listener's `agent_port`, replacing the target's port.
    port: Option<u16>,
}

impl choice::Dial for UdpDial {
    type Conn = Flow;

    fn timeout(&self) -> Duration {
        DIAL_TIMEOUT
    }

    async fn dial(&self, addr: SocketAddr) -> Result<Flow, ConnectError> {
        let addr = SocketAddr::new(addr.ip(), self.port.unwrap_or(addr.port()));
        Flow::connect(self.id, self.client, addr).await
    }
}

impl Relay {
    pub(super) fn new(sock: UdpSocket, ctx: Arc<UdpCtx>) -> Relay {
        let (tx, rx) = mpsc::unbounded_channel();
        let share = ctx.config.sockets();
        let budget = Budget::new(
            ctx.config.max_pending / share,
            ctx.config.pending_bytes_max / share,
        );
        Relay {
            ctx,
            out: Arc::new(Out::new(sock)),
            flows: HashMap::new(),
            budget,
            refused: VecDeque::new(),
            events: tx,
            rx: Some(rx),
            accepting: true,
            drops: Drops::default(),
            last_limit_log: None,
            handing: None,
        }
    }

    /// Serve until the drain ends the last flow, or the flows moved to a
    /// new process.
    pub(super) async fn run(mut self, mut stop: watch::Receiver<bool>, handover: Handover) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut deadline = self.ctx.drain.deadline();
        if let Some(adopt) = handover.adopt {
            // Before the socket is read: the adopted flows' datagrams wait
            // in its buffer meanwhile.
            let flows = adopt.await.unwrap_or_default();
            let n = flows.len();
            for f in flows {
                self.adopt(f);
            }
            tracing::info!(event = "udp_adopted", listener = %self.ctx.config.name, flows = n, "UDP listener taken over with its QUIC flows");
        }
        let mut asks = handover.asks;
        let mut decided: Option<oneshot::Receiver<bool>> = None;
        let v6 = self.out.sock.local_addr().is_ok_and(|a| a.is_ipv6());
        let mut sweep = tokio::time::interval(Duration::from_millis(250));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // After the drain deadline the flows close themselves; this task
        // (whose runtime ends with it) waits for their last words, a
        // bounded time.
        let mut give_up: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = wait_true(&mut stop), if self.accepting => self.accepting = false,
                _ = wait_true(&mut deadline), if give_up.is_none() => {
                    self.accepting = false;
                    self.forget_unrouted();
                    give_up = Some(tokio::time::Instant::now() + Duration::from_secs(5));
                }
                _ = tokio::time::sleep_until(give_up.unwrap_or_else(tokio::time::Instant::now)), if give_up.is_some() => break,
                r = self.out.sock.readable(), if self.handing.is_none() => {
                    if r.is_err() {
                        break;
                    }
                    self.receive(v6);
                }
                Some(ev) = rx.recv() => {
                    self.event(ev);
                    if let Some(r) = self.offer() {
                        decided = Some(r);
                    }
                }
                Some(ask) = async { asks.as_mut()?.recv().await }, if self.handing.is_none() => {
                    self.begin_handover(ask);
                    if let Some(r) = self.offer() {
                        decided = Some(r);
                    }
                }
                taken = async { decided.as_mut()?.await.ok() }, if decided.is_some() => {
                    decided = None;
                    if taken == Some(true) {
                        self.handed_over();
                        break;
                    }
                    self.resume();
                }
                _ = sweep.tick() => self.expire(Instant::now()),
            }
            if !self.accepting && self.flows.is_empty() && self.handing.is_none() {
                break;
            }
        }
        let name = self.ctx.config.name.clone();
        self.drops.flush(
            &self.ctx.metrics,
            &name,
            Instant::now() + super::drops::SUMMARY_EVERY,
        );
        self.ctx.metrics.udp_pending(&name, self.ctx.socket, 0, 0);
    }

    /// Read what is waiting, a bounded number of batches per wake-up. The
    /// datagrams of one client that arrive together leave for its agent
    /// together.
    fn receive(&mut self, v6: bool) {
        let out = Arc::clone(&self.out);
        for _ in 0..16 {
            let r = out.sock.try_io(Interest::READABLE, || {
                with_batch(|b| {
                    let n = b.recv_from(&out.sock, v6)?;
                    let mut i = 0;
                    while i < n {
                        let (_, from, truncated) = b.get(i);
                        let Some(from) = from.filter(|_| !truncated) else {
                            self.drops.add(Dropped::Truncated);
                            i += 1;
                            continue;
                        };
                        if let Some(Entry::Active(a)) = self.flows.get(&from) {
                            let mut j = i + 1;
                            while j < n && matches!(b.get(j), (_, Some(f), false) if f == from) {
                                j += 1;
                            }
                            a.flow.to_agent_batch(b, i..j);
                            spin::note(&a.flow);
                            i = j;
                            continue;
                        }
                        self.datagram(from, b.get(i).0);
                        i += 1;
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

    /// One client datagram of no active flow.
    fn datagram(&mut self, from: SocketAddr, d: &[u8]) {
        match self.flows.get_mut(&from) {
            Some(Entry::Active(a)) => {
                a.flow.to_agent(d);
                spin::note(&a.flow);
            }
            Some(Entry::Pending(_)) => self.pending(from, d),
            Some(Entry::Dialling(p)) => {
                if p.tag.belongs(d) && p.held.len() < HELD_MAX && self.budget.room(d.len()) {
                    p.held.push(d.to_vec());
                    self.budget.recharge(p);
                } else {
                    self.drops.add(Dropped::NotHeld);
                }
            }
            Some(Entry::Refused { .. }) => self.drops.add(Dropped::Refused),
            None => self.new_flow(from, d),
        }
    }

    /// The first datagram from `from`: it starts a flow only if it holds
    /// a client Initial that decrypts. Anything else is counted and
    /// forgotten.
    fn new_flow(&mut self, from: SocketAddr, d: &[u8]) {
        if !self.accepting {
            self.drops.add(Dropped::Draining);
            return;
        }
        let cfg = &self.ctx.config;
        let read = InitialSniffer::start(d, cfg.hello_max_bytes).and_then(|mut s| {
            let hello = s.feed(d)?;
            Ok((s, hello))
        });
        let (sniffer, hello) = match read {
            Ok(r) => r,
            Err(e) => {
                self.drops.add(Dropped::of(&e));
                return;
            }
        };
        let id = session::next_id();
        let span =
            tracing::info_span!("flow", id, listener = %cfg.name, client = %from, proto = "quic");
        let mut p = Box::new(Pending {
            id,
            started: Instant::now(),
            span,
            tag: sniffer.tag(),
            sniffer: Some(sniffer),
            held: vec![d.to_vec()],
            sni: None,
            alpn: Vec::new(),
            cost: 0,
            hello_took: Duration::ZERO,
        });
        p.cost = p.measure();
        if !self.make_room(p.cost, None) {
            self.drops.add(Dropped::PendingLimit);
            return;
        }
        self.budget.add(&p, from);
        let complete = hello.is_some();
        if let Some(h) = hello {
            p.sni = h.sni;
            p.alpn = h.alpn;
            p.sniffer = None;
            self.budget.recharge(&mut p);
        }
        self.flows.insert(from, Entry::Pending(p));
        if complete {
            self.ctx.metrics.quic_initial(&self.ctx.config.name, "ok");
            self.route(from);
        }
    }

    /// Evict the oldest pending flows (not `keep`) until `cost` more bytes
    /// and, for a new flow, one more flow fit; false if they cannot.
    fn make_room(&mut self, cost: usize, keep: Option<(SocketAddr, u64)>) -> bool {
        let fits = |b: &Budget| match keep {
            None => b.fits(cost),
            Some(_) => b.room(cost),
        };
        let mut skipped = Vec::new();
        while !fits(&self.budget) {
            let Some((started, client, id)) = self.budget.pop_oldest() else {
                break;
            };
            if keep == Some((client, id)) {
                skipped.push((started, client, id));
                continue;
            }
            if matches!(self.flows.get(&client), Some(Entry::Pending(p)) if p.id == id) {
                if let Some(Entry::Pending(p)) = self.flows.remove(&client) {
                    self.budget.remove(&p);
                    self.drops.evicted();
                    self.ctx
                        .metrics
                        .udp_flow_refused(&self.ctx.config.name, Kind::PendingLimit);
                    p.span.in_scope(|| tracing::debug!(target: access::ACCESS_LOG, event = "evicted", "pending QUIC flow evicted: the pending budget is full"));
                }
            }
        }
        for e in skipped.into_iter().rev() {
            self.budget.push_front(e);
        }
        fits(&self.budget)
    }

    /// A datagram of a flow whose ClientHello is not complete yet.
    fn pending(&mut self, from: SocketAddr, d: &[u8]) {
        let Some(Entry::Pending(p)) = self.flows.get(&from) else {
            return;
        };
        if !p.tag.belongs(d) {
            self.drops.add(Dropped::NotHeld);
            return;
        }
        let key = (from, p.id);
        if p.held.len() >= HELD_MAX {
            let reason = format!("no complete ClientHello in {HELD_MAX} datagrams");
            self.ctx
                .metrics
                .quic_initial(&self.ctx.config.name, "too_large");
            self.refuse_entry(from, Kind::TooLarge, &reason);
            return;
        }
        if !self.budget.room(d.len()) && !self.make_room(d.len(), Some(key)) {
            self.drops.add(Dropped::PendingLimit);
            return;
        }
        let Some(Entry::Pending(p)) = self.flows.get_mut(&from) else {
            return;
        };
        p.held.push(d.to_vec());
        let step = p.sniffer.as_mut().map(|s| s.feed(d));
        self.budget.recharge(p);
        let name = &self.ctx.config.name;
        match step {
            None | Some(Ok(None)) => {}
            Some(Ok(Some(hello))) => {
                p.sni = hello.sni;
                p.alpn = hello.alpn;
                p.sniffer = None;
                self.budget.recharge(p);
                self.ctx.metrics.quic_initial(name, "ok");
                self.route(from);
            }
            Some(Err(e)) => {
                self.ctx.metrics.quic_initial(name, e.kind());
                let kind = match &e {
                    crate::quic::InitialError::Hello(h) => h.kind(),
                    crate::quic::InitialError::Malformed(_) => Kind::Malformed,
                    _ => Kind::NotQuic,
                };
                self.refuse_entry(from, kind, &e.to_string());
            }
        }
    }

    /// The hello is complete: route it, count it against the routed-flow
    /// limits, and choose its agent in a task of its own.
    fn route(&mut self, from: SocketAddr) {
        let Some(Entry::Pending(mut p)) = self.flows.remove(&from) else {
            return;
        };
        p.hello_took = p.started.elapsed();
        let routing = self.ctx.routes.current();
        let decision = match routing.table.resolve(p.sni.as_deref()) {
            Ok(d) => d,
            Err(e) => {
                self.refuse(from, p, e.kind(), &e.to_string());
                return;
            }
        };
        let cfg = &self.ctx.config;
        let caps = Caps {
            flows: cfg.max_flows,
            per_client: cfg.max_flows_per_client,
            exempt: &cfg.lb_networks,
        };
        if let Err(full) = self.ctx.limits.admit(from.ip(), caps) {
            self.limited(from, p, full);
            return;
        }
        let (id, span) = (p.id, p.span.clone());
        let route = decision.route.to_string();
        let dynamic = decision.client_named();
        let target = decision.target;
        self.flows.insert(from, Entry::Dialling(p));
        let (ctx, tx) = (Arc::clone(&self.ctx), self.events.clone());
        tokio::spawn(
            async move {
                let ask = choice::Ask {
                    routing: &routing,
                    drained: &ctx.routes.drained,
                    target,
                    client: from.ip(),
                    transport: Transport::Quic,
                    deadline: tokio::time::Instant::now() + DIAL_TIMEOUT,
                };
                let dial = UdpDial {
                    id,
                    client: from,
                    port: ctx.config.agent_port,
                };
                let result = choice::choose(ask, &dial)
                    .await
                    .map(Box::new)
                    .map_err(|e| (e.kind(), e.to_string()));
                drop(routing);
                let _ = tx.send(Event::Dialled {
                    client: from,
                    id,
                    route,
                    dynamic,
                    result,
                });
            }
            .instrument(span),
        );
    }

    /// A complete hello over a routed-flow limit: dropped quietly (one
    /// warning every 10 s), its retransmits too, until `hello_timeout`.
    fn limited(&mut self, from: SocketAddr, p: Box<Pending>, full: Full) {
        let (why, what, max) = match full {
            Full::Flows(m) => (Dropped::FlowLimit, "max_flows", m),
            Full::Client(m) => (Dropped::ClientLimit, "max_flows_per_client", m),
        };
        self.drops.add(why);
        let now = Instant::now();
        if self
            .last_limit_log
            .is_none_or(|t| now - t >= Duration::from_secs(10))
        {
            self.last_limit_log = Some(now);
            tracing::warn!(event = "udp_flow_limit", listener = %self.ctx.config.name, limit = why.label(), max, client = %from, "new QUIC flows refused at {what} = {max} (logged at most every 10 s)");
        }
        self.budget.remove(&p);
        self.remember_refusal(from, p.id);
    }

    pub(super) fn event(&mut self, ev: Event) {
        match ev {
            Event::Dialled {
                client,
                id,
                route,
                dynamic,
                result,
            } => {
                if !matches!(self.flows.get(&client), Some(Entry::Dialling(p)) if p.id == id) {
                    // Forgotten meanwhile (the drain deadline, an upgrade):
                    // dropping the result closes its socket.
                    return;
                }
                let Some(Entry::Dialling(p)) = self.flows.remove(&client) else {
                    return;
                };
                match result {
                    Ok(chosen) => self.start(client, p, *chosen, (route, dynamic)),
                    Err((kind, reason)) => {
                        self.release(client);
                        self.refuse(client, p, kind, &reason);
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

    /// At the drain deadline: forget every flow that is not relaying.
    pub(super) fn forget_unrouted(&mut self) {
        let gone: Vec<SocketAddr> = self
            .flows
            .iter()
            .filter(|(_, e)| !matches!(e, Entry::Active(_)))
            .map(|(a, _)| *a)
            .collect();
        for a in gone {
            if let Some(Entry::Dialling(_)) = self.flows.remove(&a) {
                self.release(a);
            }
        }
        self.budget.clear();
        self.refused.clear();
    }

    /// A routed flow (dialling or active) from `client` is gone.
    pub(super) fn release(&mut self, client: SocketAddr) {
        self.ctx
            .limits
            .release(client.ip(), &self.ctx.config.lb_networks);
    }
}
