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
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};

use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, sendmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrLike,
    SockaddrStorage,
};

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64
/// on the kernels splicegate runs on; newer ones allow more).
pub const GSO_SEGMENTS: usize = 64;
/// Most bytes in one GSO send: one IPv4 datagram's largest payload
/// (65,535 − 20 − 8), which IPv6 also takes.
pub const GSO_BYTES: usize = 65_507;
/// Largest datagram carried: a jumbo frame (VPC MTU 9001) with room to
/// spare. A longer one arrives truncated and is dropped, counted.
pub const SLOT: usize = 9216;

/// A listener's socket as the flows send through it, and whether it takes
/// UDP GSO sends (cleared for this socket alone when the kernel says it
/// cannot).
#[derive(Debug)]
pub struct Out {
    /// The listener's socket.
    pub sock: tokio::net::UdpSocket,
    /// GSO sends are worth trying.
    pub gso: AtomicBool,
}

impl Out {
    /// `sock`, GSO to be tried.
    pub fn new(sock: tokio::net::UdpSocket) -> Out {
        Out {
            sock,
            gso: AtomicBool::new(true),
        }
    }
}

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

    /// Send datagrams `range` of the last `recv` through `fd` — to `to`,
    /// or to the peer of a connected socket (None) — without blocking;
    /// returns how many the kernel took (`WouldBlock` when none).
    ///
    /// Runs of one size (the last of a run may be shorter) — a burst of
    /// QUIC packets — leave in one `sendmsg` with UDP GSO: the kernel
    /// carries them as one buffer and cuts it into datagrams at the end of
    /// its path. A GSO send holds at most [`GSO_SEGMENTS`] datagrams and
    /// [`GSO_BYTES`] bytes (the kernel's limits: above them the send is
    /// refused, and with it the whole burst). A GSO send the kernel refuses
    /// is sent again as `sendmmsg`; where the kernel says the socket cannot
    /// do GSO at all, `gso` is cleared and that socket sends without it
    /// from then on. Everything else leaves by `sendmmsg`.
    pub fn send(
        &mut self,
        fd: RawFd,
        to: Option<SocketAddr>,
        range: Range<usize>,
        gso: &AtomicBool,
    ) -> io::Result<usize> {
        let end = range.end.min(self.count);
        let mut at = range.start.min(end);
        let mut sent = 0;
        let mut plain_from = at;
        while at < end {
            let run = self.gso_run(at, end);
            if run - at < 2 || !gso.load(Ordering::Relaxed) {
                at = run;
                continue;
            }
            // What came before the run leaves first, in order.
            let m = self.send_plain(fd, to, plain_from..at, &mut sent)?;
            if !m {
                return Ok(sent);
            }
            match self.send_gso(fd, to, at..run) {
                Ok(()) => sent += run - at,
                Err(Errno::EAGAIN) if sent == 0 => return Err(io::ErrorKind::WouldBlock.into()),
                Err(Errno::EAGAIN) => return Ok(sent),
                Err(e) => {
                    if matches!(e, Errno::EIO | Errno::ENOPROTOOPT | Errno::EOPNOTSUPP) {
                        // This socket (its device) has no UDP GSO.
                        gso.store(false, Ordering::Relaxed);
                    }
                    // Refused as one buffer (EINVAL: a segment above the
                    // device's MTU, or a limit): the same datagrams, one
                    // by one in one sendmmsg.
                    if !self.send_plain(fd, to, at..run, &mut sent)? {
                        return Ok(sent);
                    }
                }
            }
            at = run;
            plain_from = run;
        }
        self.send_plain(fd, to, plain_from..end, &mut sent)?;
        if sent == 0 && end > range.start {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(sent)
    }

    /// The end of the GSO run starting at `at`: datagrams of the first
    /// one's size, the last possibly shorter, within the kernel's limits.
    fn gso_run(&self, at: usize, end: usize) -> usize {
        let len = &self.slots.len;
        let size = len[at];
        if size == 0 {
            return at + 1;
        }
        let mut k = at + 1;
        let mut bytes = size;
        while k < end
            && k - at < GSO_SEGMENTS
            && len[k - 1] == size
            && len[k] <= size
            && len[k] > 0
            && bytes + len[k] <= GSO_BYTES
        {
            bytes += len[k];
            k += 1;
        }
        k
    }

    /// `range` in one `sendmsg` with a UDP GSO segment size.
    fn send_gso(
        &self,
        fd: RawFd,
        to: Option<SocketAddr>,
        range: Range<usize>,
    ) -> Result<(), Errno> {
        let size = self.slots.len[range.start];
        let seg = u16::try_from(size).unwrap_or(u16::MAX);
        let mut chunks = self.buf.chunks_exact(SLOT).skip(range.start);
        let len = &self.slots.len[range.clone()];
        let iovs: [IoSlice<'_>; BATCH] = std::array::from_fn(|i| {
            let chunk = chunks.next().unwrap_or_default();
            let l = len.get(i).copied().unwrap_or(0);
            IoSlice::new(&chunk[..l.min(chunk.len())])
        });
        let addr = to.map(SockaddrStorage::from);
        let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
        sendmsg(
            fd,
            &iovs[..range.len()],
            &cmsg,
            MsgFlags::MSG_DONTWAIT,
            addr.as_ref(),
        )
        .map(drop)
    }

    /// `range` in one `sendmmsg`, added to `sent`; false when the kernel
    /// took fewer (a full buffer: the rest is dropped by the caller).
    fn send_plain(
        &mut self,
        fd: RawFd,
        to: Option<SocketAddr>,
        range: Range<usize>,
        sent: &mut usize,
    ) -> io::Result<bool> {
        if range.is_empty() {
            return Ok(true);
        }
        let addr = to.map(SockaddrStorage::from);
        for slot in &mut self.to[..range.len()] {
            *slot = addr;
        }
        let mut chunks = self.buf.chunks_exact(SLOT).skip(range.start);
        let len = &self.slots.len[range.clone()];
        let iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|i| {
            let chunk = chunks.next().unwrap_or_default();
            let l = len.get(i).copied().unwrap_or(0);
            [IoSlice::new(&chunk[..l.min(chunk.len())])]
        });
        let cmsgs: [ControlMessage<'_>; 0] = [];
        let n = range.len();
        match sendmmsg(
            fd,
            &mut self.send,
            iovs[..n].iter(),
            &self.to[..n],
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(r) => {
                let m = r.count();
                *sent += m;
                Ok(m == n)
            }
            Err(Errno::EAGAIN) => Ok(false),
            // A datagram the path refuses (EMSGSIZE) or a destination
            // that is gone: the batch is dropped, counted by the caller.
            Err(
                Errno::EMSGSIZE | Errno::ECONNREFUSED | Errno::EHOSTUNREACH | Errno::ENETUNREACH,
            ) => Ok(false),
            Err(e) => Err(e.into()),
        }
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
