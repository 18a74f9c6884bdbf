//! TLS toward the agent, for terminate listeners. DCV serves HTTPS on 8443,
//! by default with a self-signed certificate, so the agent's certificate is
//! verified against a CA file the operator gives, or verification is
//! switched off explicitly (`upstream_tls = "insecure"`, logged at startup),
//! or the leg is plain TCP (`off`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::route::Target;

/// How the leg to the agent is secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTls {
    /// TLS, agent certificate verified against the CAs in this PEM file.
    Verify(PathBuf),
    /// TLS without verifying the agent's certificate.
    Insecure,
    /// Plain TCP.
    Off,
}

impl fmt::Display for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamTls::Verify(p) => write!(f, "verify against {}", p.display()),
            UpstreamTls::Insecure => f.write_str("insecure (agent certificate not verified)"),
            UpstreamTls::Off => f.write_str("off (plain TCP)"),
        }
    }
}

/// Why the TLS leg to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The handshake failed (certificate not trusted, protocol error, ...).
    #[error("TLS handshake with agent {agent} failed: {source}")]
    Handshake {
        /// The agent.
        agent: String,
        /// The rustls or I/O error.
        source: std::io::Error,
    },
    /// The handshake did not finish in time.
    #[error("TLS handshake with agent {agent} timed out after {after:?}")]
    Timeout {
        /// The agent.
        agent: String,
        /// The limit.
        after: Duration,
    },
    /// No usable name to verify the agent's certificate against.
    #[error("agent {0}: no server name to verify its certificate against")]
    Name(String),
}

/// A connector for one listener's agents (None for plain TCP).
pub fn connector(mode: &UpstreamTls) -> Result<Option<TlsConnector>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let trust = match mode {
        UpstreamTls::Off => return Ok(None),
        UpstreamTls::Verify(ca) => Trust::load(ca, &provider)?,
        UpstreamTls::Insecure => Trust::Any,
    };
    Ok(Some(TlsConnector::from(Arc::new(client_config(
        provider, trust,
    )))))
}

/// A client configuration that completes the handshake with any agent
/// certificate (ALPN `http/1.1`): for `upstream_tls = "insecure"` and for
/// active health checks.
pub fn insecure_config() -> ClientConfig {
    client_config(
        Arc::new(rustls::crypto::ring::default_provider()),
        Trust::Any,
    )
}

fn client_config(provider: Arc<CryptoProvider>, trust: Trust) -> ClientConfig {
    let mut cfg = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AgentVerifier { trust, provider }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg
}

/// Handshake with the agent at `target` over `tcp`. The certificate must
/// cover `name` if given, else the target's host (IP or DNS name).
pub async fn handshake(
    connector: &TlsConnector,
    tcp: TcpStream,
    target: &Target,
    name: Option<&str>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, TlsError> {
    let agent = target.to_string();
    let server_name = match (name, target) {
        (Some(n), _) => ServerName::try_from(n.to_owned()).ok(),
        (None, Target::Addr(a)) => Some(ServerName::IpAddress(a.ip().into())),
        (None, Target::Host { name, .. }) => ServerName::try_from(name.clone()).ok(),
        (None, Target::Pool(_) | Target::Session(_)) => None,
    }
    .ok_or_else(|| TlsError::Name(agent.clone()))?;
    match tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(TlsError::Handshake { agent, source }),
        Err(_) => Err(TlsError::Timeout {
            agent,
            after: timeout,
        }),
    }
}

/// Which agent certificates are trusted.
#[derive(Debug)]
enum Trust {
    /// Any (`upstream_tls = "insecure"`, health checks).
    Any,
    /// `upstream_tls = "verify"`: a certificate that is byte for byte one
    /// of those in `upstream_ca` (pinned: the self-signed certificate DCV
    /// makes per agent, which `openssl req -x509` also marks `CA:TRUE`, so
    /// chain verification would refuse it as a CA used as an end entity),
    /// or one that chains to them and covers the name dialled (full WebPKI
    /// verification). A pinned certificate is trusted as it is, like an
    /// SSH host key: its names and dates are not checked.
    Listed {
        pins: Vec<CertificateDer<'static>>,
        chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    },
}

impl Trust {
    fn load(ca: &Path, provider: &Arc<CryptoProvider>) -> Result<Trust, String> {
        let name = ca.display();
        let mut store = RootCertStore::empty();
        let mut pins = Vec::new();
        let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("{name}: {e:?}"))?;
        for c in certs {
            let c = c.map_err(|e| format!("{name}: not valid PEM: {e:?}"))?;
            // A certificate that cannot anchor a chain (an unusual
            // self-signed one) can still be pinned.
            let _ = store.add(c.clone());
            pins.push(c);
        }
        if pins.is_empty() {
            return Err(format!("{name}: no CERTIFICATE block found"));
        }
        let chain = if store.is_empty() {
            None
        } else {
            Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(store),
                    Arc::clone(provider),
                )
                .build()
                .map_err(|e| format!("{name}: {e}"))?,
            )
        };
        Ok(Trust::Listed { pins, chain })
    }
}

/// Checks the agent's certificate as its [`Trust`] says, and the handshake
/// signatures always, so the session is at least bound to the key the
/// agent presented.
#[derive(Debug)]
struct AgentVerifier {
    trust: Trust,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AgentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (pins, chain) = match &self.trust {
            Trust::Any => return Ok(ServerCertVerified::assertion()),
            Trust::Listed { pins, chain } => (pins, chain),
        };
        if pins.iter().any(|p| p.as_ref() == end_entity.as_ref()) {
            return Ok(ServerCertVerified::assertion());
        }
        match chain {
            Some(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
