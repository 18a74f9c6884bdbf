//! The QUIC relay: UDP listeners that route each new client flow by the SNI
//! in its QUIC Initial, then relay its datagrams untouched.
//!
//! A flow is keyed by the client's address and port. A datagram that
//! cannot start one (not QUIC, not an Initial, too short, undecryptable)
//! is dropped and counted, and leaves nothing behind: no state, no log
//! line of its own (a summary every 10 s), no refusal that
//! would drop the same client's real Initial after it. A flow whose first
//! Initial decrypts but whose ClientHello needs more datagrams is
//! *pending*: held apart from routed flows, in a count and
//! byte budget of its own (`max_pending`, `pending_bytes_max`), the oldest
//! evicted first when it is full, so a flood of hellos that never complete
//! cannot refuse a client whose hello does.
//!
//! A complete ClientHello goes through the same route table as TCP
//! ([`crate::route`]) and the same step to an agent
//! ([`crate::choice::choose`]: sessions, pools and their slots, drained
//! agents, the allowlist); the flow then gets a UDP socket of its own
//! connected to the agent ([`flow::Flow`]), so the kernel demultiplexes
//! the agent's replies. From there nothing is parsed: client datagrams
//! arrive in batches (`recvmmsg`) on the listener's socket and leave in
//! batches on the flow's; the agent's come back in batches through the
//! listener's socket (GSO runs, else `sendmmsg`). A flow ends
//! when nothing moved for `idle_timeout` (`hello_timeout` while its client
//! has not answered the agent), or at the drain deadline.
//!
//! A listener runs `udp_workers` sockets bound with SO_REUSEPORT, each on
//! a thread of its own; the kernel hashes a flow's 4-tuple to one socket,
//! so a flow stays with one worker. Limits on routed flows are the
//! listener's ([`FlowLimits`]); the pending budget is split among its
//! sockets.

mod batch;
mod drops;
mod flow;
mod handover;
mod limits;
mod pending;
mod relay;
mod spin;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;

pub use flow::{DatagramCounters, Flow, FlowEnd};
pub use handover::{AdoptedFlow, Handover, HandoverAsk, PausedFlows};
pub use limits::FlowLimits;

use crate::cidr::Cidr;
use crate::metrics::Metrics;
use crate::routing::SharedRoutes;
use crate::session::Sessions;
use crate::shutdown::{Drain, Tracker};

/// Default `idle_timeout`: above the 120 s after which an AWS NLB forgets
/// an idle UDP flow. Were the relay to forget a flow first, the client's
/// next datagram (short header, no Initial) would be dropped while the NLB
/// still sends that flow here; the session would die. Any live QUIC
/// connection sends well within 120 s.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(180);
/// The NLB's fixed UDP flow idle timeout; `splicegate check` warns when a
/// UDP listener's `idle_timeout` is not above it.
pub const NLB_UDP_IDLE: Duration = Duration::from_secs(120);
/// Default `hello_timeout`: a QUIC ClientHello takes one or two datagrams.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `max_flows`: below the 28,232 ports of the default
/// `net.ipv4.ip_local_port_range` (each routed flow holds one).
pub const DEFAULT_MAX_FLOWS: usize = 16_384;
/// Default `max_flows_per_client`.
pub const DEFAULT_MAX_FLOWS_PER_CLIENT: usize = 256;
/// Default `max_pending`: hellos in progress at once, per listener.
pub const DEFAULT_MAX_PENDING: usize = 16_384;
/// Default `pending_bytes_max`: what pending flows may hold together, per
/// listener.
pub const DEFAULT_PENDING_BYTES_MAX: usize = 64 << 20;
/// Datagrams held for a flow while its ClientHello completes and its agent
/// is chosen.
pub const HELD_MAX: usize = 16;
/// Socket buffers asked for each listener socket (the kernel caps them at
/// `net.core.rmem_max` / `net.core.wmem_max`).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// A `[[udp_listener]]`.
#[derive(Debug, Clone)]
pub struct UdpListenerConfig {
    /// Name in logs and metrics.
    pub name: String,
    /// Addresses to bind.
    pub bind: Vec<SocketAddr>,
    /// Time from a flow's first datagram for its ClientHello to complete;
    /// also how long a routed flow whose client has not answered the
    /// agent is kept without traffic.
    pub hello_timeout: Duration,
    /// Largest ClientHello accepted.
    pub hello_max_bytes: usize,
    /// A flow ends when no datagram moved either way for this long.
    pub idle_timeout: Duration,
    /// Routed flows held at once.
    pub max_flows: usize,
    /// Routed flows per client IP address.
    pub max_flows_per_client: usize,
    /// Source networks of load balancers (an NLB's subnets): many clients
    /// share their addresses, so `max_flows_per_client` does not apply.
    pub lb_networks: Vec<Cidr>,
    /// Flows whose hello is not complete, at once (split among the
    /// listener's sockets).
    pub max_pending: usize,
    /// Bytes pending flows hold together (split among the listener's
    /// sockets).
    pub pending_bytes_max: usize,
    /// Sockets (and threads) per bound address, with SO_REUSEPORT.
    pub workers: usize,
    /// UDP port on the agent (default: the route's port; DCV's
    /// `quic-port` is its `web-port`, 8443, unless configured otherwise).
    pub agent_port: Option<u16>,
    /// Low-latency mode: the listener's thread polls its sockets for this
    /// long after datagrams moved before it sleeps (None: off).
    pub spin: Option<Duration>,
    /// A `progress` access-log line this often for each routed flow
    /// (None: off).
    pub log_progress_interval: Option<Duration>,
}

