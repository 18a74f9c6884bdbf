//! `splicegate-bench agent`: the suite's echo/bulk agent as a command, to
//! run on any host — where a DCV agent would sit — and measure a network
//! path with `splicegate-bench probe` without DCV.
//!
//! It speaks TLS on every connection, then either the bench protocol
//! directly (passthrough: `I`, `E`, `B` of [`crate::agent`]) or, when the
//! first bytes are `GET `, an HTTP request answered with
//! `101 Switching Protocols` and then the bench protocol over the upgraded
//! stream — what a terminating proxy's WebSocket path needs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::agent::{serve_with, Stall};

/// Options of `splicegate-bench agent`.
#[derive(clap::Args, Clone)]
pub struct AgentArgs {
    /// Address to listen on (TCP), e.g. 0.0.0.0:8443.
    #[arg(long)]
    listen: SocketAddr,
    /// Certificate chain (PEM) to present.
    #[arg(long, requires = "tls_key", conflicts_with = "self_signed")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Generate a self-signed certificate for these names (DNS names or IP
    /// addresses) instead.
    #[arg(long, num_args = 1.., required_unless_present = "tls_cert")]
    self_signed: Vec<String>,
    /// Write the presented certificate (PEM) here, for `probe --ca`.
    #[arg(long)]
    cert_out: Option<PathBuf>,
    /// Name the agent answers `I` with.
    #[arg(long, default_value = "agent")]
    name: String,
    /// Hold one echo reply per connection, `--stall-ms` long, once the
    /// connection has echoed for this many seconds (to check that a probe
    /// sees a stall).
    #[arg(long, requires = "stall_ms")]
    stall_at: Option<f64>,
    /// Length of the stall, in milliseconds.
    #[arg(long, requires = "stall_at")]
    stall_ms: Option<u64>,
    /// Connections served at once; more wait in the backlog.
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
}

/// Run the agent until SIGINT or SIGTERM.
pub async fn run(a: AgentArgs) -> Result<bool, String> {
    let (certs, key, pem) = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(c)
                .and_then(|i| i.collect())
                .map_err(|e| format!("--tls-cert {}: {e}", c.display()))?;
            if certs.is_empty() {
                return Err(format!("--tls-cert {}: no certificate", c.display()));
            }
            let key = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| format!("--tls-key {}: {e}", k.display()))?;
            let pem = std::fs::read_to_string(c)
                .map_err(|e| format!("--tls-cert {}: {e}", c.display()))?;
            (certs, key, pem)
        }
        _ => {
            let names: Vec<&str> = a.self_signed.iter().map(String::as_str).collect();
            let id =
                splicegate::testkit::identity(&names).map_err(|e| format!("--self-signed: {e}"))?;
            let key = PrivateKeyDer::Pkcs8(id.key.clone_key());
            (vec![id.cert.clone()], key, id.cert_pem)
        }
    };
    if let Some(out) = &a.cert_out {
        std::fs::write(out, pem).map_err(|e| format!("--cert-out {}: {e}", out.display()))?;
    }
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
    .map_err(|e| format!("TLS configuration: {e}"))?;
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind(a.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", a.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    // The line scripts (and the tests) wait for.
    println!("listening on {local}");
    let stall = match (a.stall_at, a.stall_ms) {
        (Some(at), Some(ms)) => Some(Stall {
            at: Duration::try_from_secs_f64(at).map_err(|e| format!("--stall-at: {e}"))?,
            hold: Duration::from_millis(ms),
        }),
        _ => None,
    };
    let name: Arc<str> = a.name.into();
    let permits = Arc::new(Semaphore::new(a.max_connections.max(1)));
    let accept = async {
        loop {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            let s = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: wait instead of spinning.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = s.set_nodelay(true);
            let (acceptor, name) = (acceptor.clone(), Arc::clone(&name));
            tokio::spawn(async move {
                let _permit = permit;
                let Ok(Ok(mut t)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(s)).await
                else {
                    return;
                };
                let mut first = vec![0u8; 4096];
                let n =
                    match tokio::time::timeout(Duration::from_secs(60), t.read(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                first.truncate(n);
                let pending = if first.starts_with(b"GET ") {
                    let Some(rest) = upgrade(&mut t, first).await else {
                        return;
                    };
                    rest
                } else {
                    first
                };
                serve_with(t, &name, pending, stall).await;
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown() => {}
    }
    Ok(true)
}

/// Read the rest of an HTTP head and answer 101; returns the bytes after
/// the head.
async fn upgrade<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    mut buf: Vec<u8>,
) -> Option<Vec<u8>> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
            s.write_all(ok).await.ok()?;
            s.flush().await.ok()?;
            return Some(buf.split_off(i + 4));
        }
        if buf.len() > 16 * 1024 {
            let _ = s
                .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
                .await;
            return None;
        }
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            return None;
        }
    }
}

async fn shutdown() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
