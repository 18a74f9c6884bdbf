//! The HTTP side of the resolver: hyper's pooled HTTP/1.1 client over
//! rustls (a private CA, optionally a client certificate), one request
//! form, and the answer's JSON.

use std::net::IpAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use serde::Deserialize;

use super::{ResolveError, ResolverConfig, Transport};

/// The pooled client.
pub(super) type Client =
    hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Largest answer body read, in bytes.
const ANSWER_MAX: usize = 64 * 1024;

/// The answer's JSON as the API defines it. Unknown fields are ignored,
/// as the Gateway does.
#[derive(Debug, Deserialize)]
pub struct Wire {
    /// The session the answer is for.
    #[serde(rename = "SessionId")]
    pub session_id: Option<String>,
    /// `HTTP` or `QUIC`.
    #[serde(rename = "TransportProtocol")]
    pub transport: String,
    /// The agent: an IP address or a host name.
    #[serde(rename = "DcvServerEndpoint")]
    pub endpoint: String,
    /// The agent's port (a number, or a string of digits).
    #[serde(rename = "Port", deserialize_with = "port")]
    pub port: u16,
    /// The path the agent serves DCV under.
    #[serde(rename = "WebUrlPath")]
    pub web_url_path: Option<String>,
}

fn port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Text(String),
    }
    let n = match Raw::deserialize(d)? {
        Raw::Num(n) => n,
        Raw::Text(s) => s
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("Port {s:?} is not a number")))?,
    };
    u16::try_from(n)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| serde::de::Error::custom(format!("Port {n} is not a TCP/UDP port")))
}

/// Parse a `200` answer's body.
pub fn parse_answer(body: &[u8]) -> Result<Wire, ResolveError> {
    serde_json::from_slice(body)
        .map_err(|e| ResolveError::BadAnswer(format!("the answer is not the expected JSON: {e}")))
}

/// The TLS settings toward the resolver: its certificate verified against
/// `ca` (for an `https` URL), a client certificate if configured.
pub(super) fn tls_config(cfg: &ResolverConfig) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &cfg.ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|i| i.collect())
            .map_err(|e| format!("ca {}: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!("ca {}: no certificate in the file", ca.display()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("ca {}: {e}", ca.display()))?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    // ALPN (`http/1.1`) is set by the connector.
    let tls = match &cfg.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect())
                .map_err(|e| format!("cert {}: {e}", cert.display()))?;
            if chain.is_empty() {
                return Err(format!(
                    "cert {}: no certificate in the file",
                    cert.display()
                ));
            }
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("cert/key: {e}"))?
        }
    };
    Ok(tls)
}

/// The pooled client for `cfg` (inside a runtime: the pool's timer).
pub(super) fn build(cfg: &ResolverConfig) -> Result<Client, String> {
    let tls = tls_config(cfg)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(cfg.max_in_flight)
            .build(https),
    )
}

/// One `resolveSession` request. Unbounded in time: the caller bounds it.
pub(super) async fn request(
    client: &Client,
    cfg: &ResolverConfig,
    session: &str,
    transport: Transport,
    from: Option<IpAddr>,
) -> Result<Wire, ResolveError> {
    let base = cfg.url.trim_end_matches('/');
    let mut uri = format!("{base}/resolveSession?sessionId={session}&transport={transport}");
    if let Some(ip) = from {
        // An IPv6 address's colons are fine in a query.
        uri.push_str(&format!("&clientIpAddress={ip}"));
    }
    let req = hyper::Request::post(&uri)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| ResolveError::Unavailable(format!("request {uri}: {e}")))?;
    let resp = client.request(req).await.map_err(|e| {
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why.push_str(": ");
            why.push_str(&s.to_string());
            source = s.source();
        }
        ResolveError::Unavailable(format!("{base}: {why}"))
    })?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), ANSWER_MAX)
        .collect()
        .await
        .map_err(
            |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => ResolveError::BadAnswer(format!("answer body over {ANSWER_MAX} bytes")),
                None => ResolveError::Unavailable(format!("reading the answer: {e}")),
            },
        )?
        .to_bytes();
    match status.as_u16() {
        200 => parse_answer(&body),
        404 => Err(ResolveError::Unknown {
            session: session.to_owned(),
            why: "404 from the resolver".to_owned(),
        }),
        400 => Err(ResolveError::Unknown {
            session: session.to_owned(),
            why: "400 from the resolver: it rejects the request".to_owned(),
        }),
        500.. => Err(ResolveError::Unavailable(format!(
            "{base} answered {status}"
        ))),
        _ => Err(ResolveError::BadAnswer(format!(
            "{base} answered {status}, expected 200, 404 or 400"
        ))),
    }
}
