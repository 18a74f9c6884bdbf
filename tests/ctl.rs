//! Day-2 operations through `splicegate ctl` and the control socket, with
//! real TLS agents and clients: taking an agent out of a pool for
//! maintenance and back, seeing who is where while sessions stream,
//! closing an agent's sessions spread over time, a drained single-agent
//! route refused with its outcome, progress lines for long sessions, and
//! bad input on the control socket.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{metric, Counted, Proxy};
use rustls::pki_types::ServerName;
use serde_json::Value;
use splicegate::testkit::{client_config, identity, server_config, Agent, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// `splicegate ctl --control PATH [--json] WORDS`: (success, stdout, stderr).
fn ctl(control: &Path, json: bool, words: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(common::bin());
    cmd.arg("ctl").arg("--control").arg(control);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.args(words).output().expect("run splicegate ctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ctl --json`, parsed; panics on failure.
fn ctl_json(control: &Path, words: &[&str]) -> Value {
    let (ok, out, err) = ctl(control, true, words);
    assert!(ok, "ctl {words:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|_| panic!("not JSON: {out}"))
}

/// A session through the proxy: the agent's name (from its greeting) and
/// the stream, which counts its raw bytes.
struct Desk {
    agent: String,
    tls: TlsStream<Counted>,
    local: SocketAddr,
    written: Arc<AtomicU64>,
}

async fn desk(
    proxy: SocketAddr,
    sni: &str,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<Desk> {
    let tcp = TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    let local = tcp.local_addr()?;
    let written = Arc::new(AtomicU64::new(0));
    let counted = Counted {
        inner: tcp,
        read: Arc::default(),
        written: Arc::clone(&written),
    };
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let mut tls = TlsConnector::from(tls).connect(name, counted).await?;
    let mut line = Vec::new();
    loop {
        let b = tls.read_u8().await?;
        if b == b'\n' {
            break;
        }
        line.push(b);
    }
    let agent = String::from_utf8_lossy(&line)
        .trim_start_matches("agent ")
        .to_owned();
    Ok(Desk {
        agent,
        tls,
        local,
        written,
    })
}

impl Desk {
    /// One message and its echo.
    async fn echo(&mut self, msg: &[u8]) -> std::io::Result<()> {
        self.tls.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        self.tls.read_exact(&mut back).await?;
        assert_eq!(back, msg);
        Ok(())
    }
}

async fn tls_agent(name: &str, id: &Identity) -> Agent {
    Agent::spawn(
        name,
        server_config(id).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

/// A pool of two agents: drain one, and new sessions go to the other while
/// its open ones stream on; see them with `sessions --agent`; close them
/// spread over 5 s; put it back and new sessions reach it again; the
/// drained state survives a reload (SIGHUP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_of_one_agent_in_a_pool() {
    let id = identity(&["desk.pool.test"]).unwrap();
    let (a, b) = (tls_agent("a", &id).await, tls_agent("b", &id).await);
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\
         [[pool]]\nname = \"desks\"\npolicy = \"least_conn\"\n\
         [[pool.agents]]\naddr = \"{}\"\n[[pool.agents]]\naddr = \"{}\"\n\
         [[route]]\nsni = \"*.pool.test\"\npool = \"desks\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        a.addr, b.addr
    );
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let control = proxy.control.clone().unwrap();
    let tls = client_config(&[&id], &[]).unwrap();
    let mut open = Vec::new();
    for _ in 0..20 {
        open.push(
            desk(proxy.addr, "desk.pool.test", Arc::clone(&tls))
                .await
                .unwrap(),
        );
    }
    let on_a = open.iter().filter(|d| d.agent == "a").count();
    assert_eq!(on_a, 10, "least_conn spreads 20 sessions 10 and 10");

    let (ok, out, _) = ctl(&control, false, &["drain-agent", &a.addr.to_string()]);
    assert!(ok && out.contains("draining: true"), "{out}");
    let agents = ctl_json(&control, &["agents"]);
    let row = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agent"] == a.addr.to_string())
        .unwrap()
        .clone();
    assert_eq!(row["draining"], true, "{row}");
    assert_eq!(row["sessions"], 10, "{row}");
    assert_eq!(row["health"], "up", "{row}");
    let m = common::admin_get(proxy.admin.unwrap(), "/metrics");
    assert!(
        m.contains(&format!(
            "splicegate_agent_draining{{agent=\"{}\"}} 1",
            a.addr
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "splicegate_agent_draining{{agent=\"{}\"}} 0",
            b.addr
        )),
        "{m}"
    );

    // Twenty new sessions: every one on b.
    let mut new = Vec::new();
    for _ in 0..20 {
        new.push(
            desk(proxy.addr, "desk.pool.test", Arc::clone(&tls))
                .await
                .unwrap(),
        );
    }
    assert!(
        new.iter().all(|d| d.agent == "b"),
        "a new session reached the drained agent"
    );
    // The open ones on a stream on, and the list shows their bytes grow.
    let before = ctl_json(&control, &["sessions", "--agent", &a.addr.to_string()]);
    let listed = before["sessions"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 10, "{before}");
    for d in open.iter_mut().filter(|d| d.agent == "a") {
        d.echo(&[7u8; 1000]).await.unwrap();
    }
    let after = ctl_json(&control, &["sessions", "--agent", &a.addr.to_string()]);
    for (x, y) in listed.iter().zip(after["sessions"].as_array().unwrap()) {
        assert_eq!(x["id"], y["id"]);
        assert!(
            y["bytes_to_agent"].as_u64() > x["bytes_to_agent"].as_u64(),
            "{x} then {y}"
        );
        assert_eq!(y["transport"], "tcp");
        assert_eq!(y["sni"], "desk.pool.test");
        assert_eq!(y["pool"], "desks");
        assert!(y["started"].as_str().unwrap().ends_with('Z'));
    }
    let (_, table, _) = ctl(
        &control,
        false,
        &["sessions", "--agent", &a.addr.to_string()],
    );
    assert!(table.starts_with("id "), "{table}");
    assert!(table.contains("10 sessions"), "{table}");

    // Close a's sessions spread over 5 s: their close lines say so.
    let t = Instant::now();
    let answer = ctl_json(
        &control,
        &["close", "--agent", &a.addr.to_string(), "--over", "5"],
    );
    assert_eq!(answer["closing"], 10, "{answer}");
    let mut at = Vec::new();
    for d in open.iter().filter(|d| d.agent == "a") {
        let peer = d.local.to_string();
        let ev = proxy.find_event("closed", |v| v["span"]["peer"] == peer.as_str());
        assert_eq!(ev["outcome"], "operator_close", "{ev}");
        at.push(ev["timestamp"].as_str().unwrap().to_owned());
    }
    at.sort();
    let secs = |ts: &str| -> f64 {
        let t = ts.split('T').nth(1).unwrap().trim_end_matches('Z');
        let mut parts = t.split(':');
        let h: f64 = parts.next().unwrap().parse().unwrap();
        let m: f64 = parts.next().unwrap().parse().unwrap();
        let s: f64 = parts.next().unwrap().parse().unwrap();
        h * 3600.0 + m * 60.0 + s
    };
    let spread = secs(&at[9]) - secs(&at[0]);
    assert!(
        (4.0..5.5).contains(&spread),
        "closes spread over {spread} s: {at:?}"
    );
    assert!(t.elapsed() >= Duration::from_secs(4));
    // b's sessions went on untouched.
    for d in new.iter_mut() {
        d.echo(b"still here").await.unwrap();
    }

    // Back in rotation: new sessions reach a (it has none now).
    let (ok, out, _) = ctl(&control, false, &["undrain-agent", &a.addr.to_string()]);
    assert!(ok && out.contains("draining: false"), "{out}");
    let back = desk(proxy.addr, "desk.pool.test", Arc::clone(&tls))
        .await
        .unwrap();
    assert_eq!(back.agent, "a");

    // Drained again, then a reload: still drained.
    ctl_json(&control, &["drain-agent", &a.addr.to_string()]);
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    proxy.event("reloaded", |_| true);
    for _ in 0..5 {
        let d = desk(proxy.addr, "desk.pool.test", Arc::clone(&tls))
            .await
            .unwrap();
        assert_eq!(d.agent, "b", "a reload put the drained agent back");
    }
    let status = ctl_json(&control, &["status"]);
    assert_eq!(status["drained_agents"][0], a.addr.to_string(), "{status}");
    drop((open, new, back));
}

/// A route with only a drained agent refuses new sessions with a TLS alert
/// and the outcome `agent_draining`, logged and counted; a session id that
/// is open can be closed by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_agent_route_whose_agent_is_drained_refuses() {
    let id = identity(&["solo.test"]).unwrap();
    let a = tls_agent("solo", &id).await;
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\
         [[route]]\nsni = \"solo.test\"\nagent = \"{}\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        a.addr
    );
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let control = proxy.control.clone().unwrap();
    let tls = client_config(&[&id], &[]).unwrap();
    let mut first = desk(proxy.addr, "solo.test", Arc::clone(&tls))
        .await
        .unwrap();
    ctl_json(&control, &["drain-agent", &a.addr.to_string()]);
    let err = desk(proxy.addr, "solo.test", Arc::clone(&tls))
        .await
        .err()
        .expect("a drained single agent takes no new session");
    assert!(
        err.to_string().contains("InternalError"),
        "the client reads the alert: {err}"
    );
    let ev = proxy.closed("agent_draining");
    assert!(ev["reason"].as_str().unwrap().contains("drained"), "{ev}");
    let m = common::admin_get(proxy.admin.unwrap(), "/metrics");
    assert!(m.contains("outcome=\"agent_draining\"} 1"), "{m}");
    // The open session goes on, and can be closed by its id.
    first.echo(b"open").await.unwrap();
    let list = ctl_json(&control, &["sessions"]);
    let sid = list["sessions"][0]["id"].as_u64().unwrap();
    let answer = ctl_json(&control, &["close", &sid.to_string()]);
    assert_eq!(answer["closing"], 1);
    let ev = proxy.closed("operator_close");
    assert_eq!(ev["span"]["id"], sid, "{ev}");
    let mut rest = Vec::new();
    let _ = first.tls.read_to_end(&mut rest).await;
}

/// Every `log_progress_interval` an open session logs a `progress` line
/// with its bytes so far (the bytes the client put on the wire) and idle
/// time; `/metrics` counts its bytes while it is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_sessions_log_progress_and_count_while_open() {
    let id = identity(&["long.test"]).unwrap();
    let a = tls_agent("long", &id).await;
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nlog_progress_interval = \"1s\"\n\
         [[route]]\nsni = \"long.test\"\nagent = \"{}\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        a.addr
    );
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let tls = client_config(&[&id], &[]).unwrap();
    let mut d = desk(proxy.addr, "long.test", Arc::clone(&tls))
        .await
        .unwrap();
    d.echo(&[1u8; 50_000]).await.unwrap();
    let sent = d.written.load(Ordering::Relaxed);
    let peer = d.local.to_string();
    // Idle from now on: the next lines carry the same count and a growing
    // idle time.
    let mut last_idle = None;
    for _ in 0..3 {
        let ev = proxy.event("progress", |v| v["span"]["peer"] == peer.as_str());
        if ev["bytes_to_agent"] != sent {
            continue;
        }
        assert_eq!(ev["transport"], "tcp", "{ev}");
        let idle = ev["idle_s"].as_u64().unwrap();
        if let Some(prev) = last_idle {
            assert!(idle > prev, "{ev}");
        }
        last_idle = Some(idle);
    }
    assert!(
        last_idle.is_some(),
        "no progress line with the bytes sent ({sent})"
    );
    let bytes = |m: &str| metric(m, "splicegate_bytes_to_agent_total");
    let before = bytes(&common::admin_get(proxy.admin.unwrap(), "/metrics"));
    d.echo(&[2u8; 10_000]).await.unwrap();
    let after = bytes(&common::admin_get(proxy.admin.unwrap(), "/metrics"));
    assert!(
        after >= before + 10_000,
        "{before} then {after}: open sessions count as they go"
    );
}

/// Bad input on the control socket: each gets a clear error and changes
/// nothing; a peer that is neither root nor the service's user is refused
/// (SO_PEERCRED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_errors_name_what_was_wrong() {
    let proxy = Proxy::start(None, &["--listen", "127.0.0.1:0", "--agent", "127.0.0.1:9"]);
    let control = proxy.control.clone().unwrap();
    for (words, kind) in [
        (&["frobnicate"][..], "unknown_command"),
        (&["drain-agent", "not-an-address"][..], "bad_address"),
        (&["drain-agent"][..], "bad_request"),
        (&["close", "999999"][..], "unknown_session"),
        (&["close", "seven"][..], "bad_request"),
        (&["close", "1", "--over", "5"][..], "bad_request"),
        (
            &["close", "--agent", "127.0.0.1:9", "--over", "0"][..],
            "bad_request",
        ),
        (&["sessions", "--agent", "::1"][..], "bad_address"),
        (&["drain", "--deadline", "-1"][..], "bad_request"),
        (&["status", "extra"][..], "bad_request"),
    ] {
        let (ok, _, err) = ctl(&control, false, words);
        assert!(!ok, "{words:?} succeeded");
        assert!(err.contains(&format!("({kind})")), "{words:?}: {err}");
    }
    let status = ctl_json(&control, &["status"]);
    assert_eq!(status["draining"], false, "nothing changed: {status}");
    assert_eq!(status["drained_agents"], serde_json::json!([]), "{status}");

    // Another user (the socket opened up so that it can even connect).
    if !common::require(
        nix::unistd::geteuid().is_root(),
        "root, to connect as another user",
    ) {
        return;
    }
    if !common::require_tool("setpriv", "--version") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::bin())
        .args(["ctl", "--control"])
        .arg(&control)
        .arg("status")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("(permission_denied)") && err.contains("uid 65534"),
        "{err}"
    );
}
