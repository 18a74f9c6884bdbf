//! End-to-end passthrough: rustls clients → the real splicegate binary →
//! rustls agents on loopback, with rcgen certificates. A completed handshake
//! proves routing: each client trusts only the certificates given and checks
//! the name it sent as SNI.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{echo_both_ways, payload, Proxy};
use splicegate::testkit::{
    client_config, client_hello, greet, identity, server_config, Agent, Identity,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

struct Fleet {
    alpha_id: Identity,
    beta_id: Identity,
    alpha: Agent,
    beta: Agent,
}

async fn fleet() -> Fleet {
    let alpha_id = identity(&["alpha.test"]).unwrap();
    let beta_id = identity(&["*.beta.test"]).unwrap();
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let alpha = Agent::spawn("alpha", server_config(&alpha_id).unwrap(), local)
        .await
        .unwrap();
    let beta = Agent::spawn("beta", server_config(&beta_id).unwrap(), local)
        .await
        .unwrap();
    Fleet {
        alpha_id,
        beta_id,
        alpha,
        beta,
    }
}

fn config(f: &Fleet, engine: &str, extra: &str) -> String {
    format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nengine = \"{engine}\"\n{extra}\n\
         [[route]]\nsni = \"alpha.test\"\nagent = \"{}\"\n\
         [[route]]\nsni = \"*.beta.test\"\nagent = \"{}\"\n",
        f.alpha.addr, f.beta.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_each_sni_to_the_agent_whose_certificate_matches() {
    let f = fleet().await;
    let mut proxy = Proxy::start(Some(&config(&f, "splice", "")), &[]);
    let tls = client_config(&[&f.alpha_id, &f.beta_id], &["http/1.1"]).unwrap();

    let (greeting, _s) = greet(proxy.addr, "alpha.test", tls.clone()).await.unwrap();
    assert_eq!(greeting, "agent alpha");
    let ev = proxy.event("routed", |_| true);
    assert_eq!(ev["sni"], "alpha.test");
    assert_eq!(ev["alpn"], "http/1.1");
    assert_eq!(ev["route"], "exact:alpha.test");
    assert_eq!(ev["agent"], f.alpha.addr.to_string());
    assert_eq!(ev["span"]["listener"], "listener1");

    // Mixed case and a trailing dot are normalised before matching.
    let (greeting, _s) = greet(proxy.addr, "Desk7.BETA.test", tls.clone())
        .await
        .unwrap();
    assert_eq!(greeting, "agent beta");
    assert_eq!(
        proxy.event("routed", |_| true)["route"],
        "wildcard:*.beta.test"
    );

    // A wildcard matches exactly one label.
    assert!(greet(proxy.addr, "a.b.beta.test", tls).await.is_err());
    let ev = proxy.closed("no_route");
    assert_eq!(ev["reason"], "route: no route for SNI \"a.b.beta.test\"");
    assert_eq!(f.alpha.accepted() + f.beta.accepted(), 2);
}

async fn bulk_both_ways(engine: &str) {
    let f = fleet().await;
    let mut proxy = Proxy::start(Some(&config(&f, engine, "")), &[]);
    let tls = client_config(&[&f.alpha_id], &[]).unwrap();
    let (_, stream) = greet(proxy.addr, "alpha.test", tls).await.unwrap();
    echo_both_ways(stream, &payload(3 << 20, 1)).await;
    let ev = proxy.closed("done");
    assert!(ev["bytes_to_agent"].as_u64().unwrap() > 3 << 20, "{ev}");
    assert!(ev["bytes_to_client"].as_u64().unwrap() > 3 << 20, "{ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_mib_each_way_with_splice() {
    bulk_both_ways("splice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_mib_each_way_with_copy() {
    bulk_both_ways("copy").await;
}

/// A plain TCP agent: reads everything until EOF, reports it, then answers
/// with `reply` and closes. Seeing EOF proves the client's FIN crossed the
/// proxy; the reply proves the other direction still flows afterwards.
async fn plain_agent(reply: Vec<u8>) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut got = Vec::new();
            if s.read_to_end(&mut got).await.is_err() {
                continue;
            }
            let _ = tx.send(got);
            let _ = s.write_all(&reply).await;
        }
    });
    (addr, rx)
}

