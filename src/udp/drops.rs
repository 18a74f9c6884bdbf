//! What a UDP listener drops without a flow to carry it, counted locally
//! (a plain add per datagram, no lock) and added to `/metrics` on each
//! sweep; one summary line at most every [`SUMMARY_EVERY`] names what was
//! dropped since the last. Refusals of flows whose hello was complete are
//! logged one by one, but at most [`REFUSAL_LINES`] per summary period:
//! spoofed Initials cost no log flood.

use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::quic::InitialError;

/// Why a client datagram was dropped without reaching an agent (the
/// `reason` of `splicegate_udp_datagrams_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Dropped {
    /// The listener drains: no new flow.
    Draining,
    /// `max_flows` routed flows already.
    FlowLimit,
    /// The client is at `max_flows_per_client`.
    ClientLimit,
    /// A datagram of a refused flow.
    Refused,
    /// Longer than a receive slot.
    Truncated,
    /// Not QUIC, or a short header of no flow here (another instance's,
    /// or a client whose address changed).
    NotQuic,
    /// A long header of a version splicegate cannot read.
    UnsupportedVersion,
    /// A QUIC packet of another type where a flow needs an Initial.
    NotInitial,
    /// An Initial datagram under 1200 bytes.
    TooShort,
    /// Header fields that cannot be right.
    Malformed,
    /// An Initial that does not decrypt with its connection ID's keys.
    DecryptFailed,
    /// An unusable ClientHello.
    BadHello,
    /// The pending budget is full and nothing could be evicted.
    PendingLimit,
    /// A datagram to a pending flow that is not one of its handshake
    /// packets, or one over the datagrams held per flow.
    NotHeld,
}

const COUNT: usize = 14;
const LABELS: [&str; COUNT] = [
    "draining",
    "flow_limit",
    "client_limit",
    "refused",
    "truncated",
    "not_quic",
    "unsupported_version",
    "not_initial",
    "too_short",
    "malformed",
    "decrypt_failed",
    "bad_hello",
    "pending_limit",
    "not_held",
];

impl Dropped {
    /// Why a datagram could not start (or add to) a flow.
    pub fn of(e: &InitialError) -> Dropped {
        match e {
            InitialError::NotQuic(_) => Dropped::NotQuic,
            InitialError::UnsupportedVersion(_) => Dropped::UnsupportedVersion,
            InitialError::NotInitial(_) => Dropped::NotInitial,
            InitialError::TooShort(_) => Dropped::TooShort,
            InitialError::Malformed(_) => Dropped::Malformed,
            InitialError::DecryptFailed => Dropped::DecryptFailed,
            InitialError::Hello(_) => Dropped::BadHello,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        LABELS[self as usize]
    }
}

/// How often the summary line may be written.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Refusal lines per summary period.
pub const REFUSAL_LINES: u32 = 100;

/// One listener socket's drop counts.
#[derive(Debug)]
pub struct Drops {
    /// Not yet added to `/metrics`.
    unflushed: [u64; COUNT],
    /// Since the last summary line.
    unsummed: [u64; COUNT],
    /// Flows evicted from the pending budget, and hellos timed out, since
    /// the last summary line.
    evicted: u64,
    timed_out: u64,
    /// Refusal lines left in this period, and those not written.
    lines_left: u32,
    unlogged: u64,
    /// When the last summary line was written (None: never; the first
    /// comes with the first sweep that has something to say).
    last_summary: Option<Instant>,
}

impl Default for Drops {
    fn default() -> Self {
        Drops {
            unflushed: [0; COUNT],
            unsummed: [0; COUNT],
            evicted: 0,
            timed_out: 0,
            lines_left: REFUSAL_LINES,
            unlogged: 0,
            last_summary: None,
        }
    }
}

impl Drops {
    /// One datagram dropped.
    pub fn add(&mut self, why: Dropped) {
        self.unflushed[why as usize] += 1;
        self.unsummed[why as usize] += 1;
    }

    /// A pending flow evicted to make room.
    pub fn evicted(&mut self) {
        self.evicted += 1;
    }

    /// A pending flow's hello did not complete in time.
    pub fn timed_out(&mut self) {
        self.timed_out += 1;
    }

    /// Whether a refused flow may have its own log line now (else it is
    /// counted in the summary).
    pub fn may_log(&mut self) -> bool {
        if self.lines_left > 0 {
            self.lines_left -= 1;
            true
        } else {
            self.unlogged += 1;
            false
        }
    }

    /// Add the counts to `/metrics`; write the summary line when one is
    /// due and something happened.
    pub fn flush(&mut self, metrics: &Metrics, listener: &str, now: Instant) {
        for (i, n) in self.unflushed.iter_mut().enumerate() {
            if *n > 0 {
                metrics.udp_dropped(listener, LABELS[i], *n);
                *n = 0;
            }
        }
        if self
            .last_summary
            .is_some_and(|t| now.duration_since(t) < SUMMARY_EVERY)
        {
            return;
        }
        self.lines_left = REFUSAL_LINES;
        let total: u64 = self.unsummed.iter().sum();
        if total == 0 && self.evicted == 0 && self.timed_out == 0 && self.unlogged == 0 {
            return;
        }
        self.last_summary = Some(now);
        let mut by: Vec<String> = Vec::new();
        for (i, n) in self.unsummed.iter_mut().enumerate() {
            if *n > 0 {
                by.push(format!("{}={n}", LABELS[i]));
                *n = 0;
            }
        }
        tracing::info!(
            event = "udp_dropped",
            listener,
            datagrams = total,
            reasons = %by.join(","),
            pending_evicted = self.evicted,
            hello_timeouts = self.timed_out,
            refusals_not_logged = self.unlogged,
            "QUIC listener: datagrams dropped without a flow, pending flows evicted or timed out (since the last such line)"
        );
        self.evicted = 0;
        self.timed_out = 0;
        self.unlogged = 0;
    }
}
