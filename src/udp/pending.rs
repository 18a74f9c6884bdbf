//! Pending flows: clients whose first Initial decrypted but whose
//! ClientHello is not complete yet (or whose agent is being chosen). Each
//! holds its datagrams and its reassembly buffer; the relay counts those
//! bytes exactly, from the allocations' capacities, and a budget bounds
//! them together: `max_pending` flows and `pending_bytes_max` bytes per
//! listener, split among its sockets. A new flow that does not fit evicts
//! the oldest pending one (a hello that completes quickly is never the
//! oldest); a routed flow is never evicted.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use crate::quic::{FlowTag, InitialSniffer};

/// A flow whose hello is not complete, or whose agent is being chosen.
pub struct Pending {
    /// Session id.
    pub id: u64,
    /// Its first datagram's arrival.
    pub started: Instant,
    /// Its tracing span.
    pub span: tracing::Span,
    /// Reads its Initials (None once the hello is complete).
    pub sniffer: Option<InitialSniffer>,
    /// What its handshake datagrams carry.
    pub tag: FlowTag,
    /// Its datagrams so far, relayed once the agent's socket is open.
    pub held: Vec<Vec<u8>>,
    /// From the ClientHello.
    pub sni: Option<String>,
    /// From the ClientHello.
    pub alpn: Vec<String>,
    /// Bytes charged to the budget for it.
    pub cost: usize,
    /// Time from its first datagram to its complete ClientHello.
    pub hello_took: std::time::Duration,
}

/// Fixed cost of a pending flow beside its buffers: the entry itself and
/// its place in the flow table and the queue.
const OVERHEAD: usize = std::mem::size_of::<Pending>() + 96;

impl Pending {
    /// The heap bytes it holds now, as allocated.
    pub fn measure(&self) -> usize {
        let held: usize = self.held.iter().map(Vec::capacity).sum();
        OVERHEAD
            + held
            + self.held.capacity() * std::mem::size_of::<Vec<u8>>()
            + self.sniffer.as_ref().map_or(0, InitialSniffer::heap_bytes)
            + self.sni.as_ref().map_or(0, String::capacity)
            + self.alpn.iter().map(String::capacity).sum::<usize>()
            + self.alpn.capacity() * std::mem::size_of::<String>()
    }
}

/// One socket's share of the pending budget, and the pending flows in the
/// order they started (for eviction and `hello_timeout`).
#[derive(Debug)]
pub struct Budget {
    /// Pending flows now.
    pub count: usize,
    /// Bytes they hold now.
    pub bytes: usize,
    /// This socket's share of `max_pending`.
    pub max_count: usize,
    /// This socket's share of `pending_bytes_max`.
    pub max_bytes: usize,
    /// (started, client, id), oldest first; entries of flows that moved
    /// on are skipped when they come up.
    order: VecDeque<(Instant, SocketAddr, u64)>,
}

impl Budget {
    /// A share of `max_count` flows and `max_bytes` bytes.
    pub fn new(max_count: usize, max_bytes: usize) -> Budget {
        Budget {
            count: 0,
            bytes: 0,
            max_count: max_count.max(1),
            max_bytes: max_bytes.max(1),
            order: VecDeque::new(),
        }
    }

    /// Whether one more flow costing `cost` fits.
    pub fn fits(&self, cost: usize) -> bool {
        self.count < self.max_count && self.bytes + cost <= self.max_bytes
    }

    /// Whether the held bytes may grow by `more`.
    pub fn room(&self, more: usize) -> bool {
        self.bytes + more <= self.max_bytes
    }

    /// Charge a new pending flow.
    pub fn add(&mut self, p: &Pending, client: SocketAddr) {
        self.count += 1;
        self.bytes += p.cost;
        self.order.push_back((p.started, client, p.id));
    }

    /// Charge what a flow holds now (`p.cost` is updated).
    pub fn recharge(&mut self, p: &mut Pending) {
        let now = p.measure();
        self.bytes = self.bytes.saturating_sub(p.cost) + now;
        p.cost = now;
    }

    /// Give back a flow's charge (routed, refused, evicted or expired).
    pub fn remove(&mut self, p: &Pending) {
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(p.cost);
    }

    /// The oldest entry, taken out of the order (it may be stale).
    pub fn pop_oldest(&mut self) -> Option<(Instant, SocketAddr, u64)> {
        self.order.pop_front()
    }

    /// Put back an entry taken with [`Budget::pop_oldest`].
    pub fn push_front(&mut self, e: (Instant, SocketAddr, u64)) {
        self.order.push_front(e);
    }

    /// The oldest entry if it started at or before `before`.
    pub fn pop_started_before(&mut self, before: Instant) -> Option<(SocketAddr, u64)> {
        match self.order.front() {
            Some(&(t, c, id)) if t <= before => {
                self.order.pop_front();
                Some((c, id))
            }
            _ => None,
        }
    }

    /// Forget the order (every pending flow was dropped).
    pub fn clear(&mut self) {
        self.order.clear();
        self.count = 0;
        self.bytes = 0;
    }
}
