//! Userspace copy, for the copy engine and the splice engine's small
//! messages: read into a buffer, write it out. Each chunk is copied twice
//! (kernel → buffer → kernel).
//!
//! The buffer is not the connection's: `relay` reads into a scratch
//! buffer of the worker thread and writes it out before returning, so an
//! idle connection holds no buffer at all. Only bytes the destination
//! cannot take at once (its socket buffer is full) are kept, in a buffer
//! owned by the direction; it is reused while data flows and freed when
//! the source runs dry.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;

use super::{PumpError, Side};

/// Scratch size of the copy engine. Small buffers cost throughput badly;
/// 64 KiB matches a default pipe.
pub const BULK: usize = 64 * 1024;

thread_local! {
    /// One scratch buffer per worker thread, shared by every connection
    /// it runs: a read and the writes that follow it happen without a
    /// suspension point in between.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BULK].into_boxed_slice());
}

/// What one [`relay`] did.
pub(super) enum Relayed {
    /// The source has nothing now.
    WouldBlock,
    /// The source reached EOF.
    Eof,
    /// Read this many bytes; all written, or the rest kept in `pending`.
    Read(usize),
}

/// Read at most `max` bytes from `src` into the thread's scratch buffer
/// and write them to `dst` at once. What `dst` does not take is appended
/// to `pending` (allocated only then), for the caller to write after
/// waiting for `dst` to be writable. With `check` (a low-latency spin
/// check) the read goes to the socket even when tokio's readiness cache
/// says it is not readable.
pub(super) fn relay(
    src: &TcpStream,
    dst: &TcpStream,
    max: usize,
    pending: &mut Vec<u8>,
    count: &AtomicU64,
    (from, to): (Side, Side),
    check: bool,
) -> Result<Relayed, PumpError> {
    SCRATCH.with_borrow_mut(|buf| {
        let buf = &mut buf[..max.min(BULK)];
        let read = if check {
            let recv = |b: &mut [u8]| io::Read::read(&mut &*socket2::SockRef::from(src), b);
            super::spin::check(src, || recv(&mut *buf))
        } else {
            src.try_read(buf)
        };
        let n = match read {
            Ok(0) => return Ok(Relayed::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Relayed::WouldBlock),
            Err(source) => return Err(PumpError::Read { side: from, source }),
        };
        let mut sent = 0;
        while sent < n {
            match dst.try_write(&buf[sent..n]) {
                Ok(m) => {
                    sent += m;
                    count.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(source) => return Err(PumpError::Write { side: to, source }),
            }
        }
        pending.extend_from_slice(&buf[sent..n]);
        Ok(Relayed::Read(n))
    })
}

/// The source ran dry: free the pending buffer, if any, so a quiet
/// connection holds none.
pub(super) fn release(pending: &mut Vec<u8>) {
    if pending.capacity() > 0 {
        *pending = Vec::new();
    }
}
