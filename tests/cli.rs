//! The command line: `check`, `demo`, and shutdown on signals.

mod common;

use std::process::Command;

use common::{alpha_agent, bin, tempfile_lite::TempFile, Proxy};
use nix::sys::signal::Signal;
use splicegate::testkit::{client_config, greet, identity, server_config, Agent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn check_prints_listeners_and_routes() {
    let out = Command::new(bin())
        .args(["check", "--config", "examples/splicegate.toml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("dcv on 0.0.0.0:8443, [::]:8443 engine=splice"),
        "{stdout}"
    );
    assert!(stdout.contains("exact agent1.dcv.example"), "{stdout}");
    assert!(stdout.contains("-> 10.150.248.180:8443"), "{stdout}");
    assert!(
        stdout.contains("agent-in-name *.agents.dcv.example"),
        "{stdout}"
    );
    assert!(stdout.contains("examples/splicegate.toml: OK"), "{stdout}");
}

#[test]
fn check_names_file_line_and_key_of_a_bad_config() {
    let cases = [
        (
            "[[listener]]\nbind = \"0.0.0.0:8443\"\nbaklog = 10\n",
            ":3:",
            "unknown field `baklog`",
        ),
        (
            "[[route]]\nsni = \"a.example\"\nagent = \"10.0.0.1\"\n",
            ":3: key `agent`:",
            "is not HOST:PORT",
        ),
        (
            "[[listener]]\nbind = \"0.0.0.0:99999\"\n",
            ":2: key `bind`:",
            "is not an IP:PORT",
        ),
        (
            "[routing]\nno_sni = \"maybe\"\n",
            ":2: key `no_sni`:",
            "unknown variant `maybe`",
        ),
        ("[[listener]\n", ":1:", ""),
        (
            "[[pool]]\nname = \"fleet\"\n",
            ":2:",
            "pool \"fleet\" has no agents",
        ),
        (
            "[[pool]]\nname = \"fleet\"\n[[pool.agents]]\naddr = \"10.0.0.1:8443\"\nweight = 0\n",
            ":2:",
            "every agent has weight 0",
        ),
        (
            "[[route]]\nsni = \"a.example\"\npool = \"nope\"\n",
            ":3:",
            "no pool is named \"nope\"",
        ),
        (
            "[[route]]\nsni = \"a.example\"\nagent = \"10.0.0.1:1\"\npool = \"p\"\n",
            ":2:",
            "give exactly one of `agent` or `pool`",
        ),
        (
            "[[pool]]\nname = \"p\"\npolicy = \"random\"\n",
            ":3: key `policy`:",
            "unknown variant `random`",
        ),
        // Values that would overflow a deadline, a multiplication or the
        // kernel's limits are refused with their line and key.
        (
            "[[listener]]\nbind = \"0.0.0.0:8443\"\nhello_timeout = \"999999999999d\"\n",
            ":3: key `hello_timeout`:",
            "maximum of 30 days",
        ),
        (
            "[[listener]]\nbind = \"0.0.0.0:8443\"\nidle_timeout = 18446744073709551615\n",
            ":3: key `idle_timeout`:",
            "maximum of 30 days",
        ),
        (
            "[shutdown]\ndrain_timeout = \"31d\"\n",
            ":2: key `drain_timeout`:",
            "maximum of 30 days",
        ),
        (
            "[[listener]]\nbind = \"0.0.0.0:8443\"\nkeepalive_time = \"10h\"\n",
            ":3: key `keepalive_time`:",
            "32767",
        ),
        (
            "[[listener]]\nbind = \"0.0.0.0:8443\"\nkeepalive_retries = 1000\n",
            ":3: key `keepalive_retries`:",
            "outside 1..=127",
        ),
        (
            "[[pool]]\nname = \"p\"\n[[pool.agents]]\naddr = \"10.0.0.1:8443\"\nweight = 4000000000\n",
            ":5: key `weight`:",
            "outside 0..=256",
        ),
        (
            "[limits]\nmax_connections = 18446744073709551615\n",
            ":2: key `max_connections`:",
            "outside 0..=16777216",
        ),
        (
            "[[route]]\nsni = \"a.example\"\nagent = \"999.1.1.1:8443\"\n",
            ":3: key `agent`:",
            "`999.1.1.1` is not a valid IPv4 address",
        ),
        (
            "[[pool]]\nname = \"p\"\n[pool.health]\ncheck = \"https\"\nstatus = 1000\n[[pool.agents]]\naddr = \"10.0.0.1:8443\"\n",
            ":5: key `status`:",
            "outside 100..=599",
        ),
    ];
    for (text, at, what) in cases {
        let f = TempFile::new(".toml", text.as_bytes());
        let out = Command::new(bin())
            .arg("check")
            .arg("--config")
            .arg(&f.0)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text} was accepted");
        let expect = format!("{}{at}", f.0.display());
        assert!(stderr.contains(&expect), "{stderr:?} lacks {expect:?}");
        assert!(stderr.contains(what), "{stderr:?} lacks {what:?}");
    }
    let out = Command::new(bin())
        .args(["check", "--config", "/nonexistent/splicegate.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/splicegate.toml: cannot read")
    );
}

#[test]
fn run_without_listeners_says_how_to_add_one() {
    let out = Command::new(bin())
        .args(["run", "--agent", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no listener configured"));
}

#[test]
fn demo_routes_by_sni_and_exits_with_once() {
    let out = Command::new(bin())
        .args(["demo", "--once"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |sni: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(sni))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        line("alpha.demo.splicegate").contains("-> agent alpha (TLS verified"),
        "{stdout}"
    );
    assert!(
        line("desk1.beta.demo.splicegate").contains("-> agent beta (TLS verified"),
        "{stdout}"
    );
    assert!(
        line("127-0-0-1.agents.demo.splicegate").contains("-> agent alpha (TLS verified"),
        "{stdout}"
    );
    assert!(
        line("10-1-2-3.agents.demo.splicegate").contains("refused by the proxy"),
        "{stdout}"
    );
    assert!(
        line("unknown.example").contains("refused by the proxy"),
        "{stdout}"
    );
    assert!(stdout.contains("500 round trips of 64 bytes"), "{stdout}");
    // The header shows the port the listener got and durations as the
    // docs write them; the proxy's log stays out of the way (warnings
    // only, no colour codes when stderr is not a terminal).
    let header = line("demo on 127.0.0.1:");
    assert!(!header.contains("127.0.0.1:0 "), "{stdout}");
    assert!(
        header.contains("hello_timeout=10s") && header.contains("idle_timeout=1h"),
        "{header}"
    );
    assert!(stdout.contains("drain: grace 0s, timeout 5m"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("INFO") && !stderr.contains('\x1b'),
        "{stderr}"
    );
}

#[test]
fn demo_drains_on_sigterm_like_on_ctrl_c() {
    use std::io::BufRead;
    let mut child = Command::new(bin())
        .arg("demo")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let l = rx.recv_timeout(left).expect("the demo serves");
        if l.starts_with("Serving until") {
            break;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline + common::WAIT,
            "demo ignored SIGTERM"
        );
        let _ = rx.recv_timeout(std::time::Duration::from_millis(50));
    }
}

async fn agent_and_proxy(drain: &str) -> (Agent, splicegate::testkit::Identity, Proxy) {
    let (id, agent) = alpha_agent().await;
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\nsni = \"alpha.test\"\nagent = \"{}\"\n[shutdown]\ndrain_timeout = \"{drain}\"\n",
        agent.addr
    );
    let proxy = Proxy::start(Some(&cfg), &[]);
    (agent, id, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_lets_sessions_finish() {
    let (_agent, id, mut proxy) = agent_and_proxy("5m").await;
    let tls = client_config(&[&id], &[]).unwrap();
    let (_, mut session) = greet(proxy.addr, "alpha.test", tls).await.unwrap();
    proxy.signal(Signal::SIGTERM);
    let ev = proxy.event("draining", |_| true);
    assert_eq!(ev["active"], 1);
    // New connections are refused: the listening socket is closed.
    let err = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The established session still works.
    session.write_all(b"during drain").await.unwrap();
    let mut buf = [0u8; 12];
    session.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during drain");
    session.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = session.read_to_end(&mut rest).await;
    proxy.closed("done");
    assert_eq!(proxy.wait_exit(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_closes_remaining_sessions_and_exits_zero() {
    let (_agent, id, mut proxy) = agent_and_proxy("300ms").await;
    let tls = client_config(&[&id], &[]).unwrap();
    let (_, mut session) = greet(proxy.addr, "alpha.test", tls).await.unwrap();
    proxy.signal(Signal::SIGINT);
    let ev = proxy.closed("drain_deadline");
    assert_eq!(ev["sni"], "alpha.test");
    let mut rest = Vec::new();
    let _ = session.read_to_end(&mut rest).await;
    assert_eq!(proxy.wait_exit(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_routes_without_touching_established_sessions() {
    let id = identity(&["alpha.test"]).unwrap();
    let local = "127.0.0.1:0".parse().unwrap();
    let one = Agent::spawn("one", server_config(&id).unwrap(), local)
        .await
        .unwrap();
    let two = Agent::spawn("two", server_config(&id).unwrap(), local)
        .await
        .unwrap();
    let cfg = |agent: std::net::SocketAddr| {
        format!("[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\nsni = \"alpha.test\"\nagent = \"{agent}\"\n")
    };
    let mut proxy = Proxy::start(Some(&cfg(one.addr)), &[]);
    let tls = client_config(&[&id], &[]).unwrap();
    let (greeting, mut old) = greet(proxy.addr, "alpha.test", tls.clone()).await.unwrap();
    assert_eq!(greeting, "agent one");

    std::fs::write(proxy.config_path(), cfg(two.addr)).unwrap();
    proxy.signal(Signal::SIGHUP);
    proxy.event("reloaded", |_| true);
    let (greeting, _new) = greet(proxy.addr, "alpha.test", tls.clone()).await.unwrap();
    assert_eq!(greeting, "agent two");
    old.write_all(b"old session").await.unwrap();
    let mut buf = [0u8; 11];
    old.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"old session");

    // A broken file is refused and the running routes stay.
    std::fs::write(
        proxy.config_path(),
        "[[route]]\nsni = \"alpha.test\"\nagent = \"nowhere\"\n",
    )
    .unwrap();
    proxy.signal(Signal::SIGHUP);
    let ev = proxy.event("reload_failed", |_| true);
    assert!(
        ev["error"].as_str().unwrap().contains(":3: key `agent`"),
        "{ev}"
    );
    let (greeting, _again) = greet(proxy.addr, "alpha.test", tls).await.unwrap();
    assert_eq!(greeting, "agent two");
}
