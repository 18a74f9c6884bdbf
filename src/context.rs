//! What one accepted connection carries through the steps of its way:
//! the settings and shared handles of the listener that accepted it
//! ([`ListenerCtx`]), the access-log record it fills in as it goes
//! ([`Record`]), and how it ends ([`Kind`], [`Refusal`]). Passthrough
//! ([`crate::conn`]) and terminate ([`crate::terminate`]) connections both
//! use these, so the access log and `/metrics` say the same things in both
//! modes.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::cidr::Cidr;
use crate::forward::{Counters, Engine};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::net::{Keepalive, DEFAULT_KEEPALIVE};
pub use crate::outcome::{Kind, Refusal};
use crate::proxy_protocol::Mode as ProxyMode;
use crate::routing::SharedRoutes;
use crate::session::{self, Open, Sessions, Transport};
use crate::shutdown::Drain;
use crate::upstream::tls::UpstreamTls;

/// Default `log_progress_interval`.
pub const DEFAULT_PROGRESS: Duration = Duration::from_secs(300);

/// What every connection accepted on one listener shares.
pub struct ListenerCtx {
    /// The listener's settings.
    pub config: ListenerConfig,
    /// The routing table (replaced on reload).
    pub routes: Arc<SharedRoutes>,
    /// Draining, and the drain deadline.
    pub drain: Drain,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Connection limits.
    pub limits: Arc<Limits>,
    /// The open sessions of the process.
    pub sessions: Arc<Sessions>,
}

/// Settings of one listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Name used in logs.
    pub name: String,
    /// Addresses to bind.
    pub bind: Vec<SocketAddr>,
    /// listen(2) backlog.
    pub backlog: u32,
    /// Set SO_REUSEPORT (several processes on one port).
    pub reuse_port: bool,
    /// Forwarding engine.
    pub engine: Engine,
    /// Pipe size for the splice engine, in bytes.
    pub pipe_size: usize,
    /// Total time from accept for the ClientHello to arrive.
    pub hello_timeout: Duration,
    /// Largest ClientHello handshake message accepted, in bytes.
    pub hello_max_bytes: usize,
    /// Time allowed to connect to an agent.
    pub connect_timeout: Duration,
    /// Close a connection with no traffic either way for this long (None: never).
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive on both legs (None: off).
    pub keepalive: Option<Keepalive>,
    /// Low-latency mode: after bytes moved, check the sockets for this
    /// long instead of waiting to be woken (None: off).
    pub spin: Option<Duration>,
    /// A `progress` access-log line this often for each open session
    /// (None: off).
    pub log_progress_interval: Option<Duration>,
    /// PROXY protocol versions expected from trusted peers.
    pub proxy_protocol: ProxyMode,
    /// Peers whose PROXY headers are trusted (and required).
    pub proxy_trusted: Vec<Cidr>,
    /// VPC endpoint ids allowed on this listener (empty: any).
    pub allowed_vpce: Vec<String>,
    /// PROXY header sent to agents.
    pub send_proxy: SendProxy,
    /// Pass the received TLVs on to agents (v2 only).
    pub send_proxy_tlvs: bool,
    /// Terminate TLS and route on the HTTP request path (None: TLS
    /// passthrough, routed on SNI).
    pub terminate: Option<TerminateConfig>,
}

/// Settings of a terminate-mode listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminateConfig {
    /// Certificates presented, the first being the default.
    pub certs: Vec<CertFiles>,
    /// TLS toward agents.
    pub upstream_tls: UpstreamTls,
    /// Name the agents' certificates must cover (default: the address or
    /// host name dialled).
    pub upstream_server_name: Option<String>,
    /// Largest request head accepted, in bytes.
    pub head_max_bytes: usize,
    /// Time from the end of the TLS handshake for the head to arrive.
    pub head_timeout: Duration,
    /// Idle timeout of a plain (non-WebSocket) request's exchange.
    pub request_idle_timeout: Option<Duration>,
    /// Add X-Real-IP, X-Forwarded-For and X-Forwarded-Proto.
    pub forwarded_headers: bool,
}

