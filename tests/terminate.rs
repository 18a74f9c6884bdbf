//! Terminate mode end to end through the real binary: curl and rustls
//! clients, a WebSocket client, HTTPS agents on 127.0.0.1 and 127.0.0.2,
//! certificates made by `splicegate cert`.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::http::{http_agent, read_to_end_lossy, tls_client_after, HttpAgent};
use common::tempfile_lite::TempFile;
use common::{bin, curl_tls as curl, make_cert, Proxy, TempDir};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

struct Fleet {
    proxy: Proxy,
    dir: TempDir,
    /// Agent in the path, on 127.0.0.2.
    a: HttpAgent,
    /// Default route `/`.
    b: HttpAgent,
    /// `/desk1/`.
    c: HttpAgent,
    /// Not in the CA file: its certificate cannot be verified.
    rogue: HttpAgent,
    _ca: TempFile,
}

async fn fleet(extra_listener: &str) -> Fleet {
    let dir = TempDir::new("fleet");
    make_cert(&dir.0, &["IP:127.0.0.1", "DNS:localhost"]);
    let a = http_agent("a", "127.0.0.2:0", true).await;
    let b = http_agent("b", "127.0.0.1:0", true).await;
    let c = http_agent("c", "127.0.0.1:0", true).await;
    let rogue = http_agent("rogue", "127.0.0.1:0", true).await;
    let ca: String = [&a, &b, &c]
        .iter()
        .map(|x| x.id.as_ref().unwrap().cert_pem.clone())
        .collect();
    let ca = TempFile::new(".pem", ca.as_bytes());
    let config = format!(
        r#"
[[listener]]
name = "https"
bind = "127.0.0.1:0"
mode = "terminate"
upstream_tls = "verify"
upstream_ca = "{ca}"
forwarded_headers = true
head_max_bytes = 2048
head_timeout = "1s"
{extra_listener}
[[listener.cert]]
cert = "{dir}/cert.pem"
key = "{dir}/key.pem"

[path_agent]
allow = ["127.0.0.2/32"]
ports = [{a_port}]

[[path_route]]
prefix = "/"
agent = "127.0.0.1:{b_port}"

[[path_route]]
prefix = "/desk1/"
agent = "127.0.0.1:{c_port}"

[[path_route]]
prefix = "/rogue/"
agent = "127.0.0.1:{rogue_port}"

[[path_route]]
prefix = "/dead/"
agent = "127.0.0.1:1"

[[pool]]                        # the first agent refuses: retried on c
name = "flaky"
policy = "first"
[[pool.agents]]
addr = "127.0.0.1:1"
[[pool.agents]]
addr = "127.0.0.1:{c_port}"

[[path_route]]
prefix = "/pool/"
pool = "flaky"
"#,
        ca = ca.0.display(),
        dir = dir.0.display(),
        a_port = a.addr.port(),
        b_port = b.addr.port(),
        c_port = c.addr.port(),
        rogue_port = rogue.addr.port(),
    );
    let proxy = Proxy::start(Some(&config), &[]);
    Fleet {
        proxy,
        dir,
        a,
        b,
        c,
        rogue,
        _ca: ca,
    }
}

