//! `splicegate-bench udp`: the QUIC relay against a direct path and nginx's
//! stream UDP proxy (`listen ... udp; proxy_pass`), in one run.
//!
//! A UDP agent on 127.0.0.1 echoes datagrams and, asked with `B` + count,
//! sends that many 1200-byte datagrams back as fast as it can. Each
//! measurement is a new flow: its first datagram is a real QUIC Initial
//! (splicegate routes on its SNI; the others just relay it), then
//! - rtt: 64-byte datagrams echoed one at a time;
//! - bulk: the agent's burst of 1200-byte datagrams (QUIC's size), counted
//!   as they arrive: delivered datagrams/s, Gbit/s and loss, and CPU per
//!   GiB delivered (the target's processes and the whole machine);
//! - flows: [`FLOWS`] flows at once, each with its own burst, summed: what
//!   more than one worker (`udp_workers`, nginx's `worker_processes`) buys.
//!
//! A target name may end in `-wN` (`splicegate-w1`, `nginx-w2`): N workers
//! (sockets with SO_REUSEPORT, each with its thread, for splicegate; worker
//! processes for nginx). nginx gets the listening socket buffers splicegate
//! asks for (4 MiB, `rcvbuf`/`sndbuf`) and `reuseport`, so its losses on
//! default buffers are not counted as a win of ours.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::load::{hist, ns, summary, Summary};
use crate::report::median;
use crate::targets::{self, Running};

/// The SNI the flows carry.
const SNI: &str = "agent.udp.bench";
/// Bulk datagram size: what QUIC sends.
const DATAGRAM: usize = 1200;
/// Flows of the `flows` measurement.
const FLOWS: usize = 8;

/// Options of `splicegate-bench udp`.
#[derive(clap::Args, Clone)]
pub struct UdpArgs {
    /// Small counts (under a minute).
    #[arg(long)]
    quick: bool,
    /// Tiny counts: checks that everything runs (CI).
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,
    /// Repeats (default 3, 1 with --quick or --smoke).
    #[arg(long)]
    repeats: Option<u32>,
    /// Comma-separated targets: direct, splicegate, splicegate-spinN (in
    /// low-latency mode, spinning N µs), nginx.
    #[arg(long, default_value = "direct,splicegate,nginx")]
    targets: String,
    /// The splicegate binary.
    #[arg(long, default_value = "target/release/splicegate")]
    splicegate: PathBuf,
    /// Output folder (default target/bench/udp-<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Counts {
    rtt_rounds: u32,
    bulk_datagrams: u32,
    repeats: u32,
    smoke: bool,
}

/// One measurement of one target.
#[derive(Debug, Clone, Default, Serialize)]
struct UdpRun {
    target: String,
    repeat: u32,
    rtt: Option<Summary>,
    rtt_lost: u32,
    bulk_datagrams_per_s: Option<f64>,
    bulk_gbit: Option<f64>,
    bulk_loss_pct: Option<f64>,
    proxy_cpu_s_per_gib: Option<f64>,
    machine_cpu_s_per_gib: Option<f64>,
    flows_datagrams_per_s: Option<f64>,
    flows_loss_pct: Option<f64>,
    flows_machine_cpu_s_per_gib: Option<f64>,
    errors: Vec<String>,
}

/// Start the agent (plain threads and blocking sockets, so the harness is
/// never what limits a target): echo, or a burst on request.
fn agent() -> std::io::Result<SocketAddr> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let _ = socket2::SockRef::from(&sock).set_send_buffer_size(4 << 20);
    let addr = sock.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if n == 5 && buf[0] == b'B' {
                let count = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                let Ok(out) = sock.try_clone() else { continue };
                std::thread::spawn(move || {
                    let d = [0x5a_u8; DATAGRAM];
                    for _ in 0..count {
                        if out.send_to(&d, from).is_err() {
                            break;
                        }
                    }
                });
            } else {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    Ok(addr)
}

/// A new flow to `to`: a client socket whose first datagram (a QUIC
/// Initial) came back.
fn open(to: SocketAddr) -> Result<std::net::UdpSocket, String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(8 << 20);
    s.connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let dcid: [u8; 8] = rand_bytes();
    let initial =
        splicegate::testkit::quic_hello_datagrams(1, &dcid, Some(SNI), &["dcv"], 0, 4000).remove(0);
    let mut buf = vec![0u8; 2048];
    for _ in 0..5 {
        s.send(&initial).map_err(|e| e.to_string())?;
        if let Ok(n) = s.recv(&mut buf) {
            if n == initial.len() {
                return Ok(s);
            }
        }
    }
    Err(format!("{to}: the Initial never came back"))
}

