//! The load generator: each test opens its own connections to a target and
//! measures with hdrhistogram. Every loop is bounded in count and time.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use serde::Serialize;
use splicegate::testkit::client_hello;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Percentiles reported and plotted.
pub const QUANTILES: [f64; 8] = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999];

/// A latency distribution, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
    /// Value at each of [`QUANTILES`], for the plot.
    pub curve: Vec<f64>,
}

/// A histogram recording nanoseconds.
pub fn hist() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits")
}

/// Summarise a nanosecond histogram in microseconds.
pub fn summary(h: &Histogram<u64>) -> Summary {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    Summary {
        count: h.len(),
        p50: us(0.5),
        p90: us(0.9),
        p99: us(0.99),
        p999: us(0.999),
        max: h.max() as f64 / 1e3,
        curve: QUANTILES.iter().map(|&q| us(q)).collect(),
    }
}

/// A duration in nanoseconds for the histograms (at least 1).
pub fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// Open a TLS connection with SNI `sni`; returns the stream, TCP connect
/// time and handshake time.
pub async fn tls_open(
    addr: SocketAddr,
    sni: &str,
    cfg: &Arc<rustls::ClientConfig>,
) -> io::Result<(TlsStream<TcpStream>, Duration, Duration)> {
    let t0 = Instant::now();
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let t1 = Instant::now();
    let name = ServerName::try_from(sni.to_owned()).map_err(io::Error::other)?;
    let s = TlsConnector::from(Arc::clone(cfg))
        .connect(name, tcp)
        .await?;
    Ok((s, t1 - t0, t1.elapsed()))
}

/// Open a raw connection: a real ClientHello with SNI `sni`, then plain bytes.
pub async fn raw_open(addr: SocketAddr, sni: &str) -> io::Result<TcpStream> {
    raw_open_from(None, addr, sni).await
}

/// [`raw_open`] from a chosen loopback source address (the idle mode
/// spreads many connections over several, so ephemeral ports do not run
/// out at about 28,000 per source and destination).
pub async fn raw_open_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    sni: &str,
) -> io::Result<TcpStream> {
    let mut s = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let sock = if ip.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            // Take the port at connect time, where a port only needs a
            // unique 4-tuple (and TIME_WAIT ones are reused), not at bind.
            nix::sys::socket::setsockopt(
                &sock,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )?;
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(addr).await?
        }
    };
    s.set_nodelay(true)?;
    s.write_all(&client_hello(Some(sni), &[], 1 << 14)).await?;
    Ok(s)
}

/// Ask an agent for its name (the routing check).
pub async fn identify<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<String> {
    s.write_all(b"I").await?;
    let mut name = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' || name.len() > 64 {
            break;
        }
        name.push(b);
    }
    Ok(String::from_utf8_lossy(&name).into_owned())
}

/// Per-phase connection setup timings.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// TCP connect.
    pub connect: Summary,
    /// TLS handshake.
    pub handshake: Summary,
    /// First 64-byte echo.
    pub first_echo: Summary,
    /// All three.
    pub total: Summary,
}

/// `n` sequential fresh connections: connect, handshake, one 64-byte echo.
pub async fn setup(
    addr: SocketAddr,
    sni: &str,
    cfg: &Arc<rustls::ClientConfig>,
    n: u32,
) -> io::Result<Setup> {
    let (mut c, mut h, mut e, mut t) = (hist(), hist(), hist(), hist());
    let msg = [7u8; 64];
    for _ in 0..n {
        let start = Instant::now();
        let (mut s, connect, handshake) = tls_open(addr, sni, cfg).await?;
        let t2 = Instant::now();
        s.write_all(b"E").await?;
        s.write_all(&msg).await?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back).await?;
        let echo = t2.elapsed();
        let _ = c.record(ns(connect));
        let _ = h.record(ns(handshake));
        let _ = e.record(ns(echo));
        let _ = t.record(ns(start.elapsed()));
    }
    Ok(Setup {
        connect: summary(&c),
        handshake: summary(&h),
        first_echo: summary(&e),
        total: summary(&t),
    })
}

/// `m` round trips of 64 bytes on one established stream (after `E`).
pub async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    m: u32,
) -> io::Result<Histogram<u64>> {
    s.write_all(b"E").await?;
    let msg = [9u8; 64];
    let mut back = [0u8; 64];
    let mut h = hist();
    for i in 0..m + m / 10 {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        // The first tenth warms up and is not recorded.
        if i >= m / 10 {
            let _ = h.record(ns(t.elapsed()));
        }
    }
    Ok(h)
}

/// `c` TLS connections doing round trips in parallel for `dur`.
pub async fn rtt_concurrent(
    addr: SocketAddr,
    sni: &str,
    cfg: &Arc<rustls::ClientConfig>,
    c: u32,
    dur: Duration,
) -> io::Result<(Summary, f64)> {
    let mut streams = Vec::new();
    for _ in 0..c {
        streams.push(tls_open(addr, sni, cfg).await?.0);
    }
    rtt_parallel(streams, dur).await
}

/// Round trips on every stream in parallel for `dur`; percentiles and
/// operations per second.
pub async fn rtt_parallel<S>(streams: Vec<S>, dur: Duration) -> io::Result<(Summary, f64)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut tasks = Vec::new();
    for mut s in streams {
        tasks.push(tokio::spawn(async move {
            s.write_all(b"E").await?;
            let msg = [3u8; 64];
            let mut back = [0u8; 64];
            let mut h = hist();
            let end = Instant::now() + dur;
            while Instant::now() < end {
                let t = Instant::now();
                s.write_all(&msg).await?;
                s.read_exact(&mut back).await?;
                let _ = h.record(ns(t.elapsed()));
            }
            io::Result::Ok(h)
        }));
    }
    let start = Instant::now();
    let mut all = hist();
    for t in tasks {
        let h = t.await.map_err(io::Error::other)??;
        let _ = all.add(&h);
    }
    let ops = all.len() as f64 / start.elapsed().as_secs_f64();
    Ok((summary(&all), ops))
}

/// Ask for `bytes` from the agent and read them all; returns seconds.
pub async fn bulk<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, bytes: u64) -> io::Result<f64> {
    let mut req = vec![b'B'];
    req.extend_from_slice(&bytes.to_be_bytes());
    let t = Instant::now();
    s.write_all(&req).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ended after {got} of {bytes} bytes"),
            ));
        }
        got += n as u64;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Open `k` idle raw connections (hello sent, agent in echo mode).
pub async fn idle(addr: SocketAddr, sni: &str, k: u32) -> io::Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(k as usize);
    for _ in 0..k {
        let mut s = raw_open(addr, sni).await?;
        s.write_all(b"E").await?;
        held.push(s);
    }
    // One round trip on each: every hello has been forwarded, and every
    // connection has carried data (in low-latency mode, spun once) before
    // it idles.
    for s in held.iter_mut() {
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
    }
    Ok(held)
}
