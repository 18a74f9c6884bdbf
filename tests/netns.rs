//! The URLs DCV users' nginx served, literally: agents at 10.150.248.180 and .181 live in a
//! network namespace this test creates; splicegate (terminate mode) and
//! curl live in a second one, joined by a veth pair. Agents are
//! `openssl s_server -WWW` with a certificate for their IP addresses,
//! which splicegate verifies; an address with no host behind it gives the
//! connect timeout (504). Both namespaces are removed at the end.
//!
//! Needs root and `ip`; skips, saying why, without them (tests/run-all.sh
//! runs as root and installs iproute2).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::tempfile_lite::TempFile;
use common::{bin, curl_tls_in, make_cert, Proxy, TempDir};

/// Namespaces and processes to remove, however the test ends.
struct Lab {
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn skip_reason() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").map_or(true, |m| m.uid() != 0) {
        return Some("needs root to create network namespaces".into());
    }
    for tool in ["ip", "openssl", "curl"] {
        let found = Command::new(tool)
            .arg(if tool == "openssl" { "version" } else { "-V" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// `openssl s_server -WWW` in `ns` on `addr`, serving `dir`; returns once
/// it has printed ACCEPT (it is listening).
fn s_server(
    ns: &str,
    addr: &str,
    dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Child {
    let mut child = Command::new("ip")
        .args([
            "netns", "exec", ns, "openssl", "s_server", "-WWW", "-accept", addr,
        ])
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start openssl s_server");
    let out = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(out).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("ACCEPT") => break,
            Some(Ok(_)) => {}
            _ => panic!("openssl s_server on {addr} exited before listening"),
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    child
}

#[test]
fn nginx_style_urls_reach_agents_at_10_150_248_x_and_nothing_else() {
    let why = skip_reason();
    if !common::require(why.is_none(), why.as_deref().unwrap_or_default()) {
        return;
    }
    let id = std::process::id();
    let (ns_proxy, ns_agents) = (format!("sgp{id}"), format!("sga{id}"));
    let (veth_p, veth_a) = (format!("sgp{id}"), format!("sga{id}"));
    let mut lab = Lab {
        namespaces: Vec::new(),
        children: Vec::new(),
    };
    for ns in [&ns_proxy, &ns_agents] {
        ip(&["netns", "add", ns]);
        lab.namespaces.push(ns.clone());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    ip(&[
        "link", "add", &veth_p, "type", "veth", "peer", "name", &veth_a,
    ]);
    ip(&["link", "set", &veth_p, "netns", &ns_proxy]);
    ip(&["link", "set", &veth_a, "netns", &ns_agents]);
    ip(&[
        "-n",
        &ns_proxy,
        "addr",
        "add",
        "10.150.248.1/24",
        "dev",
        &veth_p,
    ]);
    for a in [
        "10.150.248.180/24",
        "10.150.248.181/24",
        "10.150.248.190/24",
    ] {
        ip(&["-n", &ns_agents, "addr", "add", a, "dev", &veth_a]);
    }
    ip(&["-n", &ns_proxy, "link", "set", &veth_p, "up"]);
    ip(&["-n", &ns_agents, "link", "set", &veth_a, "up"]);

    let dir = TempDir::new("netns");
    let agent_certs = dir.0.join("agents");
    make_cert(
        &agent_certs,
        &[
            "IP:10.150.248.180",
            "IP:10.150.248.181",
            "IP:10.150.248.190",
        ],
    );
    let proxy_certs = dir.0.join("proxy");
    make_cert(&proxy_certs, &["IP:127.0.0.1"]);
    let (cert, key) = (agent_certs.join("cert.pem"), agent_certs.join("key.pem"));
    for last in ["180", "181", "190"] {
        let docroot = dir.0.join(last);
        std::fs::create_dir_all(&docroot).unwrap();
        std::fs::write(
            docroot.join("whoami.txt"),
            format!("agent 10.150.248.{last}\n"),
        )
        .unwrap();
        let addr = format!("10.150.248.{last}:8443");
        lab.children
            .push(s_server(&ns_agents, &addr, &docroot, &cert, &key));
    }

    let config = format!(
        r#"
[[listener]]
bind = "127.0.0.1:8443"
mode = "terminate"
connect_timeout = "1s"
upstream_ca = "{ca}"
[[listener.cert]]
cert = "{p}/cert.pem"
key = "{p}/key.pem"

[path_agent]                    # .176 - .183: .180 and .181, not .190
allow = ["10.150.248.176/29"]

[[path_route]]
prefix = "/"
agent = "10.150.248.180:8443"

[[path_route]]                  # no host there: ARP goes unanswered
prefix = "/gone/"
agent = "10.150.248.99:8443"
"#,
        ca = cert.display(),
        p = proxy_certs.display()
    );
    let file = TempFile::new(".toml", config.as_bytes());
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ns_proxy,
        bin(),
        "--log-format",
        "json",
        "run",
        "--config",
    ])
    .arg(&file.0);
    let mut proxy = Proxy::start_command(&mut cmd);

    let base = "https://127.0.0.1:8443";
    let urls: Vec<String> = [
        "/10.150.248.180/whoami.txt",
        "/10.150.248.181/whoami.txt",
        "/whoami.txt",
        "/10.150.248.190/whoami.txt",
        "/health",
        "/gone/",
    ]
    .iter()
    .map(|p| format!("{base}{p}"))
    .collect();
    let res = curl_tls_in(
        &["ip", "netns", "exec", &ns_proxy],
        &proxy_certs.join("cert.pem"),
        &urls,
    );
    assert_eq!(res[0], (200, "agent 10.150.248.180\n".to_owned()));
    assert_eq!(res[1], (200, "agent 10.150.248.181\n".to_owned()));
    assert_eq!(res[2], (200, "agent 10.150.248.180\n".to_owned()));
    assert_eq!(res[3].0, 403, "{}", res[3].1);
    assert!(
        res[3].1.contains("outside the allowed networks"),
        "{}",
        res[3].1
    );
    assert_eq!(res[4], (200, "ok\n".to_owned()));
    assert_eq!(res[5].0, 504, "{}", res[5].1);
    // The page says only that the agent did not answer; the log has the
    // address and the timeout.
    assert!(res[5].1.contains("did not answer in time"), "{}", res[5].1);
    assert!(!res[5].1.contains("10.150.248."), "{}", res[5].1);
    // Agents were verified by IP against their certificate.
    let ev = proxy.event("routed", |v| v["agent"] == "10.150.248.181:8443");
    assert_eq!(ev["route"], "agent-in-path");
    let ev = proxy.closed("agent_not_allowed");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("10.150.248.190:8443"),
        "{ev}"
    );
    let ev = proxy.closed("agent_timeout");
    assert_eq!(ev["status"], "504", "{ev}");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s"),
        "{ev}"
    );
}

/// Each routed QUIC flow holds an ephemeral port toward its agent: in a
/// namespace whose `net.ipv4.ip_local_port_range` holds four ports, the
/// fifth and sixth flows are refused with their own outcome
/// (`no_local_port`) and a reason that names the shortage, and the
/// proxy goes on serving.
#[test]
fn quic_flows_beyond_the_ephemeral_ports_are_refused_no_local_port() {
    let why = skip_reason();
    if !common::require(why.is_none(), why.as_deref().unwrap_or_default()) {
        return;
    }
    let ns = format!("sgq{}", std::process::id());
    let _lab = Lab {
        namespaces: vec![ns.clone()],
        children: Vec::new(),
    };
    ip(&["netns", "add", &ns]);
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "sysctl", "-w"])
        .arg("net.ipv4.ip_local_port_range=40000 40003")
        .output()
        .expect("sysctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = "[[udp_listener]]\nbind = \"127.0.0.1:8443\"\nudp_workers = 1\n\
                  [[route]]\nsni = \"p.test\"\nagent = \"127.0.0.1:9\"\n";
    let file = TempFile::new(".toml", config.as_bytes());
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns, bin(), "--log-format", "json", "run"])
        .arg("--config")
        .arg(&file.0);
    let mut proxy = Proxy::start_command(&mut cmd);
    // Six clients on fixed ports outside the range, one Initial each.
    let hellos: Vec<TempFile> = (0..6u8)
        .map(|i| {
            let d = splicegate::testkit::quic_hello_datagrams(
                1,
                &[i + 1; 8],
                Some("p.test"),
                &[],
                0,
                4000,
            )
            .remove(0);
            TempFile::new(".bin", &d)
        })
        .collect();
    let files: Vec<String> = hellos
        .iter()
        .map(|f| format!("{:?}", f.0.display().to_string()))
        .collect();
    let script = format!(
        "import socket\nfor i, f in enumerate([{}]):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.bind(('127.0.0.1', 50000 + i))\n    s.sendto(open(f, 'rb').read(), ('127.0.0.1', 8443))\n    s.close()\n",
        files.join(", ")
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "python3", "-c", &script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = proxy.closed("no_local_port");
    let why = refused["reason"].as_str().unwrap();
    assert!(
        why.contains("no local socket toward agent 127.0.0.1:9"),
        "{refused}"
    );
    proxy.event("closed", |v| v["outcome"] == "no_local_port");
    let routed_now = |p: &mut Proxy| {
        p.all_seen()
            .iter()
            .filter(|v| v["event"] == "routed")
            .count()
    };
    while routed_now(&mut proxy) < 4 {
        proxy.event("routed", |_| true);
    }
    let seen = proxy.all_seen();
    let routed = seen.iter().filter(|v| v["event"] == "routed").count();
    let no_port = seen
        .iter()
        .filter(|v| v["event"] == "closed" && v["outcome"] == "no_local_port")
        .count();
    assert_eq!((routed, no_port), (4, 2), "four ports, four flows");
}
