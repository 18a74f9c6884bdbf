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
