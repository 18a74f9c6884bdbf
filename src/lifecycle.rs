//! `splicegate lifecycle-watch`: a scale-in that waits for sessions. On an
//! instance of an auto scaling group with a termination lifecycle hook, it
//! polls the instance metadata (IMDSv2) for
//! `autoscaling/target-lifecycle-state`; once it reads `Terminated` it
//! starts splicegate's drain (so `/health` answers 503), records a
//! lifecycle-action heartbeat while sessions remain, and completes the
//! lifecycle action (`CONTINUE`) once the last session has ended or the
//! maximum wait has passed. The AWS calls go through the `aws` CLI, with
//! the instance role's credentials.
//!
//! Nothing is fatal: metadata that does not answer is polled again (logged
//! once), a failed `aws` call is retried (logged each time), and the action
//! is never completed while a session is open, short of the maximum.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// What the watcher needs.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The instance metadata service (`http://169.254.169.254`).
    pub imds: String,
    /// The auto scaling group.
    pub group: String,
    /// The termination lifecycle hook.
    pub hook: String,
    /// The region (None: read from the instance metadata).
    pub region: Option<String>,
    /// splicegate's control socket.
    pub control: PathBuf,
    /// The `aws` command.
    pub aws: PathBuf,
    /// How often the metadata and the sessions are looked at.
    pub poll: Duration,
    /// How often a heartbeat is recorded while sessions remain (below the
    /// hook's heartbeat timeout).
    pub heartbeat: Duration,
    /// The longest the termination waits for sessions.
    pub max: Duration,
}

/// Watch until the lifecycle action is completed.
pub fn run(w: &Watch) -> Result<(), String> {
    let imds = Imds::new(&w.imds)?;
    tracing::info!(event = "lifecycle_watch", group = %w.group, hook = %w.hook, "watching for this instance's termination");
    let mut unreachable_logged = false;
    loop {
        match imds.get("/latest/meta-data/autoscaling/target-lifecycle-state") {
            Ok(state) if state.trim() == "Terminated" => break,
            Ok(_) => unreachable_logged = false,
            Err(e) => {
                if !unreachable_logged {
                    tracing::warn!(event = "imds_unreachable", error = %e, "instance metadata not answering; polling on (logged once until it answers)");
                    unreachable_logged = true;
                }
            }
        }
        std::thread::sleep(w.poll);
    }
    let started = Instant::now();
    tracing::info!(
        event = "scale_in",
        "this instance is being terminated: draining splicegate until its sessions end"
    );
    let instance = loop {
        match imds.get("/latest/meta-data/instance-id") {
            Ok(id) if !id.trim().is_empty() => break id.trim().to_owned(),
            Ok(_) | Err(_) => std::thread::sleep(w.poll),
        }
    };
    let region = match &w.region {
        Some(r) => r.clone(),
        None => loop {
            match imds.get("/latest/meta-data/placement/region") {
                Ok(r) if !r.trim().is_empty() => break r.trim().to_owned(),
                _ => std::thread::sleep(w.poll),
            }
        },
    };
    // splicegate's own drain must not end the sessions before the watcher
    // gives up on them: a minute beyond the maximum.
    let deadline = w.max.as_secs() + 60;
    match ctl(w, &format!("drain --deadline {deadline}")) {
        Ok(_) => tracing::info!(
            event = "drain_started",
            deadline_s = deadline,
            "splicegate drains: /health answers 503, open sessions go on"
        ),
        Err(e) => {
            tracing::warn!(event = "drain_not_started", error = %e, "cannot start splicegate's drain (not running, or draining already)")
        }
    }
    let aws = |action: &str, extra: &[&str]| -> Result<(), String> {
        let out = Command::new(&w.aws)
            .args(["autoscaling", action])
            .args(["--lifecycle-hook-name", &w.hook])
            .args(["--auto-scaling-group-name", &w.group])
            .args(["--instance-id", &instance])
            .args(["--region", &region])
            .args(extra)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", w.aws.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "aws autoscaling {action}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let mut last_beat = Instant::now();
    loop {
        let open = open_sessions(w);
        if open == 0 {
            tracing::info!(
                event = "sessions_ended",
                waited_s = started.elapsed().as_secs(),
                "the last session ended"
            );
            break;
        }
        if started.elapsed() >= w.max {
            tracing::warn!(event = "scale_in_max", sessions = open, max = ?w.max, "the maximum wait passed with sessions open; terminating anyway");
            break;
        }
        if last_beat.elapsed() >= w.heartbeat {
            match aws("record-lifecycle-action-heartbeat", &[]) {
                Ok(()) => {
                    tracing::info!(
                        event = "heartbeat",
                        sessions = open,
                        "lifecycle action heartbeat recorded"
                    );
                    last_beat = Instant::now();
                }
                Err(e) => tracing::warn!(event = "heartbeat_failed", error = %e, "retrying"),
            }
        }
        std::thread::sleep(w.poll);
    }
    let mut backoff = w.poll.max(Duration::from_secs(1));
    loop {
        match aws(
            "complete-lifecycle-action",
            &["--lifecycle-action-result", "CONTINUE"],
        ) {
            Ok(()) => {
                tracing::info!(
                    event = "lifecycle_completed",
                    "lifecycle action completed: the instance terminates"
                );
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(event = "complete_failed", error = %e, "retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// One control command; its JSON answer.
fn ctl(w: &Watch, line: &str) -> Result<serde_json::Value, String> {
    let mut s = std::os::unix::net::UnixStream::connect(&w.control)
        .map_err(|e| format!("{}: {e}", w.control.display()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).map_err(|_| format!("not JSON: {out}"))?;
    if v["ok"] == true {
        Ok(v)
    } else {
        Err(v["error"].as_str().unwrap_or("failed").to_owned())
    }
}

/// Connections splicegate still serves (its drained process exits once the
/// last one ended: a control socket nobody answers means none).
fn open_sessions(w: &Watch) -> u64 {
    match ctl(w, "status") {
        Ok(v) => v["connections"].as_u64().unwrap_or(0),
        Err(_) => 0,
    }
}

/// An IMDSv2 client: a session token, then GETs with it.
struct Imds {
    addr: SocketAddr,
    host: String,
}

impl Imds {
    fn new(url: &str) -> Result<Imds, String> {
        let host = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("--imds {url}: only http:// URLs"))?
            .trim_end_matches('/')
            .to_owned();
        let with_port = if host.contains(':') {
            host.clone()
        } else {
            format!("{host}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("--imds {url}: {e}"))?
            .next()
            .ok_or_else(|| format!("--imds {url}: no address"))?;
        Ok(Imds { addr, host })
    }

    /// One HTTP/1.1 exchange; the body of a 200.
    fn request(&self, method: &str, path: &str, header: &str) -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1))
            .map_err(|e| format!("{}: {e}", self.addr))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{header}Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.host
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.take(64 * 1024)
            .read_to_end(&mut raw)
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).unwrap_or("");
        if status != "200" {
            return Err(format!("{method} {path}: HTTP {status}"));
        }
        Ok(body.to_owned())
    }

    /// GET `path` with a fresh token.
    fn get(&self, path: &str) -> Result<String, String> {
        let token = self.request(
            "PUT",
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n",
        )?;
        self.request(
            "GET",
            path,
            &format!("X-aws-ec2-metadata-token: {}\r\n", token.trim()),
        )
    }
}
