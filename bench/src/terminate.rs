//! Terminate mode against nginx doing the same job: TLS ends at the proxy,
//! which reads the HTTP request, opens TLS to the agent and, after the
//! agent's `101 Switching Protocols`, streams both ways — the DCV WebSocket
//! path. Targets: `direct` (the client upgrades with the agent itself),
//! `splicegate terminate` and `nginx https` (`proxy_pass https://` with the
//! upgrade headers, buffering off, no verification of the agent, as the
//! DCV users' configuration had it).
//!
//! Every connection sends `GET /ws` with WebSocket upgrade headers; after
//! the 101 the bench protocol of [`crate::agent`] runs over the stream.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use splicegate::testkit::{identity, server_config, Identity};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::load::{self, hist, summary, Setup};
use crate::targets::{self, Running};
use crate::{Params, Run};

/// The name clients use (the proxies' and the agent's certificates cover it).
const NAME: &str = "localhost";

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Targets of the terminate suite.
pub const TARGETS: [&str; 3] = ["direct", "splicegate-terminate", "nginx-https"];

/// The display name of a target.
pub fn name(t: &str) -> String {
    match t {
        "splicegate-terminate" => "splicegate terminate".into(),
        "nginx-https" => "nginx https".into(),
        other => other.into(),
    }
}

/// The HTTPS agent and the certificate the proxies present.
pub struct Web {
    /// Where the agent listens.
    pub addr: SocketAddr,
    /// Certificate of the agent and of the proxies (covers `localhost`).
    pub id: Identity,
}

/// Start the HTTPS agent: it answers any request head with 101, then runs
/// the bench protocol.
pub async fn start_agent() -> std::io::Result<Web> {
    let id = identity(&[NAME, "127.0.0.1"]).map_err(std::io::Error::other)?;
    let acceptor = TlsAcceptor::from(server_config(&id).map_err(std::io::Error::other)?);
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let acc = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut t) = acc.accept(s).await else {
                    return;
                };
                let Ok(rest) = read_head(&mut t).await else {
                    return;
                };
                let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                if t.write_all(ok).await.is_ok() && t.flush().await.is_ok() {
                    crate::agent::serve(t, "web", rest).await;
                }
            });
        }
    });
    Ok(Web { addr, id })
}

/// Read an HTTP head; returns the bytes after it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(buf.split_off(i + 4));
        }
        if buf.len() > 16384 || s.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::other("no complete HTTP head"));
        }
    }
}

/// Start a target of this suite.
pub fn start(target: &str, web: &Web, splicegate: &Path) -> Result<Running, String> {
    let dir = std::env::temp_dir().join(format!(
        "splicegate-bench-term-{}-{target}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &web.id.cert_pem).map_err(|e| e.to_string())?;
    std::fs::write(&key, &web.id.key_pem).map_err(|e| e.to_string())?;
    match target {
        "direct" => Ok(Running::none(dir)),
        "splicegate-terminate" => {
            let cfg = format!(
                "[[listener]]\nbind = \"127.0.0.1:0\"\nmode = \"terminate\"\nupstream_tls = \"insecure\"\n\
                 [[listener.cert]]\ncert = \"{}\"\nkey = \"{}\"\n\
                 [[path_route]]\nprefix = \"/\"\nagent = \"{}\"\n",
                cert.display(),
                key.display(),
                web.addr
            );
            let file = dir.join("splicegate.toml");
            std::fs::write(&file, cfg).map_err(|e| e.to_string())?;
            let (child, addr) = targets::spawn_splicegate(splicegate, &file)?;
            Ok(Running::spawned(addr, child, dir))
        }
        "nginx-https" => {
            let port = targets::free_port().map_err(|e| e.to_string())?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("valid");
            let d = dir.display();
            let cfg = format!(
                "daemon off;\nmaster_process on;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 8000; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 server {{\n    listen {addr} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n\
                 ssl_protocols TLSv1.2 TLSv1.3;\n    location / {{\n      proxy_pass https://{};\n\
                 proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection \"upgrade\";\n\
                 proxy_set_header Host $host;\n      proxy_buffering off;\n      proxy_ssl_verify off;\n\
                 proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n    }}\n  }}\n}}\n",
                cert.display(),
                key.display(),
                web.addr
            );
            let child = targets::spawn_nginx(&dir, &cfg, addr)?;
            Ok(Running::spawned(addr, child, dir))
        }
        other => Err(format!("unknown terminate target {other:?}")),
    }
}

/// TLS to `addr`, then the WebSocket upgrade; returns the upgraded stream.
pub async fn open(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let (mut s, _, _) = load::tls_open(addr, NAME, cfg).await?;
    upgrade(&mut s).await?;
    Ok(s)
}

async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<()> {
    s.write_all(UPGRADE).await?;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await?);
        if head.len() > 4096 {
            return Err(std::io::Error::other("response head too long"));
        }
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        let line = String::from_utf8_lossy(&head);
        return Err(std::io::Error::other(format!(
            "upgrade refused: {}",
            line.lines().next().unwrap_or("")
        )));
    }
    Ok(())
}

