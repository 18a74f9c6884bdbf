//! Live upgrade through the real binary: `splicegate upgrade` (and
//! SIGUSR2) hand every listening socket and every established passthrough
//! session to a new process, with real TLS clients and agents streaming
//! through it; failing new binaries leave the old process serving; the
//! control socket refuses bad input.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{alpha_agent, metric, Counted, Proxy, TempDir};
use rustls::pki_types::ServerName;
use splicegate::testkit::client_config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// What one streaming session saw.
struct Session {
    /// The client's address (the proxy's log calls it `peer`).
    local: SocketAddr,
    /// Raw bytes the client wrote and read.
    written: Arc<AtomicU64>,
    read: Arc<AtomicU64>,
    /// Application bytes echoed back intact.
    echoed: u64,
}

/// Deterministic bytes: chunk `i` of session `seed`.
fn chunk(seed: u64, i: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A TLS session through the proxy that streams both ways until `stop`:
/// chunks of growing size (small messages and bulk, so both copy and
/// splice modes carry them) written while their echo is read back and
/// compared byte for byte. Every fifth session writes bulk as fast as it
/// can and reads its echo slowly, so the socket buffers on the way fill
/// and the proxy holds bytes in flight when it pauses.
async fn streaming(
    proxy: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<Session, String> {
    let slow = seed % 5 == 0;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if slow {
        // A small receive window: the proxy's side toward this client
        // fills, and the proxy holds what it read.
        sock.set_recv_buffer_size(16 * 1024).unwrap();
        sock.set_send_buffer_size(16 * 1024).unwrap();
    }
    let tcp = sock
        .connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).unwrap();
    let local = tcp.local_addr().unwrap();
    let (read, written) = (Arc::default(), Arc::default());
    let counted = Counted {
        inner: tcp,
        read: Arc::clone(&read),
        written: Arc::clone(&written),
    };
    let name = ServerName::try_from("alpha.test").unwrap();
    let mut s = TlsConnector::from(tls)
        .connect(name, counted)
        .await
        .map_err(|e| format!("{local}: handshake: {e}"))?;
    let mut greeting = [0u8; 12];
    s.read_exact(&mut greeting)
        .await
        .map_err(|e| format!("{local}: greeting: {e}"))?;
    assert_eq!(&greeting, b"agent alpha\n");
    let (mut rd, mut wr) = tokio::io::split(s);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    // A slow session keeps at most 8 MiB unechoed: more than the buffers
    // on the way hold (on loopback a socket's send buffer starts at
    // megabytes), little enough to drain in a few seconds at the end.
    let window = Arc::new(tokio::sync::Semaphore::new(128));
    let credit = Arc::clone(&window);
    let writer = tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if slow {
                credit.acquire().await.unwrap().forget();
            }
            let len = if slow {
                65_536
            } else {
                [300, 4096, 20_000, 65_536][(i % 4) as usize]
            };
            let c = chunk(seed, i, len);
            wr.write_all(&c).await.map_err(|e| format!("write: {e}"))?;
            let _ = tx.send(c);
            i += 1;
            if !slow {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        wr.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        Ok::<_, String>(())
    });
    let mut echoed = 0u64;
    while let Some(expected) = rx.recv().await {
        let mut got = vec![0u8; expected.len()];
        if slow {
            for part in got.chunks_mut(16 * 1024) {
                rd.read_exact(part)
                    .await
                    .map_err(|e| format!("{local}: read after {echoed} bytes: {e}"))?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            window.add_permits(1);
        } else {
            rd.read_exact(&mut got)
                .await
                .map_err(|e| format!("{local}: read after {echoed} bytes: {e}"))?;
        }
        if got != expected {
            return Err(format!("{local}: echo differs after {echoed} bytes"));
        }
        echoed += got.len() as u64;
    }
    writer.await.unwrap().map_err(|e| format!("{local}: {e}"))?;
    let mut rest = Vec::new();
    rd.read_to_end(&mut rest)
        .await
        .map_err(|e| format!("{local}: end: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{local}: {} bytes after the echo", rest.len()));
    }
    Ok(Session {
        local,
        written,
        read,
        echoed,
    })
}

