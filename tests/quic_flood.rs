//! The QUIC relay under the floods anyone who can send UDP can aim at it
//! (spoofed sources cost an attacker nothing: nothing is answered): junk
//! from tens of thousands of addresses, hellos that never complete, and
//! Initials naming random sessions. Each test sends a real QUIC client
//! (quinn) or real TLS clients through the same proxy during or right
//! after the flood and asserts they are served, the memory bound holds,
//! and the log does not fill. Every loop is bounded in count and time;
//! all traffic stays on loopback (127.0.0.0/8 is all local on Linux, so
//! each test has its own source addresses).

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::quic::{agent, client, client_from, exchange};
use common::resolver::{found, TestResolver};
use common::{metric, Proxy};
use splicegate::testkit::{
    client_config, greet, identity, quic_hello_datagrams, server_config, Agent,
};

fn metrics(p: &Proxy) -> String {
    common::admin_get(p.admin.unwrap(), "/metrics")
}

fn status_kib(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Bind a UDP socket at `ip`:0; None when the machine is out of ports.
fn bind_at(ip: Ipv4Addr) -> Option<UdpSocket> {
    UdpSocket::bind(SocketAddrV4::new(ip, 0)).ok()
}

/// 50,000 datagrams that cannot start a flow, from 50,000 distinct
/// addresses in about a second: nothing is kept, nothing is logged per
/// datagram, and a real client — from one of those very addresses — is
/// served at once, although `hello_timeout` is 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_fifty_thousand_sources_leaves_nothing_behind() {
    let a = agent("a.test").await;
    let cfg = format!(
        "[[udp_listener]]\nbind = \"127.0.0.1:0\"\nhello_timeout = \"60s\"\n\
         [[route]]\nsni = \"a.test\"\nagent = \"{}\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        a.addr
    );
    let mut p = Proxy::start(Some(&cfg), &[]);
    let to = p.addr;
    let rss_before = status_kib(p.pid(), "VmRSS:");
    let good = quic_hello_datagrams(1, &[7; 8], Some("a.test"), &[], 0, 4000).remove(0);
    let mut kinds: Vec<Vec<u8>> = vec![b"GET / HTTP/1.1\r\n\r\n".to_vec(), vec![0x40; 64]];
    let mut undecryptable = good.clone();
    undecryptable[600] ^= 1;
    kinds.push(undecryptable);
    let mut wrong_version = good.clone();
    wrong_version[1..5].copy_from_slice(&[0x0a, 0x0a, 0x0a, 0x0a]);
    kinds.push(wrong_version);
    // Sent from a thread: 200 addresses × 250 ports on 127.0.10.x.
    let started = Instant::now();
    let (sent, reused) = tokio::task::spawn_blocking(move || {
        let mut sent = 0usize;
        let mut reused = None;
        for host in 0..200u8 {
            let ip = Ipv4Addr::new(127, 0, 10, host);
            let socks: Vec<UdpSocket> = (0..250).filter_map(|_| bind_at(ip)).collect();
            for (i, s) in socks.iter().enumerate() {
                if s.send_to(&kinds[(i + host as usize) % kinds.len()], to)
                    .is_ok()
                {
                    sent += 1;
                }
            }
            if host == 100 {
                reused = socks.first().map(|s| s.local_addr().unwrap());
            }
            // About a second in all.
            std::thread::sleep(Duration::from_millis(4));
        }
        (sent, reused.unwrap())
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(sent >= 49_000, "only {sent} sent");
    // The relay has read them all once its counters stop moving.
    let key = "splicegate_udp_datagrams_dropped_total{";
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let now = metric(&metrics(&p), key);
        if now == last && now > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the counters never settled");
        last = now;
    }
    let text = metrics(&p);
    let dropped = metric(&text, key);
    assert_eq!(metric(&text, "splicegate_udp_pending_flows{"), 0, "{text}");
    assert_eq!(metric(&text, "splicegate_udp_flows_total{"), 0, "{text}");
    // A real client from an address that just sent junk, served at once.
    let served = Instant::now();
    let ep = client_from(reused, &[&a.id], &[], Duration::from_secs(10));
    let (name, _) = exchange(&ep, to, "a.test", b"right after the junk")
        .await
        .unwrap();
    assert_eq!(name, "a.test");
    let serve_ms = served.elapsed().as_millis();
    assert!(serve_ms < 2000, "served after {serve_ms} ms");
    let rss_after = status_kib(p.pid(), "VmRSS:");
    let lines = p.all_seen().len();
    let summaries = p
        .all_seen()
        .iter()
        .filter(|v| v["event"] == "udp_dropped")
        .count();
    let closed = p
        .all_seen()
        .iter()
        .filter(|v| v["event"] == "closed" && v["outcome"] != "done")
        .count();
    eprintln!(
        "garbage flood: {sent} datagrams from distinct sources in {took:?}, {dropped} counted by the relay \
         (the rest dropped by the kernel's buffer); RSS {rss_before} → {rss_after} KiB; \
         {lines} log lines in all, {summaries} udp_dropped summaries, {closed} refusal lines; \
         a real client from one of the junk addresses served in {serve_ms} ms"
    );
    assert_eq!(closed, 0, "a junk datagram wrote an access line");
    // One summary per listener socket at most in these few seconds.
    assert!((1..=2).contains(&summaries), "{summaries} summaries");
    assert!(lines < 50, "{lines} log lines");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS {rss_before} → {rss_after} KiB"
    );
}

