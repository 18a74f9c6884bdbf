//! An io_uring forwarding engine, built only with the `uring` feature to
//! measure it against the splice engine (docs/performance.md has the
//! verdict); not in the shipped binary.
//!
//! One ring thread serves every connection handed to it. A connection
//! gives it duplicates of its two sockets, so the ring's operations never
//! outlive the descriptors they name; cancelling (idle timeout, drain) is a
//! `shutdown(2)` of the sockets, which completes whatever is pending.
//!
//! Two ways to move bytes, `engine = "uring"` (receive/send) and
//! `"uring-splice"`:
//! - receive/send: a `RECV` per direction waits with no buffer of its own
//!   (`IOSQE_BUFFER_SELECT` takes one of 64 KiB from a shared group of
//!   512 when data arrives), a `SEND` writes it out, and the buffer is
//!   given back (`PROVIDE_BUFFERS`, linked before the next `RECV`);
//! - splice: `SPLICE` socket → pipe, then pipe → socket, per direction,
//!   with a pipe held for the connection's life. The sockets are
//!   non-blocking (tokio's), so each splice is linked after a `POLL_ADD`
//!   that waits for readiness.
//!
//! This module is the crate's only `unsafe` code: io_uring entries carry
//! raw pointers and descriptors the kernel uses after submission. Every
//! buffer lives in the ring thread's pool for the process's life, and every
//! descriptor in the connection's entry until its operations completed.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::{idle, Counters, End, Engine, Options, PumpError, Side};
use crate::shutdown::{Halt, Stop};

const BUF_SIZE: usize = 64 * 1024;
const NBUFS: u16 = 512;
const GROUP: u16 = 7;
const ENTRIES: u32 = 4096;

const OP_EVENT: u64 = 0;
const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
const OP_PROVIDE: u64 = 3;
const OP_SPLICE_IN: u64 = 4;
const OP_SPLICE_OUT: u64 = 5;
const OP_POLL: u64 = 6;

fn tag(slot: usize, dir: usize, op: u64, bid: u16) -> u64 {
    ((slot as u64) << 32) | ((dir as u64) << 24) | (op << 16) | u64::from(bid)
}

fn untag(t: u64) -> (usize, usize, u64, u16) {
    (
        (t >> 32) as usize,
        ((t >> 24) & 1) as usize,
        (t >> 16) & 0xff,
        (t & 0xffff) as u16,
    )
}

/// A connection handed to the ring.
struct Job {
    /// Client and agent, duplicated.
    fds: [OwnedFd; 2],
    splice: bool,
    pipe_size: usize,
    counters: Arc<Counters>,
    done: oneshot::Sender<Result<(), PumpError>>,
}

struct Handle {
    queue: Mutex<Vec<Job>>,
    event: OwnedFd,
}

static RING: OnceLock<Result<Handle, String>> = OnceLock::new();

