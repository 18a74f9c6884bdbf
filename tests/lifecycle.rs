//! `splicegate lifecycle-watch`, the scale-in that waits for sessions,
//! without an AWS account: a fake instance metadata service (IMDSv2:
//! token, then `autoscaling/target-lifecycle-state`) on loopback and a fake
//! `aws` CLI on PATH that records its calls.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{alpha_agent, Proxy, TempDir};
use splicegate::testkit::{client_config, greet};
use tokio::io::AsyncReadExt;

/// A fake IMDSv2 on `addr`: a token for a PUT, then the lifecycle state,
/// the instance id and the region for GETs that carry it.
fn fake_imds(addr: SocketAddr, state: Arc<Mutex<String>>) {
    let l = TcpListener::bind(addr).expect("bind the fake IMDS");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut head = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let first = head.lines().next().unwrap_or("").to_owned();
            let token = head.contains("x-aws-ec2-metadata-token: tok")
                || head.contains("X-aws-ec2-metadata-token: tok");
            let (code, body) = if first.starts_with("PUT /latest/api/token") {
                ("200 OK", "tok".to_owned())
            } else if !token {
                ("401 Unauthorized", String::new())
            } else if first.starts_with("GET /latest/meta-data/autoscaling/target-lifecycle-state")
            {
                ("200 OK", state.lock().unwrap().clone())
            } else if first.starts_with("GET /latest/meta-data/instance-id") {
                ("200 OK", "i-0abc123".to_owned())
            } else {
                ("404 Not Found", String::new())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// A fake `aws` in `dir`: appends its arguments to `aws.log`, and fails
/// while `aws.fail` exists.
fn fake_aws(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let script = format!(
        "#!/bin/sh\necho \"$@\" >> '{d}/aws.log'\nif [ -e '{d}/aws.fail' ]; then echo 'fake aws: failing as told' >&2; exit 255; fi\nexit 0\n",
        d = dir.display()
    );
    let p = dir.join("aws");
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn aws_calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("aws.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A free loopback address nothing listens on (yet).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The watcher, with the fake `aws` first on PATH; its log lines (JSON)
/// are collected.
fn watcher(
    dir: &Path,
    control: &Path,
    imds: SocketAddr,
    max: &str,
) -> (Child, Arc<Mutex<Vec<String>>>) {
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new(common::bin())
        .args([
            "--log-format",
            "json",
            "lifecycle-watch",
            "--group",
            "fleet",
            "--hook",
            "drain",
        ])
        .args([
            "--region",
            "eu-west-1",
            "--poll",
            "100ms",
            "--heartbeat",
            "400ms",
            "--max",
            max,
        ])
        .arg("--control")
        .arg(control)
        .arg("--imds")
        .arg(format!("http://{imds}"))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (err, sink) = (child.stderr.take().unwrap(), Arc::clone(&lines));
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    (child, lines)
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + common::WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn health(admin: SocketAddr) -> String {
    common::admin_get(admin, "/health")
}

fn config(agent: SocketAddr, control: &Path) -> String {
    format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\nsni = \"alpha.test\"\nagent = \"{agent}\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n[shutdown]\ndrain_grace = \"0\"\ndrain_timeout = \"5s\"\n\
         [control]\npath = \"{}\"\n",
        control.display()
    )
}

/// The watcher keeps polling metadata that does not answer (logging it
/// once), does nothing while the instance is in service, drains splicegate
/// once it is terminating, records heartbeats while a session is open —
/// retrying when `aws` fails — and completes the lifecycle action only
/// after the last session closed, retrying that too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_waits_for_the_last_session() {
    let dir = TempDir::new("lifecycle");
    fake_aws(&dir.0);
    let control = dir.0.join("ctl.sock");
    let (id, agent) = alpha_agent().await;
    let mut proxy = Proxy::start(Some(&config(agent.addr, &control)), &[]);
    let admin = proxy.admin.unwrap();
    let tls = client_config(&[&id], &[]).unwrap();
    let (_, mut session) = greet(proxy.addr, "alpha.test", tls).await.unwrap();

    let imds = free_addr();
    let (mut w, log) = watcher(&dir.0, &control, imds, "60s");
    // Nothing answers at first.
    std::thread::sleep(Duration::from_millis(800));
    let state = Arc::new(Mutex::new("InService".to_owned()));
    fake_imds(imds, Arc::clone(&state));
    std::thread::sleep(Duration::from_millis(600));
    assert!(aws_calls(&dir.0).is_empty(), "{:?}", aws_calls(&dir.0));
    assert!(health(admin).starts_with("HTTP/1.1 200"));
    let unreachable = |log: &Arc<Mutex<Vec<String>>>| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("\"imds_unreachable\""))
            .count()
    };
    assert_eq!(
        unreachable(&log),
        1,
        "logged once: {:?}",
        log.lock().unwrap()
    );

    // Terminating: the drain starts, heartbeats while the session is open.
    *state.lock().unwrap() = "Terminated".to_owned();
    wait_for("/health 503", || health(admin).starts_with("HTTP/1.1 503"));
    wait_for("two heartbeats", || {
        aws_calls(&dir.0)
            .iter()
            .filter(|c| c.contains("record-lifecycle-action-heartbeat"))
            .count()
            >= 2
    });
    // aws fails for a while: heartbeats are retried, nothing completes.
    std::fs::write(dir.0.join("aws.fail"), "").unwrap();
    let before = aws_calls(&dir.0).len();
    wait_for("failed heartbeats retried", || {
        aws_calls(&dir.0).len() >= before + 2
    });
    std::fs::remove_file(dir.0.join("aws.fail")).unwrap();
    assert!(!aws_calls(&dir.0)
        .iter()
        .any(|c| c.contains("complete-lifecycle-action")));
    // The session still works during the drain.
    session.get_mut().0.set_nodelay(true).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut session, b"ping")
        .await
        .unwrap();
    let mut back = [0u8; 4];
    session.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");

    // The completion fails at first too, and is retried.
    std::fs::write(dir.0.join("aws.fail"), "").unwrap();
    let heartbeats = aws_calls(&dir.0).len();
    drop(session);
    wait_for("a failed completion", || {
        aws_calls(&dir.0)
            .iter()
            .any(|c| c.contains("complete-lifecycle-action"))
    });
    assert_eq!(
        proxy.wait_exit(),
        0,
        "splicegate ends its drain once the session is gone"
    );
    std::fs::remove_file(dir.0.join("aws.fail")).unwrap();
    let status = {
        let deadline = Instant::now() + common::WAIT;
        loop {
            if let Some(s) = w.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the watcher did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(status.success(), "{status}: {:?}", log.lock().unwrap());
    let calls = aws_calls(&dir.0);
    let completes: Vec<&String> = calls
        .iter()
        .filter(|c| c.contains("complete-lifecycle-action"))
        .collect();
    assert!(completes.len() >= 2, "retried: {calls:?}");
    for c in &completes {
        for want in [
            "--lifecycle-hook-name drain",
            "--auto-scaling-group-name fleet",
            "--instance-id i-0abc123",
            "--region eu-west-1",
            "--lifecycle-action-result CONTINUE",
        ] {
            assert!(c.contains(want), "{c}: lacks {want}");
        }
    }
    // Only completions after the session closed; no heartbeat after them.
    let first_complete = calls
        .iter()
        .position(|c| c.contains("complete-lifecycle-action"))
        .unwrap();
    assert!(first_complete >= heartbeats, "{calls:?}");
    assert!(
        calls[first_complete..]
            .iter()
            .all(|c| c.contains("complete-lifecycle-action")),
        "{calls:?}"
    );
}

/// Sessions that never end: the action is completed when `--max` passes,
/// with the session still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_completes_at_the_maximum() {
    let dir = TempDir::new("lifecycle-max");
    fake_aws(&dir.0);
    let control = dir.0.join("ctl.sock");
    let (id, agent) = alpha_agent().await;
    let proxy = Proxy::start(Some(&config(agent.addr, &control)), &[]);
    let tls = client_config(&[&id], &[]).unwrap();
    let (_, _session) = greet(proxy.addr, "alpha.test", tls).await.unwrap();
    let imds = free_addr();
    let state = Arc::new(Mutex::new("Terminated".to_owned()));
    fake_imds(imds, state);
    let t = Instant::now();
    let (mut w, log) = watcher(&dir.0, &control, imds, "3s");
    let status = {
        let deadline = Instant::now() + common::WAIT;
        loop {
            if let Some(s) = w.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the watcher did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(status.success(), "{status}");
    assert!(t.elapsed() >= Duration::from_secs(3), "completed early");
    let calls = aws_calls(&dir.0);
    assert!(
        calls.last().unwrap().contains("complete-lifecycle-action"),
        "{calls:?}"
    );
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("\"scale_in_max\"")),
        "{:?}",
        log.lock().unwrap()
    );
    // splicegate still serves the session: its drain deadline is the
    // watcher's maximum, not shorter.
    let status = control_status(&control);
    assert_eq!(status["draining"], true, "{status}");
    assert_eq!(status["connections"], 1, "{status}");
}

fn control_status(path: &Path) -> serde_json::Value {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.write_all(b"status\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    serde_json::from_str(out.trim()).unwrap()
}
