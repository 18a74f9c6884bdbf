//! The admin listener stays answerable under abuse: a health check that
//! times out marks the target unhealthy, and an NLB then closes every
//! connection of that target. With a thousand slow connections held open
//! and hundreds of slow clients reconnecting as soon as they are dropped,
//! the health checker's probes (with and without a PROXY v2 header, from
//! an address in `[admin] proxy_trusted`) are answered within a second;
//! bare-LF requests are answered too.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connection from `from` (any port) to `to`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

/// One request (`prefix` first, then the head) and the whole answer.
async fn probe(
    from: IpAddr,
    admin: SocketAddr,
    prefix: &[u8],
    head: &[u8],
) -> std::io::Result<String> {
    let mut s = connect_from(from, admin).await?;
    s.write_all(&[prefix, head].concat()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_are_answered_within_a_second_while_slow_clients_flood() {
    let cfg = "[[listener]]\nbind = \"127.0.0.1:0\"\n\
               [admin]\nbind = \"127.0.0.1:0\"\nproxy_trusted = [\"127.0.0.50/32\"]\n";
    let proxy = Proxy::start(Some(cfg), &[]);
    let admin = proxy.admin.unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    // A thousand connections that never say anything, from one address.
    let mut held = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = connect_from("127.0.0.1".parse().unwrap(), admin).await {
            held.push(s);
        }
    }
    assert!(
        held.len() >= 900,
        "only {} slow connections opened",
        held.len()
    );
    // Three hundred slow clients on thirty addresses, each reconnecting as
    // soon as it is dropped, sending half a request.
    let reconnects = Arc::new(AtomicUsize::new(0));
    let mut slow = Vec::new();
    for i in 0..300u32 {
        let (stop, n) = (Arc::clone(&stop), Arc::clone(&reconnects));
        let from: IpAddr = format!("127.0.0.{}", 2 + i % 30).parse().unwrap();
        slow.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(mut s) = connect_from(from, admin).await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let _ = s.write_all(b"GET /he").await;
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
                n.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The NLB's health checks: twenty, half behind a PROXY v2 LOCAL header.
    let local = {
        let mut h = splicegate::proxy_protocol::V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        h
    };
    let checker: IpAddr = "127.0.0.50".parse().unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let prefix: &[u8] = if i % 2 == 0 { &local } else { &[] };
        let t = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            probe(
                checker,
                admin,
                prefix,
                b"GET /health HTTP/1.1\r\nHost: 10.0.1.5:8989\r\n\r\n",
            ),
        )
        .await;
        let took = t.elapsed();
        let answer = answer
            .unwrap_or_else(|_| panic!("probe {i}: no answer within 5 s"))
            .unwrap_or_else(|e| panic!("probe {i}: {e}"));
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "probe {i}: {answer:?}"
        );
        assert!(took < Duration::from_secs(1), "probe {i} took {took:?}");
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in slow {
        let _ = t.await;
    }
    eprintln!(
        "20 health checks under 1000 held and 300 reconnecting slow clients ({} reconnects): slowest {slowest:?}",
        reconnects.load(Ordering::Relaxed)
    );
    assert!(
        reconnects.load(Ordering::Relaxed) > 300,
        "the slow clients were not dropped and did not reconnect"
    );
    let m = common::admin_get(admin, "/metrics");
    assert!(
        common::metric(&m, "splicegate_admin_refused_total") > 900,
        "{m}"
    );
    drop(held);
}

/// A request whose lines end in a bare LF is answered, not left to time
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_requests_are_answered() {
    let cfg = "[[listener]]\nbind = \"127.0.0.1:0\"\n[admin]\nbind = \"127.0.0.1:0\"\n";
    let proxy = Proxy::start(Some(cfg), &[]);
    let admin = proxy.admin.unwrap();
    let t = Instant::now();
    let answer = probe(
        "127.0.0.1".parse().unwrap(),
        admin,
        b"",
        b"GET /health HTTP/1.0\n\n",
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert!(t.elapsed() < Duration::from_millis(500));
    let answer = probe(
        "127.0.0.1".parse().unwrap(),
        admin,
        b"",
        b"GET /nope HTTP/1.1\nHost: x\r\n\n",
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer:?}");
}
