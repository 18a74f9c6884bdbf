//! One direction of a connection, as a small state machine polled by
//! [`super::run`]: no future per wait, no buffer of its own while idle.
//!
//! The pump alternates between a read side and a write side. Whatever was
//! read — bytes the destination did not take at once (copy mode), or bytes
//! in the pipe (splice mode) — is written out before the next read, so
//! `EAGAIN` on the read side always means "socket not readable" and on the
//! write side "socket not writable", never "pipe full/empty". Readiness
//! comes from tokio's `poll_read_ready`/`poll_write_ready`, polled only
//! after a read or write returned `EAGAIN`.
//!
//! Engines: the splice engine reads in copy mode through the worker's
//! scratch buffer ([`super::copy::relay`], 4 KiB at a time) and switches to
//! splice mode ([`super::splice`]) when a read fills it; the copy engine
//! is the same pump that never splices, 64 KiB at a time.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use nix::errno::Errno;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::{self, Relayed};
use super::splice::{splice_once, Pipe, BACK_TO_COPY, SMALL};
use super::{shutdown_write, Engine, InFlight, Options, PumpError, Side};

/// Chunks moved in one poll before the pump yields to other tasks.
const BUDGET: u32 = 32;

/// One direction: `src` → `dst`.
pub(super) struct Pump<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    sides: (Side, Side),
    count: &'a AtomicU64,
    /// Copy-mode read size.
    chunk: usize,
    pipe_size: usize,
    /// The engine splices, and the kernel has not refused it.
    can_splice: bool,
    /// The kernel refused to splice these sockets (`EINVAL`).
    refused: bool,
    /// No pipe could be made for this burst: copy it in big chunks, and
    /// try again once the source runs dry.
    no_pipe: bool,
    /// Copy mode: bytes the destination did not take yet.
    pending: Vec<u8>,
    /// Splice mode's pipe, and the bytes in it still to write.
    pipe: Option<Pipe>,
    in_pipe: usize,
    /// Consecutive short splices.
    short: u32,
    /// EOF passed on: the direction is finished.
    done: bool,
    /// This poll is a low-latency spin check: read the socket itself, not
    /// tokio's readiness cache (which only epoll updates).
    check: bool,
}

