//! From a routing decision to a connected agent: one way for passthrough,
//! terminate and QUIC alike.
//!
//! [`choose`] takes the target a route named and
//! 1. resolves a session through the Session Resolver (the answer already
//!    checked against the allowlist), within the caller's deadline;
//! 2. for a pool, orders its agents by policy, health, limits and drain
//!    ([`crate::upstream::pool::Pool::order`]), takes the agent's [`Slot`] (so `max_conns`,
//!    `least_conn`, health and drain count every transport's sessions) and
//!    tries up to `attempts` agents, failures counting toward passive
//!    health;
//! 3. refuses an agent an operator drained;
//! 4. looks up a host name and, when the name came from the resolver,
//!    dials only addresses inside `allow` (DNS is not trusted to keep a
//!    resolver's answer inside the allowlist);
//! 5. opens the transport's socket with a [`Dial`]: a TCP connection for
//!    passthrough and terminate, a UDP socket connected to the agent for a
//!    QUIC flow.
//!
//! What comes back ([`Chosen`]) is what the access log, the metrics and
//! the open-session list need about the agent.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::cidr::Cidr;
use crate::maintenance::Drained;
use crate::net::Keepalive;
use crate::outcome::Kind;
use crate::resolver::{ResolveError, Transport};
use crate::route::Target;
use crate::routing::Routing;
use crate::upstream::pool::{PoolError, Slot};
use crate::upstream::{self, ConnectError};

/// How a transport opens its socket toward one address of an agent.
pub trait Dial: Sync {
    /// The socket.
    type Conn: Send;
    /// Time allowed per agent: the lookup of its name and every address
    /// tried.
    fn timeout(&self) -> Duration;
    /// Open a socket to `addr`.
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = Result<Self::Conn, ConnectError>> + Send;
}

/// TCP to the agent (passthrough and terminate).
#[derive(Debug, Clone, Copy)]
pub struct Tcp {
    /// The listener's `connect_timeout`.
    pub timeout: Duration,
    /// TCP keepalive on the agent's socket.
    pub keepalive: Option<Keepalive>,
}

impl Dial for Tcp {
    type Conn = TcpStream;

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn dial(&self, addr: SocketAddr) -> impl Future<Output = Result<TcpStream, ConnectError>> {
        upstream::connect_addr(addr, self.keepalive)
    }
}

/// What to choose an agent for.
pub struct Ask<'a> {
    /// The routing in force (taken once by the connection).
    pub routing: &'a Routing,
    /// Agents an operator drained.
    pub drained: &'a Drained,
    /// What the route named.
    pub target: Target,
    /// The real client (PROXY header source, or the datagram's).
    pub client: IpAddr,
    /// Which of the session's transports (for the resolver).
    pub transport: Transport,
    /// A session lookup must answer by then.
    pub deadline: Instant,
}

/// An agent connected for one session.
#[derive(Debug)]
pub struct Chosen<C> {
    /// The transport's socket to the agent.
    pub conn: C,
    /// The agent for logs: a pool agent's name, else the target.
    pub agent: String,
    /// What was dialled (TLS to the agent verifies its certificate for
    /// it).
    pub target: Target,
    /// The address dialled.
    pub addr: SocketAddr,
    /// Which attempt succeeded (1 unless earlier agents of a pool failed).
    pub attempt: usize,
    /// The pool's slot, held for the session's life.
    pub slot: Option<Slot>,
    /// The pool the agent was chosen from.
    pub pool: Option<String>,
    /// The path a resolver said the agent serves DCV under.
    pub web_url_path: Option<String>,
}

impl<C> Chosen<C> {
    /// The socket, and the rest without it.
    pub fn split(self) -> (C, Chosen<()>) {
        let Chosen {
            conn,
            agent,
            target,
            addr,
            attempt,
            slot,
            pool,
            web_url_path,
        } = self;
        let rest = Chosen {
            conn: (),
            agent,
            target,
            addr,
            attempt,
            slot,
            pool,
            web_url_path,
        };
        (conn, rest)
    }
}

/// Why no agent was connected.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    /// The route names a session the resolver did not place.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
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

impl ChoiceError {
    /// The outcome this failure closes the session with.
    pub fn kind(&self) -> Kind {
        match self {
            ChoiceError::Resolve(e) => e.kind(),
            ChoiceError::NoPool(_) => Kind::NoRoute,
            ChoiceError::Connect(e) => e.kind(),
            ChoiceError::Pool(e) => e.kind(),
            ChoiceError::Draining(_) => Kind::AgentDraining,
        }
    }

    /// The last attempt timed out (terminate mode answers 504).
    pub fn timed_out(&self) -> bool {
        matches!(
            self,
            ChoiceError::Connect(ConnectError::Timeout { .. })
                | ChoiceError::Pool(PoolError::AllFailed {
                    last: ConnectError::Timeout { .. },
                    ..
                })
        )
    }
}