fn rand_bytes() -> [u8; 8] {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ u64::from(std::process::id()).rotate_left(32)).to_be_bytes()
}

/// One repeat against one target, on a blocking thread.
fn measure(name: &str, to: SocketAddr, pids: &[u32], c: Counts, repeat: u32) -> UdpRun {
    let mut run = UdpRun {
        target: name.to_owned(),
        repeat,
        ..UdpRun::default()
    };
    let s = match open(to) {
        Ok(s) => s,
        Err(e) => {
            run.errors.push(format!("open: {e}"));
            return run;
        }
    };
    // rtt
    let mut h = hist();
    let msg = [7u8; 64];
    let mut back = [0u8; 2048];
    for i in 0..c.rtt_rounds + c.rtt_rounds / 10 {
        let t = Instant::now();
        if s.send(&msg).is_err() {
            run.rtt_lost += 1;
            continue;
        }
        match s.recv(&mut back) {
            Ok(64) if i >= c.rtt_rounds / 10 => {
                let _ = h.record(ns(t.elapsed()));
            }
            Ok(_) => {}
            Err(_) => run.rtt_lost += 1,
        }
    }
    if !h.is_empty() {
        run.rtt = Some(summary(&h));
    }
    // bulk, agent → client
    let (cpu0, m0) = (targets::cpu_seconds(pids), targets::machine_seconds());
    let mut req = vec![b'B'];
    req.extend_from_slice(&c.bulk_datagrams.to_be_bytes());
    if let Err(e) = s.send(&req) {
        run.errors.push(format!("bulk request: {e}"));
        return run;
    }
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut got = 0u64;
    let mut bytes = 0u64;
    let mut first = None;
    let mut last = Instant::now();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < u64::from(c.bulk_datagrams) && Instant::now() < deadline {
        match s.recv(&mut buf) {
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
                got += 1;
                bytes += n as u64;
            }
            // 500 ms without a datagram: the burst is over, the rest lost.
            Err(_) => break,
        }
    }
    if let Some(f) = first {
        let secs = (last - f).as_secs_f64().max(1e-6);
        run.bulk_datagrams_per_s = Some(got as f64 / secs);
        run.bulk_gbit = Some(bytes as f64 * 8.0 / secs / 1e9);
        run.bulk_loss_pct = Some(100.0 * (1.0 - got as f64 / f64::from(c.bulk_datagrams)));
        let gib = (bytes as f64 / f64::from(1u32 << 30)).max(1e-9);
        run.machine_cpu_s_per_gib = Some((targets::machine_seconds() - m0) / gib);
        if !pids.is_empty() {
            run.proxy_cpu_s_per_gib = Some((targets::cpu_seconds(pids) - cpu0) / gib);
        }
    } else {
        run.errors.push("bulk: nothing arrived".into());
    }
    flows(to, c, &mut run);
    run
}

/// [`FLOWS`] flows at once, each asking for its share of the bulk count:
/// delivered datagrams/s in all, loss, machine CPU per GiB.
fn flows(to: SocketAddr, c: Counts, run: &mut UdpRun) {
    let each = (c.bulk_datagrams / FLOWS as u32).max(1);
    let mut socks = Vec::new();
    for _ in 0..FLOWS {
        match open(to) {
            Ok(s) => socks.push(s),
            Err(e) => {
                run.errors.push(format!("flows: open: {e}"));
                return;
            }
        }
    }
    let m0 = targets::machine_seconds();
    let started = Instant::now();
    let handles: Vec<_> = socks
        .into_iter()
        .map(|s| {
            std::thread::spawn(move || {
                let mut req = vec![b'B'];
                req.extend_from_slice(&each.to_be_bytes());
                if s.send(&req).is_err() {
                    return (0u64, 0u64, None);
                }
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let (mut got, mut bytes, mut last) = (0u64, 0u64, None);
                let mut buf = vec![0u8; 65536];
                let deadline = Instant::now() + Duration::from_secs(120);
                while got < u64::from(each) && Instant::now() < deadline {
                    match s.recv(&mut buf) {
                        Ok(n) => {
                            got += 1;
                            bytes += n as u64;
                            last = Some(Instant::now());
                        }
                        Err(_) => break,
                    }
                }
                (got, bytes, last)
            })
        })
        .collect();
    let (mut got, mut bytes, mut last) = (0u64, 0u64, started);
    for h in handles {
        if let Ok((g, b, l)) = h.join() {
            got += g;
            bytes += b;
            if let Some(l) = l {
                last = last.max(l);
            }
        }
    }
    if got == 0 {
        run.errors.push("flows: nothing arrived".into());
        return;
    }
    let secs = (last - started).as_secs_f64().max(1e-6);
    run.flows_datagrams_per_s = Some(got as f64 / secs);
    run.flows_loss_pct = Some(100.0 * (1.0 - got as f64 / f64::from(each * FLOWS as u32)));
    let gib = (bytes as f64 / f64::from(1u32 << 30)).max(1e-9);
    run.flows_machine_cpu_s_per_gib = Some((targets::machine_seconds() - m0) / gib);
}

