//! The control socket: the operator's interface to the running process, a
//! Unix stream socket (mode 0600) that nothing on the network reaches, in
//! the manner of HAProxy's runtime API. One command per connection, one
//! line, answered with one JSON object on one line:
//!
//! ```text
//! $ echo status | socat - UNIX-CONNECT:/run/splicegate/control.sock
//! {"ok":true,"pid":4711,...}
//! ```
//!
//! A command is the words `splicegate ctl` takes (`upgrade --timeout 30`).
//! Failures answer `{"ok":false,"kind":"...","error":"..."}` with a stable
//! `kind`. Only root and the user the process runs as may connect
//! (`SO_PEERCRED`); a request must arrive within [`REQUEST_TIMEOUT`] and
//! fit [`MAX_REQUEST`] bytes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::process::{accept_gated, Process, UpgradeState};

/// Where the control socket listens unless configured otherwise
/// (`[control] path`, `--control`); systemd's `RuntimeDirectory=splicegate`
/// makes its directory.
pub const DEFAULT_PATH: &str = "/run/splicegate/control.sock";

/// Longest request line, in bytes.
pub const MAX_REQUEST: usize = 4096;

/// Time a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Control connections served at once; more wait in the backlog.
const MAX_CLIENTS: usize = 16;

/// Serve the control socket while its gate is open.
pub async fn serve(listener: UnixListener, p: Arc<Process>) {
    let permits = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut gate = p.local.subscribe();
    while let Some((permit, accepted)) =
        accept_gated(&mut gate, &permits, || listener.accept()).await
    {
        match accepted {
            Ok((s, _)) => {
                let p = Arc::clone(&p);
                let guard = p.local_tracker.enter();
                tokio::spawn(async move {
                    answer(s, &p).await;
                    drop(permit);
                    drop(guard);
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A failed command's answer.
fn fail(kind: &str, error: impl std::fmt::Display) -> Value {
    json!({"ok": false, "kind": kind, "error": error.to_string()})
}

async fn answer(mut s: UnixStream, p: &Arc<Process>) {
    let reply = match peer_allowed(&s) {
        Err(why) => {
            tracing::warn!(event = "control_refused", reason = %why, "control socket: connection refused");
            fail("permission_denied", why)
        }
        Ok(()) => match read_request(&mut s).await {
            Err(v) => v,
            Ok(line) => {
                let words: Vec<&str> = line.split_whitespace().collect();
                let v = command(p, &words).await;
                let verb = words.first().copied().unwrap_or("");
                tracing::info!(
                    event = "control",
                    command = %crate::logging::printable(verb),
                    ok = v["ok"].as_bool().unwrap_or(false),
                    "control command"
                );
                v
            }
        },
    };
    let mut out = reply.to_string();
    out.push('\n');
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let _ = s.write_all(out.as_bytes()).await;
        let _ = s.shutdown().await;
        // What a client sent beyond its request (a line too long) is read
        // and dropped, a bounded amount, so closing does not reset the
        // connection before the client has read the answer.
        let mut sink = [0u8; 4096];
        let mut left: usize = 1 << 20;
        while left > 0 {
            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    })
    .await;
}

/// Root, or the user this process runs as.
fn peer_allowed(s: &UnixStream) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(s, PeerCredentials)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == me {
        Ok(())
    } else {
        Err(format!(
            "uid {} is neither root nor the user splicegate runs as (uid {me})",
            cred.uid()
        ))
    }
}

/// One line, bounded in size and time.
async fn read_request(s: &mut UnixStream) -> Result<String, Value> {
    let mut r = BufReader::new(s).take(MAX_REQUEST as u64 + 1);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, r.read_until(b'\n', &mut buf)).await;
    match read {
        Err(_) => {
            return Err(fail(
                "timeout",
                format!("no request line within {REQUEST_TIMEOUT:?}"),
            ))
        }
        Ok(Err(e)) => return Err(fail("io", e)),
        Ok(Ok(_)) => {}
    }
    if buf.len() > MAX_REQUEST {
        return Err(fail(
            "too_long",
            format!("request longer than {MAX_REQUEST} bytes"),
        ));
    }
    let line =
        String::from_utf8(buf).map_err(|_| fail("bad_request", "the request is not UTF-8"))?;
    let line = line.trim_end_matches(['\n', '\r']);
    if line.trim().is_empty() {
        return Err(fail("bad_request", "empty request; try `help`"));
    }
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(fail("bad_request", "control characters in the request"));
    }
    Ok(line.to_owned())
}

/// The commands, with their one-line help.
pub const COMMANDS: &[(&str, &str)] = &[
    ("help", "this list"),
    ("status", "pid, version, uptime, draining, open sessions, live upgrade state"),
    (
        "upgrade [--timeout SECS]",
        "start the binary at this process's path and hand it every socket and session that can move",
    ),
];

/// Flags of a command: `--name value` pairs after the verb; anything else
/// is an error naming it.
struct Flags<'a> {
    pairs: Vec<(&'a str, &'a str)>,
    positional: Vec<&'a str>,
}

fn flags<'a>(words: &[&'a str], known: &[&str]) -> Result<Flags<'a>, Value> {
    let mut pairs = Vec::new();
    let mut positional = Vec::new();
    let mut it = words.iter();
    while let Some(&w) = it.next() {
        if let Some(name) = w.strip_prefix("--") {
            if !known.contains(&name) {
                return Err(fail(
                    "bad_request",
                    format!("unknown option --{}", crate::logging::printable(name)),
                ));
            }
            let Some(&v) = it.next() else {
                return Err(fail("bad_request", format!("--{name} needs a value")));
            };
            pairs.push((name, v));
        } else {
            positional.push(w);
        }
    }
    Ok(Flags { pairs, positional })
}

