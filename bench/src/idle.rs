//! `splicegate-bench idle`: what an idle connection costs each target, in
//! user memory (the target's RSS) and in kernel memory (the machine's Slab,
//! with the direct connection's own sockets subtracted), at several sizes.
//!
//! Each connection sends a real ClientHello to a raw agent, then one byte
//! echoed both ways — an idle DCV session has moved some data (its
//! keepalives), so buffers a proxy takes when data moves show up here.
//! After the measurement every connection must still echo.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::agent::{self, sni};
use crate::report::median;
use crate::{load, parse_targets, targets};

/// Options of the idle mode.
#[derive(clap::Args, Clone)]
pub struct IdleArgs {
    /// Comma-separated numbers of idle connections.
    #[arg(long, default_value = "1000,9000")]
    conns: String,
    /// Comma-separated targets (as for `suite`).
    #[arg(long, default_value = "direct,splicegate-splice,haproxy-splice,nginx")]
    targets: String,
    /// Repeats per size.
    #[arg(long, default_value_t = 3)]
    repeats: u32,
    /// Seconds to keep the connections idle before checking that every
    /// one still echoes (past TCP keepalive's first probes: 60 s).
    #[arg(long, default_value_t = 0)]
    hold: u64,
    /// The splicegate binary.
    #[arg(long, default_value = "target/release/splicegate")]
    splicegate: PathBuf,
    /// Output folder (default target/bench/idle-<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    target: String,
    conns: u32,
    repeat: u32,
    /// Target RSS growth per connection, KiB.
    user_kib: Option<f64>,
    /// Machine Slab growth per connection, KiB (client and agent sockets
    /// included; the report subtracts direct's).
    slab_kib: f64,
    /// Target fds per connection.
    fds: Option<f64>,
    /// Seconds to open every connection (64 at a time).
    open_secs: f64,
    /// Connections that echoed at the end.
    echoed: u32,
    error: Option<String>,
}

/// `Slab:` of /proc/meminfo, KiB.
fn slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Connections per client source address: 127.0.0.2 for the first
/// 20,000, then 127.0.0.3, and so on (loopback answers for all of
/// 127.0.0.0/8), well under the ~28,000 ephemeral ports a source has.
/// 127.0.0.1 is left to the proxies' own connections to the agents.
const PER_SOURCE: u32 = 20_000;

/// The client source address of connection `i`.
fn source(i: u32) -> std::net::IpAddr {
    let k = i / PER_SOURCE + 2;
    // Past 127.0.255.255 sizes are far beyond any fd limit; saturate.
    let k = k.min(0xFFFF) as u16;
    std::net::Ipv4Addr::new(127, 0, (k >> 8) as u8, k as u8).into()
}

/// Open `n` connections to `addr` with `sni`, 64 at a time, spread over
/// client source addresses ([`source`]); each sends its hello and echoes
/// one byte. Stops at the first connection that fails.
async fn open(addr: std::net::SocketAddr, sni: &str, n: u32) -> std::io::Result<Vec<TcpStream>> {
    let gate = Arc::new(Semaphore::new(64));
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let permit = Arc::clone(&gate).acquire_owned().await.expect("open gate");
        if failed.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let (sni, failed) = (sni.to_owned(), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            // A target that stops accepting (at its connection cap) leaves
            // the connection in its backlog: bound the wait.
            let one = async {
                let mut s = load::raw_open_from(Some(source(i)), addr, &sni).await?;
                s.write_all(b"Ex").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(s)
            };
            let r = match tokio::time::timeout(OPEN_TIMEOUT, one).await {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connection {i} not echoed within {OPEN_TIMEOUT:?}"),
                )),
            };
            if r.is_err() {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
            r
        }));
    }
    let mut held = Vec::with_capacity(n as usize);
    let mut first_error = None;
    for t in tasks {
        match t.await.map_err(std::io::Error::other).and_then(|r| r) {
            Ok(s) => held.push(s),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(std::io::Error::new(
            e.kind(),
            format!("{} of {n} open: {e}", held.len()),
        )),
        None => Ok(held),
    }
}