/// A short connection: handshake, one echo, close. Counted as a failure
/// if anything goes wrong (refused, reset, wrong bytes).
async fn short(proxy: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let (greeting, mut s) = splicegate::testkit::greet(proxy, "alpha.test", tls)
        .await
        .map_err(|e| format!("greet: {e}"))?;
    if greeting != "agent alpha" {
        return Err(format!("greeting {greeting:?}"));
    }
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
    if &back != b"ping" {
        return Err("echo differs".into());
    }
    s.shutdown().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// `splicegate upgrade --control PATH`: (exit success, stdout + stderr).
fn upgrade(control: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(common::bin())
        .arg("upgrade")
        .arg("--control")
        .arg(control)
        .args(extra)
        .output()
        .expect("run splicegate upgrade");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// [`upgrade`] off the runtime's threads.
async fn upgrade_async(control: &Path) -> (bool, String) {
    let c = control.to_path_buf();
    tokio::task::spawn_blocking(move || upgrade(&c, &[]))
        .await
        .unwrap()
}

/// The new pid in `splicegate upgrade`'s line.
fn new_pid(line: &str) -> i32 {
    let after = line
        .split("new process ")
        .nth(1)
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Wait up to `limit` for `pid` to exit; how long it took.
fn wait_exit(pid: i32, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if exited(pid) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Kills the processes a test started through upgrades (the harness only
/// knows the first).
struct Reap(Arc<std::sync::Mutex<Vec<i32>>>);

impl Drop for Reap {
    fn drop(&mut self) {
        for &pid in self.0.lock().unwrap().iter() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn config(agent: SocketAddr, control: &Path, listener_extra: &str) -> String {
    format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n{listener_extra}\n\
         [[route]]\nsni = \"alpha.test\"\nagent = \"{agent}\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\
         [shutdown]\ndrain_grace = \"0\"\n\
         [control]\npath = \"{}\"\n",
        control.display()
    )
}

/// 50 sessions streaming both ways and a new connection every 20 ms;
/// `rounds` upgrades in a row. Nothing is cut, every byte arrives once and
/// in order, no new connection fails, each old process exits within 2 s,
/// the `closed` lines carry each session's whole totals, and the last
/// process's descriptors return to what it started with.
async fn upgrades_under_load(listener_extra: &str, rounds: usize) {
    let dir = TempDir::new("upgrade");
    let control = dir.0.join("ctl.sock");
    let (id, agent) = alpha_agent().await;
    let mut proxy = Proxy::start(Some(&config(agent.addr, &control, listener_extra)), &[]);
    let addr = proxy.addr;
    let admin = proxy.admin.unwrap();
    let pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _reap = Reap(Arc::clone(&pids));
    let first = proxy.pid();
    let baseline = fd_count(first);
    let tls = client_config(&[&id], &[]).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut sessions = Vec::new();
    for seed in 0..50u64 {
        let (tls, stop) = (Arc::clone(&tls), Arc::clone(&stop));
        sessions.push(tokio::spawn(streaming(addr, tls, seed, stop)));
    }
    let shorts = Arc::new(AtomicUsize::new(0));
    // A new connection every 20 ms, each on its own, however long the
    // others take.
    let churn = {
        let (tls, stop) = (Arc::clone(&tls), Arc::clone(&stop));
        let n = Arc::clone(&shorts);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut started = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n.fetch_add(1, Ordering::Relaxed);
                started.push(tokio::spawn(short(addr, Arc::clone(&tls))));
            }
            let mut errors = Vec::new();
            for t in started {
                if let Err(e) = t.await.unwrap() {
                    errors.push(e);
                }
            }
            errors
        })
    };
    // The load balancer's health check sees nothing: 200 all along.
    let health = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let (mut probes, mut bad) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let answer = async {
                    let mut s = TcpStream::connect(admin).await?;
                    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").await?;
                    let mut out = String::new();
                    s.read_to_string(&mut out).await?;
                    Ok::<_, std::io::Error>(out)
                };
                match answer.await {
                    Ok(a) if a.starts_with("HTTP/1.1 200") => {}
                    other => bad.push(format!("{other:?}")),
                }
                probes += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (probes, bad)
        })
    };
    // Every session is forwarding before the first upgrade.
    let deadline = Instant::now() + common::WAIT;
    while metric(
        &common::admin_get(admin, "/metrics"),
        "splicegate_connections_active",
    ) < 50
    {
        assert!(Instant::now() < deadline, "sessions did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut pid = first;
    let mut in_flight = 0u64;
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (ok, line) = upgrade_async(&control).await;
        assert!(ok, "round {round}: {line}");
        let next = new_pid(&line);
        pids.lock().unwrap().push(next);
        assert_ne!(next, pid, "round {round}: the pid did not change");
        let handed: u64 = line
            .split(" connections")
            .next()
            .and_then(|head| head.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0);
        assert!(
            handed >= 50,
            "round {round}: only {handed} connections moved: {line}"
        );
        in_flight += line
            .split(" bytes in flight")
            .next()
            .and_then(|head| head.rsplit('(').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let old = pid;
        let took = tokio::task::spawn_blocking(move || wait_exit(old, Duration::from_secs(2)))
            .await
            .unwrap();
        assert!(
            took.is_some(),
            "round {round}: the old process {old} did not exit within 2 s"
        );
        eprintln!(
            "round {round}: {line} (old process exited after {:?})",
            took.unwrap()
        );
        pid = next;
        // The new process's metrics: the sessions are open there, and it
        // counts what it took over.
        let m = common::admin_get(admin, "/metrics");
        assert!(metric(&m, "splicegate_connections_active") >= 50, "{m}");
        assert!(
            metric(
                &m,
                "splicegate_upgrade_handed_over_total{kind=\"connection\"}"
            ) >= 50,
            "{m}"
        );
        assert!(
            m.contains("splicegate_upgrade_handed_over_total{kind=\"listener\"} 3"),
            "{m}"
        );
    }
    // Bytes were in flight at some pause (the unit tests pin down what
    // happens to them; here they cross processes).
    assert!(in_flight > 0, "no upgrade caught bytes in flight");
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for s in sessions {
        results.push(
            s.await
                .unwrap()
                .unwrap_or_else(|e| panic!("a session was cut: {e}")),
        );
    }
    let (probes, bad) = health.await.unwrap();
    assert!(
        bad.is_empty(),
        "{} of {probes} health checks failed: {bad:?}",
        bad.len()
    );
    assert!(probes > 10, "{probes} health checks");
    let errors = churn.await.unwrap();
    assert!(
        errors.is_empty(),
        "{} of {} new connections failed: {errors:?}",
        errors.len(),
        shorts.load(Ordering::Relaxed)
    );
    assert!(
        shorts.load(Ordering::Relaxed) >= 10,
        "{} new connections",
        shorts.load(Ordering::Relaxed)
    );
    // The `closed` line of each session, from the last process: its
    // whole totals, as the client counted them on the wire.
    for s in &results {
        let peer = s.local.to_string();
        let ev = proxy.find_event("closed", |v| v["span"]["peer"] == peer.as_str());
        assert_eq!(ev["outcome"], "done", "{ev}");
        assert_eq!(
            ev["bytes_to_agent"],
            s.written.load(Ordering::Relaxed),
            "{ev}"
        );
        assert_eq!(
            ev["bytes_to_client"],
            s.read.load(Ordering::Relaxed),
            "{ev}"
        );
        assert!(s.echoed > 0);
    }
    let total: u64 = results.iter().map(|s| s.echoed).sum();
    eprintln!(
        "{rounds} upgrades: {} sessions, {total} bytes echoed intact, {} new connections and {probes} health checks, 0 failed",
        results.len(),
        shorts.load(Ordering::Relaxed)
    );
    // Descriptors return to the first process's count once the sessions
    // are gone (pipes closed, handover channel closed).
    let deadline = Instant::now() + common::WAIT;
    loop {
        let n = fd_count(pid);
        if n <= baseline {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last process holds {n} descriptors, the first started with {baseline}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(
        wait_exit(pid, common::WAIT).is_some(),
        "the last process did not stop"
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upgrades_under_load_cut_nothing_splice() {
    upgrades_under_load("engine = \"splice\"", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upgrades_under_load_cut_nothing_copy() {
    upgrades_under_load("engine = \"copy\"", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upgrades_under_load_cut_nothing_low_latency() {
    upgrades_under_load("low_latency = \"spin\"\nspin_us = 50", 10).await;
}

/// The binary copied to a directory of the test's, so a test can replace
/// it as a package upgrade would (a new file renamed over the old).
fn own_binary(dir: &Path) -> PathBuf {
    let exe = dir.join("splicegate");
    std::fs::copy(common::bin(), &exe).unwrap();
    exe
}

fn replace_with(exe: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = exe.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, exe).unwrap();
}

/// A new binary that cannot take over — a script that exits 1, one whose
/// configuration check fails, one that is never ready — leaves the old
/// process serving every session; `splicegate upgrade` says why. Then the
/// real binary takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_new_binaries_leave_the_old_process_serving() {
    let dir = TempDir::new("upgrade-fail");
    let control = dir.0.join("ctl.sock");
    let exe = own_binary(&dir.0);
    let (id, agent) = alpha_agent().await;
    let cfg_path = dir.0.join("splicegate.toml");
    let cfg = config(agent.addr, &control, "");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&cfg_path);
    let mut proxy = Proxy::start_command(&mut cmd);
    let pid = proxy.pid();
    let pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _reap = Reap(Arc::clone(&pids));
    let tls = client_config(&[&id], &[]).unwrap();
    let (_, mut open) = splicegate::testkit::greet(proxy.addr, "alpha.test", Arc::clone(&tls))
        .await
        .unwrap();
    let real = std::fs::read(&exe).unwrap();

    // 1. A script that exits 1.
    replace_with(&exe, b"#!/bin/sh\necho 'broken build' >&2\nexit 1\n");
    let (ok, line) = upgrade(&control, &[]);
    assert!(!ok, "{line}");
    assert!(
        line.contains("exited before it was ready") && line.contains("exit status: 1"),
        "{line}"
    );
    let ev = proxy.event("upgrade_failed", |_| true);
    assert_eq!(ev["kind"], "exited", "{ev}");

    // 2. A configuration the new process refuses.
    replace_with(&exe, &real);
    std::fs::write(&cfg_path, format!("{cfg}\n[limits]\nmax_connectoins = 5\n")).unwrap();
    let (ok, line) = upgrade(&control, &[]);
    assert!(!ok, "{line}");
    assert!(
        line.contains("refused to start") && line.contains("max_connectoins"),
        "{line}"
    );

    // 3. One that is never ready, with a short timeout.
    std::fs::write(&cfg_path, &cfg).unwrap();
    replace_with(&exe, b"#!/bin/sh\nexec sleep 60\n");
    let t = Instant::now();
    let (ok, line) = upgrade(&control, &["--timeout", "2"]);
    assert!(!ok, "{line}");
    assert!(line.contains("not ready within 2s"), "{line}");
    assert!(t.elapsed() < Duration::from_secs(10));

    // The old process served throughout: the open session, new ones.
    assert!(!exited(pid));
    open.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    short(proxy.addr, Arc::clone(&tls)).await.unwrap();
    let status = control_line(&control, "status");
    assert_eq!(status["pid"], pid, "{status}");
    assert_eq!(status["upgrade"], "idle", "{status}");

    // 4. The real binary takes over, open session and drained agents
    // included.
    let v = control_line(&control, "drain-agent 10.9.9.9:8443");
    assert_eq!(v["ok"], true, "{v}");
    replace_with(&exe, &real);
    let (ok, line) = upgrade(&control, &[]);
    assert!(ok, "{line}");
    let next = new_pid(&line);
    pids.lock().unwrap().push(next);
    let status = control_line(&control, "status");
    assert_eq!(status["pid"], next, "{status}");
    assert_eq!(
        status["drained_agents"],
        serde_json::json!(["10.9.9.9:8443"]),
        "{status}"
    );
    open.write_all(b"moved over").await.unwrap();
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"moved over");
    assert!(wait_exit(pid, Duration::from_secs(2)).is_some());
    drop(open);
}

/// One command on the control socket, its JSON answer (std only: the
/// same as `socat`).
fn control_line(path: &Path, line: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out:?}"))
}

/// Garbage, a line too long, a client that never writes, an unknown
/// command, a bad option and a second upgrade while one is in progress:
/// each gets a clear error and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_refuses_bad_input() {
    use std::io::{Read, Write};
    let dir = TempDir::new("upgrade-ctl");
    let control = dir.0.join("ctl.sock");
    let exe = own_binary(&dir.0);
    let (_id, agent) = alpha_agent().await;
    let cfg_path = dir.0.join("splicegate.toml");
    std::fs::write(&cfg_path, config(agent.addr, &control, "")).unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&cfg_path);
    let proxy = Proxy::start_command(&mut cmd);
    let pid = proxy.pid();
    let pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _reap = Reap(Arc::clone(&pids));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&control).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the control socket is the owner's only"
        );
    }

    let v = control_line(&control, "\u{1}\u{2}garbage");
    assert_eq!(v["ok"], false);
    assert_eq!(v["kind"], "bad_request", "{v}");
    let v = control_line(&control, "make-me-a-sandwich");
    assert_eq!(v["kind"], "unknown_command", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("make-me-a-sandwich"),
        "{v}"
    );
    let v = control_line(&control, "upgrade --timeout soon");
    assert_eq!(v["kind"], "bad_request", "{v}");
    let v = control_line(&control, "upgrade --colour blue");
    assert_eq!(v["kind"], "bad_request", "{v}");
    let v = control_line(&control, &"x".repeat(100_000));
    assert_eq!(v["kind"], "too_long", "{v}");
    // A client that connects and never writes is answered and closed.
    let t = Instant::now();
    let mut idle = std::os::unix::net::UnixStream::connect(&control).unwrap();
    let mut out = String::new();
    idle.read_to_string(&mut out).unwrap();
    assert!(out.contains("\"kind\":\"timeout\""), "{out}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // A second upgrade while one is in progress: the new binary takes a
    // while to be ready.
    let real = std::fs::read(&exe).unwrap();
    let slow = dir.0.join("splicegate-real");
    std::fs::write(&slow, &real).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    replace_with(
        &exe,
        format!("#!/bin/sh\nsleep 2\nexec '{}' \"$@\"\n", slow.display()).as_bytes(),
    );
    let first = std::thread::spawn({
        let c = control.clone();
        move || upgrade(&c, &[])
    });
    let deadline = Instant::now() + common::WAIT;
    loop {
        let s = control_line(&control, "status");
        if s["upgrade"] == "in_progress" {
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = control_line(&control, "upgrade");
    assert_eq!(v["kind"], "in_progress", "{v}");
    let (ok, line) = first.join().unwrap();
    assert!(ok, "{line}");
    pids.lock().unwrap().push(new_pid(&line));
    assert!(wait_exit(pid, Duration::from_secs(2)).is_some());
    // The new process answers on the same socket.
    let v = control_line(&control, "status");
    assert_eq!(v["pid"], new_pid(&line), "{v}");
    let mut s = std::os::unix::net::UnixStream::connect(&control).unwrap();
    s.write_all(b"help\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.contains("upgrade"), "{out}");
}

/// Five QUIC flows (quinn on both ends) exchanging datagrams both ways at
/// a steady pace through an upgrade: every datagram arrives (none lost:
/// what UDP on loopback loses without an upgrade), the flows go on in the
/// new process, and their streams still work after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_flows_move_with_their_datagrams() {
    use common::quic::{agent, client};
    let dir = TempDir::new("upgrade-quic");
    let control = dir.0.join("ctl.sock");
    let a = agent("a.test").await;
    let cfg = format!(
        "[[udp_listener]]\nbind = \"127.0.0.1:0\"\n\
         [[route]]\nsni = \"a.test\"\nagent = \"{}\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\
         [shutdown]\ndrain_grace = \"0\"\n\
         [control]\npath = \"{}\"\n",
        a.addr,
        control.display()
    );
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let udp: SocketAddr = proxy.find_event("listening", |v| v["proto"] == "udp")["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _reap = Reap(Arc::clone(&pids));
    let old = proxy.pid();
    const EACH: u32 = 300;
    let mut flows = Vec::new();
    let upgraded = Arc::new(AtomicBool::new(false));
    for _ in 0..5 {
        let ep = client(&[&a.id], &[], Duration::from_secs(30));
        let conn = ep.connect(udp, "a.test").unwrap().await.unwrap();
        let upgraded = Arc::clone(&upgraded);
        flows.push(tokio::spawn(async move {
            let echoes = {
                let conn = conn.clone();
                tokio::spawn(async move {
                    let mut seen = std::collections::HashSet::new();
                    while seen.len() < EACH as usize {
                        match tokio::time::timeout(Duration::from_secs(5), conn.read_datagram())
                            .await
                        {
                            Ok(Ok(d)) => {
                                seen.insert(u32::from_be_bytes(d[..4].try_into().unwrap()));
                            }
                            _ => break,
                        }
                    }
                    seen.len()
                })
            };
            let mut after = 0;
            for i in 0..EACH {
                let mut d = i.to_be_bytes().to_vec();
                d.resize(200, 0x5a);
                conn.send_datagram(d.into()).unwrap();
                if upgraded.load(Ordering::Relaxed) {
                    after += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let echoed = echoes.await.unwrap();
            // The connection's streams work in the new process too.
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"after").await.unwrap();
            send.finish().unwrap();
            let all = recv.read_to_end(64).await.unwrap();
            assert_eq!(all, b"a.test\nafter");
            let stats = conn.stats();
            conn.close(0u32.into(), b"done");
            (echoed, after, stats.path.lost_packets, ep)
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (ok, line) = upgrade_async(&control).await;
    assert!(ok, "{line}");
    upgraded.store(true, Ordering::Relaxed);
    pids.lock().unwrap().push(new_pid(&line));
    assert!(line.contains("and 5 QUIC flows"), "{line}");
    assert!(
        tokio::task::spawn_blocking(move || wait_exit(old, Duration::from_secs(2)))
            .await
            .unwrap()
            .is_some(),
        "the old process did not exit"
    );
    for f in flows {
        let (echoed, after, lost, _ep) = f.await.unwrap();
        eprintln!("flow: {echoed} of {EACH} datagrams echoed, {after} sent after the upgrade, {lost} packets lost");
        assert_eq!(echoed, EACH as usize, "datagrams lost across the upgrade");
        assert!(after > 0, "the flow did not outlive the upgrade");
        assert_eq!(lost, 0, "QUIC counted lost packets");
    }
    let m = common::admin_get(proxy.admin.unwrap(), "/metrics");
    assert!(
        m.contains("splicegate_upgrade_handed_over_total{kind=\"flow\"} 5"),
        "{m}"
    );
}

/// A terminate-mode WebSocket session open during an upgrade keeps working
/// in the old process until it ends (its TLS state lives there); new
/// connections reach the new process; the old one exits once the session
/// closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_websocket_stays_with_the_old_process_until_it_ends() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = TempDir::new("upgrade-ws");
    let control = dir.0.join("ctl.sock");
    common::make_cert(&dir.0, &["IP:127.0.0.1", "DNS:localhost"]);
    let agent = common::http::http_agent("ws", "127.0.0.1:0", true).await;
    let ca = dir.0.join("agent-ca.pem");
    std::fs::write(&ca, &agent.id.as_ref().unwrap().cert_pem).unwrap();
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nmode = \"terminate\"\n\
         upstream_tls = \"verify\"\nupstream_ca = \"{ca}\"\n\
         [[listener.cert]]\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n\
         [[path_route]]\nprefix = \"/\"\nagent = \"{a}\"\n\
         [shutdown]\ndrain_grace = \"0\"\n\
         [control]\npath = \"{c}\"\n",
        ca = ca.display(),
        d = dir.0.display(),
        a = agent.addr,
        c = control.display()
    );
    let proxy = Proxy::start(Some(&cfg), &[]);
    let pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _reap = Reap(Arc::clone(&pids));
    let old = proxy.pid();
    let cacert = dir.0.join("cert.pem");
    let tls = common::http::tls_client_after(proxy.addr, &[], &cacert, Some("localhost")).await;
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
        .await
        .expect("WebSocket through the proxy");
    assert_eq!(resp.status(), 101);
    let echo = async |ws: &mut tokio_tungstenite::WebSocketStream<_>, i: u8| {
        let msg = common::payload(8 * 1024, i);
        ws.send(Message::binary(msg.clone())).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_data().as_ref(), msg.as_slice());
    };
    echo(&mut ws, 1).await;

    let (ok, line) = upgrade_async(&control).await;
    assert!(ok, "{line}");
    assert!(line.contains("1 stay with the old process"), "{line}");
    let next = new_pid(&line);
    pids.lock().unwrap().push(next);
    // The session goes on in the old process, which stays for it.
    for i in 2..20 {
        echo(&mut ws, i).await;
    }
    assert!(!exited(old), "the old process left its WebSocket session");
    // New requests reach the new process.
    let (code, body) = common::curl_tls(
        &cacert,
        &[format!("https://localhost:{}/x", proxy.addr.port())],
    )
    .pop()
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let status = control_line(&control, "status");
    assert_eq!(status["pid"], next, "{status}");
    // The session ends: the old process exits.
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    assert!(
        tokio::task::spawn_blocking(move || wait_exit(old, Duration::from_secs(2)))
            .await
            .unwrap()
            .is_some(),
        "the old process did not exit after its last session"
    );
    drop(proxy);
}

/// A fake service manager: a datagram socket for `NOTIFY_SOCKET` that
/// records each message with its sender's pid and closes descriptors
/// sent with it (what systemd does with a `BARRIER=1`'s pipe).
fn fake_systemd(path: &Path) -> std::sync::mpsc::Receiver<(i32, String)> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let sock = std::os::unix::net::UnixDatagram::bind(path).unwrap();
    rustix::net::sockopt::set_socket_passcred(&sock, true).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || loop {
        let mut buf = [0u8; 4096];
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); 256];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let Ok(r) = recvmsg(&sock, &mut iov, &mut control, RecvFlags::empty()) else {
            return;
        };
        let mut pid = 0;
        for m in control.drain() {
            match m {
                RecvAncillaryMessage::ScmCredentials(c) => pid = c.pid.as_raw_nonzero().get(),
                RecvAncillaryMessage::ScmRights(fds) => drop(fds.collect::<Vec<_>>()),
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&buf[..r.bytes]).into_owned();
        if tx.send((pid, text)).is_err() {
            return;
        }
    });
    rx
}

/// SIGUSR2 upgrades as `splicegate upgrade` does; under systemd the old
/// process names the new one the main process (`MAINPID=`, confirmed by a
/// `BARRIER=1`) before it exits, the new one sends no second `READY=1`,
/// and the watchdog is pinged by the new process only from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_and_systemd_follows_the_new_main_process() {
    let dir = TempDir::new("upgrade-notify");
    let control = dir.0.join("ctl.sock");
    let notify = dir.0.join("notify.sock");
    let messages = fake_systemd(&notify);
    let (id, agent) = alpha_agent().await;
    let env = [
        ("NOTIFY_SOCKET", notify.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ];
    let mut proxy = Proxy::start_with_env(Some(&config(agent.addr, &control, "")), &[], &env);
    let pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _reap = Reap(Arc::clone(&pids));
    let old = proxy.pid();
    let recv = |what: &str| loop {
        match messages.recv_timeout(common::WAIT) {
            Ok((pid, m)) if m.contains(what) => return (pid, m),
            Ok(_) => {}
            Err(_) => panic!("no {what} from the service's processes"),
        }
    };
    assert_eq!(recv("READY=1").0, old);
    let tls = client_config(&[&id], &[]).unwrap();
    let (_, mut s) = splicegate::testkit::greet(proxy.addr, "alpha.test", Arc::clone(&tls))
        .await
        .unwrap();
    proxy.signal(nix::sys::signal::Signal::SIGUSR2);
    let ev = proxy.event("upgraded", |_| true);
    let next = ev["pid"].as_u64().unwrap() as i32;
    pids.lock().unwrap().push(next);
    assert_eq!(ev["connections"], 1, "{ev}");
    let (from, m) = recv("MAINPID=");
    assert_eq!((from, m.trim()), (old, format!("MAINPID={next}").as_str()));
    let (from, _) = recv("BARRIER=1");
    assert_eq!(from, old);
    proxy.find_event("main_pid", |v| v["pid"] == next);
    // From now on the watchdog is the new process's, and it is never
    // told READY=1 again.
    let mut pinged_by_new = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok((pid, m)) = messages.recv_timeout(Duration::from_millis(100)) {
            assert!(!m.contains("READY=1"), "{pid}: {m}");
            if m.contains("WATCHDOG=1") && exited(old) {
                assert_eq!(pid, next, "a watchdog ping from {pid} after the handover");
                pinged_by_new += 1;
            }
        }
    }
    assert!(
        pinged_by_new >= 3,
        "the new process pinged the watchdog {pinged_by_new} times"
    );
    s.write_all(b"after").await.unwrap();
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"after");
    assert!(exited(old));
}
