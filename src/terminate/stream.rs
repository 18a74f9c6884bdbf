//! Terminate mode's pump: forwarding between userspace streams. The
//! client's side is decrypted by rustls and the agent's side re-encrypted
//! (or plain TCP), so bytes pass through userspace by necessity.
//!
//! Both directions run in one future over one buffer each (16 KiB, about
//! one TLS record), allocated once per connection: no split halves, no lock
//! and no allocation per chunk. Per chunk: one read, the writes it takes,
//! one relaxed atomic add, and a flush when the source has nothing more for
//! now (rustls buffers what it encrypts).
//!
//! Half-close: EOF from one side is passed on with `poll_shutdown` (for
//! TLS, a close_notify and then a TCP FIN). With [`StreamOptions::end_with_agent`]
//! the connection ends as soon as the agent's side is done — a plain HTTP
//! request whose response is complete needs nothing more from the client.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::forward::{idle, Counters, End, PumpError, Side};
use crate::shutdown::{Halt, Stop};

const BUF: usize = 16 * 1024;

/// Forwarding parameters for a terminated connection.
#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    /// Close when neither direction moved a byte for this long.
    pub idle_timeout: Option<Duration>,
    /// End when the agent → client direction ends, without waiting for the
    /// client to close its side.
    pub end_with_agent: bool,
    /// Forward at most this many more bytes from the client (the rest of a
    /// request body); later bytes are read and discarded, so nothing the
    /// client sends after its request reaches the agent. None: no limit.
    pub client_limit: Option<u64>,
    /// Forward at most this many more bytes from the agent, then end that
    /// direction (the rest of a response whose length is known). None: until
    /// the agent closes.
    pub agent_limit: Option<u64>,
    /// Read the status code from the agent's first bytes (for the access
    /// log), when the caller has not read the response head itself.
    pub probe_status: bool,
}

/// What the agent answered, seen in its first bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    /// Status code of the response's first line, if it had one.
    pub status: Option<u16>,
}

/// Forward until the connection ends, counting into `counters`; `stop`
/// closes it (an operator's close, the drain deadline).
pub async fn run<C, A>(
    client: &mut C,
    agent: &mut A,
    opts: StreamOptions,
    stop: &Stop,
    counters: &Counters,
    seen: &mut Seen,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let (up_count, down_count) = (&counters.to_agent, &counters.to_client);
    let pumps = async {
        let mut up = Dir::new((Side::Client, Side::Agent));
        up.remaining = opts.client_limit;
        let mut down = Dir::new((Side::Agent, Side::Client));
        down.probe_status = opts.probe_status;
        down.remaining = opts.agent_limit;
        down.end_at_limit = true;
        let (mut up_done, mut down_done) = (false, false);
        let r = poll_fn(|cx| {
            if !up_done {
                if let Poll::Ready(r) = up.poll(cx, client, agent, up_count) {
                    r?;
                    up_done = true;
                }
            }
            if !down_done {
                if let Poll::Ready(r) = down.poll(cx, agent, client, down_count) {
                    r?;
                    down_done = true;
                }
            }
            if down_done && (up_done || opts.end_with_agent) {
                Poll::Ready(Ok::<(), PumpError>(()))
            } else {
                Poll::Pending
            }
        })
        .await;
        if down.status.is_some() {
            seen.status = down.status;
        }
        r
    };
    tokio::select! {
        r = pumps => match r {
            Ok(()) => End::Done,
            Err(e) => End::Failed(e),
        },
        d = idle(opts.idle_timeout, up_count, down_count) => End::Idle(d),
        h = stop.wait_final() => match h {
            Halt::Close => End::Closed,
            _ => End::Drained,
        },
    }
}

/// One direction: a buffer, what of it is still to be written, and state.
struct Dir {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    eof: bool,
    need_flush: bool,
    sides: (Side, Side),
    probe_status: bool,
    status: Option<u16>,
    /// Bytes still to forward; past it, reads are discarded.
    remaining: Option<u64>,
    /// At the limit the direction ends instead of discarding.
    end_at_limit: bool,
}

impl Dir {
    fn new(sides: (Side, Side)) -> Dir {
        Dir {
            buf: vec![0; BUF].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            need_flush: false,
            sides,
            probe_status: false,
            status: None,
            remaining: None,
            end_at_limit: false,
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
        count: &AtomicU64,
    ) -> Poll<Result<(), PumpError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (from, to) = self.sides;
        let werr = |source| PumpError::Write { side: to, source };
        loop {
            if self.pos == self.cap && !self.eof && self.end_at_limit && self.remaining == Some(0) {
                self.eof = true;
            }
            if self.pos == self.cap && !self.eof {
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(Pin::new(&mut *dst).poll_flush(cx)).map_err(werr)?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    // A peer that closes TCP without TLS close_notify has
                    // still finished sending; treat it as EOF.
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.eof = true;
                    }
                    Poll::Ready(Err(source)) => {
                        return Poll::Ready(Err(PumpError::Read { side: from, source }))
                    }
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else if let Some(left) = self.remaining {
                            // Forward up to the limit; drop the rest.
                            let keep = left.min(n as u64);
                            self.remaining = Some(left - keep);
                            self.pos = 0;
                            self.cap = keep as usize;
                        } else {
                            if self.probe_status {
                                self.probe_status = false;
                                self.status = super::http::response_status(&self.buf[..n]);
                            }
                            self.pos = 0;
                            self.cap = n;
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.buf[self.pos..self.cap]))
                    .map_err(werr)?;
                if n == 0 {
                    return Poll::Ready(Err(werr(io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.need_flush = true;
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
            if self.eof {
                if self.remaining == Some(0) && !self.end_at_limit {
                    // The request was complete; the agent's side of the
                    // connection is left as it is.
                    ready!(Pin::new(&mut *dst).poll_flush(cx)).map_err(werr)?;
                    return Poll::Ready(Ok(()));
                }
                ready!(Pin::new(&mut *dst).poll_flush(cx)).map_err(werr)?;
                // The peer may already be gone (ENOTCONN); the direction
                // is finished either way.
                let _ = ready!(Pin::new(&mut *dst).poll_shutdown(cx));
                return Poll::Ready(Ok(()));
            }
        }
    }
}