/// A target's base name and its workers (`nginx-w2` → (`nginx`, Some(2))).
fn workers(name: &str) -> (&str, Option<usize>) {
    match name.rsplit_once("-w") {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (base, n.parse().ok())
        }
        _ => (name, None),
    }
}

/// Start a target in front of `agent`; returns the address to send to.
fn start(
    name: &str,
    agent: SocketAddr,
    splicegate: &std::path::Path,
) -> Result<(Running, SocketAddr), String> {
    let dir = std::env::temp_dir().join(format!(
        "splicegate-bench-udp-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (name, n) = workers(name);
    match name {
        "direct" => Ok((Running::none(dir), agent)),
        // `splicegate-spin50`: in low-latency mode, that spin window (µs).
        s if s == "splicegate" || s.starts_with("splicegate-spin") => {
            let spin = match s.strip_prefix("splicegate-spin") {
                None => String::new(),
                Some(us) => {
                    let us: u32 = us
                        .parse()
                        .map_err(|_| format!("{s}: the spin window is a number of µs"))?;
                    format!("low_latency = \"spin\"\nspin_us = {us}\n")
                }
            };
            let w = n.map_or(String::new(), |n| format!("udp_workers = {n}\n"));
            let cfg = format!(
                "[[udp_listener]]\nbind = \"127.0.0.1:0\"\n{w}{spin}[[route]]\nsni = \"{SNI}\"\nagent = \"{agent}\"\n"
            );
            let file = dir.join("splicegate.toml");
            std::fs::write(&file, cfg).map_err(|e| e.to_string())?;
            let (child, addr) = targets::spawn_splicegate(splicegate, &file)?;
            Ok((Running::spawned(addr, child, dir), addr))
        }
        "nginx" => {
            let (udp, tcp) = (
                targets::free_port().map_err(|e| e.to_string())?,
                targets::free_port().map_err(|e| e.to_string())?,
            );
            let addr: SocketAddr = format!("127.0.0.1:{udp}").parse().expect("valid");
            let ready: SocketAddr = format!("127.0.0.1:{tcp}").parse().expect("valid");
            let module = ["/usr/lib/nginx/modules/ngx_stream_module.so"]
                .into_iter()
                .find(|m| std::path::Path::new(m).exists())
                .map_or(String::new(), |m| format!("load_module {m};\n"));
            // A TCP server beside the UDP one only tells the harness nginx
            // is up. The listening socket gets splicegate's buffers, and
            // reuseport so that each worker serves its own flows.
            let procs = n.map_or("auto".to_owned(), |n| n.to_string());
            let cfg = format!(
                "{module}daemon off;\nmaster_process on;\nworker_processes {procs};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 4096; }}\n\
                 stream {{\n  server {{\n    listen {addr} udp reuseport rcvbuf=4m sndbuf=4m;\n    proxy_pass {agent};\n    proxy_timeout 30s;\n  }}\n\
                 server {{\n    listen {ready};\n    return ok;\n  }}\n}}\n",
                d = dir.display()
            );
            let child = targets::spawn_nginx(&dir, &cfg, ready)?;
            Ok((Running::spawned(addr, child, dir), addr))
        }
        other => Err(format!(
            "unknown udp target {other:?} (direct, splicegate, splicegate-spinN, nginx; -wN for N workers)"
        )),
    }
}

/// The whole run. Ok(true) when every target ran without errors.
pub async fn run(a: UdpArgs) -> Result<bool, String> {
    let c = Counts {
        rtt_rounds: if a.smoke {
            100
        } else if a.quick {
            5000
        } else {
            20_000
        },
        bulk_datagrams: if a.smoke {
            2000
        } else if a.quick {
            200_000
        } else {
            1_000_000
        },
        repeats: a
            .repeats
            .unwrap_or(if a.smoke || a.quick { 1 } else { 3 })
            .max(1),
        smoke: a.smoke,
    };
    let agent = agent().map_err(|e| format!("cannot start the agent: {e}"))?;
    let names: Vec<String> = a.targets.split(',').map(|t| t.trim().to_owned()).collect();
    // nginx cannot size its upstream UDP sockets' buffers; the system
    // default can, for every socket that does not ask: make it what
    // splicegate asks for its flows' sockets, for the run.
    let buffers = DefaultBuffers::raise(FLOW_BUFFER);
    let mut running = Vec::new();
    let mut status = Vec::new();
    for n in &names {
        eprintln!("starting {n}");
        match start(n, agent, &a.splicegate) {
            Ok((r, addr)) => match open(addr) {
                Ok(_) => {
                    running.push(Some((r, addr)));
                    status.push("ok".to_owned());
                }
                Err(e) => {
                    running.push(None);
                    status.push(format!("skipped: routing check failed: {e}"));
                }
            },
            Err(e) => {
                eprintln!("  skipped: {e}");
                running.push(None);
                status.push(format!("skipped: {e}"));
            }
        }
    }
    let mut runs = Vec::new();
    for repeat in 0..c.repeats {
        for (i, slot) in running.iter().enumerate() {
            let Some((r, addr)) = slot else { continue };
            eprintln!("repeat {repeat}: {}", names[i]);
            let (name, addr, pids) = (names[i].clone(), *addr, r.pids());
            let run = tokio::task::spawn_blocking(move || measure(&name, addr, &pids, c, repeat))
                .await
                .map_err(|e| format!("measurement thread: {e}"))?;
            for e in &run.errors {
                eprintln!("  error: {e}");
            }
            runs.push(run);
        }
    }
    for (r, _) in running.iter_mut().flatten() {
        r.stop();
    }
    let buffers_note = buffers.note();
    drop(buffers);
    let clean = runs.iter().all(|r| r.errors.is_empty());
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("target/bench").join(format!("udp-{}", crate::report::timestamp()))
    });
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut md = report(&names, &status, &runs, c, &command);
    md.push_str(&format!("\n{buffers_note}\n"));
    std::fs::write(out.join("results.md"), &md).map_err(|e| e.to_string())?;
    let json = serde_json::json!({ "command": command, "counts": c, "targets": names, "status": status, "runs": runs });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    println!("{md}");
    println!("written to {}", out.display());
    Ok(clean)
}

