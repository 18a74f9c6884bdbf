//! splicegate as an NLB target: the drain sequence seen through `/health`,
//! `/metrics` scraped with curl and parsed, systemd notifications on a
//! socket the test owns, `systemd-analyze verify` on the unit, and HAProxy
//! as a real PROXY v2 sender in front.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{curl, raw_client, tempfile_lite::TempFile, Proxy, WAIT};
use nix::sys::signal::Signal;
use splicegate::testkit::{
    client_config, client_hello, greet, identity, server_config, Agent, Identity,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn have(tool: &str, arg: &str) -> bool {
    let ok = Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("SKIP: {tool} is not installed (tests/run-all.sh installs it)");
    }
    ok
}

async fn alpha() -> (Identity, Agent) {
    let id = identity(&["alpha.test"]).unwrap();
    let agent = Agent::spawn(
        "alpha",
        server_config(&id).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    (id, agent)
}

fn config(agent: SocketAddr, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"dcv\"\nbind = \"127.0.0.1:0\"\nproxy_protocol = \"v2\"\nproxy_trusted = [\"127.0.0.1/32\"]\n\
         [[route]]\nsni = \"alpha.test\"\nagent = \"{agent}\"\n[admin]\nbind = \"127.0.0.1:0\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sequence_for_deregistration() {
    if !have("curl", "--version") {
        return;
    }
    let (id, agent) = alpha().await;
    let cfg = config(
        agent.addr,
        "[shutdown]\ndrain_grace = \"3s\"\ndrain_timeout = \"5m\"",
    )
    .replace("proxy_protocol = \"v2\"", "proxy_protocol = \"off\"");
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let health = format!("http://{}/health", proxy.admin.unwrap());
    assert_eq!(curl(&health), (200, "ok\n".into()));
    let tls = client_config(&[&id], &[]).unwrap();
    let (_, mut session) = greet(proxy.addr, "alpha.test", tls.clone()).await.unwrap();
    let started = Instant::now();

    proxy.signal(Signal::SIGTERM);
    proxy.event("drain_grace", |_| true);
    // Health fails at once, so the NLB stops sending new flows...
    assert_eq!(curl(&health), (503, "draining\n".into()));
    // ...but during the grace the listener still accepts.
    let (greeting, mut late) = greet(proxy.addr, "alpha.test", tls.clone()).await.unwrap();
    assert_eq!(greeting, "agent alpha");
    late.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = late.read_to_end(&mut rest).await;

    // After the grace: no new connections, established ones keep flowing.
    let ev = proxy.event("draining", |_| true);
    assert_eq!(ev["active"], 1, "{ev}");
    let err = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    session.write_all(b"still flowing").await.unwrap();
    let mut buf = [0u8; 13];
    session.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still flowing");
    // The last connection closing ends the process, long before the deadline.
    session.shutdown().await.unwrap();
    let _ = session.read_to_end(&mut rest).await;
    assert_eq!(proxy.wait_exit(), 0);
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// Parse the text exposition into `name{labels}` → value, checking that
/// every sample belongs to a declared metric and every value is a number.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut types = BTreeMap::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&ty), "{line}");
            types.insert(name.to_owned(), ty.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| types.get(*b).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(base), "sample without # TYPE: {line}");
        assert!(name.starts_with("splicegate_"), "{line}");
        if types[base] == "counter" {
            assert!(name.ends_with("_total"), "counter not named _total: {line}");
        }
        out.insert(
            series.to_owned(),
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value: {line}")),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_and_parsed() {
    if !have("curl", "--version") {
        return;
    }
    let (id, agent) = alpha().await;
    let mut proxy = Proxy::start(Some(&config(agent.addr, "")), &[]);
    let header = |src: &str| {
        splicegate::proxy_protocol::encode_v2(
            src.parse().unwrap(),
            "10.0.1.5:8443".parse().unwrap(),
            &[],
            false,
        )
    };
    // One good TLS session through a v2 header, one non-TLS client, one
    // unknown name, one bad header.
    let tls = client_config(&[&id], &[]).unwrap();
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut tcp = tcp;
    tcp.write_all(&header("203.0.113.9:4000")).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("alpha.test").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let mut greeting = [0u8; 12];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"agent alpha\n");
    proxy.event("routed", |_| true);

    let _a = raw_client(
        proxy.addr,
        &[
            header("203.0.113.9:4001"),
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ]
        .concat(),
    );
    proxy.closed("not_tls");
    let _b = raw_client(
        proxy.addr,
        &[
            header("203.0.113.9:4002"),
            client_hello(Some("nope.test"), &[], 1 << 14),
        ]
        .concat(),
    );
    proxy.closed("no_route");
    let _c = raw_client(proxy.addr, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n");
    proxy.closed("proxy_invalid");

    let (code, body) = curl(&format!("http://{}/metrics", proxy.admin.unwrap()));
    assert_eq!(code, 200);
    let m = parse_metrics(&body);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{body}"));
    assert_eq!(
        get("splicegate_connections_accepted_total{listener=\"dcv\"}"),
        4.0
    );
    assert_eq!(get("splicegate_connections_active{listener=\"dcv\"}"), 1.0);
    assert_eq!(
        get("splicegate_client_hello_total{listener=\"dcv\",outcome=\"ok\"}"),
        2.0
    );
    assert_eq!(
        get("splicegate_client_hello_total{listener=\"dcv\",outcome=\"not_tls\"}"),
        1.0
    );
    assert_eq!(
        get("splicegate_proxy_header_total{listener=\"dcv\",outcome=\"ok_v2\"}"),
        3.0
    );
    assert_eq!(
        get("splicegate_proxy_header_total{listener=\"dcv\",outcome=\"missing\"}"),
        1.0
    );
    assert_eq!(get("splicegate_connections_closed_total{listener=\"dcv\",route=\"-\",agent=\"-\",outcome=\"no_route\"}"), 1.0);
    let live = format!(
        "{{listener=\"dcv\",route=\"exact:alpha.test\",agent=\"{}\"}}",
        agent.addr
    );
    assert!(
        get(&format!("splicegate_bytes_to_client_total{live}")) > 12.0,
        "live bytes are counted"
    );
    assert!(get(&format!("splicegate_bytes_to_agent_total{live}")) > 100.0);
    assert_eq!(get("splicegate_agent_connect_seconds_count"), 1.0);
    assert_eq!(
        get("splicegate_agent_connect_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert_eq!(get("splicegate_client_hello_wait_seconds_count"), 2.0);
    assert_eq!(get("splicegate_draining"), 0.0);
    assert_eq!(
        get(&format!(
            "splicegate_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert_eq!(
        curl(&format!("http://{}/nope", proxy.admin.unwrap())).0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_on_a_socket_the_test_owns() {
    let (_, agent) = alpha().await;
    let sock_path =
        std::env::temp_dir().join(format!("splicegate-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let path = sock_path.to_str().unwrap().to_owned();
    let mut proxy = Proxy::start_with_env(
        Some(&config(agent.addr, "[shutdown]\ndrain_grace = \"0s\"")),
        &[],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "200000")],
    );
    let next = || {
        let mut buf = [0u8; 256];
        let n = sock
            .recv(&mut buf)
            .expect("a notification before the timeout");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    // Watchdog pings every WATCHDOG_USEC / 2.
    assert_eq!(next(), "WATCHDOG=1");
    proxy.signal(Signal::SIGTERM);
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no STOPPING=1");
        if next() == "STOPPING=1" {
            break;
        }
    }
    assert_eq!(proxy.wait_exit(), 0);
    let _ = std::fs::remove_file(&sock_path);
}

#[test]
fn systemd_unit_verifies() {
    if !have("systemd-analyze", "--version") {
        return;
    }
    let unit = std::fs::read_to_string("systemd/splicegate.service").unwrap();
    for key in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=splicegate",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "LimitNOFILE=1048576",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(key), "unit lacks {key}");
    }
    // Verify a copy whose ExecStart points at the binary just built.
    let dir = std::env::temp_dir().join(format!("splicegate-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("splicegate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/splicegate", common::bin()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("splicegate.service"),
        "warnings about the unit: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v2_in_front() {
    if !have("haproxy", "-v") {
        return;
    }
    let (id, agent) = alpha().await;
    let mut proxy = Proxy::start(Some(&config(agent.addr, "")), &[]);
    // A port that was free a moment ago, for HAProxy's frontend.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = TempFile::new(
        ".cfg",
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind {front}\n  default_backend be\n\
             backend be\n  server splicegate {} send-proxy-v2\n",
            proxy.addr
        )
        .as_bytes(),
    );
    let mut haproxy = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait on the port: bounded attempts.
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(front).is_err() {
        assert!(
            Instant::now() < deadline,
            "haproxy did not listen on {front}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // That probe connection reaches splicegate too; skip its close event.
    let tls = client_config(&[&id], &[]).unwrap();
    let tcp = tokio::net::TcpStream::connect(front).await.unwrap();
    let me = tcp.local_addr().unwrap();
    let name = rustls::pki_types::ServerName::try_from("alpha.test").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let mut greeting = [0u8; 12];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"agent alpha\n");
    let ev = proxy.event("routed", |_| true);
    // splicegate logs the client HAProxy saw, not HAProxy's own address.
    assert_eq!(ev["span"]["client"], me.to_string());
    assert_ne!(ev["span"]["peer"], me.to_string());
    let _ = haproxy.kill();
    let _ = haproxy.wait();
}

#[test]
fn health_turns_503_when_a_required_pool_has_no_healthy_agent() {
    // One agent that refuses: the first failed connection marks it down
    // (max_fails = 1) and health follows, on the admin listener and on a
    // client's ClientHello alike.
    let text = "[[listener]]\nbind = \"127.0.0.1:0\"\n\
                [admin]\nbind = \"127.0.0.1:0\"\nrequire_pools = [\"desks\"]\n\
                [[pool]]\nname = \"desks\"\nmax_fails = 1\nfail_timeout = \"1h\"\n\
                [[pool.agents]]\naddr = \"127.0.0.1:1\"\n\
                [routing]\ndefault_pool = \"desks\"\n";
    let mut proxy = Proxy::start(Some(text), &[]);
    let health = format!("http://{}/health", proxy.admin.unwrap());
    assert_eq!(curl(&health), (200, "ok\n".to_owned()));
    let _ = raw_client(proxy.addr, &client_hello(Some("any.test"), &[], 1 << 14));
    proxy.closed("pool_failed");
    assert_eq!(
        curl(&health),
        (503, "pool desks: no healthy agent\n".to_owned())
    );

    // A name that is not a pool is refused with its line.
    let bad = "[admin]\nbind = \"127.0.0.1:0\"\nrequire_pools = [\"nope\"]\n";
    let e = splicegate::config::Config::parse(bad, "x.toml")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("x.toml:3: key `require_pools`"), "{e}");
}
