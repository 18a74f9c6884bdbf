//! `splicegate-bench`: splicegate against a direct connection, HAProxy and
//! nginx, measured side by side in one run on this machine.
//!
//! ```text
//! bench/run.sh --quick                # installs HAProxy and nginx, builds, runs
//! splicegate-bench suite --smoke      # tiny counts, for CI
//! splicegate-bench terminate --quick  # terminate mode against nginx https
//! splicegate-bench agent --listen 0.0.0.0:9443 --self-signed agent.example
//! splicegate-bench probe rtt --addr proxy:8443 --sni agent.example --ca agent.pem \
//!     --compare agent:9443 --rate 2000
//! ```
//!
//! Targets are interleaved per repeat (A B C A B C ...). Results go to
//! `target/bench/<timestamp>/` (or `--out DIR`): `results.md`, `results.json`, `rtt.svg`.

mod agent;
mod idle;
mod load;
mod probe;
mod report;
mod standalone;
mod targets;
mod terminate;
mod udp;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;

use load::{Setup, Summary};
use targets::Kind;

#[derive(Parser)]
#[command(about = "Latency and throughput: splicegate vs direct, HAProxy and nginx")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every test against every target, interleaved, and write a report.
    Suite(SuiteArgs),
    /// Terminate mode: splicegate and nginx ending TLS, reading the HTTP
    /// upgrade and re-encrypting to the agent, against a direct connection.
    Terminate(SuiteArgs),
    /// Memory per idle connection (user and kernel) at several sizes.
    Idle(idle::IdleArgs),
    /// The QUIC relay against direct and nginx's stream UDP proxy: round
    /// trips and bulk with 1200-byte datagrams.
    Udp(udp::UdpArgs),
    /// The echo/bulk agent on its own, for measuring a real path with
    /// `probe` (TLS; WebSocket upgrade when the first bytes are `GET `).
    Agent(standalone::AgentArgs),
    /// Measure any address: an agent, a splicegate in front of it, an NLB
    /// or endpoint in front of that; optionally against a second address.
    Probe(probe::ProbeArgs),
}

#[derive(clap::Args, Clone)]
struct SuiteArgs {
    /// Small counts: finishes in under 2 minutes.
    #[arg(long)]
    quick: bool,
    /// Tiny counts: checks that everything runs (CI).
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,
    /// Repeats (default 3, 1 with --quick or --smoke).
    #[arg(long)]
    repeats: Option<u32>,
    /// Comma-separated targets (default: all). `suite`: direct,
    /// splicegate-splice, splicegate-copy, haproxy, haproxy-splice-auto,
    /// haproxy-splice, nginx. `terminate`: direct, splicegate-terminate,
    /// nginx-https.
    #[arg(long)]
    targets: Option<String>,
    /// The splicegate binary.
    #[arg(long, default_value = "target/release/splicegate")]
    splicegate: PathBuf,
    /// Output folder (default target/bench/<timestamp>; runs that docs
    /// cite go under bench/results/NAME and are committed).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Comma-separated tests to run (default: all): setup, rtt,
    /// rtt-concurrent, bulk, raw-bulk, raw-rtt, idle. The others' cells
    /// stay empty.
    #[arg(long, value_parser = parse_only)]
    only: Option<String>,
}

/// The tests `--only` names.
const TESTS: [&str; 7] = [
    "setup",
    "rtt",
    "rtt-concurrent",
    "bulk",
    "raw-bulk",
    "raw-rtt",
    "idle",
];

fn parse_only(list: &str) -> Result<String, String> {
    for t in list.split(',') {
        if !TESTS.contains(&t.trim()) {
            return Err(format!("unknown test {t:?} (one of {})", TESTS.join(", ")));
        }
    }
    Ok(list.to_owned())
}

/// `--only`: the tests this run measures (unset: all).
static ONLY: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Whether the test `what` (its first word) is measured in this run.
fn wanted(what: &str) -> bool {
    let test = what.split_whitespace().next().unwrap_or(what);
    ONLY.get().is_none_or(|only| only.iter().any(|t| t == test))
}

/// Counts for one run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Params {
    /// `passthrough` (the main suite) or `terminate`.
    mode: &'static str,
    setup_conns: u32,
    rtt_rounds: u32,
    concurrent_conns: u32,
    /// The smaller concurrency point (8), measured beside `concurrent_conns`.
    concurrent_small: u32,
    concurrent_secs: f64,
    bulk_bytes: u64,
    raw_bulk_bytes: u64,
    idle_conns: u32,
    /// How long the proxy's CPU is watched with the idle connections held.
    idle_secs: f64,
    repeats: u32,
    /// Tiny counts that only check the harness works (`--smoke`).
    smoke: bool,
}

