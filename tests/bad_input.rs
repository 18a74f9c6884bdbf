//! Bad input from clients and bad agents: each case ends with a clear close
//! reason in the access log, and the proxy keeps serving other clients.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;

use common::{raw_client, Proxy};
use splicegate::testkit::{
    client_config, client_hello, greet, identity, server_config, Agent, Identity,
};

struct Setup {
    proxy: Proxy,
    id: Identity,
    _agent: Agent,
}

/// A proxy with one good route (`good.test`) plus `extra_routes`.
async fn setup(listener_extra: &str, extra_routes: &str) -> Setup {
    let id = identity(&["good.test"]).unwrap();
    let agent = Agent::spawn(
        "good",
        server_config(&id).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nhello_timeout = \"1s\"\nconnect_timeout = \"1s\"\n{listener_extra}\n\
         [[route]]\nsni = \"good.test\"\nagent = \"{}\"\n{extra_routes}\n[routing]\nno_sni = \"reject\"\n",
        agent.addr
    );
    Setup {
        proxy: Proxy::start(Some(&cfg), &[]),
        id,
        _agent: agent,
    }
}

impl Setup {
    /// Send `bytes`, expect the proxy to close with `outcome` and a reason
    /// containing `reason`; then check a good client still gets through.
    async fn expect(&mut self, bytes: &[u8], close_write: bool, outcome: &str, reason: &str) {
        let mut c = raw_client(self.proxy.addr, bytes);
        if close_write {
            c.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let ev = self.proxy.closed(outcome);
        let got = ev["reason"].as_str().unwrap();
        assert!(got.contains(reason), "reason {got:?} lacks {reason:?}");
        assert_eq!(ev["bytes_to_agent"], 0);
        // Refused before a complete ClientHello: closed without a byte.
        // After one: a fatal TLS alert saying why, then the close.
        let alert = match outcome {
            "no_route" | "no_sni" => Some(112),
            "agent_not_allowed" | "vpce_not_allowed" => Some(49),
            o if o.starts_with("agent_") || o.starts_with("pool_") => Some(80),
            _ => None,
        };
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        match alert {
            Some(d) => assert_eq!(rest, [21, 3, 3, 0, 2, 2, d], "{outcome}"),
            None => assert!(rest.is_empty(), "{outcome}: {rest:?}"),
        }
        self.still_serves().await;
    }

    async fn still_serves(&mut self) {
        let tls = client_config(&[&self.id], &[]).unwrap();
        let (greeting, _s) = greet(self.proxy.addr, "good.test", tls)
            .await
            .expect("good client after bad input");
        assert_eq!(greeting, "agent good");
        self.proxy.event("routed", |v| v["sni"] == "good.test");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes() {
    let mut s = setup("", "").await;
    s.expect(
        &[0x00, 0xff, 0x13, 0x37, 0x42],
        false,
        "not_tls",
        "first byte 0x00",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http() {
    let mut s = setup("", "").await;
    s.expect(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        false,
        "not_tls",
        "plain text starting with \"GET\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslv2_style_hello() {
    let mut s = setup("", "").await;
    // SSLv2 CLIENT-HELLO header: length with the high bit, type 1, version 3.1.
    s.expect(
        &[0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15],
        false,
        "not_tls",
        "SSLv2-style ClientHello",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_hello_then_close() {
    let mut s = setup("", "").await;
    let hello = client_hello(Some("good.test"), &[], 1 << 14);
    s.expect(
        &hello[..hello.len() / 2],
        true,
        "truncated",
        "before the ClientHello was complete",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_that_never_completes_hits_the_total_deadline() {
    let mut s = setup("", "").await;
    let hello = client_hello(Some("good.test"), &[], 1 << 14);
    // Part of a hello, then silence: the deadline runs from accept.
    s.expect(&hello[..20], false, "timeout", "timed out after 1s")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_hello() {
    let mut s = setup("hello_max_bytes = 4096", "").await;
    // A handshake header announcing 20000 bytes.
    let mut bytes = vec![22, 3, 1, 0x40, 0x00, 1, 0x00, 0x4e, 0x20];
    bytes.extend_from_slice(&[0u8; 200]);
    s.expect(
        &bytes,
        false,
        "too_large",
        "of 20004 bytes exceeds the cap of 4096",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_hello() {
    let mut s = setup("", "").await;
    // A record carrying a ServerHello (type 2) instead of a ClientHello.
    s.expect(
        &[22, 3, 3, 0, 4, 2, 0, 0, 0],
        false,
        "malformed",
        "not ClientHello",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_without_sni_is_rejected() {
    let mut s = setup("", "").await;
    s.expect(
        &client_hello(None, &[], 1 << 14),
        false,
        "no_sni",
        "no SNI in ClientHello and no_sni = \"reject\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_that_refuses() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let routes = format!("[[route]]\nsni = \"refusing.test\"\nagent = \"127.0.0.1:{port}\"\n");
    let mut s = setup("", &routes).await;
    let reason = format!("agent 127.0.0.1:{port} refused the connection");
    s.expect(
        &client_hello(Some("refusing.test"), &[], 1 << 14),
        false,
        "agent_refused",
        &reason,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_agent_times_out() {
    let (addr, _held) = unresponsive_listener();
    let routes = format!("[[route]]\nsni = \"blackhole.test\"\nagent = \"{addr}\"\n");
    let mut s = setup("", &routes).await;
    s.expect(
        &client_hello(Some("blackhole.test"), &[], 1 << 14),
        false,
        "agent_timeout",
        "timed out after 1s",
    )
    .await;
}

/// A loopback listener whose accept queue is full, so further SYNs are
/// dropped and connects hang: an unreachable agent that stays on loopback.
fn unresponsive_listener() -> (SocketAddr, Vec<std::net::TcpStream>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut held = Vec::new();
    // Fill the queue: stop at the first connect that does not complete.
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    std::mem::forget(sock);
    (addr, held)
}

#[test]
fn garbage_does_not_disturb_an_established_session() {
    // Covered per case above; here many bad clients at once while one good
    // session streams.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = setup("", "").await;
        let tls = client_config(&[&s.id], &[]).unwrap();
        let (_, mut session) = greet(s.proxy.addr, "good.test", tls).await.unwrap();
        let mut bad = Vec::new();
        for i in 0..50u8 {
            let mut c = std::net::TcpStream::connect(s.proxy.addr).unwrap();
            let _ = c.write_all(&[i, 0xff, 0xfe, 0x00, 0x01]);
            bad.push(c);
        }
        for _ in 0..50 {
            s.proxy.closed("not_tls");
        }
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        session.write_all(b"still here").await.unwrap();
        let mut buf = [0u8; 10];
        session.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still here");
    });
}

/// Client-chosen strings cannot forge log lines: an ALPN list carrying CR,
/// LF and ESC is written escaped in the text log format.
#[test]
fn alpn_with_line_breaks_cannot_forge_text_log_lines() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(common::bin())
        .args(["--log-format", "text", "run", "--listen", "127.0.0.1:0"])
        .args(["--agent", "only.test=127.0.0.1:1"])
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        rx.recv_timeout(common::WAIT)
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .expect("a log line")
    };
    let listening = loop {
        let l = next();
        if l.contains("listening") {
            break l;
        }
    };
    let addr: SocketAddr = listening
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let forged = "h2\nFORGED INFO splicegate: connection routed agent=10.9.9.9\r\n\x1b[2J";
    let _c = raw_client(addr, &client_hello(Some("other.test"), &[forged], 1 << 14));
    let mut lines = Vec::new();
    loop {
        let l = next();
        let done = l.contains("connection closed");
        lines.push(l);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let all = lines.join("\n");
    assert!(!lines.iter().any(|l| l.starts_with("FORGED")), "{all}");
    assert!(!all.contains('\x1b') && !all.contains('\r'), "{all:?}");
    assert!(all.contains("h2\\u{a}FORGED"), "{all}");
}