impl TerminateConfig {
    /// Defaults around the given certificates and agent TLS.
    pub fn new(certs: Vec<CertFiles>, upstream_tls: UpstreamTls) -> Self {
        TerminateConfig {
            certs,
            upstream_tls,
            upstream_server_name: None,
            head_max_bytes: 16 * 1024,
            head_timeout: Duration::from_secs(10),
            request_idle_timeout: Some(Duration::from_secs(300)),
            forwarded_headers: false,
        }
    }
}

/// PROXY header sent to agents before the replayed ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    /// None.
    #[default]
    Off,
    /// Version 1 (text).
    V1,
    /// Version 2 (binary).
    V2,
}

impl ListenerConfig {
    /// A listener with default settings.
    pub fn with_defaults(name: &str, bind: Vec<SocketAddr>) -> Self {
        ListenerConfig {
            name: name.to_owned(),
            bind,
            backlog: 1024,
            reuse_port: false,
            engine: Engine::Splice,
            pipe_size: 256 * 1024,
            hello_timeout: Duration::from_secs(10),
            hello_max_bytes: 16 * 1024,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(3600)),
            keepalive: Some(DEFAULT_KEEPALIVE),
            spin: None,
            log_progress_interval: Some(DEFAULT_PROGRESS),
            proxy_protocol: ProxyMode::Off,
            proxy_trusted: Vec::new(),
            allowed_vpce: Vec::new(),
            send_proxy: SendProxy::Off,
            send_proxy_tlvs: false,
            terminate: None,
        }
    }
}

/// A certificate chain file and its key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, end-entity certificate first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl fmt::Display for CertFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (key {})", self.cert.display(), self.key.display())
    }
}

/// A connection that forwards: its byte counters and its entry among the
/// open sessions (removed when this is dropped).
pub struct Registered {
    /// Bytes moved each way.
    pub counters: Arc<Counters>,
    /// The open session.
    pub open: Open,
}

/// Who a connection is between, for the open-session list.
#[derive(Debug, Clone)]
pub struct Parties {
    /// The TCP peer (the load balancer over PrivateLink).
    pub peer: SocketAddr,
    /// The real client, from the PROXY header (else the peer).
    pub client: SocketAddr,
    /// The PrivateLink endpoint id from the PROXY header.
    pub vpce: Option<String>,
}

/// What [`register`] needs besides the record.
pub struct Registration<'a> {
    /// The connection id.
    pub id: u64,
    /// How long the agent took to connect.
    pub connect: Duration,
    /// How long ago the connection was accepted.
    pub age: Duration,
    /// Who it is between.
    pub parties: &'a Parties,
    /// The pool the agent was chosen from.
    pub pool: Option<String>,
    /// Passthrough or terminate.
    pub transport: Transport,
    /// A live upgrade may move it to a new process.
    pub movable: bool,
}

/// Register a connection that starts forwarding with `/metrics`, the open
/// sessions and the access record.
pub fn register(ctx: &ListenerCtx, rec: &mut Record, r: Registration<'_>) -> Registered {
    let counters = Arc::new(Counters::default());
    let key = (
        ctx.config.name.clone(),
        rec.route.clone().unwrap_or_default(),
        rec.metrics_agent().to_owned(),
    );
    ctx.metrics
        .forwarding(r.id, key, r.connect, Arc::clone(&counters));
    rec.bytes = Some(session::Bytes::Stream(Arc::clone(&counters)));
    let info = session::Info {
        id: r.id,
        transport: r.transport,
        listener: ctx.config.name.clone(),
        peer: r.parties.peer,
        client: r.parties.client,
        vpce: r.parties.vpce.clone(),
        sni: rec.sni.clone(),
        alpn: rec.alpn.clone(),
        route: rec.route.clone().unwrap_or_else(|| "-".to_owned()),
        agent: rec.agent.clone().unwrap_or_else(|| "-".to_owned()),
        pool: r.pool,
        dynamic: rec.dynamic,
        started: std::time::SystemTime::now()
            .checked_sub(r.age)
            .unwrap_or(std::time::UNIX_EPOCH),
    };
    let open = ctx.sessions.open(session::New {
        info,
        bytes: session::Bytes::Stream(Arc::clone(&counters)),
        movable: r.movable,
        span: tracing::Span::current(),
        progress: ctx.config.log_progress_interval,
    });
    Registered { counters, open }
}

pub use crate::access::{routed, Record, Waited, ACCESS_LOG};
