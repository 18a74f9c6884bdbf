//! Forwarding: move bytes both ways between client and agent until both
//! directions end, one side fails, the idle timeout fires or the drain
//! deadline passes.
//!
//! Each direction is a pump, a small state machine that [`run`] polls
//! with the other direction, the idle watchdog and the drain signal. Its
//! mechanisms:
//! - [`copy`]: read into the worker thread's scratch buffer and write it
//!   out at once, so an idle connection holds no buffer. The copy engine
//!   (`--engine copy`) only copies, 64 KiB at a time; the splice engine
//!   copies small reads, 4 KiB at a time.
//! - [`splice`]: once a read fills those 4 KiB, `splice(2)` socket → pipe
//!   → socket moves the bulk without copying it through userspace. The
//!   pipe is made then, not at accept, sized with `F_SETPIPE_SZ`, and
//!   closed when the flow turns quiet.
//!
//! - [`spin`] (low-latency mode): after bytes moved, read both sockets
//!   again for a short window instead of waiting to be woken, when no other
//!   connection of the worker is busy; so a small message's reply costs no
//!   wake-up.
//!
//! Half-close: when a pump reads EOF it shuts down writing on the other
//! socket and ends; the other direction keeps flowing until its own EOF.
//!
//! Per chunk a pump does its syscalls and one relaxed atomic add for the
//! byte count; no allocation, lock or log line. These engines know nothing
//! of TLS or HTTP; terminate mode has its own pump over rustls streams
//! ([`crate::terminate`]).

pub mod copy;
mod pump;
pub mod spin;
pub mod splice;
#[cfg(feature = "uring")]
mod uring;

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::outcome::Kind;
use crate::shutdown::wait_true;

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Zero-copy `splice(2)` through a pipe per direction.
    Splice,
    /// Userspace copy through a buffer per direction.
    Copy,
    /// io_uring receive/send (built with the `uring` feature only).
    Uring,
    /// io_uring splice through a pipe per direction (`uring` feature only).
    #[serde(rename = "uring-splice")]
    UringSplice,
}

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "splice" => Ok(Engine::Splice),
            "copy" => Ok(Engine::Copy),
            "uring" => Ok(Engine::Uring),
            "uring-splice" => Ok(Engine::UringSplice),
            other => Err(format!("`{other}` is not an engine: splice or copy")),
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Splice => "splice",
            Engine::Copy => "copy",
            Engine::Uring => "uring",
            Engine::UringSplice => "uring-splice",
        })
    }
}

impl Engine {
    /// File descriptors a connection forwarded by this engine holds for
    /// its life: its two sockets, and for the io_uring engines a duplicate
    /// of each (the ring owns its own) and, with splice, a pipe per
    /// direction. The splice engine's pipes exist only while bulk data
    /// flows and are budgeted apart.
    pub fn fds_per_connection(self) -> u64 {
        match self {
            Engine::Splice | Engine::Copy => 2,
            Engine::Uring => 4,
            Engine::UringSplice => 8,
        }
    }
}

/// Forwarding parameters for one connection.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Engine.
    pub engine: Engine,
    /// Pipe size for the splice engine, in bytes.
    pub pipe_size: usize,
    /// Close when neither direction moved a byte for this long.
    pub idle_timeout: Option<Duration>,
    /// Low-latency mode: check the sockets for this long after bytes
    /// moved, instead of waiting to be woken (None: off). See [`spin`].
    pub spin: Option<Duration>,
}

/// One end of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The downstream client (or the NLB in front of it).
    Client,
    /// The upstream agent.
    Agent,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Agent => "agent",
        })
    }
}

/// A pump failed on one socket.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// Reading from `side` failed.
    #[error("read from {side} failed: {source}")]
    Read {
        /// Which socket.
        side: Side,
        /// OS error.
        source: io::Error,
    },
    /// Writing to `side` failed.
    #[error("write to {side} failed: {source}")]
    Write {
        /// Which socket.
        side: Side,
        /// OS error.
        source: io::Error,
    },
}

/// How forwarding ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached EOF.
    Done,
    /// No byte moved either way for the idle timeout.
    Idle(Duration),
    /// The drain deadline passed during shutdown.
    Drained,
    /// A socket failed.
    Failed(PumpError),
}

