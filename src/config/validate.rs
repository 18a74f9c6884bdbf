//! From the file as written to the runtime [`Config`]: one function per
//! section, each refusing a bad value with the line and key it came from.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::file::{
    upstream_tls, AdminSection, Dur, FileConfig, LimitsSection, ListenerSection, PathAgentSection,
    PathRouteSection, PoolSection, ResolverSection, RouteSection, RoutingSection,
    SessionInRequestSection, UdpListenerSection,
};
use super::{
    AdminConfig, Config, ConfigError, ControlSocket, DEFAULT_ADMIN_CONNECTIONS, DEFAULT_DRAIN_GRACE,
};
use super::{MAX_CONNECTIONS, MAX_WEIGHT};
use crate::cidr::Cidr;
use crate::context::{CertFiles, ListenerConfig, TerminateConfig};
use crate::forward::Engine;
use crate::limits::Caps;
use crate::net::{Keepalive, DEFAULT_KEEPALIVE};
use crate::proxy_protocol::Mode as ProxyMode;
use crate::resolver::{Resolver, ResolverConfig};
use crate::route::path::{PathAgent, PrefixRoute, SessionSource};
use crate::route::{AgentInName, Target};
use crate::udp::UdpListenerConfig;
use crate::upstream::pool::{AgentConfig, CheckKind, HealthConfig, Passive, PoolConfig};

/// Where the text came from, to turn a span into a line and a message.
struct Src<'a> {
    text: &'a str,
    path: &'a str,
}

impl Src<'_> {
    /// An error at `span`, naming the key written there.
    fn at(&self, span: Range<usize>, what: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: line_of(self.text, span.start),
            what: describe(self.text, Some(span), &what),
        }
    }

    /// [`Src::at`] for the (span, message) pairs [`within`] returns.
    fn range(&self, (span, what): (Range<usize>, String)) -> ConfigError {
        self.at(span, what)
    }

    /// An error about the file as a whole.
    fn whole(&self, what: String) -> ConfigError {
        ConfigError::Whole {
            path: self.path.to_owned(),
            what,
        }
    }
}

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

/// A listener's `bind`: one address at least.
fn binds(
    src: &Src<'_>,
    bind: &Spanned<super::file::OneOrMany>,
) -> Result<Vec<std::net::SocketAddr>, ConfigError> {
    let addrs = bind.get_ref().0.clone();
    if addrs.is_empty() {
        return Err(src.at(
            bind.span(),
            "key `bind`: at least one address is needed".into(),
        ));
    }
    Ok(addrs)
}

/// A `[[udp_listener]]`: the QUIC relay.
fn udp_listener(
    src: &Src<'_>,
    i: usize,
    l: UdpListenerSection,
) -> Result<UdpListenerConfig, ConfigError> {
    let name = l.name.unwrap_or_else(|| format!("udp{}", i + 1));
    let range = |e| src.range(e);
    let mut u = UdpListenerConfig::with_defaults(&name, binds(src, &l.bind)?);
    if let Some(d) = &l.hello_timeout {
        u.hello_timeout = positive(src, d, "hello_timeout")?;
    }
    if let Some(h) = &l.hello_max_bytes {
        u.hello_max_bytes = within(h, "hello_max_bytes", 1200, 1 << 16).map_err(range)?;
    }
    if let Some(d) = &l.idle_timeout {
        u.idle_timeout = positive(src, d, "idle_timeout")?;
    }
    if let Some(m) = &l.max_flows {
        u.max_flows = within(m, "max_flows", 1, MAX_CONNECTIONS).map_err(range)?;
    }
    if let Some(m) = &l.max_flows_per_client {
        u.max_flows_per_client =
            within(m, "max_flows_per_client", 1, MAX_CONNECTIONS).map_err(range)?;
    }
    if let Some(p) = &l.agent_port {
        u.agent_port = Some(within(p, "agent_port", 1, u16::MAX).map_err(range)?);
    }
    u.spin = spin_window(src, l.low_latency.as_ref(), l.spin_us.as_ref(), false)?;
    if let Some(d) = &l.log_progress_interval {
        u.log_progress_interval = progress_interval(src, d)?;
    }
    Ok(u)
}

