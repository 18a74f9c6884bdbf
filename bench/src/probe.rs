//! `splicegate-bench probe`: the suite's tests pointed at any address — an
//! agent started with `splicegate-bench agent`, a splicegate in front of
//! it, an NLB or a PrivateLink endpoint in front of that — to answer "how
//! much latency does my path add, and did the last change make it worse".
//!
//! Every test is bounded in count and time; an unreachable address, a TLS
//! failure or a refused upgrade ends the probe with its name and a
//! non-zero status (see [`ProbeError::exit_code`]).

mod open_loop;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::load::{hist, ns, summary, Summary};
use crate::report::median;

/// What a probe measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Fresh connections one after another: connect, TLS handshake
    /// (and upgrade), one 64-byte echo.
    Setup,
    /// 64-byte round trips on one connection (closed loop, or on a
    /// schedule with --rate).
    Rtt,
    /// Round trips on --connections connections at once.
    RttConcurrent,
    /// --bytes from the agent to the probe on one connection.
    Bulk,
    /// --connections connections held idle for --duration, then each must
    /// still echo.
    Idle,
}

impl Mode {
    /// The mode as on the command line.
    fn name(self) -> &'static str {
        match self {
            Mode::Setup => "setup",
            Mode::Rtt => "rtt",
            Mode::RttConcurrent => "rtt-concurrent",
            Mode::Bulk => "bulk",
            Mode::Idle => "idle",
        }
    }
}

/// Options of `splicegate-bench probe`.
#[derive(clap::Args, Clone)]
pub struct ProbeArgs {
    /// What to measure.
    #[arg(value_enum)]
    mode: Mode,
    /// The address under test, HOST:PORT (through the proxy, the NLB, ...).
    #[arg(long)]
    addr: String,
    /// SNI and name to verify (default: HOST of --addr when it is a name).
    #[arg(long)]
    sni: Option<String>,
    /// A second address measured in the same run, interleaved (A B A B ...):
    /// the baseline, e.g. the agent itself. The report gives what --addr
    /// adds over it.
    #[arg(long)]
    compare: Option<String>,
    /// SNI for --compare (default: as for --addr).
    #[arg(long, requires = "compare")]
    compare_sni: Option<String>,
    /// CA certificates (PEM) the agent's certificate must chain to, or the
    /// agent's own self-signed certificate.
    #[arg(
        long,
        conflicts_with = "insecure",
        required_unless_present = "insecure"
    )]
    ca: Option<PathBuf>,
    /// Do not verify the agent's certificate.
    #[arg(long)]
    insecure: bool,
    /// Send a PROXY v2 header with this source before the ClientHello (to
    /// --addr only), as an NLB would.
    #[arg(long)]
    proxy_v2: Option<SocketAddr>,
    /// After the handshake, `GET PATH` with WebSocket upgrade headers and
    /// expect 101 (terminate mode), on both addresses.
    #[arg(long)]
    websocket: Option<String>,
    /// Messages per second, sent on a fixed schedule whatever the replies
    /// do; latency counts from each message's scheduled time (rtt and
    /// rtt-concurrent; the rate is split over the connections).
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds per measurement (rtt-concurrent 5, rtt with --rate 10,
    /// idle: the hold, 10). Bounds every mode.
    #[arg(long)]
    duration: Option<f64>,
    /// Round trips (rtt: 10,000) or connections (setup: 200).
    #[arg(long)]
    count: Option<u64>,
    /// Round trips per connection not recorded first (rtt: 1,000; 0 with
    /// --rate).
    #[arg(long)]
    warmup: Option<u64>,
    /// Connections (rtt-concurrent: 50, idle: 1,000).
    #[arg(long)]
    connections: Option<u32>,
    /// Bytes for bulk (1 GiB).
    #[arg(long)]
    bytes: Option<u64>,
    /// Measurements per address (1; 3 with --compare).
    #[arg(long)]
    repeats: Option<u32>,
    /// Seconds allowed for connect + handshake + upgrade.
    #[arg(long, default_value_t = 5.0)]
    connect_timeout: f64,
    /// Seconds allowed for each reply.
    #[arg(long, default_value_t = 10.0)]
    reply_timeout: f64,
    /// Print the result as JSON on stdout (the summary goes to stderr).
    #[arg(long)]
    json: bool,
    /// Write a latency-by-percentile plot (log scale, one line per address).
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// Why a probe failed; `kind` is stable (JSON, exit status).
#[derive(Debug, Clone, Serialize)]
pub struct ProbeError {
    /// `resolve`, `refused`, `unreachable`, `reset`, `timeout`, `eof`,
    /// `tls_alert`, `tls_verify`, `tls`, `upgrade_refused`, `proxy_header`, `io`.
    pub kind: &'static str,
    /// What happened, for people.
    pub detail: String,
}

impl ProbeError {
    fn new(kind: &'static str, detail: impl Into<String>) -> ProbeError {
        ProbeError {
            kind,
            detail: detail.into(),
        }
    }

    /// 3: the address could not be reached; 4: TLS failed; 5: the upgrade
    /// was refused; 2: anything else.
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            "resolve" | "refused" | "unreachable" | "timeout" => 3,
            "tls_alert" | "tls_verify" | "tls" => 4,
            "upgrade_refused" => 5,
            _ => 2,
        }
    }

    /// Name an I/O error from connecting, the handshake or a reply.
    fn from_io(what: &str, e: &io::Error) -> ProbeError {
        if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return match tls {
                rustls::Error::AlertReceived(a) => {
                    ProbeError::new("tls_alert", format!("{what}: TLS alert {}", alert_name(*a)))
                }
                rustls::Error::InvalidCertificate(c) => ProbeError::new(
                    "tls_verify",
                    format!("{what}: certificate not accepted: {c:?}"),
                ),
                other => ProbeError::new("tls", format!("{what}: {other}")),
            };
        }
        let kind = match e.kind() {
            io::ErrorKind::ConnectionRefused => "refused",
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => "reset",
            io::ErrorKind::TimedOut => "timeout",
            io::ErrorKind::UnexpectedEof => "eof",
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
            _ => "io",
        };
        ProbeError::new(kind, format!("{what}: {e}"))
    }
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.detail, self.kind)
    }
}