impl End {
    /// The outcome it closes the connection with.
    pub fn kind(&self) -> Kind {
        match self {
            End::Done => Kind::Done,
            End::Idle(_) => Kind::IdleTimeout,
            End::Drained => Kind::DrainDeadline,
            End::Failed(_) => Kind::IoError,
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Done => f.write_str("both sides closed"),
            End::Idle(d) => write!(f, "idle timeout: no data either way for {d:?}"),
            End::Drained => f.write_str("drain deadline passed during shutdown"),
            End::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Bytes moved by one connection, updated by the pumps with relaxed atomic
/// adds and read by the access log, the idle watchdog and `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes written to the agent.
    pub to_agent: AtomicU64,
    /// Bytes written to the client.
    pub to_client: AtomicU64,
}

/// Forward until the connection ends, counting into `counters`. `drain`
/// turning true ends it at once.
pub async fn run(
    client: &TcpStream,
    agent: &TcpStream,
    opts: Options,
    drain: &mut watch::Receiver<bool>,
    counters: &std::sync::Arc<Counters>,
) -> End {
    #[cfg(feature = "uring")]
    if matches!(opts.engine, Engine::Uring | Engine::UringSplice) {
        return uring::run(client, agent, opts, drain, counters).await;
    }
    let (up_count, down_count) = (&counters.to_agent, &counters.to_client);
    let mut up = pump::Pump::new(client, agent, (Side::Client, Side::Agent), up_count, opts);
    let mut down = pump::Pump::new(agent, client, (Side::Agent, Side::Client), down_count, opts);
    let idle = idle(opts.idle_timeout, up_count, down_count);
    let drained = wait_true(drain);
    tokio::pin!(idle, drained);
    // Boxed: a connection without the mode holds one pointer for it.
    let id = std::sync::Arc::as_ptr(counters) as usize;
    let mut spinner = opts.spin.map(|w| Box::new(spin::Spinner::new(id, w)));
    let total = || {
        up_count
            .load(Ordering::Relaxed)
            .wrapping_add(down_count.load(Ordering::Relaxed))
    };
    std::future::poll_fn(|cx| {
        // In low-latency mode, after both directions find their sockets
        // empty, they are read again until the spin stops (see `spin`).
        let mut check = false;
        let mut spun_since: Option<std::time::Instant> = None;
        loop {
            // The counters are read only in low-latency mode.
            let before = spinner.is_some().then(total);
            let a = up.poll(cx, check);
            let b = down.poll(cx, check);
            match (a, b) {
                (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => {
                    return Poll::Ready(End::Failed(e));
                }
                (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(End::Done),
                _ => {}
            }
            if !check {
                if let Poll::Ready(d) = idle.as_mut().poll(cx) {
                    return Poll::Ready(End::Idle(d));
                }
                if drained.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(End::Drained);
                }
            }
            let moved = before.is_some_and(|b| total() != b);
            let Some(now) = spinner.as_mut().and_then(|s| s.again(moved)) else {
                return Poll::Pending;
            };
            if now.duration_since(*spun_since.get_or_insert(now)) >= spin::SLICE {
                // Other tasks of this worker get their turn.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            check = true;
        }
    })
    .await
}

/// Resolves when neither counter moved for `timeout`. It samples four times
/// per period, so it fires between `timeout` and 1.25 × `timeout` after the
/// last byte.
pub(crate) async fn idle(timeout: Option<Duration>, a: &AtomicU64, b: &AtomicU64) -> Duration {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let total = || {
        a.load(Ordering::Relaxed)
            .wrapping_add(b.load(Ordering::Relaxed))
    };
    let tick = (timeout / 4).max(Duration::from_millis(1));
    let mut seen = total();
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = total();
        if now != seen {
            seen = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= timeout {
            return timeout;
        }
    }
}

/// Why [`send_within`] did not deliver.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The peer did not take the bytes in time (it accepted and does not
    /// read, and the socket buffers are full).
    #[error("not taken within {0:?}")]
    TimedOut(Duration),
    /// The write failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Write and flush `bytes` to `dst` within `limit`, adding them to `count`:
/// what splicegate sends an agent before forwarding begins (the replayed
/// ClientHello, a rewritten request head), when no idle timeout watches
/// the connection yet.
pub async fn send_within<W: tokio::io::AsyncWrite + Unpin>(
    dst: &mut W,
    bytes: &[u8],
    limit: Duration,
    count: &AtomicU64,
) -> Result<(), SendError> {
    use tokio::io::AsyncWriteExt;
    let work = async {
        dst.write_all(bytes).await?;
        dst.flush().await
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| SendError::TimedOut(limit))??;
    count.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Shut down writing toward `dst` after its source reached EOF. A socket
/// the peer already closed reports ENOTCONN, which is fine here.
fn shutdown_write(dst: &TcpStream) {
    let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that accepts and never reads cannot hold a sender past its
    /// limit, however large the bytes (here a 64-byte pipe).
    #[tokio::test(start_paused = true)]
    async fn send_within_gives_up_on_a_peer_that_never_reads() {
        let (mut near, _far) = tokio::io::duplex(64);
        let count = AtomicU64::new(0);
        let limit = Duration::from_secs(5);
        let r = send_within(&mut near, &[7u8; 4096], limit, &count).await;
        assert!(
            matches!(r, Err(SendError::TimedOut(d)) if d == limit),
            "{r:?}"
        );
        assert_eq!(count.load(Ordering::Relaxed), 0);
        let (mut near, mut far) = tokio::io::duplex(64 * 1024);
        send_within(&mut near, &[7u8; 4096], limit, &count)
            .await
            .unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 4096);
        let mut got = vec![0u8; 4096];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut got)
            .await
            .unwrap();
    }
}