impl Flags<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    fn seconds(&self, name: &str, max: u64) -> Result<Option<Duration>, Value> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.parse::<u64>() {
            Ok(n) if n >= 1 && n <= max => Ok(Some(Duration::from_secs(n))),
            _ => Err(fail(
                "bad_request",
                format!(
                    "--{name} takes whole seconds from 1 to {max}, not `{}`",
                    crate::logging::printable(v)
                ),
            )),
        }
    }
}

/// Run one command.
pub async fn command(p: &Arc<Process>, words: &[&str]) -> Value {
    let Some((&verb, rest)) = words.split_first() else {
        return fail("bad_request", "empty request; try `help`");
    };
    match verb {
        "help" => {
            let list: Vec<Value> = COMMANDS
                .iter()
                .map(|(c, h)| json!({"command": c, "help": h}))
                .collect();
            json!({"ok": true, "commands": list})
        }
        "status" => status(p),
        "upgrade" => {
            let f = match flags(rest, &["timeout"]) {
                Ok(f) => f,
                Err(v) => return v,
            };
            if let Some(extra) = f.positional.first() {
                return fail(
                    "bad_request",
                    format!("unexpected `{}`", crate::logging::printable(extra)),
                );
            }
            let timeout = match f.seconds("timeout", 3600) {
                Ok(t) => t.unwrap_or(crate::upgrade::DEFAULT_TIMEOUT),
                Err(v) => return v,
            };
            match crate::upgrade::upgrade(p, timeout).await {
                Ok(r) => json!({
                    "ok": true,
                    "pid": r.pid,
                    "listeners": r.listeners,
                    "connections": r.connections,
                    "in_flight_bytes": r.in_flight,
                    "pipes": r.pipes,
                    "flows": r.flows,
                    "staying": r.staying,
                }),
                Err(e) => fail(e.kind(), e),
            }
        }
        other => fail(
            "unknown_command",
            format!(
                "unknown command `{}`; try `help`",
                crate::logging::printable(other)
            ),
        ),
    }
}

fn status(p: &Process) -> Value {
    let upgrade = p.upgrade_state().clone();
    let (state, to) = match upgrade {
        UpgradeState::Idle => ("idle", None),
        UpgradeState::InProgress => ("in_progress", None),
        UpgradeState::Retired(pid) => ("retired", Some(pid)),
    };
    json!({
        "ok": true,
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": p.started.elapsed().as_secs(),
        "draining": p.drain.draining(),
        "sessions": p.sessions.len(),
        "connections": p.tracker.active(),
        "upgrade": state,
        "handed_over_to": to,
    })
}

/// Why a request to the control socket got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached.
    #[error("cannot connect to the control socket {path}: {source} (is splicegate running, with this --control path?)")]
    Connect {
        /// Its path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Sending or reading failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// Its path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("control socket {path}: no answer within {after:?}")]
    Timeout {
        /// Its path.
        path: String,
        /// The wait.
        after: Duration,
    },
    /// The answer is not JSON.
    #[error("control socket {path}: the answer is not JSON: {answer}")]
    Garbled {
        /// Its path.
        path: String,
        /// What came.
        answer: String,
    },
}

/// Send one command to the control socket at `path` and read its answer,
/// within `wait`.
pub async fn request(path: &Path, line: &str, wait: Duration) -> Result<Value, ControlError> {
    let name = path.display().to_string();
    let exchange = async {
        let mut s = UnixStream::connect(path)
            .await
            .map_err(|source| ControlError::Connect {
                path: name.clone(),
                source,
            })?;
        let io = |source| ControlError::Io {
            path: name.clone(),
            source,
        };
        s.write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(io)?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.map_err(io)?;
        let text = String::from_utf8_lossy(&answer).trim().to_owned();
        serde_json::from_str(&text).map_err(|_| ControlError::Garbled {
            path: name.clone(),
            answer: text,
        })
    };
    tokio::time::timeout(wait, exchange)
        .await
        .map_err(|_| ControlError::Timeout {
            path: name.clone(),
            after: wait,
        })?
}