/// `log_progress_interval`: `"0"` turns the lines off; otherwise at least
/// a second (the session sampler's period).
fn progress_interval(src: &Src<'_>, d: &Spanned<Dur>) -> Result<Option<Duration>, ConfigError> {
    let v = d.get_ref().0;
    if !v.is_zero() && v < Duration::from_secs(1) {
        return Err(src.at(
            d.span(),
            "key `log_progress_interval`: at least \"1s\" (or \"0\" for none)".into(),
        ));
    }
    Ok(nonzero(v))
}

fn listener(src: &Src<'_>, i: usize, l: ListenerSection) -> Result<ListenerConfig, ConfigError> {
    let name = l
        .name
        .clone()
        .unwrap_or_else(|| format!("listener{}", i + 1));
    let range = |e| src.range(e);
    let mut lc = ListenerConfig::with_defaults(&name, binds(src, &l.bind)?);
    if let Some(b) = &l.backlog {
        lc.backlog = within(b, "backlog", 1, 65535).map_err(range)?;
    }
    set(&mut lc.reuse_port, l.reuse_port);
    set(&mut lc.engine, l.engine);
    if matches!(lc.engine, Engine::Uring | Engine::UringSplice) && !cfg!(feature = "uring") {
        return Err(src.whole(format!(
            "listener {name}: engine `{}` needs a splicegate built with the `uring` feature",
            lc.engine
        )));
    }
    if let Some(p) = &l.pipe_size {
        lc.pipe_size = within(p, "pipe_size", 4096, 1 << 20).map_err(range)?;
    }
    lc.spin = low_latency(src, &l)?;
    if let Some(h) = &l.hello_max_bytes {
        lc.hello_max_bytes = within(h, "hello_max_bytes", 512, 1 << 20).map_err(range)?;
    }
    if let Some(d) = &l.hello_timeout {
        lc.hello_timeout = positive(src, d, "hello_timeout")?;
    }
    if let Some(d) = &l.connect_timeout {
        lc.connect_timeout = positive(src, d, "connect_timeout")?;
    }
    if let Some(d) = &l.log_progress_interval {
        lc.log_progress_interval = progress_interval(src, d)?;
    }
    if let Some(d) = l.idle_timeout {
        lc.idle_timeout = nonzero(d.0);
    }
    lc.keepalive = keepalive(src, &l)?;
    set(
        &mut lc.proxy_protocol,
        l.proxy_protocol.as_ref().map(|p| *p.get_ref()),
    );
    lc.proxy_trusted = l.proxy_trusted.iter().map(|c| c.0).collect();
    if let Some(p) = &l.proxy_protocol {
        if *p.get_ref() != ProxyMode::Off && lc.proxy_trusted.is_empty() {
            return Err(src.at(
                p.span(),
                "key `proxy_protocol`: also set `proxy_trusted` to the load balancer's networks; headers are accepted only from them".into(),
            ));
        }
    }
    lc.allowed_vpce = l.allowed_vpce.clone();
    set(&mut lc.send_proxy, l.send_proxy);
    set(&mut lc.send_proxy_tlvs, l.send_proxy_tlvs);
    match l.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
        Some(("terminate", span)) => lc.terminate = Some(terminate(src, span, l)?),
        Some(("passthrough", _)) | None => {
            if let Some((key, span)) = l.terminate_keys().find_map(|(k, s)| s.map(|s| (k, s))) {
                return Err(src.at(
                    span,
                    format!("key `{key}`: only applies to listeners with mode = \"terminate\""),
                ));
            }
        }
        Some((other, span)) => {
            return Err(src.at(
                span,
                format!("key `mode`: `{other}` is not \"passthrough\" or \"terminate\""),
            ))
        }
    }
    Ok(lc)
}

/// Keepalive settings; Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at
/// 32767 s and TCP_KEEPCNT at 127 (beyond, setsockopt fails at bind time).
/// `low_latency = "off" | "spin"` and `spin_us`: the spin window.
fn low_latency(src: &Src<'_>, l: &ListenerSection) -> Result<Option<Duration>, ConfigError> {
    let terminate = matches!(
        l.mode.as_ref().map(|m| m.get_ref().as_str()),
        Some("terminate")
    );
    spin_window(src, l.low_latency.as_ref(), l.spin_us.as_ref(), terminate)
}