fn report(
    names: &[String],
    status: &[String],
    runs: &[UdpRun],
    c: Counts,
    command: &str,
) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "# QUIC relay: UDP round trips and bulk\n");
    if c.smoke {
        let _ = writeln!(o, "**Smoke run: tiny counts that only check every target works. These numbers are not measurements.**\n");
    }
    let _ = writeln!(
        o,
        "Command: `{command}`\n\nrtt: {} round trips of 64-byte datagrams per repeat; bulk: a burst of {} datagrams of {DATAGRAM} bytes agent → client; flows: {FLOWS} flows at once, each with a burst of {} datagrams. Medians of {} repeat(s); added = minus direct's median; × = over nginx's with the same workers (`-wN`) when it ran, else plain nginx's.\n",
        c.rtt_rounds, c.bulk_datagrams, (c.bulk_datagrams / FLOWS as u32).max(1), c.repeats
    );
    let of = |t: &str, f: &dyn Fn(&UdpRun) -> Option<f64>| {
        median(
            runs.iter()
                .filter(|r| r.target == t)
                .filter_map(f)
                .collect(),
        )
    };
    let p50 = |r: &UdpRun| r.rtt.as_ref().map(|s| s.p50);
    let p99 = |r: &UdpRun| r.rtt.as_ref().map(|s| s.p99);
    let direct = (of("direct", &p50), of("direct", &p99));
    let added =
        |t: &str, f: &dyn Fn(&UdpRun) -> Option<f64>, base: Option<f64>| Some(of(t, f)? - base?);
    let ratio = |v: Option<f64>, n: Option<f64>| match (v, n) {
        (Some(v), Some(n)) if n.abs() > 1e-9 => format!("{:.2}", v / n),
        _ => "–".into(),
    };
    let fmt = |v: Option<f64>, d: usize| v.map_or("–".into(), |v| format!("{v:.d$}"));
    let _ = writeln!(o, "| target | status | rtt p50 µs | added p50 | × nginx | rtt p99 µs | added p99 | × nginx | bulk kdgram/s | Gbit/s | × nginx | loss % | proxy CPU s/GiB | machine CPU s/GiB | × nginx | {FLOWS} flows kdgram/s | × nginx | loss % | machine CPU s/GiB |");
    let _ = writeln!(
        o,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let gbit = |r: &UdpRun| r.bulk_gbit;
    let machine = |r: &UdpRun| r.machine_cpu_s_per_gib;
    let multi = |r: &UdpRun| r.flows_datagrams_per_s;
    for (t, st) in names.iter().zip(status) {
        // The nginx to compare with: the same workers, if it ran.
        let peer = match workers(t) {
            (_, Some(n)) if names.iter().any(|x| *x == format!("nginx-w{n}")) => {
                format!("nginx-w{n}")
            }
            _ => "nginx".to_owned(),
        };
        let peer = peer.as_str();
        let (a50, a99) = (added(t, &p50, direct.0), added(t, &p99, direct.1));
        let _ = writeln!(
            o,
            "| {t} | {st} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt(of(t, &p50), 1),
            fmt(a50, 1),
            ratio(a50, added(peer, &p50, direct.0)),
            fmt(of(t, &p99), 1),
            fmt(a99, 1),
            ratio(a99, added(peer, &p99, direct.1)),
            fmt(of(t, &|r| r.bulk_datagrams_per_s).map(|v| v / 1e3), 0),
            fmt(of(t, &gbit), 2),
            ratio(of(t, &gbit), of(peer, &gbit)),
            fmt(of(t, &|r| r.bulk_loss_pct), 1),
            fmt(of(t, &|r| r.proxy_cpu_s_per_gib), 2),
            fmt(of(t, &machine), 2),
            ratio(of(t, &machine), of(peer, &machine)),
            fmt(of(t, &multi).map(|v| v / 1e3), 0),
            ratio(of(t, &multi), of(peer, &multi)),
            fmt(of(t, &|r| r.flows_loss_pct), 1),
            fmt(of(t, &|r| r.flows_machine_cpu_s_per_gib), 2),
        );
    }
    o
}

