//! Terminate mode: what reaches an agent is exactly one request, framed as
//! splicegate checked it. Agents here record every byte they receive, and
//! the tests count the requests in it as an HTTP/1.1 server would.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use common::http::{read_to_end_lossy, recording_http_agent, requests_in, tls_client_after};
use common::{make_cert, Proxy, TempDir, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    proxy: Proxy,
    dir: TempDir,
}

impl Setup {
    fn cacert(&self) -> PathBuf {
        self.dir.0.join("cert.pem")
    }
}

/// A terminate listener sending every request to `agent` over plain TCP.
fn proxy_to(agent: SocketAddr, extra: &str) -> Setup {
    let dir = TempDir::new("head");
    make_cert(&dir.0, &["IP:127.0.0.1"]);
    let config = format!(
        r#"
[[listener]]
name = "https"
bind = "127.0.0.1:0"
mode = "terminate"
upstream_tls = "off"
{extra}
[[listener.cert]]
cert = "{dir}/cert.pem"
key = "{dir}/key.pem"

[[path_route]]
prefix = "/"
agent = "{agent}"
"#,
        dir = dir.0.display(),
    );
    let proxy = Proxy::start(Some(&config), &[]);
    Setup { proxy, dir }
}

/// `Connection: Content-Length` must not strip the length the proxy framed
/// the body by: otherwise the agent reads the body as a second request
/// that no routing or header rewrite ever saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_listed_framing_headers_cannot_smuggle_a_request() {
    let (agent, mut record) =
        recording_http_agent(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true).await;
    let mut s = proxy_to(agent, "forwarded_headers = true");
    let smuggled = b"GET /admin HTTP/1.1\r\nHost: d\r\nX-Real-IP: 6.6.6.6\r\n\r\n";
    let mut c = tls_client_after(s.proxy.addr, &[], &s.cacert(), None).await;
    let head = format!(
        "POST /x HTTP/1.1\r\nHost: d\r\nContent-Length: {}\r\nConnection: Content-Length, Host, X-Gone\r\nX-Gone: 1\r\n\r\n",
        smuggled.len()
    );
    c.write_all(&[head.as_bytes(), smuggled].concat())
        .await
        .unwrap();
    let reply = tokio::time::timeout(WAIT, read_to_end_lossy(&mut c))
        .await
        .expect("the response");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");

    let got = tokio::time::timeout(WAIT, record.recv())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    let (lines, complete) = requests_in(&got);
    assert_eq!(lines, vec!["POST /x".to_owned()], "agent received:\n{text}");
    assert_eq!(complete, 1);
    assert!(
        text.contains("\r\nHost: d\r\nContent-Length: 52\r\n"),
        "{text}"
    );
    assert!(!text.contains("X-Gone"), "{text}");
    // The would-be request arrived as the POST's body, never parsed.
    assert!(got.ends_with(smuggled), "{text}");
    s.proxy.closed("done");
}

/// A WebSocket handshake the agent refuses (404) while keeping its
/// connection open must not turn into a raw tunnel: the client's next
/// bytes never reach the agent, and the exchange ends with the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_without_101_is_answered_and_ends_the_exchange() {
    let (agent, mut record) = recording_http_agent(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
        false,
    )
    .await;
    let mut s = proxy_to(agent, "");
    let mut c = tls_client_after(s.proxy.addr, &[], &s.cacert(), None).await;
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.ends_with(b"not found") {
        let n = tokio::time::timeout(WAIT, c.read(&mut chunk))
            .await
            .expect("the agent's 404")
            .unwrap();
        assert!(n > 0, "closed before the response: {got:?}");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
    // A client (or an attacker) carrying on as if the tunnel were open.
    let _ = c
        .write_all(b"GET /second HTTP/1.1\r\nHost: d\r\nX-Real-IP: 6.6.6.6\r\n\r\n")
        .await;
    let _ = c.shutdown().await;
    let rest = tokio::time::timeout(WAIT, read_to_end_lossy(&mut c))
        .await
        .expect("the proxy ends the exchange");
    assert_eq!(rest, "");

    let got = tokio::time::timeout(WAIT, record.recv())
        .await
        .unwrap()
        .unwrap();
    let (lines, complete) = requests_in(&got);
    assert_eq!(
        (lines, complete),
        (vec!["GET /ws".to_owned()], 1),
        "agent received:\n{}",
        String::from_utf8_lossy(&got)
    );
    let ev = s.proxy.closed("done");
    assert_eq!(ev["status"], "404", "{ev}");
}