/// The spin window `low_latency` and `spin_us` set, for a TCP listener
/// (`terminate`: in terminate mode) or a UDP one.
fn spin_window(
    src: &Src<'_>,
    mode: Option<&Spanned<String>>,
    spin_us: Option<&Spanned<u64>>,
    terminate: bool,
) -> Result<Option<Duration>, ConfigError> {
    let spin = match mode.map(|m| (m.get_ref().as_str(), m.span())) {
        None | Some(("off", _)) => false,
        Some(("spin", span)) => {
            if terminate {
                return Err(src.at(
                    span,
                    "key `low_latency`: applies to passthrough listeners (terminate mode has its own pump)".into(),
                ));
            }
            true
        }
        Some((other, span)) => {
            return Err(src.at(
                span,
                format!("key `low_latency`: `{other}` is not a mode: \"off\" or \"spin\""),
            ))
        }
    };
    match (spin_us, spin) {
        (Some(us), true) => Ok(Some(Duration::from_micros(
            within(us, "spin_us", 1, 1000).map_err(|e| src.range(e))?,
        ))),
        (Some(us), false) => Err(src.at(
            us.span(),
            "key `spin_us`: set `low_latency = \"spin\"` too".into(),
        )),
        (None, true) => Ok(Some(Duration::from_micros(DEFAULT_SPIN_US))),
        (None, false) => Ok(None),
    }
}

/// The spin window of `low_latency = "spin"` without `spin_us`.
pub(super) const DEFAULT_SPIN_US: u64 = 50;

fn keepalive(src: &Src<'_>, l: &ListenerSection) -> Result<Option<Keepalive>, ConfigError> {
    let secs = |d: &Spanned<Dur>, key: &str| {
        let secs = d.get_ref().0.as_secs();
        if secs > 32767 {
            return Err(src.at(
                d.span(),
                format!("key `{key}`: {secs} s is more than the kernel's 32767 s"),
            ));
        }
        Ok(d.get_ref().0)
    };
    let mut keepalive = Some(DEFAULT_KEEPALIVE);
    if let Some(k) = &l.keepalive_time {
        let time = secs(k, "keepalive_time")?;
        keepalive = nonzero(time).map(|time| Keepalive {
            time: time.max(Duration::from_secs(1)),
            ..DEFAULT_KEEPALIVE
        });
    }
    if let Some(ka) = keepalive.as_mut() {
        if let Some(i) = &l.keepalive_interval {
            ka.interval = secs(i, "keepalive_interval")?.max(Duration::from_secs(1));
        }
        if let Some(r) = &l.keepalive_retries {
            ka.retries = within(r, "keepalive_retries", 1, 127).map_err(|e| src.range(e))?;
        }
    }
    Ok(keepalive)
}

fn terminate(
    src: &Src<'_>,
    mode: Range<usize>,
    l: ListenerSection,
) -> Result<TerminateConfig, ConfigError> {
    if l.cert.is_empty() {
        return Err(src.at(
            mode,
            "key `mode`: a terminate listener needs at least one [[listener.cert]] with `cert` and `key`".into(),
        ));
    }
    let upstream = upstream_tls(
        l.upstream_tls.as_ref().map(|u| u.get_ref().as_str()),
        l.upstream_ca.map(Spanned::into_inner),
    )
    .map_err(|what| src.at(l.upstream_tls.as_ref().map_or(mode, |u| u.span()), what))?;
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
    let mut tc = TerminateConfig::new(certs, upstream);
    tc.upstream_server_name = l.upstream_server_name.map(Spanned::into_inner);
    if let Some(h) = &l.head_max_bytes {
        tc.head_max_bytes = within(h, "head_max_bytes", 1024, 1 << 20).map_err(|e| src.range(e))?;
    }
    if let Some(d) = &l.head_timeout {
        tc.head_timeout = positive(src, d, "head_timeout")?;
    }
    if let Some(d) = l.request_idle_timeout {
        tc.request_idle_timeout = nonzero(d.into_inner().0);
    }
    set(
        &mut tc.forwarded_headers,
        l.forwarded_headers.map(Spanned::into_inner),
    );
    Ok(tc)
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

/// A duration that must not be zero.
fn positive(src: &Src<'_>, d: &Spanned<Dur>, key: &str) -> Result<Duration, ConfigError> {
    if d.get_ref().0.is_zero() {
        return Err(src.at(d.span(), format!("key `{key}`: must be more than 0")));
    }
    Ok(d.get_ref().0)
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
