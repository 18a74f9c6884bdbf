//! The configuration file as written: one struct per TOML table, with
//! values parsed while deserialising (addresses, durations, networks,
//! patterns) so that a bad value is reported with its line and key.
//! Unknown keys are errors. [`super::validate`] turns these into the
//! runtime [`super::Config`].

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::cidr::Cidr;
use crate::context::SendProxy;
use crate::forward::Engine;
use crate::proxy_protocol::Mode as ProxyMode;
use crate::route::{NoSni, SniPattern, Target};
use crate::upstream::pool::Policy;
use crate::upstream::tls::UpstreamTls;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) listener: Vec<ListenerSection>,
    #[serde(default)]
    pub(super) udp_listener: Vec<UdpListenerSection>,
    #[serde(default)]
    pub(super) route: Vec<RouteSection>,
    #[serde(default)]
    pub(super) agent_in_name: Vec<AgentInNameSection>,
    pub(super) routing: Option<RoutingSection>,
    pub(super) shutdown: Option<ShutdownSection>,
    pub(super) admin: Option<AdminSection>,
    pub(super) control: Option<ControlSection>,
    #[serde(default)]
    pub(super) pool: Vec<PoolSection>,
    pub(super) limits: Option<LimitsSection>,
    #[serde(default)]
    pub(super) path_route: Vec<PathRouteSection>,
    pub(super) path_agent: Option<PathAgentSection>,
    pub(super) resolver: Option<ResolverSection>,
    #[serde(default)]
    pub(super) session_in_name: Vec<SessionInNameSection>,
    pub(super) session_in_request: Option<SessionInRequestSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResolverSection {
    pub(super) url: Spanned<String>,
    pub(super) ca: Option<Spanned<std::path::PathBuf>>,
    pub(super) cert: Option<Spanned<std::path::PathBuf>>,
    pub(super) key: Option<Spanned<std::path::PathBuf>>,
    pub(super) timeout: Option<Spanned<Dur>>,
    pub(super) cache_ttl: Option<Dur>,
    pub(super) negative_ttl: Option<Dur>,
    pub(super) cache_max: Option<Spanned<usize>>,
    pub(super) max_in_flight: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) allow: Vec<Parsed<Cidr>>,
    #[serde(default)]
    pub(super) allow_names: Vec<Parsed<Suffix>>,
    pub(super) ports: Option<Spanned<Vec<u16>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SessionInNameSection {
    pub(super) suffix: Spanned<Parsed<Suffix>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SessionInRequestSection {
    pub(super) query: Option<Spanned<String>>,
    pub(super) path_prefix: Option<Spanned<String>>,
    pub(super) header: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsSection {
    pub(super) max_connections: Option<Spanned<usize>>,
    pub(super) max_per_client: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PoolSection {
    pub(super) name: Spanned<String>,
    pub(super) policy: Option<Policy>,
    #[serde(default)]
    pub(super) agents: Vec<PoolAgentSection>,
    pub(super) attempts: Option<usize>,
    pub(super) max_fails: Option<u32>,
    pub(super) fail_window: Option<Dur>,
    pub(super) fail_timeout: Option<Dur>,
    pub(super) health: Option<HealthSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PoolAgentSection {
    pub(super) addr: Parsed<Target>,
    pub(super) weight: Option<Spanned<u32>>,
    pub(super) backup: Option<bool>,
    pub(super) max_conns: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthSection {
    pub(super) check: Option<String>,
    pub(super) interval: Option<Dur>,
    pub(super) timeout: Option<Dur>,
    pub(super) rise: Option<u32>,
    pub(super) fall: Option<u32>,
    pub(super) path: Option<String>,
    pub(super) status: Option<Spanned<u16>>,
    pub(super) sni: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminSection {
    pub(super) bind: OneAddr,
    #[serde(default)]
    pub(super) require_pools: Vec<Spanned<String>>,
    pub(super) proxy_trusted: Option<Vec<Parsed<Cidr>>>,
    pub(super) max_connections: Option<Spanned<usize>>,
    pub(super) max_per_peer: Option<Spanned<usize>>,
    pub(super) request_timeout: Option<Spanned<Dur>>,
    pub(super) require_resolver: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenerSection {
    pub(super) name: Option<String>,
    pub(super) bind: Spanned<OneOrMany>,
    pub(super) backlog: Option<Spanned<u32>>,
    pub(super) reuse_port: Option<bool>,
    pub(super) engine: Option<Engine>,
    pub(super) pipe_size: Option<Spanned<usize>>,
    pub(super) low_latency: Option<Spanned<String>>,
    pub(super) spin_us: Option<Spanned<u64>>,
    pub(super) hello_timeout: Option<Spanned<Dur>>,
    pub(super) hello_max_bytes: Option<Spanned<usize>>,
    pub(super) connect_timeout: Option<Spanned<Dur>>,
    pub(super) idle_timeout: Option<Dur>,
    pub(super) log_progress_interval: Option<Spanned<Dur>>,
    pub(super) keepalive_time: Option<Spanned<Dur>>,
    pub(super) keepalive_interval: Option<Spanned<Dur>>,
    pub(super) keepalive_retries: Option<Spanned<u32>>,
    pub(super) proxy_protocol: Option<Spanned<ProxyMode>>,
    #[serde(default)]
    pub(super) proxy_trusted: Vec<Parsed<Cidr>>,
    #[serde(default)]
    pub(super) allowed_vpce: Vec<String>,
    pub(super) send_proxy: Option<SendProxy>,
    pub(super) send_proxy_tlvs: Option<bool>,
    pub(super) mode: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) cert: Vec<Spanned<CertSection>>,
    pub(super) upstream_tls: Option<Spanned<String>>,
    pub(super) upstream_ca: Option<Spanned<std::path::PathBuf>>,
    pub(super) upstream_server_name: Option<Spanned<String>>,
    pub(super) head_max_bytes: Option<Spanned<usize>>,
    pub(super) head_timeout: Option<Spanned<Dur>>,
    pub(super) request_idle_timeout: Option<Spanned<Dur>>,
    pub(super) forwarded_headers: Option<Spanned<bool>>,
}

impl ListenerSection {
    /// The keys only terminate listeners take, with where each was written.
    pub(super) fn terminate_keys(
        &self,
    ) -> impl Iterator<Item = (&'static str, Option<std::ops::Range<usize>>)> {
        fn at<T>(v: &Option<Spanned<T>>) -> Option<std::ops::Range<usize>> {
            v.as_ref().map(Spanned::span)
        }
        [
            ("cert", self.cert.first().map(Spanned::span)),
            ("upstream_tls", at(&self.upstream_tls)),
            ("upstream_ca", at(&self.upstream_ca)),
            ("upstream_server_name", at(&self.upstream_server_name)),
            ("head_max_bytes", at(&self.head_max_bytes)),
            ("head_timeout", at(&self.head_timeout)),
            ("request_idle_timeout", at(&self.request_idle_timeout)),
            ("forwarded_headers", at(&self.forwarded_headers)),
        ]
        .into_iter()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UdpListenerSection {
    pub(super) name: Option<String>,
    pub(super) bind: Spanned<OneOrMany>,
    pub(super) hello_timeout: Option<Spanned<Dur>>,
    pub(super) hello_max_bytes: Option<Spanned<usize>>,
    pub(super) idle_timeout: Option<Spanned<Dur>>,
    pub(super) max_flows: Option<Spanned<usize>>,
    pub(super) max_flows_per_client: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) lb_networks: Vec<Parsed<Cidr>>,
    pub(super) max_pending: Option<Spanned<usize>>,
    pub(super) pending_bytes_max: Option<Spanned<usize>>,
    pub(super) udp_workers: Option<Spanned<usize>>,
    pub(super) agent_port: Option<Spanned<u16>>,
    pub(super) low_latency: Option<Spanned<String>>,
    pub(super) spin_us: Option<Spanned<u64>>,
    pub(super) log_progress_interval: Option<Spanned<Dur>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CertSection {
    pub(super) cert: std::path::PathBuf,
    pub(super) key: std::path::PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PathRouteSection {
    pub(super) prefix: Spanned<String>,
    pub(super) agent: Option<Parsed<Target>>,
    pub(super) pool: Option<Spanned<String>>,
    pub(super) strip_prefix: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PathAgentSection {
    pub(super) allow: Vec<Parsed<Cidr>>,
    pub(super) ports: Option<Vec<u16>>,
    pub(super) strip_prefix: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteSection {
    pub(super) sni: Spanned<Parsed<SniPattern>>,
    pub(super) agent: Option<Parsed<Target>>,
    pub(super) pool: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) allowed_vpce: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentInNameSection {
    pub(super) suffix: Parsed<Suffix>,
    pub(super) port: Option<u16>,
    pub(super) allow: Vec<Parsed<Cidr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RoutingSection {
    pub(super) default: Option<Parsed<Target>>,
    pub(super) default_pool: Option<Spanned<String>>,
    pub(super) no_sni: Option<NoSni>,
    pub(super) health_path: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ControlSection {
    pub(super) path: Option<Spanned<std::path::PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ShutdownSection {
    pub(super) drain_timeout: Option<Dur>,
    pub(super) drain_grace: Option<Dur>,
}

/// A value parsed with `FromStr` during deserialisation, so errors carry
/// the TOML position.
pub(super) struct Parsed<T>(pub(super) T);

impl<'de, T: FromStr<Err = String>> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Parsed).map_err(serde::de::Error::custom)
    }
}

/// A DNS suffix for agent-in-name routes.
pub(super) struct Suffix(pub(super) String);

impl FromStr for Suffix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::sniff::normalise_sni(s.as_bytes())
            .map(Suffix)
            .ok_or_else(|| format!("`{s}` is not a DNS suffix"))
    }
}

/// One address.
pub(super) struct OneAddr(pub(super) SocketAddr);

impl<'de> Deserialize<'de> for OneAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(OneAddr).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{s}` is not an IP:PORT address (e.g. \"0.0.0.0:8989\")"
            ))
        })
    }
}

/// One address or a list of addresses.
pub(super) struct OneOrMany(pub(super) Vec<SocketAddr>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let list = match Raw::deserialize(d)? {
            Raw::One(s) => vec![s],
            Raw::Many(v) => v,
        };
        list.iter()
            .map(|s| {
                s.parse::<SocketAddr>().map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{s}` is not an IP:PORT address (e.g. \"0.0.0.0:8443\" or \"[::]:8443\")"
                    ))
                })
            })
            .collect::<Result<_, _>>()
            .map(OneOrMany)
    }
}

/// A duration: `"10s"`, `"500ms"`, `"5m"`, `"2h"`, `"0"` or an integer of
/// seconds.
#[derive(Debug, Clone, Copy)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(Dur)
    }
}

/// Longest duration any key accepts: 30 days. Deadlines are computed as
/// `now + duration`, which must not overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86400);

/// Parse `"10s"`, `"500ms"`, `"5m"`, `"2h"`, `"1d"` or `"0"`, at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{s}` is not a duration (use e.g. \"500ms\", \"10s\", \"5m\", \"2h\")");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        "" if n == 0 => Duration::ZERO,
        _ => return Err(bad()),
    };
    check_duration(d).map_err(|e| format!("`{s}`: {e}"))
}

