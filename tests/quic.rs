//! The QUIC relay with a real QUIC stack on both ends (quinn): agents with
//! their own certificates, clients that verify them, splicegate routing
//! each flow by the SNI inside its Initial and relaying the datagrams.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::quic::{agent, agent_at, client, client_from, exchange, QuicAgent};
use common::{metric, Proxy};
use splicegate::testkit::{quic_hello_datagrams, quic_initial, Identity};

fn config(a: &QuicAgent, b: &QuicAgent, trap_port: u16, extra: &str) -> String {
    format!(
        "[[udp_listener]]\nbind = \"127.0.0.1:0\"\nhello_timeout = \"1s\"\n{extra}\n\
         [[route]]\nsni = \"a.test\"\nagent = \"{}\"\n\
         [[route]]\nsni = \"b.test\"\nagent = \"{}\"\n\
         [[agent_in_name]]\nsuffix = \"agents.test\"\nport = {trap_port}\nallow = [\"127.0.0.1/32\"]\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        a.addr, b.addr
    )
}

fn metrics(p: &Proxy) -> String {
    common::admin_get(p.admin.unwrap(), "/metrics")
}

/// A UDP socket on 127.0.0.2 that counts what reaches it: an agent that
/// must never be dialled.
struct Trap(UdpSocket);

