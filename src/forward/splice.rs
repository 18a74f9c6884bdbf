//! The splice engine's mechanism: pipes out of a process-wide budget, and
//! one `splice(2)` call.
//!
//! Each direction starts in *copy mode*: `read` up to 4 KiB into the
//! worker thread's scratch buffer and `write` it at once (see
//! [`super::copy`]; an idle connection holds no buffer). For the small
//! messages of an interactive session (DCV input events, WebSocket
//! keepalives) two plain syscalls are cheaper than two `splice` calls
//! through a pipe. When a read fills the whole buffer, bulk data is flowing
//! (a video frame): the direction switches to *splice mode*, making a pipe
//! (sized with `F_SETPIPE_SZ`) and moving bytes socket → pipe → socket
//! without copying them through userspace. After [`BACK_TO_COPY`] short
//! splices in a row it returns to copy mode and closes the pipe, so quiet
//! connections hold no pipe fds. If no pipe can be made (fd exhaustion) or
//! the kernel refuses to splice these sockets, the direction stays in copy
//! mode. The state machine is `forward::pump`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

/// Copy-mode read size. A read that fills it switches to splice mode.
pub(super) const SMALL: usize = 4096;
/// Consecutive splices shorter than the 4 KiB copy buffer that return to
/// copy mode.
pub const BACK_TO_COPY: u32 = 8;

/// The pipe size tried when a larger configured one is refused.
const FALLBACK_PIPE: usize = 256 * 1024;

/// Smallest pipe worth splicing through.
const MIN_PIPE: usize = 64 * 1024;

/// Pipes that may still be made, process-wide (see [`set_pipe_budget`]).
static PIPES_FREE: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Set how many splice pipes may exist at once, so pipes never take the
/// descriptors a new connection needs for its agent. A direction that
/// finds none free keeps copying. Unlimited until set.
pub fn set_pipe_budget(pipes: usize) {
    PIPES_FREE.store(pipes, Ordering::Release);
}

/// A splice pipe: (read end, write end), counted against the budget.
#[derive(Debug)]
pub struct Pipe {
    pub(super) read: OwnedFd,
    pub(super) write: OwnedFd,
    /// Took a share of the budget (an adopted pipe may not have found one).
    counted: bool,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if self.counted {
            PIPES_FREE.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Pipe {
    /// A pipe received from the previous process of a live upgrade, with
    /// the bytes it holds. It takes a share of the budget if one is free;
    /// it is used either way (its bytes must be written).
    pub fn adopt(read: OwnedFd, write: OwnedFd) -> Pipe {
        let counted = PIPES_FREE
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        Pipe {
            read,
            write,
            counted,
        }
    }

    /// The two ends (read, write), to hand to a new process.
    pub fn ends(&self) -> (std::os::fd::BorrowedFd<'_>, std::os::fd::BorrowedFd<'_>) {
        (self.read.as_fd(), self.write.as_fd())
    }

    /// A pipe of about `size` bytes, if the budget and the kernel allow.
    pub(super) fn new(size: usize) -> io::Result<Pipe> {
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
        // Larger pipes move more per syscall. A size above fs.pipe-max-size
        // fails with EPERM, and so does any growth once the user's pipes
        // pass fs.pipe-user-pages-soft (64 MiB by default): then a smaller
        // size is tried. A pipe that stays under MIN_PIPE is not worth
        // splicing through; the direction copies instead.
        let set = |want: usize| {
            let want = i32::try_from(want).unwrap_or(i32::MAX);
            fcntl(&write, FcntlArg::F_SETPIPE_SZ(want)).is_ok()
        };
        if !set(size) && FALLBACK_PIPE < size {
            set(FALLBACK_PIPE);
        }
        let got = fcntl(&write, FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
        let pipe = Pipe {
            read,
            write,
            counted: true,
        };
        if usize::try_from(got).unwrap_or(0) < MIN_PIPE {
            return Err(io::Error::from_raw_os_error(Errno::EPERM as i32));
        }
        Ok(pipe)
    }
}

/// One non-blocking splice of at most `len` bytes.
pub(super) fn splice_once(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
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
