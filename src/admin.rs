//! The admin listener: `GET /health` for the load balancer's health checks
//! and `GET /metrics` for Prometheus. Plain HTTP/1.1, one request per
//! connection, on its own address (like the DCV Connection Gateway's health
//! port 8989).
//!
//! An AWS NLB with PROXY protocol v2 enabled on the target group puts a
//! header in front of its health-check connections too, whatever port they
//! use. The admin listener therefore accepts an optional PROXY header (v1
//! or v2, LOCAL or PROXY) from `[admin] proxy_trusted` peers, refuses one
//! from anyone else, and answers plain requests (a Prometheus scraper sends
//! no header) from everyone.
//!
//! A health check that times out marks the target unhealthy, and an NLB
//! then closes every connection of that target: the admin listener must
//! stay answerable whoever else connects. It accepts at once and never
//! waits for a permit; the trusted peers (the load balancer's health
//! checkers) have connection slots of their own; anyone else shares
//! `max_connections`, at most `max_per_peer` per address, and a connection
//! beyond either is closed at once; every client has `request_timeout`
//! from accept to send its whole request head.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::cidr::Cidr;
use crate::metrics::Metrics;
use crate::process::{accept_gated, Gate};
use crate::proxy_protocol::{self as pp, ReadError};
use crate::routing::SharedRoutes;
use crate::shutdown::{Drain, Tracker};

const MAX_REQUEST: usize = 8192;
/// Time to write an answer (a large `/metrics` to a slow scraper).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the admin listener needs besides its socket.
pub struct Admin {
    /// Counters rendered by `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The live routing (pool health for `/health`).
    pub routes: Arc<SharedRoutes>,
    /// Draining turns `/health` to 503.
    pub drain: Drain,
    /// Peers whose PROXY headers are accepted, and who have connection
    /// slots of their own (the load balancer's health checkers).
    pub proxy_trusted: Vec<Cidr>,
    /// Connections from other peers served at once (as many again for
    /// trusted peers); more are closed at once.
    pub max_connections: usize,
    /// Connections one untrusted address may have open at once.
    pub max_per_peer: usize,
    /// Time from accept for the whole request head (PROXY header
    /// included).
    pub request_timeout: Duration,
    /// When each kind of refusal was last logged.
    pub logged: LogLimit,
}