/// What splicegate asks for each flow's agent socket (its `FLOW_BUFFER`).
const FLOW_BUFFER: usize = 1 << 20;

/// `net.core.rmem_default` / `wmem_default` raised for a run and put back
/// after (needs root; without it they stay, and the report says so).
struct DefaultBuffers {
    saved: Option<(String, String)>,
    to: usize,
}

const RMEM_DEFAULT: &str = "/proc/sys/net/core/rmem_default";
const WMEM_DEFAULT: &str = "/proc/sys/net/core/wmem_default";

impl DefaultBuffers {
    fn raise(to: usize) -> DefaultBuffers {
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned());
        let saved = match (read(RMEM_DEFAULT), read(WMEM_DEFAULT)) {
            (Ok(r), Ok(w)) => {
                let ok = std::fs::write(RMEM_DEFAULT, to.to_string()).is_ok()
                    && std::fs::write(WMEM_DEFAULT, to.to_string()).is_ok();
                ok.then_some((r, w))
            }
            _ => None,
        };
        DefaultBuffers { saved, to }
    }

    fn note(&self) -> String {
        match &self.saved {
            Some(_) => format!(
                "Socket buffers: splicegate asks 4 MiB for its listening sockets and {} KiB for each flow's agent socket; nginx listened with `rcvbuf=4m sndbuf=4m`, and its upstream sockets (which it cannot size) had {} KiB through `net.core.rmem_default`/`wmem_default`, raised for this run.",
                self.to >> 10,
                self.to >> 10
            ),
            None => "Socket buffers: not root, so nginx's upstream sockets had the system's default buffers (smaller than splicegate's flow sockets): its losses in this run are partly that.".to_owned(),
        }
    }
}

impl Drop for DefaultBuffers {
    fn drop(&mut self) {
        if let Some((r, w)) = &self.saved {
            let _ = std::fs::write(RMEM_DEFAULT, r);
            let _ = std::fs::write(WMEM_DEFAULT, w);
        }
    }
}