impl Params {
    fn from(a: &SuiteArgs, mode: &'static str) -> Params {
        let mut p = if a.smoke {
            Params {
                mode,
                setup_conns: 3,
                rtt_rounds: 100,
                concurrent_conns: 2,
                concurrent_small: 2,
                concurrent_secs: 0.2,
                bulk_bytes: 1 << 20,
                raw_bulk_bytes: 4 << 20,
                idle_conns: 10,
                idle_secs: 0.2,
                repeats: 1,
                smoke: true,
            }
        } else if a.quick {
            Params {
                mode,
                setup_conns: 100,
                rtt_rounds: 10_000,
                concurrent_conns: 4,
                concurrent_small: 8,
                concurrent_secs: 2.0,
                bulk_bytes: 512 << 20,
                raw_bulk_bytes: 2 << 30,
                idle_conns: 1000,
                idle_secs: 2.0,
                repeats: 1,
                smoke: false,
            }
        } else {
            Params {
                mode,
                setup_conns: 200,
                rtt_rounds: 20_000,
                concurrent_conns: 50,
                concurrent_small: 8,
                concurrent_secs: 5.0,
                bulk_bytes: 1 << 30,
                raw_bulk_bytes: 4 << 30,
                idle_conns: 2000,
                idle_secs: 10.0,
                repeats: 3,
                smoke: false,
            }
        };
        if let Some(r) = a.repeats {
            p.repeats = r.max(1);
        }
        if mode == "terminate" {
            // No raw transfers or idle test: bytes are decrypted anyway.
            p.raw_bulk_bytes = 0;
            p.idle_conns = 0;
        }
        p
    }
}

/// One repeat of every test against one target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Run {
    repeat: u32,
    setup: Option<Setup>,
    rtt: Option<Summary>,
    rtt_concurrent: Option<Summary>,
    ops_per_sec: Option<f64>,
    /// rtt-concurrent at the smaller point (8 connections).
    rtt_concurrent_small: Option<Summary>,
    ops_per_sec_small: Option<f64>,
    /// Whole machine's CPU per round trip, one connection (rtt test), µs.
    machine_cpu_us_per_rtt: Option<f64>,
    /// Whole machine's CPU per round trip at `concurrent_conns`, µs.
    machine_cpu_us_per_op: Option<f64>,
    /// CPU idle-state entries (all CPUs) per round trip, one connection.
    idle_entries_per_rtt: Option<f64>,
    /// Target processes' CPU while the idle connections are held, % of
    /// one CPU.
    idle_cpu_pct: Option<f64>,
    bulk_gbit: Option<f64>,
    raw_bulk_gbit: Option<f64>,
    raw_rtt: Option<Summary>,
    /// Target processes' CPU per GiB of raw bulk.
    proxy_cpu_s_per_gib: Option<f64>,
    /// Whole machine's CPU per GiB of raw bulk (client and agents included).
    machine_cpu_s_per_gib: Option<f64>,
    /// Target processes' CPU per new TLS connection (setup test).
    proxy_cpu_ms_per_conn: Option<f64>,
    idle_rss_kib_per_conn: Option<f64>,
    idle_fds_per_conn: Option<f64>,
    errors: Vec<String>,
}

impl Run {
    /// A bulk transfer of `bytes` agent → client on the stream `open`
    /// gives, in Gbit/s; the target's and the machine's CPU per GiB during
    /// it are recorded in the run.
    async fn bulk_with_cpu<S>(
        &mut self,
        what: &str,
        bytes: u64,
        pids: &[u32],
        open: impl std::future::Future<Output = std::io::Result<S>>,
    ) -> Option<f64>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (cpu0, m0) = (targets::cpu_seconds(pids), targets::machine_seconds());
        let gbit = self
            .step(what, async {
                let mut s = open.await?;
                load::bulk(&mut s, bytes)
                    .await
                    .map(|secs| bytes as f64 * 8.0 / secs / 1e9)
            })
            .await?;
        let gib = bytes as f64 / f64::from(1u32 << 30);
        self.machine_cpu_s_per_gib = Some((targets::machine_seconds() - m0) / gib);
        if !pids.is_empty() {
            self.proxy_cpu_s_per_gib = Some((targets::cpu_seconds(pids) - cpu0) / gib);
        }
        Some(gbit)
    }

    /// Await one test, bounded to 300 s; a failure or timeout is recorded
    /// in `errors` and gives None. A test `--only` leaves out gives None.
    async fn step<T, E: std::fmt::Display>(
        &mut self,
        what: &str,
        test: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<T> {
        if !wanted(what) {
            return None;
        }
        let limit = Duration::from_secs(300);
        match tokio::time::timeout(limit, test).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.errors.push(format!("{what}: {e}"));
                None
            }
            Err(_) => {
                self.errors
                    .push(format!("{what}: no result within {limit:?}"));
                None
            }
        }
    }
}