/// The number of cores, the default of `udp_workers`.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl UdpListenerConfig {
    /// Defaults for a listener named `name` on `bind`.
    pub fn with_defaults(name: &str, bind: Vec<SocketAddr>) -> Self {
        UdpListenerConfig {
            name: name.to_owned(),
            bind,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            hello_max_bytes: 16 * 1024,
            idle_timeout: DEFAULT_IDLE,
            max_flows: DEFAULT_MAX_FLOWS,
            max_flows_per_client: DEFAULT_MAX_FLOWS_PER_CLIENT,
            lb_networks: Vec::new(),
            max_pending: DEFAULT_MAX_PENDING,
            pending_bytes_max: DEFAULT_PENDING_BYTES_MAX,
            workers: default_workers(),
            agent_port: None,
            spin: None,
            log_progress_interval: Some(crate::context::DEFAULT_PROGRESS),
        }
    }

    /// Sockets the listener runs: each bound address times `workers`.
    pub fn sockets(&self) -> usize {
        self.bind.len().max(1) * self.workers.max(1)
    }
}

/// What `splicegate check` warns about a UDP listener: an `idle_timeout`
/// the NLB outlasts, more flows allowed than the machine has ephemeral
/// ports for (each routed flow holds one toward its agent).
pub fn warnings(u: &UdpListenerConfig) -> Vec<String> {
    let mut out = Vec::new();
    if u.idle_timeout <= NLB_UDP_IDLE {
        out.push(format!(
            "idle_timeout {:?} is not above the NLB's fixed UDP flow timeout of 120 s: a flow this relay forgets while the NLB still sends it here dies (not_quic); use more than \"120s\" (default \"180s\")",
            u.idle_timeout
        ));
    }
    if let Some(ports) = ephemeral_ports() {
        if u.max_flows > ports {
            out.push(format!(
                "max_flows {} is above the {ports} ephemeral ports of net.ipv4.ip_local_port_range: each routed flow holds one, so flows beyond them are refused (no_local_port)",
                u.max_flows
            ));
        }
    }
    out
}

/// How many ports `net.ipv4.ip_local_port_range` holds.
fn ephemeral_ports() -> Option<usize> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = range.split_whitespace().map(|v| v.parse::<usize>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    Some(hi.saturating_sub(lo) + 1)
}

/// What one UDP listener socket shares with the rest of the proxy.
pub struct UdpCtx {
    /// Its listener's settings.
    pub config: UdpListenerConfig,
    /// The live routing table.
    pub routes: Arc<SharedRoutes>,
    /// Drain state.
    pub drain: Drain,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Live flows count as connections for the drain.
    pub tracker: Tracker,
    /// The open sessions of the process (routed flows are sessions).
    pub sessions: Arc<Sessions>,
    /// The listener's routed-flow limits, shared by its sockets.
    pub limits: Arc<FlowLimits>,
    /// Which of the listener's sockets this is (for the pending gauges).
    pub socket: usize,
}

/// Serve `sock` on a thread of its own, with a single-threaded runtime:
/// the listener's datagrams, its flows' agent sockets and their timers all
/// wake that one thread, so relaying a datagram never hands work to another
/// core (the way an nginx worker serves its sockets). The thread ends with
/// [`serve`].
pub fn spawn(
    sock: std::net::UdpSocket,
    ctx: Arc<UdpCtx>,
    stop: watch::Receiver<bool>,
    handover: Handover,
) -> io::Result<std::thread::JoinHandle<()>> {
    let mut rt = tokio::runtime::Builder::new_current_thread();
    rt.enable_all();
    let spin = ctx.config.spin;
    if spin.is_some() {
        rt.on_thread_park(spin::park);
    }
    let rt = rt.build()?;
    let name = format!("udp-{}-{}", ctx.config.name, ctx.socket);
    let watched = match spin {
        Some(w) => Some((sock.try_clone()?, w)),
        None => None,
    };
    std::thread::Builder::new().name(name).spawn(move || {
        if let Some((sock, window)) = watched {
            spin::enable(sock, window);
        }
        rt.block_on(async move {
            match UdpSocket::from_std(sock) {
                Ok(sock) => serve(sock, ctx, stop, handover).await,
                Err(e) => {
                    tracing::error!(event = "udp_listener_failed", listener = %ctx.config.name, error = %e, "cannot register the UDP socket");
                }
            }
        });
        spin::disable();
    })
}

/// Serve one bound UDP socket until the drain: after `stop`, no new flow
/// starts and established ones run until they end or the drain deadline.
/// In a live upgrade the old process's relay hands its flows over when
/// asked and ends; the new process's starts with them.
pub async fn serve(
    sock: UdpSocket,
    ctx: Arc<UdpCtx>,
    stop: watch::Receiver<bool>,
    handover: Handover,
) {
    relay::Relay::new(sock, ctx).run(stop, handover).await;
}
