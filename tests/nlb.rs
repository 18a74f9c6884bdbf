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

use common::{alpha_agent, curl, raw_client, tempfile_lite::TempFile, Proxy, WAIT};
use nix::sys::signal::Signal;
use splicegate::testkit::{client_config, client_hello, greet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(agent: SocketAddr, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"dcv\"\nbind = \"127.0.0.1:0\"\nproxy_protocol = \"v2\"\nproxy_trusted = [\"127.0.0.1/32\"]\n\
         [[route]]\nsni = \"alpha.test\"\nagent = \"{agent}\"\n[admin]\nbind = \"127.0.0.1:0\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sequence_for_deregistration() {
    if !common::require_tool("curl", "--version") {
        return;
    }
    let (id, agent) = alpha_agent().await;
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
    if !common::require_tool("curl", "--version") {
        return;
    }
    let (id, agent) = alpha_agent().await;
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
    let (_, agent) = alpha_agent().await;
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
    if !common::require_tool("systemd-analyze", "--version") {
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
    assert!(
        unit.contains("RuntimeDirectory=splicegate"),
        "the control socket's directory"
    );
    // Verify copies whose ExecStart points at the binary just built: the
    // proxy's unit and the scale-in watcher's.
    let dir = std::env::temp_dir().join(format!("splicegate-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let watcher = std::fs::read_to_string("systemd/splicegate-lifecycle.service").unwrap();
    for key in [
        "EnvironmentFile=/etc/splicegate/lifecycle.env",
        "lifecycle-watch",
        "User=splicegate",
    ] {
        assert!(watcher.contains(key), "the watcher's unit lacks {key}");
    }
    for (name, text) in [
        ("splicegate.service", &unit),
        ("splicegate-lifecycle.service", &watcher),
    ] {
        let path = dir.join(name);
        std::fs::write(
            &path,
            text.replace("/usr/local/bin/splicegate", common::bin()),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        assert!(!stderr.contains(name), "warnings about {name}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v2_in_front() {
    if !common::require_tool("haproxy", "-v") {
        return;
    }
    let (id, agent) = alpha_agent().await;
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

/// HAProxy's `show stat` status of server `s` in backend `be` (`UP`,
/// `DOWN`, `UP 1/2`, ...), read from its stats socket.
fn haproxy_status(sock: &std::path::Path) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return String::new();
    };
    let _ = s.write_all(b"show stat\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find(|l| l.starts_with("be,s,"))
        .and_then(|l| l.split(',').nth(17))
        .unwrap_or_default()
        .to_owned()
}

/// The deployment the docs describe: an HTTP health check on the admin
/// port with PROXY v2 on every check connection, as an NLB sends it when
/// the target group has `proxy_protocol_v2.enabled`. HAProxy is the real
/// health checker: UP while serving, DOWN once a drain starts.
#[test]
fn haproxy_http_health_check_with_proxy_v2_on_the_admin_port() {
    if !common::require_tool("haproxy", "-v") {
        return;
    }
    let text = "[[listener]]\nname = \"dcv\"\nbind = \"127.0.0.1:0\"\nproxy_protocol = \"v2\"\nproxy_trusted = [\"127.0.0.1/32\"]\n\
                [admin]\nbind = \"127.0.0.1:0\"\n[shutdown]\ndrain_grace = \"1m\"\n";
    let mut proxy = Proxy::start(Some(text), &[]);
    let admin = proxy.admin.unwrap();
    let dir = common::TempDir::new("haproxy-check");
    let sock = dir.0.join("stats.sock");
    let cfg = TempFile::new(
        ".cfg",
        format!(
            "global\n  maxconn 100\n  stats socket {} mode 600 level admin\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
             backend be\n  option httpchk GET /health\n  \
             server s {admin} check send-proxy-v2 check-send-proxy inter 100ms fastinter 100ms downinter 100ms rise 1 fall 1\n",
            sock.display()
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
    let wait_for = |want: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = haproxy_status(&sock);
            if status.starts_with(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "HAProxy never saw the admin listener {want}; last status {status:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("UP");
    proxy.signal(Signal::SIGTERM);
    proxy.event("drain_grace", |_| true);
    wait_for("DOWN");
    let _ = haproxy.kill();
    let _ = haproxy.wait();
}

/// The admin listener takes an optional PROXY header, split anywhere,
/// from `[admin] proxy_trusted` peers; refuses one from anyone else; and
/// answers plain requests either way.
#[test]
fn admin_proxy_header_is_optional_from_trusted_peers_only() {
    use std::io::{Read, Write};
    let ask = |admin: SocketAddr, pieces: &[&[u8]]| -> String {
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        s.set_nodelay(true).unwrap();
        for p in pieces {
            s.write_all(p).unwrap();
            s.flush().unwrap();
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let local = {
        let mut h = splicegate::proxy_protocol::V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        h
    };
    let relayed = splicegate::proxy_protocol::encode_v2(
        "203.0.113.9:4000".parse().unwrap(),
        "10.0.1.5:8989".parse().unwrap(),
        &[],
        false,
    );
    let get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";

    let trusted = "[[listener]]\nbind = \"127.0.0.1:0\"\nproxy_protocol = \"v2\"\nproxy_trusted = [\"127.0.0.0/8\"]\n[admin]\nbind = \"127.0.0.1:0\"\n";
    let proxy = Proxy::start(Some(trusted), &[]);
    let admin = proxy.admin.unwrap();
    for pieces in [
        vec![&get[..]],
        vec![&local[..], &get[..]],
        vec![&[local.as_slice(), get].concat()[..]],
        vec![
            &relayed[..1],
            &relayed[1..13],
            &relayed[13..],
            &get[..3],
            &get[3..],
        ],
        vec![b"PROXY TCP4 203.0.113.9 10.0.1.5 4000 8989\r\n", &get[..]],
    ] {
        let reply = ask(admin, &pieces);
        assert!(
            reply.starts_with("HTTP/1.1 200 OK\r\n"),
            "{pieces:?}: {reply}"
        );
        assert!(reply.ends_with("\r\n\r\nok\n"), "{reply}");
    }
    // A LOCAL header and a close (a TCP health check): no answer, no error.
    assert_eq!(ask(admin, &[&local]), "");

    let untrusted = "[admin]\nbind = \"127.0.0.1:0\"\nproxy_trusted = [\"10.0.0.0/8\"]\n[[listener]]\nbind = \"127.0.0.1:0\"\n";
    let mut proxy = Proxy::start(Some(untrusted), &[]);
    let admin = proxy.admin.unwrap();
    assert!(ask(admin, &[get]).starts_with("HTTP/1.1 200 OK\r\n"));
    let reply = ask(admin, &[&relayed, get]);
    assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
    assert!(reply.contains("untrusted"), "{reply}");
    let ev = proxy.event("admin_refused", |_| true);
    assert_eq!(ev["outcome"], "proxy_untrusted", "{ev}");
}

/// On a listener with `allowed_vpce`, the NLB's TCP health check (a LOCAL
/// header, then a close) is a health probe like anywhere else: not an
/// endpoint refusal in the log or in `/metrics`. A LOCAL header followed by
/// a ClientHello is still refused, with a TLS alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_health_probe_on_a_vpce_restricted_listener() {
    if !common::require_tool("curl", "--version") {
        return;
    }
    let (_, agent) = alpha_agent().await;
    let cfg = config(agent.addr, "").replace(
        "proxy_trusted = [\"127.0.0.1/32\"]",
        "proxy_trusted = [\"127.0.0.1/32\"]\nallowed_vpce = [\"vpce-0allowed\"]",
    );
    let mut proxy = Proxy::start_with_env(Some(&cfg), &[], &[("SPLICEGATE_LOG", "debug")]);
    let mut local = splicegate::proxy_protocol::V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    drop(raw_client(proxy.addr, &local));
    let ev = proxy.closed("health_probe");
    assert_eq!(ev["level"], "DEBUG", "{ev}");
    assert!(!proxy.saw_closed("vpce_not_allowed"));

    let mut c = raw_client(
        proxy.addr,
        &[
            local.clone(),
            client_hello(Some("alpha.test"), &[], 1 << 14),
        ]
        .concat(),
    );
    proxy.closed("vpce_not_allowed");
    let mut alert = Vec::new();
    use std::io::Read;
    let _ = c.read_to_end(&mut alert);
    assert_eq!(alert, [21, 3, 3, 0, 2, 2, 49], "access_denied alert");

    let (_, body) = curl(&format!("http://{}/metrics", proxy.admin.unwrap()));
    let m = parse_metrics(&body);
    let closed = |outcome: &str| {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("splicegate_connections_closed_total")
                    && k.contains(&format!("outcome=\"{outcome}\""))
            })
            .map(|(_, v)| *v)
            .sum::<f64>()
    };
    assert_eq!(closed("health_probe"), 1.0, "{body}");
    assert_eq!(closed("vpce_not_allowed"), 1.0, "{body}");
}

/// Agents named by the client (agent-in-name) are one `dynamic` series per
/// route in `/metrics`, however many addresses `allow` holds; the access
/// log keeps each address.
#[test]
fn metrics_label_client_named_agents_by_route() {
    if !common::require_tool("curl", "--version") {
        return;
    }
    let text = "[[listener]]\nname = \"dcv\"\nbind = \"127.0.0.1:0\"\n\
                [[agent_in_name]]\nsuffix = \"agents.test\"\nport = 1\nallow = [\"127.0.0.0/8\"]\n\
                [admin]\nbind = \"127.0.0.1:0\"\n";
    let mut proxy = Proxy::start(Some(text), &[]);
    for n in 2..6 {
        let sni = format!("127-0-0-{n}.agents.test");
        let _c = raw_client(proxy.addr, &client_hello(Some(&sni), &[], 1 << 14));
        let ev = proxy.closed("agent_refused");
        assert_eq!(ev["agent"], format!("127.0.0.{n}:1"), "{ev}");
    }
    let (_, body) = curl(&format!("http://{}/metrics", proxy.admin.unwrap()));
    let m = parse_metrics(&body);
    let series: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("splicegate_connections_closed_total"))
        .collect();
    assert_eq!(series.len(), 1, "{body}");
    assert_eq!(
        series[0],
        (
            &"splicegate_connections_closed_total{listener=\"dcv\",route=\"agent-in-name:agents.test\",agent=\"dynamic\",outcome=\"agent_refused\"}".to_owned(),
            &4.0
        )
    );
}

/// The admin listener serves at most `[admin] max_connections` untrusted
/// connections at once: beyond it a connection is closed at once,
/// unanswered (so slow clients never make a health check wait), and a
/// slot frees when a client that says nothing reaches `request_timeout`.
#[test]
fn admin_connections_are_capped() {
    use std::io::{Read, Write};
    let text = "[[listener]]\nbind = \"127.0.0.1:0\"\n[admin]\nbind = \"127.0.0.1:0\"\nmax_connections = 2\nrequest_timeout = \"300ms\"\n";
    let proxy = Proxy::start(Some(text), &[]);
    let admin = proxy.admin.unwrap();
    // Two connections that say nothing hold both slots.
    let idle: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(admin).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let mut third = std::net::TcpStream::connect(admin).unwrap();
    let _ = third.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    third.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = Vec::new();
    let t = std::time::Instant::now();
    let _ = third.read_to_end(&mut buf);
    assert!(
        buf.is_empty(),
        "answered past the cap: {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(t.elapsed() < Duration::from_millis(250), "closed at once");
    // The idle ones are closed at their request_timeout, freeing the slots.
    for mut s in idle {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    let reply = common::admin_get(admin, "/health");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    let m = common::admin_get(admin, "/metrics");
    assert!(
        m.contains("splicegate_admin_refused_total{reason=\"busy\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("splicegate_admin_refused_total{reason=\"timeout\"} 2"),
        "{m}"
    );
}

/// A test whose tool is missing skips on a developer's machine but fails
/// under CI=true: run one such test (it needs systemd-analyze) from this
/// very test binary with an empty PATH, both ways.
#[test]
fn a_missing_tool_skips_locally_and_fails_under_ci() {
    if std::env::var_os("SPLICEGATE_TEST_INNER").is_some() {
        return;
    }
    let me = std::env::current_exe().unwrap();
    let run = |ci: &str| {
        Command::new(&me)
            .args(["--exact", "systemd_unit_verifies", "--nocapture"])
            .env("PATH", "/nonexistent")
            .env("CI", ci)
            .env("SPLICEGATE_TEST_INNER", "1")
            .output()
            .unwrap()
    };
    let local = run("");
    let text = String::from_utf8_lossy(&local.stderr).into_owned()
        + &String::from_utf8_lossy(&local.stdout);
    assert!(local.status.success(), "{text}");
    assert!(
        text.contains("SKIP: systemd-analyze is not installed"),
        "{text}"
    );
    let ci = run("true");
    let text =
        String::from_utf8_lossy(&ci.stderr).into_owned() + &String::from_utf8_lossy(&ci.stdout);
    assert!(!ci.status.success(), "{text}");
    assert!(
        text.contains("CI=true and a test requirement is missing"),
        "{text}"
    );
}