impl Fleet {
    fn cacert(&self) -> PathBuf {
        self.dir.0.join("cert.pem")
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.proxy.addr.port())
    }

    fn a_path(&self, rest: &str) -> String {
        format!("/127.0.0.2:{}{rest}", self.a.addr.port())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_requests_reach_the_agent_their_path_names() {
    let mut f = fleet("").await;
    let urls = vec![
        f.url(&f.a_path("/auth?x=1")),
        f.url("/desk1/static/app.js?v=2"),
        f.url("/"),
        f.url("/health"),
    ];
    let res = curl(&f.cacert(), &urls);
    assert_eq!(res[0].0, 200);
    assert!(
        res[0].1.starts_with("agent a\nGET /auth?x=1 HTTP/1.1\r\n"),
        "{}",
        res[0].1
    );
    // Host kept, hop-by-hop replaced, forwarding headers added.
    let host = format!("Host: 127.0.0.1:{}\r\n", f.proxy.addr.port());
    assert!(res[0].1.contains(&host), "{}", res[0].1);
    assert!(res[0].1.contains("Connection: close\r\n"));
    assert!(res[0].1.contains("X-Forwarded-For: 127.0.0.1\r\n"));
    assert!(res[0].1.contains("X-Forwarded-Proto: https\r\n"));
    assert!(
        res[1]
            .1
            .starts_with("agent c\nGET /static/app.js?v=2 HTTP/1.1\r\n"),
        "{}",
        res[1].1
    );
    assert!(
        res[2].1.starts_with("agent b\nGET / HTTP/1.1\r\n"),
        "{}",
        res[2].1
    );
    assert_eq!(res[3], (200, "ok\n".to_owned()));
    // Each agent saw exactly its request.
    assert!(f
        .a
        .heads
        .recv()
        .await
        .unwrap()
        .starts_with("GET /auth?x=1 "));
    assert!(f
        .c
        .heads
        .recv()
        .await
        .unwrap()
        .starts_with("GET /static/app.js?v=2 "));
    assert!(f.b.heads.recv().await.unwrap().starts_with("GET / "));
    let want = f.a_path("/auth");
    let ev = f.proxy.event("closed", |v| v["path"] == want.as_str());
    assert_eq!(ev["outcome"], "done");
    assert_eq!(ev["status"], "200");
    assert_eq!(ev["route"], "agent-in-path");
    // The query string (DCV puts auth tokens there) stays out of the log.
    assert!(!ev.to_string().contains("x=1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_http_pages_with_reasons_and_no_connection_attempt() {
    let mut f = fleet("").await;
    let cases = [
        (
            "/10.150.248.180/",
            403,
            "agent_not_allowed",
            "outside the allowed",
        ),
        (
            "/127.0.0.2:22/",
            403,
            "agent_not_allowed",
            "outside the allowed",
        ),
        ("/999.1.1.1/", 400, "bad_request", "not a valid IPv4"),
        ("/10.150.248.08/x", 400, "bad_request", "not a valid IPv4"),
        ("/dead/", 502, "agent_refused", "refused"),
        ("/rogue/", 502, "agent_tls", "certificate"),
    ];
    let urls: Vec<String> = cases.iter().map(|c| f.url(c.0)).collect();
    let res = curl(&f.cacert(), &urls);
    for ((path, status, outcome, why), (got, body)) in cases.iter().zip(&res) {
        assert_eq!(got, status, "{path}: {body}");
        if *status >= 500 {
            // The agent's failure is logged in full; the page says only
            // that the agent could not be reached, with the connection id.
            assert!(
                body.contains("the agent could not be reached") && !body.contains(why),
                "{path}: {body}"
            );
            assert!(!body.contains("127.0.0.1:"), "{path}: {body}");
        } else {
            assert!(body.contains(why), "{path}: {body}");
        }
        let ev = f.proxy.closed(outcome);
        assert_eq!(ev["status"], status.to_string(), "{path}: {ev}");
        assert!(ev["reason"].as_str().unwrap().contains(why), "{ev}");
    }
    // Neither the agent in the path nor the rogue agent (whose certificate
    // failed verification) received a request.
    assert!(f.a.heads.try_recv().is_err());
    assert!(
        f.rogue.heads.try_recv().is_err(),
        "request reached an unverified agent"
    );

    // Redirect to the slashed prefix, as nginx does.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "--cacert",
        ])
        .arg(f.cacert())
        .arg(f.url(&f.a_path("")))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, format!("301 {}", f.url(&f.a_path("/"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_default_route_means_404() {
    let dir = TempDir::new("404");
    make_cert(&dir.0, &["IP:127.0.0.1"]);
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nmode = \"terminate\"\nupstream_tls = \"off\"\n[[listener.cert]]\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n[[path_route]]\nprefix = \"/desk1/\"\nagent = \"127.0.0.1:1\"\n[admin]\nbind = \"127.0.0.1:0\"\n",
        d = dir.0.display()
    );
    let mut proxy = Proxy::start(Some(&config), &[]);
    let url = format!("https://127.0.0.1:{}/other", proxy.addr.port());
    let res = curl(&dir.0.join("cert.pem"), &[url]);
    assert_eq!(res[0].0, 404);
    assert!(
        res[0].1.contains("no route for path &quot;/other&quot;"),
        "{}",
        res[0].1
    );
    proxy.closed("no_route");
    let (code, metrics) = common::curl(&format!("http://{}/metrics", proxy.admin.unwrap()));
    assert_eq!(code, 200);
    assert!(
        metrics
            .contains("splicegate_http_responses_total{listener=\"listener1\",code=\"404\"} 1\n"),
        "{metrics}"
    );
}

/// A rustls client to the proxy. `sni` None connects by IP (no SNI).
async fn tls_client(
    proxy: SocketAddr,
    cacert: &Path,
    sni: Option<&str>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_client_after(proxy, &[], cacert, sni).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_gets_one_response_then_close_and_curl_reconnects() {
    let mut f = fleet("").await;
    // curl reuses its connection for the second URL when it can: the proxy
    // ends the first, so curl reconnects and the second request is routed
    // afresh, to its own agent with its own path.
    let res = curl(
        &f.cacert(),
        &[f.url("/desk1/one"), f.url(&f.a_path("/two"))],
    );
    assert!(res[0].1.starts_with("agent c\nGET /one "), "{}", res[0].1);
    assert!(res[1].1.starts_with("agent a\nGET /two "), "{}", res[1].1);

    // Two pipelined requests on one connection: the first is answered, the
    // connection then ends; the second reaches no agent at all — not even
    // the first's (counted in bytes: the rewritten first head only).
    let mut c = tls_client(f.proxy.addr, &f.cacert(), None).await;
    let two = format!(
        "GET /desk1/first HTTP/1.1\r\nHost: x\r\n\r\nGET {} HTTP/1.1\r\nHost: x\r\n\r\n",
        f.a_path("/second")
    );
    c.write_all(two.as_bytes()).await.unwrap();
    let text = read_to_end_lossy(&mut c).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 200").count(), 1, "{text}");
    assert!(text.contains("agent c\nGET /first "), "{text}");
    let ev = f.proxy.event("closed", |v| v["path"] == "/desk1/first");
    let head = "GET /first HTTP/1.1\r\nHost: x\r\nX-Real-IP: 127.0.0.1\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n";
    assert!(text.contains(head), "{text}");
    assert_eq!(ev["bytes_to_agent"], head.len(), "{ev}");
    while let Ok(h) = f.a.heads.try_recv() {
        assert!(!h.contains("/second"), "second request was forwarded: {h}");
    }

    // A body is forwarded to its Content-Length and no further.
    let mut c = tls_client(f.proxy.addr, &f.cacert(), None).await;
    c.write_all(b"POST /desk1/post HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_end_lossy(&mut c).await;
    assert!(text.contains("agent c\nPOST /post "), "{text}");
    let ev = f.proxy.event("closed", |v| v["path"] == "/desk1/post");
    let head_len = text.split("agent c\n").nth(1).unwrap().len();
    assert_eq!(ev["bytes_to_agent"], head_len + 5, "{ev}\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echoes_a_mebibyte_through_the_proxy() {
    let mut f = fleet("request_idle_timeout = \"1s\"").await;
    let tls = tls_client(f.proxy.addr, &f.cacert(), Some("localhost")).await;
    let url = format!("wss://localhost{}", f.a_path("/ws?session=1"));
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    let head = f.a.heads.recv().await.unwrap();
    assert!(head.starts_with("GET /ws?session=1 HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("Upgrade: websocket\r\n"), "{head}");
    let ev = f.proxy.event("routed", |v| v["websocket"] == true);
    assert_eq!(ev["path"], f.a_path("/ws"));
    let mut total = 0;
    for i in 0..16u8 {
        let msg = common::payload(64 * 1024, i);
        ws.send(Message::binary(msg.clone())).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_data().as_ref(), msg.as_slice(), "message {i}");
        total += msg.len();
    }
    assert_eq!(total, 1 << 20);
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    let want = f.a_path("/ws");
    let ev = f.proxy.event("closed", |v| v["path"] == want.as_str());
    assert_eq!(ev["status"], "101");
    assert_eq!(ev["outcome"], "done");
    assert!(ev["bytes_to_client"].as_u64().unwrap() > 1 << 20, "{ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_and_logged_and_the_proxy_keeps_serving() {
    let mut f = fleet("").await;
    let addr = f.proxy.addr;

    // Plain HTTP to the TLS port.
    let mut s = common::raw_client(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("speaks HTTPS"), "{text}");
    f.proxy.closed("not_tls");

    // Binary garbage.
    let mut s = common::raw_client(addr, b"\x00\x01\x02\x03garbage");
    let _ = s.read_to_end(&mut Vec::new());
    f.proxy.closed("not_tls");

    // TLS without SNI gets the default certificate and is served.
    let mut c = tls_client(addr, &f.cacert(), None).await;
    c.write_all(b"GET /desk1/nosni HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_end_lossy(&mut c).await;
    assert!(text.contains("agent c\nGET /nosni "), "{text}");

    // HTTP/1.0 and absolute form.
    let mut c = tls_client(addr, &f.cacert(), None).await;
    c.write_all(b"GET /desk1/old HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_end_lossy(&mut c).await;
    assert!(text.contains("agent c\nGET /old HTTP/1.0\r\n"), "{text}");
    let mut c = tls_client(addr, &f.cacert(), None).await;
    c.write_all(b"GET https://127.0.0.1/desk1/abs?q HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_end_lossy(&mut c).await;
    assert!(text.contains("agent c\nGET /abs?q HTTP/1.1\r\n"), "{text}");

    // A request line written one byte at a time.
    let mut c = tls_client(addr, &f.cacert(), None).await;
    for b in b"GET /desk1/slowly HTTP/1.1\r\nHost: x\r\n\r\n" {
        c.write_all(&[*b]).await.unwrap();
        c.flush().await.unwrap();
    }
    let text = read_to_end_lossy(&mut c).await;
    assert!(text.contains("agent c\nGET /slowly "), "{text}");

    // A head over head_max_bytes (2048).
    let mut c = tls_client(addr, &f.cacert(), None).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(3000)
    );
    let _ = c.write_all(big.as_bytes()).await;
    let text = read_to_end_lossy(&mut c).await;
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("exceeds 2048 bytes"), "{text}");
    f.proxy.closed("head_too_large");

    // Malformed request line.
    let mut c = tls_client(addr, &f.cacert(), None).await;
    c.write_all(b"GET /\r\n\r\n").await.unwrap();
    let text = read_to_end_lossy(&mut c).await;
    assert!(
        text.starts_with("HTTP/1.1 400 ") && text.contains("malformed request line"),
        "{text}"
    );
    f.proxy.closed("bad_request");

    // Slowloris: a head that never completes gets 408 after head_timeout.
    let mut c = tls_client(addr, &f.cacert(), None).await;
    c.write_all(b"GET /desk1/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let text = read_to_end_lossy(&mut c).await;
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text}"
    );
    f.proxy.closed("head_timeout");

    // An agent that resets mid-response: the client's connection ends and
    // the log names the agent side.
    let mut c = tls_client(addr, &f.cacert(), None).await;
    let req = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", f.a_path("/reset"));
    c.write_all(req.as_bytes()).await.unwrap();
    let text = read_to_end_lossy(&mut c).await;
    // The partial response may or may not beat the reset to the proxy.
    assert!(text.len() < 1000, "{text}");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 200 OK\r\n"),
        "{text}"
    );
    let want = f.a_path("/reset");
    let ev = f.proxy.event("closed", |v| v["path"] == want.as_str());
    assert_eq!(ev["outcome"], "io_error", "{ev}");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("read from agent failed"),
        "{ev}"
    );

    // An agent that closes without answering.
    let mut c = tls_client(addr, &f.cacert(), None).await;
    let req = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", f.a_path("/empty"));
    c.write_all(req.as_bytes()).await.unwrap();
    let _ = read_to_end_lossy(&mut c).await;
    f.proxy.closed("agent_empty");

    // Still serving.
    let res = curl(&f.cacert(), &[f.url("/health")]);
    assert_eq!(res[0], (200, "ok\n".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_and_keeps_the_old_ones_on_error() {
    let mut f = fleet("").await;
    let leaf = |c: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        c.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let before = CertificateDer::from_pem_file(f.cacert()).unwrap();
    // A session open across the reload.
    let tls = tls_client(f.proxy.addr, &f.cacert(), Some("localhost")).await;
    assert_eq!(leaf(&tls), before);
    let url = format!("wss://localhost{}", f.a_path("/ws"));
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();

    make_cert(&f.dir.0, &["IP:127.0.0.1", "DNS:localhost"]);
    let after = CertificateDer::from_pem_file(f.cacert()).unwrap();
    assert_ne!(before, after);
    f.proxy.signal(nix::sys::signal::Signal::SIGHUP);
    f.proxy.event("certs_reloaded", |_| true);
    let c = tls_client(f.proxy.addr, &f.cacert(), Some("localhost")).await;
    assert_eq!(leaf(&c), after);

    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_text().unwrap(),
        "still here"
    );

    std::fs::write(f.dir.0.join("key.pem"), "not a key").unwrap();
    f.proxy.signal(nix::sys::signal::Signal::SIGHUP);
    let ev = f.proxy.event("certs_reload_failed", |_| true);
    assert!(ev["error"].as_str().unwrap().contains("key.pem"), "{ev}");
    let c = tls_client(f.proxy.addr, &f.cacert(), Some("localhost")).await;
    assert_eq!(leaf(&c), after);
}

#[test]
fn run_with_tls_flags_terminates_and_needs_an_explicit_upstream_choice() {
    let dir = TempDir::new("cli");
    make_cert(&dir.0, &["IP:127.0.0.1"]);
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let out = Command::new(bin())
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--agent",
            "127.0.0.1:1",
            "--tls-cert",
        ])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--upstream-ca") && err.contains("insecure"),
        "{err}"
    );

    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let proxy = Proxy::start(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--agent",
            "/desk1/=127.0.0.1:1",
            "--tls-cert",
            &cert_s,
            "--tls-key",
            &key_s,
            "--upstream-tls",
            "insecure",
        ],
    );
    assert!(proxy.saw("upstream_insecure"));
    let res = curl(
        &cert,
        &[
            format!("https://127.0.0.1:{}/desk1/x", proxy.addr.port()),
            format!("https://127.0.0.1:{}/health", proxy.addr.port()),
        ],
    );
    assert_eq!(res[0].0, 502);
    assert_eq!(res[1], (200, "ok\n".to_owned()));
}

#[test]
fn check_warns_about_route_names_the_certificate_does_not_cover() {
    let dir = TempDir::new("check");
    make_cert(&dir.0, &["DNS:a.dcv.example"]);
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nmode = \"terminate\"\nupstream_tls = \"insecure\"\n[[listener.cert]]\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n[[route]]\nsni = \"a.dcv.example\"\nagent = \"127.0.0.1:1\"\n[[route]]\nsni = \"b.dcv.example\"\nagent = \"127.0.0.1:1\"\n[[path_route]]\nprefix = \"/\"\nagent = \"127.0.0.1:1\"\n",
        d = dir.0.display()
    );
    let file = TempFile::new(".toml", config.as_bytes());
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&file.0)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "warning: listener listener1: no certificate covers route name b.dcv.example"
        ),
        "{text}"
    );
    assert!(!text.contains("route name a.dcv.example"), "{text}");
    assert!(text.contains("mode=terminate"), "{text}");
    assert!(!text.contains("gets 404"), "{text}");

    // Without any path route every request would get 404: check says so.
    let bare = config.replace(
        "[[path_route]]\nprefix = \"/\"\nagent = \"127.0.0.1:1\"\n",
        "",
    );
    assert_ne!(bare, config);
    let file = TempFile::new(".toml", bare.as_bytes());
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&file.0)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning: listener listener1: no [[path_route]] or [path_agent]: every request but the health path gets 404"),
        "{text}"
    );

    // A terminate listener without certificates, and terminate keys on a
    // passthrough listener, name the line and key.
    for (bad, want) in [
        (
            "[[listener]]\nbind = \"127.0.0.1:0\"\nmode = \"terminate\"\nupstream_tls = \"off\"\n",
            ":3: key `mode`",
        ),
        (
            "[[listener]]\nbind = \"127.0.0.1:0\"\nupstream_tls = \"off\"\n",
            ":3: key `upstream_tls`: only applies",
        ),
        (
            "[[path_route]]\nprefix = \"desk1\"\nagent = \"127.0.0.1:1\"\n",
            ":2: key `prefix`",
        ),
    ] {
        let file = TempFile::new(".toml", bad.as_bytes());
        let out = Command::new(bin())
            .args(["check", "--config"])
            .arg(&file.0)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{bad}: {err}");
    }
}

