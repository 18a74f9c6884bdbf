//! Routing: from a normalised SNI to an agent ([`path`]: from an HTTP
//! request path, for terminate listeners). Pure: no I/O, no clocks.
//!
//! Order of precedence, first match wins:
//! 1. the command-line catch-all override (`--agent HOST:PORT`);
//! 2. an exact name (`agent1.dcv.example`);
//! 3. an agent-in-name suffix (`10-150-248-180.agents.example` →
//!    `10.150.248.180:PORT`), only inside its `allow` networks, or a
//!    session-in-name suffix (`SESSIONID.sessions.example` → the session,
//!    resolved by [`crate::resolver`]);
//! 4. a wildcard `*.suffix`, which matches exactly one more label;
//! 5. the default route.
//!
//! A name that matches an agent-in-name suffix but encodes a disallowed or
//! invalid address is refused; it never falls through to later rules.

pub mod path;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use crate::cidr::Cidr;
use crate::outcome::Kind;

/// Where an agent lives: an IP socket address, or a DNS name resolved at
/// connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A literal address.
    Addr(SocketAddr),
    /// A host name and port, resolved per connection.
    Host {
        /// DNS name.
        name: String,
        /// TCP port.
        port: u16,
    },
    /// A named pool of agents; the agent is chosen at connect time.
    Pool(String),
    /// A DCV session, resolved to its agent by the session resolver.
    Session(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Host { name, port } => write!(f, "{name}:{port}"),
            Target::Pool(p) => write!(f, "pool:{p}"),
            Target::Session(s) => write!(f, "session:{s}"),
        }
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Target::Addr(addr));
        }
        let err = || format!("`{s}` is not HOST:PORT (IPv6 addresses go in brackets: [::1]:8443)");
        let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
        let port: u16 = port.parse().map_err(|_| err())?;
        if port == 0 {
            return Err(format!("`{s}`: port 0 is not a valid agent port"));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Target::Addr(SocketAddr::new(ip, port)));
        }
        if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            // `999.1.1.1` or `10.1.1` would otherwise be looked up in DNS.
            return Err(format!("`{s}`: `{host}` is not a valid IPv4 address"));
        }
        let name = crate::sniff::normalise_sni(host.as_bytes()).ok_or_else(err)?;
        Ok(Target::Host { name, port })
    }
}

/// An SNI pattern: an exact name or `*.suffix` (exactly one more label).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SniPattern {
    /// Matches this name only.
    Exact(String),
    /// `*.suffix`: matches `label.suffix` for one label, not `a.b.suffix`
    /// and not `suffix` itself.
    Wildcard(String),
}

impl fmt::Display for SniPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniPattern::Exact(n) => f.write_str(n),
            SniPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

impl FromStr for SniPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("`{s}` is not an SNI pattern (a DNS name, or `*.` followed by a DNS name)");
        if let Some(suffix) = s.strip_prefix("*.") {
            let n = crate::sniff::normalise_sni(suffix.as_bytes()).ok_or_else(bad)?;
            return Ok(SniPattern::Wildcard(n));
        }
        if s.contains('*') {
            return Err(format!(
                "`{s}`: `*` is allowed only as the whole first label, as in `*.dcv.example`"
            ));
        }
        crate::sniff::normalise_sni(s.as_bytes())
            .map(SniPattern::Exact)
            .ok_or_else(bad)
    }
}

/// A suffix whose first label encodes the agent's IPv4 address with dashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInName {
    /// Domain under which names encode agents (`agents.dcv.example`).
    pub suffix: String,
    /// Port dialled on the decoded address.
    pub port: u16,
    /// Networks the decoded address must fall in. Empty refuses everything.
    pub allow: Vec<Cidr>,
}

/// What to do with a ClientHello that carries no SNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoSni {
    /// Use the default route (refused if there is none).
    #[default]
    Default,
    /// Refuse the connection.
    Reject,
}