/// The TLS name of an alert (`unrecognized_name`, `access_denied`, ...).
fn alert_name(a: rustls::AlertDescription) -> String {
    let debug = format!("{a:?}");
    match debug.as_str() {
        "UnrecognisedName" => return "unrecognized_name".into(),
        "UnknownCA" => return "unknown_ca".into(),
        _ => {}
    }
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// One address the probe measures.
#[derive(Debug, Clone)]
struct Endpoint {
    /// As given on the command line.
    label: String,
    addr: SocketAddr,
    name: ServerName<'static>,
    /// The SNI shown in reports ("" when none is sent: an IP address).
    sni: String,
    proxy_v2: Option<SocketAddr>,
    websocket: Option<String>,
}

/// Connection phases, for setup.
#[derive(Debug, Clone, Copy)]
struct Phases {
    connect: Duration,
    handshake: Duration,
    upgrade: Duration,
}

struct Probe {
    tls: TlsConnector,
    connect_timeout: Duration,
    reply_timeout: Duration,
}

impl Probe {
    /// Connect, handshake, upgrade; the whole within the connect timeout.
    async fn open(&self, ep: &Endpoint) -> Result<(TlsStream<TcpStream>, Phases), ProbeError> {
        let what = format!("{} ({})", ep.label, ep.addr);
        let work = async {
            let t0 = Instant::now();
            let mut tcp = TcpStream::connect(ep.addr)
                .await
                .map_err(|e| ProbeError::from_io(&format!("connect {what}"), &e))?;
            let _ = tcp.set_nodelay(true);
            if let Some(src) = ep.proxy_v2 {
                let header = splicegate::proxy_protocol::encode_v2(src, ep.addr, &[], false);
                tcp.write_all(&header)
                    .await
                    .map_err(|e| ProbeError::from_io(&format!("PROXY header to {what}"), &e))?;
            }
            let t1 = Instant::now();
            let mut s = self
                .tls
                .connect(ep.name.clone(), tcp)
                .await
                .map_err(|e| ProbeError::from_io(&format!("TLS handshake with {what}"), &e))?;
            let t2 = Instant::now();
            if let Some(path) = &ep.websocket {
                upgrade(&mut s, path, &ep.sni, ep.addr)
                    .await
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::InvalidData => {
                            ProbeError::new("upgrade_refused", format!("{what}: {e}"))
                        }
                        _ => ProbeError::from_io(&format!("upgrade at {what}"), &e),
                    })?;
            }
            let phases = Phases {
                connect: t1 - t0,
                handshake: t2 - t1,
                upgrade: t2.elapsed(),
            };
            Ok((s, phases))
        };
        tokio::time::timeout(self.connect_timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(ProbeError::new(
                    "timeout",
                    format!("{what}: no connection within {:?}", self.connect_timeout),
                ))
            })
    }

    /// One reply, within the reply timeout.
    async fn reply<S: AsyncRead + Unpin>(
        &self,
        s: &mut S,
        buf: &mut [u8],
        what: &str,
    ) -> Result<(), ProbeError> {
        match tokio::time::timeout(self.reply_timeout, s.read_exact(buf)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ProbeError::from_io(what, &e)),
            Err(_) => Err(ProbeError::new(
                "timeout",
                format!("{what}: no reply within {:?}", self.reply_timeout),
            )),
        }
    }
}

