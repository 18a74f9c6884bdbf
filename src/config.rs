//! Configuration: the TOML file, command-line overrides, and validation into
//! the runtime [`Config`]. Sits beside the data path, never inside it.
//!
//! Values are parsed while deserialising (addresses, durations, networks,
//! patterns), so a bad value is reported with the file, line and key it came
//! from. Unknown keys are errors.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::cidr::Cidr;
use crate::forward::Engine;
use crate::proxy_protocol::Mode as ProxyMode;
use crate::route::path::{PathAgent, PathTable, PrefixRoute};
use crate::route::{AgentInName, NoSni, RouteTable, SniPattern, Target};
use crate::terminate::certs::CertFiles;
use crate::upstream::pool::{AgentConfig, CheckKind, HealthConfig, Passive, Policy, PoolConfig};
use crate::upstream::tls::UpstreamTls;

/// A configuration that could not be loaded. The message names the file,
/// the line and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// File path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// A syntax error, unknown key or bad value.
    #[error("{path}:{line}: {what}")]
    Invalid {
        /// File path (or `<embedded>`).
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong, naming the key.
        what: String,
    },
    /// A problem that is not tied to one line (e.g. no listener at all).
    #[error("{path}: {what}")]
    Whole {
        /// File path.
        path: String,
        /// What is wrong.
        what: String,
    },
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

/// The admin listener (health and metrics).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Peers whose PROXY headers are accepted (optional from them, refused
    /// from anyone else). Default: every listener's `proxy_trusted`.
    pub proxy_trusted: Vec<Cidr>,
    /// Admin connections served at once; more wait in the backlog.
    pub max_connections: usize,
}

/// Default cap on concurrent admin connections.
pub const DEFAULT_ADMIN_CONNECTIONS: usize = 64;

/// TCP keepalive parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub time: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub retries: u32,
}

/// Default keepalive: first probe after 60 s idle, well under the AWS NLB's
/// 350 s idle timeout, so idle flows stay in the NLB's table.
pub const DEFAULT_KEEPALIVE: Keepalive = Keepalive {
    time: Duration::from_secs(60),
    interval: Duration::from_secs(20),
    retries: 3,
};

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
            proxy_protocol: ProxyMode::Off,
            proxy_trusted: Vec::new(),
            allowed_vpce: Vec::new(),
            send_proxy: SendProxy::Off,
            send_proxy_tlvs: false,
            terminate: None,
        }
    }
}

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Routes shared by all listeners.
    pub routes: RouteTable,
    /// After SIGTERM, how long established connections may continue.
    pub drain_timeout: Duration,
    /// After SIGTERM, how long listeners keep accepting while health
    /// answers 503, so the load balancer notices first.
    pub drain_grace: Duration,
    /// The admin listener, if any.
    pub admin: Option<AdminConfig>,
    /// Agent pools routes can refer to.
    pub pools: Vec<PoolConfig>,
    /// Connection limits.
    pub limits: Limits,
    /// Path routes for terminate listeners.
    pub paths: PathTable,
    /// Pools that must have a healthy agent for `/health` to answer 200.
    pub required_pools: Vec<String>,
}

/// Connection limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once across all listeners (None: unlimited).
    /// Beyond it new connections wait in the kernel's backlog.
    pub max_connections: Option<usize>,
    /// Connections open at once per real client IP (None: unlimited).
    pub max_per_client: Option<usize>,
}

/// Default drain grace with an admin listener: long enough for an NLB
/// health check at a 10 s interval to fail twice.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: Vec::new(),
            routes: RouteTable::new(),
            drain_timeout: Duration::from_secs(300),
            drain_grace: Duration::ZERO,
            admin: None,
            pools: Vec::new(),
            limits: Limits::default(),
            paths: PathTable::new(),
            required_pools: Vec::new(),
        }
    }
}

/// A command-line `--agent` value: `HOST:PORT`, `PATTERN=HOST:PORT` or
/// `/PREFIX/=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentArg {
    /// What the agent is for.
    pub pattern: AgentPattern,
    /// Agent address.
    pub target: Target,
}

/// What an `--agent` flag routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentPattern {
    /// Every connection (every request on terminate listeners).
    All,
    /// An SNI pattern (passthrough listeners).
    Sni(SniPattern),
    /// A path prefix such as `/desk1/` (terminate listeners).
    Path(String),
}

impl FromStr for AgentArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((p, t)) if p.starts_with('/') => Ok(AgentArg {
                pattern: AgentPattern::Path(parse_prefix(p)?),
                target: t.parse()?,
            }),
            Some((p, t)) => Ok(AgentArg {
                pattern: AgentPattern::Sni(p.parse()?),
                target: t.parse()?,
            }),
            None => Ok(AgentArg {
                pattern: AgentPattern::All,
                target: s.parse()?,
            }),
        }
    }
}

/// A path prefix: starts with `/`; a trailing `/` is added when missing.
fn parse_prefix(p: &str) -> Result<String, String> {
    if !p.starts_with('/') || p.contains(['?', '#', ' ']) || p.contains("//") {
        return Err(format!(
            "`{p}` is not a path prefix (like \"/desk1/\", or \"/\" for the default)"
        ));
    }
    Ok(if p.ends_with('/') {
        p.to_owned()
    } else {
        format!("{p}/")
    })
}

