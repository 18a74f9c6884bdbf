//! Shared test harness: run the real `splicegate` binary with JSON logs and
//! wait on its log events (never on sleeps), plus loopback peers.

#![allow(dead_code)]

pub mod http;
pub mod quic;
pub mod resolver;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// Whether a requirement of a test is met. When it is not, the test skips
/// with the printed reason on a developer's machine, but fails under
/// `CI=true`, where `tests/run-all.sh` has installed every tool and runs
/// as root: a silent skip there would hide a regression.
pub fn require(met: bool, what: &str) -> bool {
    if met {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(!ci, "CI=true and a test requirement is missing: {what}");
    eprintln!("SKIP: {what} (tests/run-all.sh installs it; under CI=true this fails)");
    false
}

/// Whether `tool` runs (`tool arg` starts); see [`require`].
pub fn require_tool(tool: &str, arg: &str) -> bool {
    let ok = Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    require(ok, &format!("{tool} is not installed"))
}

/// Upper bound for any wait on the proxy; generous for a loaded 2-core CI.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Proxy {
    child: Option<Child>,
    events: mpsc::Receiver<Value>,
    /// Every event seen so far (for failure messages).
    seen: Vec<Value>,
    pub addr: SocketAddr,
    /// The admin listener's address, when one is configured.
    pub admin: Option<SocketAddr>,
    /// The control socket, when the harness chose its path (a config
    /// with a `[control]` section or a `--control` argument chooses its
    /// own).
    pub control: Option<PathBuf>,
    _config: Option<tempfile_lite::TempFile>,
}

/// Minimal temp file without another dependency.
pub mod tempfile_lite {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    pub struct TempFile(pub PathBuf);

    static N: AtomicU32 = AtomicU32::new(0);

    impl TempFile {
        pub fn new(suffix: &str, contents: &[u8]) -> TempFile {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "splicegate-test-{}-{n}{suffix}",
                std::process::id()
            ));
            std::fs::write(&path, contents).expect("write temp file");
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_splicegate")
}

impl Proxy {
    /// Start `splicegate run` with `config` (TOML) and extra args; wait for
    /// its first `listening` event.
    pub fn start(config: Option<&str>, args: &[&str]) -> Proxy {
        Proxy::start_with_env(config, args, &[])
    }

    /// Like [`Proxy::start`], with extra environment variables.
    pub fn start_with_env(config: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let cfg = config.map(|c| tempfile_lite::TempFile::new(".toml", c.as_bytes()));
        let mut cmd = Command::new(bin());
        cmd.args(["--log-format", "json", "run"]);
        if let Some(c) = &cfg {
            cmd.arg("--config").arg(&c.0);
        }
        // Each proxy its own control socket, so tests never share one.
        let own = !config.is_some_and(|c| c.contains("[control]")) && !args.contains(&"--control");
        let control = own.then(control_path);
        if let Some(c) = &control {
            cmd.arg("--control").arg(c);
        }
        cmd.envs(env.iter().copied()).args(args);
        let mut p = Proxy::start_command(&mut cmd);
        p._config = cfg;
        p.control = control;
        p
    }

