//! Upstream: connect to the chosen agent, directly or through a pool
//! ([`pool`]: balancing, limits, passive health; [`health`]: active checks),
//! by one dial path, [`dial`], for every kind of connection.

pub mod health;
pub mod pool;
pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::maintenance::Drained;
use crate::net::Keepalive;
use crate::outcome::Kind;
use crate::route::Target;
use pool::{Pool, PoolError, Slot};

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
    /// The outcome this failure closes the connection with.
    pub fn kind(&self) -> Kind {
        match self {
            ConnectError::Resolve { .. } => Kind::AgentResolve,
            ConnectError::Refused { .. } => Kind::AgentRefused,
            ConnectError::Timeout { .. } => Kind::AgentTimeout,
            ConnectError::Io { .. } => Kind::AgentUnreachable,
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

/// An agent connected for one client connection.
#[derive(Debug)]
pub struct Dialled {
    /// The agent's socket.
    pub stream: TcpStream,
    /// The agent for logs: a pool agent's name, else the target.
    pub agent: String,
    /// What was dialled; TLS to the agent verifies its certificate for it.
    pub target: Target,
    /// Which attempt succeeded (1 unless earlier agents of a pool failed).
    pub attempt: usize,
    /// The pool's slot, held for the connection's life.
    pub slot: Option<Slot>,
}

/// Why no agent was connected.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// A route names a pool the routing table does not have.
    #[error("route: pool {0} does not exist")]
    NoPool(String),
    /// The agent could not be reached.
    #[error("upstream: {0}")]
    Connect(#[from] ConnectError),
    /// No agent of the pool could be reached.
    #[error("upstream: {0}")]
    Pool(#[from] PoolError),
    /// The route's only agent is drained by an operator.
    #[error("upstream: agent {0} is drained (splicegate ctl drain-agent); the route has no other")]
    Draining(String),
}

impl DialError {
    /// The outcome this failure closes the connection with.
    pub fn kind(&self) -> Kind {
        match self {
            DialError::NoPool(_) => Kind::NoRoute,
            DialError::Connect(e) => e.kind(),
            DialError::Pool(e) => e.kind(),
            DialError::Draining(_) => Kind::AgentDraining,
        }
    }

    /// The last attempt timed out (terminate mode answers 504).
    pub fn timed_out(&self) -> bool {
        matches!(
            self,
            DialError::Connect(ConnectError::Timeout { .. })
                | DialError::Pool(PoolError::AllFailed {
                    last: ConnectError::Timeout { .. },
                    ..
                })
        )
    }
}

/// Connect to `target` for a client at `client`: the agent itself, or the
/// agent a pool chooses for the client, with the pool's retries; never a
/// `drained` agent. The client sees nothing until an agent accepts.
pub async fn dial(
    pools: &HashMap<String, Arc<Pool>>,
    target: &Target,
    client: IpAddr,
    (timeout, keepalive): (Duration, Option<Keepalive>),
    drained: &Drained,
) -> Result<Dialled, DialError> {
    match target {
        Target::Pool(name) => {
            let pool = pools
                .get(name)
                .ok_or_else(|| DialError::NoPool(name.clone()))?;
            let c = pool.connect(client, (timeout, keepalive), drained).await?;
            let agent = c.slot.agent();
            Ok(Dialled {
                agent: agent.name.clone(),
                target: agent.config.target.clone(),
                stream: c.stream,
                attempt: c.attempt,
                slot: Some(c.slot),
            })
        }
        t if drained.contains(&t.to_string()) => Err(DialError::Draining(t.to_string())),
        t => Ok(Dialled {
            stream: connect(t, timeout, keepalive).await?,
            agent: t.to_string(),
            target: t.clone(),
            attempt: 1,
            slot: None,
        }),
    }
}
