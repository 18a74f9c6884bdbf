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
use tokio::time::Instant;

pub use crate::counters::Counters;
use crate::outcome::Kind;
use crate::shutdown::{Halt, Stop};

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
    /// An operator closed the session.
    Closed,
    /// A socket failed.
    Failed(PumpError),
    /// Paused for a live upgrade, with the bytes in flight: nothing was
    /// lost, and [`run`] goes on from here (in this process or the next).
    Paused(Box<Paused>),
    /// The session moved to the new process of a live upgrade.
    HandedOver,
}

impl End {
    /// The outcome it closes the connection with.
    pub fn kind(&self) -> Kind {
        match self {
            End::Done => Kind::Done,
            End::Idle(_) => Kind::IdleTimeout,
            End::Drained => Kind::DrainDeadline,
            End::Closed => Kind::OperatorClose,
            End::Failed(_) => Kind::IoError,
            End::Paused(_) | End::HandedOver => Kind::HandedOver,
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Done => f.write_str("both sides closed"),
            End::Idle(d) => write!(f, "idle timeout: no data either way for {d:?}"),
            End::Drained => f.write_str("drain deadline passed during shutdown"),
            End::Closed => f.write_str("closed by an operator"),
            End::Failed(e) => write!(f, "{e}"),
            End::Paused(_) => f.write_str("paused for a live upgrade"),
            End::HandedOver => f.write_str("handed over to the new process"),
        }
    }
}

/// One direction's state when a session pauses for a live upgrade.
#[derive(Debug, Default)]
pub struct InFlight {
    /// Bytes read from the source and not yet written (copy mode).
    pub pending: Vec<u8>,
    /// The splice pipe, when it holds `in_pipe` bytes not yet written.
    pub pipe: Option<splice::Pipe>,
    /// Bytes in `pipe`.
    pub in_pipe: usize,
    /// EOF was passed on: writing toward the destination is shut down.
    pub done: bool,
    /// The kernel refused to splice these sockets: copy only.
    pub no_splice: bool,
}

impl InFlight {
    /// Bytes held, in the buffer and the pipe.
    pub fn held(&self) -> usize {
        self.pending.len() + self.in_pipe
    }
}

/// Both directions of a paused session; `Paused::default()` is a new
/// connection's.
#[derive(Debug, Default)]
pub struct Paused {
    /// Client → agent.
    pub to_agent: InFlight,
    /// Agent → client.
    pub to_client: InFlight,
}