/// Everything about one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    name: String,
    /// "ok", or why the target was skipped.
    status: String,
    runs: Vec<Run>,
}

fn parse_targets(list: &str) -> Result<Vec<Kind>, String> {
    list.split(',')
        .map(|t| match t.trim() {
            "direct" => Ok(Kind::Direct),
            "splicegate-splice" => Ok(Kind::Splicegate("splice")),
            "splicegate-copy" => Ok(Kind::Splicegate("copy")),
            "splicegate-splice-64k" => Ok(Kind::Splicegate("splice-64k")),
            "splicegate-splice-256k" => Ok(Kind::Splicegate("splice-256k")),
            "splicegate-splice-1m" => Ok(Kind::Splicegate("splice-1m")),
            "splicegate-splice-spin10" => Ok(Kind::Splicegate("splice-spin10")),
            "splicegate-splice-spin30" => Ok(Kind::Splicegate("splice-spin30")),
            "splicegate-splice-spin50" => Ok(Kind::Splicegate("splice-spin50")),
            "splicegate-splice-spin100" => Ok(Kind::Splicegate("splice-spin100")),
            "splicegate-copy-spin50" => Ok(Kind::Splicegate("copy-spin50")),
            "splicegate-uring" => Ok(Kind::Splicegate("uring")),
            "splicegate-uring-splice" => Ok(Kind::Splicegate("uring-splice")),
            "haproxy" => Ok(Kind::Haproxy("")),
            "haproxy-splice-auto" => Ok(Kind::Haproxy("option splice-auto")),
            "haproxy-splice" => Ok(Kind::Haproxy(
                "option splice-request\n  option splice-response",
            )),
            "nginx" => Ok(Kind::Nginx),
            other => Err(format!("unknown target {other:?}")),
        })
        .collect()
}

