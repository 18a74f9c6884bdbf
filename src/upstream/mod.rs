//! Upstream: connect to the chosen agent, directly or through a pool
//! ([`pool`]: balancing, limits, passive health; [`health`]: active checks).

pub mod health;
pub mod pool;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::Keepalive;
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
}

impl ConnectError {
    /// Stable short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Resolve { .. } => "agent_resolve",
            ConnectError::Refused { .. } => "agent_refused",
            ConnectError::Timeout { .. } => "agent_timeout",
            ConnectError::Io { .. } => "agent_unreachable",
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
            Target::Pool(p) => {
                return Err(ConnectError::Resolve {
                    target: target.to_string(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{p} is a pool, not an agent"),
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
