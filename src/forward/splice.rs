//! Zero-copy engine with a small-message path.
//!
//! Each direction starts in *copy mode*: `read` into a 4 KiB buffer and
//! `write`. For the small messages of an interactive session (DCV input
//! events, WebSocket keepalives) two plain syscalls are cheaper than two
//! `splice` calls through a pipe. When a read fills the whole buffer, bulk
//! data is flowing (a video frame): the direction switches to *splice mode*,
//! making a pipe (sized with `F_SETPIPE_SZ`) and moving bytes
//! socket → pipe → socket without copying them through userspace. After
//! [`BACK_TO_COPY`] short splices in a row it returns to copy mode and closes
//! the pipe, so quiet connections hold no pipe fds.
//!
//! In splice mode a pump reads only when its pipe is empty and drains it
//! fully before reading again, so `EAGAIN` on the read side always means
//! "socket not readable" and on the write side "socket not writable", never
//! "pipe full/empty". If no pipe can be made (fd exhaustion) or the kernel
//! refuses to splice these sockets, the direction stays in copy mode.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{copy, shutdown_write, PumpError, Side};

/// Copy-mode buffer. A read that fills it switches to splice mode.
const SMALL: usize = 4096;
/// Consecutive splices shorter than the 4 KiB copy buffer that return to
/// copy mode.
pub const BACK_TO_COPY: u32 = 8;

/// Pipes that may still be made, process-wide (see [`set_pipe_budget`]).
static PIPES_FREE: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Set how many splice pipes may exist at once, so pipes never take the
/// descriptors a new connection needs for its agent. A direction that
/// finds none free keeps copying. Unlimited until set.
pub fn set_pipe_budget(pipes: usize) {
    PIPES_FREE.store(pipes, Ordering::Release);
}

/// A pipe: (read end, write end).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES_FREE.fetch_add(1, Ordering::AcqRel);
    }
}

impl Pipe {
    fn new(size: usize) -> io::Result<Pipe> {
        PIPES_FREE
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .map_err(|_| io::Error::from_raw_os_error(Errno::EMFILE as i32))?;
        let (read, write) = match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                PIPES_FREE.fetch_add(1, Ordering::AcqRel);
                return Err(e.into());
            }
        };
        // Larger pipes move more per syscall. A size above the system's
        // fs.pipe-max-size fails with EPERM; the default size still works.
        let _ = fcntl(
            &write,
            FcntlArg::F_SETPIPE_SZ(size.min(i32::MAX as usize) as i32),
        );
        Ok(Pipe { read, write })
    }
}

fn splice_once(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
    )
    .map_err(io::Error::from)
}

/// Move `src` → `dst` until EOF, then shut down writing on `dst`.
pub async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    (from, to): (Side, Side),
    pipe_size: usize,
    count: &AtomicU64,
) -> Result<(), PumpError> {
    let read_err = |source| PumpError::Read { side: from, source };
    let write_err = |source| PumpError::Write { side: to, source };
    let mut buf: Vec<u8> = Vec::new();
    let mut pipe: Option<Pipe> = None;
    let mut can_splice = true;
    let mut short = 0u32;
    loop {
        let Some(p) = &pipe else {
            // Copy mode.
            src.readable().await.map_err(read_err)?;
            if buf.is_empty() {
                buf = vec![0u8; SMALL];
            }
            let n = match src.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(read_err(e)),
            };
            copy::write_all(dst, &buf[..n], count)
                .await
                .map_err(write_err)?;
            if n == SMALL && can_splice {
                // Out of fds: keep copying; retry at the next full read.
                if let Ok(p) = Pipe::new(pipe_size) {
                    pipe = Some(p);
                    short = 0;
                }
            }
            continue;
        };
        // Splice mode.
        let n = loop {
            match src.try_io(Interest::READABLE, || splice_once(src, &p.write, pipe_size)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.readable().await.map_err(read_err)?
                }
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                    // These sockets cannot be spliced: copy from now on.
                    can_splice = false;
                    break usize::MAX;
                }
                Err(e) => return Err(read_err(e)),
            }
        };
        if n == usize::MAX {
            pipe = None;
            continue;
        }
        if n == 0 {
            break;
        }
        let mut left = n;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || splice_once(&p.read, dst, left)) {
                Ok(m) => {
                    left -= m;
                    count.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable().await.map_err(write_err)?
                }
                Err(e) => return Err(write_err(e)),
            }
        }
        if n < SMALL {
            short += 1;
            if short >= BACK_TO_COPY {
                // The pipe is empty: close it and go back to copy mode.
                pipe = None;
            }
        } else {
            short = 0;
        }
    }
    shutdown_write(dst);
    Ok(())
}