/// How long one connection may take to open and echo.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many of `held` still echo a byte, one after the other, all within
/// 30 s (a loopback echo takes well under a millisecond).
async fn echoing(held: &mut [TcpStream]) -> u32 {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut ok = 0;
    for s in held.iter_mut() {
        let mut b = [0u8; 1];
        let round = async {
            s.write_all(b"y").await?;
            s.read_exact(&mut b).await
        };
        if matches!(tokio::time::timeout_at(deadline, round).await, Ok(Ok(_))) {
            ok += 1;
        }
    }
    ok
}

/// Raise the soft fd limit to the hard one; returns the limit.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            hard
        }
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// Run the idle mode. Ok(true) when every connection opened and echoed.
pub async fn run(args: IdleArgs) -> Result<bool, String> {
    let limit = raise_nofile();
    let sizes: Vec<u32> = args
        .conns
        .split(',')
        .map(|n| n.trim().parse().map_err(|_| format!("bad size {n:?}")))
        .collect::<Result<_, _>>()?;
    // The bench holds a client and an agent socket per connection; each
    // proxy two.
    if let Some(&big) = sizes.iter().find(|&&n| u64::from(n) * 2 + 200 > limit) {
        return Err(format!(
            "{big} connections need {} file descriptors, and RLIMIT_NOFILE allows {limit}: raise the hard limit (see bench/README.md)",
            u64::from(big) * 2 + 200
        ));
    }
    let kinds = parse_targets(&args.targets)?;
    let agents = agent::start()
        .await
        .map_err(|e| format!("cannot start agents: {e}"))?;
    let raw = sni("raw-a");
    let mut samples = Vec::new();
    for &n in &sizes {
        for repeat in 0..args.repeats {
            for kind in &kinds {
                let name = targets::name(kind);
                eprintln!("idle: {n} connections, repeat {repeat}: {name}");
                let mut sample = Sample {
                    target: name,
                    conns: n,
                    repeat,
                    user_kib: None,
                    slab_kib: 0.0,
                    fds: None,
                    open_secs: 0.0,
                    echoed: 0,
                    error: None,
                };
                let mut running = match targets::start(kind, &agents, &args.splicegate, n) {
                    Ok(r) => r,
                    Err(e) => {
                        sample.error = Some(e);
                        samples.push(sample);
                        continue;
                    }
                };
                let addr = running.addr(&agents, "raw-a");
                let pids = running.pids();
                let (rss0, fds0, slab0) =
                    (targets::rss_kib(&pids), targets::fds(&pids), slab_kib());
                let t = Instant::now();
                match open(addr, &raw, n).await {
                    Ok(mut held) => {
                        sample.open_secs = t.elapsed().as_secs_f64();
                        let k = f64::from(n);
                        sample.slab_kib = (slab_kib() as f64 - slab0 as f64) / k;
                        if !pids.is_empty() {
                            let pids = running.pids();
                            sample.user_kib =
                                Some((targets::rss_kib(&pids) as f64 - rss0 as f64) / k);
                            sample.fds = Some((targets::fds(&pids) as f64 - fds0 as f64) / k);
                        }
                        tokio::time::sleep(std::time::Duration::from_secs(args.hold)).await;
                        sample.echoed = echoing(&mut held).await;
                    }
                    Err(e) => sample.error = Some(format!("opening: {e}")),
                }
                if let Some(how) = running.exited() {
                    sample.error = Some(format!("died: {how}"));
                }
                running.stop();
                samples.push(sample);
            }
        }
    }
    let clean = samples
        .iter()
        .all(|s| s.error.is_none() && s.echoed == s.conns);
    let md = report(&samples, &sizes, &args);
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("target/bench").join(format!("idle-{}", crate::report::timestamp()))
    });
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    std::fs::write(out.join("idle.md"), &md).map_err(|e| e.to_string())?;
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "fd_limit": limit,
        "samples": samples,
    });
    std::fs::write(
        out.join("idle.json"),
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    println!("{md}");
    println!("written to {}", out.display());
    Ok(clean)
}