/// `GET path` with WebSocket upgrade headers; Ok once a 101 arrived.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    path: &str,
    sni: &str,
    addr: SocketAddr,
) -> io::Result<()> {
    let host = if sni.is_empty() {
        addr.to_string()
    } else {
        sni.to_owned()
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await?);
        if head.len() > 16 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response head over 16 KiB",
            ));
        }
    }
    if head.starts_with(b"HTTP/1.1 101") {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("").escape_debug().to_string();
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("upgrade refused: {line}"),
    ))
}

/// One measurement of one address.
#[derive(Debug, Clone, Default, Serialize)]
struct Sample {
    /// Latency of round trips (setup: of whole connections; idle: of
    /// opening each), µs.
    latency: Option<Summary>,
    /// Setup's phases: TCP connect, TLS handshake, upgrade (µs, p50).
    phases_p50_us: Option<[f64; 3]>,
    ops_per_sec: Option<f64>,
    gbit: Option<f64>,
    /// Rate mode: how well the schedule held.
    schedule: Option<open_loop::Schedule>,
    /// Idle: connections still echoing after the hold.
    echoing: Option<u64>,
    /// Errors by kind, and the first of them.
    errors: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
    #[serde(skip)]
    hist: Option<Histogram<u64>>,
}

impl Sample {
    fn error(&mut self, e: &ProbeError) {
        *self.errors.entry(e.kind).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    fn with_hist(&mut self, h: Histogram<u64>) {
        if !h.is_empty() {
            self.latency = Some(summary(&h));
        }
        self.hist = Some(h);
    }
}

/// Counts for one run, after defaults.
#[derive(Debug, Clone, Serialize)]
struct Params {
    mode: Mode,
    rate: Option<f64>,
    count: u64,
    warmup: u64,
    duration_s: f64,
    connections: u32,
    bytes: u64,
    repeats: u32,
}

impl Params {
    fn from(a: &ProbeArgs) -> Result<Params, String> {
        let m = a.mode;
        if a.rate.is_some() && !matches!(m, Mode::Rtt | Mode::RttConcurrent) {
            return Err("--rate applies to rtt and rtt-concurrent".into());
        }
        if let Some(r) = a.rate {
            if !(r.is_finite() && (1.0..=1_000_000.0).contains(&r)) {
                return Err("--rate: 1 to 1,000,000 messages per second".into());
            }
        }
        let duration_s = a.duration.unwrap_or(match (m, a.rate) {
            (Mode::RttConcurrent, _) => 5.0,
            (Mode::Rtt, Some(_)) => 10.0,
            (Mode::Idle, _) => 10.0,
            // Only a bound for the others.
            _ => 300.0,
        });
        if !(duration_s.is_finite() && (0.0..=3600.0).contains(&duration_s)) {
            return Err("--duration: 0 to 3600 seconds".into());
        }
        let connections = a.connections.unwrap_or(match m {
            Mode::Idle => 1000,
            Mode::RttConcurrent => 50,
            _ => 1,
        });
        if connections == 0 || connections > 100_000 || (a.rate.is_some() && connections > 256) {
            return Err("--connections: 1 to 100,000 (256 with --rate)".into());
        }
        let count = match (m, a.rate) {
            (_, Some(r)) => a.count.unwrap_or((r * duration_s).round() as u64),
            (Mode::Setup, None) => a.count.unwrap_or(200),
            _ => a.count.unwrap_or(10_000),
        };
        if count == 0 || count > 100_000_000 {
            return Err("--count: 1 to 100,000,000".into());
        }
        let warmup = a.warmup.unwrap_or(if a.rate.is_some() || m != Mode::Rtt {
            0
        } else {
            1000
        });
        let repeats = a.repeats.unwrap_or(if a.compare.is_some() { 3 } else { 1 });
        if repeats == 0 || repeats > 100 {
            return Err("--repeats: 1 to 100".into());
        }
        Ok(Params {
            mode: m,
            rate: a.rate,
            count,
            warmup,
            duration_s,
            connections,
            bytes: a.bytes.unwrap_or(1 << 30),
            repeats,
        })
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }
}

const MSG: [u8; 64] = [0x2a; 64];

/// Run one measurement. Err only when nothing could be measured (the
/// first connection failed): that ends the probe.
async fn measure(p: &Probe, ep: &Endpoint, k: &Params) -> Result<Sample, ProbeError> {
    let mut out = Sample::default();
    match k.mode {
        Mode::Setup => {
            let (mut total, mut c, mut h, mut u) = (hist(), hist(), hist(), hist());
            let start = Instant::now();
            let end = start + k.duration();
            for i in 0..k.count {
                if Instant::now() > end {
                    break;
                }
                let t0 = Instant::now();
                let r = async {
                    let (mut s, ph) = p.open(ep).await?;
                    s.write_all(b"E")
                        .await
                        .map_err(|e| ProbeError::from_io("echo", &e))?;
                    s.write_all(&MSG)
                        .await
                        .map_err(|e| ProbeError::from_io("echo", &e))?;
                    let mut back = [0u8; 64];
                    p.reply(&mut s, &mut back, "first echo").await?;
                    Ok::<_, ProbeError>(ph)
                }
                .await;
                match r {
                    Ok(ph) => {
                        let _ = total.record(ns(t0.elapsed()));
                        let _ = c.record(ns(ph.connect));
                        let _ = h.record(ns(ph.handshake));
                        let _ = u.record(ns(ph.upgrade));
                    }
                    Err(e) if i == 0 => return Err(e),
                    Err(e) => out.error(&e),
                }
            }
            let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64 / 1e3;
            out.phases_p50_us = Some([p50(&c), p50(&h), p50(&u)]);
            out.ops_per_sec = Some(total.len() as f64 / start.elapsed().as_secs_f64());
            out.with_hist(total);
        }
        Mode::Rtt | Mode::RttConcurrent => {
            let mut streams = Vec::new();
            for i in 0..k.connections {
                match p.open(ep).await {
                    Ok((s, _)) => streams.push(s),
                    Err(e) if i == 0 => return Err(e),
                    Err(e) => out.error(&e),
                }
            }
            let n = streams.len() as u64;
            let start = Instant::now();
            let mut tasks = Vec::new();
            for (i, s) in streams.into_iter().enumerate() {
                let (p2, k2) = (
                    Probe {
                        tls: p.tls.clone(),
                        connect_timeout: p.connect_timeout,
                        reply_timeout: p.reply_timeout,
                    },
                    k.clone(),
                );
                // Split the count and the rate over the connections.
                let share = k2.count / n + u64::from((i as u64) < k2.count % n);
                tasks.push(tokio::spawn(async move {
                    match k2.rate {
                        Some(rate) => {
                            open_loop::run(s, rate / n as f64, share, k2.warmup, p2.reply_timeout)
                                .await
                                .map(|(h, sch)| (h, Some(sch)))
                        }
                        None => closed_loop(&p2, s, &k2, share).await.map(|h| (h, None)),
                    }
                }));
            }
            let mut all = hist();
            let mut schedules = Vec::new();
            for t in tasks {
                match t.await {
                    Ok(Ok((h, sch))) => {
                        let _ = all.add(&h);
                        schedules.extend(sch);
                    }
                    Ok(Err(e)) => out.error(&e),
                    Err(e) => out.error(&ProbeError::new("io", format!("worker: {e}"))),
                }
            }
            let secs = start.elapsed().as_secs_f64();
            out.ops_per_sec = Some(all.len() as f64 / secs);
            out.schedule = open_loop::Schedule::merge(&schedules);
            out.with_hist(all);
        }
        Mode::Bulk => {
            let (mut s, _) = p.open(ep).await?;
            let mut req = vec![b'B'];
            req.extend_from_slice(&k.bytes.to_be_bytes());
            let t = Instant::now();
            let r = async {
                s.write_all(&req).await?;
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0u64;
                while got < k.bytes {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("stream ended after {got} of {} bytes", k.bytes),
                        ));
                    }
                    got += n as u64;
                }
                Ok(())
            };
            match tokio::time::timeout(k.duration(), r).await {
                Ok(Ok(())) => {
                    out.gbit = Some(k.bytes as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9)
                }
                Ok(Err(e)) => out.error(&ProbeError::from_io("bulk", &e)),
                Err(_) => out.error(&ProbeError::new(
                    "timeout",
                    format!("bulk: not done within {:?}", k.duration()),
                )),
            }
        }
        Mode::Idle => {
            let mut held = Vec::new();
            let mut open_h = hist();
            for i in 0..k.connections {
                let t = Instant::now();
                match p.open(ep).await {
                    Ok((mut s, _)) => {
                        let _ = open_h.record(ns(t.elapsed()));
                        if let Err(e) = s.write_all(b"E").await {
                            out.error(&ProbeError::from_io("echo request", &e));
                            continue;
                        }
                        held.push(s);
                    }
                    Err(e) if i == 0 => return Err(e),
                    Err(e) => out.error(&e),
                }
            }
            tokio::time::sleep(k.duration()).await;
            let mut echoing = 0;
            for s in &mut held {
                let mut b = [0u8; 1];
                let r = async {
                    s.write_all(b"x")
                        .await
                        .map_err(|e| ProbeError::from_io("echo after the hold", &e))?;
                    p.reply(s, &mut b, "echo after the hold").await
                }
                .await;
                match r {
                    Ok(()) => echoing += 1,
                    Err(e) => out.error(&e),
                }
            }
            out.echoing = Some(echoing);
            out.with_hist(open_h);
        }
    }
    Ok(out)
}

