//! Routing by DCV session through the Session Resolver API, end to end:
//! the real binary, a resolver written here (HTTP, and HTTPS that requires
//! a client certificate), rustls and curl clients, agents on loopback.
//! Every refusal is checked for its reason and for the agent it did not
//! contact.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::http_agent;
use common::resolver::{found, mtls, Reply, TestResolver};
use common::{admin_get, curl_tls, make_cert, metric, require_tool, Proxy, TempDir, WAIT};
use splicegate::testkit::{client_config, greet, identity, server_config, Agent, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An agent with the wildcard certificate every session agent carries.
async fn session_agent(name: &str) -> (Identity, Agent) {
    let id = identity(&["*.sessions.test"]).unwrap();
    let agent = Agent::spawn(
        name,
        server_config(&id).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    (id, agent)
}

/// A passthrough listener routing `*.sessions.test` through the resolver
/// at `url`, dialling only 127.0.0.1 on `port`.
fn config(url: &str, port: u16, extra: &str) -> String {
    format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nhello_timeout = \"3s\"\n\
         [[session_in_name]]\nsuffix = \"sessions.test\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\
         [resolver]\nurl = \"{url}\"\ntimeout = \"500ms\"\nallow = [\"127.0.0.1/32\"]\nports = [{port}]\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_the_name_reaches_its_agent_with_one_request_for_many() {
    let (id, agent) = session_agent("s").await;
    let resolver = TestResolver::start(None).await;
    let st = Arc::clone(&resolver.state);
    st.answer("s1", found("s1", "HTTP", agent.addr, "/"));
    let mut p = Proxy::start(
        Some(&config(&resolver.url("http"), agent.addr.port(), "")),
        &[],
    );
    let tls = client_config(&[&id], &["http/1.1"]).unwrap();

    let (greeting, mut s) = greet(p.addr, "S1.sessions.test", tls.clone())
        .await
        .unwrap();
    assert_eq!(greeting, "agent s");
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    let ev = p.event("routed", |_| true);
    assert_eq!(ev["route"], "session-in-name:sessions.test");
    assert_eq!(ev["agent"], agent.addr.to_string());
    // The request as the Connection Gateway sends it; the name is
    // lower-cased, as DNS names are.
    let asked = st.requests.lock().unwrap().clone();
    assert_eq!(
        asked,
        [(
            "POST /resolveSession?sessionId=s1&transport=HTTP&clientIpAddress=127.0.0.1".to_owned(),
            "application/json".to_owned()
        )]
    );

    // 100 connections at once for a session not yet cached: one request.
    st.answer("s2", found("s2", "HTTP", agent.addr, "/"));
    st.delay_ms.store(300, Ordering::Relaxed);
    let clients: Vec<_> = (0..100)
        .map(|_| tokio::spawn(greet(p.addr, "s2.sessions.test", tls.clone())))
        .collect();
    for c in clients {
        assert_eq!(c.await.unwrap().unwrap().0, "agent s");
    }
    assert_eq!(st.asked("s2").len(), 1);
    // Cached: no further request.
    st.delay_ms.store(0, Ordering::Relaxed);
    greet(p.addr, "s2.sessions.test", tls.clone())
        .await
        .unwrap();
    assert_eq!(st.asked("s2").len(), 1);
    // One resolver connection, reused (it was idle between requests).
    assert_eq!(st.connections.load(Ordering::Relaxed), 1);
    let m = admin_get(p.admin.unwrap(), "/metrics");
    assert_eq!(
        metric(&m, "splicegate_resolver_requests_total{outcome=\"ok\"}"),
        2
    );
    assert!(
        metric(&m, "splicegate_resolver_cache_total{result=\"shared\"}") >= 90,
        "{m}"
    );
    assert_eq!(
        metric(&m, "splicegate_resolver_cache_total{result=\"hit\"}"),
        1
    );
    assert_eq!(metric(&m, "splicegate_resolver_request_seconds_count"), 2);

    // SIGHUP with the same URL keeps the cache.
    p.signal(nix::sys::signal::Signal::SIGHUP);
    p.event("reloaded", |_| true);
    greet(p.addr, "s1.sessions.test", tls).await.unwrap();
    assert_eq!(st.asked("s1").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_unavailable_and_disallowed_answers_contact_no_agent() {
    let (id, agent) = session_agent("s").await;
    // An agent the resolver may name but the allowlist does not admit.
    let trap = Agent::spawn(
        "trap",
        server_config(&id).unwrap(),
        "127.0.0.2:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let resolver = TestResolver::start(None).await;
    let st = Arc::clone(&resolver.state);
    st.answer("hang", Reply::Hang);
    st.answer("broken", Reply::Status(500));
    st.answer("outside", found("outside", "HTTP", trap.addr, "/"));
    st.answer(
        "wrongport",
        found("wrongport", "HTTP", "127.0.0.1:22".parse().unwrap(), "/"),
    );
    st.answer("quic", found("quic", "QUIC", agent.addr, "/"));
    st.answer("notjson", Reply::Json("<html>".into()));
    let mut p = Proxy::start(
        Some(&config(
            &resolver.url("http"),
            agent.addr.port(),
            "negative_ttl = \"0\"\n",
        )),
        &[],
    );
    let tls = client_config(&[&id], &["http/1.1"]).unwrap();
    for (session, outcome, reason, alert) in [
        (
            "nobody",
            "session_unknown",
            "is unknown (404 from the resolver)",
            "UnrecognisedName",
        ),
        (
            "hang",
            "resolver_unavailable",
            "no answer from",
            "InternalError",
        ),
        (
            "broken",
            "resolver_unavailable",
            "answered 500",
            "InternalError",
        ),
        (
            "outside",
            "resolver_bad_answer",
            "outside the allowed networks; not dialled",
            "InternalError",
        ),
        (
            "wrongport",
            "resolver_bad_answer",
            "port 22 is not in the allowed ports",
            "InternalError",
        ),
        (
            "quic",
            "resolver_bad_answer",
            "transport \"QUIC\" for a HTTP lookup",
            "InternalError",
        ),
        (
            "notjson",
            "resolver_bad_answer",
            "not the expected JSON",
            "InternalError",
        ),
    ] {
        let started = Instant::now();
        let e = greet(p.addr, &format!("{session}.sessions.test"), tls.clone())
            .await
            .unwrap_err();
        assert!(e.to_string().contains(alert), "{session}: {e}");
        assert!(started.elapsed() < Duration::from_secs(3), "{session}");
        let ev = p.closed(outcome);
        assert!(
            ev["reason"].as_str().unwrap().contains(reason),
            "{session}: {ev}"
        );
        assert_eq!(ev["route"], "session-in-name:sessions.test");
    }
    assert_eq!(agent.accepted(), 0);
    assert_eq!(trap.accepted(), 0);
    // Failures are not cached (negative_ttl = 0 for the 404 too).
    greet(p.addr, "nobody.sessions.test", tls)
        .await
        .unwrap_err();
    p.closed("session_unknown");
    assert_eq!(st.asked("nobody").len(), 2);
    let m = admin_get(p.admin.unwrap(), "/metrics");
    assert_eq!(metric(&m, "splicegate_connections_closed_total{listener=\"listener1\",route=\"session-in-name:sessions.test\",agent=\"dynamic\",outcome=\"resolver_bad_answer\"}"), 4, "{m}");
    assert_eq!(
        metric(
            &m,
            "splicegate_resolver_requests_total{outcome=\"resolver_unavailable\"}"
        ),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_expires_and_a_resolver_restart_spares_established_sessions() {
    let (id, agent) = session_agent("s").await;
    let resolver = TestResolver::start(None).await;
    let addr = resolver.addr;
    let st = Arc::clone(&resolver.state);
    st.answer("s1", found("s1", "HTTP", agent.addr, "/"));
    st.answer("s3", found("s3", "HTTP", agent.addr, "/"));
    let mut p = Proxy::start(
        Some(&config(
            &resolver.url("http"),
            agent.addr.port(),
            "cache_ttl = \"1s\"\n",
        )),
        &[],
    );
    let tls = client_config(&[&id], &["http/1.1"]).unwrap();
    let (_, mut established) = greet(p.addr, "s1.sessions.test", tls.clone())
        .await
        .unwrap();
    let cached_at = Instant::now();
    greet(p.addr, "s1.sessions.test", tls.clone())
        .await
        .unwrap();
    assert_eq!(st.asked("s1").len(), 1);

    // The resolver goes away: the established session carries on, and a
    // new one is refused as unavailable.
    let st = resolver.stop().await;
    established.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    established.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    greet(p.addr, "s3.sessions.test", tls.clone())
        .await
        .unwrap_err();
    let ev = p.closed("resolver_unavailable");
    assert!(
        ev["reason"].as_str().unwrap().contains(&addr.to_string()),
        "{ev}"
    );

    // Back on the same port: new sessions resolve again; s1's answer has
    // expired by now (cache_ttl 1 s), so it is asked again.
    let _resolver = TestResolver::restart(addr, None, Arc::clone(&st)).await;
    let wait = Duration::from_millis(1100).saturating_sub(cached_at.elapsed());
    tokio::time::sleep(wait).await;
    assert_eq!(
        greet(p.addr, "s3.sessions.test", tls.clone())
            .await
            .unwrap()
            .0,
        "agent s"
    );
    assert_eq!(
        greet(p.addr, "s1.sessions.test", tls).await.unwrap().0,
        "agent s"
    );
    assert_eq!(st.asked("s1").len(), 2);
    established.write_all(b"and now!!!").await.unwrap();
    established.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"and now!!!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_resolver_requiring_a_client_certificate() {
    let (id, agent) = session_agent("s").await;
    let dir = TempDir::new("resolver-mtls");
    let tls_resolver = TestResolver::start(Some(mtls(&dir.0))).await;
    tls_resolver
        .state
        .answer("s1", found("s1", "HTTP", agent.addr, "/"));
    let d = dir.0.display();
    let url = tls_resolver.url("https");
    let with_cert =
        format!("ca = \"{d}/ca.pem\"\ncert = \"{d}/client.pem\"\nkey = \"{d}/client.key\"\n");
    let mut p = Proxy::start(Some(&config(&url, agent.addr.port(), &with_cert)), &[]);
    let tls = client_config(&[&id], &["http/1.1"]).unwrap();
    assert_eq!(
        greet(p.addr, "s1.sessions.test", tls.clone())
            .await
            .unwrap()
            .0,
        "agent s"
    );
    p.event("routed", |_| true);

    // Without the client certificate the resolver refuses the handshake.
    let mut q = Proxy::start(
        Some(&config(
            &url,
            agent.addr.port(),
            &format!("ca = \"{d}/ca.pem\"\n"),
        )),
        &[],
    );
    greet(q.addr, "s1.sessions.test", tls).await.unwrap_err();
    let ev = q.closed("resolver_unavailable");
    assert!(ev["reason"].as_str().unwrap().contains(&url), "{ev}");
    assert_eq!(tls_resolver.state.asked("s1").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_mode_takes_the_session_from_the_request() {
    if !require_tool("curl", "--version") {
        return;
    }
    let dir = TempDir::new("resolver-term");
    make_cert(&dir.0, &["IP:127.0.0.1"]);
    let mut agent = http_agent("s", "127.0.0.1:0", false).await;
    let trap = http_agent("trap", "127.0.0.2:0", false).await;
    let resolver = TestResolver::start(None).await;
    let st = Arc::clone(&resolver.state);
    st.answer("s1", found("s1", "HTTP", agent.addr, "/dcv-s1/"));
    st.answer("outside", found("outside", "HTTP", trap.addr, "/"));
    let d = dir.0.display();
    let listener = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nmode = \"terminate\"\nupstream_tls = \"off\"\n\
         [[listener.cert]]\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n"
    );
    let resolver_section = |source: &str| {
        format!(
            "{listener}[session_in_request]\n{source}\n\
             [resolver]\nurl = \"{}\"\nallow = [\"127.0.0.1/32\"]\nports = [{}]\n",
            resolver.url("http"),
            agent.addr.port()
        )
    };
    let ca = dir.0.join("cert.pem");

    // The path: /session/ID/rest reaches the agent as WebUrlPath + /rest.
    let mut p = Proxy::start(Some(&resolver_section("path_prefix = \"/session/\"")), &[]);
    let base = format!("https://127.0.0.1:{}", p.addr.port());
    let r = curl_tls(
        &ca,
        &[
            format!("{base}/session/s1/auth?x=1"),
            format!("{base}/session/nobody/"),
            format!("{base}/session/s1"),
            format!("{base}/session/outside/"),
        ],
    );
    assert_eq!(r[0].0, 200, "{r:?}");
    let head = agent.heads.recv().await.unwrap();
    assert!(
        head.starts_with("GET /dcv-s1/auth?x=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert_eq!(r[1].0, 404, "{r:?}");
    assert!(r[1].1.contains("is unknown"), "{r:?}");
    assert_eq!(r[2].0, 301, "{r:?}");
    assert_eq!(r[3].0, 502, "{r:?}");
    let ev = p.closed("resolver_bad_answer");
    assert!(
        ev["reason"].as_str().unwrap().contains("not dialled"),
        "{ev}"
    );
    assert_eq!(ev["status"], "502");
    drop(p);

    // The query parameter the Gateway's clients send: the target is kept.
    let _p = Proxy::start(Some(&resolver_section("query = \"sessionId\"")), &[]);
    let base = format!("https://127.0.0.1:{}", _p.addr.port());
    let r = curl_tls(&ca, &[format!("{base}/?sessionId=s1")]);
    assert_eq!(r[0].0, 200, "{r:?}");
    let head = agent.heads.recv().await.unwrap();
    assert!(
        head.starts_with("GET /dcv-s1/?sessionId=s1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert_eq!(st.asked("outside").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_can_require_the_resolver() {
    let resolver = TestResolver::start(None).await;
    let addr = resolver.addr;
    let p = Proxy::start(
        Some(&config(&resolver.url("http"), 8443, "").replace(
            "[admin]\nbind = \"127.0.0.1:0\"\n",
            "[admin]\nbind = \"127.0.0.1:0\"\nrequire_resolver = true\n",
        )),
        &[],
    );
    let admin = p.admin.unwrap();
    let until = |want: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let h = admin_get(admin, "/health");
            if h.starts_with(want) {
                return h;
            }
            assert!(Instant::now() < deadline, "health stayed {h}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    until("HTTP/1.1 200");
    let st = resolver.stop().await;
    let h = until("HTTP/1.1 503");
    assert!(h.contains("session resolver: not answering"), "{h}");
    let _back = TestResolver::restart(addr, None, st).await;
    until("HTTP/1.1 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_python_resolver_works() {
    if !require_tool("python3", "--version") {
        return;
    }
    let doc = include_str!("../docs/session-resolver.md");
    let script = doc
        .split("```python\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("docs/session-resolver.md has a python block");
    let (id, agent) = session_agent("s").await;
    let dir = TempDir::new("resolver-py");
    std::fs::write(dir.0.join("resolver.py"), script).unwrap();
    std::fs::write(
        dir.0.join("sessions.json"),
        format!(
            r#"{{"s1": {{"host": "127.0.0.1", "port": {}}}}}"#,
            agent.addr.port()
        ),
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = std::process::Command::new("python3")
        .arg(dir.0.join("resolver.py"))
        .arg(dir.0.join("sessions.json"))
        .arg(port.to_string())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the python resolver did not listen"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the python resolver exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _child = Kill(child);
    let mut p = Proxy::start(
        Some(&config(
            &format!("http://127.0.0.1:{port}"),
            agent.addr.port(),
            "",
        )),
        &[],
    );
    let tls = client_config(&[&id], &["http/1.1"]).unwrap();
    assert_eq!(
        greet(p.addr, "s1.sessions.test", tls.clone())
            .await
            .unwrap()
            .0,
        "agent s"
    );
    greet(p.addr, "s2.sessions.test", tls).await.unwrap_err();
    p.closed("session_unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_from_the_proxy_header_is_passed_on() {
    let (id, agent) = session_agent("s").await;
    let resolver = TestResolver::start(None).await;
    let st = Arc::clone(&resolver.state);
    st.answer("s1", found("s1", "HTTP", agent.addr, "/"));
    let listener = "[[listener]]\nbind = \"127.0.0.1:0\"\nhello_timeout = \"3s\"\n";
    let behind_nlb =
        format!("{listener}proxy_protocol = \"v2\"\nproxy_trusted = [\"127.0.0.1/32\"]\n");
    let cfg = config(&resolver.url("http"), agent.addr.port(), "").replace(listener, &behind_nlb);
    let _p = Proxy::start(Some(&cfg), &[]);
    let header = splicegate::proxy_protocol::encode_v2(
        "203.0.113.7:50000".parse().unwrap(),
        _p.addr,
        &[],
        false,
    );
    let mut tcp = tokio::net::TcpStream::connect(_p.addr).await.unwrap();
    tcp.write_all(&header).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("s1.sessions.test").unwrap();
    let tls = client_config(&[&id], &["http/1.1"]).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let mut greeting = [0u8; 8];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"agent s\n");
    assert_eq!(
        st.asked("s1"),
        ["POST /resolveSession?sessionId=s1&transport=HTTP&clientIpAddress=203.0.113.7"]
    );
}

/// A resolver's host-name answer is dialled only at addresses inside
/// `allow`, whatever DNS says: `localhost` is allowed by `allow_names`,
/// but its address 127.0.0.1 is outside `allow = ["127.0.0.2/32"]`, so
/// passthrough, terminate and QUIC all refuse it, and the agent there
/// hears nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_answer_outside_allow_is_refused_on_every_transport() {
    if !require_tool("curl", "--version") {
        return;
    }
    let (id, agent) = session_agent("s").await;
    let port = agent.addr.port();
    // The QUIC half of the same agent address: a UDP socket that counts.
    let udp = std::net::UdpSocket::bind(("127.0.0.1", port))
        .or_else(|_| std::net::UdpSocket::bind("127.0.0.1:0"))
        .unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let resolver = TestResolver::start(None).await;
    let st = Arc::clone(&resolver.state);
    for transport in ["HTTP", "QUIC"] {
        let p = if transport == "HTTP" { port } else { udp_port };
        st.answer(
            &format!("named{}", transport.to_lowercase()),
            Reply::Json(format!(
                r#"{{"TransportProtocol": "{transport}", "DcvServerEndpoint": "localhost", "Port": {p}}}"#
            )),
        );
    }
    let dir = TempDir::new("resolver-names");
    make_cert(&dir.0, &["IP:127.0.0.1"]);
    let d = dir.0.display();
    let cfg = format!(
        "[[listener]]\nname = \"pass\"\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"term\"\nbind = \"127.0.0.1:0\"\nmode = \"terminate\"\nupstream_tls = \"off\"\n\
         [[listener.cert]]\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n\
         [[udp_listener]]\nname = \"quic\"\nbind = \"127.0.0.1:0\"\n\
         [[session_in_name]]\nsuffix = \"sessions.test\"\n\
         [session_in_request]\nquery = \"sessionId\"\n\
         [resolver]\nurl = \"{}\"\nallow = [\"127.0.0.2/32\"]\nallow_names = [\"localhost\"]\nports = [{port}, {udp_port}]\n",
        resolver.url("http")
    );
    let mut p = Proxy::start(Some(&cfg), &[]);
    let addr_of = |p: &mut Proxy, name: &str| -> std::net::SocketAddr {
        p.find_event("listening", |v| v["listener"] == name)["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (pass, term, quic) = (
        addr_of(&mut p, "pass"),
        addr_of(&mut p, "term"),
        addr_of(&mut p, "quic"),
    );
    // Passthrough.
    let tls = client_config(&[&id], &["http/1.1"]).unwrap();
    let e = greet(pass, "namedhttp.sessions.test", tls)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("InternalError"), "{e}");
    let ev = p.event("closed", |v| {
        v["outcome"] == "resolver_bad_answer" && v["span"]["listener"] == "pass"
    });
    let why = ev["reason"].as_str().unwrap();
    assert!(
        why.contains("localhost:")
            && why.contains("127.0.0.1")
            && why.contains("outside the allowed networks"),
        "{ev}"
    );
    // Terminate: 502.
    let r = curl_tls(
        &dir.0.join("cert.pem"),
        &[format!(
            "https://127.0.0.1:{}/?sessionId=namedhttp",
            term.port()
        )],
    );
    assert_eq!(r[0].0, 502, "{r:?}");
    p.event("closed", |v| {
        v["outcome"] == "resolver_bad_answer" && v["span"]["listener"] == "term"
    });
    // QUIC.
    let ep = common::quic::client(&[&id], &[], Duration::from_secs(2));
    assert!(
        common::quic::exchange(&ep, quic, "namedquic.sessions.test", b"x")
            .await
            .is_err()
    );
    let ev = p.event("closed", |v| {
        v["outcome"] == "resolver_bad_answer" && v["span"]["proto"] == "quic"
    });
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("outside the allowed networks"),
        "{ev}"
    );
    assert_eq!(agent.accepted(), 0, "the TCP agent heard nothing");
    let mut b = [0u8; 2048];
    assert!(udp.recv(&mut b).is_err(), "the UDP agent heard nothing");
    assert_eq!(st.asked("namedquic").len(), 1);
}