impl<'a> Pump<'a> {
    /// A direction that goes on from `from`: what it holds is written
    /// to `dst` before anything new is read (nothing, for a new
    /// connection).
    pub(super) fn new(
        src: &'a TcpStream,
        dst: &'a TcpStream,
        sides: (Side, Side),
        count: &'a AtomicU64,
        opts: Options,
        from: InFlight,
    ) -> Pump<'a> {
        let splices = opts.engine == Engine::Splice && !from.no_splice;
        let in_pipe = if from.pipe.is_some() { from.in_pipe } else { 0 };
        Pump {
            src,
            dst,
            sides,
            count,
            chunk: if splices { SMALL } else { copy::BULK },
            pipe_size: opts.pipe_size,
            can_splice: splices,
            refused: from.no_splice,
            no_pipe: false,
            pending: from.pending,
            pipe: from.pipe,
            in_pipe,
            short: 0,
            done: from.done,
            check: false,
        }
    }

    /// Stop here and give up what this direction holds: the bytes read
    /// and not yet written (in the buffer or in the pipe), whether it is
    /// finished, whether these sockets can be spliced. Any point between
    /// two polls is safe: every byte read is in one of the two, exactly
    /// once. An empty pipe is closed.
    pub(super) fn pause(self) -> InFlight {
        let pipe = if self.in_pipe > 0 { self.pipe } else { None };
        InFlight {
            pending: self.pending,
            in_pipe: if pipe.is_some() { self.in_pipe } else { 0 },
            pipe,
            done: self.done,
            no_splice: self.refused,
        }
    }

    fn read_err(&self, source: io::Error) -> PumpError {
        PumpError::Read {
            side: self.sides.0,
            source,
        }
    }

    fn write_err(&self, source: io::Error) -> PumpError {
        PumpError::Write {
            side: self.sides.1,
            source,
        }
    }

    /// Move bytes until both sockets would block (Pending), the source
    /// ends (Ready(Ok), writing toward the destination shut down) or a
    /// socket fails.
    /// With `check` (a low-latency spin check), reads go to the socket
    /// even when tokio last saw it not readable.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        check: bool,
    ) -> Poll<Result<(), PumpError>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        self.check = check;
        let mut budget = BUDGET;
        loop {
            // Write side: what was read goes out before the next read.
            if !self.pending.is_empty() {
                match self.dst.try_write(&self.pending) {
                    Ok(n) => {
                        self.count.fetch_add(n as u64, Ordering::Relaxed);
                        self.pending.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(self.dst.poll_write_ready(cx)).map_err(|e| self.write_err(e))?;
                    }
                    Err(e) => return Poll::Ready(Err(self.write_err(e))),
                }
                continue;
            }
            if self.in_pipe > 0 {
                let Some(p) = &self.pipe else {
                    self.in_pipe = 0;
                    continue;
                };
                let left = self.in_pipe;
                match self
                    .dst
                    .try_io(Interest::WRITABLE, || splice_once(&p.read, self.dst, left))
                {
                    Ok(m) => {
                        self.in_pipe -= m;
                        self.count.fetch_add(m as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(self.dst.poll_write_ready(cx)).map_err(|e| self.write_err(e))?;
                    }
                    Err(e) => return Poll::Ready(Err(self.write_err(e))),
                }
                continue;
            }
            if budget == 0 {
                // Other tasks of this worker get their turn.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            budget -= 1;
            // Read side.
            let eof = match &self.pipe {
                None => self.read_copy(cx)?,
                Some(_) if self.short >= BACK_TO_COPY => {
                    // The (empty) pipe is closed: quiet again.
                    self.pipe = None;
                    self.short = 0;
                    continue;
                }
                Some(_) => self.read_splice(cx)?,
            };
            match eof {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(false) => {}
                Poll::Ready(true) => {
                    shutdown_write(self.dst);
                    self.done = true;
                    self.pipe = None;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// Copy mode: one read through the scratch buffer, written at once.
    /// Ready(true) at EOF.
    fn read_copy(&mut self, cx: &mut Context<'_>) -> Result<Poll<bool>, PumpError> {
        match copy::relay(
            self.src,
            self.dst,
            self.chunk,
            &mut self.pending,
            self.count,
            self.sides,
            self.check,
        )? {
            Relayed::Eof => Ok(Poll::Ready(true)),
            Relayed::WouldBlock => {
                copy::release(&mut self.pending);
                if self.no_pipe {
                    self.no_pipe = false;
                    self.chunk = SMALL;
                }
                match self.src.poll_read_ready(cx) {
                    Poll::Pending => Ok(Poll::Pending),
                    Poll::Ready(r) => r.map(|()| Poll::Ready(false)).map_err(|e| self.read_err(e)),
                }
            }
            Relayed::Read(n) => {
                if n == self.chunk && self.can_splice && !self.no_pipe {
                    // Bulk is flowing. Without a pipe (fds or the pipe
                    // quota exhausted), copy this burst 64 KiB at a time
                    // rather than trying again at every read.
                    match Pipe::new(self.pipe_size) {
                        Ok(p) => {
                            self.pipe = Some(p);
                            self.short = 0;
                        }
                        Err(_) => {
                            self.no_pipe = true;
                            self.chunk = copy::BULK;
                        }
                    }
                }
                Ok(Poll::Ready(false))
            }
        }
    }

    /// Splice mode: one splice from the socket into the empty pipe.
    /// Ready(true) at EOF.
    fn read_splice(&mut self, cx: &mut Context<'_>) -> Result<Poll<bool>, PumpError> {
        let Some(p) = &self.pipe else {
            return Ok(Poll::Ready(false));
        };
        let size = self.pipe_size;
        let spliced = if self.check {
            super::spin::check(self.src, || splice_once(self.src, &p.write, size))
        } else {
            self.src
                .try_io(Interest::READABLE, || splice_once(self.src, &p.write, size))
        };
        match spliced {
            Ok(0) => Ok(Poll::Ready(true)),
            Ok(n) => {
                self.in_pipe = n;
                if n < SMALL {
                    self.short += 1;
                } else {
                    self.short = 0;
                }
                Ok(Poll::Ready(false))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.src.poll_read_ready(cx) {
                Poll::Pending => Ok(Poll::Pending),
                Poll::Ready(r) => r.map(|()| Poll::Ready(false)).map_err(|e| self.read_err(e)),
            },
            Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                // These sockets cannot be spliced: copy from now on.
                self.can_splice = false;
                self.refused = true;
                self.pipe = None;
                Ok(Poll::Ready(false))
            }
            Err(e) => Err(self.read_err(e)),
        }
    }
}
