//! `splicegate-bench agent` and `probe`, through the real binaries on
//! loopback: against the agent directly and through `splicegate run`
//! (passthrough with a PROXY v2 header, terminate with a WebSocket
//! upgrade), `--compare`, the rate mode's schedule and its view of a
//! stall, JSON and SVG output, and named errors with their exit status.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{require, Proxy};
use serde_json::Value;

/// The harness binary, built by `cargo test --workspace` beside splicegate.
fn bench_bin() -> Option<PathBuf> {
    let dir = Path::new(common::bin()).parent()?;
    let p = dir.join("splicegate-bench");
    p.is_file().then_some(p)
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("splicegate-probe-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running `splicegate-bench agent`; killed on drop.
struct BenchAgent {
    child: Child,
    addr: SocketAddr,
    cert: PathBuf,
}

impl BenchAgent {
    fn start(bench: &Path, dir: &Path, extra: &[&str]) -> BenchAgent {
        let cert = dir.join("agent.pem");
        let mut child = Command::new(bench)
            .args([
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--self-signed",
                "agent.test",
                "--name",
                "probe-agent",
            ])
            .arg("--cert-out")
            .arg(&cert)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn splicegate-bench agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("agent said {line:?}"))
            .parse()
            .unwrap();
        BenchAgent { child, addr, cert }
    }
}

impl BenchAgent {
    /// Probe arguments for this agent, directly: `MODE --addr .. --sni
    /// agent.test --ca ..`, then `extra`.
    fn args(&self, mode: &str, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            mode,
            "--addr",
            &self.addr.to_string(),
            "--sni",
            "agent.test",
            "--ca",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(self.cert.to_string_lossy().into_owned());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `MODE --addr ADDR --sni SNI --ca CA EXTRA...`
fn args(mode: &str, addr: &str, sni: &str, ca: &str, extra: &[&str]) -> Vec<String> {
    let head = [mode, "--addr", addr, "--sni", sni, "--ca", ca];
    head.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn probe<S: AsRef<std::ffi::OsStr>>(bench: &Path, args: &[S]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(bench)
        .arg("probe")
        .args(args)
        .output()
        .expect("run splicegate-bench probe");
    (out, t.elapsed())
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe printed no JSON ({e}):\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "probe failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The harness binary, and a guard that runs these tests one at a time: the
/// rate test's schedule and the latencies should not share two cores with
/// the other tests' load.
fn setup() -> Option<(PathBuf, MutexGuard<'static, ()>)> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let b = bench_bin();
    if !require(
        b.is_some(),
        "target/debug/splicegate-bench (cargo build -p splicegate-bench)",
    ) {
        return None;
    }
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Some((b.unwrap(), guard))
}

#[test]
fn compare_direct_and_through_splicegate_with_proxy_v2() {
    let Some((bench, _serial)) = setup() else {
        return;
    };
    let dir = temp_dir("compare");
    let agent = BenchAgent::start(&bench, &dir, &[]);
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nproxy_protocol = \"v2\"\nproxy_trusted = [\"127.0.0.0/8\"]\n\
         [[route]]\nsni = \"agent.test\"\nagent = \"{}\"\n[routing]\nno_sni = \"reject\"\n",
        agent.addr
    );
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let svg = dir.join("rtt.svg");
    let (pa, aa) = (proxy.addr.to_string(), agent.addr.to_string());
    let (out, _) = probe(
        &bench,
        &args(
            "rtt",
            &pa,
            "agent.test",
            agent.cert.to_str().unwrap(),
            &[
                "--proxy-v2",
                "192.0.2.7:40000",
                "--compare",
                &aa,
                "--count",
                "400",
                "--warmup",
                "40",
                "--repeats",
                "2",
                "--json",
                "--svg",
                svg.to_str().unwrap(),
            ],
        ),
    );
    ok(&out);
    let j = json(&out);
    assert_eq!(j["params"]["mode"], "rtt");
    assert_eq!(j["params"]["repeats"], 2);
    let eps = j["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2);
    assert_eq!(eps[0]["addr"], pa);
    assert_eq!(eps[1]["addr"], aa);
    for ep in eps {
        assert_eq!(ep["sni"], "agent.test");
        assert_eq!(ep["repeats"].as_array().unwrap().len(), 2);
        assert_eq!(ep["merged"]["count"], 800, "2 repeats x 400 round trips");
        for k in ["p50", "p90", "p99", "p999", "max"] {
            assert!(ep["merged"][k].as_f64().unwrap() > 0.0, "{k}");
        }
        assert!(ep["ops_per_sec"].as_f64().unwrap() > 0.0);
        assert_eq!(ep["errors"], serde_json::json!({}));
        assert_eq!(ep["merged"]["curve"].as_array().unwrap().len(), 8);
    }
    for k in ["p50", "p90", "p99", "p99.9", "max"] {
        let s = &j["added_us"][k];
        let (lo, mid, hi) = (
            s["min"].as_f64().unwrap(),
            s["median"].as_f64().unwrap(),
            s["max"].as_f64().unwrap(),
        );
        assert!(lo <= mid && mid <= hi, "{k}: {s}");
    }
    assert!(j["error"].is_null());
    // The header reached splicegate: its access log names the client it carried.
    let routed = proxy.event("routed", |v| v["span"]["client"] == "192.0.2.7:40000");
    assert_eq!(routed["sni"], "agent.test");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(plot.matches("<polyline").count(), 2);
    assert!(plot.contains(&pa) && plot.contains(&aa));
    // The terminal summary names the difference.
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&format!("added by {pa} over {aa}")), "{text}");
}

#[test]
fn terminate_mode_with_websocket_upgrade() {
    let Some((bench, _serial)) = setup() else {
        return;
    };
    let dir = temp_dir("terminate");
    let agent = BenchAgent::start(&bench, &dir, &[]);
    let certs = dir.join("proxy");
    let made = Command::new(common::bin())
        .args(["cert", "--san", "DNS:proxy.test", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (cert, key) = (certs.join("cert.pem"), certs.join("key.pem"));
    let aa = agent.addr.to_string();
    let proxy = Proxy::start(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--upstream-ca",
            agent.cert.to_str().unwrap(),
            "--agent",
            &aa,
        ],
    );
    let pa = proxy.addr.to_string();
    let ca = cert.to_str().unwrap();
    let (out, _) = probe(
        &bench,
        &args(
            "setup",
            &pa,
            "proxy.test",
            ca,
            &["--websocket", "/ws", "--count", "20", "--json"],
        ),
    );
    ok(&out);
    let j = json(&out);
    let run = &j["endpoints"][0]["repeats"][0];
    assert_eq!(run["latency"]["count"], 20);
    let phases = run["phases_p50_us"].as_array().unwrap();
    assert!(
        phases.iter().all(|p| p.as_f64().unwrap() > 0.0),
        "connect, handshake, upgrade: {phases:?}"
    );

    let (out, _) = probe(
        &bench,
        &args(
            "bulk",
            &pa,
            "proxy.test",
            ca,
            &["--websocket", "/ws", "--bytes", "8388608", "--json"],
        ),
    );
    ok(&out);
    assert!(json(&out)["endpoints"][0]["gbit"].as_f64().unwrap() > 0.0);

    // Without the upgrade the head is no request a proxy forwards: the
    // probe says the upgrade was refused, with status 5.
    let (out, _) = probe(
        &bench,
        &args(
            "rtt",
            &pa,
            "proxy.test",
            ca,
            &["--websocket", "/ws nope", "--count", "5"],
        ),
    );
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("upgrade refused: HTTP/1.1 400"));
}

#[test]
fn rate_mode_holds_its_schedule_and_sees_a_stall() {
    let Some((bench, _serial)) = setup() else {
        return;
    };
    let dir = temp_dir("rate");
    // One reply held 50 ms, 2.5 s into the run.
    let agent = BenchAgent::start(&bench, &dir, &["--stall-at", "2.5", "--stall-ms", "50"]);
    let (out, took) = probe(
        &bench,
        &agent.args("rtt", &["--rate", "2000", "--duration", "5", "--json"]),
    );
    ok(&out);
    assert!(took < Duration::from_secs(30), "bounded: {took:?}");
    let j = json(&out);
    let run = &j["endpoints"][0]["repeats"][0];
    let s = &run["schedule"];
    assert_eq!(s["planned"], 10_000);
    assert_eq!(s["sent"], 10_000);
    let (planned, actual) = (
        s["planned_s"].as_f64().unwrap(),
        s["actual_s"].as_f64().unwrap(),
    );
    assert!(
        (actual - planned).abs() <= planned * 0.01,
        "schedule held within 1%: {s}"
    );
    assert_eq!(run["latency"]["count"], 10_000);
    // The messages scheduled during the stall waited for it: latency from
    // their scheduled time spans 0..50 ms, so the top 0.1% (10 messages)
    // sit above 40 ms. A closed loop would have recorded one slow sample.
    let (p999, max) = (
        run["latency"]["p999"].as_f64().unwrap(),
        run["latency"]["max"].as_f64().unwrap(),
    );
    assert!(max >= 50_000.0, "max {max} µs");
    assert!(p999 >= 40_000.0, "p99.9 {p999} µs");
}

#[test]
fn idle_and_concurrent_modes() {
    let Some((bench, _serial)) = setup() else {
        return;
    };
    let dir = temp_dir("idle");
    let agent = BenchAgent::start(&bench, &dir, &[]);
    let first_run = |mode: &str, connections: &str| {
        let a = ["--connections", connections, "--duration", "0.5", "--json"];
        let (out, _) = probe(&bench, &agent.args(mode, &a));
        ok(&out);
        json(&out)["endpoints"][0]["repeats"][0].clone()
    };
    let run = first_run("idle", "20");
    assert_eq!(run["echoing"], 20);
    assert_eq!(run["latency"]["count"], 20);

    let run = first_run("rtt-concurrent", "4");
    assert!(run["latency"]["count"].as_u64().unwrap() > 4);
    assert!(run["ops_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn failures_are_named_with_their_status_in_bounded_time() {
    let Some((bench, _serial)) = setup() else {
        return;
    };
    let dir = temp_dir("errors");
    let agent = BenchAgent::start(&bench, &dir, &[]);
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\nsni = \"agent.test\"\nagent = \"{}\"\n",
        agent.addr
    );
    let proxy = Proxy::start(Some(&cfg), &[]);
    let ca = agent.cert.to_str().unwrap();
    let pa = proxy.addr.to_string();

    // A name without a route: splicegate's TLS alert, status 4.
    let (out, took) = probe(
        &bench,
        &args("rtt", &pa, "other.test", ca, &["--count", "5", "--json"]),
    );
    assert_eq!(out.status.code(), Some(4));
    assert!(took < Duration::from_secs(5), "{took:?}");
    let j = json(&out);
    assert_eq!(j["error"]["kind"], "tls_alert");
    assert!(
        j["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("unrecognized_name"),
        "{}",
        j["error"]
    );

    // The agent's certificate does not cover the name: verification fails.
    let (out, _) = probe(
        &bench,
        &args(
            "rtt",
            &pa,
            "agent.test",
            proxy_cert(&dir).to_str().unwrap(),
            &["--count", "5"],
        ),
    );
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(tls_verify)"));

    // Nothing listens: refused, status 3, at once.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (out, took) = probe(&bench, &args("rtt", &closed, "agent.test", ca, &["--json"]));
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(json(&out)["error"]["kind"], "refused");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Accepted by the kernel, never answered: a timeout within --connect-timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let sa = silent.local_addr().unwrap().to_string();
    let (out, took) = probe(
        &bench,
        &args(
            "rtt",
            &sa,
            "agent.test",
            ca,
            &["--connect-timeout", "1", "--json"],
        ),
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(json(&out)["error"]["kind"], "timeout");
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(silent);
}

/// A certificate for another name, to fail verification with.
fn proxy_cert(dir: &Path) -> PathBuf {
    let out = dir.join("other");
    let made = Command::new(common::bin())
        .args(["cert", "--san", "DNS:other.test", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(made.status.success());
    out.join("cert.pem")
}
