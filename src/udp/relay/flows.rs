//! A routed flow's start (held datagrams out, `routed`, its session, its
//! task), its task's end (`closed`), and refusals and expiry of the flows
//! that never got so far.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use super::{Active, Entry, Event, Relay};
use crate::access::{self, Waited};
use crate::choice::Chosen;
use crate::counters::Bytes;
use crate::outcome::Kind;
use crate::session::{self, Open};
use crate::udp::flow::{Flow, FlowEnd};
use crate::udp::pending::Pending;
use crate::upstream::pool::Slot;

impl Relay {
    /// Relay the held datagrams and start the flow's task.
    pub(super) fn start(
        &mut self,
        client: SocketAddr,
        p: Box<Pending>,
        chosen: Chosen<Flow>,
        (route, dynamic): (String, bool),
    ) {
        self.budget.remove(&p);
        // (the hello, choosing the agent and opening its socket)
        let connect = (
            p.hello_took,
            p.started.elapsed().saturating_sub(p.hello_took),
        );
        let (flow, chosen) = chosen.split();
        let flow = Arc::new(flow);
        for d in &p.held {
            flow.to_agent(d);
        }
        let ctx = Arc::clone(&self.ctx);
        let name = ctx.config.name.clone();
        let rec = access::Record {
            sni: p.sni.clone(),
            alpn: p.alpn.clone(),
            route: Some(route.clone()),
            agent: Some(chosen.agent.clone()),
            bytes: Some(Bytes::Datagrams(Arc::clone(&flow.counters))),
            dynamic,
            held: p.held.len(),
            quic: true,
            ..access::Record::default()
        };
        p.span.in_scope(|| {
            access::routed(&rec, chosen.attempt, connect.1, Waited::Initial(connect.0))
        });
        ctx.metrics.udp_flow_started(
            flow.id,
            (name.clone(), route.clone(), rec.metrics_agent().to_owned()),
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
            agent: chosen.agent,
            pool: chosen.pool,
            dynamic,
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
        self.spawn_task(client, flow, open, p.span, chosen.slot);
    }

    /// Run a routed flow's task: the agent's datagrams back to the client
    /// until the flow ends (its `closed` line) or pauses for a live
    /// upgrade.
    pub(super) fn spawn_task(
        &mut self,
        client: SocketAddr,
        flow: Arc<Flow>,
        open: Open,
        span: tracing::Span,
        slot: Option<Slot>,
    ) {
        let session = Arc::clone(open.session());
        self.flows.insert(
            client,
            Entry::Active(Active {
                flow: Arc::clone(&flow),
                session: Arc::clone(&session),
                span: span.clone(),
                slot,
            }),
        );
        let ctx = Arc::clone(&self.ctx);
        let guard = ctx.tracker.enter();
        let (out, tx) = (Arc::clone(&self.out), self.events.clone());
        tokio::spawn(
            async move {
                let cfg = &ctx.config;
                let limits = (cfg.idle_timeout, cfg.hello_timeout);
                let end = flow.run(&out, limits, &session.stop).await;
                let outcome = match end {
                    FlowEnd::Paused => {
                        let _ = tx.send(Event::Paused { id: flow.id, open });
                        drop(guard);
                        return;
                    }
                    FlowEnd::Closed(kind) => kind,
                };
                let info = &session.info;
                let rec = access::Record {
                    sni: info.sni.clone(),
                    alpn: info.alpn.clone(),
                    route: Some(info.route.clone()),
                    agent: Some(info.agent.clone()),
                    bytes: Some(Bytes::Datagrams(Arc::clone(&flow.counters))),
                    dynamic: info.dynamic,
                    quic: true,
                    ..access::Record::default()
                };
                let reason = match outcome {
                    Kind::IdleTimeout if !flow.confirmed() => format!(
                        "the client never answered the agent; no datagram for {:?}",
                        cfg.hello_timeout.min(cfg.idle_timeout)
                    ),
                    Kind::IdleTimeout => {
                        format!("no datagram either way for {:?}", cfg.idle_timeout)
                    }
                    Kind::OperatorClose => "closed by an operator".to_owned(),
                    Kind::DrainDeadline => "the drain deadline passed".to_owned(),
                    other => format!("the agent's socket failed ({other})"),
                };
                access::closed(&rec, flow.age(), outcome, &reason);
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

    /// Refuse the pending flow at `from`.
    pub(super) fn refuse_entry(&mut self, from: SocketAddr, kind: Kind, reason: &str) {
        let Some(Entry::Pending(p)) = self.flows.remove(&from) else {
            return;
        };
        self.refuse(from, p, kind, reason);
    }

    /// Refuse a flow whose hello was read: remembered for `hello_timeout`
    /// (its retransmitted Initials are dropped without routing them
    /// again), counted, and logged (at most [`super::drops::REFUSAL_LINES`]
    /// lines every 10 s).
    pub(super) fn refuse(&mut self, from: SocketAddr, p: Box<Pending>, kind: Kind, reason: &str) {
        self.budget.remove(&p);
        self.ctx
            .metrics
            .udp_flow_refused(&self.ctx.config.name, kind);
        if self.drops.may_log() {
            let rec = access::Record {
                sni: p.sni.clone(),
                alpn: p.alpn.clone(),
                held: p.held.len(),
                quic: true,
                ..access::Record::default()
            };
            p.span
                .in_scope(|| access::closed(&rec, p.started.elapsed(), kind, reason));
        }
        self.remember_refusal(from, p.id);
    }

    pub(super) fn remember_refusal(&mut self, from: SocketAddr, id: u64) {
        self.flows.insert(from, Entry::Refused { id });
        self.refused
            .push_back((Instant::now() + self.ctx.config.hello_timeout, from, id));
        // As many refusals as pending flows at most: the oldest go first.
        while self.refused.len() > self.budget.max_count {
            if let Some((_, c, id)) = self.refused.pop_front() {
                self.forget_refusal(c, id);
            }
        }
    }

    pub(super) fn forget_refusal(&mut self, client: SocketAddr, id: u64) {
        if matches!(self.flows.get(&client), Some(Entry::Refused { id: r }) if *r == id) {
            self.flows.remove(&client);
        }
    }

    /// Forget refusals whose time is up, time out hellos that did not
    /// complete, publish the counts.
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(&(until, client, id)) = self.refused.front() {
            if until > now {
                break;
            }
            self.refused.pop_front();
            self.forget_refusal(client, id);
        }
        let timeout = self.ctx.config.hello_timeout;
        if let Some(before) = now.checked_sub(timeout) {
            while let Some((client, id)) = self.budget.pop_started_before(before) {
                if !matches!(self.flows.get(&client), Some(Entry::Pending(p)) if p.id == id) {
                    continue;
                }
                if let Some(Entry::Pending(p)) = self.flows.remove(&client) {
                    self.budget.remove(&p);
                    self.drops.timed_out();
                    let name = &self.ctx.config.name;
                    self.ctx.metrics.quic_initial(name, "timeout");
                    self.ctx.metrics.udp_flow_refused(name, Kind::Timeout);
                    p.span.in_scope(|| tracing::debug!(target: access::ACCESS_LOG, event = "closed", outcome = "timeout", datagrams = p.held.len(), "no complete ClientHello within {timeout:?}; forgotten"));
                }
            }
        }
        let name = self.ctx.config.name.clone();
        self.drops.flush(&self.ctx.metrics, &name, now);
        self.ctx
            .metrics
            .udp_pending(&name, self.ctx.socket, self.budget.count, self.budget.bytes);
    }
}
