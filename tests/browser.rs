//! Headless Chromium through a terminate listener: the browser loads a
//! page from an agent behind the proxy, the page opens a WebSocket through
//! the same path prefix, sends a message and reports the echo back to the
//! agent. Skips, saying why, where Chromium is not installed
//! (tests/run-all.sh installs Debian's `chromium`).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::http::http_agent;
use common::tempfile_lite::TempFile;
use common::{make_cert, Proxy, TempDir};

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Kills the browser when the test ends, however it ends.
struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_page_and_echoes_over_a_websocket_through_the_proxy() {
    let browser = chromium();
    if !common::require(browser.is_some(), "no chromium on PATH") {
        return;
    }
    let browser = browser.unwrap_or_default();
    let dir = TempDir::new("browser");
    make_cert(&dir.0, &["IP:127.0.0.1"]);
    let mut agent = http_agent("desk", "127.0.0.2:0", true).await;
    let ca = TempFile::new(".pem", agent.id.as_ref().unwrap().cert_pem.as_bytes());
    let config = format!(
        r#"
[[listener]]
bind = "127.0.0.1:0"
mode = "terminate"
upstream_ca = "{ca}"
[[listener.cert]]
cert = "{d}/cert.pem"
key = "{d}/key.pem"

[path_agent]
allow = ["127.0.0.2/32"]
ports = [{port}]
"#,
        ca = ca.0.display(),
        d = dir.0.display(),
        port = agent.addr.port()
    );
    let mut proxy = Proxy::start(Some(&config), &[]);
    let url = format!(
        "https://127.0.0.1:{}/127.0.0.2:{}/page",
        proxy.addr.port(),
        agent.addr.port()
    );
    let _browser = Browser(
        Command::new(browser)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--ignore-certificate-errors",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.0.join("profile").display()
            ))
            .arg(&url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium"),
    );

    // The agent sees the page request, the WebSocket upgrade and the
    // page's report, each with the routing prefix stripped.
    let mut heads = Vec::new();
    let report = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let h = agent.heads.recv().await.expect("agent running");
            heads.push(h.lines().next().unwrap_or("").to_owned());
            if h.starts_with("GET /report?") {
                return h;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no report from the page within 60 s; agent saw {heads:?}"));
    assert!(
        report.starts_with("GET /report?echo-ok&len=5025 "),
        "{report}\nagent saw {heads:?}"
    );
    assert!(
        heads.iter().any(|h| h.starts_with("GET /page ")),
        "{heads:?}"
    );
    assert!(heads.iter().any(|h| h.starts_with("GET /ws ")), "{heads:?}");
    let ev = proxy.event("routed", |v| v["websocket"] == true);
    assert_eq!(ev["route"], "agent-in-path");
}
