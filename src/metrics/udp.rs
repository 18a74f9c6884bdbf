//! The QUIC relay's series: flows by outcome, datagrams dropped without a
//! flow, Initials read, pending flows and their bytes, and datagram and
//! byte totals (live flows read at scrape time from their own counters).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use super::{esc, header, Inner, Metrics, RouteKey};
use crate::counters::DatagramCounters;
use crate::outcome::Kind;

impl Metrics {
    /// What reading a new QUIC flow's Initial packets gave (`ok`, or an
    /// [`crate::quic::InitialError`] kind, or `timeout`).
    pub fn quic_initial(&self, listener: &str, outcome: &'static str) {
        *self
            .lock()
            .quic_initial
            .entry((listener.to_owned(), outcome))
            .or_default() += 1;
    }

    /// `n` client datagrams dropped without a flow to carry them
    /// (`draining`, `flow_limit`, `client_limit`, `refused`, `truncated`);
    /// UDP listeners count locally and add their counts periodically.
    pub fn udp_dropped(&self, listener: &str, reason: &'static str, n: u64) {
        *self
            .lock()
            .udp_dropped
            .entry((listener.to_owned(), reason))
            .or_default() += n;
    }

    /// A QUIC flow was routed; its datagrams are counted live from
    /// `counters` until [`Metrics::udp_flow_closed`].
    pub fn udp_flow_started(&self, id: u64, key: RouteKey, counters: Arc<DatagramCounters>) {
        let mut g = self.lock();
        *g.udp_active.entry(key.0.clone()).or_default() += 1;
        g.udp_live.insert(id, (key, counters, [0; 4]));
    }

    /// A QUIC flow adopted from the previous process of a live upgrade;
    /// its datagrams count from what `counters` hold now.
    pub fn udp_flow_adopted(&self, id: u64, key: RouteKey, counters: Arc<DatagramCounters>) {
        let base = counters.snapshot();
        let mut g = self.lock();
        *g.udp_active.entry(key.0.clone()).or_default() += 1;
        *g.adopted.entry("flow").or_default() += 1;
        g.udp_live.insert(id, (key, counters, base));
    }

    /// A routed QUIC flow ended (`None`: it moved to the new process of a
    /// live upgrade, and did not close).
    pub fn udp_flow_closed(&self, id: u64, listener: &str, outcome: Option<Kind>) {
        let mut g = self.lock();
        if let Some((key, c, base)) = g.udp_live.remove(&id) {
            let snap = c.snapshot();
            let d = g.udp_datagrams.entry(key).or_default();
            for ((total, v), b) in d.iter_mut().zip(snap).zip(base) {
                *total += v.saturating_sub(b);
            }
        }
        if let Some(a) = g.udp_active.get_mut(listener) {
            *a = a.saturating_sub(1);
        }
        if let Some(outcome) = outcome {
            *g.udp_flows
                .entry((listener.to_owned(), outcome.as_str()))
                .or_default() += 1;
        }
    }

    /// A QUIC flow was refused before any datagram reached an agent.
    pub fn udp_flow_refused(&self, listener: &str, outcome: Kind) {
        *self
            .lock()
            .udp_flows
            .entry((listener.to_owned(), outcome.as_str()))
            .or_default() += 1;
    }

    /// One listener socket's pending QUIC flows and the bytes they hold
    /// (set on each sweep).
    pub fn udp_pending(&self, listener: &str, socket: usize, flows: usize, bytes: usize) {
        self.lock()
            .udp_pending
            .insert((listener.to_owned(), socket), (flows as u64, bytes as u64));
    }
}

/// The QUIC relay's series.
pub(super) fn render(o: &mut String, g: &Inner) {
    header(
        o,
        "splicegate_udp_flows_active",
        "gauge",
        "QUIC flows routed and relaying now.",
    );
    for (l, v) in &g.udp_active {
        let _ = writeln!(
            o,
            "splicegate_udp_flows_active{{listener=\"{}\"}} {v}",
            esc(l)
        );
    }
    let mut pending: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for ((l, _), (n, b)) in &g.udp_pending {
        let e = pending.entry(l.as_str()).or_default();
        e.0 += n;
        e.1 += b;
    }
    for (i, (name, help)) in [
        (
            "splicegate_udp_pending_flows",
            "QUIC flows whose ClientHello is not complete yet (or whose agent is being chosen).",
        ),
        (
            "splicegate_udp_pending_bytes",
            "Bytes those pending flows hold: their datagrams and reassembly buffers.",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        header(o, name, "gauge", help);
        for (l, (n, b)) in &pending {
            let v = if i == 0 { n } else { b };
            let _ = writeln!(o, "{name}{{listener=\"{}\"}} {v}", esc(l));
        }
    }
    header(
        o,
        "splicegate_udp_flows_total",
        "counter",
        "QUIC flows ended, by outcome (refusals included).",
    );
    for ((l, oc), v) in &g.udp_flows {
        let _ = writeln!(
            o,
            "splicegate_udp_flows_total{{listener=\"{}\",outcome=\"{oc}\"}} {v}",
            esc(l)
        );
    }
    header(
        o,
        "splicegate_udp_datagrams_dropped_total",
        "counter",
        "Client datagrams dropped without a flow to carry them, by reason.",
    );
    for ((l, r), v) in &g.udp_dropped {
        let _ = writeln!(
            o,
            "splicegate_udp_datagrams_dropped_total{{listener=\"{}\",reason=\"{r}\"}} {v}",
            esc(l)
        );
    }
    header(
        o,
        "splicegate_quic_initial_total",
        "counter",
        "New QUIC flows by what their Initial packets gave.",
    );
    for ((l, oc), v) in &g.quic_initial {
        let _ = writeln!(
            o,
            "splicegate_quic_initial_total{{listener=\"{}\",outcome=\"{oc}\"}} {v}",
            esc(l)
        );
    }
    let mut totals = g.udp_datagrams.clone();
    for (key, c, base) in g.udp_live.values() {
        let t = totals.entry(key.clone()).or_default();
        for ((total, v), b) in t.iter_mut().zip(c.snapshot()).zip(base) {
            *total += v.saturating_sub(*b);
        }
    }
    for (i, (name, help)) in [
        (
            "splicegate_udp_datagrams_to_agent_total",
            "Datagrams relayed to agents, live flows included.",
        ),
        (
            "splicegate_udp_bytes_to_agent_total",
            "Bytes relayed to agents in datagrams, live flows included.",
        ),
        (
            "splicegate_udp_datagrams_to_client_total",
            "Datagrams relayed to clients, live flows included.",
        ),
        (
            "splicegate_udp_bytes_to_client_total",
            "Bytes relayed to clients in datagrams, live flows included.",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        header(o, name, "counter", help);
        for ((l, r, a), t) in &totals {
            let _ = writeln!(
                o,
                "{name}{{listener=\"{}\",route=\"{}\",agent=\"{}\"}} {}",
                esc(l),
                esc(r),
                esc(a),
                t[i]
            );
        }
    }
}
