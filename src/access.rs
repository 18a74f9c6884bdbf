//! The access log: what one connection or flow did, for every transport
//! (passthrough, terminate, QUIC), as a `routed` event once an agent is
//! connected and a `closed` event at the end, both written here and
//! nowhere else. (A long session's `progress` lines come from the session
//! sampler, [`crate::session`].) A leaf: it imports only the counters and
//! the outcome labels.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::counters::Bytes;
pub use crate::logging::ACCESS_LOG;
use crate::outcome::Kind;

/// What the access log says about a connection or flow, filled in step by
/// step.
#[derive(Debug, Default)]
pub struct Record {
    /// The server name of the ClientHello (TCP or QUIC).
    pub sni: Option<String>,
    /// The ALPN names the ClientHello offered.
    pub alpn: Vec<String>,
    /// The rule that chose the agent.
    pub route: Option<String>,
    /// The agent (for pools, the one chosen).
    pub agent: Option<String>,
    /// Bytes (and for QUIC datagrams) moved, once forwarding starts.
    pub bytes: Option<Bytes>,
    /// A LOCAL header followed by a close: a load-balancer health probe.
    pub probe: bool,
    /// Terminate mode: the request path (without the query string, which
    /// may carry DCV auth tokens).
    pub path: Option<String>,
    /// Terminate mode: the response status (the agent's, or splicegate's
    /// own for errors, health and redirects).
    pub status: Option<u16>,
    /// The agent came from the client's name, path or session (metrics
    /// label it `dynamic`, so a client cannot make one time series per
    /// address an `allow` network holds).
    pub dynamic: bool,
    /// QUIC: datagrams held while the ClientHello completed.
    pub held: usize,
    /// A QUIC flow (its lines name datagrams as well as bytes).
    pub quic: bool,
}

impl Record {
    /// The `agent` label for `/metrics`.
    pub fn metrics_agent(&self) -> &str {
        if self.dynamic {
            "dynamic"
        } else {
            self.agent.as_deref().unwrap_or("-")
        }
    }

    /// The SNI for logs (`-` without one).
    pub fn sni(&self) -> &str {
        self.sni.as_deref().unwrap_or("-")
    }

    /// The ALPN list for logs, comma-separated (`-` without one).
    pub fn alpn(&self) -> String {
        if self.alpn.is_empty() {
            "-".to_owned()
        } else {
            crate::logging::printable(&self.alpn.join(",")).into_owned()
        }
    }
}

/// What a connection waited for before it was routed.
#[derive(Debug, Clone, Copy)]
pub enum Waited<'a> {
    /// Passthrough: the ClientHello, from accept.
    Hello(Duration),
    /// Terminate mode: the request head, from accept.
    Request {
        /// `GET`, `POST`, ...
        method: &'a str,
        /// A WebSocket handshake.
        websocket: bool,
        /// Time from accept.
        took: Duration,
    },
    /// QUIC: the ClientHello in the Initial packets, from the first
    /// datagram.
    Initial(Duration),
}

/// The `routed` event: an agent is connected (or, for QUIC, its socket is
/// open and the held datagrams are on their way).
pub fn routed(rec: &Record, attempt: usize, connect: Duration, waited: Waited<'_>) {
    let (sni, route, agent) = (
        rec.sni(),
        rec.route.as_deref().unwrap_or("-"),
        rec.agent.as_deref().unwrap_or("-"),
    );
    let alpn = rec.alpn();
    let connect_us = connect.as_micros() as u64;
    match waited {
        Waited::Hello(d) => tracing::info!(
            target: ACCESS_LOG,
            event = "routed",
            sni,
            alpn = %alpn,
            route,
            agent,
            attempt,
            hello_us = d.as_micros() as u64,
            connect_us,
            "connection routed"
        ),
        Waited::Request {
            method,
            websocket,
            took,
        } => tracing::info!(
            target: ACCESS_LOG,
            event = "routed",
            sni,
            alpn = %alpn,
            method,
            path = rec.path.as_deref().unwrap_or("-"),
            websocket,
            route,
            agent,
            attempt,
            request_us = took.as_micros() as u64,
            connect_us,
            "request routed"
        ),
        Waited::Initial(d) => tracing::info!(
            target: ACCESS_LOG,
            event = "routed",
            sni,
            alpn = %alpn,
            route,
            agent,
            attempt,
            hello_us = d.as_micros() as u64,
            connect_us,
            datagrams_held = rec.held,
            "QUIC flow routed"
        ),
    }
}

/// The `closed` event: how the connection or flow ended, with its totals.
/// A load balancer's health probe is written at debug level (as HAProxy's
/// `dontlognull` keeps them out).
pub fn closed(rec: &Record, duration: Duration, outcome: Kind, reason: &str) {
    let (sni, route, agent) = (
        rec.sni(),
        rec.route.as_deref().unwrap_or("-"),
        rec.agent.as_deref().unwrap_or("-"),
    );
    let alpn = rec.alpn();
    let duration_ms = duration.as_millis() as u64;
    let outcome = outcome.as_str();
    let reason = crate::logging::printable(reason);
    if rec.quic {
        let [pa, ba, pc, bc, dropped] = match &rec.bytes {
            Some(Bytes::Datagrams(c)) => {
                let [pa, ba, pc, bc] = c.snapshot();
                [pa, ba, pc, bc, c.dropped.load(Relaxed)]
            }
            _ => [0; 5],
        };
        if rec.bytes.is_none() {
            tracing::info!(
                target: ACCESS_LOG,
                event = "closed",
                sni,
                alpn = %alpn,
                route,
                agent,
                packets_held = rec.held,
                duration_ms,
                outcome,
                reason = %reason,
                "QUIC flow refused; no datagram reached an agent"
            );
            return;
        }
        tracing::info!(
            target: ACCESS_LOG,
            event = "closed",
            sni,
            alpn = %alpn,
            route,
            agent,
            packets_to_agent = pa,
            bytes_to_agent = ba,
            packets_to_client = pc,
            bytes_to_client = bc,
            dropped,
            duration_ms,
            outcome,
            reason = %reason,
            "QUIC flow closed"
        );
        return;
    }
    let (to_agent, to_client) = rec.bytes.as_ref().map_or((0, 0), Bytes::totals);
    let path = rec.path.as_deref().unwrap_or("-");
    let status = rec.status.map_or_else(|| "-".to_owned(), |s| s.to_string());
    macro_rules! closed {
        ($level:ident) => {
            tracing::$level!(
                target: ACCESS_LOG,
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
    if rec.probe {
        closed!(debug);
    } else {
        closed!(info);
    }
}

/// The debug line of a session that moved to the new process of a live
/// upgrade (the new process writes its `closed`).
pub fn handed_over(quic: bool) {
    let what = if quic { "QUIC flow" } else { "connection" };
    tracing::debug!(
        target: ACCESS_LOG,
        event = "handed_over",
        "{what} handed over to the new process"
    );
}

/// The debug line of a session taken over from the previous process.
pub fn adopted(quic: bool) {
    let what = if quic { "QUIC flow" } else { "connection" };
    tracing::debug!(
        target: ACCESS_LOG,
        event = "adopted",
        "{what} taken over from the previous process"
    );
}
