//! The relay in a live upgrade: in the old process it stops reading,
//! pauses its routed flows and offers them; in the new one it starts with
//! the flows the old one handed over, before it reads the socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{Entry, Relay};
use crate::session;
use crate::shutdown::Halt;
use crate::udp::flow::Flow;
use crate::udp::handover::{AdoptedFlow, Handing, HandoverAsk, PausedFlows};
use crate::udp::UdpCtx;

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
            if let Some(Entry::Dialling(_)) = self.flows.remove(&a) {
                self.release(a);
            }
        }
        self.budget.clear();
        self.refused.clear();
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
        let flows: Vec<(SocketAddr, Entry)> = self.flows.drain().collect();
        for (client, e) in flows {
            if let Entry::Active(a) = e {
                self.ctx.metrics.udp_flow_closed(a.flow.id, &name, None);
                self.release(client);
            }
        }
        // Dropping the parked sessions removes them from the list.
        self.handing = None;
        tracing::info!(event = "udp_handed_over", listener = %name, flows = n, "QUIC flows handed over to the new process");
    }

    /// The new process did not take the flows: they go on here.
    pub(super) fn resume(&mut self) {
        let Some(mut h) = self.handing.take() else {
            return;
        };
        let active: Vec<SocketAddr> = self
            .flows
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Active(_)))
            .map(|(c, _)| *c)
            .collect();
        for client in active {
            let Some(Entry::Active(a)) = self.flows.remove(&client) else {
                continue;
            };
            a.session.stop.withdraw(Halt::Handover);
            // A flow whose task had stopped starts again; one that had not
            // runs on.
            match h.parked.remove(&a.flow.id) {
                Some(open) => self.spawn_task(client, a.flow, open, a.span, a.slot),
                None => {
                    self.flows.insert(client, Entry::Active(a));
                }
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
        let (pool, agent) = (f.info.pool.clone(), f.info.agent.clone());
        let open = self.ctx.sessions.open(session::New {
            info: f.info,
            bytes: session::Bytes::Datagrams(Arc::clone(&flow.counters)),
            movable: false,
            span: span.clone(),
            progress: self.ctx.config.log_progress_interval,
        });
        self.ctx
            .limits
            .adopt(client.ip(), &self.ctx.config.lb_networks);
        let slot = info_slot(&self.ctx, &pool, &agent);
        self.spawn_task(client, flow, open, span, slot);
    }
}

/// The pool slot of an adopted flow, so least-conn and `max_conns` count
/// it in the new process too (None: not from a pool, or the pool or agent
/// is no longer configured).
fn info_slot(
    ctx: &UdpCtx,
    pool: &Option<String>,
    agent: &str,
) -> Option<crate::upstream::pool::Slot> {
    ctx.routes.current().adopt_slot(pool.as_deref()?, agent)
}
