//! One routed QUIC flow: a UDP socket connected to the agent (so the kernel
//! hands this flow exactly the agent's replies), its counters, and the task
//! that relays the agent's datagrams back to the client through the
//! listener's socket until the flow goes idle or the drain ends it.
//!
//! A flow is *confirmed* once its client sends a datagram after the
//! agent's first: a client that really is at its address. Until then it
//! ends after `hello_timeout` of quiet rather than `idle_timeout`, so
//! Initials sent from spoofed addresses (the agent answers them, nobody
//! answers back) cannot hold the flow table for long.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::batch::{with_batch, Batch, Out};
pub use crate::counters::DatagramCounters;
use crate::outcome::Kind;
use crate::shutdown::{Halt, Stop};
use crate::upstream::ConnectError;

/// Socket buffers asked for a flow's agent socket.
pub const FLOW_BUFFER: usize = 1 << 20;

/// A routed flow.
#[derive(Debug)]
pub struct Flow {
    /// Connection id (shared with TCP connections' numbering).
    pub id: u64,
    /// The client's address and port: the flow's key.
    pub client: SocketAddr,
    /// The agent.
    pub agent: SocketAddr,
    /// Connected to the agent.
    pub sock: UdpSocket,
    /// Counters.
    pub counters: Arc<DatagramCounters>,
    started: Instant,
    /// Milliseconds after `started` of the last datagram either way.
    last: AtomicU64,
    /// The client sent after the agent did.
    confirmed: AtomicBool,
    /// The agent's socket takes UDP GSO sends.
    gso: AtomicBool,
}

/// How a flow's task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEnd {
    /// The flow is over, with this outcome.
    Closed(Kind),
    /// Paused for a live upgrade: the flow goes on, here or in the new
    /// process.
    Paused,
}

impl Flow {
    /// A flow handed over by the previous process of a live upgrade: its
    /// socket connected to `agent`, the counts so far, how long it has
    /// existed (`age`) and how long ago its last datagram moved (`quiet`).
    /// Inside a runtime.
    pub fn adopt(
        id: u64,
        client: SocketAddr,
        agent: SocketAddr,
        sock: std::net::UdpSocket,
        counts: [u64; 5],
        (age, quiet): (Duration, Duration),
    ) -> io::Result<Flow> {
        sock.set_nonblocking(true)?;
        let sock = UdpSocket::from_std(sock)?;
        let now = Instant::now();
        let started = now.checked_sub(age).unwrap_or(now);
        let last = age.saturating_sub(quiet).as_millis() as u64;
        let c = DatagramCounters::default();
        let [pa, ba, pc, bc, dropped] = counts;
        c.to_agent_packets.store(pa, Ordering::Relaxed);
        c.to_agent_bytes.store(ba, Ordering::Relaxed);
        c.to_client_packets.store(pc, Ordering::Relaxed);
        c.to_client_bytes.store(bc, Ordering::Relaxed);
        c.dropped.store(dropped, Ordering::Relaxed);
        Ok(Flow {
            id,
            client,
            agent,
            sock,
            counters: Arc::new(c),
            started,
            last: AtomicU64::new(last),
            confirmed: AtomicBool::new(true),
            gso: AtomicBool::new(true),
        })
    }