async fn half_close(engine: &str) {
    let reply = payload(512 * 1024, 9);
    let (agent, mut received) = plain_agent(reply.clone()).await;
    let mut proxy = Proxy::start(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--agent",
            &agent.to_string(),
            "--engine",
            engine,
        ],
    );
    let mut sent = client_hello(Some("plain.test"), &[], 1 << 14);
    sent.extend_from_slice(&payload(300 * 1024, 3));
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(&sent).await.unwrap();
    c.shutdown().await.unwrap(); // FIN: client → agent direction ends
    let got = received.recv().await.unwrap();
    assert!(
        got == sent,
        "agent received {} bytes, client sent {}",
        got.len(),
        sent.len()
    );
    let mut back = Vec::new();
    c.read_to_end(&mut back).await.unwrap();
    assert!(
        back == reply,
        "client received {} of {} reply bytes",
        back.len(),
        reply.len()
    );
    let ev = proxy.closed("done");
    assert_eq!(ev["route"], "override");
    assert_eq!(ev["sni"], "plain.test");
    assert_eq!(ev["bytes_to_agent"].as_u64().unwrap(), sent.len() as u64);
    assert_eq!(ev["bytes_to_client"].as_u64().unwrap(), reply.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_other_direction_flowing_with_splice() {
    half_close("splice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_other_direction_flowing_with_copy() {
    half_close("copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_split_into_one_byte_records_and_segments_is_replayed_unchanged() {
    let (agent, mut received) = plain_agent(Vec::new()).await;
    let cfg = format!("[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\nsni = \"split.test\"\nagent = \"{agent}\"\n");
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    // Mixed case and a trailing dot: normalised before matching.
    let hello = client_hello(Some("Split.TEST."), &["h2"], 1);
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    for b in &hello {
        c.write_all(std::slice::from_ref(b)).await.unwrap();
    }
    c.write_all(b"after-hello").await.unwrap();
    c.shutdown().await.unwrap();
    let mut expect = hello.clone();
    expect.extend_from_slice(b"after-hello");
    assert!(received.recv().await.unwrap() == expect);
    let ev = proxy.event("routed", |_| true);
    assert_eq!(ev["sni"], "split.test");
    assert_eq!(ev["alpn"], "h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_quiet_connection() {
    let f = fleet().await;
    let mut proxy = Proxy::start(Some(&config(&f, "splice", "idle_timeout = \"400ms\"")), &[]);
    let tls = client_config(&[&f.alpha_id], &[]).unwrap();
    let (_, mut s) = greet(proxy.addr, "alpha.test", tls).await.unwrap();
    let ev = proxy.closed("idle_timeout");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("no data either way for 400ms"),
        "{ev}"
    );
    // The proxy closed the client side: the client sees EOF or a reset.
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_name_dials_only_allowed_addresses() {
    let id = identity(&["*.agents.test"]).unwrap();
    let allowed = Agent::spawn(
        "two",
        server_config(&id).unwrap(),
        "127.0.0.2:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let port = allowed.addr.port();
    // Same port on another loopback address, outside the allow list.
    let denied = Agent::spawn(
        "three",
        server_config(&id).unwrap(),
        SocketAddr::new("127.0.0.3".parse().unwrap(), port),
    )
    .await
    .unwrap();
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n[[agent_in_name]]\nsuffix = \"agents.test\"\nport = {port}\nallow = [\"127.0.0.2/32\"]\n"
    );
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let tls = client_config(&[&id], &[]).unwrap();
    let (greeting, _s) = greet(proxy.addr, "127-0-0-2.agents.test", tls.clone())
        .await
        .unwrap();
    assert_eq!(greeting, "agent two");
    assert!(greet(proxy.addr, "127-0-0-3.agents.test", tls.clone())
        .await
        .is_err());
    let ev = proxy.closed("agent_not_allowed");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("127.0.0.3, which is outside the allowed networks"),
        "{ev}"
    );
    assert!(greet(proxy.addr, "127-0-0-003.agents.test", tls)
        .await
        .is_err());
    let ev = proxy.closed("agent_not_allowed");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("not a dashed IPv4 address"),
        "{ev}"
    );
    assert_eq!(
        denied.accepted(),
        0,
        "a refused name must not cause a connection attempt"
    );
    assert_eq!(allowed.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_agent_overrides_every_route() {
    let f = fleet().await;
    // The file routes alpha.test to alpha; the flag sends everything to beta.
    let mut proxy = Proxy::start(
        Some(&config(&f, "splice", "")),
        &["--agent", &f.beta.addr.to_string()],
    );
    let tls: Arc<_> = client_config(&[&f.beta_id], &[]).unwrap();
    let (greeting, _s) = greet(proxy.addr, "x.beta.test", tls).await.unwrap();
    assert_eq!(greeting, "agent beta");
    let ev = proxy.event("routed", |_| true);
    assert_eq!(ev["route"], "override");
    assert_eq!(ev["sni"], "x.beta.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listener_and_agent_given_by_host_name() {
    let f = fleet().await;
    // `localhost` resolves from /etc/hosts (no DNS traffic), possibly to ::1
    // first, where nothing listens: the next address is tried.
    let cfg = format!(
        "[[listener]]\nbind = [\"[::1]:0\"]\n[[route]]\nsni = \"alpha.test\"\nagent = \"localhost:{}\"\n",
        f.alpha.addr.port()
    );
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    assert!(proxy.addr.is_ipv6());
    let tls = client_config(&[&f.alpha_id], &[]).unwrap();
    let (greeting, _s) = greet(proxy.addr, "alpha.test", tls).await.unwrap();
    assert_eq!(greeting, "agent alpha");
    let ev = proxy.event("routed", |_| true);
    assert_eq!(ev["agent"], format!("localhost:{}", f.alpha.addr.port()));
    assert!(
        ev["span"]["client"].as_str().unwrap().starts_with("[::1]:"),
        "{ev}"
    );
}

/// Pipe fds the proxy holds now.
fn pipes_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Poll `cond` until true, bounded (waits on the OS state, not on time).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + common::WAIT;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

async fn bulk_then_small(engine: &str) -> (usize, usize) {
    // Agent: after the hello, sends 8 MiB, then echoes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let hello_len = client_hello(Some("bulk.test"), &[], 1 << 14).len();
        let mut hello = vec![0u8; hello_len];
        s.read_exact(&mut hello).await.unwrap();
        s.write_all(&vec![0x42u8; 8 << 20]).await.unwrap();
        let mut b = [0u8; 64];
        while let Ok(n @ 1..) = s.read(&mut b).await {
            s.write_all(&b[..n]).await.unwrap();
        }
    });
    let proxy = Proxy::start(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--agent",
            &agent.to_string(),
            "--engine",
            engine,
        ],
    );
    let base = pipes_of(proxy.pid());
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(&client_hello(Some("bulk.test"), &[], 1 << 14))
        .await
        .unwrap();
    // Not reading yet: the bulk backs up inside the proxy.
    let mut during = 0;
    if engine == "splice" {
        until("splice mode holds a pipe during bulk", || {
            during = pipes_of(proxy.pid()) - base;
            during > 0
        })
        .await;
    } else {
        // Give the copy engine the same chance to show a pipe: wait until
        // the proxy has filled its socket buffers (the client's receive
        // queue is non-empty and stays so).
        let mut peek = [0u8; 1];
        c.peek(&mut peek).await.unwrap();
        during = pipes_of(proxy.pid()) - base;
    }
    let mut got = vec![0u8; 8 << 20];
    c.read_exact(&mut got).await.unwrap();
    for _ in 0..(splicegate::forward::splice::BACK_TO_COPY + 4) {
        c.write_all(b"small").await.unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).await.unwrap();
    }
    let mut after = usize::MAX;
    until(
        "small messages return to copy mode and close the pipes",
        || {
            after = pipes_of(proxy.pid()) - base;
            after == 0
        },
    )
    .await;
    (during, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_engine_uses_pipes_for_bulk_and_drops_them_for_small_messages() {
    let (during, after) = bulk_then_small("splice").await;
    assert!(during >= 2, "{during} pipe fds during bulk");
    assert_eq!(after, 0);
    let (during, after) = bulk_then_small("copy").await;
    assert_eq!((during, after), (0, 0));
}
