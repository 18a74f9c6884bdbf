//! The admin listener: `GET /health` for the load balancer's health checks
//! and `GET /metrics` for Prometheus. Plain HTTP/1.1, one request per
//! connection, on its own address (like the DCV Connection Gateway's health
//! port 8989).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;
use crate::server::SharedRoutes;

const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, routes: Arc<SharedRoutes>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let m = Arc::clone(&metrics);
                let r = Arc::clone(&routes);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(s, &m, &r)).await;
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut s: TcpStream, metrics: &Metrics, routes: &SharedRoutes) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() >= MAX_REQUEST || s.read_buf(&mut buf).await? == 0 {
            return respond(
                &mut s,
                false,
                "400 Bad Request",
                "text/plain",
                "bad request\n",
            )
            .await;
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
    match path.split('?').next().unwrap_or("") {
        "/health" => match routes.current().unhealthy(metrics.draining()) {
            Some(why) => {
                let body = format!("{why}\n");
                respond(&mut s, head, "503 Service Unavailable", "text/plain", &body).await
            }
            None => respond(&mut s, head, "200 OK", "text/plain", "ok\n").await,
        },
        "/metrics" => {
            let mut text = metrics.render();
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
