//! First simple benchmark: splicegate's own forwarding cost, measured side by
//! side with a direct connection in one run.
//!
//! The client sends a real ClientHello, then the agent answers with plain
//! bytes instead of TLS, so TLS cost at the ends does not hide the proxy's.
//! Targets, interleaved per repeat: direct, splicegate `--engine splice`,
//! splicegate `--engine copy`.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench -- --repeats 3
//! ```
//!
//! Everything runs on 127.0.0.1; every loop is bounded in count.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use splicegate::sniff::{HelloParser, Progress};
use splicegate::testkit::client_hello;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Args {
    bytes: u64,
    rounds: u32,
    repeats: u32,
    bin: String,
}

fn args() -> Args {
    let mut a = Args {
        bytes: 2 << 30,
        rounds: 20_000,
        repeats: 3,
        bin: "target/release/splicegate".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--bytes" => a.bytes = v.parse().expect("--bytes N"),
            "--rounds" => a.rounds = v.parse().expect("--rounds N"),
            "--repeats" => a.repeats = v.parse().expect("--repeats N"),
            "--splicegate" => a.bin = v,
            _ => panic!("unknown option {k} (options: --bytes --rounds --repeats --splicegate)"),
        }
    }
    a
}

/// Plain agent: reads the ClientHello, then a command byte: `B` + u64 =
/// send that many bytes and close; `E` = echo until EOF.
async fn agent() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.set_nodelay(true).ok();
                let mut buf = Vec::with_capacity(4096);
                let mut p = HelloParser::new(16384);
                let hello_len = loop {
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if let Ok(Progress::Done(_)) = p.advance(&buf) {
                        break client_hello(Some("bench.test"), &[], 1 << 14).len();
                    }
                };
                while buf.len() < hello_len + 1 {
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                match buf[hello_len] {
                    b'B' => {
                        while buf.len() < hello_len + 9 {
                            if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                                return;
                            }
                        }
                        let mut n = u64::from_be_bytes(
                            buf[hello_len + 1..hello_len + 9].try_into().unwrap(),
                        );
                        let chunk = vec![0x5au8; 256 * 1024];
                        while n > 0 {
                            let k = n.min(chunk.len() as u64) as usize;
                            if s.write_all(&chunk[..k]).await.is_err() {
                                return;
                            }
                            n -= k as u64;
                        }
                    }
                    _ => {
                        // Echo whatever followed the command byte, then
                        // everything after.
                        if s.write_all(&buf[hello_len + 1..]).await.is_err() {
                            return;
                        }
                        let mut b = [0u8; 4096];
                        while let Ok(n @ 1..) = s.read(&mut b).await {
                            if s.write_all(&b[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Busy jiffies of the whole machine (softirq work lands on whichever task
/// runs, so per-process CPU would mislead).
fn busy_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    v.iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum()
}

/// `/proc/stat` counts in USER_HZ, which is 100 on Linux.
const USER_HZ: f64 = 100.0;

async fn bulk(target: SocketAddr, bytes: u64) -> (f64, f64) {
    let mut s = TcpStream::connect(target).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut req = client_hello(Some("bench.test"), &[], 1 << 14);
    req.push(b'B');
    req.extend_from_slice(&bytes.to_be_bytes());
    let cpu0 = busy_jiffies();
    let t = Instant::now();
    s.write_all(&req).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = (busy_jiffies() - cpu0) as f64 / USER_HZ;
    assert_eq!(got, bytes, "short transfer");
    let gib = bytes as f64 / f64::from(1u32 << 30);
    (bytes as f64 * 8.0 / secs / 1e9, cpu / gib)
}

async fn rtt(target: SocketAddr, rounds: u32) -> (u64, u64) {
    let mut s = TcpStream::connect(target).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut req = client_hello(Some("bench.test"), &[], 1 << 14);
    req.push(b'E');
    s.write_all(&req).await.unwrap();
    let mut h = Histogram::<u64>::new(3).unwrap();
    let msg = [1u8; 64];
    let mut back = [0u8; 64];
    for i in 0..rounds + 200 {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        if i >= 200 {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    (h.value_at_quantile(0.5), h.value_at_quantile(0.99))
}

fn start_proxy(bin: &str, agent: SocketAddr, engine: &str) -> (Child, SocketAddr) {
    let mut child = Command::new(bin)
        .args([
            "--log-format",
            "json",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--agent",
        ])
        .arg(agent.to_string())
        .args(["--engine", engine])
        .env("SPLICEGATE_LOG", "warn,splicegate::server=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e} (run `cargo build --release` first)"));
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("splicegate exited before listening")
            .unwrap();
        if let Some(i) = line.find("\"addr\":\"") {
            let rest = &line[i + 8..];
            break rest[..rest.find('"').unwrap()].parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// Per target: Gbit/s, CPU s/GiB, p50 ns, p99 ns; one value per repeat.
type Samples = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = args();
    let agent = agent().await;
    let (mut splice, splice_addr) = start_proxy(&a.bin, agent, "splice");
    let (mut copy, copy_addr) = start_proxy(&a.bin, agent, "copy");
    let targets = [
        ("direct", agent),
        ("splicegate splice", splice_addr),
        ("splicegate copy", copy_addr),
    ];
    let mut results: Vec<Samples> = vec![Default::default(); targets.len()];
    let deadline = Instant::now() + Duration::from_secs(600);
    for r in 0..a.repeats {
        for (i, (name, addr)) in targets.iter().enumerate() {
            assert!(
                Instant::now() < deadline,
                "benchmark exceeded its 10-minute bound"
            );
            let (gbit, cpu) = bulk(*addr, a.bytes).await;
            let (p50, p99) = rtt(*addr, a.rounds).await;
            eprintln!("repeat {r} {name}: {gbit:.1} Gbit/s, {cpu:.2} CPU s/GiB, rtt p50 {p50} ns p99 {p99} ns");
            let e = &mut results[i];
            e.0.push(gbit);
            e.1.push(cpu);
            e.2.push(p50 as f64);
            e.3.push(p99 as f64);
        }
    }
    for child in [&mut splice, &mut copy] {
        // SIGTERM: splicegate drains (nothing is open now) and exits.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
    }
    let base = (
        median(results[0].1.clone()),
        median(results[0].2.clone()),
        median(results[0].3.clone()),
    );
    println!("| target | raw bulk Gbit/s | machine CPU s/GiB (over direct) | 64 B round trip p50 / p99 µs (added) |");
    println!("|---|---|---|---|");
    for (i, (name, _)) in targets.iter().enumerate() {
        let (g, c, p50, p99) = (
            median(results[i].0.clone()),
            median(results[i].1.clone()),
            median(results[i].2.clone()),
            median(results[i].3.clone()),
        );
        println!(
            "| {name} | {g:.1} | {c:.2} (+{:.2}) | {:.1} / {:.1} (+{:.1} / +{:.1}) |",
            c - base.0,
            p50 / 1e3,
            p99 / 1e3,
            (p50 - base.1) / 1e3,
            (p99 - base.2) / 1e3
        );
    }
    println!();
    println!(
        "medians of {} repeats; {} bytes per bulk run, {} round trips per rtt run",
        a.repeats, a.bytes, a.rounds
    );
}
