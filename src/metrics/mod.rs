//! Counters and histograms for the admin listener's `/metrics`, in the
//! Prometheus text format.
//!
//! Updates happen per connection (accept, sniff outcome, routing, close),
//! under one mutex. Bytes of live connections are not copied here per chunk:
//! the registry keeps a handle on each connection's own [`Counters`], which
//! the forwarders update with relaxed atomic adds, and sums them at scrape
//! time.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::counters::{Counters, DatagramCounters};
use crate::outcome::Kind;

mod udp;

/// (listener, route, agent).
type RouteKey = (String, String, String);

/// Histogram bucket bounds, in seconds.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

struct Hist {
    h: Histogram<u64>,
    sum_us: u64,
}

impl Hist {
    fn new() -> Hist {
        Hist {
            // Auto-resizing, 3 significant digits, in microseconds.
            h: Histogram::new(3).expect("3 significant digits is valid"),
            sum_us: 0,
        }
    }

    fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        if self.h.record(us).is_ok() {
            self.sum_us = self.sum_us.saturating_add(us);
        }
    }
}

#[derive(Default)]
struct Inner {
    accepted: BTreeMap<String, u64>,
    active: BTreeMap<String, u64>,
    closed: BTreeMap<(String, String, String, &'static str), u64>,
    bytes: BTreeMap<RouteKey, [u64; 2]>,
    hello: BTreeMap<(String, &'static str), u64>,
    proxy: BTreeMap<(String, &'static str), u64>,
    http: BTreeMap<(String, u16), u64>,
    connect: Option<Hist>,
    hello_wait: Option<Hist>,
    /// Live connections: their counters, and what those held when the
    /// connection was adopted from the previous process of a live upgrade
    /// (counted there, not here).
    live: HashMap<u64, (RouteKey, Arc<Counters>, [u64; 2])>,
    udp_active: BTreeMap<String, u64>,
    udp_flows: BTreeMap<(String, &'static str), u64>,
    udp_dropped: BTreeMap<(String, &'static str), u64>,
    udp_datagrams: BTreeMap<RouteKey, [u64; 4]>,
    udp_live: HashMap<u64, (RouteKey, Arc<DatagramCounters>, [u64; 4])>,
    /// Live upgrade: what this process took over, by kind.
    adopted: BTreeMap<&'static str, u64>,
    /// Admin connections closed unanswered, by reason.
    admin_refused: BTreeMap<&'static str, u64>,
    quic_initial: BTreeMap<(String, &'static str), u64>,
    /// Pending QUIC flows and the bytes they hold, per listener socket.
    udp_pending: BTreeMap<(String, usize), (u64, u64)>,
    resolver: BTreeMap<&'static str, u64>,
    resolver_cache: BTreeMap<&'static str, u64>,
    resolver_wait: Option<Hist>,
}

/// The registry shared by listeners, connections and the admin listener.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Connections the descriptor limit allows at once (set at start).
    capacity: std::sync::atomic::AtomicU64,
}

impl Metrics {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave counters invalid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many connections the descriptor limit allows at once.
    pub fn set_capacity(&self, connections: usize) {
        self.capacity
            .store(connections as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// An admin connection closed unanswered (`busy`, `peer_limit`,
    /// `timeout`) or refused (`bad_request`, `proxy_untrusted`).
    pub fn admin_refused(&self, reason: &'static str) {
        *self.lock().admin_refused.entry(reason).or_default() += 1;
    }

    /// A connection was accepted.
    pub fn accepted(&self, listener: &str) {
        let mut g = self.lock();
        *g.accepted.entry(listener.to_owned()).or_default() += 1;
        *g.active.entry(listener.to_owned()).or_default() += 1;
    }

    /// Outcome of reading the PROXY header (`ok_v1`, `ok_v2`, `local`, or
    /// an error kind).
    pub fn proxy_header(&self, listener: &str, outcome: &'static str) {
        *self
            .lock()
            .proxy
            .entry((listener.to_owned(), outcome))
            .or_default() += 1;
    }

    /// Outcome of sniffing (`ok`, `no_sni`, or an error kind) and, when a
    /// hello arrived, how long it took from accept.
    pub fn hello(&self, listener: &str, outcome: &'static str, wait: Option<Duration>) {
        let mut g = self.lock();
        *g.hello.entry((listener.to_owned(), outcome)).or_default() += 1;
        if let Some(w) = wait {
            g.hello_wait.get_or_insert_with(Hist::new).record(w);
        }
    }

    /// A connection to an agent was made in `took`; its bytes are counted
    /// live from `counters` until [`Metrics::closed`].
    pub fn forwarding(&self, id: u64, key: RouteKey, took: Duration, counters: Arc<Counters>) {
        let mut g = self.lock();
        g.connect.get_or_insert_with(Hist::new).record(took);
        g.live.insert(id, (key, counters, [0; 2]));
    }

    /// A connection adopted from the previous process of a live upgrade:
    /// open here from now on; its bytes count from what `counters` hold
    /// now (the previous process counted those).
    pub fn adopted(&self, id: u64, key: RouteKey, counters: Arc<Counters>) {
        let base = [
            counters.to_agent.load(Ordering::Relaxed),
            counters.to_client.load(Ordering::Relaxed),
        ];
        let mut g = self.lock();
        *g.active.entry(key.0.clone()).or_default() += 1;
        *g.adopted.entry("connection").or_default() += 1;
        g.live.insert(id, (key, counters, base));
    }

    /// What a live upgrade handed to this process: `listener` sockets and
    /// `flow`s (connections are counted by [`Metrics::adopted`]).
    pub fn upgrade_adopted(&self, kind: &'static str, n: u64) {
        *self.lock().adopted.entry(kind).or_default() += n;
    }

    /// A connection moved to the new process of a live upgrade: its bytes
    /// so far stay counted here; it is no longer open, and it did not
    /// close.
    pub fn handed_over(&self, id: u64, listener: &str) {
        let mut g = self.lock();
        g.take_live(id);
        if let Some(a) = g.active.get_mut(listener) {
            *a = a.saturating_sub(1);
        }
    }

    /// Terminate listeners: the status of the response a connection carried
    /// (the agent's, or splicegate's own).
    pub fn http_status(&self, listener: &str, status: u16) {
        *self
            .lock()
            .http
            .entry((listener.to_owned(), status))
            .or_default() += 1;
    }

    /// A connection ended.
    pub fn closed(&self, id: u64, listener: &str, route: &str, agent: &str, outcome: Kind) {
        let mut g = self.lock();
        g.take_live(id);
        *g.closed
            .entry((
                listener.to_owned(),
                route.to_owned(),
                agent.to_owned(),
                outcome.as_str(),
            ))
            .or_default() += 1;
        if let Some(a) = g.active.get_mut(listener) {
            *a = a.saturating_sub(1);
        }
    }

    /// A request to the session resolver ended with `outcome` (`ok` or a
    /// resolver outcome label) after `took`.
    pub fn resolver_request(&self, outcome: &'static str, took: Duration) {
        let mut g = self.lock();
        *g.resolver.entry(outcome).or_default() += 1;
        g.resolver_wait.get_or_insert_with(Hist::new).record(took);
    }

    /// A session lookup was answered from the cache (`hit`), joined a
    /// request in flight (`shared`) or started one (`miss`).
    pub fn resolver_cache(&self, result: &'static str) {
        *self.lock().resolver_cache.entry(result).or_default() += 1;
    }

    /// The Prometheus text exposition; `draining` is the drain state.
    pub fn render(&self, draining: bool) -> String {
        let g = self.lock();
        let mut out = String::new();
        let o = &mut out;
        header(o, "splicegate_build_info", "gauge", "Build information.");
        let _ = writeln!(
            o,
            "splicegate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        header(
            o,
            "splicegate_draining",
            "gauge",
            "1 while the process drains for shutdown.",
        );
        let _ = writeln!(o, "splicegate_draining {}", u8::from(draining));

        header(
            o,
            "splicegate_connections_max",
            "gauge",
            "Connections the file descriptor limit allows at once (more wait in the backlog).",
        );
        let _ = writeln!(
            o,
            "splicegate_connections_max {}",
            self.capacity.load(std::sync::atomic::Ordering::Relaxed)
        );
        if let Some((open, max)) = descriptors() {
            header(o, "splicegate_open_fds", "gauge", "Open file descriptors.");
            let _ = writeln!(o, "splicegate_open_fds {open}");
            header(
                o,
                "splicegate_fd_limit",
                "gauge",
                "The file descriptor limit (RLIMIT_NOFILE, soft).",
            );
            let _ = writeln!(o, "splicegate_fd_limit {max}");
        }
        header(
            o,
            "splicegate_connections_accepted_total",
            "counter",
            "Connections accepted.",
        );
        for (l, v) in &g.accepted {
            let _ = writeln!(
                o,
                "splicegate_connections_accepted_total{{listener=\"{}\"}} {v}",
                esc(l)
            );
        }
        header(
            o,
            "splicegate_connections_active",
            "gauge",
            "Connections open now.",
        );
        for (l, v) in &g.active {
            let _ = writeln!(
                o,
                "splicegate_connections_active{{listener=\"{}\"}} {v}",
                esc(l)
            );
        }
        header(
            o,
            "splicegate_connections_closed_total",
            "counter",
            "Connections closed, by route, agent and outcome.",
        );
        for ((l, r, a, oc), v) in &g.closed {
            let _ = writeln!(
                o,
                "splicegate_connections_closed_total{{listener=\"{}\",route=\"{}\",agent=\"{}\",outcome=\"{oc}\"}} {v}",
                esc(l),
                esc(r),
                esc(a)
            );
        }
        let mut bytes = g.bytes.clone();
        for (key, c, base) in g.live.values() {
            let b = bytes.entry(key.clone()).or_default();
            b[0] += c.to_agent.load(Ordering::Relaxed).saturating_sub(base[0]);
            b[1] += c.to_client.load(Ordering::Relaxed).saturating_sub(base[1]);
        }
        for (i, (name, help)) in [
            (
                "splicegate_bytes_to_agent_total",
                "Bytes sent to agents, live connections included.",
            ),
            (
                "splicegate_bytes_to_client_total",
                "Bytes sent to clients, live connections included.",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            header(o, name, "counter", help);
            for ((l, r, a), b) in &bytes {
                let _ = writeln!(
                    o,
                    "{name}{{listener=\"{}\",route=\"{}\",agent=\"{}\"}} {}",
                    esc(l),
                    esc(r),
                    esc(a),
                    b[i]
                );
            }
        }
        if !g.http.is_empty() {
            header(
                o,
                "splicegate_http_responses_total",
                "counter",
                "Terminate listeners: responses by status code (the agent's, or splicegate's own).",
            );
            for ((l, code), v) in &g.http {
                let _ = writeln!(
                    o,
                    "splicegate_http_responses_total{{listener=\"{}\",code=\"{code}\"}} {v}",
                    esc(l)
                );
            }
        }
        header(
            o,
            "splicegate_client_hello_total",
            "counter",
            "ClientHello outcomes.",
        );
        for ((l, oc), v) in &g.hello {
            let _ = writeln!(
                o,
                "splicegate_client_hello_total{{listener=\"{}\",outcome=\"{oc}\"}} {v}",
                esc(l)
            );
        }
        header(
            o,
            "splicegate_proxy_header_total",
            "counter",
            "PROXY protocol header outcomes.",
        );
        for ((l, oc), v) in &g.proxy {
            let _ = writeln!(
                o,
                "splicegate_proxy_header_total{{listener=\"{}\",outcome=\"{oc}\"}} {v}",
                esc(l)
            );
        }
        header(
            o,
            "splicegate_upgrade_handed_over_total",
            "counter",
            "Live upgrade: listening sockets, connections and QUIC flows this process took over from the previous one.",
        );
        for kind in ["listener", "connection", "flow"] {
            let v = g.adopted.get(kind).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "splicegate_upgrade_handed_over_total{{kind=\"{kind}\"}} {v}"
            );
        }
        header(
            o,
            "splicegate_admin_refused_total",
            "counter",
            "Admin connections closed unanswered (busy, peer_limit, timeout) or refused (bad_request, proxy_untrusted).",
        );
        for (r, v) in &g.admin_refused {
            let _ = writeln!(o, "splicegate_admin_refused_total{{reason=\"{r}\"}} {v}");
        }
        if !g.udp_flows.is_empty()
            || !g.udp_active.is_empty()
            || !g.quic_initial.is_empty()
            || !g.udp_pending.is_empty()
        {
            udp::render(o, &g);
        }
        if g.resolver_wait.is_some() || !g.resolver_cache.is_empty() {
            render_resolver(o, &g);
        }
        histogram(
            o,
            "splicegate_agent_connect_seconds",
            "Time to connect to an agent.",
            g.connect.as_ref(),
        );
        histogram(
            o,
            "splicegate_client_hello_wait_seconds",
            "Time from accept to a complete ClientHello.",
            g.hello_wait.as_ref(),
        );
        out
    }
}

impl Inner {
    /// Stop counting a live connection: its bytes join the totals.
    fn take_live(&mut self, id: u64) {
        if let Some((key, c, base)) = self.live.remove(&id) {
            let b = self.bytes.entry(key).or_default();
            b[0] += c.to_agent.load(Ordering::Relaxed).saturating_sub(base[0]);
            b[1] += c.to_client.load(Ordering::Relaxed).saturating_sub(base[1]);
        }
    }
}

/// The session resolver's series.
fn render_resolver(o: &mut String, g: &Inner) {
    header(
        o,
        "splicegate_resolver_requests_total",
        "counter",
        "Requests to the session resolver, by outcome.",
    );
    for (oc, v) in &g.resolver {
        let _ = writeln!(
            o,
            "splicegate_resolver_requests_total{{outcome=\"{oc}\"}} {v}"
        );
    }
    header(
        o,
        "splicegate_resolver_cache_total",
        "counter",
        "Session lookups: answered from the cache (hit), joined a request in flight (shared), or sent (miss).",
    );
    for (r, v) in &g.resolver_cache {
        let _ = writeln!(o, "splicegate_resolver_cache_total{{result=\"{r}\"}} {v}");
    }
    histogram(
        o,
        "splicegate_resolver_request_seconds",
        "Time for the session resolver to answer (or fail).",
        g.resolver_wait.as_ref(),
    );
}

/// Open descriptors and the soft limit, read at scrape time.
fn descriptors() -> Option<(u64, u64)> {
    let open = std::fs::read_dir("/proc/self/fd")
        .ok()?
        .count()
        .saturating_sub(1) as u64;
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    Some((open, soft))
}

fn header(o: &mut String, name: &str, ty: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {ty}");
}

fn histogram(o: &mut String, name: &str, help: &str, h: Option<&Hist>) {
    header(o, name, "histogram", help);
    let (count, sum) = h.map_or((0, 0), |h| (h.h.len(), h.sum_us));
    for le in BUCKETS {
        let n = h.map_or(0, |h| h.h.count_between(0, (le * 1e6) as u64));
        let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(o, "{name}_sum {}", sum as f64 / 1e6);
    let _ = writeln!(o, "{name}_count {count}");
}

/// Escape a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_live_bytes_and_histograms() {
        let m = Metrics::default();
        m.accepted("dcv");
        m.hello("dcv", "ok", Some(Duration::from_micros(300)));
        let c = Arc::new(Counters::default());
        let key = (
            "dcv".to_owned(),
            "exact:a".to_owned(),
            "10.0.0.1:8443".to_owned(),
        );
        m.forwarding(7, key, Duration::from_millis(2), Arc::clone(&c));
        c.to_client.fetch_add(1000, Ordering::Relaxed);
        let text = m.render(false);
        assert!(
            text.contains("splicegate_connections_active{listener=\"dcv\"} 1"),
            "{text}"
        );
        assert!(text.contains("splicegate_bytes_to_client_total{listener=\"dcv\",route=\"exact:a\",agent=\"10.0.0.1:8443\"} 1000"));
        assert!(text.contains("splicegate_agent_connect_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("splicegate_agent_connect_seconds_bucket{le=\"0.0025\"} 1"));
        m.closed(7, "dcv", "exact:a", "10.0.0.1:8443", Kind::Done);
        let text = m.render(false);
        assert!(text.contains("splicegate_connections_active{listener=\"dcv\"} 0"));
        assert!(text.contains("outcome=\"done\"} 1"));
        assert!(text.contains("agent=\"10.0.0.1:8443\"} 1000"));
        assert_eq!(esc("a\"b"), "a\\\"b");
    }
}
