//! Datagrams in batches: `recvmmsg(2)` fills up to [`BATCH`] slots in one
//! system call and `sendmmsg(2)` sends several to one address in one.
//!
//! The buffers belong to the worker thread, not to a flow or a listener:
//! an idle flow holds none. They are borrowed only inside a synchronous
//! section (never across an `.await`), so a task that moves between
//! threads never finds another's data.

use std::cell::RefCell;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, sendmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrLike,
    SockaddrStorage,
};

/// Whether the kernel takes UDP GSO sends (cleared on the first refusal).
static GSO: AtomicBool = AtomicBool::new(true);

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Largest datagram carried: a jumbo frame (VPC MTU 9001) with room to
/// spare. A longer one arrives truncated and is dropped, counted.
pub const SLOT: usize = 9216;

/// One thread's batch: the buffer, the kernel headers, and what the last
/// `recv` filled in.
///
/// Each set of headers serves one kind of call only: the kernel leaves the
/// source address length of the last datagram in a header and nix does not
/// reset it, so IPv4 and IPv6 receives keep their own, receives on
/// connected sockets read no address at all, and `sendmmsg` (which points
/// the headers at its destinations) has its own.
pub struct Batch {
    buf: Box<[u8]>,
    from_v4: MultiHeaders<SockaddrStorage>,
    from_v6: MultiHeaders<SockaddrStorage>,
    connected: MultiHeaders<()>,
    send: MultiHeaders<SockaddrStorage>,
    slots: Slots,
    to: [Option<SockaddrStorage>; BATCH],
    count: usize,
}

/// What `recvmmsg` filled in, per slot.
struct Slots {
    len: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
    truncated: [bool; BATCH],
}

/// `recvmmsg` into the slots of `buf` with `hdrs`; `addr` reads a source.
fn recv_into<S: SockaddrLike + Copy>(
    fd: RawFd,
    buf: &mut [u8],
    hdrs: &mut MultiHeaders<S>,
    slots: &mut Slots,
    addr: fn(&S) -> Option<SocketAddr>,
) -> io::Result<usize> {
    let mut chunks = buf.chunks_exact_mut(SLOT);
    let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
        std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
    let got = recvmmsg(fd, hdrs, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
        .map_err(io::Error::from)?;
    let mut n = 0;
    for (i, m) in got.enumerate() {
        slots.len[i] = m.bytes;
        slots.truncated[i] = m.flags.contains(MsgFlags::MSG_TRUNC);
        slots.from[i] = m.address.as_ref().and_then(addr);
        n = i + 1;
    }
    Ok(n)
}

thread_local! {
    static SCRATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// Run `f` with this thread's batch (made on first use).
pub fn with_batch<R>(f: impl FnOnce(&mut Batch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => f(slot.get_or_insert_with(Batch::new)),
        // Not reentrant by design; a nested use gets its own.
        Err(_) => f(&mut Batch::new()),
    })
}

impl Batch {
    fn new() -> Batch {
        Batch {
            buf: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            from_v4: MultiHeaders::preallocate(BATCH, None),
            from_v6: MultiHeaders::preallocate(BATCH, None),
            connected: MultiHeaders::preallocate(BATCH, None),
            send: MultiHeaders::preallocate(BATCH, None),
            slots: Slots {
                len: [0; BATCH],
                from: [None; BATCH],
                truncated: [false; BATCH],
            },
            to: [None; BATCH],
            count: 0,
        }
    }

    /// Receive up to [`BATCH`] datagrams and their sources from an
    /// unconnected socket of the given family, without blocking;
    /// `WouldBlock` when none is waiting.
    pub fn recv_from(&mut self, fd: &impl AsRawFd, v6: bool) -> io::Result<usize> {
        let hdrs = if v6 {
            &mut self.from_v6
        } else {
            &mut self.from_v4
        };
        let got = recv_into(
            fd.as_raw_fd(),
            &mut self.buf,
            hdrs,
            &mut self.slots,
            socket_addr,
        );
        self.count = got.as_ref().map_or(0, |&n| n);
        got
    }

    /// Receive up to [`BATCH`] datagrams from a connected socket (its peer
    /// is known), without blocking.
    pub fn recv(&mut self, fd: &impl AsRawFd) -> io::Result<usize> {
        let got = recv_into(
            fd.as_raw_fd(),
            &mut self.buf,
            &mut self.connected,
            &mut self.slots,
            |_: &()| None,
        );
        self.count = got.as_ref().map_or(0, |&n| n);
        got
    }

    /// Datagram `i` of the last `recv`: its bytes, its source (None on a
    /// connected socket the kernel reports none for), and whether it was
    /// cut short.
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>, bool) {
        let start = i * SLOT;
        (
            &self.buf[start..start + self.slots.len[i].min(SLOT)],
            self.slots.from[i],
            self.slots.truncated[i],
        )
    }

    /// Send datagrams `0..n` of the last `recv` to `to` through `fd`,
    /// without blocking; returns how many the kernel took.
    ///
    /// When they all have one size (the last may be shorter) — a burst of
    /// QUIC packets — they leave in one `sendmsg` with UDP GSO: the kernel
    /// carries them as one buffer and cuts it into datagrams at the end of
    /// its path. Otherwise, or where the kernel refuses GSO, `sendmmsg`.
    pub fn send_all_to(&mut self, fd: RawFd, to: SocketAddr, n: usize) -> io::Result<usize> {
        let n = n.min(self.count);
        if n == 0 {
            return Ok(0);
        }
        let size = self.slots.len[0];
        let uniform = n >= 2
            && size > 0
            && self.slots.len[..n - 1].iter().all(|&l| l == size)
            && self.slots.len[n - 1] <= size;
        if uniform && GSO.load(Ordering::Relaxed) {
            let seg = u16::try_from(size).unwrap_or(u16::MAX);
            let mut chunks = self.buf.chunks_exact(SLOT);
            let len = self.slots.len;
            let iovs: [IoSlice<'_>; BATCH] = std::array::from_fn(|i| {
                let chunk = chunks.next().unwrap_or_default();
                IoSlice::new(&chunk[..len[i].min(chunk.len())])
            });
            let addr = SockaddrStorage::from(to);
            let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
            match sendmsg(fd, &iovs[..n], &cmsg, MsgFlags::MSG_DONTWAIT, Some(&addr)) {
                Ok(_) => return Ok(n),
                Err(Errno::EAGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                // No GSO here (an old kernel, or a device without it):
                // batches go out with sendmmsg from now on.
                Err(Errno::EINVAL | Errno::EIO | Errno::ENOPROTOOPT | Errno::EOPNOTSUPP) => {
                    GSO.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let addr = SockaddrStorage::from(to);
        for slot in &mut self.to[..n] {
            *slot = Some(addr);
        }
        let mut chunks = self.buf.chunks_exact(SLOT);
        let len = self.slots.len;
        let iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|i| {
            let chunk = chunks.next().unwrap_or_default();
            [IoSlice::new(&chunk[..len[i].min(chunk.len())])]
        });
        let cmsgs: [ControlMessage<'_>; 0] = [];
        let sent = sendmmsg(
            fd,
            &mut self.send,
            iovs[..n].iter(),
            &self.to[..n],
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        Ok(sent.count())
    }
}

fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())));
    }
    let v6 = s.as_sockaddr_in6()?;
    Some(SocketAddr::V6(SocketAddrV6::new(
        v6.ip(),
        v6.port(),
        v6.flowinfo(),
        v6.scope_id(),
    )))
}