/// The routing check: the upgraded stream reaches the web agent.
pub async fn check(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> Result<(), String> {
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = open(addr, cfg).await?;
        load::identify(&mut s).await
    })
    .await
    .map_err(|_| "no answer within 10 s".to_owned())?
    .map_err(|e| e.to_string())?;
    if got == "web" {
        Ok(())
    } else {
        Err(format!("reached {got:?} instead of the web agent"))
    }
}

/// One repeat of every test against one target.
pub async fn measure(
    t: &Running,
    web: &Web,
    cfg: &Arc<rustls::ClientConfig>,
    p: &Params,
    repeat: u32,
) -> Run {
    let mut run = Run {
        repeat,
        ..Run::default()
    };
    let addr = t.listen.unwrap_or(web.addr);
    let pids = t.pids();

    let cpu0 = targets::cpu_seconds(&pids);
    run.setup = run.step("setup", setup(addr, cfg, p.setup_conns)).await;
    if run.setup.is_some() && !pids.is_empty() {
        run.proxy_cpu_ms_per_conn =
            Some((targets::cpu_seconds(&pids) - cpu0) * 1e3 / f64::from(p.setup_conns));
    }
    run.rtt = run
        .step("rtt", async {
            let mut s = open(addr, cfg).await?;
            load::round_trips(&mut s, p.rtt_rounds)
                .await
                .map(|h| summary(&h))
        })
        .await;
    if let Some((s, ops)) = run
        .step(
            "rtt-concurrent",
            concurrent(
                addr,
                cfg,
                p.concurrent_conns,
                Duration::from_secs_f64(p.concurrent_secs),
            ),
        )
        .await
    {
        run.rtt_concurrent = Some(s);
        run.ops_per_sec = Some(ops);
    }
    run.bulk_gbit = run
        .bulk_with_cpu("bulk", p.bulk_bytes, &pids, open(addr, cfg))
        .await;
    run
}

/// `n` sequential fresh connections: TCP, TLS, upgrade, one 64-byte echo.
/// "handshake" here covers TLS and the upgrade exchange.
async fn setup(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    n: u32,
) -> std::io::Result<Setup> {
    let (mut c, mut h, mut e, mut t) = (hist(), hist(), hist(), hist());
    let msg = [7u8; 64];
    for _ in 0..n {
        let start = Instant::now();
        let (mut s, connect, tls) = load::tls_open(addr, NAME, cfg).await?;
        let t1 = Instant::now();
        upgrade(&mut s).await?;
        let handshake = tls + t1.elapsed();
        let t2 = Instant::now();
        s.write_all(b"E").await?;
        s.write_all(&msg).await?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back).await?;
        let _ = c.record(load::ns(connect));
        let _ = h.record(load::ns(handshake));
        let _ = e.record(load::ns(t2.elapsed()));
        let _ = t.record(load::ns(start.elapsed()));
    }
    Ok(Setup {
        connect: summary(&c),
        handshake: summary(&h),
        first_echo: summary(&e),
        total: summary(&t),
    })
}

async fn concurrent(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    c: u32,
    dur: Duration,
) -> std::io::Result<(load::Summary, f64)> {
    let mut streams = Vec::new();
    for _ in 0..c {
        streams.push(open(addr, cfg).await?);
    }
    load::rtt_parallel(streams, dur).await
}