/// Round trips one after another on `s`: `warmup` unrecorded, then
/// `count` recorded, within the duration.
async fn closed_loop(
    p: &Probe,
    mut s: TlsStream<TcpStream>,
    k: &Params,
    count: u64,
) -> Result<Histogram<u64>, ProbeError> {
    s.write_all(b"E")
        .await
        .map_err(|e| ProbeError::from_io("echo request", &e))?;
    let mut back = [0u8; 64];
    let mut h = hist();
    let end = Instant::now() + k.duration();
    let warmup = if k.mode == Mode::Rtt { k.warmup } else { 0 };
    for i in 0..warmup + count {
        if Instant::now() > end {
            break;
        }
        let t = Instant::now();
        s.write_all(&MSG)
            .await
            .map_err(|e| ProbeError::from_io("round trip", &e))?;
        p.reply(&mut s, &mut back, "round trip").await?;
        if i >= warmup {
            let _ = h.record(ns(t.elapsed()));
        }
    }
    Ok(h)
}

/// A percentile difference, --addr minus --compare: the median of the
/// per-repeat differences and their range.
#[derive(Debug, Clone, Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Option<Spread> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Spread {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

#[derive(Debug, Serialize)]
struct EndpointReport {
    addr: String,
    resolved: SocketAddr,
    sni: String,
    /// Every repeat's measurement.
    repeats: Vec<Sample>,
    /// All repeats' round trips together.
    merged: Option<Summary>,
    /// Median over repeats.
    ops_per_sec: Option<f64>,
    gbit: Option<f64>,
    errors: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    params: Params,
    endpoints: Vec<EndpointReport>,
    /// With --compare: latency --addr adds over --compare, µs, per percentile.
    added_us: Option<BTreeMap<&'static str, Spread>>,
    /// With --compare, bulk: --addr's Gbit/s over --compare's (median of repeats).
    gbit_ratio: Option<f64>,
    /// A fatal error, when the probe could not measure.
    error: Option<ProbeError>,
}

