//! The listener sections: `[[listener]]` (passthrough and terminate, with
//! their PROXY, keepalive, low-latency and TLS keys) and `[[udp_listener]]`
//! (the QUIC relay).

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::file::{upstream_tls, Dur, ListenerSection, UdpListenerSection};
use super::spans::{nonzero, positive, set, within, Src};
use super::{ConfigError, MAX_CONNECTIONS};
use crate::context::{CertFiles, ListenerConfig, TerminateConfig};
use crate::forward::Engine;
use crate::net::{Keepalive, DEFAULT_KEEPALIVE};
use crate::proxy_protocol::Mode as ProxyMode;
use crate::udp::UdpListenerConfig;

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
pub(super) fn udp_listener(
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
    u.lb_networks = l.lb_networks.iter().map(|c| c.0).collect();
    if let Some(m) = &l.max_pending {
        u.max_pending = within(m, "max_pending", 1, MAX_CONNECTIONS).map_err(range)?;
    }
    if let Some(m) = &l.pending_bytes_max {
        u.pending_bytes_max = within(m, "pending_bytes_max", 1 << 20, 1 << 34).map_err(range)?;
    }
    if let Some(w) = &l.udp_workers {
        u.workers = within(w, "udp_workers", 1, 256).map_err(range)?;
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

pub(super) fn listener(
    src: &Src<'_>,
    i: usize,
    l: ListenerSection,
) -> Result<ListenerConfig, ConfigError> {
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
