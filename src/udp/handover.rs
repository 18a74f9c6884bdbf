//! A UDP listener's relay in a live upgrade: in the old process it stops
//! reading, pauses its routed flows and offers them; in the new one it
//! starts with the flows the old one handed over, before it reads the
//! socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Entry, Flow, Relay};
use crate::session::{self, Open, Session};
use crate::shutdown::Halt;

/// A live upgrade asks a relay for its flows: it stops reading its
/// sockets, pauses every routed flow and answers on `reply`.
#[derive(Debug)]
pub struct HandoverAsk {
    /// Where the paused flows go.
    pub reply: oneshot::Sender<PausedFlows>,
}

/// A relay's routed flows, paused: nothing reads the listener's socket or
/// theirs until `decided` says whether the new process took them (`true`:
/// the relay forgets them and ends; `false` or dropped: they go on here).
/// Flows whose hello was not complete are dropped: their clients
/// retransmit their Initials, which the new process reads.
#[derive(Debug)]
pub struct PausedFlows {
    /// The flows.
    pub flows: Vec<(Arc<Flow>, Arc<Session>)>,
    /// The new process's answer.
    pub decided: oneshot::Sender<bool>,
}

/// A flow handed over by the previous process of a live upgrade.
#[derive(Debug)]
pub struct AdoptedFlow {
    /// What the access log says about it.
    pub info: session::Info,
    /// The agent's address.
    pub agent: SocketAddr,
    /// Its socket, connected to the agent.
    pub sock: std::net::UdpSocket,
    /// Datagrams and bytes each way, and drops, so far (as
    /// [`DatagramCounters`](crate::counters::DatagramCounters)).
    pub counts: [u64; 5],
    /// How long it has existed, and how long ago a datagram last moved.
    pub age: (Duration, Duration),
}

/// How a relay is reached by a live upgrade: in the old process, where to
/// ask for its flows; in the new one, the flows it starts with.
#[derive(Debug, Default)]
pub struct Handover {
    /// Asks for the flows (old process).
    pub asks: Option<mpsc::UnboundedReceiver<HandoverAsk>>,
    /// The flows to start with, before the socket is read (new process;
    /// a closed channel: none).
    pub adopt: Option<oneshot::Receiver<Vec<AdoptedFlow>>>,
}

/// A live upgrade collecting this relay's flows.
pub(super) struct Handing {
    /// Where the paused flows go, once every task has stopped.
    pub(super) reply: Option<oneshot::Sender<PausedFlows>>,
    /// Flow tasks not stopped yet.
    pub(super) running: usize,
    /// The sessions of the stopped flows, held until the new process
    /// answers.
    pub(super) parked: HashMap<u64, Open>,
}

impl Relay {
    /// A live upgrade asks for the flows: stop reading, forget every flow
    /// that is not routed (its client retransmits its Initials to the new
    /// process), pause the routed ones.
    pub(super) fn begin_handover(&mut self, ask: HandoverAsk) {
        let unrouted: Vec<SocketAddr> = self
            .flows
            .iter()
            .filter(|(_, e)| !matches!(e, Entry::Active(_)))
            .map(|(a, _)| *a)
            .collect();
        let dropped = unrouted.len();
        for a in unrouted {
            self.flows.remove(&a);
            self.release(a);
        }
        self.expiry.clear();
        let mut running = 0;
        for e in self.flows.values() {
            if let Entry::Active(a) = e {
                a.session.stop.raise(Halt::Handover);
                running += 1;
            }
        }
        tracing::debug!(listener = %self.ctx.config.name, flows = running, unrouted = dropped, "pausing QUIC flows for the live upgrade");
        self.handing = Some(Handing {
            reply: Some(ask.reply),
            running,
            parked: HashMap::new(),
        });
    }

    /// Once every flow task has stopped: offer the flows; returns where
    /// the answer comes.
    pub(super) fn offer(&mut self) -> Option<oneshot::Receiver<bool>> {
        let h = self.handing.as_mut()?;
        if h.running > 0 {
            return None;
        }
        let reply = h.reply.take()?;
        let flows = self
            .flows
            .values()
            .filter_map(|e| match e {
                Entry::Active(a) => Some((Arc::clone(&a.flow), Arc::clone(&a.session))),
                _ => None,
            })
            .collect();
        let (tx, rx) = oneshot::channel();
        if reply.send(PausedFlows { flows, decided: tx }).is_err() {
            // Nobody waits for them: go on here.
            self.resume();
            return None;
        }
        Some(rx)
    }

    /// The new process took the flows: they are no longer this relay's.
    pub(super) fn handed_over(&mut self) {
        let name = self.ctx.config.name.clone();
        let n = self.flows.len();
        for (_, e) in self.flows.drain() {
            if let Entry::Active(a) = e {
                self.ctx.metrics.udp_flow_closed(a.flow.id, &name, None);
            }
        }
        self.per_client.clear();
        // Dropping the parked sessions removes them from the list.
        self.handing = None;
        tracing::info!(event = "udp_handed_over", listener = %name, flows = n, "QUIC flows handed over to the new process");
    }

    /// The new process did not take the flows: they go on here.
    pub(super) fn resume(&mut self) {
        let Some(mut h) = self.handing.take() else {
            return;
        };
        let active: Vec<(SocketAddr, Arc<Flow>, Arc<Session>, tracing::Span)> = self
            .flows
            .iter()
            .filter_map(|(c, e)| match e {
                Entry::Active(a) => Some((
                    *c,
                    Arc::clone(&a.flow),
                    Arc::clone(&a.session),
                    a.span.clone(),
                )),
                _ => None,
            })
            .collect();
        for (client, flow, session, span) in active {
            session.stop.withdraw(Halt::Handover);
            // A flow whose task had not stopped yet runs on.
            if let Some(open) = h.parked.remove(&flow.id) {
                self.spawn_task(client, flow, open, span);
            }
        }
    }

    /// A flow handed over by the previous process: it relays from now on.
    pub(super) fn adopt(&mut self, f: AdoptedFlow) {
        let client = f.info.client;
        let id = f.info.id;
        let cfg = &self.ctx.config;
        let span =
            tracing::info_span!("flow", id, listener = %cfg.name, client = %client, proto = "quic");
        let flow = match Flow::adopt(id, client, f.agent, f.sock, f.counts, f.age) {
            Ok(flow) => Arc::new(flow),
            Err(e) => {
                span.in_scope(|| tracing::warn!(event = "adopt_failed", error = %e, "a QUIC flow handed over could not be registered; it is dropped"));
                return;
            }
        };
        let key = (
            cfg.name.clone(),
            f.info.route.clone(),
            f.info.metrics_agent().to_owned(),
        );
        self.ctx
            .metrics
            .udp_flow_adopted(id, key, Arc::clone(&flow.counters));
        let open = self.ctx.sessions.open(session::New {
            info: f.info,
            bytes: session::Bytes::Datagrams(Arc::clone(&flow.counters)),
            movable: false,
            span: span.clone(),
            progress: self.ctx.config.log_progress_interval,
        });
        *self.per_client.entry(client.ip()).or_default() += 1;
        self.spawn_task(client, flow, open, span);
    }
}