/// A named point of a latency distribution.
type Point = (&'static str, fn(&Summary) -> f64);

/// The points the comparison reports.
const POINTS: [Point; 5] = [
    ("p50", |s| s.p50),
    ("p90", |s| s.p90),
    ("p99", |s| s.p99),
    ("p99.9", |s| s.p999),
    ("max", |s| s.max),
];

fn endpoint(
    label: &str,
    sni: Option<&str>,
    proxy_v2: Option<SocketAddr>,
    websocket: Option<&String>,
) -> Result<Endpoint, ProbeError> {
    let (host, _) = label
        .rsplit_once(':')
        .ok_or_else(|| ProbeError::new("resolve", format!("{label}: expected HOST:PORT")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(label)
        .map_err(|e| ProbeError::new("resolve", format!("{label}: {e}")))?
        .next()
        .ok_or_else(|| ProbeError::new("resolve", format!("{label}: no address")))?;
    let (name, shown) = match sni {
        Some(n) => (n.to_owned(), n.to_owned()),
        None if host.parse::<std::net::IpAddr>().is_ok() => (host.to_owned(), String::new()),
        None => (host.to_owned(), host.to_owned()),
    };
    let name =
        ServerName::try_from(name).map_err(|e| ProbeError::new("tls", format!("--sni: {e}")))?;
    Ok(Endpoint {
        label: label.to_owned(),
        addr,
        name,
        sni: shown,
        proxy_v2,
        websocket: websocket.cloned(),
    })
}

/// TLS as splicegate's own agent leg does it: `--ca` holds CA certificates
/// or agents' own self-signed certificates (pinned, as DCV agents' are);
/// `--insecure` accepts any certificate.
fn tls_config(a: &ProbeArgs) -> Result<TlsConnector, String> {
    use splicegate::upstream::tls::{connector, UpstreamTls};
    let mode = match &a.ca {
        Some(path) => UpstreamTls::Verify(path.clone()),
        None => UpstreamTls::Insecure,
    };
    connector(&mode)?.ok_or_else(|| "no TLS connector".to_owned())
}

/// Run the probe; the exit status says how it ended.
pub async fn run(a: ProbeArgs) -> ExitCode {
    let params = match Params::from(&a) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("splicegate-bench probe: {e}");
            return ExitCode::from(64);
        }
    };
    let tls = match tls_config(&a) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("splicegate-bench probe: {e}");
            return ExitCode::from(64);
        }
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut report = Report {
        command,
        params: params.clone(),
        endpoints: Vec::new(),
        added_us: None,
        gbit_ratio: None,
        error: None,
    };
    let mut eps = Vec::new();
    let resolved =
        endpoint(&a.addr, a.sni.as_deref(), a.proxy_v2, a.websocket.as_ref()).and_then(|ep| {
            eps.push(ep);
            match &a.compare {
                Some(c) => endpoint(
                    c,
                    a.compare_sni.as_deref().or(a.sni.as_deref()),
                    None,
                    a.websocket.as_ref(),
                )
                .map(|ep| eps.push(ep)),
                None => Ok(()),
            }
        });
    let probe = Probe {
        tls,
        connect_timeout: Duration::from_secs_f64(a.connect_timeout.clamp(0.1, 600.0)),
        reply_timeout: Duration::from_secs_f64(a.reply_timeout.clamp(0.1, 600.0)),
    };
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); eps.len()];
    let mut fatal = resolved.err();
    'outer: for _ in 0..params.repeats {
        if fatal.is_some() {
            break;
        }
        for (i, ep) in eps.iter().enumerate() {
            match measure(&probe, ep, &params).await {
                Ok(s) => samples[i].push(s),
                Err(e) => {
                    fatal = Some(e);
                    break 'outer;
                }
            }
        }
    }

    for (ep, runs) in eps.iter().zip(samples) {
        let mut merged = hist();
        let mut errors = BTreeMap::new();
        for r in &runs {
            if let Some(h) = &r.hist {
                let _ = merged.add(h);
            }
            for (k, v) in &r.errors {
                *errors.entry(*k).or_default() += v;
            }
        }
        report.endpoints.push(EndpointReport {
            addr: ep.label.clone(),
            resolved: ep.addr,
            sni: ep.sni.clone(),
            merged: (!merged.is_empty()).then(|| summary(&merged)),
            ops_per_sec: median(runs.iter().filter_map(|r| r.ops_per_sec).collect()),
            gbit: median(runs.iter().filter_map(|r| r.gbit).collect()),
            errors,
            repeats: runs,
        });
    }
    if let [under, base] = report.endpoints.as_slice() {
        let pairs: Vec<(&Summary, &Summary)> = under
            .repeats
            .iter()
            .zip(&base.repeats)
            .filter_map(|(u, b)| Some((u.latency.as_ref()?, b.latency.as_ref()?)))
            .collect();
        if !pairs.is_empty() {
            report.added_us = Some(
                POINTS
                    .iter()
                    .filter_map(|(name, f)| {
                        Some((
                            *name,
                            Spread::of(pairs.iter().map(|(u, b)| f(u) - f(b)).collect())?,
                        ))
                    })
                    .collect(),
            );
        }
        if let (Some(u), Some(b)) = (under.gbit, base.gbit) {
            report.gbit_ratio = Some(u / b);
        }
    }
    report.error = fatal.clone();

    let text = human(&report);
    if a.json {
        eprint!("{text}");
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("splicegate-bench probe: JSON: {e}"),
        }
    } else {
        print!("{text}");
    }
    if let Some(path) = &a.svg {
        let curves: Vec<(String, Vec<f64>)> = report
            .endpoints
            .iter()
            .filter_map(|e| Some((e.addr.clone(), e.merged.as_ref()?.curve.clone())))
            .collect();
        let title = format!(
            "{} through each address: latency by percentile",
            params.mode.name()
        );
        if let Err(e) = std::fs::write(path, crate::report::plot(&title, &curves, true)) {
            eprintln!("splicegate-bench probe: --svg {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if let Some(e) = fatal {
        return ExitCode::from(e.exit_code());
    }
    if report.endpoints.iter().any(|e| !e.errors.is_empty()) {
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

/// The terminal summary.
fn human(r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let p = &r.params;
    let _ = write!(o, "probe {}", p.mode.name());
    if let Some(rate) = p.rate {
        let _ = write!(o, " at {rate} msg/s (latency from the scheduled send time)");
    }
    let _ = writeln!(o, ", {} repeat(s)", p.repeats);
    for e in &r.endpoints {
        let sni = if e.sni.is_empty() {
            "no SNI".to_owned()
        } else {
            format!("SNI {}", e.sni)
        };
        let _ = writeln!(o, "\n{} ({}, {sni})", e.addr, e.resolved);
        if let Some(s) = &e.merged {
            let _ = writeln!(
                o,
                "  {} samples  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1} µs",
                s.count, s.p50, s.p90, s.p99, s.p999, s.max
            );
        }
        if let Some(ops) = e
            .ops_per_sec
            .filter(|_| matches!(p.mode, Mode::Rtt | Mode::RttConcurrent))
        {
            let _ = writeln!(o, "  {ops:.0} round trips/s");
        }
        if let Some(g) = e.gbit {
            let _ = writeln!(o, "  {g:.2} Gbit/s");
        }
        for s in e.repeats.iter().filter_map(|r| r.schedule.as_ref()) {
            let _ = writeln!(
                o,
                "  schedule: {} of {} sent in {:.3} s (planned {:.3} s), send lateness p99 {:.1} µs",
                s.sent, s.planned, s.actual_s, s.planned_s, s.lateness_p99_us
            );
        }
        for s in e.repeats.iter().filter_map(|r| r.echoing) {
            let _ = writeln!(
                o,
                "  {s} of {} connections still echo after the hold",
                p.connections
            );
        }
        if !e.errors.is_empty() {
            let list: Vec<String> = e.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(o, "  errors: {}", list.join(", "));
            if let Some(first) = e.repeats.iter().find_map(|r| r.first_error.as_ref()) {
                let _ = writeln!(o, "  first: {first}");
            }
        }
    }
    if let (Some(added), [under, base]) = (&r.added_us, r.endpoints.as_slice()) {
        let _ = writeln!(
            o,
            "\nadded by {} over {} (median of repeats, range):",
            under.addr, base.addr
        );
        for (name, s) in POINTS.iter().filter_map(|(n, _)| Some((n, added.get(n)?))) {
            let _ = writeln!(
                o,
                "  {name:>6} {:+.1} µs  ({:+.1} .. {:+.1})",
                s.median, s.min, s.max
            );
        }
    }
    if let Some(g) = r.gbit_ratio {
        let _ = writeln!(o, "\nGbit/s ratio {g:.2}");
    }
    if let Some(e) = &r.error {
        let _ = writeln!(o, "\nerror: {e}");
    }
    o
}