#[test]
fn cert_command_writes_a_private_key_and_refuses_bad_sans() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("certcmd");
    make_cert(
        &dir.0,
        &[
            "DNS:vpce-0abc.vpce-svc-1.us-east-1.vpce.amazonaws.com",
            "IP:10.0.0.5",
        ],
    );
    let mode = std::fs::metadata(dir.0.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let cert = CertificateDer::from_pem_file(dir.0.join("cert.pem")).unwrap();
    assert!(splicegate::terminate::certs::covers(&cert, "10.0.0.5"));
    let out = Command::new(bin())
        .args(["cert", "--out"])
        .arg(&dir.0)
        .args(["--san", "IP:999.1.1.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an IP address"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_client_reaches_the_agent_headers_and_a_pool_retries() {
    let mut f = fleet("proxy_protocol = \"v2\"\nproxy_trusted = [\"127.0.0.0/8\"]").await;
    let header = splicegate::proxy_protocol::encode_v2(
        "192.0.2.44:50000".parse().unwrap(),
        "10.0.0.5:8443".parse().unwrap(),
        &[(0xEA, b"\x01vpce-0abc".to_vec())],
        false,
    );
    let mut c = tls_client_after(f.proxy.addr, &header, &f.cacert(), None).await;
    c.write_all(b"GET /pool/x HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1\r\nForwarded: for=198.51.100.1\r\nX-Forwarded-Host: evil.example\r\nX-Real-IP: 198.51.100.1\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_end_lossy(&mut c).await;
    assert!(text.contains("agent c\nGET /x HTTP/1.1\r\n"), "{text}");
    assert!(text.contains("X-Real-IP: 192.0.2.44\r\n"), "{text}");
    // The client's own X-Forwarded-For is replaced, not appended to.
    assert!(text.contains("X-Forwarded-For: 192.0.2.44\r\n"), "{text}");
    assert!(!text.contains("198.51.100.1"), "{text}");
    assert!(
        !text.contains("Forwarded: for") && !text.contains("evil.example"),
        "{text}"
    );
    let ev = f.proxy.event("routed", |v| v["path"] == "/pool/x");
    assert_eq!(ev["attempt"], 2, "{ev}");
    assert_eq!(ev["agent"], format!("127.0.0.1:{}", f.c.addr.port()));
    assert_eq!(ev["span"]["client"], "192.0.2.44:50000");
    assert_eq!(ev["span"]["vpce"], "vpce-0abc");
}
