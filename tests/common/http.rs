//! A loopback HTTPS (or plain HTTP) agent for terminate-mode tests: it
//! answers each request with its name and the head it received, echoes
//! WebSocket messages, and misbehaves on request (`/reset`, `/empty`).

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use splicegate::testkit::{identity, server_config, Identity};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

pub struct HttpAgent {
    pub addr: SocketAddr,
    /// Request heads as received, one per request.
    pub heads: mpsc::UnboundedReceiver<String>,
    /// The agent's certificate (TLS agents).
    pub id: Option<Identity>,
}

/// Start an agent named `name` on `bind`. With `tls`, it presents a
/// self-signed certificate for `127.0.0.1`, `127.0.0.2` and `localhost`.
pub async fn http_agent(name: &str, bind: &str, tls: bool) -> HttpAgent {
    let l = TcpListener::bind(bind).await.expect("bind agent");
    let addr = l.local_addr().unwrap();
    let (tx, heads) = mpsc::unbounded_channel();
    let id = tls.then(|| identity(&["127.0.0.1", "127.0.0.2", "localhost"]).unwrap());
    let acceptor = id
        .as_ref()
        .map(|id| tokio_rustls::TlsAcceptor::from(server_config(id).unwrap()));
    let name: Arc<str> = name.into();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (tx, name, acceptor) = (tx.clone(), Arc::clone(&name), acceptor.clone());
            tokio::spawn(async move {
                match acceptor {
                    Some(a) => {
                        if let Ok(t) = a.accept(s).await {
                            serve(t, &name, tx).await;
                        }
                    }
                    None => serve(s, &name, tx).await,
                }
            });
        }
    });
    HttpAgent { addr, heads, id }
}

/// Access to the TCP socket under a stream, to reset it.
pub trait Tcp {
    fn tcp(&self) -> &TcpStream;
}

impl Tcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Tcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

async fn serve<S>(mut s: S, name: &str, tx: mpsc::UnboundedSender<String>)
where
    S: AsyncRead + AsyncWrite + Unpin + Tcp,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 65536 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let _ = tx.send(head.clone());
    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
    let lower = head.to_ascii_lowercase();
    if lower.contains("upgrade: websocket") {
        let key = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| v.trim().to_owned())
            })
            .unwrap_or_default();
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        );
        if s.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
        let mut ws = WebSocketStream::from_raw_socket(s, Role::Server, None).await;
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                let _ = ws.close(None).await;
                break;
            }
            if (m.is_binary() || m.is_text()) && ws.send(m).await.is_err() {
                break;
            }
        }
        return;
    }
    if path.starts_with("/empty") {
        return;
    }
    if path.starts_with("/reset") {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial")
            .await;
        let _ = s.flush().await;
        let _ = socket2::SockRef::from(s.tcp()).set_linger(Some(std::time::Duration::ZERO));
        return;
    }
    if path.starts_with("/page") {
        let body = PAGE;
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(resp.as_bytes()).await;
        let _ = s.shutdown().await;
        return;
    }
    let body = format!("agent {name}\n{head}");
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A page that opens a WebSocket to `ws` (relative to the page, so it goes
/// through the same proxy prefix), sends a message, and reports the echo
/// by fetching `report?...` — which the agent sees as a request head.
pub const PAGE: &str = r#"<!DOCTYPE html>
<html><head><title>splicegate e2e</title></head><body>
<script>
const url = new URL("ws", location.href);
url.protocol = "wss:";
const ws = new WebSocket(url);
const sent = "hello-through-splicegate-" + "x".repeat(5000);
ws.onopen = () => ws.send(sent);
ws.onmessage = (e) => {
  const ok = e.data === sent ? "echo-ok" : "echo-mismatch";
  fetch("report?" + ok + "&len=" + e.data.length).finally(() => ws.close());
};
ws.onerror = () => fetch("report?ws-error");
</script></body></html>
"#;

/// A rustls client of the proxy trusting `cacert`, after writing
/// `preamble` (a PROXY header) on the socket.
pub async fn tls_client_after(
    proxy: SocketAddr,
    preamble: &[u8],
    cacert: &std::path::Path,
    sni: Option<&str>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cacert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_owned()).unwrap(),
        None => ServerName::IpAddress(proxy.ip().into()),
    };
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(preamble).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the proxy")
}

/// Read until EOF (or an error), as text.
pub async fn read_to_end_lossy<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A plain-TCP agent that records every byte each connection sends it,
/// until EOF, and reports them on the channel. It answers the first
/// request (head and `Content-Length` body) with `response`; with
/// `half_close` it then shuts down its writing side, else it keeps the
/// connection open as a keep-alive server would.
pub async fn recording_http_agent(
    response: &'static [u8],
    half_close: bool,
) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut answered = false;
                loop {
                    if !answered && requests_in(&buf).1 >= 1 {
                        answered = true;
                        if s.write_all(response).await.is_err() {
                            break;
                        }
                        if half_close {
                            let _ = s.shutdown().await;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = tx.send(buf);
            });
        }
    });
    (addr, rx)
}

/// The request lines of the complete requests in `bytes`, read one after
/// the other as an HTTP/1.1 server would (head, then a `Content-Length`
/// body), and how many there are; bytes left over that do not form a
/// complete request are reported as a last `<N trailing bytes>` entry.
pub fn requests_in(mut bytes: &[u8]) -> (Vec<String>, usize) {
    let mut lines = Vec::new();
    let mut complete = 0;
    while !bytes.is_empty() {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        let Ok(httparse::Status::Complete(n)) = req.parse(bytes) else {
            lines.push(format!("<{} trailing bytes>", bytes.len()));
            break;
        };
        let len: usize = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .unwrap_or(0);
        if bytes.len() < n + len {
            lines.push(format!("<{} trailing bytes>", bytes.len()));
            break;
        }
        lines.push(format!(
            "{} {}",
            req.method.unwrap_or("?"),
            req.path.unwrap_or("?")
        ));
        complete += 1;
        bytes = &bytes[n + len..];
    }
    (lines, complete)
}
