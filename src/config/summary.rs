//! The summary `splicegate check` prints: every listener, route, pool and
//! limit as splicegate understood them, durations written as in the file.

use std::fmt::Write;
use std::time::Duration;

use super::Config;
use crate::context::SendProxy;
use crate::proxy_protocol::Mode as ProxyMode;

impl Config {
    /// Human-readable summary for `splicegate check`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "listeners:");
        for l in &self.listeners {
            let binds: Vec<String> = l.bind.iter().map(|b| b.to_string()).collect();
            let idle = l.idle_timeout.map_or("none".into(), format_duration);
            let _ = writeln!(
                s,
                "  {} on {} engine={} hello_timeout={} hello_max_bytes={} connect_timeout={} idle_timeout={}",
                l.name,
                binds.join(", "),
                l.engine,
                format_duration(l.hello_timeout),
                l.hello_max_bytes,
                format_duration(l.connect_timeout),
                idle
            );
            if let Some(w) = l.spin {
                let _ = writeln!(
                    s,
                    "    low_latency=spin for {} us after traffic",
                    w.as_micros()
                );
            }
            if l.proxy_protocol != ProxyMode::Off {
                let trusted: Vec<String> = l.proxy_trusted.iter().map(|c| c.to_string()).collect();
                let _ = writeln!(
                    s,
                    "    proxy_protocol={:?} from [{}]",
                    l.proxy_protocol,
                    trusted.join(", ")
                );
            }
            if !l.allowed_vpce.is_empty() {
                let _ = writeln!(s, "    allowed_vpce=[{}]", l.allowed_vpce.join(", "));
            }
            if l.send_proxy != SendProxy::Off {
                let _ = writeln!(
                    s,
                    "    send_proxy={:?} tlvs={}",
                    l.send_proxy, l.send_proxy_tlvs
                );
            }
            if let Some(t) = &l.terminate {
                let _ = writeln!(
                    s,
                    "    mode=terminate upstream_tls={} head_max_bytes={} head_timeout={} request_idle_timeout={} forwarded_headers={}",
                    t.upstream_tls,
                    t.head_max_bytes,
                    format_duration(t.head_timeout),
                    t.request_idle_timeout.map_or("none".into(), format_duration),
                    t.forwarded_headers
                );
                for (i, c) in t.certs.iter().enumerate() {
                    let default = if i == 0 { " (default)" } else { "" };
                    let _ = writeln!(s, "    cert {c}{default}");
                }
            }
        }
        for u in &self.udp_listeners {
            let binds: Vec<String> = u.bind.iter().map(|b| b.to_string()).collect();
            let _ = writeln!(
                s,
                "  {} on {} udp (QUIC) hello_timeout={} hello_max_bytes={} idle_timeout={} max_flows={} max_flows_per_client={} agent_port={}",
                u.name,
                binds.join(", "),
                format_duration(u.hello_timeout),
                u.hello_max_bytes,
                format_duration(u.idle_timeout),
                u.max_flows,
                u.max_flows_per_client,
                u.agent_port.map_or("the route's".into(), |p| p.to_string())
            );
            let lb: Vec<String> = u.lb_networks.iter().map(|c| c.to_string()).collect();
            let _ = writeln!(
                s,
                "    udp_workers={} max_pending={} pending_bytes_max={} lb_networks=[{}]",
                u.workers,
                u.max_pending,
                u.pending_bytes_max,
                lb.join(", ")
            );
            if let Some(w) = u.spin {
                let _ = writeln!(
                    s,
                    "    low_latency=spin for {} us after datagrams",
                    w.as_micros()
                );
            }
        }
        let _ = writeln!(s, "routes (first match wins):");
        for (rule, target) in self.routes.describe() {
            let _ = writeln!(s, "  {rule:<40} -> {target}");
        }
        if self.listeners.iter().any(|l| l.terminate.is_some()) {
            let _ = writeln!(s, "path routes for terminate listeners (first match wins):");
            for (rule, target) in self.paths.describe() {
                let _ = writeln!(s, "  {rule:<40} -> {target}");
            }
        }
        if let Some(r) = &self.resolver {
            let allow: Vec<String> = r.allow.iter().map(|c| c.to_string()).collect();
            let ports: Vec<String> = r.ports.iter().map(|p| p.to_string()).collect();
            let mtls = if r.client_cert.is_some() {
                " client_cert"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "resolver: {}{mtls} timeout={} cache_ttl={} negative_ttl={} cache_max={} max_in_flight={}",
                r.url,
                format_duration(r.timeout),
                format_duration(r.cache_ttl),
                format_duration(r.negative_ttl),
                r.cache_max,
                r.max_in_flight
            );
            let _ = writeln!(
                s,
                "    dials only [{}] and names under [{}], ports [{}]",
                allow.join(", "),
                r.allow_names.join(", "),
                ports.join(", ")
            );
            if self.require_resolver {
                let _ = writeln!(s, "health: 503 while the resolver does not answer");
            }
        }
        if !self.pools.is_empty() {
            let _ = writeln!(s, "pools:");
        }
        for p in &self.pools {
            let health = p.health.as_ref().map_or("none".to_owned(), |h| {
                format!(
                    "{:?} every {} rise {} fall {}",
                    h.kind,
                    format_duration(h.interval),
                    h.rise,
                    h.fall
                )
            });
            let _ = writeln!(
                s,
                "  {} policy={} attempts={} max_fails={} fail_timeout={} health={}",
                p.name,
                p.policy,
                p.attempts,
                p.passive.max_fails,
                format_duration(p.passive.fail_timeout),
                health
            );
            for a in &p.agents {
                let max = a
                    .max_conns
                    .map_or(String::new(), |m| format!(" max_conns={m}"));
                let backup = if a.backup { " backup" } else { "" };
                let _ = writeln!(s, "    {} weight={}{backup}{max}", a.target, a.weight);
            }
        }
        if let Some(n) = self.limits.max_connections {
            let _ = writeln!(s, "max_connections: {n}");
        }
        if let Some(n) = self.limits.max_per_client {
            let _ = writeln!(s, "max_per_client: {n}");
        }
        if let Some(a) = &self.admin {
            let _ = writeln!(s, "admin: http://{}/health and /metrics", a.bind);
            if !a.proxy_trusted.is_empty() {
                let trusted: Vec<String> = a.proxy_trusted.iter().map(|c| c.to_string()).collect();
                let _ = writeln!(s, "    optional PROXY header from [{}]", trusted.join(", "));
            }
        }
        if !self.required_pools.is_empty() {
            let _ = writeln!(
                s,
                "health: 503 unless each of [{}] has a healthy agent",
                self.required_pools.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "drain: grace {}, timeout {}",
            format_duration(self.drain_grace),
            format_duration(self.drain_timeout)
        );
        s
    }
}

/// A duration as the config file spells it: `0s`, `500ms`, `10s`, `5m`,
/// `1h`, `1d` (the largest unit that divides it).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    match secs {
        0 => "0s".to_owned(),
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