/// Refusals are logged at most every 10 s per kind (with how many came
/// since), so a flood of bad requests cannot flood the log; `/metrics`
/// counts every one.
#[derive(Debug, Default)]
pub struct LogLimit(std::sync::Mutex<std::collections::HashMap<&'static str, (Instant, u64)>>);

impl LogLimit {
    /// Whether to log a refusal of `kind` now; with how many were not
    /// logged since the last line.
    fn allow(&self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(kind) {
            Some((at, skipped)) if now - *at < Duration::from_secs(10) => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                let n = *skipped;
                *at = now;
                *skipped = 0;
                Some(n)
            }
            None => {
                m.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

/// Connections open per untrusted address.
#[derive(Default)]
struct Peers(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

/// A peer's share; dropping it frees the share.
struct PeerSlot(Arc<Peers>, IpAddr);

impl Peers {
    fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot(Arc::clone(self), ip))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Serve while `gate` is open (a live upgrade pauses it once the new
/// process answers, and closes it once the socket is handed over), until
/// the task is dropped.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    mut gate: watch::Receiver<Gate>,
    tracker: Tracker,
) {
    let slots = admin.max_connections.max(1);
    let (general, trusted) = (
        Arc::new(Semaphore::new(slots)),
        Arc::new(Semaphore::new(slots)),
    );
    let peers = Arc::new(Peers::default());
    while let Some(accepted) = accept_gated(&mut gate, || listener.accept()).await {
        let (s, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let is_trusted = admin.proxy_trusted.iter().any(|c| c.contains(peer.ip()));
        let pool = if is_trusted { &trusted } else { &general };
        let slot = match is_trusted {
            true => None,
            false => match peers.enter(peer.ip(), admin.max_per_peer) {
                Some(slot) => Some(slot),
                None => {
                    refused(
                        &admin,
                        "peer_limit",
                        peer,
                        "too many connections from one peer; closed unanswered",
                    );
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(pool).try_acquire_owned() else {
            refused(
                &admin,
                "busy",
                peer,
                "every admin slot is taken; closed unanswered",
            );
            continue;
        };
        let admin = Arc::clone(&admin);
        let guard = tracker.enter();
        tokio::spawn(async move {
            let _ = answer(s, peer, &admin).await;
            drop(slot);
            drop(permit);
            drop(guard);
        });
    }
}

/// A connection closed or refused unanswered: counted; logged at most
/// every 10 s per reason.
fn refused(admin: &Admin, reason: &'static str, peer: SocketAddr, why: &str) {
    admin.metrics.admin_refused(reason);
    if let Some(skipped) = admin.logged.allow(reason) {
        tracing::info!(
            event = "admin_refused",
            outcome = reason,
            peer = %peer,
            unlogged_since = skipped,
            "admin: {why} (logged at most every 10 s per reason)"
        );
    }
}

async fn answer(mut s: TcpStream, peer: SocketAddr, admin: &Admin) -> std::io::Result<()> {
    let started = Instant::now();
    let limit = admin.request_timeout;
    let head = tokio::time::timeout(limit, read_head(&mut s, peer, admin, started)).await;
    let (method, path) = match head {
        Ok(Ok(Some(request))) => request,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            refused(
                admin,
                "timeout",
                peer,
                "no complete request within request_timeout",
            );
            return Ok(());
        }
    };
    let write = async {
        let head = method == "HEAD";
        if method != "GET" && !head {
            return respond(
                &mut s,
                head,
                "405 Method Not Allowed",
                "text/plain",
                "GET or HEAD only\n",
            )
            .await;
        }
        route(&mut s, head, &path, admin).await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or(Ok(()))
}

/// The request line's method and path, once the whole head is in (None:
/// nothing to answer, or answered already with an error).
async fn read_head(
    s: &mut TcpStream,
    peer: SocketAddr,
    admin: &Admin,
    started: Instant,
) -> std::io::Result<Option<(String, String)>> {
    let (header, mut buf) = match pp::read_optional(s, started, admin.request_timeout).await {
        Ok(read) => read,
        // A TCP health check: connect, then close.
        Err(ReadError::Truncated { received: 0 }) => return Ok(None),
        Err(ReadError::Timeout { .. } | ReadError::Io(_)) => {
            refused(
                admin,
                "timeout",
                peer,
                "no complete request within request_timeout",
            );
            return Ok(None);
        }
        Err(e) => {
            refused(
                admin,
                "bad_request",
                peer,
                &format!("bad PROXY header: {e}"),
            );
            bad_request(s, &format!("bad PROXY header: {e}\n")).await?;
            return Ok(None);
        }
    };
    if header.is_some() && !admin.proxy_trusted.iter().any(|c| c.contains(peer.ip())) {
        refused(
            admin,
            "proxy_untrusted",
            peer,
            "PROXY header from a peer outside [admin] proxy_trusted refused",
        );
        bad_request(
            s,
            "PROXY header from an untrusted peer; see [admin] proxy_trusted\n",
        )
        .await?;
        return Ok(None);
    }
    buf.reserve(1024);
    // The head ends at an empty line; a bare LF ends lines as well as CRLF.
    while head_end(&buf).is_none() {
        if buf.len() >= MAX_REQUEST {
            refused(admin, "bad_request", peer, "request head too large");
            bad_request(s, "bad request\n").await?;
            return Ok(None);
        }
        if s.read_buf(&mut buf).await? == 0 {
            if buf.is_empty() {
                // A PROXY header (LOCAL: a load balancer's TCP health
                // check) and nothing else.
                return Ok(None);
            }
            refused(
                admin,
                "bad_request",
                peer,
                "closed before the request head was complete",
            );
            bad_request(s, "bad request\n").await?;
            return Ok(None);
        }
    }
    let line = buf
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    Ok(Some((method.to_owned(), path.to_owned())))
}

/// Where the request head ends: after its empty line (`\r\n\r\n`,
/// `\n\n`, or a mix).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut prev_lf = false;
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'\n' if prev_lf => return Some(i + 1),
            b'\n' => prev_lf = true,
            b'\r' => {}
            _ => prev_lf = false,
        }
    }
    None
}

/// Answer `path`.
async fn route(s: &mut TcpStream, head: bool, path: &str, admin: &Admin) -> std::io::Result<()> {
    let routes = &admin.routes;
    match path.split('?').next().unwrap_or("") {
        "/health" => match routes.current().unhealthy(admin.drain.draining()) {
            Some(why) => {
                let body = format!("{why}\n");
                respond(s, head, "503 Service Unavailable", "text/plain", &body).await
            }
            None => respond(s, head, "200 OK", "text/plain", "ok\n").await,
        },
        "/metrics" => {
            let mut text = admin.metrics.render(admin.drain.draining());
            let routing = routes.current();
            crate::upstream::pool::render_metrics(&routing.pools, &mut text);
            render_draining(&routing, &routes.drained, &mut text);
            respond(s, head, "200 OK", "text/plain; version=0.0.4", &text).await
        }
        _ => {
            respond(
                s,
                head,
                "404 Not Found",
                "text/plain",
                "not found: try /health or /metrics\n",
            )
            .await
        }
    }
}

/// `splicegate_agent_draining{agent}`: 1 for each agent an operator
/// drained, 0 for the other agents the routes and pools name.
fn render_draining(
    routing: &crate::routing::Routing,
    drained: &crate::maintenance::Drained,
    out: &mut String,
) {
    use std::fmt::Write;
    let mut agents: std::collections::BTreeSet<String> =
        routing.named_agents().into_keys().collect();
    let list = drained.list();
    agents.extend(list.iter().cloned());
    let _ = writeln!(
        out,
        "# HELP splicegate_agent_draining 1 while an operator has drained the agent (no new session goes to it).\n# TYPE splicegate_agent_draining gauge"
    );
    for a in agents {
        let v = u8::from(list.contains(&a));
        let _ = writeln!(
            out,
            "splicegate_agent_draining{{agent=\"{}\"}} {v}",
            a.replace('\\', "\\\\").replace('"', "\\\"")
        );
    }
}

async fn bad_request(s: &mut TcpStream, body: &str) -> std::io::Result<()> {
    respond(s, false, "400 Bad Request", "text/plain", body).await
}

async fn respond(
    s: &mut TcpStream,
    head: bool,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    );
    if !head {
        msg.push_str(body);
    }
    s.write_all(msg.as_bytes()).await?;
    s.shutdown().await
}