    /// How long ago the last datagram moved either way.
    pub fn quiet(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// A socket connected to `agent`, from an ephemeral port of the
    /// matching family. No port left (`net.ipv4.ip_local_port_range` is
    /// used up: each flow holds one) or no descriptor is
    /// [`ConnectError::Local`].
    pub async fn connect(
        id: u64,
        client: SocketAddr,
        agent: SocketAddr,
    ) -> Result<Flow, ConnectError> {
        let local: SocketAddr = if agent.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let failed = |source: io::Error| {
            if crate::upstream::local_shortage(&source) {
                ConnectError::Local {
                    addr: agent,
                    source,
                }
            } else {
                ConnectError::Io {
                    addr: agent,
                    source,
                }
            }
        };
        let sock = UdpSocket::bind(local).await.map_err(failed)?;
        // Room for a burst of jumbo datagrams each way (20 × 8,500 bytes
        // take about 340 KB of socket memory, above the usual 208 KB
        // default), as far as net.core.rmem_max / wmem_max allow; memory
        // is used only while datagrams wait.
        let s = socket2::SockRef::from(&sock);
        let _ = s.set_recv_buffer_size(FLOW_BUFFER);
        let _ = s.set_send_buffer_size(FLOW_BUFFER);
        sock.connect(agent).await.map_err(failed)?;
        Ok(Flow {
            id,
            client,
            agent,
            sock,
            counters: Arc::default(),
            started: Instant::now(),
            last: AtomicU64::new(0),
            confirmed: AtomicBool::new(false),
            gso: AtomicBool::new(true),
        })
    }

    /// Whether the client sent after the agent did.
    pub fn confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Relaxed)
    }

    fn confirm(&self) {
        if !self.confirmed.load(Ordering::Relaxed)
            && self.counters.to_client_packets.load(Ordering::Relaxed) > 0
        {
            self.confirmed.store(true, Ordering::Relaxed);
        }
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// When the flow goes idle if nothing more moves.
    fn idle_at(&self, idle: Duration) -> Instant {
        self.started + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle
    }

    /// How long the flow has existed.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Relay one client datagram to the agent without blocking: when the
    /// socket's buffer is full it is dropped, as a router would. (A plain
    /// `send`, not tokio's `try_send`, which refuses to try until the
    /// reactor has seen the new socket writable.)
    pub fn to_agent(&self, datagram: &[u8]) {
        let sent = nix::sys::socket::send(
            self.sock.as_raw_fd(),
            datagram,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        );
        match sent {
            Ok(n) => {
                self.counters
                    .to_agent_packets
                    .fetch_add(1, Ordering::Relaxed);
                self.counters
                    .to_agent_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.confirm();
        self.touch();
    }

    /// Relay datagrams `range` of the thread's last receive (all from this
    /// flow's client) to the agent in as few system calls as the kernel
    /// allows (GSO runs, else `sendmmsg`); what the socket's buffer cannot
    /// take is dropped, counted.
    pub fn to_agent_batch(&self, b: &mut Batch, range: std::ops::Range<usize>) {
        let n = range.len();
        let bytes: usize = range.clone().map(|i| b.get(i).0.len()).sum();
        let sent = b
            .send(self.sock.as_raw_fd(), None, range.clone(), &self.gso)
            .unwrap_or(0);
        let c = &self.counters;
        if sent == n {
            c.to_agent_packets.fetch_add(n as u64, Ordering::Relaxed);
            c.to_agent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        } else {
            let took: usize = range.take(sent).map(|i| b.get(i).0.len()).sum();
            c.to_agent_packets.fetch_add(sent as u64, Ordering::Relaxed);
            c.to_agent_bytes.fetch_add(took as u64, Ordering::Relaxed);
            c.dropped.fetch_add((n - sent) as u64, Ordering::Relaxed);
        }
        self.confirm();
        self.touch();
    }

    /// Relay the agent's datagrams to the client through the listener's
    /// socket until the flow is idle for `idle` (`unconfirmed` before it
    /// is confirmed) or `stop` says so (close, the drain deadline, or a
    /// pause for a live upgrade); returns why it ended.
    pub async fn run(
        self: &Arc<Self>,
        out: &Out,
        (idle, unconfirmed): (Duration, Duration),
        stop: &Stop,
    ) -> FlowEnd {
        let end = self.relay(out, (idle, unconfirmed), stop).await;
        super::spin::forget(self);
        end
    }

    async fn relay(
        self: &Arc<Self>,
        out: &Out,
        (idle, unconfirmed): (Duration, Duration),
        stop: &Stop,
    ) -> FlowEnd {
        let limit = |f: &Flow| {
            if f.confirmed() {
                idle
            } else {
                unconfirmed.min(idle)
            }
        };
        // One timer for the flow's life, moved only when it fires: a busy
        // flow does not touch the timer wheel per datagram.
        let sleep = tokio::time::sleep_until(self.idle_at(limit(self)).into());
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                h = stop.wait() => return match h {
                    // Whatever the agent sends meanwhile waits in the
                    // socket's buffer for the process that goes on.
                    Halt::Handover => FlowEnd::Paused,
                    Halt::Close => FlowEnd::Closed(Kind::OperatorClose),
                    Halt::Deadline => FlowEnd::Closed(Kind::DrainDeadline),
                },
                r = self.sock.readable() => {
                    if r.is_err() {
                        return FlowEnd::Closed(Kind::IoError);
                    }
                    if let Some(kind) = self.relay_back(out) {
                        return FlowEnd::Closed(kind);
                    }
                }
                () = &mut sleep => {
                    let at = self.idle_at(limit(self));
                    if at <= Instant::now() {
                        return FlowEnd::Closed(Kind::IdleTimeout);
                    }
                    sleep.as_mut().reset(at.into());
                }
            }
        }
    }

    /// Move what the agent sent, in batches, until its socket is drained.
    /// Some(kind) ends the flow.
    fn relay_back(self: &Arc<Self>, out: &Out) -> Option<Kind> {
        let fd = out.sock.as_raw_fd();
        // A bounded number of batches per wake-up, so one busy flow
        // cannot hold its worker thread.
        for _ in 0..8 {
            let moved = self.sock.try_io(Interest::READABLE, || {
                with_batch(|b| {
                    let n = b.recv(&self.sock)?;
                    // A truncated datagram (longer than a jumbo frame) and
                    // those after it in the batch are dropped.
                    let good = (0..n).find(|&i| b.get(i).2).unwrap_or(n);
                    let sent = b
                        .send(fd, Some(self.client), 0..good, &out.gso)
                        .unwrap_or(0);
                    let bytes: usize = (0..sent).map(|i| b.get(i).0.len()).sum();
                    let c = &self.counters;
                    c.to_client_packets
                        .fetch_add(sent as u64, Ordering::Relaxed);
                    c.to_client_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                    c.dropped.fetch_add((n - sent) as u64, Ordering::Relaxed);
                    self.touch();
                    super::spin::note(self);
                    super::spin::moved();
                    // A short batch emptied the socket: let tokio clear its
                    // readiness now rather than after another `recvmmsg`.
                    if n < super::batch::BATCH {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n)
                })
            });
            match moved {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                // The agent's port answered ICMP unreachable: keep the flow
                // (the client may retry) until it idles out.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return None,
                Err(_) => return Some(Kind::IoError),
            }
        }
        None
    }
}
