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

use std::net::SocketAddr;
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
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the admin listener needs besides its socket.
pub struct Admin {
    /// Counters rendered by `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The live routing (pool health for `/health`).
    pub routes: Arc<SharedRoutes>,
    /// Draining turns `/health` to 503.
    pub drain: Drain,
    /// Peers whose PROXY headers are accepted.
    pub proxy_trusted: Vec<Cidr>,
    /// Connections served at once; more wait in the backlog.
    pub max_connections: usize,
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
    let permits = Arc::new(Semaphore::new(admin.max_connections.max(1)));
    while let Some((permit, accepted)) =
        accept_gated(&mut gate, &permits, || listener.accept()).await
    {
        match accepted {
            Ok((s, peer)) => {
                let admin = Arc::clone(&admin);
                let guard = tracker.enter();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(s, peer, &admin)).await;
                    drop(permit);
                    drop(guard);
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut s: TcpStream, peer: SocketAddr, admin: &Admin) -> std::io::Result<()> {
    let (header, mut buf) = match pp::read_optional(&mut s, Instant::now(), REQUEST_TIMEOUT).await {
        Ok(read) => read,
        // A TCP health check: connect, then close.
        Err(ReadError::Truncated { received: 0 }) => return Ok(()),
        Err(e) => {
            tracing::info!(event = "admin_refused", peer = %peer, outcome = e.kind(), reason = %e, "admin: bad PROXY header");
            return bad_request(&mut s, &format!("bad PROXY header: {e}\n")).await;
        }
    };
    if header.is_some() && !admin.proxy_trusted.iter().any(|c| c.contains(peer.ip())) {
        tracing::info!(event = "admin_refused", peer = %peer, outcome = "proxy_untrusted", "admin: PROXY header from a peer outside [admin] proxy_trusted refused");
        return bad_request(
            &mut s,
            "PROXY header from an untrusted peer; see [admin] proxy_trusted\n",
        )
        .await;
    }
    buf.reserve(1024);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() >= MAX_REQUEST {
            return bad_request(&mut s, "bad request\n").await;
        }
        if s.read_buf(&mut buf).await? == 0 {
            if buf.is_empty() {
                // A PROXY header (LOCAL: a load balancer's TCP health
                // check) and nothing else.
                return Ok(());
            }
            return bad_request(&mut s, "bad request\n").await;
        }
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
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
    let routes = &admin.routes;
    match path.split('?').next().unwrap_or("") {
        "/health" => match routes.current().unhealthy(admin.drain.draining()) {
            Some(why) => {
                let body = format!("{why}\n");
                respond(&mut s, head, "503 Service Unavailable", "text/plain", &body).await
            }
            None => respond(&mut s, head, "200 OK", "text/plain", "ok\n").await,
        },
        "/metrics" => {
            let mut text = admin.metrics.render(admin.drain.draining());
            crate::upstream::pool::render_metrics(&routes.current().pools, &mut text);
            respond(&mut s, head, "200 OK", "text/plain; version=0.0.4", &text).await
        }
        _ => {
            respond(
                &mut s,
                head,
                "404 Not Found",
                "text/plain",
                "not found: try /health or /metrics\n",
            )
            .await
        }
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
