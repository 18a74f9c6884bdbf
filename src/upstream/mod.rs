//! Upstream: the agents' side. [`pool`] orders a pool's agents (balancing,
//! limits, passive health), [`health`] checks them, [`tls`] speaks TLS to
//! them, and [`connect_addr`] opens a TCP connection to one address.
//! Which agent a connection gets is decided one step above, by
//! [`crate::choice::choose`], for every transport.

pub mod health;
pub mod pool;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::net::Keepalive;
use crate::outcome::Kind;
use crate::route::Target;

/// Why no connection to the agent was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// DNS resolution failed.
    #[error("cannot resolve agent {target}: {source}")]
    Resolve {
        /// The agent.
        target: String,
        /// Resolver error.
        source: io::Error,
    },
    /// The agent actively refused (RST).
    #[error("agent {addr} refused the connection")]
    Refused {
        /// Address dialled.
        addr: SocketAddr,
    },
    /// Nothing answered in time.
    #[error("connecting to agent {target} timed out after {after:?}")]
    Timeout {
        /// The agent.
        target: String,
        /// The connect timeout.
        after: Duration,
    },
    /// Another connect error (unreachable network, ...).
    #[error("connecting to agent {addr} failed: {source}")]
    Io {
        /// Address dialled.
        addr: SocketAddr,
        /// OS error.
        source: io::Error,
    },
    /// No local socket toward the agent: the ephemeral ports are used up
    /// or the process is at its descriptor limit. Not the agent's fault:
    /// it does not count against the agent's passive health.
    #[error("no local socket toward agent {addr}: {source}")]
    Local {
        /// Address to be dialled.
        addr: SocketAddr,
        /// OS error.
        source: io::Error,
    },
}

/// Whether `e`, from opening a socket toward `addr`, is this side's
/// shortage (no ephemeral port, no descriptor) rather than the agent's.
pub fn local_shortage(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(
            Errno::EADDRNOTAVAIL
                | Errno::EADDRINUSE
                | Errno::EMFILE
                | Errno::ENFILE
                | Errno::ENOBUFS
        )
    )
}

impl ConnectError {
    /// The outcome this failure closes the connection with.
    pub fn kind(&self) -> Kind {
        match self {
            ConnectError::Resolve { .. } => Kind::AgentResolve,
            ConnectError::Refused { .. } => Kind::AgentRefused,
            ConnectError::Timeout { .. } => Kind::AgentTimeout,
            ConnectError::Io { .. } => Kind::AgentUnreachable,
            ConnectError::Local { .. } => Kind::NoLocalPort,
        }
    }
}

/// Connect to `target` within `timeout` (resolution included) and tune the
/// socket. A name resolving to several addresses is tried in order.
pub async fn connect(
    target: &Target,
    timeout: Duration,
    keepalive: Option<Keepalive>,
) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = match target {
            Target::Addr(a) => vec![*a],
            Target::Pool(_) | Target::Session(_) => {
                return Err(ConnectError::Resolve {
                    target: target.to_string(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not an agent: pools and sessions are resolved before dialling",
                    ),
                })
            }
            Target::Host { name, port } => tokio::net::lookup_host((name.as_str(), *port))
                .await
                .map_err(|source| ConnectError::Resolve {
                    target: target.to_string(),
                    source,
                })?
                .collect(),
        };
        let mut last = ConnectError::Resolve {
            target: target.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        };
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    last = ConnectError::Refused { addr }
                }
                Err(source) => last = ConnectError::Io { addr, source },
            }
        }
        Err(last)
    };
    let stream =
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| ConnectError::Timeout {
                target: target.to_string(),
                after: timeout,
            })??;
    // A failure to set options is not worth refusing the connection over.
    if let Err(e) = crate::net::tune(&stream, keepalive) {
        tracing::debug!(error = %e, "cannot set agent socket options");
    }
    Ok(stream)
}

/// Open a TCP connection to one of an agent's addresses and tune the
/// socket (unbounded in time: [`crate::choice::choose`] bounds it).
pub async fn connect_addr(
    addr: SocketAddr,
    keepalive: Option<Keepalive>,
) -> Result<TcpStream, ConnectError> {
    let stream = TcpStream::connect(addr).await.map_err(|source| {
        if source.kind() == io::ErrorKind::ConnectionRefused {
            ConnectError::Refused { addr }
        } else if local_shortage(&source) {
            ConnectError::Local { addr, source }
        } else {
            ConnectError::Io { addr, source }
        }
    })?;
    if let Err(e) = crate::net::tune(&stream, keepalive) {
        tracing::debug!(error = %e, "cannot set agent socket options");
    }
    Ok(stream)
}
