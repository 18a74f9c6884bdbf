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

mod commands;
pub mod show;

pub use commands::{command, COMMANDS};

use crate::process::{accept_gated, Process};

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
    loop {
        // At the cap, connections wait in the backlog.
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let Some(accepted) = accept_gated(&mut gate, || listener.accept()).await else {
            return;
        };
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
pub(crate) fn fail(kind: &str, error: impl std::fmt::Display) -> Value {
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