/// Which rule chose the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteKind {
    /// The command-line catch-all `--agent HOST:PORT`.
    Override,
    /// An exact SNI name.
    Exact(String),
    /// An agent-in-name suffix.
    AgentInName(String),
    /// A session-in-name suffix.
    SessionInName(String),
    /// A `*.suffix` wildcard.
    Wildcard(String),
    /// The default route.
    Default,
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteKind::Override => f.write_str("override"),
            RouteKind::Exact(n) => write!(f, "exact:{n}"),
            RouteKind::AgentInName(s) => write!(f, "agent-in-name:{s}"),
            RouteKind::SessionInName(s) => write!(f, "session-in-name:{s}"),
            RouteKind::Wildcard(s) => write!(f, "wildcard:*.{s}"),
            RouteKind::Default => f.write_str("default"),
        }
    }
}

/// A routing decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The rule that matched.
    pub route: RouteKind,
    /// The agent to dial.
    pub target: Target,
}

impl Decision {
    /// The agent comes from the client's own name (agent-in-name,
    /// session-in-name): metrics label it `dynamic`.
    pub fn client_named(&self) -> bool {
        matches!(
            self.route,
            RouteKind::AgentInName(_) | RouteKind::SessionInName(_)
        )
    }
}

/// Why no agent was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No SNI, and the policy or the lack of a default route refuses it.
    #[error("no SNI in ClientHello and {0}")]
    NoSni(&'static str),
    /// No rule matches the name and there is no default route.
    #[error("no route for SNI {0:?}")]
    NoRoute(String),
    /// The agent-in-name label is not a dashed IPv4 address.
    #[error("SNI {sni:?} is under agent-in-name suffix {suffix:?} but its first label is not a dashed IPv4 address")]
    BadAgentLabel {
        /// The SNI.
        sni: String,
        /// The matching suffix.
        suffix: String,
    },
    /// The route is restricted to VPC endpoints and this connection came
    /// from another one (or carried no endpoint id).
    #[error("route {route} does not allow VPC endpoint {}", vpce.as_deref().unwrap_or("(none: no PROXY header with an AWS endpoint id)"))]
    VpceNotAllowed {
        /// The matching route.
        route: String,
        /// The connection's endpoint id.
        vpce: Option<String>,
    },
    /// The address encoded in the name is outside the allow list.
    #[error("SNI {sni:?} names agent {addr}, which is outside the allowed networks of {suffix:?}")]
    NotAllowed {
        /// The SNI.
        sni: String,
        /// The decoded address.
        addr: IpAddr,
        /// The matching suffix.
        suffix: String,
    },
}

impl RouteError {
    /// The outcome this refusal closes the connection with.
    pub fn kind(&self) -> Kind {
        match self {
            RouteError::NoSni(_) => Kind::NoSni,
            RouteError::NoRoute(_) => Kind::NoRoute,
            RouteError::BadAgentLabel { .. } | RouteError::NotAllowed { .. } => {
                Kind::AgentNotAllowed
            }
            RouteError::VpceNotAllowed { .. } => Kind::VpceNotAllowed,
        }
    }
}

/// The routing table shared by all listeners.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    override_all: Option<Target>,
    exact: HashMap<String, Target>,
    wildcard: HashMap<String, Target>,
    agent_in_name: Vec<AgentInName>,
    session_in_name: Vec<String>,
    default: Option<Target>,
    no_sni: NoSni,
    /// VPC endpoint ids allowed per exact name or wildcard suffix.
    vpce: HashMap<SniPattern, Vec<String>>,
}

impl RouteTable {
    /// An empty table: every connection is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace the route for a pattern.
    pub fn insert(&mut self, pattern: SniPattern, target: Target) {
        match pattern {
            SniPattern::Exact(n) => self.exact.insert(n, target),
            SniPattern::Wildcard(s) => self.wildcard.insert(s, target),
        };
    }

    /// Add or replace a route usable only from the given VPC endpoints
    /// (empty: from anywhere).
    pub fn insert_restricted(
        &mut self,
        pattern: SniPattern,
        target: Target,
        allowed_vpce: Vec<String>,
    ) {
        if allowed_vpce.is_empty() {
            self.vpce.remove(&pattern);
        } else {
            self.vpce.insert(pattern.clone(), allowed_vpce);
        }
        self.insert(pattern, target);
    }

