//! A Session Resolver written for the tests: it answers
//! `POST /resolveSession?sessionId=…&transport=…&clientIpAddress=…` with the
//! JSON of the DCV Connection Gateway's API, per session as told, over
//! plain HTTP or HTTPS that requires a client certificate. HTTP/1.1 with
//! keep-alive, so connection reuse shows in `connections`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// What the resolver answers for one session.
#[derive(Clone)]
pub enum Reply {
    /// 200 with this body.
    Json(String),
    /// This status, empty body.
    Status(u16),
    /// Never answer.
    Hang,
}

/// The JSON of a `200` answer, as AWS's sample resolver writes it.
pub fn found(session: &str, transport: &str, agent: SocketAddr, path: &str) -> Reply {
    Reply::Json(format!(
        r#"{{"SessionId": "{session}", "TransportProtocol": "{transport}", "DcvServerEndpoint": "{}", "Port": {}, "WebUrlPath": "{path}"}}"#,
        agent.ip(),
        agent.port()
    ))
}

/// What the resolver knows and saw; shared across restarts.
#[derive(Default)]
pub struct State {
    /// Answers by session id (404 for any other).
    pub answers: Mutex<HashMap<String, Reply>>,
    /// Request lines (`POST /resolveSession?...`) and `Accept` values.
    pub requests: Mutex<Vec<(String, String)>>,
    /// Delay before each answer, in milliseconds.
    pub delay_ms: AtomicU64,
    /// TCP connections accepted.
    pub connections: AtomicUsize,
    /// Requests being worked on now, and the most at once.
    pub working: AtomicUsize,
    pub most_working: AtomicUsize,
}

impl State {
    pub fn answer(&self, session: &str, reply: Reply) {
        self.answers
            .lock()
            .unwrap()
            .insert(session.to_owned(), reply);
    }

    /// Request targets that asked for `session`.
    pub fn asked(&self, session: &str) -> Vec<String> {
        let needle = format!("sessionId={session}&");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(line, _)| line.contains(&needle))
            .map(|(line, _)| line.clone())
            .collect()
    }
}

/// A running resolver.
pub struct TestResolver {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: JoinHandle<()>,
}

impl TestResolver {
    /// Start on a free loopback port; with `tls`, HTTPS.
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> TestResolver {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestResolver::serve(l, tls, Arc::default())
    }

    /// Start again on `addr` with the same state (after [`Self::stop`]).
    pub async fn restart(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        state: Arc<State>,
    ) -> TestResolver {
        let l = TcpListener::bind(addr).await.unwrap();
        TestResolver::serve(l, tls, state)
    }

    fn serve(l: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, state: Arc<State>) -> Self {
        let addr = l.local_addr().unwrap();
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            while let Ok((s, _)) = l.accept().await {
                st.connections.fetch_add(1, Ordering::Relaxed);
                let (st, acceptor) = (Arc::clone(&st), acceptor.clone());
                conns.spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(t) = a.accept(s).await {
                                serve_conn(t, st).await;
                            }
                        }
                        None => serve_conn(s, st).await,
                    }
                });
            }
        });
        TestResolver { addr, state, task }
    }

    /// Stop listening and close every connection.
    pub async fn stop(mut self) -> Arc<State> {
        self.task.abort();
        let _ = (&mut self.task).await;
        Arc::clone(&self.state)
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }
}

impl Drop for TestResolver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, st: Arc<State>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&buf[..end]), Ok(httparse::Status::Complete(_))) {
            return;
        }
        let line = format!("{} {}", req.method.unwrap_or(""), req.path.unwrap_or(""));
        let accept = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("accept"))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
            .unwrap_or_default();
        let session = line
            .split_once("sessionId=")
            .map(|(_, rest)| rest.split('&').next().unwrap_or("").to_owned())
            .unwrap_or_default();
        buf.drain(..end);
        st.requests.lock().unwrap().push((line, accept));
        let now = st.working.fetch_add(1, Ordering::SeqCst) + 1;
        st.most_working.fetch_max(now, Ordering::SeqCst);
        // Counted as worked on until answered, or until the client goes
        // away (the connection closes while the answer is being made).
        struct Working<'a>(&'a AtomicUsize);
        impl Drop for Working<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _working = Working(&st.working);
        let delay = st.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let reply = st
            .answers
            .lock()
            .unwrap()
            .get(&session)
            .cloned()
            .unwrap_or(Reply::Status(404));
        let (status, body) = match reply {
            Reply::Json(b) => (200, b),
            Reply::Status(n) => (n, String::new()),
            Reply::Hang => {
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A private CA, the resolver's certificate for 127.0.0.1 and a client
/// certificate, all signed by it, written as PEM files into `dir`:
/// `ca.pem`, `client.pem`, `client.key`. Returns the resolver's TLS
/// configuration, which requires a client certificate from the CA.
pub fn mtls(dir: &std::path::Path) -> Arc<rustls::ServerConfig> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert = CertificateParams::new(vec!["splicegate.test".to_owned()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("client.pem"), client_cert.pem()).unwrap();
    std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![CertificateDer::from(server_cert.der().to_vec())], key)
        .unwrap();
    Arc::new(cfg)
}
