//! Path routing for terminate-mode listeners: from the request target of
//! the first HTTP request line to an agent. Pure: no I/O, no clocks.
//!
//! Order of precedence, first match wins:
//! 1. the health path (default `/health`), answered by splicegate itself;
//! 2. a DCV session named in the request ([`SessionSource`]: a query
//!    parameter, a path prefix `/session/ID/…` or a header), resolved by
//!    [`crate::resolver`]; a request without one goes on to the next rules;
//! 3. an agent in the path, `/{ipv4}[:port]/rest` (the scheme of the
//!    nginx configurations DCV users ran), honoured only for addresses
//!    inside the configured `allow` networks and ports. A first path
//!    segment that looks like an IPv4 address never falls through to later
//!    rules: it is routed, refused (403) or rejected as malformed (400);
//! 4. the longest configured prefix (`/desk1/`); the prefix `/` is the
//!    default route.
//!
//! A path equal to a prefix without its trailing slash (`/desk1`,
//! `/10.150.248.180`) is redirected to the slashed form, as nginx does, so
//! the DCV web client's relative URLs resolve under the prefix.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::cidr::Cidr;
use crate::outcome::Kind;
use crate::route::Target;

/// The route name of agents named in the path.
pub const AGENT_IN_PATH: &str = "agent-in-path";

/// The agent of a forwarded request comes from the client (named in its
/// path, or a session it names): metrics label it `dynamic`.
pub fn client_named(route: &str, target: &Target) -> bool {
    route == AGENT_IN_PATH || matches!(target, Target::Session(_))
}

/// Where a terminate listener finds a DCV session id in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionSource {
    /// A query parameter (`?sessionId=ID`, as the Gateway's clients send).
    /// The request target reaches the agent unchanged.
    Query(String),
    /// A path prefix, starting and ending with `/`: `/session/ID/rest`
    /// reaches the agent as `/rest`.
    Path(String),
    /// A request header (lower-case name). The request target reaches the
    /// agent unchanged.
    Header(String),
}

impl SessionSource {
    /// The route name for logs and metrics.
    pub fn route_name(&self) -> &'static str {
        match self {
            SessionSource::Query(_) => "session-in-query",
            SessionSource::Path(_) => "session-in-path",
            SessionSource::Header(_) => "session-in-header",
        }
    }
}

impl fmt::Display for SessionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionSource::Query(q) => write!(f, "query parameter {q}"),
            SessionSource::Path(p) => write!(f, "path {p}{{id}}/"),
            SessionSource::Header(h) => write!(f, "header {h}"),
        }
    }
}

/// A configured path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixRoute {
    /// The prefix, starting and ending with `/` (`/desk1/`, or `/`).
    pub prefix: String,
    /// Where it goes.
    pub target: Target,
    /// Remove the prefix before forwarding (`/desk1/x` reaches the agent as
    /// `/x`). Off for agents configured with DCV's `web-url-path`.
    pub strip: bool,
}

/// Agents named in the path: `/{ipv4}[:port]/rest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathAgent {
    /// Networks the address must fall in. Empty refuses everything.
    pub allow: Vec<Cidr>,
    /// Ports that may be named; the first is used when the path names none.
    pub ports: Vec<u16>,
    /// Remove `/{ipv4}[:port]` before forwarding.
    pub strip: bool,
}

/// The path routes shared by all terminate listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTable {
    /// Path answered locally with the proxy's health (None: not answered).
    pub health: Option<String>,
    /// Agents in the path (None: a path naming an address is refused).
    pub agent_in_path: Option<PathAgent>,
    /// Prefix routes, longest first.
    prefixes: Vec<PrefixRoute>,
    /// Catch-all from `--agent HOST:PORT`: every forwarded request goes
    /// there (the health path is still answered locally).
    pub override_all: Option<Target>,
    /// Where requests name a DCV session (None: they do not).
    pub session: Option<SessionSource>,
}

impl Default for PathTable {
    fn default() -> Self {
        PathTable {
            health: Some("/health".to_owned()),
            agent_in_path: None,
            prefixes: Vec::new(),
            override_all: None,
            session: None,
        }
    }
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathDecision {
    /// Answer with the proxy's health.
    Health,
    /// Answer with a redirect to this location (the slashed prefix).
    Redirect(String),
    /// Forward to `target` with the request target rewritten to `path`.
    Forward {
        /// The rule that matched, for logs and metrics.
        route: String,
        /// The agent or pool.
        target: Target,
        /// Request target to send to the agent (path and query).
        path: String,
    },
}

/// Why a request is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The first segment looks like an address but is not a valid one.
    #[error("path segment {0:?} is not a valid IPv4 address[:port]")]
    BadAddress(String),
    /// An address in the path, but agents in the path are not configured.
    #[error("path names agent {0}, but agents in the path are not enabled ([path_agent])")]
    NotEnabled(String),
    /// The address or port is outside the allow list.
    #[error(
        "path names agent {0}, which is outside the allowed networks and ports of [path_agent]"
    )]
    NotAllowed(SocketAddr),
    /// The request names a session, but not a valid session id.
    #[error("the {from} does not hold a valid session id (1-128 of A-Z a-z 0-9 - _ .)")]
    BadSession {
        /// Where the id was looked for.
        from: String,
    },
    /// No prefix matches and there is no `/` route.
    #[error("no route for path {0:?}")]
    NoRoute(String),
}