/// TLS settings given on the command line (`run --tls-cert ...`).
#[derive(Debug, Clone, Default)]
pub struct CliTls {
    /// `--tls-cert`: certificate chains, one per `--tls-key`.
    pub certs: Vec<std::path::PathBuf>,
    /// `--tls-key`.
    pub keys: Vec<std::path::PathBuf>,
    /// `--upstream-tls`.
    pub upstream: Option<String>,
    /// `--upstream-ca`.
    pub upstream_ca: Option<std::path::PathBuf>,
}

impl Config {
    /// Load and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: name.clone(),
            source,
        })?;
        Config::parse(&text, &name)
    }

    /// Parse and validate TOML text; `path` is used in messages.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
            what: describe(text, e.span(), e.message()),
        })?;
        let at = |span: Range<usize>, what: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_of(text, span.start),
            what: describe(text, Some(span), &what),
        };
        let range = |(span, what): (Range<usize>, String)| at(span, what);

        let mut config = Config::default();
        let mut required: Vec<Spanned<String>> = Vec::new();
        let mut admin_trusted = None;
        if let Some(a) = file.admin {
            config.admin = Some(AdminConfig {
                bind: a.bind.0,
                proxy_trusted: Vec::new(),
                max_connections: DEFAULT_ADMIN_CONNECTIONS,
            });
            if let Some(n) = a.max_connections {
                let v = *n.get_ref();
                if !(1..=65536).contains(&v) {
                    return Err(at(
                        n.span(),
                        format!("key `max_connections`: {v} is outside 1..=65536"),
                    ));
                }
                if let Some(c) = config.admin.as_mut() {
                    c.max_connections = v;
                }
            }
            admin_trusted = a
                .proxy_trusted
                .map(|v| v.into_iter().map(|c| c.0).collect::<Vec<Cidr>>());
            config.drain_grace = DEFAULT_DRAIN_GRACE;
            required = a.require_pools;
        }
        if let Some(s) = file.shutdown {
            set(&mut config.drain_timeout, s.drain_timeout.map(|d| d.0));
            set(&mut config.drain_grace, s.drain_grace.map(|d| d.0));
        }
        for (i, l) in file.listener.into_iter().enumerate() {
            let name = l.name.unwrap_or_else(|| format!("listener{}", i + 1));
            if config.listeners.iter().any(|o| o.name == name) {
                return Err(ConfigError::Whole {
                    path: path.to_owned(),
                    what: format!("two listeners are named {name:?}"),
                });
            }
            let bind = l.bind.get_ref().0.clone();
            if bind.is_empty() {
                return Err(at(
                    l.bind.span(),
                    "key `bind`: at least one address is needed".into(),
                ));
            }
            let mut lc = ListenerConfig::with_defaults(&name, bind);
            if let Some(b) = &l.backlog {
                lc.backlog = within(b, "backlog", 1, 65535).map_err(range)?;
            }
            set(&mut lc.reuse_port, l.reuse_port);
            set(&mut lc.engine, l.engine);
            if let Some(p) = l.pipe_size {
                let v = *p.get_ref();
                if !(4096..=1 << 20).contains(&v) {
                    return Err(at(
                        p.span(),
                        format!("key `pipe_size`: {v} is outside 4096..=1048576"),
                    ));
                }
                lc.pipe_size = v;
            }
            if let Some(h) = l.hello_max_bytes {
                let v = *h.get_ref();
                if !(512..=1 << 20).contains(&v) {
                    return Err(at(
                        h.span(),
                        format!("key `hello_max_bytes`: {v} is outside 512..=1048576"),
                    ));
                }
                lc.hello_max_bytes = v;
            }
            if let Some(d) = l.hello_timeout {
                if d.get_ref().0.is_zero() {
                    return Err(at(
                        d.span(),
                        "key `hello_timeout`: must be more than 0".into(),
                    ));
                }
                lc.hello_timeout = d.get_ref().0;
            }
            if let Some(d) = l.connect_timeout {
                if d.get_ref().0.is_zero() {
                    return Err(at(
                        d.span(),
                        "key `connect_timeout`: must be more than 0".into(),
                    ));
                }
                lc.connect_timeout = d.get_ref().0;
            }
            if let Some(d) = l.idle_timeout {
                lc.idle_timeout = nonzero(d.0);
            }
            // Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at 32767 s and
            // TCP_KEEPCNT at 127; beyond, setsockopt fails at bind time.
            let keepalive_secs = |d: &Spanned<Dur>, key: &str| {
                let secs = d.get_ref().0.as_secs();
                if secs > 32767 {
                    return Err(at(
                        d.span(),
                        format!("key `{key}`: {secs} s is more than the kernel's 32767 s"),
                    ));
                }
                Ok(d.get_ref().0)
            };
            if let Some(k) = &l.keepalive_time {
                let time = keepalive_secs(k, "keepalive_time")?;
                lc.keepalive = nonzero(time).map(|time| Keepalive {
                    time: time.max(Duration::from_secs(1)),
                    ..DEFAULT_KEEPALIVE
                });
            }
            if let Some(ka) = lc.keepalive.as_mut() {
                if let Some(i) = &l.keepalive_interval {
                    ka.interval =
                        keepalive_secs(i, "keepalive_interval")?.max(Duration::from_secs(1));
                }
                if let Some(r) = &l.keepalive_retries {
                    ka.retries = within(r, "keepalive_retries", 1, 127).map_err(range)?;
                }
            }
            set(
                &mut lc.proxy_protocol,
                l.proxy_protocol.as_ref().map(|p| *p.get_ref()),
            );
            lc.proxy_trusted = l.proxy_trusted.into_iter().map(|c| c.0).collect();
            if let Some(p) = &l.proxy_protocol {
                if *p.get_ref() != ProxyMode::Off && lc.proxy_trusted.is_empty() {
                    return Err(at(
                        p.span(),
                        "key `proxy_protocol`: also set `proxy_trusted` to the load balancer's networks; headers are accepted only from them".into(),
                    ));
                }
            }
            lc.allowed_vpce = l.allowed_vpce;
            set(&mut lc.send_proxy, l.send_proxy);
            set(&mut lc.send_proxy_tlvs, l.send_proxy_tlvs);
            let terminate = l.mode.as_ref().is_some_and(|m| m.get_ref() == "terminate");
            if let Some(m) = &l.mode {
                if !["terminate", "passthrough"].contains(&m.get_ref().as_str()) {
                    return Err(at(
                        m.span(),
                        format!(
                            "key `mode`: `{}` is not \"passthrough\" or \"terminate\"",
                            m.get_ref()
                        ),
                    ));
                }
            }
            if terminate {
                let mode = l.mode.as_ref().map(|m| m.span()).unwrap_or(0..0);
                if l.cert.is_empty() {
                    return Err(at(
                        mode,
                        "key `mode`: a terminate listener needs at least one [[listener.cert]] with `cert` and `key`".into(),
                    ));
                }
                let certs = l
                    .cert
                    .into_iter()
                    .map(|c| {
                        let c = c.into_inner();
                        CertFiles {
                            cert: c.cert,
                            key: c.key,
                        }
                    })
                    .collect();
                let upstream = upstream_tls(
                    l.upstream_tls.as_ref().map(|u| u.get_ref().as_str()),
                    l.upstream_ca.map(Spanned::into_inner),
                )
                .map_err(|what| {
                    at(
                        l.upstream_tls.as_ref().map_or(mode.clone(), |u| u.span()),
                        what,
                    )
                })?;
                let mut tc = TerminateConfig::new(certs, upstream);
                tc.upstream_server_name = l.upstream_server_name.map(Spanned::into_inner);
                if let Some(h) = l.head_max_bytes {
                    let v = *h.get_ref();
                    if !(1024..=1 << 20).contains(&v) {
                        return Err(at(
                            h.span(),
                            format!("key `head_max_bytes`: {v} is outside 1024..=1048576"),
                        ));
                    }
                    tc.head_max_bytes = v;
                }
                if let Some(d) = l.head_timeout {
                    if d.get_ref().0.is_zero() {
                        return Err(at(
                            d.span(),
                            "key `head_timeout`: must be more than 0".into(),
                        ));
                    }
                    tc.head_timeout = d.get_ref().0;
                }
                if let Some(d) = l.request_idle_timeout {
                    tc.request_idle_timeout = nonzero(d.into_inner().0);
                }
                set(
                    &mut tc.forwarded_headers,
                    l.forwarded_headers.map(Spanned::into_inner),
                );
                lc.terminate = Some(tc);
            } else if let Some((key, span)) = [
                ("cert", l.cert.first().map(Spanned::span)),
                ("upstream_tls", l.upstream_tls.as_ref().map(Spanned::span)),
                ("upstream_ca", l.upstream_ca.as_ref().map(Spanned::span)),
                (
                    "upstream_server_name",
                    l.upstream_server_name.as_ref().map(Spanned::span),
                ),
                (
                    "head_max_bytes",
                    l.head_max_bytes.as_ref().map(Spanned::span),
                ),
                ("head_timeout", l.head_timeout.as_ref().map(Spanned::span)),
                (
                    "request_idle_timeout",
                    l.request_idle_timeout.as_ref().map(Spanned::span),
                ),
                (
                    "forwarded_headers",
                    l.forwarded_headers.as_ref().map(Spanned::span),
                ),
            ]
            .into_iter()
            .find_map(|(k, s)| s.map(|s| (k, s)))
            {
                return Err(at(
                    span,
                    format!("key `{key}`: only applies to listeners with mode = \"terminate\""),
                ));
            }
            config.listeners.push(lc);
        }
        if let Some(admin) = config.admin.as_mut() {
            admin.proxy_trusted = admin_trusted.unwrap_or_else(|| {
                let mut all: Vec<Cidr> = Vec::new();
                for l in &config.listeners {
                    if l.proxy_protocol != ProxyMode::Off {
                        for c in &l.proxy_trusted {
                            if !all.contains(c) {
                                all.push(*c);
                            }
                        }
                    }
                }
                all
            });
        }

        if let Some(l) = file.limits {
            let limit = |v: &Option<Spanned<usize>>, key: &str| {
                v.as_ref()
                    .map(|n| within(n, key, 0, MAX_CONNECTIONS).map_err(range))
                    .transpose()
                    .map(|n| n.filter(|&n| n > 0))
            };
            config.limits = Limits {
                max_connections: limit(&l.max_connections, "max_connections")?,
                max_per_client: limit(&l.max_per_client, "max_per_client")?,
            };
        }
        for p in file.pool {
            let name = p.name.get_ref().clone();
            if config.pools.iter().any(|o| o.name == name) {
                return Err(at(
                    p.name.span(),
                    format!("key `name`: two pools are named {name:?}"),
                ));
            }
            if p.agents.is_empty() {
                return Err(at(
                    p.name.span(),
                    format!("pool {name:?} has no agents: add [[pool.agents]] tables"),
                ));
            }
            for a in &p.agents {
                if let Some(w) = &a.weight {
                    within(w, "weight", 0, MAX_WEIGHT).map_err(range)?;
                }
                if let Some(m) = &a.max_conns {
                    within(m, "max_conns", 0, MAX_CONNECTIONS).map_err(range)?;
                }
            }
            if p.agents
                .iter()
                .all(|a| a.weight.as_ref().is_some_and(|w| *w.get_ref() == 0))
            {
                return Err(at(
                    p.name.span(),
                    format!("pool {name:?}: every agent has weight 0, so none can be chosen"),
                ));
            }
            let agents: Vec<AgentConfig> = p
                .agents
                .into_iter()
                .map(|a| AgentConfig {
                    target: a.addr.0,
                    weight: a.weight.map_or(1, Spanned::into_inner),
                    backup: a.backup.unwrap_or(false),
                    max_conns: a.max_conns.map(Spanned::into_inner).filter(|&n| n > 0),
                })
                .collect();
            let health = match p.health {
                None => None,
                Some(h) => {
                    let kind = match h.check.as_deref().unwrap_or("tcp") {
                        "tcp" => CheckKind::Tcp,
                        "tls" => CheckKind::Tls,
                        "https" => CheckKind::Https {
                            path: h.path.unwrap_or_else(|| "/".to_owned()),
                            status: match &h.status {
                                Some(st) => within(st, "status", 100, 599).map_err(range)?,
                                None => 200,
                            },
                        },
                        other => {
                            return Err(at(
                                p.name.span(),
                                format!(
                                "pool {name:?}: health check `{other}` is not tcp, tls or https"
                            ),
                            ))
                        }
                    };
                    Some(HealthConfig {
                        kind,
                        interval: h.interval.map_or(Duration::from_secs(5), |d| {
                            d.0.max(Duration::from_millis(10))
                        }),
                        timeout: h.timeout.map_or(Duration::from_secs(2), |d| {
                            d.0.max(Duration::from_millis(10))
                        }),
                        rise: h.rise.unwrap_or(2).max(1),
                        fall: h.fall.unwrap_or(3).max(1),
                        sni: h.sni,
                    })
                }
            };
            let n = agents.len();
            config.pools.push(PoolConfig {
                name,
                policy: p.policy.unwrap_or_default(),
                passive: Passive {
                    max_fails: p.max_fails.unwrap_or(3),
                    fail_window: p.fail_window.map_or(Duration::from_secs(30), |d| d.0),
                    fail_timeout: p.fail_timeout.map_or(Duration::from_secs(30), |d| d.0),
                },
                health,
                attempts: p.attempts.unwrap_or(n.min(3)).clamp(1, n),
                agents,
            });
        }
        for r in required {
            if !config.pools.iter().any(|p| &p.name == r.get_ref()) {
                return Err(at(
                    r.span(),
                    format!("key `require_pools`: no pool is named {:?}", r.get_ref()),
                ));
            }
            config.required_pools.push(r.into_inner());
        }
        let pool_target =
            |name: &Spanned<String>, config: &Config| -> Result<Target, ConfigError> {
                let n = name.get_ref();
                if config.pools.iter().any(|p| &p.name == n) {
                    Ok(Target::Pool(n.clone()))
                } else {
                    Err(at(name.span(), format!("no pool is named {n:?}")))
                }
            };

        let mut seen = Vec::new();
        for r in file.route {
            let pattern = r.sni.get_ref().0.clone();
            if seen.contains(&pattern) {
                return Err(at(
                    r.sni.span(),
                    format!("key `sni`: a route for {pattern} is already defined"),
                ));
            }
            seen.push(pattern.clone());
            let target = match (r.agent, &r.pool) {
                (Some(a), None) => a.0,
                (None, Some(p)) => pool_target(p, &config)?,
                _ => {
                    return Err(at(
                        r.sni.span(),
                        format!("route {pattern}: give exactly one of `agent` or `pool`"),
                    ))
                }
            };
            config
                .routes
                .insert_restricted(pattern, target, r.allowed_vpce);
        }
        for a in file.agent_in_name {
            config.routes.add_agent_in_name(AgentInName {
                suffix: a.suffix.0 .0,
                port: a.port.unwrap_or(8443),
                allow: a.allow.into_iter().map(|c| c.0).collect(),
            });
        }
        for r in file.path_route {
            let prefix = parse_prefix(r.prefix.get_ref())
                .map_err(|e| at(r.prefix.span(), format!("key `prefix`: {e}")))?;
            if config.paths.has_prefix(&prefix) {
                return Err(at(
                    r.prefix.span(),
                    format!("key `prefix`: a path route for {prefix} is already defined"),
                ));
            }
            let target = match (r.agent, &r.pool) {
                (Some(a), None) => a.0,
                (None, Some(p)) => pool_target(p, &config)?,
                _ => {
                    return Err(at(
                        r.prefix.span(),
                        format!("path route {prefix}: give exactly one of `agent` or `pool`"),
                    ))
                }
            };
            config.paths.insert(PrefixRoute {
                prefix,
                target,
                strip: r.strip_prefix.unwrap_or(true),
            });
        }
        if let Some(a) = file.path_agent {
            config.paths.agent_in_path = Some(PathAgent {
                allow: a.allow.into_iter().map(|c| c.0).collect(),
                ports: a
                    .ports
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| vec![8443]),
                strip: a.strip_prefix.unwrap_or(true),
            });
        }
        if let Some(r) = &file.routing {
            if let Some(h) = &r.health_path {
                let v = h.get_ref();
                config.paths.health = if v.is_empty() {
                    None
                } else if v.starts_with('/') && !v.contains('?') {
                    Some(v.clone())
                } else {
                    return Err(at(
                        h.span(),
                        format!("key `health_path`: `{v}` is not a path (like \"/health\"; \"\" turns it off)"),
                    ));
                };
            }
        }
        if let Some(r) = file.routing {
            let default = match (r.default, &r.default_pool) {
                (Some(_), Some(p)) => {
                    return Err(at(
                        p.span(),
                        "give `default` or `default_pool`, not both".into(),
                    ));
                }
                (Some(a), None) => Some(a.0),
                (None, Some(p)) => Some(pool_target(p, &config)?),
                (None, None) => None,
            };
            config.routes.set_default(default);
            config.routes.set_no_sni(r.no_sni.unwrap_or_default());
        }
        Ok(config)
    }

    /// Apply command-line overrides: `--listen` replaces the file's
    /// listeners with one listener named `cli` that keeps the first file
    /// listener's settings; `--agent` routes win over
    /// the file's; `--engine` applies to every listener; `--tls-cert` and
    /// `--tls-key` make every listener a terminate listener.
    pub fn apply_cli(
        &mut self,
        listen: &[SocketAddr],
        agents: &[AgentArg],
        engine: Option<Engine>,
        tls: &CliTls,
    ) -> Result<(), String> {
        if !listen.is_empty() {
            // Keep the first file listener's settings (PROXY protocol,
            // timeouts, ...) so a production file can be tried on a test
            // address.
            let mut l = self
                .listeners
                .first()
                .cloned()
                .unwrap_or_else(|| ListenerConfig::with_defaults("cli", Vec::new()));
            l.name = "cli".to_owned();
            l.bind = listen.to_vec();
            self.listeners = vec![l];
        }
        for a in agents {
            match &a.pattern {
                AgentPattern::Sni(p) => self.routes.insert(p.clone(), a.target.clone()),
                AgentPattern::Path(p) => self.paths.insert(PrefixRoute {
                    prefix: p.clone(),
                    target: a.target.clone(),
                    strip: true,
                }),
                AgentPattern::All => {
                    self.routes.set_override(Some(a.target.clone()));
                    self.paths.override_all = Some(a.target.clone());
                }
            }
        }
        if let Some(e) = engine {
            for l in &mut self.listeners {
                l.engine = e;
            }
        }
        if tls.certs.len() != tls.keys.len() {
            return Err(format!(
                "give one --tls-key per --tls-cert ({} certificates, {} keys)",
                tls.certs.len(),
                tls.keys.len()
            ));
        }
        let upstream_given = tls.upstream.is_some() || tls.upstream_ca.is_some();
        let upstream = if upstream_given || !tls.certs.is_empty() {
            Some(
                upstream_tls(tls.upstream.as_deref(), tls.upstream_ca.clone()).map_err(|e| {
                    e.replace("key `upstream_tls`", "--upstream-tls")
                        .replace("`upstream_ca`", "--upstream-ca")
                        .replace("key `upstream_ca`", "--upstream-ca")
                })?,
            )
        } else {
            None
        };
        let certs: Vec<CertFiles> = tls
            .certs
            .iter()
            .zip(&tls.keys)
            .map(|(c, k)| CertFiles {
                cert: c.clone(),
                key: k.clone(),
            })
            .collect();
        for l in &mut self.listeners {
            match (&mut l.terminate, certs.is_empty()) {
                (None, true) if upstream_given => {
                    return Err(format!("listener {}: --upstream-tls and --upstream-ca apply to terminate listeners; give --tls-cert and --tls-key", l.name));
                }
                (None, true) => {}
                (None, false) => {
                    let u = upstream.clone().unwrap_or(UpstreamTls::Off);
                    l.terminate = Some(TerminateConfig::new(certs.clone(), u));
                }
                (Some(t), _) => {
                    if !certs.is_empty() {
                        t.certs = certs.clone();
                    }
                    if upstream_given {
                        if let Some(u) = &upstream {
                            t.upstream_tls = u.clone();
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Human-readable summary for `splicegate check`.
    pub fn summary(&self) -> String {
        use fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "listeners:");
        for l in &self.listeners {
            let binds: Vec<String> = l.bind.iter().map(|b| b.to_string()).collect();
            let idle = l.idle_timeout.map_or("none".into(), format_duration);
            let _ = writeln!(
                s,
                "  {} on {} engine={} hello_timeout={} hello_max_bytes={} connect_timeout={} idle_timeout={}",
                l.name,
                binds.join(", "),
                l.engine,
                format_duration(l.hello_timeout),
                l.hello_max_bytes,
                format_duration(l.connect_timeout),
                idle
            );
            if l.proxy_protocol != ProxyMode::Off {
                let trusted: Vec<String> = l.proxy_trusted.iter().map(|c| c.to_string()).collect();
                let _ = writeln!(
                    s,
                    "    proxy_protocol={:?} from [{}]",
                    l.proxy_protocol,
                    trusted.join(", ")
                );
            }
            if !l.allowed_vpce.is_empty() {
                let _ = writeln!(s, "    allowed_vpce=[{}]", l.allowed_vpce.join(", "));
            }
            if l.send_proxy != SendProxy::Off {
                let _ = writeln!(
                    s,
                    "    send_proxy={:?} tlvs={}",
                    l.send_proxy, l.send_proxy_tlvs
                );
            }
            if let Some(t) = &l.terminate {
                let _ = writeln!(
                    s,
                    "    mode=terminate upstream_tls={} head_max_bytes={} head_timeout={} request_idle_timeout={} forwarded_headers={}",
                    t.upstream_tls,
                    t.head_max_bytes,
                    format_duration(t.head_timeout),
                    t.request_idle_timeout.map_or("none".into(), format_duration),
                    t.forwarded_headers
                );
                for (i, c) in t.certs.iter().enumerate() {
                    let default = if i == 0 { " (default)" } else { "" };
                    let _ = writeln!(s, "    cert {c}{default}");
                }
            }
        }
        let _ = writeln!(s, "routes (first match wins):");
        for (rule, target) in self.routes.describe() {
            let _ = writeln!(s, "  {rule:<40} -> {target}");
        }
        if self.listeners.iter().any(|l| l.terminate.is_some()) {
            let _ = writeln!(s, "path routes for terminate listeners (first match wins):");
            for (rule, target) in self.paths.describe() {
                let _ = writeln!(s, "  {rule:<40} -> {target}");
            }
        }
        if !self.pools.is_empty() {
            let _ = writeln!(s, "pools:");
        }
        for p in &self.pools {
            let health = p.health.as_ref().map_or("none".to_owned(), |h| {
                format!(
                    "{:?} every {} rise {} fall {}",
                    h.kind,
                    format_duration(h.interval),
                    h.rise,
                    h.fall
                )
            });
            let _ = writeln!(
                s,
                "  {} policy={} attempts={} max_fails={} fail_timeout={} health={}",
                p.name,
                p.policy,
                p.attempts,
                p.passive.max_fails,
                format_duration(p.passive.fail_timeout),
                health
            );
            for a in &p.agents {
                let max = a
                    .max_conns
                    .map_or(String::new(), |m| format!(" max_conns={m}"));
                let backup = if a.backup { " backup" } else { "" };
                let _ = writeln!(s, "    {} weight={}{backup}{max}", a.target, a.weight);
            }
        }
        if let Some(n) = self.limits.max_connections {
            let _ = writeln!(s, "max_connections: {n}");
        }
        if let Some(n) = self.limits.max_per_client {
            let _ = writeln!(s, "max_per_client: {n}");
        }
        if let Some(a) = &self.admin {
            let _ = writeln!(s, "admin: http://{}/health and /metrics", a.bind);
            if !a.proxy_trusted.is_empty() {
                let trusted: Vec<String> = a.proxy_trusted.iter().map(|c| c.to_string()).collect();
                let _ = writeln!(s, "    optional PROXY header from [{}]", trusted.join(", "));
            }
        }
        if !self.required_pools.is_empty() {
            let _ = writeln!(
                s,
                "health: 503 unless each of [{}] has a healthy agent",
                self.required_pools.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "drain: grace {}, timeout {}",
            format_duration(self.drain_grace),
            format_duration(self.drain_timeout)
        );
        s
    }
}

/// `upstream_tls` and `upstream_ca` as one setting. Verification is the
/// default and needs a CA file; turning it off must be explicit.
fn upstream_tls(kind: Option<&str>, ca: Option<std::path::PathBuf>) -> Result<UpstreamTls, String> {
    match (kind.unwrap_or("verify"), ca) {
        ("verify", Some(ca)) => Ok(UpstreamTls::Verify(ca)),
        ("verify", None) => Err("key `upstream_tls`: verifying agents (the default) needs `upstream_ca`, a PEM file with the CA or the self-signed certificate of the agents (DCV generates a self-signed one per agent); or set upstream_tls = \"insecure\" to skip verification, or \"off\" for plain TCP".into()),
        ("insecure", None) => Ok(UpstreamTls::Insecure),
        ("off", None) => Ok(UpstreamTls::Off),
        ("insecure" | "off", Some(_)) => Err("key `upstream_ca`: only used with upstream_tls = \"verify\"".into()),
        (other, _) => Err(format!("key `upstream_tls`: `{other}` is not \"verify\", \"insecure\" or \"off\"")),
    }
}

/// `v` if inside `lo..=hi`, else a message naming the key and the range.
fn within<T: PartialOrd + Copy + fmt::Display>(
    v: &Spanned<T>,
    key: &str,
    lo: T,
    hi: T,
) -> Result<T, (Range<usize>, String)> {
    let x = *v.get_ref();
    if x < lo || x > hi {
        return Err((v.span(), format!("key `{key}`: {x} is outside {lo}..={hi}")));
    }
    Ok(x)
}

/// Most connections any limit can name: beyond what one process can hold.
pub const MAX_CONNECTIONS: usize = 1 << 24;
/// Largest pool agent weight (HAProxy's maximum too).
pub const MAX_WEIGHT: u32 = 256;

fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |t| t.matches('\n').count() + 1)
}

/// The message, prefixed with the key written on the offending line when
/// the message does not name one already.
fn describe(text: &str, span: Option<Range<usize>>, message: &str) -> String {
    let message = message.trim();
    if message.contains('`') && message.starts_with("key") {
        return message.to_owned();
    }
    let key = span.and_then(|s| {
        let start = text.get(..s.start)?.rfind('\n').map_or(0, |i| i + 1);
        let line = text.get(start..)?.lines().next()?;
        let (k, _) = line.split_once('=')?;
        let k = k.trim();
        (!k.is_empty() && !k.starts_with('[')).then(|| k.to_owned())
    });
    match key {
        Some(k) if !message.contains(&format!("`{k}`")) => format!("key `{k}`: {message}"),
        _ => message.to_owned(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listener: Vec<ListenerSection>,
    #[serde(default)]
    route: Vec<RouteSection>,
    #[serde(default)]
    agent_in_name: Vec<AgentInNameSection>,
    routing: Option<RoutingSection>,
    shutdown: Option<ShutdownSection>,
    admin: Option<AdminSection>,
    #[serde(default)]
    pool: Vec<PoolSection>,
    limits: Option<LimitsSection>,
    #[serde(default)]
    path_route: Vec<PathRouteSection>,
    path_agent: Option<PathAgentSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_connections: Option<Spanned<usize>>,
    max_per_client: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSection {
    name: Spanned<String>,
    policy: Option<Policy>,
    #[serde(default)]
    agents: Vec<PoolAgentSection>,
    attempts: Option<usize>,
    max_fails: Option<u32>,
    fail_window: Option<Dur>,
    fail_timeout: Option<Dur>,
    health: Option<HealthSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolAgentSection {
    addr: Parsed<Target>,
    weight: Option<Spanned<u32>>,
    backup: Option<bool>,
    max_conns: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthSection {
    check: Option<String>,
    interval: Option<Dur>,
    timeout: Option<Dur>,
    rise: Option<u32>,
    fall: Option<u32>,
    path: Option<String>,
    status: Option<Spanned<u16>>,
    sni: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    bind: OneAddr,
    #[serde(default)]
    require_pools: Vec<Spanned<String>>,
    proxy_trusted: Option<Vec<Parsed<Cidr>>>,
    max_connections: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerSection {
    name: Option<String>,
    bind: Spanned<OneOrMany>,
    backlog: Option<Spanned<u32>>,
    reuse_port: Option<bool>,
    engine: Option<Engine>,
    pipe_size: Option<Spanned<usize>>,
    hello_timeout: Option<Spanned<Dur>>,
    hello_max_bytes: Option<Spanned<usize>>,
    connect_timeout: Option<Spanned<Dur>>,
    idle_timeout: Option<Dur>,
    keepalive_time: Option<Spanned<Dur>>,
    keepalive_interval: Option<Spanned<Dur>>,
    keepalive_retries: Option<Spanned<u32>>,
    proxy_protocol: Option<Spanned<ProxyMode>>,
    #[serde(default)]
    proxy_trusted: Vec<Parsed<Cidr>>,
    #[serde(default)]
    allowed_vpce: Vec<String>,
    send_proxy: Option<SendProxy>,
    send_proxy_tlvs: Option<bool>,
    mode: Option<Spanned<String>>,
    #[serde(default)]
    cert: Vec<Spanned<CertSection>>,
    upstream_tls: Option<Spanned<String>>,
    upstream_ca: Option<Spanned<std::path::PathBuf>>,
    upstream_server_name: Option<Spanned<String>>,
    head_max_bytes: Option<Spanned<usize>>,
    head_timeout: Option<Spanned<Dur>>,
    request_idle_timeout: Option<Spanned<Dur>>,
    forwarded_headers: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertSection {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathRouteSection {
    prefix: Spanned<String>,
    agent: Option<Parsed<Target>>,
    pool: Option<Spanned<String>>,
    strip_prefix: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathAgentSection {
    allow: Vec<Parsed<Cidr>>,
    ports: Option<Vec<u16>>,
    strip_prefix: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSection {
    sni: Spanned<Parsed<SniPattern>>,
    agent: Option<Parsed<Target>>,
    pool: Option<Spanned<String>>,
    #[serde(default)]
    allowed_vpce: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentInNameSection {
    suffix: Parsed<Suffix>,
    port: Option<u16>,
    allow: Vec<Parsed<Cidr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingSection {
    default: Option<Parsed<Target>>,
    default_pool: Option<Spanned<String>>,
    no_sni: Option<NoSni>,
    health_path: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownSection {
    drain_timeout: Option<Dur>,
    drain_grace: Option<Dur>,
}

/// A value parsed with `FromStr` during deserialisation, so errors carry
/// the TOML position.
struct Parsed<T>(T);

impl<'de, T: FromStr<Err = String>> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Parsed).map_err(serde::de::Error::custom)
    }
}

/// A DNS suffix for agent-in-name routes.
struct Suffix(String);

impl FromStr for Suffix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::sniff::normalise_sni(s.as_bytes())
            .map(Suffix)
            .ok_or_else(|| format!("`{s}` is not a DNS suffix"))
    }
}

/// One address.
struct OneAddr(SocketAddr);

impl<'de> Deserialize<'de> for OneAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(OneAddr).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{s}` is not an IP:PORT address (e.g. \"0.0.0.0:8989\")"
            ))
        })
    }
}

/// One address or a list of addresses.
struct OneOrMany(Vec<SocketAddr>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let list = match Raw::deserialize(d)? {
            Raw::One(s) => vec![s],
            Raw::Many(v) => v,
        };
        list.iter()
            .map(|s| {
                s.parse::<SocketAddr>().map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{s}` is not an IP:PORT address (e.g. \"0.0.0.0:8443\" or \"[::]:8443\")"
                    ))
                })
            })
            .collect::<Result<_, _>>()
            .map(OneOrMany)
    }
}

/// A duration: `"10s"`, `"500ms"`, `"5m"`, `"2h"`, `"0"` or an integer of
/// seconds.
#[derive(Debug, Clone, Copy)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(Dur)
    }
}

/// Longest duration any key accepts: 30 days. Deadlines are computed as
/// `now + duration`, which must not overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86400);

/// Parse `"10s"`, `"500ms"`, `"5m"`, `"2h"`, `"1d"` or `"0"`, at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{s}` is not a duration (use e.g. \"500ms\", \"10s\", \"5m\", \"2h\")");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        "" if n == 0 => Duration::ZERO,
        _ => return Err(bad()),
    };
    check_duration(d).map_err(|e| format!("`{s}`: {e}"))
}

/// A duration as the config file spells it: `0s`, `500ms`, `10s`, `5m`,
/// `1h`, `1d` (the largest unit that divides it).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    match secs {
        0 => "0s".to_owned(),
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn check_duration(d: Duration) -> Result<Duration, String> {
    if d > MAX_DURATION {
        return Err("longer than the maximum of 30 days (\"30d\")".to_owned());
    }
    Ok(d)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => check_duration(Duration::from_secs(n))
                .map(Dur)
                .map_err(|e| serde::de::Error::custom(format!("{n} seconds is {e}"))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example_parses() {
        let text = include_str!("../examples/splicegate.toml");
        let c = Config::parse(text, "examples/splicegate.toml").unwrap();
        assert!(!c.listeners.is_empty());
        let d = c.routes.resolve(Some("agent1.dcv.example")).unwrap();
        assert_eq!(d.target.to_string(), "10.150.248.180:8443");
    }

    #[test]
    fn terminate_example_parses() {
        let text = include_str!("../examples/terminate.toml");
        let c = Config::parse(text, "examples/terminate.toml").unwrap();
        let t = c.listeners[0].terminate.as_ref().unwrap();
        assert_eq!(t.certs.len(), 2);
        assert!(t.forwarded_headers);
        match c.paths.resolve("/10.150.248.180/auth?x").unwrap() {
            crate::route::path::PathDecision::Forward { target, path, .. } => {
                assert_eq!(target.to_string(), "10.150.248.180:8443");
                assert_eq!(path, "/auth?x");
            }
            other => panic!("{other:?}"),
        }
        assert!(c.paths.resolve("/10.150.249.1/").is_err());
    }

    #[test]
    fn errors_name_line_and_key() {
        let text = "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\nsni = \"a.example\"\nagent = \"nope\"\n";
        let e = Config::parse(text, "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml:6: key `agent`:"), "{e}");
        assert!(e.contains("HOST:PORT"), "{e}");

        let text = "[[listener]]\nbind = \"127.0.0.1:0\"\nbogus = 1\n";
        let e = Config::parse(text, "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml:3:") && e.contains("bogus"), "{e}");

        let text = "[[listener]]\nbind = \"127.0.0.1:0\"\nidle_timeout = \"5 parsecs\"\n";
        let e = Config::parse(text, "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml:3: key `idle_timeout`:"), "{e}");

        let text = "[[route]]\nsni = \"a.example\"\nagent = \"127.0.0.1:1\"\n[[route]]\nsni = \"A.example.\"\nagent = \"127.0.0.1:2\"\n";
        let e = Config::parse(text, "x.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("x.toml:5: key `sni`:") && e.contains("already"),
            "{e}"
        );

        let text = "[[agent_in_name]]\nsuffix = \"agents.example\"\nallow = [\"10.0.0.1/8\"]\n";
        let e = Config::parse(text, "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml:3: key `allow`:"), "{e}");
    }

    #[test]
    fn durations() {
        for text in ["0s", "500ms", "10s", "90s", "5m", "1h", "2d", "1500ms"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn cli_overrides() {
        let mut c = Config::default();
        let a: AgentArg = "*.x.example=127.0.0.1:9".parse().unwrap();
        let p: AgentArg = "/desk1=127.0.0.1:10".parse().unwrap();
        assert_eq!(p.pattern, AgentPattern::Path("/desk1/".into()));
        c.apply_cli(
            &["127.0.0.1:0".parse().unwrap()],
            &[a, p],
            Some(Engine::Copy),
            &CliTls::default(),
        )
        .unwrap();
        assert!(c.paths.has_prefix("/desk1/"));
        assert_eq!(c.listeners[0].name, "cli");
        assert_eq!(c.listeners[0].engine, Engine::Copy);
        assert!(c.routes.resolve(Some("d.x.example")).is_ok());
    }
}