/// Forward until the connection ends, counting into `counters`, going on
/// from `from` (None for a new connection; what a paused session held is
/// written first). `stop` ends it at once (close, the
/// drain deadline) or pauses it for a live upgrade ([`End::Paused`]).
pub async fn run(
    client: &TcpStream,
    agent: &TcpStream,
    opts: Options,
    stop: &Stop,
    counters: &std::sync::Arc<Counters>,
    from: Option<Box<Paused>>,
) -> End {
    // The io_uring engines start from nothing: a session handed over with
    // bytes in flight goes on with the splice engine.
    #[cfg(feature = "uring")]
    if matches!(opts.engine, Engine::Uring | Engine::UringSplice) && from.is_none() {
        return uring::run(client, agent, opts, stop, counters).await;
    }
    #[cfg(feature = "uring")]
    let opts = Options {
        engine: match opts.engine {
            Engine::Uring | Engine::UringSplice => Engine::Splice,
            e => e,
        },
        ..opts
    };
    let (up_count, down_count) = (&counters.to_agent, &counters.to_client);
    // In a block: what `from` held lives on in the pumps only.
    let (mut up, mut down) = {
        let from = from.map(|b| *b).unwrap_or_default();
        let sides = (Side::Client, Side::Agent);
        let up = pump::Pump::new(client, agent, sides, up_count, opts, from.to_agent);
        let sides = (Side::Agent, Side::Client);
        let down = pump::Pump::new(agent, client, sides, down_count, opts, from.to_client);
        (up, down)
    };
    let idle = idle(opts.idle_timeout, up_count, down_count);
    tokio::pin!(idle);
    // Boxed: a connection without the mode holds one pointer for it.
    let id = std::sync::Arc::as_ptr(counters) as usize;
    let mut spinner = opts.spin.map(|w| Box::new(spin::Spinner::new(id, w)));
    let total = || {
        up_count
            .load(Ordering::Relaxed)
            .wrapping_add(down_count.load(Ordering::Relaxed))
    };
    let halted = std::future::poll_fn(|cx| {
        // In low-latency mode, after both directions find their sockets
        // empty, they are read again until the spin stops (see `spin`).
        let mut check = false;
        let mut spun_since: Option<std::time::Instant> = None;
        loop {
            // Told to stop: before any more bytes move, so a pause leaves
            // each direction between two chunks.
            if let Poll::Ready(h) = stop.poll(cx) {
                return Poll::Ready(Err(h));
            }
            // The counters are read only in low-latency mode.
            let before = spinner.is_some().then(total);
            let a = up.poll(cx, check);
            let b = down.poll(cx, check);
            match (a, b) {
                (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => {
                    return Poll::Ready(Ok(End::Failed(e)));
                }
                (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(Ok(End::Done)),
                _ => {}
            }
            if !check {
                if let Poll::Ready(d) = idle.as_mut().poll(cx) {
                    return Poll::Ready(Ok(End::Idle(d)));
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
    .await;
    match halted {
        Ok(end) => end,
        Err(Halt::Handover) => End::Paused(Box::new(Paused {
            to_agent: up.pause(),
            to_client: down.pause(),
        })),
        Err(Halt::Close) => End::Closed,
        Err(Halt::Deadline) => End::Drained,
    }
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

    /// Two loopback TCP pairs: (client's end, proxy's client leg) and
    /// (proxy's agent leg, agent's end).
    async fn legs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = TcpStream::connect(addr).await.unwrap();
        let (pc, _) = l.accept().await.unwrap();
        let pa = TcpStream::connect(addr).await.unwrap();
        let (a, _) = l.accept().await.unwrap();
        ((c, pc), (pa, a))
    }

    fn opts(engine: Engine) -> Options {
        Options {
            engine,
            pipe_size: 256 * 1024,
            idle_timeout: None,
            spin: None,
        }
    }

    /// A session paused with bytes held (its pipe, or its buffer) goes on
    /// in another forwarding loop — as a new process would — with every
    /// byte delivered once and in order, and the counts right.
    #[tokio::test]
    async fn a_paused_pump_hands_over_the_bytes_it_holds() {
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for engine in [Engine::Splice, Engine::Copy] {
            let ((mut c, pc), (pa, mut a)) = legs().await;
            let mut x: u32 = 0x9e37_79b9;
            let data: Vec<u8> = (0..4 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                c.write_all(&sent).await.unwrap();
                c.shutdown().await.unwrap();
                c
            });
            let (pc, pa) = (Arc::new(pc), Arc::new(pa));
            let counters = Arc::new(Counters::default());
            let mut from: Option<Box<Paused>> = None;
            let mut held = 0;
            // The agent reads nothing yet: once its buffers are full the
            // pump holds what it read last. Each round runs a little and
            // pauses; bounded.
            for _ in 0..2000 {
                let stop = Arc::new(Stop::default());
                let task = {
                    let (pc, pa, stop, counters) = (
                        Arc::clone(&pc),
                        Arc::clone(&pa),
                        Arc::clone(&stop),
                        Arc::clone(&counters),
                    );
                    let from = from.take();
                    tokio::spawn(async move {
                        run(&pc, &pa, opts(engine), &stop, &counters, from).await
                    })
                };
                tokio::time::sleep(Duration::from_millis(2)).await;
                stop.raise(Halt::Handover);
                let End::Paused(p) = task.await.unwrap() else {
                    panic!("not paused")
                };
                held = p.to_agent.held();
                if engine == Engine::Splice {
                    assert!(p.to_agent.pending.is_empty() || p.to_agent.pipe.is_none());
                } else {
                    assert!(p.to_agent.pipe.is_none(), "the copy engine holds no pipe");
                }
                from = Some(p);
                if held > 0 {
                    break;
                }
            }
            assert!(held > 0, "{engine}: the pump never held bytes");
            let written = counters.to_agent.load(Ordering::Relaxed);
            // Go on: the agent reads everything.
            let stop = Stop::default();
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                a.read_to_end(&mut got).await.unwrap();
                (a, got)
            });
            let end = tokio::select! {
                end = run(&pc, &pa, opts(engine), &stop, &counters, from) => end,
                r = async {
                    // The agent saw EOF: close its side, which ends the
                    // other direction.
                    let (a, got) = reader.await.unwrap();
                    drop(a);
                    got
                } => {
                    assert!(r == data, "{engine}: bytes lost, doubled or reordered ({} of {})", r.len(), data.len());
                    End::Done
                }
            };
            assert!(!matches!(end, End::Failed(_) | End::Paused(_)), "{end}");
            writer.await.unwrap();
            assert_eq!(counters.to_agent.load(Ordering::Relaxed), data.len() as u64);
            assert!(written + held as u64 <= data.len() as u64);
        }
    }

    /// What a handed-over direction held is written before anything read
    /// after it: the buffer's bytes one way, the pipe's the other.
    #[tokio::test]
    async fn resumed_directions_write_what_they_hold_first() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ((mut c, pc), (pa, mut a)) = legs().await;
        let pipe = splice::Pipe::new(64 * 1024).unwrap();
        let (_, w) = pipe.ends();
        nix::unistd::write(w, b"in-pipe-").unwrap();
        let paused = Paused {
            to_agent: InFlight {
                pending: b"held-".to_vec(),
                ..InFlight::default()
            },
            to_client: InFlight {
                pipe: Some(pipe),
                in_pipe: 8,
                ..InFlight::default()
            },
        };
        let counters = std::sync::Arc::new(Counters::default());
        let stop = Stop::default();
        let forward = run(
            &pc,
            &pa,
            opts(Engine::Splice),
            &stop,
            &counters,
            Some(Box::new(paused)),
        );
        let peers = async {
            c.write_all(b"next").await.unwrap();
            let mut got = [0u8; 9];
            a.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"held-next");
            a.write_all(b"reply").await.unwrap();
            let mut got = [0u8; 13];
            c.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"in-pipe-reply");
            drop((c, a));
        };
        tokio::select! {
            end = forward => panic!("ended first: {end}"),
            () = peers => {}
        }
        assert_eq!(counters.to_agent.load(Ordering::Relaxed), 9);
        assert_eq!(counters.to_client.load(Ordering::Relaxed), 13);
    }
}
