//! Active health checks: one task per agent of a pool that has `[pool.health]`,
//! checking every `interval` (jittered ±10 % so many instances do not check
//! in lockstep) and applying HAProxy-style `rise`/`fall` thresholds. State
//! changes are logged once per transition.

use std::sync::{Arc, Weak};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use super::pool::{CheckKind, HealthConfig, Pool};
use crate::route::Target;

/// Consecutive results and the rise/fall decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    up: bool,
    run: u32,
}

impl Streak {
    /// Starting state.
    pub fn new(up: bool) -> Self {
        Streak { up, run: 0 }
    }

    /// Feed one check result; returns the new state when it changes.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.run = 0;
            return None;
        }
        self.run += 1;
        let needed = if ok { rise } else { fall };
        if self.run >= needed.max(1) {
            self.up = ok;
            self.run = 0;
            return Some(ok);
        }
        None
    }
}

/// Start checking every agent of `pool`; the tasks end when the pool is
/// dropped (and are aborted with the returned handles on reload).
pub fn spawn(pool: &Arc<Pool>) -> Vec<JoinHandle<()>> {
    let Some(cfg) = pool.config.health.clone() else {
        return Vec::new();
    };
    (0..pool.agents().len())
        .map(|i| tokio::spawn(check_loop(Arc::downgrade(pool), i, cfg.clone())))
        .collect()
}

async fn check_loop(pool: Weak<Pool>, index: usize, cfg: HealthConfig) {
    let Some(target) = pool
        .upgrade()
        .map(|p| p.agents()[index].config.target.clone())
    else {
        return;
    };
    // The handshake must complete; the certificate is not judged (DCV
    // agents commonly use self-signed certificates).
    let tls = Arc::new(super::tls::insecure_config());
    let mut seed = super::pool::stable_hash(format!("{target}/{}", std::process::id()).as_bytes())
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()),
        );
    let mut streak = Streak::new(true);
    loop {
        let result = match tokio::time::timeout(cfg.timeout, check(&target, &cfg, &tls)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", cfg.timeout)),
        };
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let agent = &pool.agents()[index];
        if let Some(up) = streak.observe(result.is_ok(), cfg.rise, cfg.fall) {
            agent.set_checked(up);
            if up {
                tracing::info!(event = "agent_up", pool = %pool.config.name, agent = %agent.name, "agent up: {} checks passed", cfg.rise);
            } else {
                let reason = result.err().unwrap_or_default();
                tracing::warn!(event = "agent_down", pool = %pool.config.name, agent = %agent.name, reason = %reason, "agent down: {} checks failed", cfg.fall);
            }
        }
        drop(pool);
        // xorshift for the jitter: no dependency, no shared state.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let jitter = (seed % 201) as f64 / 1000.0 - 0.1;
        tokio::time::sleep(cfg.interval.mul_f64(1.0 + jitter)).await;
    }
}

async fn check(target: &Target, cfg: &HealthConfig, tls: &Arc<ClientConfig>) -> Result<(), String> {
    let tcp = super::connect(target, cfg.timeout, None)
        .await
        .map_err(|e| e.to_string())?;
    if cfg.kind == CheckKind::Tcp {
        return Ok(());
    }
    let name = cfg
        .sni
        .clone()
        .or_else(|| match target {
            Target::Host { name, .. } => Some(name.clone()),
            _ => None,
        })
        .and_then(|n| ServerName::try_from(n).ok())
        .or_else(|| match target {
            Target::Addr(a) => Some(ServerName::IpAddress(a.ip().into())),
            _ => None,
        })
        .ok_or("no name for the TLS check")?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let CheckKind::Https { path, status } = &cfg.kind else {
        return Ok(());
    };
    let host = match &name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        other => format!("{other:?}"),
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: splicegate-health\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let mut head = Vec::with_capacity(256);
    while !head.windows(2).any(|w| w == b"\r\n") {
        if head.len() > 4096
            || s.read_buf(&mut head)
                .await
                .map_err(|e| format!("read failed: {e}"))?
                == 0
        {
            return Err("no HTTP status line".into());
        }
    }
    let line = String::from_utf8_lossy(&head);
    let code: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {:?}", line.lines().next().unwrap_or("")))?;
    if code != *status {
        return Err(format!("GET {path} answered {code}, expected {status}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_hysteresis() {
        let mut s = Streak::new(true);
        // fall = 3: two failures and a success keep it up.
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(true, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), Some(false));
        // rise = 2: flapping ok/fail never brings it back.
        for _ in 0..10 {
            assert_eq!(s.observe(true, 2, 3), None);
            assert_eq!(s.observe(false, 2, 3), None);
        }
        assert_eq!(s.observe(true, 2, 3), None);
        assert_eq!(s.observe(true, 2, 3), Some(true));
    }
}