fn handle() -> Result<&'static Handle, String> {
    RING.get_or_init(|| {
        let event =
            nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
                .map_err(|e| format!("eventfd: {e}"))?;
        let event: OwnedFd = event.into();
        let thread_event = event.try_clone().map_err(|e| e.to_string())?;
        let ring = IoUring::new(ENTRIES).map_err(|e| format!("io_uring: {e}"))?;
        std::thread::Builder::new()
            .name("splicegate-uring".into())
            .spawn(move || Ring::new(ring, thread_event).run())
            .map_err(|e| e.to_string())?;
        Ok(Handle {
            queue: Mutex::new(Vec::new()),
            event,
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Forward with io_uring until the connection ends; as [`super::run`].
pub(super) async fn run(
    client: &TcpStream,
    agent: &TcpStream,
    opts: Options,
    stop: &Stop,
    counters: &Arc<Counters>,
) -> End {
    let failed = |source: io::Error| {
        End::Failed(PumpError::Read {
            side: Side::Client,
            source,
        })
    };
    let ring = match handle() {
        Ok(h) => h,
        Err(e) => return failed(io::Error::other(e)),
    };
    let (Ok(c), Ok(a)) = (
        client.as_fd().try_clone_to_owned(),
        agent.as_fd().try_clone_to_owned(),
    ) else {
        return failed(io::Error::last_os_error());
    };
    let (tx, rx) = oneshot::channel();
    let job = Job {
        fds: [c, a],
        splice: opts.engine == Engine::UringSplice,
        pipe_size: opts.pipe_size,
        counters: Arc::clone(counters),
        done: tx,
    };
    ring.queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(job);
    let _ = nix::unistd::write(&ring.event, &1u64.to_ne_bytes());
    let cancel = || {
        for s in [client, agent] {
            let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Both);
        }
    };
    let (up, down) = (&counters.to_agent, &counters.to_client);
    tokio::pin!(rx);
    tokio::select! {
        r = &mut rx => match r {
            Ok(Ok(())) => End::Done,
            Ok(Err(e)) => End::Failed(e),
            Err(_) => failed(io::Error::other("the io_uring thread ended")),
        },
        d = idle(opts.idle_timeout, up, down) => {
            cancel();
            let _ = rx.await;
            End::Idle(d)
        }
        // The ring owns its own descriptors: such a session cannot move
        // to a new process, and only a close or the deadline stop it.
        h = stop.wait_final() => {
            cancel();
            let _ = rx.await;
            match h {
                Halt::Close => End::Closed,
                _ => End::Drained,
            }
        }
    }
}

/// One direction in the ring thread.
#[derive(Default)]
struct Dir {
    finished: bool,
    /// Receive/send: the buffer being sent, its length and what is sent.
    sending: Option<(u16, u32, u32)>,
    /// Splice: the pipe and the bytes in it.
    pipe: Option<(OwnedFd, OwnedFd)>,
    in_pipe: u32,
}

struct Conn {
    job: Job,
    dirs: [Dir; 2],
    inflight: u32,
    error: Option<PumpError>,
}

struct Ring {
    ring: IoUring,
    event: OwnedFd,
    event_buf: [u8; 8],
    pool: Vec<u8>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Receives that found no buffer, to retry once one is given back.
    starved: Vec<(usize, usize)>,
}

impl Ring {
    fn new(ring: IoUring, event: OwnedFd) -> Ring {
        Ring {
            ring,
            event,
            event_buf: [0; 8],
            pool: vec![0u8; BUF_SIZE * usize::from(NBUFS)],
            conns: Vec::new(),
            free: Vec::new(),
            starved: Vec::new(),
        }
    }

    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every pointer in `e` points into `self.pool` or
        // `self.event_buf`, which live as long as the ring, and every
        // descriptor belongs to a connection kept until its operations
        // complete.
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            let _ = self.ring.submit();
        }
    }

    fn buf(&mut self, bid: u16) -> *mut u8 {
        // In bounds: bid < NBUFS.
        self.pool[usize::from(bid) * BUF_SIZE..].as_mut_ptr()
    }

    fn run(mut self) {
        let all = self.pool.as_mut_ptr();
        self.push(
            opcode::ProvideBuffers::new(all, BUF_SIZE as i32, NBUFS, GROUP, 0)
                .build()
                .user_data(tag(0, 0, OP_PROVIDE, 0)),
        );
        self.arm_event();
        loop {
            if self.ring.submit_and_wait(1).is_err() {
                continue;
            }
            let done: Vec<(u64, i32, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (t, res, flags) in done {
                self.complete(t, res, flags);
            }
        }
    }

    fn arm_event(&mut self) {
        let fd = types::Fd(self.event.as_raw_fd());
        let buf = self.event_buf.as_mut_ptr();
        self.push(
            opcode::Read::new(fd, buf, 8)
                .build()
                .user_data(tag(0, 0, OP_EVENT, 0)),
        );
    }

    fn complete(&mut self, t: u64, res: i32, flags: u32) {
        let (slot, dir, op, bid) = untag(t);
        match op {
            OP_EVENT => {
                self.take_jobs();
                self.arm_event();
            }
            OP_PROVIDE => {
                for (slot, dir) in std::mem::take(&mut self.starved) {
                    self.dec(slot);
                    self.recv(slot, dir);
                }
            }
            _ => {
                if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                    c.inflight -= 1;
                } else {
                    return;
                }
                match op {
                    OP_RECV => self.on_recv(slot, dir, res, flags),
                    OP_SEND => self.on_send(slot, dir, res, bid),
                    OP_SPLICE_IN => self.on_splice_in(slot, dir, res),
                    OP_SPLICE_OUT => self.on_splice_out(slot, dir, res),
                    // A linked poll: its splice reports.
                    _ => {}
                }
                self.maybe_finish(slot);
            }
        }
    }

    fn dec(&mut self, slot: usize) {
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            c.inflight -= 1;
        }
    }

    fn take_jobs(&mut self) {
        let jobs = match RING.get() {
            Some(Ok(h)) => std::mem::take(&mut *h.queue.lock().unwrap_or_else(|p| p.into_inner())),
            _ => Vec::new(),
        };
        for job in jobs {
            let splice = job.splice;
            let pipe_size = job.pipe_size;
            let conn = Conn {
                job,
                dirs: [Dir::default(), Dir::default()],
                inflight: 0,
                error: None,
            };
            let slot = match self.free.pop() {
                Some(s) => {
                    self.conns[s] = Some(conn);
                    s
                }
                None => {
                    self.conns.push(Some(conn));
                    self.conns.len() - 1
                }
            };
            for dir in 0..2 {
                if splice {
                    match pipe(pipe_size) {
                        Ok(p) => {
                            if let Some(c) = self.conns[slot].as_mut() {
                                c.dirs[dir].pipe = Some(p);
                            }
                            self.splice_in(slot, dir);
                        }
                        Err(e) => self.fail(slot, dir, e, true),
                    }
                } else {
                    self.recv(slot, dir);
                }
            }
            self.maybe_finish(slot);
        }
    }

    fn fds(&self, slot: usize, dir: usize) -> Option<(RawFd, RawFd)> {
        let c = self.conns.get(slot)?.as_ref()?;
        Some((c.job.fds[dir].as_raw_fd(), c.job.fds[1 - dir].as_raw_fd()))
    }

    fn recv(&mut self, slot: usize, dir: usize) {
        let Some((src, _)) = self.fds(slot, dir) else {
            return;
        };
        if let Some(c) = self.conns[slot].as_mut() {
            c.inflight += 1;
        }
        self.push(
            opcode::Recv::new(types::Fd(src), std::ptr::null_mut(), BUF_SIZE as u32)
                .buf_group(GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(tag(slot, dir, OP_RECV, 0)),
        );
    }

    fn send(&mut self, slot: usize, dir: usize, bid: u16, from: u32, len: u32) {
        let Some((_, dst)) = self.fds(slot, dir) else {
            return;
        };
        if let Some(c) = self.conns[slot].as_mut() {
            c.inflight += 1;
            c.dirs[dir].sending = Some((bid, len, from));
        }
        // SAFETY (pointer arithmetic): from < len <= BUF_SIZE.
        let p = unsafe { self.buf(bid).add(from as usize) };
        self.push(
            opcode::Send::new(types::Fd(dst), p, len - from)
                .build()
                .user_data(tag(slot, dir, OP_SEND, bid)),
        );
    }

    fn on_recv(&mut self, slot: usize, dir: usize, res: i32, flags: u32) {
        if res <= 0 {
            if let Some(bid) = cqueue::buffer_select(flags) {
                self.give_back(bid);
            }
        }
        if res == -nix::libc::ENOBUFS {
            if let Some(c) = self.conns[slot].as_mut() {
                c.inflight += 1;
            }
            self.starved.push((slot, dir));
            return;
        }
        if res <= 0 {
            return self.eof_or_error(slot, dir, res, true);
        }
        match cqueue::buffer_select(flags) {
            Some(bid) => self.send(slot, dir, bid, 0, res as u32),
            None => self.fail(slot, dir, io::Error::other("no buffer selected"), true),
        }
    }

    fn on_send(&mut self, slot: usize, dir: usize, res: i32, bid: u16) {
        if res < 0 {
            self.give_back(bid);
            return self.fail(slot, dir, io::Error::from_raw_os_error(-res), false);
        }
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        let count = if dir == 0 {
            &c.job.counters.to_agent
        } else {
            &c.job.counters.to_client
        };
        count.fetch_add(res as u64, Ordering::Relaxed);
        let Some((bid, len, from)) = c.dirs[dir].sending.take() else {
            return;
        };
        let sent = from + res as u32;
        if sent < len {
            return self.send(slot, dir, bid, sent, len);
        }
        self.give_back(bid);
        self.recv(slot, dir);
    }

    fn give_back(&mut self, bid: u16) {
        let p = self.buf(bid);
        self.push(
            opcode::ProvideBuffers::new(p, BUF_SIZE as i32, 1, GROUP, bid)
                .build()
                .user_data(tag(0, 0, OP_PROVIDE, 0)),
        );
    }

    fn splice_in(&mut self, slot: usize, dir: usize) {
        let Some((src, _)) = self.fds(slot, dir) else {
            return;
        };
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        let Some((_, w)) = &c.dirs[dir].pipe else {
            return;
        };
        let w = w.as_raw_fd();
        let size = c.job.pipe_size as u32;
        c.inflight += 2;
        self.push(
            opcode::PollAdd::new(types::Fd(src), nix::libc::POLLIN as u32)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(tag(slot, dir, OP_POLL, 0)),
        );
        self.push(
            opcode::Splice::new(types::Fd(src), -1, types::Fd(w), -1, size)
                .flags(nix::libc::SPLICE_F_MOVE)
                .build()
                .user_data(tag(slot, dir, OP_SPLICE_IN, 0)),
        );
    }

    fn splice_out(&mut self, slot: usize, dir: usize) {
        self.splice_out_after(slot, dir, false);
    }

    /// Splice the pipe out to the destination; after a `POLL_ADD` for
    /// writability when the last try found it full.
    fn splice_out_after(&mut self, slot: usize, dir: usize, poll: bool) {
        let Some((_, dst)) = self.fds(slot, dir) else {
            return;
        };
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        let d = &c.dirs[dir];
        let Some((r, _)) = &d.pipe else {
            return;
        };
        let (r, n) = (r.as_raw_fd(), d.in_pipe);
        c.inflight += 1;
        if poll {
            c.inflight += 1;
            self.push(
                opcode::PollAdd::new(types::Fd(dst), nix::libc::POLLOUT as u32)
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(tag(slot, dir, OP_POLL, 0)),
            );
        }
        self.push(
            opcode::Splice::new(types::Fd(r), -1, types::Fd(dst), -1, n)
                .flags(nix::libc::SPLICE_F_MOVE)
                .build()
                .user_data(tag(slot, dir, OP_SPLICE_OUT, 0)),
        );
    }

    fn on_splice_in(&mut self, slot: usize, dir: usize, res: i32) {
        if res == -nix::libc::EAGAIN {
            return self.splice_in(slot, dir);
        }
        if res <= 0 {
            return self.eof_or_error(slot, dir, res, true);
        }
        if let Some(c) = self.conns[slot].as_mut() {
            c.dirs[dir].in_pipe = res as u32;
        }
        self.splice_out(slot, dir);
    }

    fn on_splice_out(&mut self, slot: usize, dir: usize, res: i32) {
        if res == -nix::libc::EAGAIN {
            return self.splice_out_after(slot, dir, true);
        }
        if res <= 0 {
            let e = if res == 0 {
                io::Error::from(io::ErrorKind::WriteZero)
            } else {
                io::Error::from_raw_os_error(-res)
            };
            return self.fail(slot, dir, e, false);
        }
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        let count = if dir == 0 {
            &c.job.counters.to_agent
        } else {
            &c.job.counters.to_client
        };
        count.fetch_add(res as u64, Ordering::Relaxed);
        let d = &mut c.dirs[dir];
        d.in_pipe -= res as u32;
        if d.in_pipe > 0 {
            self.splice_out(slot, dir);
        } else {
            self.splice_in(slot, dir);
        }
    }

    /// A read ended: EOF (shut down writing toward the other side) or an
    /// error.
    fn eof_or_error(&mut self, slot: usize, dir: usize, res: i32, read: bool) {
        if res < 0 {
            return self.fail(slot, dir, io::Error::from_raw_os_error(-res), read);
        }
        let Some((_, dst)) = self.fds(slot, dir) else {
            return;
        };
        let _ = nix::sys::socket::shutdown(dst, nix::sys::socket::Shutdown::Write);
        if let Some(c) = self.conns[slot].as_mut() {
            c.dirs[dir].finished = true;
        }
    }

    /// A direction failed: record it and stop the other direction too.
    fn fail(&mut self, slot: usize, dir: usize, source: io::Error, read: bool) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        let sides = if dir == 0 {
            (Side::Client, Side::Agent)
        } else {
            (Side::Agent, Side::Client)
        };
        if c.error.is_none() {
            c.error = Some(if read {
                PumpError::Read {
                    side: sides.0,
                    source,
                }
            } else {
                PumpError::Write {
                    side: sides.1,
                    source,
                }
            });
        }
        c.dirs[dir].finished = true;
        for fd in &c.job.fds {
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
    }

    fn maybe_finish(&mut self, slot: usize) {
        let Some(c) = self.conns.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let over = c.dirs.iter().all(|d| d.finished) || c.error.is_some();
        if c.inflight > 0 || !over {
            return;
        }
        if let Some(c) = self.conns[slot].take() {
            let result = c.error.map_or(Ok(()), Err);
            let _ = c.job.done.send(result);
            self.free.push(slot);
        }
    }
}

fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let _ = fcntl(
        &w,
        FcntlArg::F_SETPIPE_SZ(size.min(i32::MAX as usize) as i32),
    );
    Ok((r, w))
}