fn main() -> std::process::ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = match Cli::parse().command {
        Cmd::Suite(a) => rt.block_on(suite(a, "passthrough")),
        Cmd::Terminate(a) => rt.block_on(suite(a, "terminate")),
        Cmd::Idle(a) => rt.block_on(idle::run(a)),
        Cmd::Udp(a) => rt.block_on(udp::run(a)),
        Cmd::Agent(a) => rt.block_on(standalone::run(a)),
        Cmd::Probe(a) => return rt.block_on(probe::run(a)),
    };
    match result {
        Ok(clean) if clean => std::process::ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("splicegate-bench: finished with errors (marked in the report)");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("splicegate-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The agents of one suite and how its targets are started, checked and
/// measured.
enum Bench {
    Passthrough(agent::Agents, Vec<Kind>),
    Terminate(terminate::Web, Vec<String>),
}

impl Bench {
    async fn new(mode: &str, targets: Option<&str>) -> Result<Bench, String> {
        if mode == "terminate" {
            let list = targets.map_or_else(
                || terminate::TARGETS.iter().map(|t| t.to_string()).collect(),
                |l| {
                    l.split(',')
                        .map(|t| t.trim().to_owned())
                        .collect::<Vec<_>>()
                },
            );
            if let Some(bad) = list
                .iter()
                .find(|t| !terminate::TARGETS.contains(&t.as_str()))
            {
                return Err(format!("unknown terminate target {bad:?}"));
            }
            let web = terminate::start_agent()
                .await
                .map_err(|e| format!("cannot start the agent: {e}"))?;
            Ok(Bench::Terminate(web, list))
        } else {
            let kinds = parse_targets(targets.unwrap_or(
                "direct,splicegate-splice,splicegate-copy,haproxy,haproxy-splice-auto,haproxy-splice,nginx",
            ))?;
            let agents = agent::start()
                .await
                .map_err(|e| format!("cannot start agents: {e}"))?;
            Ok(Bench::Passthrough(agents, kinds))
        }
    }

    fn client(&self) -> std::sync::Arc<rustls::ClientConfig> {
        match self {
            Bench::Passthrough(a, _) => agent::client(a),
            Bench::Terminate(w, _) => splicegate::testkit::client_config(&[&w.id], &["http/1.1"])
                .expect("valid client config"),
        }
    }

    fn names(&self) -> Vec<String> {
        match self {
            Bench::Passthrough(_, kinds) => kinds.iter().map(targets::name).collect(),
            Bench::Terminate(_, list) => list.iter().map(|t| terminate::name(t)).collect(),
        }
    }

    async fn start(
        &self,
        i: usize,
        splicegate: &std::path::Path,
        tls: &std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<targets::Running, String> {
        match self {
            Bench::Passthrough(agents, kinds) => {
                let r = targets::start(&kinds[i], agents, splicegate, 5000)?;
                routing_check(&r, agents, tls)
                    .await
                    .map_err(|e| format!("routing check failed: {e}"))?;
                Ok(r)
            }
            Bench::Terminate(web, list) => {
                let r = terminate::start(&list[i], web, splicegate)?;
                terminate::check(r.listen.unwrap_or(web.addr), tls)
                    .await
                    .map_err(|e| format!("routing check failed: {e}"))?;
                Ok(r)
            }
        }
    }

    async fn measure(
        &self,
        t: &targets::Running,
        tls: &std::sync::Arc<rustls::ClientConfig>,
        p: &Params,
        repeat: u32,
    ) -> Run {
        match self {
            Bench::Passthrough(agents, _) => measure(t, agents, tls, p, repeat).await,
            Bench::Terminate(web, _) => terminate::measure(t, web, tls, p, repeat).await,
        }
    }
}

/// The whole run. Ok(true) when every target ran without errors.
async fn suite(args: SuiteArgs, mode: &'static str) -> Result<bool, String> {
    if let Some(only) = &args.only {
        let _ = ONLY.set(only.split(',').map(|t| t.trim().to_owned()).collect());
    }
    let params = Params::from(&args, mode);
    let bench = Bench::new(mode, args.targets.as_deref()).await?;
    let tls = bench.client();
    let started = Instant::now();
    // A hard bound on the whole run.
    let budget = Duration::from_secs(if args.smoke {
        300
    } else if args.quick {
        600
    } else {
        3600
    });

    let mut results: Vec<TargetResult> = Vec::new();
    let mut running = Vec::new();
    for (i, name) in bench.names().into_iter().enumerate() {
        eprintln!("starting {name}");
        match bench.start(i, &args.splicegate, &tls).await {
            Ok(r) => {
                results.push(TargetResult {
                    name,
                    status: "ok".into(),
                    runs: Vec::new(),
                });
                running.push(Some(r));
            }
            Err(e) => {
                eprintln!("  skipped: {e}");
                results.push(TargetResult {
                    name,
                    status: format!("skipped: {e}"),
                    runs: Vec::new(),
                });
                running.push(None);
            }
        }
    }

    for repeat in 0..params.repeats {
        for (i, slot) in running.iter_mut().enumerate() {
            let Some(target) = slot.as_mut() else {
                continue;
            };
            if started.elapsed() > budget {
                results[i].status = format!("stopped: the run exceeded its {budget:?} bound");
                *slot = None;
                continue;
            }
            if let Some(how) = target.exited() {
                results[i].status = format!("died during the run: {how}");
                *slot = None;
                continue;
            }
            eprintln!("repeat {repeat}: {}", results[i].name);
            let run = bench.measure(target, &tls, &params, repeat).await;
            for e in &run.errors {
                eprintln!("  error: {e}");
            }
            if let Some(how) = target.exited() {
                results[i].status = format!("died during the run: {how}");
                *slot = None;
            }
            results[i].runs.push(run);
        }
    }
    for r in running.iter_mut().flatten() {
        r.stop();
    }

    let clean = results.iter().all(|t| {
        (t.status == "ok" || t.status.starts_with("skipped"))
            && t.runs.iter().all(|r| r.errors.is_empty())
    });
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench").join(report::timestamp()));
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let md = report::markdown(&results, &params, &command, clean);
    std::fs::write(out.join("results.md"), &md).map_err(|e| e.to_string())?;
    let json = serde_json::json!({ "command": command, "params": params, "clean": clean, "targets": results });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(out.join("rtt.svg"), report::svg(&results)).map_err(|e| e.to_string())?;
    println!("{md}");
    if params.smoke {
        println!("{}", report::SMOKE_NOTE);
    }
    println!("written to {}", out.display());
    Ok(clean)
}

/// Every agent answers through the target with its own name.
async fn routing_check(
    t: &targets::Running,
    agents: &agent::Agents,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    for name in agent::NAMES {
        let addr = t.addr(agents, name);
        let sni = agent::sni(name);
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            if name.starts_with("tls") {
                let (mut s, _, _) = load::tls_open(addr, &sni, tls).await?;
                load::identify(&mut s).await
            } else {
                let mut s = load::raw_open(addr, &sni).await?;
                load::identify(&mut s).await
            }
        })
        .await
        .map_err(|_| format!("{sni}: no answer within 10 s"))?
        .map_err(|e| format!("{sni}: {e}"))?;
        if got != name {
            return Err(format!("{sni} reached agent {got:?}"));
        }
    }
    Ok(())
}

async fn measure(
    t: &targets::Running,
    agents: &agent::Agents,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    p: &Params,
    repeat: u32,
) -> Run {
    let mut run = Run {
        repeat,
        ..Run::default()
    };
    let tls_addr = t.addr(agents, "tls-a");
    let raw_addr = t.addr(agents, "raw-a");
    let (tls_sni, raw_sni) = (agent::sni("tls-a"), agent::sni("raw-a"));
    let pids = t.pids();

    let cpu0 = targets::cpu_seconds(&pids);
    run.setup = run
        .step("setup", load::setup(tls_addr, &tls_sni, tls, p.setup_conns))
        .await;
    if run.setup.is_some() && !pids.is_empty() {
        run.proxy_cpu_ms_per_conn =
            Some((targets::cpu_seconds(&pids) - cpu0) * 1e3 / f64::from(p.setup_conns));
    }

    let (m0, i0) = (targets::machine_seconds(), targets::idle_entries());
    run.rtt = run
        .step("rtt", async {
            let (mut s, _, _) = load::tls_open(tls_addr, &tls_sni, tls).await?;
            load::round_trips(&mut s, p.rtt_rounds)
                .await
                .map(|h| load::summary(&h))
        })
        .await;
    if run.rtt.is_some() {
        // Warm-up rounds included: a tenth more than recorded.
        let rounds = f64::from(p.rtt_rounds + p.rtt_rounds / 10);
        run.machine_cpu_us_per_rtt = Some((targets::machine_seconds() - m0) * 1e6 / rounds);
        run.idle_entries_per_rtt = Some((targets::idle_entries() - i0) as f64 / rounds);
    }
    for (conns, small) in [(p.concurrent_small, true), (p.concurrent_conns, false)] {
        let m0 = targets::machine_seconds();
        let secs = Duration::from_secs_f64(p.concurrent_secs);
        let what = format!("rtt-concurrent {conns}");
        let measured = run
            .step(
                &what,
                load::rtt_concurrent(tls_addr, &tls_sni, tls, conns, secs),
            )
            .await;
        if let Some((s, ops)) = measured {
            if small {
                run.rtt_concurrent_small = Some(s);
                run.ops_per_sec_small = Some(ops);
            } else {
                let spent = targets::machine_seconds() - m0;
                run.machine_cpu_us_per_op = Some(spent * 1e6 / (ops * secs.as_secs_f64()));
                run.rtt_concurrent = Some(s);
                run.ops_per_sec = Some(ops);
            }
        }
    }
    run.bulk_gbit = run
        .step("bulk", async {
            let (mut s, _, _) = load::tls_open(tls_addr, &tls_sni, tls).await?;
            load::bulk(&mut s, p.bulk_bytes)
                .await
                .map(|secs| p.bulk_bytes as f64 * 8.0 / secs / 1e9)
        })
        .await;

    run.raw_bulk_gbit = run
        .bulk_with_cpu(
            "raw-bulk",
            p.raw_bulk_bytes,
            &pids,
            load::raw_open(raw_addr, &raw_sni),
        )
        .await;
    run.raw_rtt = run
        .step("raw-rtt", async {
            let mut s = load::raw_open(raw_addr, &raw_sni).await?;
            load::round_trips(&mut s, p.rtt_rounds)
                .await
                .map(|h| load::summary(&h))
        })
        .await;

    if !pids.is_empty() {
        let pids = t.pids();
        let (rss0, fds0) = (targets::rss_kib(&pids), targets::fds(&pids));
        if let Some(held) = run
            .step("idle", load::idle(raw_addr, &raw_sni, p.idle_conns))
            .await
        {
            let pids = t.pids();
            let k = f64::from(p.idle_conns);
            run.idle_rss_kib_per_conn = Some((targets::rss_kib(&pids) as f64 - rss0 as f64) / k);
            run.idle_fds_per_conn = Some((targets::fds(&pids) as f64 - fds0 as f64) / k);
            let (cpu0, t0) = (targets::cpu_seconds(&pids), Instant::now());
            tokio::time::sleep(Duration::from_secs_f64(p.idle_secs)).await;
            let spent = targets::cpu_seconds(&pids) - cpu0;
            run.idle_cpu_pct = Some(spent * 100.0 / t0.elapsed().as_secs_f64());
            drop(held);
        }
    }
    run
}
