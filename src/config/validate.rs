//! From the file as written to the runtime [`Config`]: one function per
//! section, each refusing a bad value with the line and key it came from.

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::listeners::{listener, udp_listener};
use super::spans::{describe, line_of, positive, set, within, Src};

use super::file::{
    AdminSection, Dur, FileConfig, LimitsSection, PathAgentSection, PathRouteSection, PoolSection,
    ResolverSection, RouteSection, RoutingSection, SessionInRequestSection,
};
use super::{
    AdminConfig, Config, ConfigError, ControlSocket, DEFAULT_ADMIN_CONNECTIONS, DEFAULT_DRAIN_GRACE,
};
use super::{MAX_CONNECTIONS, MAX_WEIGHT};
use crate::cidr::Cidr;
use crate::context::ListenerConfig;
use crate::limits::Caps;
use crate::proxy_protocol::Mode as ProxyMode;
use crate::resolver::{Resolver, ResolverConfig};
use crate::route::path::{PathAgent, PrefixRoute, SessionSource};
use crate::route::{AgentInName, Target};
use crate::upstream::pool::{AgentConfig, CheckKind, HealthConfig, Passive, PoolConfig};

/// Parse and validate TOML text; `path` is used in messages.
pub(super) fn config(text: &str, path: &str) -> Result<Config, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
        path: path.to_owned(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        what: describe(text, e.span(), e.message()),
    })?;
    let src = Src { text, path };
    let mut config = Config::default();
    let admin = file.admin.map(|a| admin(&src, a)).transpose()?;
    if admin.is_some() {
        config.drain_grace = DEFAULT_DRAIN_GRACE;
    }
    if let Some(s) = file.shutdown {
        set(&mut config.drain_timeout, s.drain_timeout.map(|d| d.0));
        set(&mut config.drain_grace, s.drain_grace.map(|d| d.0));
    }
    if let Some(c) = file.control.and_then(|c| c.path) {
        config.control = control_path(&src, c)?;
    }
    for (i, l) in file.listener.into_iter().enumerate() {
        let lc = listener(&src, i, l)?;
        if config.listeners.iter().any(|o| o.name == lc.name) {
            return Err(src.whole(format!("two listeners are named {:?}", lc.name)));
        }
        config.listeners.push(lc);
    }
    for (i, l) in file.udp_listener.into_iter().enumerate() {
        let u = udp_listener(&src, i, l)?;
        let taken = config.listeners.iter().any(|o| o.name == u.name)
            || config.udp_listeners.iter().any(|o| o.name == u.name);
        if taken {
            return Err(src.whole(format!("two listeners are named {:?}", u.name)));
        }
        config.udp_listeners.push(u);
    }
    if let Some(l) = file.limits {
        config.limits = limits(&src, l)?;
    }
    pools(&src, file.pool, &mut config)?;
    let require_resolver = admin.as_ref().and_then(|a| a.3.clone());
    if let Some((mut a, trusted, required, _)) = admin {
        a.proxy_trusted = trusted.unwrap_or_else(|| listeners_trusted(&config.listeners));
        config.admin = Some(a);
        for r in required {
            if !config.pools.iter().any(|p| &p.name == r.get_ref()) {
                return Err(src.at(
                    r.span(),
                    format!("key `require_pools`: no pool is named {:?}", r.get_ref()),
                ));
            }
            config.required_pools.push(r.into_inner());
        }
    }
    routes(&src, file.route, &mut config)?;
    for a in file.agent_in_name {
        config.routes.add_agent_in_name(AgentInName {
            suffix: a.suffix.0 .0,
            port: a.port.unwrap_or(8443),
            allow: a.allow.into_iter().map(|c| c.0).collect(),
        });
    }
    path_routes(&src, file.path_route, &mut config)?;
    if let Some(a) = file.path_agent {
        config.paths.agent_in_path = Some(path_agent(a));
    }
    if let Some(r) = file.routing {
        routing(&src, r, &mut config)?;
    }
    if let Some(r) = file.resolver {
        config.resolver = Some(resolver(&src, r)?);
    }
    for s in file.session_in_name {
        let suffix = s.suffix.get_ref().0 .0.clone();
        if config.routes.has_suffix(&suffix) {
            return Err(src.at(
                s.suffix.span(),
                format!(
                    "key `suffix`: {suffix} is already an agent-in-name or session-in-name suffix"
                ),
            ));
        }
        if config.resolver.is_none() {
            return Err(src.at(
                s.suffix.span(),
                "[[session_in_name]] needs a [resolver] section to ask where sessions live".into(),
            ));
        }
        config.routes.add_session_in_name(suffix);
    }
    if let Some(r) = file.session_in_request {
        config.paths.session = Some(session_in_request(&src, r, config.resolver.is_some())?);
    }
    if let Some(r) = require_resolver {
        if *r.get_ref() && config.resolver.is_none() {
            return Err(src.at(
                r.span(),
                "key `require_resolver`: there is no [resolver] section".into(),
            ));
        }
        config.require_resolver = *r.get_ref();
    }
    Ok(config)
}

