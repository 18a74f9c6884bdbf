//! Peers nobody here wrote: `openssl s_client` as the client through the
//! proxy, and `openssl s_server` as the agents.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use common::{alpha_agent, tempfile_lite::TempFile, Proxy, WAIT};
use splicegate::testkit::{client_config, identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn have_openssl() -> bool {
    common::require_tool("openssl", "version")
}

/// A child whose stdout lines arrive on a channel.
struct Lines {
    child: Child,
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn spawn(cmd: &mut Command) -> Lines {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            child,
            rx,
            seen: Vec::new(),
        }
    }

    fn wait_for(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("expected line not seen; got:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_through_the_proxy_verifies_the_agent() {
    if !have_openssl() {
        return;
    }
    let (id, agent) = alpha_agent().await;
    let mut proxy = Proxy::start(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--agent",
            &format!("alpha.test={}", agent.addr),
        ],
    );
    let ca = TempFile::new(".pem", id.cert_pem.as_bytes());
    let mut client = Lines::spawn(
        Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &proxy.addr.to_string(),
                "-servername",
                "alpha.test",
            ])
            .args([
                "-verify_hostname",
                "alpha.test",
                "-verify_return_error",
                "-CAfile",
            ])
            .arg(&ca.0)
            .stdin(Stdio::piped()),
    );
    client.wait_for(|l| l.contains("Verify return code: 0 (ok)"));
    client.wait_for(|l| l == "agent alpha");
    let mut stdin = client.child.stdin.take().unwrap();
    stdin.write_all(b"typed by a person\n").unwrap();
    client.wait_for(|l| l == "typed by a person");
    let ev = proxy.event("routed", |_| true);
    assert_eq!(ev["sni"], "alpha.test");
    assert_eq!(ev["route"], "exact:alpha.test");
}

/// `openssl s_server -rev` answers every line reversed. Returns the child
/// and the address it printed once listening.
fn s_server(cert: &TempFile, key: &TempFile) -> (Lines, SocketAddr) {
    let mut srv = Lines::spawn(
        Command::new("openssl")
            .args(["s_server", "-rev", "-accept", "127.0.0.1:0", "-cert"])
            .arg(&cert.0)
            .arg("-key")
            .arg(&key.0)
            .stdin(Stdio::null()),
    );
    let line = srv.wait_for(|l| l.starts_with("ACCEPT "));
    let addr = line
        .trim_start_matches("ACCEPT ")
        .trim()
        .parse()
        .expect("s_server address");
    (srv, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_server_agents_are_chosen_by_sni() {
    if !have_openssl() {
        return;
    }
    let one = identity(&["one.test"]).unwrap();
    let two = identity(&["two.test"]).unwrap();
    let files: Vec<TempFile> = [&one, &two]
        .iter()
        .flat_map(|id| {
            [
                TempFile::new(".pem", id.cert_pem.as_bytes()),
                TempFile::new(".key", id.key_pem.as_bytes()),
            ]
        })
        .collect();
    let (_srv1, a1) = s_server(&files[0], &files[1]);
    let (_srv2, a2) = s_server(&files[2], &files[3]);
    let mut proxy = Proxy::start(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--agent",
            &format!("one.test={a1}"),
            "--agent",
            &format!("two.test={a2}"),
        ],
    );
    for (sni, id, agent) in [("one.test", &one, a1), ("two.test", &two, a2)] {
        // The rustls client trusts only this agent's certificate.
        let tls = client_config(&[id], &[]).unwrap();
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut s = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .unwrap();
        s.write_all(b"splicegate\n").await.unwrap();
        let mut back = [0u8; 11];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"etagecilps\n");
        let ev = proxy.event("routed", |_| true);
        assert_eq!(ev["agent"], agent.to_string());
    }
}

/// A DCV agent's self-signed certificate as `openssl req -x509` makes it:
/// with default extensions it is marked `CA:TRUE`, which chain
/// verification refuses for an end entity. Listed in `upstream_ca`, it is
/// pinned and trusted; an agent presenting another certificate is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_mode_trusts_a_pinned_self_signed_ca_certificate() {
    if !have_openssl() {
        return;
    }
    let dir = common::TempDir::new("pinned");
    let make = |name: &str| {
        let (cert, key) = (
            dir.0.join(format!("{name}.pem")),
            dir.0.join(format!("{name}.key")),
        );
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "2", "-subj", &format!("/CN={name}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&cert)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout).into_owned();
        assert!(
            text.contains("CA:TRUE"),
            "not a CA:TRUE certificate:\n{text}"
        );
        (TempFile(cert), TempFile(key))
    };
    let (agent_cert, agent_key) = make("dcv-agent");
    let (other_cert, other_key) = make("other-agent");
    let www = |cert: &TempFile, key: &TempFile| {
        let mut srv = Lines::spawn(
            Command::new("openssl")
                .args(["s_server", "-www", "-accept", "127.0.0.1:0", "-cert"])
                .arg(&cert.0)
                .arg("-key")
                .arg(&key.0)
                .stdin(Stdio::null()),
        );
        let line = srv.wait_for(|l| l.starts_with("ACCEPT "));
        let addr: SocketAddr = line.trim_start_matches("ACCEPT ").trim().parse().unwrap();
        (srv, addr)
    };
    let (_good, good) = www(&agent_cert, &agent_key);
    let (_bad, bad) = www(&other_cert, &other_key);
    common::make_cert(&dir.0, &["IP:127.0.0.1"]);
    let config = format!(
        r#"
[[listener]]
bind = "127.0.0.1:0"
mode = "terminate"
upstream_tls = "verify"
upstream_ca = "{ca}"
[[listener.cert]]
cert = "{dir}/cert.pem"
key = "{dir}/key.pem"

[[path_route]]
prefix = "/"
agent = "{good}"
[[path_route]]
prefix = "/other/"
agent = "{bad}"
"#,
        ca = agent_cert.0.display(),
        dir = dir.0.display(),
    );
    let mut proxy = Proxy::start(Some(&config), &[]);
    let base = format!("https://127.0.0.1:{}", proxy.addr.port());
    let res = common::curl_tls(
        &dir.0.join("cert.pem"),
        &[format!("{base}/"), format!("{base}/other/")],
    );
    assert_eq!(res[0].0, 200, "{}", res[0].1);
    assert!(res[0].1.contains("s_server"), "{}", res[0].1);
    assert_eq!(res[1].0, 502, "{}", res[1].1);
    let ev = proxy.closed("agent_tls");
    assert!(
        ev["reason"].as_str().unwrap().contains("certificate"),
        "{ev}"
    );
}

/// Refusals after a complete ClientHello carry a TLS alert, so
/// `openssl s_client` prints why instead of a bare connection error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clients_get_a_tls_alert_that_names_the_reason() {
    if !have_openssl() {
        return;
    }
    let config = r#"
[[listener]]
bind = "127.0.0.1:0"

[[route]]
sni = "dead.test"
agent = "127.0.0.1:1"

[[agent_in_name]]
suffix = "agents.test"
allow = ["10.150.248.0/24"]
"#;
    let mut proxy = Proxy::start(Some(config), &[]);
    for (sni, alert, outcome) in [
        ("unknown.test", "alert number 112", "no_route"),
        (
            "10-1-2-3.agents.test",
            "alert number 49",
            "agent_not_allowed",
        ),
        ("dead.test", "alert number 80", "agent_refused"),
    ] {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &proxy.addr.to_string(),
                "-servername",
                sni,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(alert),
            "{sni}: expected {alert:?} in:\n{text}"
        );
        proxy.closed(outcome);
    }
}