/// 65,536 source addresses (256 IPs × 256 ports), each sending the first
/// Initial of a two-datagram hello 16 times, with `hello_timeout = "60s"`:
/// pending flows stay within their byte budget (the process's peak RSS
/// under `pending_bytes_max` + 64 MiB), the oldest are evicted, and a real
/// QUIC client sent during the flood gets through the same listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_hellos_from_65536_sources_cannot_lock_a_real_client_out() {
    let a = agent("a.test").await;
    let budget: u64 = 64 << 20;
    let cfg = format!(
        "[[udp_listener]]\nbind = \"127.0.0.1:0\"\nhello_timeout = \"60s\"\npending_bytes_max = {budget}\n\
         [[route]]\nsni = \"a.test\"\nagent = \"{}\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        a.addr
    );
    let mut p = Proxy::start(Some(&cfg), &[]);
    let to = p.addr;
    let pid = p.pid();
    let first = quic_hello_datagrams(1, &[8; 8], Some("a.test"), &[], 1500, 1100).remove(0);
    let size = first.len();
    let started = Instant::now();
    let flood = tokio::task::spawn_blocking(move || {
        let mut sent = 0usize;
        for host in 0..=255u8 {
            let ip = Ipv4Addr::new(127, 0, 20, host);
            let socks: Vec<UdpSocket> = (0..256).filter_map(|_| bind_at(ip)).collect();
            for s in &socks {
                for _ in 0..16 {
                    if s.send_to(&first, to).is_ok() {
                        sent += 1;
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(90) {
                break;
            }
        }
        sent
    });
    // The real client, once the flood is under way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&metrics(&p), "splicegate_udp_pending_flows{") == 0 {
        assert!(Instant::now() < deadline, "the flood never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ep = client(&[&a.id], &[], Duration::from_secs(30));
    let asked = Instant::now();
    let (name, echo) = exchange(&ep, to, "a.test", b"during the flood")
        .await
        .expect("a real client gets through during the flood");
    let serve_ms = asked.elapsed().as_millis();
    assert_eq!(
        (name.as_str(), echo.as_slice()),
        ("a.test", &b"during the flood"[..])
    );
    let flood_running = !flood.is_finished();
    let sent = flood.await.unwrap();
    let took = started.elapsed();
    let text = metrics(&p);
    let peak = status_kib(pid, "VmHWM:");
    let evicted = metric(
        &text,
        "splicegate_udp_flows_total{listener=\"udp1\",outcome=\"pending_limit\"}",
    );
    let held = metric(&text, "splicegate_udp_pending_bytes{");
    let lines = p.all_seen().len();
    eprintln!(
        "incomplete-hello flood: {sent} datagrams of {size} bytes from 65,536 sources in {took:?}; \
         peak RSS {peak} KiB (budget {} KiB + 64 MiB); {evicted} pending flows evicted; \
         {held} bytes pending at the end; a real client served in {serve_ms} ms \
         (flood still running then: {flood_running}); {lines} log lines",
        budget / 1024
    );
    assert!(sent > 500_000, "only {sent} sent");
    assert!(evicted > 0, "nothing evicted:\n{text}");
    assert!(held <= budget, "{held} bytes pending over the budget");
    assert!(
        peak < (budget >> 10) + 64 * 1024,
        "peak RSS {peak} KiB over the budget + 64 MiB"
    );
    assert!(lines < 400, "{lines} log lines");
}

/// 1,000 spoofed Initials a second for 10 s, each naming a random session,
/// against a resolver that takes 0.5 s to answer: the resolver never
/// works on more than `max_in_flight` requests, and 20 TLS clients whose
/// session lookups happen meanwhile all reach their agent within the
/// resolver's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_quic_lookups_cannot_starve_tcp_session_lookups() {
    let id = identity(&["*.sessions.test"]).unwrap();
    let agent = Agent::spawn(
        "s",
        server_config(&id).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let resolver = TestResolver::start(None).await;
    let st = Arc::clone(&resolver.state);
    for i in 0..20 {
        let s = format!("tcp{i}");
        st.answer(&s, found(&s, "HTTP", agent.addr, "/"));
    }
    st.delay_ms.store(500, Ordering::Relaxed);
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nhello_timeout = \"5s\"\n\
         [[udp_listener]]\nname = \"quic\"\nbind = \"127.0.0.1:0\"\n\
         [[session_in_name]]\nsuffix = \"sessions.test\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\
         [resolver]\nurl = \"{}\"\ntimeout = \"2s\"\nmax_in_flight = 64\nallow = [\"127.0.0.1/32\"]\nports = [{}]\n",
        resolver.url("http"),
        agent.addr.port()
    );
    let mut p = Proxy::start(Some(&cfg), &[]);
    let tcp = p.addr;
    let quic: SocketAddr = p.find_event("listening", |v| v["listener"] == "quic")["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Initials made ahead of time: 10,000 random session names.
    let hellos: Vec<Vec<u8>> = (0..10_000u32)
        .map(|i| {
            let name = format!("r{:08x}.sessions.test", i.wrapping_mul(2_654_435_761));
            quic_hello_datagrams(1, &i.to_be_bytes().repeat(2), Some(&name), &[], 0, 4000).remove(0)
        })
        .collect();
    let started = Instant::now();
    let flood = tokio::task::spawn_blocking(move || {
        let mut sent = 0;
        for (i, d) in hellos.iter().enumerate() {
            // 1,000 a second: 10 every 10 ms.
            if i % 10 == 0 {
                let due = started + Duration::from_millis(i as u64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            let ip = Ipv4Addr::new(127, 0, 30, (i % 250) as u8);
            if let Some(s) = bind_at(ip) {
                if s.send_to(d, quic).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    });
    // 20 TLS clients during the flood, one every 400 ms from its second
    // second on, each with its own session.
    let tls = client_config(&[&id], &["http/1.1"]).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let tls = tls.clone();
        clients.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = greet(tcp, &format!("tcp{i}.sessions.test"), tls).await;
            (i, r.map(|_| ()).map_err(|e| e.to_string()), t.elapsed())
        }));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let mut slowest = Duration::ZERO;
    for c in clients {
        let (i, r, took) = c.await.unwrap();
        assert!(r.is_ok(), "TCP client {i}: {r:?} after {took:?}");
        assert!(
            took < Duration::from_secs(2),
            "TCP client {i} took {took:?}"
        );
        slowest = slowest.max(took);
    }
    let sent = flood.await.unwrap();
    let most = st.most_working.load(Ordering::SeqCst);
    let asked_quic = st
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(l, _)| l.contains("transport=QUIC"))
        .count();
    let text = metrics(&p);
    let busy = metric(
        &text,
        "splicegate_resolver_cache_total{result=\"quic_busy\"}",
    );
    let lines = p.all_seen().len();
    eprintln!(
        "spoofed lookups: {sent} Initials in {:?}; the resolver worked on at most {most} requests at once \
         (max_in_flight 64), {asked_quic} QUIC lookups asked, {busy} refused without asking; \
         20 TCP lookups all served, the slowest in {slowest:?}; {lines} log lines",
        started.elapsed()
    );
    assert!(sent >= 9_000, "only {sent} sent");
    assert!(most <= 64, "the resolver worked on {most} requests at once");
    assert!(busy > 0, "{text}");
    assert_eq!(agent.accepted(), 20);
    assert!(lines < 1000, "{lines} log lines");
}