impl Trap {
    fn new() -> Trap {
        let s = UdpSocket::bind("127.0.0.2:0").unwrap();
        s.set_nonblocking(true).unwrap();
        Trap(s)
    }
    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }
    fn received(&self) -> usize {
        let mut n = 0;
        let mut b = [0u8; 2048];
        while self.0.recv(&mut b).is_ok() {
            n += 1;
        }
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_sni_and_relays_ten_megabytes() {
    let (a, b, trap) = (agent("a.test").await, agent("b.test").await, Trap::new());
    let mut p = Proxy::start(Some(&config(&a, &b, trap.port(), "")), &[]);
    let ep = client(&[&a.id, &b.id], &[], Duration::from_secs(10));
    let data = common::payload(10 << 20, 7);
    let (name, echo) = exchange(&ep, p.addr, "a.test", &data).await.unwrap();
    assert_eq!(name, "a.test");
    assert!(echo == data, "10 MB echoed intact");
    // One QUIC connection per client address and port, as an NLB's UDP
    // flow: a second connection comes from its own socket.
    let other = client(&[&a.id, &b.id], &[], Duration::from_secs(10));
    let (name, _) = exchange(&other, p.addr, "b.test", b"hi").await.unwrap();
    assert_eq!(name, "b.test");
    let routed = p.event("routed", |v| v["sni"] == "b.test");
    assert_eq!(routed["agent"], b.addr.to_string());
    assert_eq!(routed["span"]["proto"], "quic");
    let text = metrics(&p);
    assert!(
        metric(
            &text,
            "splicegate_quic_initial_total{listener=\"udp1\",outcome=\"ok\"}"
        ) >= 2,
        "{text}"
    );
    assert!(
        metric(&text, "splicegate_udp_bytes_to_agent_total") > 10 << 20,
        "{text}"
    );
    assert!(text.contains("splicegate_udp_flows_active{listener=\"udp1\"}"));
    assert_eq!(trap.received(), 0);
}

/// Low-latency mode on a UDP listener: the listener's thread polls its
/// sockets before sleeping. Bytes stay intact both ways, many small round
/// trips complete, and once traffic stops the process goes back to ~0 CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_latency_mode_relays_intact_and_idles_at_zero_cpu() {
    let (a, b, trap) = (agent("a.test").await, agent("b.test").await, Trap::new());
    let extra = "low_latency = \"spin\"\nspin_us = 200";
    let p = Proxy::start(Some(&config(&a, &b, trap.port(), extra)), &[]);
    let ep = client(&[&a.id, &b.id], &[], Duration::from_secs(30));
    let data = common::payload(4 << 20, 3);
    let (name, echo) = exchange(&ep, p.addr, "a.test", &data).await.unwrap();
    assert_eq!(name, "a.test");
    assert!(echo == data, "4 MB echoed intact");

    // Small round trips on one connection: each stream is one request and
    // its echo.
    let conn = ep.connect(p.addr, "a.test").unwrap().await.unwrap();
    for i in 0..300u32 {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&i.to_be_bytes()).await.unwrap();
        send.finish().unwrap();
        let got = recv.read_to_end(64).await.unwrap();
        assert_eq!(&got[got.len() - 4..], &i.to_be_bytes());
    }
    // The connection stays open, idle (no keep-alive): no spinning.
    common::assert_idle_cpu(p.pid(), "an idle QUIC flow in low-latency mode").await;
    // And it still relays.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"again").await.unwrap();
    send.finish().unwrap();
    assert!(recv.read_to_end(64).await.unwrap().ends_with(b"again"));
    conn.close(0u32.into(), b"done");
    assert_eq!(trap.received(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_spanning_two_initials_is_routed() {
    let (a, b, trap) = (agent("a.test").await, agent("b.test").await, Trap::new());
    let mut p = Proxy::start(Some(&config(&a, &b, trap.port(), "")), &[]);
    // As large as a post-quantum key share makes it: 100 ALPN names push the
    // ClientHello past what one 1200-byte Initial carries.
    let alpn: Vec<Vec<u8>> = (0..100)
        .map(|i| format!("proto-{i:09}").into_bytes())
        .collect();
    let ep = client(&[&a.id], &alpn, Duration::from_secs(10));
    let (name, echo) = exchange(&ep, p.addr, "a.test", b"large hello")
        .await
        .unwrap();
    assert_eq!(
        (name.as_str(), echo.as_slice()),
        ("a.test", &b"large hello"[..])
    );
    let routed = p.event("routed", |v| v["sni"] == "a.test");
    assert!(routed["datagrams_held"].as_u64().unwrap() >= 2, "{routed}");
    assert_eq!(trap.received(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_names_send_nothing_to_any_agent() {
    let (a, b, trap) = (agent("a.test").await, agent("b.test").await, Trap::new());
    let mut p = Proxy::start(Some(&config(&a, &b, trap.port(), "")), &[]);
    let ep = client(&[&a.id, &b.id], &[], Duration::from_secs(2));
    // No route; and an agent-in-name address outside `allow` (127.0.0.2,
    // where the trap listens).
    for name in ["nobody.test", "127-0-0-2.agents.test"] {
        let r = exchange(&ep, p.addr, name, b"x").await;
        assert!(r.is_err(), "{name} got through: {r:?}");
    }
    let no_route = p.closed("no_route");
    assert_eq!(no_route["sni"], "nobody.test");
    let denied = p.closed("agent_not_allowed");
    assert_eq!(denied["sni"], "127-0-0-2.agents.test");
    assert_eq!(trap.received(), 0, "the trap must not see a datagram");
    assert_eq!(
        a.connections.load(Ordering::SeqCst) + b.connections.load(Ordering::SeqCst),
        0
    );
    let text = metrics(&p);
    assert!(
        metric(
            &text,
            "splicegate_udp_datagrams_dropped_total{listener=\"udp1\",reason=\"refused\"}"
        ) > 0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flow_ends_and_the_same_port_starts_a_new_one() {
    let (a, b, trap) = (agent("a.test").await, agent("b.test").await, Trap::new());
    let mut p = Proxy::start(
        Some(&config(&a, &b, trap.port(), "idle_timeout = \"1s\"")),
        &[],
    );
    let ep = client(&[&a.id, &b.id], &[], Duration::from_secs(10));
    let port = ep.local_addr().unwrap().port();
    exchange(&ep, p.addr, "a.test", b"one").await.unwrap();
    let closed = p.closed("idle_timeout");
    assert!(closed["packets_to_agent"].as_u64().unwrap() > 0, "{closed}");
    assert!(closed["bytes_to_client"].as_u64().unwrap() > 0, "{closed}");
    assert_eq!(ep.local_addr().unwrap().port(), port);
    let (name, _) = exchange(&ep, p.addr, "b.test", b"two").await.unwrap();
    assert_eq!(
        name, "b.test",
        "a new flow from the same port is routed afresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_established_flows_on_their_agent() {
    let (a, b, trap) = (agent("a.test").await, agent("b.test").await, Trap::new());
    let mut p = Proxy::start(Some(&config(&a, &b, trap.port(), "")), &[]);
    let ep = client(&[&a.id, &b.id], &[], Duration::from_secs(10));
    let conn = ep.connect(p.addr, "a.test").unwrap().await.unwrap();
    let ask = |conn: quinn::Connection| async move {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"?").await.unwrap();
        send.finish().unwrap();
        String::from_utf8(recv.read_to_end(1024).await.unwrap()).unwrap()
    };
    assert_eq!(ask(conn.clone()).await, "a.test\n?");
    // a.test now names agent B: new flows go there, this one stays on A.
    let swapped = config(&a, &b, trap.port(), "").replacen(&a.addr.to_string(), "127.0.0.1:1", 1);
    let swapped = swapped.replacen("127.0.0.1:1", &b.addr.to_string(), 1);
    std::fs::write(p.config_path(), swapped).unwrap();
    p.signal(nix::sys::signal::Signal::SIGHUP);
    p.event("reloaded", |_| true);
    assert_eq!(
        ask(conn.clone()).await,
        "a.test\n?",
        "the established flow kept its agent"
    );
    let other = client(&[&a.id, &b.id], &[], Duration::from_secs(10));
    let fresh = other.connect(p.addr, "a.test").unwrap().await;
    // B's certificate does not cover a.test: the new flow reached B.
    assert!(
        fresh.is_err(),
        "a new flow for a.test must reach agent B now"
    );
    assert!(b.connections.load(Ordering::SeqCst) >= 1);
}

/// Poll `/metrics` until `key` reaches `at_least` (the relay publishes its
/// counts every 250 ms), within 10 s.
fn wait_metric(p: &Proxy, key: &str, at_least: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(p);
        if metric(&text, key) >= at_least {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{key} never reached {at_least}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss_kib(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_datagrams_are_dropped_named_and_leave_nothing_behind() {
    let (a, b, trap) = (agent("a.test").await, agent("b.test").await, Trap::new());
    let extra = "max_flows = 1000\nmax_flows_per_client = 100000\nidle_timeout = \"2s\"";
    let mut p = Proxy::start(Some(&config(&a, &b, trap.port(), extra)), &[]);
    let to = p.addr;
    let one = UdpSocket::bind("127.0.0.1:0").unwrap();
    let send = |d: &[u8]| {
        one.send_to(d, to).unwrap();
    };
    let good = quic_hello_datagrams(1, &[1; 8], Some("a.test"), &[], 0, 4000).remove(0);
    // All from one address and port: none of them leaves a refusal that
    // would drop the next.
    send(b"random bytes, not QUIC");
    let mut wrong_version = good.clone();
    wrong_version[1..5].copy_from_slice(&[0xff, 0, 0, 0x1d]);
    send(&wrong_version);
    let mut corrupted = good.clone();
    corrupted[500] ^= 0x40;
    send(&corrupted);
    send(&good[..700]);
    let mut short_header = good.clone();
    short_header[0] = 0x40;
    send(&short_header);
    for reason in [
        "not_quic",
        "unsupported_version",
        "decrypt_failed",
        "malformed",
    ] {
        let key = format!(
            "splicegate_udp_datagrams_dropped_total{{listener=\"udp1\",reason=\"{reason}\"}}"
        );
        wait_metric(&p, &key, 1);
    }
    // The same address's real client is served at once.
    let local = one.local_addr().unwrap();
    drop(one);
    let ep = client_from(local, &[&a.id], &[], Duration::from_secs(10));
    let (name, _) = exchange(&ep, to, "a.test", b"right after").await.unwrap();
    assert_eq!(name, "a.test");
    drop(ep);
    // No access line for any of them.
    let lines = p
        .all_seen()
        .iter()
        .filter(|v| v["event"] == "closed" && v["span"]["proto"] == "quic")
        .count();
    assert_eq!(lines, 0, "a dropped datagram wrote an access line");

    // The first of a two-datagram hello, never followed: pending, then
    // timed out after hello_timeout (1 s), counted.
    let two = quic_hello_datagrams(1, &[2; 8], Some("a.test"), &[], 1500, 1000);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(&two[0], to).unwrap();
    wait_metric(
        &p,
        "splicegate_quic_initial_total{listener=\"udp1\",outcome=\"timeout\"}",
        1,
    );

    // 10,000 one-datagram flows from distinct ports, half garbage and half
    // complete hellos: the cap on routed flows holds, the process stays
    // up, and once the flows end new ones work again.
    let before = rss_kib(p.pid(), "VmRSS:");
    let garbage = quic_initial(1, &[9; 8], b"", 0, &[0x01], 1200);
    // 100 every 20 ms, slow enough that the kernel's receive buffer
    // (net.core.rmem_max) does not drop them.
    for chunk in 0..100 {
        let socks: Vec<UdpSocket> = (0..100)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for (i, s) in socks.iter().enumerate() {
            let d = if (chunk + i) % 2 == 0 {
                &garbage[..]
            } else {
                &good[..]
            };
            let _ = s.send_to(d, to);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = wait_metric(
        &p,
        "splicegate_udp_datagrams_dropped_total{listener=\"udp1\",reason=\"flow_limit\"}",
        1,
    );
    assert!(
        metric(&text, "splicegate_udp_flows_active{") <= 1000,
        "{text}"
    );
    // Their clients never answer the agent: the flows end after
    // hello_timeout (1 s), not idle_timeout, and the table empties.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&metrics(&p), "splicegate_udp_flows_active{") > 0 {
        assert!(
            Instant::now() < deadline,
            "flows never idled out:\n{}",
            metrics(&p)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let closed = p.event("closed", |v| {
        v["outcome"] == "idle_timeout" && v["reason"].as_str().unwrap().contains("never answered")
    });
    assert!(closed["duration_ms"].as_u64().unwrap() < 2000, "{closed}");
    assert!(
        rss_kib(p.pid(), "VmRSS:") < before + 64 * 1024,
        "RSS grew from {before} KiB to {} KiB",
        rss_kib(p.pid(), "VmRSS:")
    );
    assert_eq!(trap.received(), 0);
    let ep = client(&[&a.id], &[], Duration::from_secs(10));
    let (name, _) = exchange(&ep, p.addr, "a.test", b"after the flood")
        .await
        .unwrap();
    assert_eq!(name, "a.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_established_flows_until_the_drain_deadline() {
    let (a, b, trap) = (agent("a.test").await, agent("b.test").await, Trap::new());
    let cfg = config(&a, &b, trap.port(), "")
        + "[shutdown]\ndrain_grace = \"0s\"\ndrain_timeout = \"2s\"\n";
    let mut p = Proxy::start(Some(&cfg), &[]);
    let ep = client(&[&a.id], &[], Duration::from_secs(30));
    let conn = ep.connect(p.addr, "a.test").unwrap().await.unwrap();
    let ask = |conn: quinn::Connection| async move {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"?").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let got = recv.read_to_end(1024).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&got).into_owned())
    };
    assert_eq!(ask(conn.clone()).await.unwrap(), "a.test\n?");
    p.signal(nix::sys::signal::Signal::SIGTERM);
    p.event("draining", |_| true);
    assert_eq!(
        ask(conn.clone()).await.unwrap(),
        "a.test\n?",
        "an established flow keeps going while draining"
    );
    let late = client(&[&a.id], &[], Duration::from_secs(1));
    assert!(
        late.connect(p.addr, "a.test").unwrap().await.is_err(),
        "no new flow while draining"
    );
    let closed = p.closed("drain_deadline");
    assert_eq!(closed["span"]["proto"], "quic");
    assert_eq!(p.wait_exit(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hash_sends_a_clients_tcp_and_udp_halves_to_one_agent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Two agents, each a TLS agent on TCP and a QUIC agent on UDP at the
    // same address, as a DCV agent serves both on 8443.
    let mut members = Vec::new();
    let mut quic = Vec::new();
    let mut tcp = Vec::new();
    for name in ["m1", "m2"] {
        // The UDP port the QUIC agent got may be taken on TCP (another
        // test's connection): try another one.
        let mut tries = 0;
        let (q, t) = loop {
            let q = agent_at(name, "fleet.test", "127.0.0.1:0".parse().unwrap()).await;
            let config = splicegate::testkit::server_config(&q.id).unwrap();
            match splicegate::testkit::Agent::spawn(name, config, q.addr).await {
                Ok(t) => break (q, t),
                Err(e) if tries < 20 => {
                    tries += 1;
                    eprintln!("TCP port {} taken ({e}); another", q.addr.port());
                }
                Err(e) => panic!("no port free on both TCP and UDP: {e}"),
            }
        };
        members.push(format!("[[pool.agents]]\naddr = \"{}\"\n", q.addr));
        quic.push(q);
        tcp.push(t);
    }
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nproxy_protocol = \"v2\"\nproxy_trusted = [\"127.0.0.0/8\"]\n\
         [[udp_listener]]\nbind = \"127.0.0.1:0\"\n\
         [[route]]\nsni = \"fleet.test\"\npool = \"fleet\"\n\
         [[pool]]\nname = \"fleet\"\npolicy = \"client_hash\"\n{}",
        members.join("")
    );
    let mut p = Proxy::start(Some(&cfg), &[]);
    let udp: SocketAddr = p.event("listening", |v| v["proto"] == "udp")["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ids: Vec<&Identity> = quic.iter().map(|q| &q.id).collect();
    let tls = splicegate::testkit::client_config(&ids, &[]).unwrap();
    let mut chosen = std::collections::HashSet::new();
    for n in 5..=20u8 {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, n);
        // TCP: the NLB's PROXY header carries the client's address.
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let header = splicegate::proxy_protocol::encode_v2(
            SocketAddr::new(ip.into(), 40000),
            p.addr,
            &[],
            false,
        );
        s.write_all(&header).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("fleet.test").unwrap();
        let mut t = tokio_rustls::TlsConnector::from(Arc::clone(&tls))
            .connect(name, s)
            .await
            .unwrap();
        let mut line = Vec::new();
        while !line.ends_with(b"\n") {
            line.push(t.read_u8().await.unwrap());
        }
        let tcp_agent = String::from_utf8(line)
            .unwrap()
            .trim()
            .trim_start_matches("agent ")
            .to_owned();
        // UDP: the datagrams' own source address.
        let ep = client_from(
            SocketAddr::new(ip.into(), 0),
            &ids,
            &[],
            Duration::from_secs(10),
        );
        let (udp_agent, _) = exchange(&ep, udp, "fleet.test", b"x").await.unwrap();
        assert_eq!(
            tcp_agent, udp_agent,
            "client {ip}: TCP and QUIC reached different agents"
        );
        chosen.insert(udp_agent);
    }
    assert_eq!(chosen.len(), 2, "16 clients should spread over both agents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_the_initial_is_resolved_with_transport_quic() {
    use common::resolver::{found, TestResolver};
    let s = agent_at("s", "*.sessions.test", "127.0.0.1:0".parse().unwrap()).await;
    let resolver = TestResolver::start(None).await;
    let st = &resolver.state;
    st.answer("q1", found("q1", "QUIC", s.addr, "/"));
    // The TCP answer for a QUIC lookup: refused, nothing sent anywhere.
    st.answer("q2", found("q2", "HTTP", s.addr, "/"));
    let cfg = format!(
        "[[udp_listener]]\nbind = \"127.0.0.1:0\"\nhello_timeout = \"1s\"\n\
         [[session_in_name]]\nsuffix = \"sessions.test\"\n\
         [resolver]\nurl = \"{}\"\nallow = [\"127.0.0.1/32\"]\nports = [{}]\n",
        resolver.url("http"),
        s.addr.port()
    );
    let mut p = Proxy::start(Some(&cfg), &[]);
    let ep = client(&[&s.id], &[], Duration::from_secs(2));
    let (name, echo) = exchange(&ep, p.addr, "q1.sessions.test", b"hello")
        .await
        .unwrap();
    assert_eq!((name.as_str(), echo.as_slice()), ("s", &b"hello"[..]));
    let routed = p.event("routed", |_| true);
    assert_eq!(routed["route"], "session-in-name:sessions.test");
    assert_eq!(
        st.asked("q1"),
        ["POST /resolveSession?sessionId=q1&transport=QUIC&clientIpAddress=127.0.0.1"]
    );
    assert_eq!(s.connections.load(Ordering::SeqCst), 1);
    // A new flow (another source port: a flow is keyed by it).
    let ep2 = client(&[&s.id], &[], Duration::from_secs(2));
    assert!(exchange(&ep2, p.addr, "q2.sessions.test", b"x")
        .await
        .is_err());
    let refused = p.closed("resolver_bad_answer");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("transport \"HTTP\" for a QUIC lookup"),
        "{refused}"
    );
    assert_eq!(s.connections.load(Ordering::SeqCst), 1);
}

/// A plain UDP socket as the "agent" of a flow, so the test decides what
/// it sends: routes for `burst.test` go to it.
fn raw_agent() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sock = socket2::SockRef::from(&s);
    sock.set_recv_buffer_size(4 << 20).unwrap();
    sock.set_send_buffer_size(4 << 20).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Receive datagrams on `s` until `n` came or 2 s passed without one;
/// returns their sizes.
fn receive_sizes(s: &UdpSocket, n: usize) -> Vec<usize> {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sizes = Vec::new();
    let mut buf = vec![0u8; 65536];
    while sizes.len() < n {
        match s.recv_from(&mut buf) {
            Ok((len, _)) => sizes.push(len),
            Err(_) => break,
        }
    }
    sizes
}

/// A burst of 20 datagrams of 8,500 bytes (a VPC endpoint's MTU) each way
/// arrives whole: the agent's leave the relay as GSO sends cut to the
/// kernel's limits (20 × 8,500 is over 64 KiB), and the client's leave in
/// batches too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_vpc_sized_datagrams_arrives_whole_both_ways() {
    let agent = raw_agent();
    let cfg = format!(
        "[[udp_listener]]\nbind = \"127.0.0.1:0\"\nudp_workers = 1\n\
         [[route]]\nsni = \"burst.test\"\nagent = \"{}\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        agent.local_addr().unwrap()
    );
    let p = Proxy::start(Some(&cfg), &[]);
    let client = raw_agent();
    let hello = quic_hello_datagrams(1, &[6; 8], Some("burst.test"), &[], 0, 4000).remove(0);
    client.send_to(&hello, p.addr).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, relay) = agent.recv_from(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        &hello[..],
        "the Initial reaches the agent as sent"
    );
    // The agent's burst: 20 × 8,500 bytes back to back.
    for i in 0..20u8 {
        agent.send_to(&[i; 8500], relay).unwrap();
    }
    let sizes = receive_sizes(&client, 20);
    assert_eq!(sizes, vec![8500; 20], "agent → client");
    // The client's burst (the flow is confirmed by now: it answered).
    for i in 0..20u8 {
        client.send_to(&[i; 8500], p.addr).unwrap();
    }
    let sizes = receive_sizes(&agent, 21);
    assert_eq!(sizes, vec![8500; 20], "client → agent");
    let text = metrics(&p);
    assert_eq!(
        metric(&text, "splicegate_udp_datagrams_to_client_total{"),
        20,
        "{text}"
    );
    assert_eq!(
        metric(&text, "splicegate_udp_datagrams_to_agent_total{"),
        21,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_listener_relays_to_an_ipv6_agent() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "no IPv6 loopback on this machine, and CI needs one"
        );
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let a = agent_at("v6", "v6.test", "[::1]:0".parse().unwrap()).await;
    let cfg = format!(
        "[[udp_listener]]\nbind = \"[::1]:0\"\n\
         [[route]]\nsni = \"v6.test\"\nagent = \"{}\"\n",
        a.addr
    );
    let mut p = Proxy::start(Some(&cfg), &[]);
    assert!(p.addr.is_ipv6(), "{}", p.addr);
    let ep = client_from(
        "[::1]:0".parse().unwrap(),
        &[&a.id],
        &[],
        Duration::from_secs(10),
    );
    let data = common::payload(1 << 20, 5);
    let (name, echo) = exchange(&ep, p.addr, "v6.test", &data).await.unwrap();
    assert_eq!(name, "v6");
    assert!(echo == data, "1 MB echoed intact over IPv6");
    let routed = p.event("routed", |v| v["sni"] == "v6.test");
    assert_eq!(routed["agent"], a.addr.to_string());
    assert!(routed["span"]["client"]
        .as_str()
        .unwrap()
        .starts_with("[::1]:"));
}

/// QUIC flows take their pool agent's slot, as TCP connections do: with
/// `least_conn` a second flow goes to the other agent while the first is
/// open, and the per-agent gauge counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_counts_quic_flows() {
    let (m1, m2) = (
        agent_at("m1", "fleet.test", "127.0.0.1:0".parse().unwrap()).await,
        agent_at("m2", "fleet.test", "127.0.0.1:0".parse().unwrap()).await,
    );
    let cfg = format!(
        "[[udp_listener]]\nbind = \"127.0.0.1:0\"\n\
         [[route]]\nsni = \"fleet.test\"\npool = \"fleet\"\n\
         [[pool]]\nname = \"fleet\"\npolicy = \"least_conn\"\n\
         [[pool.agents]]\naddr = \"{}\"\n[[pool.agents]]\naddr = \"{}\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        m1.addr, m2.addr
    );
    let p = Proxy::start(Some(&cfg), &[]);
    let ask = |conn: quinn::Connection| async move {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"?").await.unwrap();
        send.finish().unwrap();
        let got = recv.read_to_end(1024).await.unwrap();
        String::from_utf8_lossy(&got).into_owned()
    };
    let (c1, c2) = (
        client(&[&m1.id, &m2.id], &[], Duration::from_secs(30)),
        client(&[&m1.id, &m2.id], &[], Duration::from_secs(30)),
    );
    let first = c1.connect(p.addr, "fleet.test").unwrap().await.unwrap();
    let one = ask(first.clone()).await;
    let second = c2.connect(p.addr, "fleet.test").unwrap().await.unwrap();
    let two = ask(second.clone()).await;
    let names = [one.lines().next().unwrap(), two.lines().next().unwrap()];
    assert!(
        names == ["m1", "m2"] || names == ["m2", "m1"],
        "both flows went to one agent: {names:?}"
    );
    let text = metrics(&p);
    for a in [m1.addr, m2.addr] {
        let key = format!("splicegate_agent_active_connections{{pool=\"fleet\",agent=\"{a}\"}}");
        assert_eq!(metric(&text, &key), 1, "{key}\n{text}");
    }
    first.close(0u32.into(), b"done");
    second.close(0u32.into(), b"done");
}

/// A client whose address changes (NAT rebinding, a migration) is a new
/// 4-tuple: its short-header datagrams start no flow and are dropped
/// (`not_quic`), as the NLB itself would send them to another target; the
/// connection fails over to a new one, which works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_changes_address_is_not_followed() {
    let (a, b, trap) = (agent("a.test").await, agent("b.test").await, Trap::new());
    let p = Proxy::start(Some(&config(&a, &b, trap.port(), "")), &[]);
    let ep = client(&[&a.id], &[], Duration::from_secs(3));
    let conn = ep.connect(p.addr, "a.test").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"before").await.unwrap();
    let mut line = [0u8; 13];
    recv.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"a.test\nbefore");
    let before = metric(
        &metrics(&p),
        "splicegate_udp_datagrams_dropped_total{listener=\"udp1\",reason=\"not_quic\"}",
    );
    ep.rebind(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    send.write_all(b"after the rebinding").await.unwrap();
    let mut more = [0u8; 6];
    let r = tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut more)).await;
    assert!(
        !matches!(r, Ok(Ok(()))),
        "the rebound path was relayed: {r:?}"
    );
    wait_metric(
        &p,
        "splicegate_udp_datagrams_dropped_total{listener=\"udp1\",reason=\"not_quic\"}",
        before + 1,
    );
    let fresh = client(&[&a.id], &[], Duration::from_secs(10));
    let (name, _) = exchange(&fresh, p.addr, "a.test", b"new connection")
        .await
        .unwrap();
    assert_eq!(name, "a.test");
}