impl PathError {
    /// The outcome this refusal closes the connection with; its
    /// [`Kind::http_status`] is the status the client is answered with.
    pub fn kind(&self) -> Kind {
        match self {
            PathError::BadAddress(_) | PathError::BadSession { .. } => Kind::BadRequest,
            PathError::NotEnabled(_) | PathError::NotAllowed(_) => Kind::AgentNotAllowed,
            PathError::NoRoute(_) => Kind::NoRoute,
        }
    }
}

impl fmt::Display for PrefixRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "prefix:{}", self.prefix)
    }
}

impl PathTable {
    /// An empty table answering `/health`.
    pub fn new() -> Self {
        PathTable::default()
    }

    /// Add or replace a prefix route. `prefix` must start and end with `/`.
    pub fn insert(&mut self, route: PrefixRoute) {
        self.prefixes.retain(|p| p.prefix != route.prefix);
        self.prefixes.push(route);
        self.prefixes
            .sort_by_key(|p| std::cmp::Reverse(p.prefix.len()));
    }

    /// Whether a route for exactly this prefix exists.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.prefixes.iter().any(|p| p.prefix == prefix)
    }

    /// Whether any request can be forwarded at all.
    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
            && self.agent_in_path.is_none()
            && self.override_all.is_none()
            && self.session.is_none()
    }

    /// Every agent or pool a rule names, with the rule (`prefix:/P/`,
    /// `override`), as the access log names routes.
    pub fn targets(&self) -> Vec<(String, Target)> {
        let mut out: Vec<(String, Target)> = self
            .prefixes
            .iter()
            .map(|p| (format!("prefix:{}", p.prefix), p.target.clone()))
            .collect();
        if let Some(t) = &self.override_all {
            out.push(("override".to_owned(), t.clone()));
        }
        out
    }

    /// Rules in precedence order, for `splicegate check`.
    pub fn describe(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(t) = &self.override_all {
            out.push(("path override (--agent)".to_owned(), t.to_string()));
        }
        if let Some(h) = &self.health {
            out.push((format!("path {h}"), "answered locally".to_owned()));
        }
        if let Some(src) = &self.session {
            out.push((
                format!("session from the {src}"),
                "the session's agent, asked of the resolver".to_owned(),
            ));
        }
        if let Some(a) = &self.agent_in_path {
            let allow: Vec<String> = a.allow.iter().map(|c| c.to_string()).collect();
            let ports: Vec<String> = a.ports.iter().map(|p| p.to_string()).collect();
            out.push((
                format!("path /{{ipv4}}[:port]/ strip={}", a.strip),
                format!(
                    "that address, inside [{}] on ports [{}]",
                    allow.join(", "),
                    ports.join(", ")
                ),
            ));
        }
        for p in &self.prefixes {
            out.push((
                format!("path {} strip={}", p.prefix, p.strip),
                p.target.to_string(),
            ));
        }
        out
    }

    /// Route an origin-form request target (`/path?query`) without
    /// headers.
    pub fn resolve(&self, target: &str) -> Result<PathDecision, PathError> {
        self.resolve_request(target, |_| None)
    }

    /// Route an origin-form request target (`/path?query`); `header` looks
    /// up a request header by lower-case name (for a session named in one).
    pub fn resolve_request<'h>(
        &self,
        target: &str,
        header: impl Fn(&str) -> Option<&'h [u8]>,
    ) -> Result<PathDecision, PathError> {
        let (path, query) = match target.find('?') {
            Some(i) => target.split_at(i),
            None => (target, ""),
        };
        if self.health.as_deref() == Some(path) {
            return Ok(PathDecision::Health);
        }
        if let Some(t) = &self.override_all {
            return Ok(PathDecision::Forward {
                route: "override".to_owned(),
                target: t.clone(),
                path: target.to_owned(),
            });
        }
        if let Some(src) = &self.session {
            if let Some(d) = session(src, target, path, query, header)? {
                return Ok(d);
            }
        }
        let rest = path.strip_prefix('/').unwrap_or(path);
        let (segment, after) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        if looks_like_address(segment) {
            return self.agent_in_path(segment, after, target, query);
        }
        for p in &self.prefixes {
            let bare = &p.prefix[..p.prefix.len() - 1];
            if p.prefix != "/" && path == bare {
                return Ok(PathDecision::Redirect(format!("{}{query}", p.prefix)));
            }
            if let Some(tail) = path.strip_prefix(bare) {
                if !tail.starts_with('/') {
                    continue;
                }
                let path = if p.strip {
                    format!("{tail}{query}")
                } else {
                    target.to_owned()
                };
                return Ok(PathDecision::Forward {
                    route: p.to_string(),
                    target: p.target.clone(),
                    path,
                });
            }
        }
        Err(PathError::NoRoute(path.to_owned()))
    }

    fn agent_in_path(
        &self,
        segment: &str,
        after: Option<&str>,
        target: &str,
        query: &str,
    ) -> Result<PathDecision, PathError> {
        let (ip, port) =
            parse_ip_port(segment).ok_or_else(|| PathError::BadAddress(segment.to_owned()))?;
        let Some(rule) = &self.agent_in_path else {
            return Err(PathError::NotEnabled(segment.to_owned()));
        };
        let port = match port {
            Some(p) => p,
            None => *rule.ports.first().unwrap_or(&8443),
        };
        let addr = SocketAddr::new(IpAddr::V4(ip), port);
        let allowed =
            rule.ports.contains(&port) && rule.allow.iter().any(|c| c.contains(IpAddr::V4(ip)));
        if !allowed {
            return Err(PathError::NotAllowed(addr));
        }
        let Some(tail) = after else {
            return Ok(PathDecision::Redirect(format!("/{segment}/{query}")));
        };
        let path = if rule.strip {
            format!("{tail}{query}")
        } else {
            target.to_owned()
        };
        Ok(PathDecision::Forward {
            route: AGENT_IN_PATH.to_owned(),
            target: Target::Addr(addr),
            path,
        })
    }
}