/// The markdown report: per size, each target's medians, kernel memory
/// with direct's subtracted, and the total as a multiple of HAProxy's.
fn report(samples: &[Sample], sizes: &[u32], args: &IdleArgs) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "# Memory per idle connection\n");
    let _ = writeln!(
        o,
        "Command: `{}`\n\nEach connection: a real ClientHello, then one byte echoed both ways, then idle. User = the target's RSS growth; kernel = the machine's Slab growth minus a direct connection's (the client's and agent's own sockets). Medians of {} repeat(s).\n",
        std::env::args().collect::<Vec<_>>().join(" "),
        args.repeats
    );
    for &n in sizes {
        let of = |t: &str, f: &dyn Fn(&Sample) -> Option<f64>| {
            median(
                samples
                    .iter()
                    .filter(|s| s.conns == n && s.target == t && s.error.is_none())
                    .filter_map(f)
                    .collect(),
            )
        };
        let names: Vec<String> = {
            let mut v: Vec<String> = Vec::new();
            for s in samples.iter().filter(|s| s.conns == n) {
                if !v.contains(&s.target) {
                    v.push(s.target.clone());
                }
            }
            v
        };
        let direct_slab = of("direct", &|s| Some(s.slab_kib)).unwrap_or(0.0);
        let total = |t: &str| -> Option<f64> {
            let user = of(t, &|s| s.user_kib)?;
            let kernel = of(t, &|s| Some(s.slab_kib))? - direct_slab;
            Some(user + kernel)
        };
        let haproxy = names
            .iter()
            .filter(|t| t.starts_with("haproxy"))
            .filter_map(|t| total(t))
            .reduce(f64::min);
        let _ = writeln!(o, "## {n} idle connections\n");
        let _ = writeln!(
            o,
            "| target | user KiB/conn | kernel KiB/conn | user + kernel | × HAProxy | fds/conn | open s | echoed |\n|---|---|---|---|---|---|---|---|"
        );
        let f = |v: Option<f64>, d: usize| v.map_or("–".to_owned(), |v| format!("{v:.d$}"));
        for t in &names {
            let echoed: u32 = samples
                .iter()
                .filter(|s| s.conns == n && &s.target == t)
                .map(|s| s.echoed)
                .min()
                .unwrap_or(0);
            let kernel = of(t, &|s| Some(s.slab_kib)).map(|k| k - direct_slab);
            let sum = total(t);
            let ratio = sum.zip(haproxy).map(|(a, b)| a / b);
            let _ = writeln!(
                o,
                "| {t} | {} | {} | {} | {} | {} | {} | {echoed}/{n} |",
                f(of(t, &|s| s.user_kib), 1),
                if t == "direct" {
                    format!("({direct_slab:.1} own)")
                } else {
                    f(kernel, 1)
                },
                f(sum, 1),
                f(ratio, 2),
                f(of(t, &|s| s.fds), 1),
                f(of(t, &|s| Some(s.open_secs)), 2),
            );
        }
        let _ = writeln!(o);
    }
    for s in samples.iter().filter(|s| s.error.is_some()) {
        let _ = writeln!(
            o,
            "- {} {} repeat {}: {}",
            s.target,
            s.conns,
            s.repeat,
            s.error.as_deref().unwrap_or("")
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_spread_over_loopback() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(source(0), ip("127.0.0.2"));
        assert_eq!(source(PER_SOURCE - 1), ip("127.0.0.2"));
        assert_eq!(source(PER_SOURCE), ip("127.0.0.3"));
        assert_eq!(source(100_000), ip("127.0.0.7"));
        assert_eq!(source(PER_SOURCE * 300), ip("127.0.1.46"));
        assert_eq!(source(u32::MAX), ip("127.0.255.255"));
    }
}
