//! Zero-copy engine: `splice(2)` from the source socket into a pipe, then
//! from the pipe into the destination socket. Payload bytes never enter
//! userspace.
//!
//! The pipe is made when the source first becomes readable, so idle
//! connections hold no pipe. Each pump reads only when its pipe is empty
//! and drains it fully before reading again, so `EAGAIN` on the read side
//! always means "socket not readable" and on the write side "socket not
//! writable", never "pipe full/empty".

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{copy, shutdown_write, PumpError, Side};

/// A pipe: (read end, write end).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
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

/// Splice `src` → `dst` until EOF, then shut down writing on `dst`. Falls
/// back to the copy engine when no pipe can be made (fd exhaustion) or the
/// kernel refuses to splice these sockets.
pub async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    (from, to): (Side, Side),
    pipe_size: usize,
    count: &AtomicU64,
) -> Result<(), PumpError> {
    let read_err = |source| PumpError::Read { side: from, source };
    let write_err = |source| PumpError::Write { side: to, source };
    src.readable().await.map_err(read_err)?;
    let Ok(pipe) = Pipe::new(pipe_size) else {
        return copy::pump(src, dst, (from, to), count).await;
    };
    let mut first = true;
    loop {
        let n = loop {
            match src.try_io(Interest::READABLE, || {
                splice_once(src, &pipe.write, pipe_size)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.readable().await.map_err(read_err)?
                }
                Err(e) if first && e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                    return copy::pump(src, dst, (from, to), count).await;
                }
                Err(e) => return Err(read_err(e)),
            }
        };
        first = false;
        if n == 0 {
            break;
        }
        let mut left = n;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || splice_once(&pipe.read, dst, left)) {
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
    }
    shutdown_write(dst);
    Ok(())
}