/// The session a request names through `src`, if it names one.
fn session<'h>(
    src: &SessionSource,
    target: &str,
    path: &str,
    query: &str,
    header: impl Fn(&str) -> Option<&'h [u8]>,
) -> Result<Option<PathDecision>, PathError> {
    let bad = || PathError::BadSession {
        from: src.to_string(),
    };
    let forward = |id: &str, path: String| {
        if !crate::route::valid_session_id(id) {
            return Err(bad());
        }
        Ok(Some(PathDecision::Forward {
            route: src.route_name().to_owned(),
            target: Target::Session(id.to_owned()),
            path,
        }))
    };
    match src {
        SessionSource::Query(name) => {
            let found = query
                .trim_start_matches('?')
                .split('&')
                .find_map(|kv| kv.strip_prefix(name.as_str())?.strip_prefix('='));
            match found {
                Some(id) => forward(id, target.to_owned()),
                None => Ok(None),
            }
        }
        SessionSource::Header(name) => match header(name) {
            Some(v) => forward(
                std::str::from_utf8(v).map_err(|_| bad())?.trim(),
                target.to_owned(),
            ),
            None => Ok(None),
        },
        SessionSource::Path(prefix) => {
            let Some(rest) = path.strip_prefix(prefix.as_str()) else {
                return Ok(None);
            };
            match rest.find('/') {
                Some(i) => forward(&rest[..i], format!("{}{query}", &rest[i..])),
                None if crate::route::valid_session_id(rest) => Ok(Some(PathDecision::Redirect(
                    format!("{prefix}{rest}/{query}"),
                ))),
                None => Err(bad()),
            }
        }
    }
}

/// The request target for an agent that serves DCV under `web_url_path`
/// (`/` or a prefix such as `/dcv`): `path` placed under it.
pub fn under_web_url_path(web_url_path: &str, path: &str) -> String {
    let base = web_url_path.trim_end_matches('/');
    format!("{base}{path}")
}

/// A segment made only of digits, dots and at most one colon, with at
/// least one dot and starting with a digit: meant as an address, valid or
/// not. `desk1`, `v1.2` style names with letters are prefixes.
fn looks_like_address(segment: &str) -> bool {
    segment.starts_with(|c: char| c.is_ascii_digit())
        && segment.contains('.')
        && segment
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b':')
}

/// `10.150.248.180` or `10.150.248.180:8443`. Octets 0–255 without leading
/// zeros (so `010.1.1.1` is not silently octal or decimal); port 1–65535.
pub fn parse_ip_port(segment: &str) -> Option<(Ipv4Addr, Option<u16>)> {
    let (ip, port) = match segment.split_once(':') {
        Some((ip, port)) => (ip, Some(port)),
        None => (segment, None),
    };
    let mut octets = [0u8; 4];
    let mut parts = ip.split('.');
    for o in &mut octets {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || (p.len() > 1 && p.starts_with('0')) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => {
            if p.is_empty() || p.len() > 5 || p.starts_with('0') {
                return None;
            }
            Some(p.parse::<u16>().ok().filter(|&n| n > 0)?)
        }
    };
    Some((Ipv4Addr::from(octets), port))
}

#[cfg(test)]
mod tests;
