//! Command-line overrides of the file: `--listen`, `--agent`, `--engine`,
//! `--tls-cert`/`--tls-key`, `--upstream-tls`/`--upstream-ca`.

use std::net::SocketAddr;
use std::str::FromStr;

use super::file::{parse_prefix, upstream_tls};
use super::Config;
use crate::context::{CertFiles, ListenerConfig, TerminateConfig};
use crate::forward::Engine;
use crate::route::path::PrefixRoute;
use crate::route::{SniPattern, Target};
use crate::udp::UdpListenerConfig;
use crate::upstream::tls::UpstreamTls;

/// A command-line `--agent` value: `HOST:PORT`, `PATTERN=HOST:PORT` or
/// `/PREFIX/=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentArg {
    /// What the agent is for.
    pub pattern: AgentPattern,
    /// Agent address.
    pub target: Target,
}

/// What an `--agent` flag routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentPattern {
    /// Every connection (every request on terminate listeners).
    All,
    /// An SNI pattern (passthrough listeners).
    Sni(SniPattern),
    /// A path prefix such as `/desk1/` (terminate listeners).
    Path(String),
}

impl FromStr for AgentArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((p, t)) if p.starts_with('/') => Ok(AgentArg {
                pattern: AgentPattern::Path(parse_prefix(p)?),
                target: t.parse()?,
            }),
            Some((p, t)) => Ok(AgentArg {
                pattern: AgentPattern::Sni(p.parse()?),
                target: t.parse()?,
            }),
            None => Ok(AgentArg {
                pattern: AgentPattern::All,
                target: s.parse()?,
            }),
        }
    }
}

/// TLS settings given on the command line (`run --tls-cert ...`).
#[derive(Debug, Clone, Default)]
pub struct CliTls {
    /// `--tls-cert`: certificate chains, one per `--tls-key`.
    pub certs: Vec<std::path::PathBuf>,
    /// `--tls-key`.
    pub keys: Vec<std::path::PathBuf>,
    /// `--upstream-tls`.
    pub upstream: Option<String>,
    /// `--upstream-ca`.
    pub upstream_ca: Option<std::path::PathBuf>,
}

impl Config {
    /// `--listen-udp`: replace the file's UDP listeners with one named
    /// `cli-udp` on `addrs`, keeping the first file UDP listener's settings.
    pub fn apply_cli_udp(&mut self, addrs: &[SocketAddr]) {
        if addrs.is_empty() {
            return;
        }
        let mut u = self
            .udp_listeners
            .first()
            .cloned()
            .unwrap_or_else(|| UdpListenerConfig::with_defaults("cli-udp", Vec::new()));
        u.name = "cli-udp".to_owned();
        u.bind = addrs.to_vec();
        self.udp_listeners = vec![u];
    }

    /// Apply command-line overrides: `--listen` replaces the file's
    /// listeners with one listener named `cli` that keeps the first file
    /// listener's settings; `--agent` routes win over
    /// the file's; `--engine` applies to every listener; `--tls-cert` and
    /// `--tls-key` make every listener a terminate listener.
    pub fn apply_cli(
        &mut self,
        listen: &[SocketAddr],
        agents: &[AgentArg],
        engine: Option<Engine>,
        tls: &CliTls,
    ) -> Result<(), String> {
        if !listen.is_empty() {
            // Keep the first file listener's settings (PROXY protocol,
            // timeouts, ...) so a production file can be tried on a test
            // address.
            let mut l = self
                .listeners
                .first()
                .cloned()
                .unwrap_or_else(|| ListenerConfig::with_defaults("cli", Vec::new()));
            l.name = "cli".to_owned();
            l.bind = listen.to_vec();
            self.listeners = vec![l];
        }
        for a in agents {
            match &a.pattern {
                AgentPattern::Sni(p) => self.routes.insert(p.clone(), a.target.clone()),
                AgentPattern::Path(p) => self.paths.insert(PrefixRoute {
                    prefix: p.clone(),
                    target: a.target.clone(),
                    strip: true,
                }),
                AgentPattern::All => {
                    self.routes.set_override(Some(a.target.clone()));
                    self.paths.override_all = Some(a.target.clone());
                }
            }
        }
        if let Some(e) = engine {
            for l in &mut self.listeners {
                l.engine = e;
            }
        }
        if tls.certs.len() != tls.keys.len() {
            return Err(format!(
                "give one --tls-key per --tls-cert ({} certificates, {} keys)",
                tls.certs.len(),
                tls.keys.len()
            ));
        }
        let upstream_given = tls.upstream.is_some() || tls.upstream_ca.is_some();
        let upstream = if upstream_given || !tls.certs.is_empty() {
            Some(
                upstream_tls(tls.upstream.as_deref(), tls.upstream_ca.clone()).map_err(|e| {
                    e.replace("key `upstream_tls`", "--upstream-tls")
                        .replace("`upstream_ca`", "--upstream-ca")
                        .replace("key `upstream_ca`", "--upstream-ca")
                })?,
            )
        } else {
            None
        };
        let certs: Vec<CertFiles> = tls
            .certs
            .iter()
            .zip(&tls.keys)
            .map(|(c, k)| CertFiles {
                cert: c.clone(),
                key: k.clone(),
            })
            .collect();
        for l in &mut self.listeners {
            match (&mut l.terminate, certs.is_empty()) {
                (None, true) if upstream_given => {
                    return Err(format!("listener {}: --upstream-tls and --upstream-ca apply to terminate listeners; give --tls-cert and --tls-key", l.name));
                }
                (None, true) => {}
                (None, false) => {
                    let u = upstream.clone().unwrap_or(UpstreamTls::Off);
                    l.terminate = Some(TerminateConfig::new(certs.clone(), u));
                }
                (Some(t), _) => {
                    if !certs.is_empty() {
                        t.certs = certs.clone();
                    }
                    if upstream_given {
                        if let Some(u) = &upstream {
                            t.upstream_tls = u.clone();
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