/// Choose and connect the agent for `ask`, with `dial`'s transport. The
/// client sees nothing until an agent is connected.
pub async fn choose<D: Dial>(ask: Ask<'_>, dial: &D) -> Result<Chosen<D::Conn>, ChoiceError> {
    let (target, web_url_path, answered) = match ask.target {
        Target::Session(id) => {
            let left = ask.deadline.saturating_duration_since(Instant::now());
            let asked = ask
                .routing
                .resolve_session(&id, ask.transport, Some(ask.client));
            let answer = tokio::time::timeout(left, asked)
                .await
                .unwrap_or_else(|_| {
                    Err(ResolveError::Unavailable(format!(
                        "no answer within the session's deadline ({left:?} left)"
                    )))
                })?;
            (answer.target, Some(answer.web_url_path), true)
        }
        t => (t, None, false),
    };
    // A resolver's host name is dialled only at addresses inside `allow`.
    let allow = match (&ask.routing.resolver, answered) {
        (Some(r), true) => Some(r.config().allow.as_slice()),
        _ => None,
    };
    match target {
        Target::Pool(name) => {
            let pool = ask
                .routing
                .pools
                .get(&name)
                .ok_or_else(|| ChoiceError::NoPool(name.clone()))?;
            let order = pool.order(ask.client, Instant::now(), ask.drained)?;
            let mut last = None;
            let mut attempt = 0;
            for i in order.into_iter().take(pool.config.attempts.max(1)) {
                let Some(slot) = pool.take(i) else {
                    continue;
                };
                attempt += 1;
                let agent = slot.agent();
                match connect(&agent.config.target, dial, None).await {
                    Ok((conn, addr)) => {
                        return Ok(Chosen {
                            conn,
                            agent: agent.name.clone(),
                            target: agent.config.target.clone(),
                            addr,
                            attempt,
                            pool: Some(name),
                            slot: Some(slot),
                            web_url_path,
                        })
                    }
                    Err(ChoiceError::Connect(e)) => {
                        tracing::debug!(agent = %agent.name, attempt, error = %e, "agent connect failed; trying the next");
                        if !matches!(e, ConnectError::Local { .. }) {
                            pool.failed(i);
                        }
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(match last {
                Some(last) => ChoiceError::Pool(PoolError::AllFailed {
                    pool: name,
                    attempts: attempt,
                    last,
                }),
                None => ChoiceError::Pool(pool.none_available(ask.drained)),
            })
        }
        Target::Session(id) => Err(ChoiceError::Resolve(ResolveError::BadAnswer(format!(
            "the answer names session {id}, not an agent"
        )))),
        t if ask.drained.contains(&t.to_string()) => Err(ChoiceError::Draining(t.to_string())),
        t => {
            let (conn, addr) = connect(&t, dial, allow).await?;
            Ok(Chosen {
                conn,
                agent: t.to_string(),
                target: t,
                addr,
                attempt: 1,
                slot: None,
                pool: None,
                web_url_path,
            })
        }
    }
}

/// Connect to one agent within `dial`'s timeout: its name looked up (the
/// addresses kept to `allow` when given), each address tried in order.
async fn connect<D: Dial>(
    target: &Target,
    dial: &D,
    allow: Option<&[Cidr]>,
) -> Result<(D::Conn, SocketAddr), ChoiceError> {
    let timeout = dial.timeout();
    let attempt = async {
        let addrs: Vec<SocketAddr> = match target {
            Target::Addr(a) => vec![*a],
            Target::Host { name, port } => {
                let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), *port))
                    .await
                    .map_err(|source| ConnectError::Resolve {
                        target: target.to_string(),
                        source,
                    })?
                    .collect();
                match allow {
                    None => found,
                    Some(allow) => inside(target, found, allow)?,
                }
            }
            Target::Pool(_) | Target::Session(_) => {
                return Err(ChoiceError::Connect(ConnectError::Resolve {
                    target: target.to_string(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "not an agent"),
                }))
            }
        };
        let mut last = ConnectError::Resolve {
            target: target.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        };
        for addr in addrs {
            match dial.dial(addr).await {
                Ok(c) => return Ok((c, addr)),
                Err(e) => last = e,
            }
        }
        Err(ChoiceError::Connect(last))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ChoiceError::Connect(ConnectError::Timeout {
                target: target.to_string(),
                after: timeout,
            }))
        })
}

/// The addresses of a resolver's host name that fall inside `allow`; a
/// bad answer when none does.
fn inside(
    target: &Target,
    found: Vec<SocketAddr>,
    allow: &[Cidr],
) -> Result<Vec<SocketAddr>, ChoiceError> {
    let (kept, outside): (Vec<SocketAddr>, Vec<SocketAddr>) = found
        .into_iter()
        .partition(|a| allow.iter().any(|c| c.contains(a.ip())));
    if kept.is_empty() {
        let shown: Vec<String> = outside.iter().map(|a| a.ip().to_string()).collect();
        return Err(ChoiceError::Resolve(ResolveError::BadAnswer(format!(
            "endpoint {target} resolves to {}, outside the allowed networks; not dialled",
            if shown.is_empty() {
                "no address".to_owned()
            } else {
                shown.join(", ")
            }
        ))));
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_name_answer_outside_allow_is_refused() {
        let t = Target::Host {
            name: "localhost".into(),
            port: 8443,
        };
        let allow: Vec<Cidr> = vec!["127.0.0.2/32".parse().unwrap()];
        let found = vec!["127.0.0.1:8443".parse().unwrap()];
        let e = inside(&t, found, &allow).unwrap_err();
        assert_eq!(e.kind(), Kind::ResolverBadAnswer);
        assert!(e.to_string().contains("127.0.0.1"), "{e}");
        let found = vec![
            "127.0.0.1:8443".parse().unwrap(),
            "127.0.0.2:8443".parse().unwrap(),
        ];
        let kept = inside(&t, found, &allow).unwrap();
        assert_eq!(kept, vec!["127.0.0.2:8443".parse::<SocketAddr>().unwrap()]);
    }
}
