//! Configuration: the TOML file (`file.rs`), its validation into the
//! runtime [`Config`] (`validate.rs`), command-line overrides (`cli.rs`)
//! and the summary `splicegate check` prints (`summary.rs`). Sits beside the data
//! path, never inside it: it builds the settings types that live beside the
//! code that uses them (listener settings in [`crate::context`], pools in
//! [`crate::upstream::pool`], routes in [`crate::route`]), and nothing on
//! the data path imports it.
//!
//! Values are parsed while deserialising (addresses, durations, networks,
//! patterns), so a bad value is reported with the file, line and key it came
//! from. Unknown keys are errors.

mod cli;
mod file;
mod listeners;
mod spans;
mod summary;
#[cfg(test)]
mod tests;
mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use cli::{AgentArg, AgentPattern, CliTls};
pub use file::{parse_duration, MAX_DURATION};
pub use summary::format_duration;

use crate::cidr::Cidr;
use crate::context::ListenerConfig;
use crate::limits::Caps;
use crate::resolver::ResolverConfig;
use crate::route::path::PathTable;
use crate::route::RouteTable;
use crate::udp::UdpListenerConfig;
use crate::upstream::pool::PoolConfig;

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

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners.
    pub listeners: Vec<ListenerConfig>,
    /// UDP listeners: the QUIC relay.
    pub udp_listeners: Vec<UdpListenerConfig>,
    /// Routes shared by all listeners.
    pub routes: RouteTable,
    /// After SIGTERM, how long established connections may continue.
    pub drain_timeout: Duration,
    /// After SIGTERM, how long listeners keep accepting while health
    /// answers 503, so the load balancer notices first.
    pub drain_grace: Duration,
    /// The admin listener, if any.
    pub admin: Option<AdminConfig>,
    /// The control socket.
    pub control: ControlSocket,
    /// Agent pools routes can refer to.
    pub pools: Vec<PoolConfig>,
    /// Connection limits.
    pub limits: Caps,
    /// Path routes for terminate listeners.
    pub paths: PathTable,
    /// Pools that must have a healthy agent for `/health` to answer 200.
    pub required_pools: Vec<String>,
    /// The session resolver, for routes that name DCV sessions.
    pub resolver: Option<ResolverConfig>,
    /// `/health` answers 503 while the resolver does not answer.
    pub require_resolver: bool,
}

/// Where the control socket listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlSocket {
    /// The default path, `/run/splicegate/control.sock`: if it cannot be
    /// bound (no such directory, no permission, another process serves
    /// it) the process runs without one and logs why.
    Default,
    /// A configured path: a socket that cannot be bound stops the start.
    At(std::path::PathBuf),
    /// None (`path = ""`).
    Off,
}

impl ControlSocket {
    /// The path to bind, if any.
    pub fn path(&self) -> Option<std::path::PathBuf> {
        match self {
            ControlSocket::Default => Some(crate::control::DEFAULT_PATH.into()),
            ControlSocket::At(p) => Some(p.clone()),
            ControlSocket::Off => None,
        }
    }
}

/// The admin listener (health and metrics).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Peers whose PROXY headers are accepted (optional from them, refused
    /// from anyone else). Default: every listener's `proxy_trusted`.
    pub proxy_trusted: Vec<Cidr>,
    /// Admin connections from untrusted peers served at once (trusted
    /// peers have as many again of their own); more are closed at once.
    pub max_connections: usize,
    /// Admin connections one untrusted address may have at once.
    pub max_per_peer: usize,
    /// Time from accept for an admin request's whole head.
    pub request_timeout: Duration,
}

/// Default cap on concurrent admin connections.
pub const DEFAULT_ADMIN_CONNECTIONS: usize = 64;

/// Default cap on one untrusted address's admin connections.
pub const DEFAULT_ADMIN_PER_PEER: usize = 8;

/// Default time for an admin request head: an NLB sends its health check
/// at once, so a client that takes longer is not one.
pub const DEFAULT_ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Default drain grace with an admin listener: long enough for an NLB
/// health check at a 10 s interval to fail twice.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Most connections any limit can name: beyond what one process can hold.
pub const MAX_CONNECTIONS: usize = 1 << 24;

/// Largest pool agent weight (HAProxy's maximum too).
pub const MAX_WEIGHT: u32 = 256;

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: Vec::new(),
            udp_listeners: Vec::new(),
            routes: RouteTable::new(),
            drain_timeout: Duration::from_secs(300),
            drain_grace: Duration::ZERO,
            admin: None,
            control: ControlSocket::Default,
            pools: Vec::new(),
            limits: Caps::default(),
            paths: PathTable::new(),
            required_pools: Vec::new(),
            resolver: None,
            require_resolver: false,
        }
    }
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
        validate::config(text, path)
    }
}