/// `[control] path`: a socket path (`""` turns the control socket off).
fn control_path(
    src: &Src<'_>,
    p: toml::Spanned<std::path::PathBuf>,
) -> Result<ControlSocket, ConfigError> {
    let span = p.span();
    let path = p.into_inner();
    if path.as_os_str().is_empty() {
        return Ok(ControlSocket::Off);
    }
    if !path.is_absolute() {
        return Err(src.at(
            span,
            format!(
                "key `path`: the control socket path must be absolute, not {:?}",
                path.display().to_string()
            ),
        ));
    }
    // sun_path holds 108 bytes with the terminating NUL.
    if path.as_os_str().len() > 107 {
        return Err(src.at(
            span,
            format!(
                "key `path`: {} bytes is longer than a Unix socket path may be (107)",
                path.as_os_str().len()
            ),
        ));
    }
    Ok(ControlSocket::At(path))
}

/// The `[resolver]` section; its CA and client certificate are loaded
/// here so that `check` reports a bad file.
fn resolver(src: &Src<'_>, r: ResolverSection) -> Result<ResolverConfig, ConfigError> {
    let url = r.url.get_ref().trim();
    let at_url = |what: String| src.at(r.url.span(), format!("key `url`: {what}"));
    let https = match url.split_once("://") {
        Some(("https", _)) => true,
        Some(("http", _)) => false,
        _ => {
            return Err(at_url(format!(
                "`{url}` must start with http:// or https://"
            )))
        }
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| at_url(format!("`{url}` is not a URL: {e}")))?;
    if uri.host().is_none_or(str::is_empty) || uri.query().is_some() || url.contains('#') {
        return Err(at_url(format!(
            "`{url}` must be scheme://host[:port][/path], without query or fragment"
        )));
    }
    let mut c = ResolverConfig::new(url);
    let range = |e| src.range(e);
    match (&r.ca, https) {
        (Some(ca), false) => {
            return Err(src.at(
                ca.span(),
                "key `ca`: the resolver URL is plain http://; use https:// for TLS".into(),
            ))
        }
        (None, true) => return Err(at_url(
            "an https resolver needs `ca`, the CA certificates (PEM) that signed its certificate; splicegate uses no system trust store".into(),
        )),
        (ca, _) => c.ca = ca.as_ref().map(|c| c.get_ref().clone()),
    }
    match (&r.cert, &r.key) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            if !https {
                return Err(src.at(
                    cert.span(),
                    "key `cert`: a client certificate needs an https:// resolver URL".into(),
                ));
            }
            c.client_cert = Some((cert.get_ref().clone(), key.get_ref().clone()));
        }
        (Some(one), None) | (None, Some(one)) => {
            return Err(src.at(
                one.span(),
                "keys `cert` and `key`: give both (the client certificate and its key) or neither"
                    .into(),
            ))
        }
    }
    if let Some(t) = &r.timeout {
        c.timeout = positive(src, t, "timeout")?;
    }
    set(&mut c.cache_ttl, r.cache_ttl.map(|d| d.0));
    set(&mut c.negative_ttl, r.negative_ttl.map(|d| d.0));
    if let Some(n) = &r.cache_max {
        c.cache_max = within(n, "cache_max", 1, MAX_CONNECTIONS).map_err(range)?;
    }
    if let Some(n) = &r.max_in_flight {
        c.max_in_flight = within(n, "max_in_flight", 1, 4096).map_err(range)?;
    }
    c.allow = r.allow.into_iter().map(|c| c.0).collect();
    c.allow_names = r.allow_names.into_iter().map(|s| s.0 .0).collect();
    if !c.allow_names.is_empty() && c.allow.is_empty() {
        return Err(at_url(
            "key `allow_names`: also set `allow`: an answered host name is dialled only at addresses inside `allow` (DNS is not trusted to keep it in the allowlist)".into(),
        ));
    }
    if c.allow.is_empty() && c.allow_names.is_empty() {
        return Err(at_url(
            "set `allow` (networks) and/or `allow_names` (host-name suffixes): the agents the resolver may send connections to; nothing else is dialled".into(),
        ));
    }
    if let Some(p) = &r.ports {
        if p.get_ref().is_empty() || p.get_ref().contains(&0) {
            return Err(src.at(
                p.span(),
                "key `ports`: list the agent ports answers may name (1-65535)".into(),
            ));
        }
        c.ports = p.get_ref().clone();
    }
    Resolver::check(&c).map_err(|e| at_url(format!("[resolver] {e}")))?;
    Ok(c)
}