fn check_duration(d: Duration) -> Result<Duration, String> {
    if d > MAX_DURATION {
        return Err("longer than the maximum of 30 days (\"30d\")".to_owned());
    }
    Ok(d)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => check_duration(Duration::from_secs(n))
                .map(Dur)
                .map_err(|e| serde::de::Error::custom(format!("{n} seconds is {e}"))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A path prefix: starts with `/`; a trailing `/` is added when missing.
pub(super) fn parse_prefix(p: &str) -> Result<String, String> {
    if !p.starts_with('/') || p.contains(['?', '#', ' ']) || p.contains("//") {
        return Err(format!(
            "`{p}` is not a path prefix (like \"/desk1/\", or \"/\" for the default)"
        ));
    }
    Ok(if p.ends_with('/') {
        p.to_owned()
    } else {
        format!("{p}/")
    })
}

/// `upstream_tls` and `upstream_ca` as one setting. Verification is the
/// default and needs a CA file; turning it off must be explicit.
pub(super) fn upstream_tls(
    kind: Option<&str>,
    ca: Option<std::path::PathBuf>,
) -> Result<UpstreamTls, String> {
    match (kind.unwrap_or("verify"), ca) {
        ("verify", Some(ca)) => Ok(UpstreamTls::Verify(ca)),
        ("verify", None) => Err("key `upstream_tls`: verifying agents (the default) needs `upstream_ca`, a PEM file with the CA or the self-signed certificate of the agents (DCV generates a self-signed one per agent); or set upstream_tls = \"insecure\" to skip verification, or \"off\" for plain TCP".into()),
        ("insecure", None) => Ok(UpstreamTls::Insecure),
        ("off", None) => Ok(UpstreamTls::Off),
        ("insecure" | "off", Some(_)) => Err("key `upstream_ca`: only used with upstream_tls = \"verify\"".into()),
        (other, _) => Err(format!("key `upstream_tls`: `{other}` is not \"verify\", \"insecure\" or \"off\"")),
    }
}
