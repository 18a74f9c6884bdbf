//! Loopback TLS agents, clients and synthetic ClientHellos, used by the
//! `demo` command, the integration tests and the benchmarks. Nothing here is
//! on the proxy's data path.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A self-signed certificate and its key.
#[derive(Debug)]
pub struct Identity {
    /// DER certificate.
    pub cert: CertificateDer<'static>,
    /// PKCS#8 private key, DER.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The certificate as PEM.
    pub cert_pem: String,
    /// The key as PEM.
    pub key_pem: String,
}

/// Generate a self-signed certificate covering `names` (DNS names,
/// wildcards like `*.x.example`, or IP addresses).
pub fn identity(names: &[&str]) -> Result<Identity, rcgen::Error> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names)?;
    Ok(Identity {
        cert: ck.cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()),
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server configuration presenting `id`.
pub fn server_config(id: &Identity) -> Result<Arc<ServerConfig>, rustls::Error> {
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![id.cert.clone()],
            PrivateKeyDer::Pkcs8(id.key.clone_key()),
        )?;
    Ok(Arc::new(cfg))
}

/// A rustls client configuration trusting exactly `roots`, so a handshake
/// succeeds only with an agent whose certificate covers the SNI.
pub fn client_config(
    roots: &[&Identity],
    alpn: &[&str],
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.cert.clone())?;
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A running loopback TLS agent. It greets each client with
/// `agent NAME\n`, then echoes every byte until the client closes.
pub struct Agent {
    /// Bound address.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Agent {
    /// Start an agent named `name` on `bind` (port 0 picks one).
    pub async fn spawn(
        name: &str,
        config: Arc<ServerConfig>,
        bind: SocketAddr,
    ) -> io::Result<Agent> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let greeting = format!("agent {name}\n");
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let acceptor = acceptor.clone();
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if tls.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = tls.shutdown().await;
                });
            }
        });
        Ok(Agent {
            addr,
            accepted,
            task,
        })
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connect through `proxy` with SNI `sni`, complete the TLS handshake and
/// read the agent's greeting line (without the newline).
pub async fn greet(
    proxy: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
) -> io::Result<(String, tokio_rustls::client::TlsStream<TcpStream>)> {
    let tcp = TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(sni.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
    let mut line = Vec::new();
    loop {
        let b = tls.read_u8().await?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > 256 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "greeting too long",
            ));
        }
    }
    Ok((String::from_utf8_lossy(&line).into_owned(), tls))
}

/// A minimal well-formed TLS 1.2/1.3 ClientHello carrying `sni` and
/// `alpn`, with a GREASE extension, split into records of at most
/// `per_record` handshake bytes.
pub fn client_hello(sni: Option<&str>, alpn: &[&str], per_record: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    let mut push = |ty: u16, data: &[u8]| {
        exts.extend_from_slice(&ty.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(data);
    };
    push(0x0a0a, &[]);
    if let Some(name) = sni {
        let mut d = Vec::new();
        d.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        d.push(0);
        d.extend_from_slice(&(name.len() as u16).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        push(0, &d);
    }
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p.as_bytes());
        }
        let mut d = (list.len() as u16).to_be_bytes().to_vec();
        d.extend_from_slice(&list);
        push(16, &d);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    frame_records(&hs, per_record)
}

/// Frame handshake bytes into TLS handshake records of at most
/// `per_record` bytes each.
pub fn frame_records(handshake: &[u8], per_record: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in handshake.chunks(per_record.max(1)) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Extract the handshake payload from a buffer of complete handshake
/// records (the inverse of [`frame_records`]).
pub fn unframe_records(mut records: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while !records.is_empty() {
        let len = usize::from(u16::from_be_bytes([*records.get(3)?, *records.get(4)?]));
        out.extend_from_slice(records.get(5..5 + len)?);
        records = &records[5 + len..];
    }
    Some(out)
}