/// The `[session_in_request]` section: exactly one source.
fn session_in_request(
    src: &Src<'_>,
    r: SessionInRequestSection,
    has_resolver: bool,
) -> Result<SessionSource, ConfigError> {
    let given: Vec<(&str, &Spanned<String>)> = [
        ("query", &r.query),
        ("path_prefix", &r.path_prefix),
        ("header", &r.header),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let [(key, value)] = given.as_slice() else {
        let what = "[session_in_request]: give exactly one of `query`, `path_prefix` or `header`";
        return Err(match given.get(1) {
            Some((_, v)) => src.at(v.span(), what.into()),
            None => src.whole(what.into()),
        });
    };
    let v = value.get_ref().as_str();
    let bad = |why: &str| src.at(value.span(), format!("key `{key}`: {why}"));
    if !has_resolver {
        return Err(bad("[session_in_request] needs a [resolver] section"));
    }
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    match *key {
        "query" if token(v) => Ok(SessionSource::Query(v.to_owned())),
        "query" => Err(bad("a query parameter name of A-Z a-z 0-9 - _ .")),
        "header" if token(v) => Ok(SessionSource::Header(v.to_ascii_lowercase())),
        "header" => Err(bad("a header name of A-Z a-z 0-9 - _ .")),
        _ => {
            let ok = v.len() > 2
                && v.starts_with('/')
                && v.ends_with('/')
                && v.bytes().all(|b| b.is_ascii_graphic() && b != b'?');
            if ok {
                Ok(SessionSource::Path(v.to_owned()))
            } else {
                Err(bad(
                    "a path prefix starting and ending with `/`, such as \"/session/\"",
                ))
            }
        }
    }
}

/// The admin section, its explicit `proxy_trusted` (if given) and the
/// pools it requires.
#[allow(clippy::type_complexity)]
fn admin(
    src: &Src<'_>,
    a: AdminSection,
) -> Result<
    (
        AdminConfig,
        Option<Vec<Cidr>>,
        Vec<Spanned<String>>,
        Option<Spanned<bool>>,
    ),
    ConfigError,
> {
    let mut cfg = AdminConfig {
        bind: a.bind.0,
        proxy_trusted: Vec::new(),
        max_connections: DEFAULT_ADMIN_CONNECTIONS,
        max_per_peer: super::DEFAULT_ADMIN_PER_PEER,
        request_timeout: super::DEFAULT_ADMIN_REQUEST_TIMEOUT,
    };
    if let Some(n) = &a.max_connections {
        cfg.max_connections = within(n, "max_connections", 1, 65536).map_err(|e| src.range(e))?;
    }
    if let Some(n) = &a.max_per_peer {
        cfg.max_per_peer = within(n, "max_per_peer", 1, 65536).map_err(|e| src.range(e))?;
    }
    if let Some(d) = &a.request_timeout {
        let t = d.get_ref().0;
        if t < Duration::from_millis(100) || t > Duration::from_secs(60) {
            return Err(src.at(
                d.span(),
                "key `request_timeout`: from \"100ms\" to \"60s\"".into(),
            ));
        }
        cfg.request_timeout = t;
    }
    let trusted = a
        .proxy_trusted
        .map(|v| v.into_iter().map(|c| c.0).collect());
    Ok((cfg, trusted, a.require_pools, a.require_resolver))
}

/// Every listener's `proxy_trusted` networks, for the admin listener.
fn listeners_trusted(listeners: &[ListenerConfig]) -> Vec<Cidr> {
    let mut all: Vec<Cidr> = Vec::new();
    for l in listeners
        .iter()
        .filter(|l| l.proxy_protocol != ProxyMode::Off)
    {
        for c in &l.proxy_trusted {
            if !all.contains(c) {
                all.push(*c);
            }
        }
    }
    all
}

fn limits(src: &Src<'_>, l: LimitsSection) -> Result<Caps, ConfigError> {
    let limit = |v: &Option<Spanned<usize>>, key: &str| {
        v.as_ref()
            .map(|n| within(n, key, 0, MAX_CONNECTIONS).map_err(|e| src.range(e)))
            .transpose()
            .map(|n| n.filter(|&n| n > 0))
    };
    Ok(Caps {
        max_connections: limit(&l.max_connections, "max_connections")?,
        max_per_client: limit(&l.max_per_client, "max_per_client")?,
    })
}

fn pools(
    src: &Src<'_>,
    sections: Vec<PoolSection>,
    config: &mut Config,
) -> Result<(), ConfigError> {
    for p in sections {
        let name = p.name.get_ref();
        if config.pools.iter().any(|o| &o.name == name) {
            return Err(src.at(
                p.name.span(),
                format!("key `name`: two pools are named {name:?}"),
            ));
        }
        config.pools.push(pool(src, p)?);
    }
    Ok(())
}

fn pool(src: &Src<'_>, p: PoolSection) -> Result<PoolConfig, ConfigError> {
    let name = p.name.get_ref().clone();
    let at_name = |what: String| src.at(p.name.span(), what);
    if p.agents.is_empty() {
        return Err(at_name(format!(
            "pool {name:?} has no agents: add [[pool.agents]] tables"
        )));
    }
    for a in &p.agents {
        if let Some(w) = &a.weight {
            within(w, "weight", 0, MAX_WEIGHT).map_err(|e| src.range(e))?;
        }
        if let Some(m) = &a.max_conns {
            within(m, "max_conns", 0, MAX_CONNECTIONS).map_err(|e| src.range(e))?;
        }
    }
    if p.agents
        .iter()
        .all(|a| a.weight.as_ref().is_some_and(|w| *w.get_ref() == 0))
    {
        return Err(at_name(format!(
            "pool {name:?}: every agent has weight 0, so none can be chosen"
        )));
    }
    let health = match p.health {
        None => None,
        Some(h) => {
            let kind = match h.check.as_deref().unwrap_or("tcp") {
                "tcp" => CheckKind::Tcp,
                "tls" => CheckKind::Tls,
                "https" => CheckKind::Https {
                    path: h.path.unwrap_or_else(|| "/".to_owned()),
                    status: match &h.status {
                        Some(st) => within(st, "status", 100, 599).map_err(|e| src.range(e))?,
                        None => 200,
                    },
                },
                other => {
                    return Err(at_name(format!(
                        "pool {name:?}: health check `{other}` is not tcp, tls or https"
                    )))
                }
            };
            let at_least = |d: Option<Dur>, default: u64| {
                d.map_or(Duration::from_secs(default), |d| {
                    d.0.max(Duration::from_millis(10))
                })
            };
            Some(HealthConfig {
                kind,
                interval: at_least(h.interval, 5),
                timeout: at_least(h.timeout, 2),
                rise: h.rise.unwrap_or(2).max(1),
                fall: h.fall.unwrap_or(3).max(1),
                sni: h.sni,
            })
        }
    };
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
    let n = agents.len();
    Ok(PoolConfig {
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
    })
}

/// `agent = "HOST:PORT"` or `pool = "NAME"`, exactly one.
fn target(
    src: &Src<'_>,
    config: &Config,
    agent: Option<Target>,
    pool: Option<&Spanned<String>>,
    missing: (Range<usize>, String),
) -> Result<Target, ConfigError> {
    match (agent, pool) {
        (Some(a), None) => Ok(a),
        (None, Some(name)) => {
            let n = name.get_ref();
            if config.pools.iter().any(|p| &p.name == n) {
                Ok(Target::Pool(n.clone()))
            } else {
                Err(src.at(name.span(), format!("no pool is named {n:?}")))
            }
        }
        _ => Err(src.range(missing)),
    }
}

fn routes(
    src: &Src<'_>,
    sections: Vec<RouteSection>,
    config: &mut Config,
) -> Result<(), ConfigError> {
    let mut seen = Vec::new();
    for r in sections {
        let pattern = r.sni.get_ref().0.clone();
        if seen.contains(&pattern) {
            return Err(src.at(
                r.sni.span(),
                format!("key `sni`: a route for {pattern} is already defined"),
            ));
        }
        seen.push(pattern.clone());
        let missing = (
            r.sni.span(),
            format!("route {pattern}: give exactly one of `agent` or `pool`"),
        );
        let t = target(src, config, r.agent.map(|a| a.0), r.pool.as_ref(), missing)?;
        config.routes.insert_restricted(pattern, t, r.allowed_vpce);
    }
    Ok(())
}

fn path_routes(
    src: &Src<'_>,
    sections: Vec<PathRouteSection>,
    config: &mut Config,
) -> Result<(), ConfigError> {
    for r in sections {
        let prefix = super::file::parse_prefix(r.prefix.get_ref())
            .map_err(|e| src.at(r.prefix.span(), format!("key `prefix`: {e}")))?;
        if config.paths.has_prefix(&prefix) {
            return Err(src.at(
                r.prefix.span(),
                format!("key `prefix`: a path route for {prefix} is already defined"),
            ));
        }
        let missing = (
            r.prefix.span(),
            format!("path route {prefix}: give exactly one of `agent` or `pool`"),
        );
        let t = target(src, config, r.agent.map(|a| a.0), r.pool.as_ref(), missing)?;
        config.paths.insert(PrefixRoute {
            prefix,
            target: t,
            strip: r.strip_prefix.unwrap_or(true),
        });
    }
    Ok(())
}

fn path_agent(a: PathAgentSection) -> PathAgent {
    PathAgent {
        allow: a.allow.into_iter().map(|c| c.0).collect(),
        ports: a
            .ports
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| vec![8443]),
        strip: a.strip_prefix.unwrap_or(true),
    }
}

fn routing(src: &Src<'_>, r: RoutingSection, config: &mut Config) -> Result<(), ConfigError> {
    if let Some(h) = &r.health_path {
        let v = h.get_ref();
        config.paths.health = if v.is_empty() {
            None
        } else if v.starts_with('/') && !v.contains('?') {
            Some(v.clone())
        } else {
            return Err(src.at(
                h.span(),
                format!(
                    "key `health_path`: `{v}` is not a path (like \"/health\"; \"\" turns it off)"
                ),
            ));
        };
    }
    let default = match (r.default, &r.default_pool) {
        (Some(_), Some(p)) => {
            return Err(src.at(
                p.span(),
                "give `default` or `default_pool`, not both".into(),
            ));
        }
        (None, None) => None,
        (agent, pool) => Some(target(
            src,
            config,
            agent.map(|a| a.0),
            pool.as_ref(),
            (0..0, String::new()),
        )?),
    };
    config.routes.set_default(default);
    config.routes.set_no_sni(r.no_sni.unwrap_or_default());
    Ok(())
}