    /// Add an agent-in-name suffix.
    pub fn add_agent_in_name(&mut self, rule: AgentInName) {
        self.agent_in_name.push(rule);
    }

    /// Add a session-in-name suffix: the first label under it is a DCV
    /// session id.
    pub fn add_session_in_name(&mut self, suffix: String) {
        self.session_in_name.push(suffix);
    }

    /// Whether any route names sessions (they need a resolver).
    pub fn has_sessions(&self) -> bool {
        !self.session_in_name.is_empty()
    }

    /// Whether `suffix` is already an agent-in-name or session-in-name
    /// suffix.
    pub fn has_suffix(&self, suffix: &str) -> bool {
        self.agent_in_name.iter().any(|r| r.suffix == suffix)
            || self.session_in_name.iter().any(|s| s == suffix)
    }

    /// Set the default route.
    pub fn set_default(&mut self, target: Option<Target>) {
        self.default = target;
    }

    /// Set what happens without SNI.
    pub fn set_no_sni(&mut self, policy: NoSni) {
        self.no_sni = policy;
    }

    /// Send every connection to one agent (testing override).
    pub fn set_override(&mut self, target: Option<Target>) {
        self.override_all = target;
    }

    /// The exact and wildcard SNI patterns, sorted.
    pub fn patterns(&self) -> Vec<SniPattern> {
        let mut out: Vec<SniPattern> = self
            .exact
            .keys()
            .map(|n| SniPattern::Exact(n.clone()))
            .chain(
                self.wildcard
                    .keys()
                    .map(|s| SniPattern::Wildcard(s.clone())),
            )
            .collect();
        out.sort_by_key(|p| p.to_string());
        out
    }

