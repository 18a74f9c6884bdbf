//! Benchmark agents on loopback.
//!
//! TLS agents (rustls) and raw agents (a real ClientHello, then plain
//! bytes) speak one tiny protocol after the handshake or hello:
//! - `I`: reply with the agent's name and a newline, then echo;
//! - `E`: echo every byte until EOF;
//! - `B` + 8-byte big-endian N: send N bytes, then close.

use std::net::SocketAddr;
use std::sync::Arc;

use splicegate::sniff::{HelloParser, Progress};
use splicegate::testkit::{identity, server_config, Identity};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Names (and SNI prefixes) of the four agents.
pub const NAMES: [&str; 4] = ["tls-a", "tls-b", "raw-a", "raw-b"];

/// The SNI routed to an agent.
pub fn sni(name: &str) -> String {
    format!("{name}.bench")
}

/// Running agents.
pub struct Agents {
    /// (name, address) of each agent, in [`NAMES`] order.
    pub addrs: Vec<(&'static str, SocketAddr)>,
    /// The certificate the TLS agents present.
    pub identity: Identity,
}

impl Agents {
    /// Address of the agent named `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .expect("known agent")
    }
}

/// Start the two TLS and two raw agents on 127.0.0.1.
pub async fn start() -> std::io::Result<Agents> {
    let names: Vec<String> = NAMES.iter().map(|n| sni(n)).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let identity = identity(&refs).map_err(std::io::Error::other)?;
    let acceptor = TlsAcceptor::from(server_config(&identity).map_err(std::io::Error::other)?);
    let mut addrs = Vec::new();
    for name in NAMES {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push((name, l.local_addr()?));
        let tls = name.starts_with("tls").then(|| acceptor.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let _ = s.set_nodelay(true);
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acc) => {
                            if let Ok(t) = acc.accept(s).await {
                                serve(t, name, Vec::new()).await;
                            }
                        }
                        None => {
                            let mut s = s;
                            if let Some(rest) = read_hello(&mut s).await {
                                serve(s, name, rest).await;
                            }
                        }
                    }
                });
            }
        });
    }
    Ok(Agents { addrs, identity })
}

/// Read a ClientHello; return the bytes that followed it.
async fn read_hello<S: AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(4096);
    let mut p = HelloParser::new(16384);
    loop {
        if s.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
        if let Ok(Progress::Done(_)) = p.advance(&buf) {
            return Some(buf.split_off(p.consumed()));
        }
    }
}

/// Serve the bench protocol on `s`, with `pending` already read.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(s: S, name: &str, pending: Vec<u8>) {
    serve_with(s, name, pending, None).await;
}

/// A reply held back once per connection (`agent --stall-at --stall-ms`):
/// the first echo due `at` or later after the echo began waits `hold`.
#[derive(Debug, Clone, Copy)]
pub struct Stall {
    /// Time into the echo after which the stall happens.
    pub at: std::time::Duration,
    /// How long the reply waits.
    pub hold: std::time::Duration,
}

/// [`serve`], with an optional stall in the echo.
pub async fn serve_with<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    name: &str,
    mut pending: Vec<u8>,
    mut stall: Option<Stall>,
) {
    while pending.is_empty() {
        let mut b = [0u8; 64];
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&b[..n]),
        }
    }
    let cmd = pending.remove(0);
    match cmd {
        b'B' => {
            while pending.len() < 8 {
                let mut b = [0u8; 8];
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&b[..n]),
                }
            }
            let mut n = u64::from_be_bytes(pending[..8].try_into().expect("8 bytes"));
            let chunk = vec![0x5a_u8; 256 * 1024];
            while n > 0 {
                let k = n.min(chunk.len() as u64) as usize;
                if s.write_all(&chunk[..k]).await.is_err() {
                    return;
                }
                n -= k as u64;
            }
            let _ = s.shutdown().await;
        }
        _ => {
            if cmd == b'I' && s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                return;
            }
            if !pending.is_empty() && s.write_all(&pending).await.is_err() {
                return;
            }
            let mut b = vec![0u8; 16 * 1024];
            let began = std::time::Instant::now();
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Some(st) = stall.filter(|st| began.elapsed() >= st.at) {
                            tokio::time::sleep(st.hold).await;
                            stall = None;
                        }
                        if s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown().await;
        }
    }
}

/// Shared TLS client configuration trusting the agents' certificate.
pub fn client(agents: &Agents) -> Arc<rustls::ClientConfig> {
    splicegate::testkit::client_config(&[&agents.identity], &[]).expect("valid client config")
}