    /// Start a command that runs splicegate with JSON logs on stderr; wait
    /// for its first (non-admin) `listening` event.
    pub fn start_command(cmd: &mut Command) -> Proxy {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn splicegate");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut p = Proxy {
            child: Some(child),
            events: rx,
            seen: Vec::new(),
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: None,
            control: None,
            _config: None,
        };
        let ev = p.event("listening", |v| v["listener"] != "admin");
        p.addr = ev["addr"].as_str().unwrap().parse().unwrap();
        p.admin = p
            .seen
            .iter()
            .find(|v| v["event"] == "listening" && v["listener"] == "admin")
            .map(|v| v["addr"].as_str().unwrap().parse().unwrap());
        p
    }

    /// Wait for the next event named `name` matching `pred`.
    pub fn event(&mut self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == name && pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no `{name}` event within {WAIT:?}; events seen:\n{}",
                    self.dump()
                ),
            }
        }
    }

    /// The first event named `name` matching `pred`, seen already or
    /// waited for.
    pub fn find_event(&mut self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| v["event"] == name && pred(v)) {
            return v.clone();
        }
        self.event(name, pred)
    }

    /// Every event logged so far, without waiting for more.
    pub fn all_seen(&mut self) -> &[Value] {
        while let Ok(v) = self.events.try_recv() {
            self.seen.push(v);
        }
        &self.seen
    }

    /// Whether an event named `name` was already seen (e.g. logged before
    /// `listening`).
    pub fn saw(&self, name: &str) -> bool {
        self.seen.iter().any(|v| v["event"] == name)
    }

    /// The first event named `name` seen so far (e.g. logged before
    /// `listening`).
    pub fn seen_event(&self, name: &str) -> Option<Value> {
        self.seen.iter().find(|v| v["event"] == name).cloned()
    }

    /// Whether a `closed` event with this outcome was seen so far.
    pub fn saw_closed(&self, outcome: &str) -> bool {
        self.seen
            .iter()
            .any(|v| v["event"] == "closed" && v["outcome"] == outcome)
    }

    /// Wait for the `closed` event of a connection with this outcome.
    pub fn closed(&mut self, outcome: &str) -> Value {
        self.event("closed", |v| v["outcome"] == outcome)
    }

    fn dump(&self) -> String {
        self.seen
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The config file the proxy was started with.
    pub fn config_path(&self) -> &std::path::Path {
        &self._config.as_ref().expect("started with a config").0
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// Wait for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self) -> i32 {
        let mut child = self.child.take().unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            // Drain events so the pipe never blocks the child.
            while let Ok(v) = self.events.try_recv() {
                self.seen.push(v);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("splicegate did not exit; events:\n{}", self.dump());
            }
            let _ = self
                .events
                .recv_timeout(Duration::from_millis(50))
                .map(|v| self.seen.push(v));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A control socket path of its own for one proxy (removed by the proxy
/// when it stops).
pub fn control_path() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "splicegate-ctl-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// One plain `GET` to an admin listener (HTTP/1.0): the whole answer,
/// status line included.
pub fn admin_get(addr: SocketAddr, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the admin listener");
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The sum of the `/metrics` samples whose line starts with `prefix`.
pub fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A blocking TCP client that writes raw bytes.
pub fn raw_client(addr: SocketAddr, bytes: &[u8]) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to proxy");
    s.set_nodelay(true).unwrap();
    s.write_all(bytes).expect("write");
    s
}

/// Write `data` on an echoing stream while reading it back concurrently,
/// check the echo byte for byte, then half-close and read to the end.
pub async fn echo_both_ways<S>(stream: S, data: &[u8]) -> S
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(stream);
    let expect = data.to_vec();
    let reader = tokio::spawn(async move {
        let mut got = vec![0u8; expect.len()];
        rd.read_exact(&mut got).await.unwrap();
        assert!(got == expect, "echoed bytes differ");
        rd
    });
    wr.write_all(data).await.unwrap();
    let mut stream = reader.await.unwrap().unsplit(wr);
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    stream
}

/// Deterministic payload of `n` bytes.
pub fn payload(n: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A plain TCP agent that reports the first `want` bytes of each connection
/// on a channel, then holds the connection open and echoes anything after.
pub async fn recording_agent(
    want: usize,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = vec![0u8; want];
                if s.read_exact(&mut got).await.is_err() {
                    return;
                }
                let _ = tx.send(got);
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// `curl` a URL; returns (status code, body). Panics if curl is missing.
pub fn curl(url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", url])
        .output()
        .expect("curl (tests/run-all.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "splicegate-term-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `splicegate cert --out dir --san ...`.
pub fn make_cert(dir: &Path, sans: &[&str]) {
    let mut cmd = Command::new(bin());
    cmd.arg("cert").arg("--out").arg(dir);
    for s in sans {
        cmd.args(["--san", s]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// curl verifying the proxy against `cacert`; returns (status, body) per
/// URL, in order (curl reuses its connection between them when it can).
pub fn curl_tls(cacert: &Path, urls: &[String]) -> Vec<(u16, String)> {
    curl_tls_in(&[], cacert, urls)
}

/// [`curl_tls`] run under a prefix command (`ip netns exec NS`).
pub fn curl_tls_in(prefix: &[&str], cacert: &Path, urls: &[String]) -> Vec<(u16, String)> {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("curl");
            c
        }
        None => Command::new("curl"),
    };
    cmd.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(cacert);
    for (i, u) in urls.iter().enumerate() {
        if i > 0 {
            cmd.arg("--next").args(["--cacert"]).arg(cacert);
        }
        cmd.args(["-w", "\n@@%{http_code}@@\n", u]);
    }
    let out = cmd.output().expect("curl (tests/run-all.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut res = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("\n@@") {
        let body = &rest[..i];
        let code = &rest[i + 3..i + 6];
        res.push((code.parse().unwrap_or(0), body.to_owned()));
        rest = rest[i + 3..].split_once("@@\n").map_or("", |x| x.1);
    }
    assert_eq!(
        res.len(),
        urls.len(),
        "curl output: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    res
}

/// The TLS agent most tests route to: `alpha`, with a certificate for
/// `alpha.test`, on a free loopback port.
pub async fn alpha_agent() -> (splicegate::testkit::Identity, splicegate::testkit::Agent) {
    use splicegate::testkit::{identity, server_config, Agent};
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

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the file; `after` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Watch `pid` for 3 s and assert it stayed at about zero CPU: under 2 %
/// of one CPU (generous: a tick or two of timer and keepalive work).
/// `what` names what it holds, for the printed figure.
pub async fn assert_idle_cpu(pid: i32, what: &str) {
    // /proc counts in USER_HZ, 100 on Linux.
    let ticks_per_s = 100.0;
    let before = cpu_ticks(pid);
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(pid) - before;
    let share = used as f64 / ticks_per_s / started.elapsed().as_secs_f64();
    eprintln!("{what}: {:.2} % of a CPU", share * 100.0);
    assert!(
        share < 0.02,
        "{what}: the process used {:.2} % of a CPU",
        share * 100.0
    );
}

/// A TCP stream that counts the bytes it reads and writes, to compare with
/// the `closed` line the proxy writes for it.
pub struct Counted {
    pub inner: tokio::net::TcpStream,
    pub read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub written: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        r
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.written
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