    /// Every agent or pool a rule names, with the rule as the access log
    /// names routes (`exact:NAME`, `wildcard:*.SUFFIX`, `default`,
    /// `override`). Agent-in-name and session rules name no agent.
    pub fn targets(&self) -> Vec<(String, Target)> {
        let mut out: Vec<(String, Target)> = Vec::new();
        if let Some(t) = &self.override_all {
            out.push((RouteKind::Override.to_string(), t.clone()));
        }
        for (n, t) in &self.exact {
            out.push((RouteKind::Exact(n.clone()).to_string(), t.clone()));
        }
        for (s, t) in &self.wildcard {
            out.push((RouteKind::Wildcard(s.clone()).to_string(), t.clone()));
        }
        if let Some(t) = &self.default {
            out.push((RouteKind::Default.to_string(), t.clone()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// All configured rules, in precedence order, for `check` output.
    pub fn describe(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(t) = &self.override_all {
            out.push(("override (every connection)".to_owned(), t.to_string()));
        }
        let mut exact: Vec<_> = self.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        out.extend(
            exact
                .into_iter()
                .map(|(n, t)| (format!("exact {n}"), t.to_string())),
        );
        for r in &self.agent_in_name {
            let allow: Vec<String> = r.allow.iter().map(|c| c.to_string()).collect();
            out.push((
                format!("agent-in-name *.{}", r.suffix),
                format!("<label>:{} allow [{}]", r.port, allow.join(", ")),
            ));
        }
        for s in &self.session_in_name {
            out.push((
                format!("session-in-name *.{s}"),
                "<label> is a session id, asked of the resolver".to_owned(),
            ));
        }
        let mut wild: Vec<_> = self.wildcard.iter().collect();
        wild.sort_by(|a, b| a.0.cmp(b.0));
        out.extend(
            wild.into_iter()
                .map(|(s, t)| (format!("wildcard *.{s}"), t.to_string())),
        );
        match &self.default {
            Some(t) => out.push(("default".to_owned(), t.to_string())),
            None => out.push((
                "default".to_owned(),
                "none (unmatched names are refused)".to_owned(),
            )),
        }
        let no_sni = match (self.no_sni, &self.default) {
            (NoSni::Default, Some(_)) => "default route",
            _ => "refused",
        };
        out.push(("no SNI".to_owned(), no_sni.to_owned()));
        out
    }

    /// Choose the agent for a normalised SNI, then check the route's VPC
    /// endpoint restriction against the connection's endpoint id.
    pub fn resolve_from(
        &self,
        sni: Option<&str>,
        vpce: Option<&str>,
    ) -> Result<Decision, RouteError> {
        let d = self.resolve(sni)?;
        let pattern = match &d.route {
            RouteKind::Exact(n) => SniPattern::Exact(n.clone()),
            RouteKind::Wildcard(s) => SniPattern::Wildcard(s.clone()),
            _ => return Ok(d),
        };
        match self.vpce.get(&pattern) {
            Some(allowed) if !vpce.is_some_and(|v| allowed.iter().any(|a| a == v)) => {
                Err(RouteError::VpceNotAllowed {
                    route: d.route.to_string(),
                    vpce: vpce.map(str::to_owned),
                })
            }
            _ => Ok(d),
        }
    }

    /// Choose the agent for a normalised SNI (see [`crate::sniff::normalise_sni`]).
    pub fn resolve(&self, sni: Option<&str>) -> Result<Decision, RouteError> {
        if let Some(t) = &self.override_all {
            return Ok(Decision {
                route: RouteKind::Override,
                target: t.clone(),
            });
        }
        let Some(sni) = sni else {
            return match (self.no_sni, &self.default) {
                (NoSni::Reject, _) => Err(RouteError::NoSni("no_sni = \"reject\"")),
                (NoSni::Default, None) => Err(RouteError::NoSni("there is no default route")),
                (NoSni::Default, Some(t)) => Ok(Decision {
                    route: RouteKind::Default,
                    target: t.clone(),
                }),
            };
        };
        if let Some(t) = self.exact.get(sni) {
            return Ok(Decision {
                route: RouteKind::Exact(sni.to_owned()),
                target: t.clone(),
            });
        }
        if let Some((label, parent)) = sni.split_once('.') {
            for rule in &self.agent_in_name {
                if parent == rule.suffix {
                    return agent_in_name(rule, sni, label);
                }
            }
            if let Some(s) = self.session_in_name.iter().find(|s| *s == parent) {
                return Ok(Decision {
                    route: RouteKind::SessionInName(s.clone()),
                    target: Target::Session(label.to_owned()),
                });
            }
            if let Some(t) = self.wildcard.get(parent) {
                return Ok(Decision {
                    route: RouteKind::Wildcard(parent.to_owned()),
                    target: t.clone(),
                });
            }
        }
        match &self.default {
            Some(t) => Ok(Decision {
                route: RouteKind::Default,
                target: t.clone(),
            }),
            None => Err(RouteError::NoRoute(sni.to_owned())),
        }
    }
}

fn agent_in_name(rule: &AgentInName, sni: &str, label: &str) -> Result<Decision, RouteError> {
    let ip = parse_dashed_ipv4(label).ok_or_else(|| RouteError::BadAgentLabel {
        sni: sni.to_owned(),
        suffix: rule.suffix.clone(),
    })?;
    let ip = IpAddr::V4(ip);
    if !rule.allow.iter().any(|c| c.contains(ip)) {
        return Err(RouteError::NotAllowed {
            sni: sni.to_owned(),
            addr: ip,
            suffix: rule.suffix.clone(),
        });
    }
    Ok(Decision {
        route: RouteKind::AgentInName(rule.suffix.clone()),
        target: Target::Addr(SocketAddr::new(ip, rule.port)),
    })
}

/// A DCV session id splicegate sends to a resolver: 1–128 characters of
/// `A-Za-z0-9`, `-`, `_` and `.`, so it needs no escaping in the query and
/// cannot smuggle anything into it.
pub fn valid_session_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `10-150-248-180` → 10.150.248.180. Octets are 0–255 without leading
/// zeros, so every address has exactly one spelling.
pub fn parse_dashed_ipv4(label: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = label.split('-');
    for o in &mut octets {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if p.len() > 1 && p.starts_with('0') {
            return None;
        }
        *o = p.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests;
