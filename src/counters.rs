//! Byte and datagram counters of one session: updated by its forwarding
//! loop with relaxed atomic adds, read by the access log, the idle
//! watchdog, the open-session list and `/metrics`. A leaf: it imports
//! nothing of the crate, so every step can count and the metrics can read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes moved by one connection, updated by the pumps with relaxed atomic
/// adds and read by the access log, the idle watchdog and `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes written to the agent.
    pub to_agent: AtomicU64,
    /// Bytes written to the client.
    pub to_client: AtomicU64,
}

/// A flow's datagram and byte counts, updated with relaxed atomic adds by
/// the two directions and read by `/metrics` and the access log.
#[derive(Debug, Default)]
pub struct DatagramCounters {
    /// Datagrams client → agent.
    pub to_agent_packets: AtomicU64,
    /// Bytes client → agent.
    pub to_agent_bytes: AtomicU64,
    /// Datagrams agent → client.
    pub to_client_packets: AtomicU64,
    /// Bytes agent → client.
    pub to_client_bytes: AtomicU64,
    /// Datagrams dropped: a full socket buffer, a send error, or too long.
    pub dropped: AtomicU64,
}

impl DatagramCounters {
    /// (to_agent packets, to_agent bytes, to_client packets, to_client bytes).
    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.to_agent_packets.load(Ordering::Relaxed),
            self.to_agent_bytes.load(Ordering::Relaxed),
            self.to_client_packets.load(Ordering::Relaxed),
            self.to_client_bytes.load(Ordering::Relaxed),
        ]
    }
}

/// A session's byte counters, updated by its forwarding loop.
#[derive(Debug, Clone)]
pub enum Bytes {
    /// A TCP connection's.
    Stream(Arc<Counters>),
    /// A QUIC flow's.
    Datagrams(Arc<DatagramCounters>),
}

impl Bytes {
    /// (to the agent, to the client) so far.
    pub fn totals(&self) -> (u64, u64) {
        match self {
            Bytes::Stream(c) => (
                c.to_agent.load(Ordering::Relaxed),
                c.to_client.load(Ordering::Relaxed),
            ),
            Bytes::Datagrams(c) => {
                let [_, to_agent, _, to_client] = c.snapshot();
                (to_agent, to_client)
            }
        }
    }
}
