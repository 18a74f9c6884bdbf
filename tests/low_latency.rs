//! Low-latency mode (`low_latency = "spin"`) through the real binary, on
//! both engines: bytes intact both ways (bulk and many small round trips
//! that end in a spin), half-close, the idle timeout and the drain still
//! apply, and idle connections leave the process at about zero CPU.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{alpha_agent, echo_both_ways, payload, Proxy};
use nix::sys::signal::Signal;
use splicegate::testkit::{client_config, client_hello, greet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SPIN: &str = "low_latency = \"spin\"\nspin_us = 100\n";

fn config(agent: SocketAddr, engine: &str, extra: &str) -> String {
    format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nengine = \"{engine}\"\n{SPIN}{extra}\n\
         [[route]]\nsni = \"alpha.test\"\nagent = \"{agent}\"\n"
    )
}

async fn small_and_bulk(engine: &str) {
    let (id, agent) = alpha_agent().await;
    let mut proxy = Proxy::start(Some(&config(agent.addr, engine, "")), &[]);
    let ev = proxy.seen_event("listening").unwrap();
    assert_eq!(ev["listener"], "listener1");
    let tls = client_config(&[&id], &[]).unwrap();
    let (_, mut s) = greet(proxy.addr, "alpha.test", tls).await.unwrap();
    // Small round trips: each reply arrives while the proxy spins.
    for i in 0..500u32 {
        let msg = format!("message {i:05}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    // Then bulk both ways at once.
    echo_both_ways(s, &payload(3 << 20, 7)).await;
    let ev = proxy.closed("done");
    assert!(ev["bytes_to_client"].as_u64().unwrap() > 3 << 20, "{ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_engine_spinning_keeps_bytes_intact() {
    small_and_bulk("splice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_engine_spinning_keeps_bytes_intact() {
    small_and_bulk("copy").await;
}

/// Reads to EOF, reports what came, answers `reply` and closes.
async fn plain_agent(reply: Vec<u8>) -> (SocketAddr, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let _ = tx.send(got);
        let _ = s.write_all(&reply).await;
    });
    (addr, rx)
}

async fn half_close(engine: &str) {
    let reply = payload(256 * 1024, 9);
    let (agent, received) = plain_agent(reply.clone()).await;
    let cfg = format!("[[listener]]\nbind = \"127.0.0.1:0\"\nengine = \"{engine}\"\n{SPIN}");
    let mut proxy = Proxy::start(Some(&cfg), &["--agent", &agent.to_string()]);
    let mut sent = client_hello(Some("plain.test"), &[], 1 << 14);
    sent.extend_from_slice(&payload(200 * 1024, 3));
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(&sent).await.unwrap();
    c.shutdown().await.unwrap();
    assert!(received.await.unwrap() == sent, "the agent got other bytes");
    let mut back = Vec::new();
    c.read_to_end(&mut back).await.unwrap();
    assert!(
        back == reply,
        "{} of {} reply bytes",
        back.len(),
        reply.len()
    );
    proxy.closed("done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_while_spinning_with_splice() {
    half_close("splice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_while_spinning_with_copy() {
    half_close("copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_and_drain_apply_while_spinning() {
    let (id, agent) = alpha_agent().await;
    let extra = "idle_timeout = \"400ms\"\n[shutdown]\ndrain_timeout = \"300ms\"\n";
    let mut proxy = Proxy::start(Some(&config(agent.addr, "splice", extra)), &[]);
    let tls = client_config(&[&id], &[]).unwrap();
    let (_, mut quiet) = greet(proxy.addr, "alpha.test", tls.clone()).await.unwrap();
    let ev = proxy.closed("idle_timeout");
    assert!(ev["reason"].as_str().unwrap().contains("400ms"), "{ev}");
    let mut buf = [0u8; 8];
    assert_eq!(quiet.read(&mut buf).await.unwrap_or(0), 0);

    // A busy session at SIGTERM ends at the drain deadline.
    let (_, mut busy) = greet(proxy.addr, "alpha.test", tls).await.unwrap();
    busy.write_all(b"ping").await.unwrap();
    busy.read_exact(&mut buf[..4]).await.unwrap();
    proxy.signal(Signal::SIGTERM);
    let writer = tokio::spawn(async move {
        while busy.write_all(b"x").await.is_ok() {
            if busy.read_exact(&mut [0u8; 1]).await.is_err() {
                break;
            }
        }
    });
    proxy.closed("drain_deadline");
    assert_eq!(proxy.wait_exit(), 0);
    writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_leave_the_process_at_zero_cpu() {
    let (id, agent) = alpha_agent().await;
    let proxy = Proxy::start(Some(&config(agent.addr, "splice", "")), &[]);
    let tls = client_config(&[&id], &[]).unwrap();
    // 200 sessions, each ending on a round trip (and so on a spin).
    let mut held = Vec::new();
    for _ in 0..200 {
        let (_, mut s) = greet(proxy.addr, "alpha.test", tls.clone()).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    common::assert_idle_cpu(proxy.pid(), "200 idle spinning-mode connections").await;
    drop(held);
}

/// The agent sends 16 MiB at once; the client reads only after a pause, so
/// the proxy's writes block with bytes still waiting in the agent's
/// socket. Every byte must still arrive (a spin check must not leave
/// unread bytes that no readiness event will announce).
async fn slow_reader(engine: &str) {
    let hello = client_hello(Some("bulk.test"), &[], 1 << 14);
    let data = payload(16 << 20, 5);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = l.local_addr().unwrap();
    let (n, sent) = (hello.len(), data.clone());
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = vec![0u8; n];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(&sent).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let cfg = format!("[[listener]]\nbind = \"127.0.0.1:0\"\nengine = \"{engine}\"\n{SPIN}");
    let _proxy = Proxy::start(Some(&cfg), &["--agent", &agent.to_string()]);
    // A small receive buffer: the proxy's writes to the client block
    // after a few KiB, while the agent's socket stays full.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 << 10).unwrap();
    let mut c = sock.connect(_proxy.addr).await.unwrap();
    c.write_all(&hello).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::with_capacity(data.len());
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = vec![0u8; 4096];
        loop {
            let k = c.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            got.extend_from_slice(&buf[..k]);
            // A slow reader: pauses keep the proxy's writes blocking, over
            // and over.
            if got.len() % (64 << 10) < 4096 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "stalled after {} of {} bytes",
        got.len(),
        data.len()
    );
    assert!(got == data, "{} bytes, content differs", got.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_every_byte_with_splice() {
    slow_reader("splice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_every_byte_with_copy() {
    slow_reader("copy").await;
}
