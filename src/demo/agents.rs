//! The demo's loopback TLS agents and clients: self-signed identities,
//! rustls configurations, an agent that greets and echoes, and a client
//! that connects through the proxy and reads the greeting. The tests and
//! the benchmarks use them too (through `testkit`). Nothing here is on the
//! proxy's data path.

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
