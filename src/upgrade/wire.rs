//! The handover channel between the old and the new process: a Unix
//! `SOCK_SEQPACKET` socketpair, one message per record, each a small JSON
//! header with the descriptors it carries (`SCM_RIGHTS`) and the bytes in
//! flight it names appended after it.
//!
//! A record is `[u32 little-endian JSON length][JSON][bytes]`. Records
//! stay under [`MAX_RECORD`] bytes and [`MAX_FDS`] descriptors (the
//! kernel's `SCM_MAX_FD` is 253), and the sender waits for the receiver's
//! acknowledgement before the next batch, so at most one batch of
//! descriptors is in flight (they count against the sender's
//! `RLIMIT_NOFILE`).

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::inventory::Key;
use crate::session::Info;

/// The protocol's version; a new process that does not speak the old
/// one's refuses the handover before it takes anything.
pub const VERSION: u32 = 1;

/// Largest record, header and bytes together.
pub const MAX_RECORD: usize = 192 * 1024;

/// Most descriptors in one record.
pub const MAX_FDS: usize = 240;

/// The socket buffers asked for (the kernel caps them at
/// `net.core.wmem_max`/`rmem_max`, doubled).
const SOCKET_BUFFER: usize = 1 << 20;

/// One message.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Old → new, first: the listening sockets (one descriptor each, in
    /// order) and where connection ids go on.
    Hello {
        /// [`VERSION`].
        version: u32,
        /// The old process.
        pid: u32,
        /// The new process numbers its connections from here.
        next_id: u64,
        /// The sockets' keys.
        sockets: Vec<Key>,
        /// Agents an operator drained.
        #[serde(default)]
        drained: Vec<String>,
    },
    /// New → old: the configuration loaded, every socket is taken or
    /// bound, and new connections are accepted.
    Ready {
        /// The new process.
        pid: u32,
    },
    /// New → old: it cannot start (the reason names the file, key or
    /// error).
    Failed {
        /// Why.
        reason: String,
    },
    /// Old → new: paused passthrough connections, with their descriptors
    /// (client, agent, then each direction's pipe ends when it holds
    /// bytes) and their bytes in flight appended in order.
    Connections {
        /// Batch number, acknowledged.
        seq: u64,
        /// The connections.
        items: Vec<ConnMeta>,
    },
    /// Old → new: the routed flows of one UDP socket (one descriptor
    /// each: the flow's socket connected to the agent). Sent for every
    /// UDP socket handed over, flows or not.
    Flows {
        /// Batch number, acknowledged.
        seq: u64,
        /// The listener socket they belong to.
        socket: Key,
        /// The flows.
        items: Vec<FlowMeta>,
        /// The socket's last batch: its relay starts reading.
        last: bool,
    },
    /// New → old: the batch is taken; the old process closes its copies.
    Ack {
        /// The batch.
        seq: u64,
    },
    /// Old → new: everything that could move has; what stays with the
    /// old process is counted.
    Done {
        /// Connections handed over.
        connections: u64,
        /// Flows handed over.
        flows: u64,
        /// Sessions that stay with the old process until they end.
        staying: u64,
    },
    /// Old → new: the service manager was told the new process is the
    /// service's main process now.
    Main,
}

/// One paused passthrough connection.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ConnMeta {
    /// What the access log says about it.
    pub info: Info,
    /// Microseconds since it was accepted.
    pub age_us: u64,
    /// Bytes written to the agent so far.
    pub to_agent: u64,
    /// Bytes written to the client so far.
    pub to_client: u64,
    /// Client → agent.
    pub up: DirMeta,
    /// Agent → client.
    pub down: DirMeta,
}

/// One direction of a paused connection.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct DirMeta {
    /// Bytes read and not yet written, in the record's bytes.
    pub pending: usize,
    /// Bytes in the direction's pipe (its two ends follow among the
    /// descriptors); 0: no pipe.
    pub in_pipe: usize,
    /// Writing toward the destination is shut down (EOF passed on).
    pub done: bool,
    /// These sockets cannot be spliced.
    pub no_splice: bool,
}

/// One routed QUIC flow.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct FlowMeta {
    /// What the access log says about it.
    pub info: Info,
    /// The agent's address.
    pub agent: SocketAddr,
    /// Datagrams and bytes each way, and drops.
    pub counts: [u64; 5],
    /// Microseconds since its first datagram.
    pub age_us: u64,
    /// Microseconds since a datagram last moved.
    pub quiet_us: u64,
}

/// A message received, with what it carried.
#[derive(Debug)]
pub struct Received {
    /// The message.
    pub msg: Msg,
    /// Its descriptors, in order.
    pub fds: VecDeque<OwnedFd>,
    /// Its bytes after the header.
    pub bytes: Vec<u8>,
}

/// What went wrong on the channel.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A system call failed.
    #[error("handover channel: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something that is not the protocol.
    #[error("handover channel: {0}")]
    Protocol(String),
    /// The other process closed its end (it exited).
    #[error("handover channel: the other process closed it")]
    Closed,
}

/// One end of the channel. The `SOCK_SEQPACKET` socket is registered
/// with the runtime as a `UnixStream` for its readiness only: every record
/// is sent and received with `sendmsg`/`recvmsg` here, never through the
/// stream's own reads and writes.
pub struct Channel {
    sock: UnixStream,
    buf: Box<[u8]>,
}

/// A connected pair for a new process: (ours, the child's). Both close
/// on exec; the child's end is passed as its standard input, which clears
/// that for the child.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{setsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    for s in [&a, &b] {
        let _ = setsockopt(s, sockopt::SndBuf, &SOCKET_BUFFER);
        let _ = setsockopt(s, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    Ok((a, b))
}

impl Channel {
    /// Serve `fd` (one end of a [`pair`]) on the current runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Channel> {
        use nix::sys::socket::{getsockopt, sockopt::SockType as Type, SockType};
        if getsockopt(&fd, Type)? != SockType::SeqPacket {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a SOCK_SEQPACKET socket",
            ));
        }
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        Ok(Channel {
            sock: UnixStream::from_std(std)?,
            buf: vec![0u8; MAX_RECORD + 4096].into_boxed_slice(),
        })
    }

    /// Send one message with its descriptors and bytes.
    pub async fn send(
        &self,
        msg: &Msg,
        fds: &[BorrowedFd<'_>],
        bytes: &[u8],
    ) -> Result<(), WireError> {
        let json = serde_json::to_vec(msg).map_err(|e| WireError::Protocol(e.to_string()))?;
        if fds.len() > MAX_FDS || 4 + json.len() + bytes.len() > MAX_RECORD {
            return Err(WireError::Protocol(format!(
                "record too large: {} bytes, {} descriptors",
                4 + json.len() + bytes.len(),
                fds.len()
            )));
        }
        let len = (json.len() as u32).to_le_bytes();
        let iov = [IoSlice::new(&len), IoSlice::new(&json), IoSlice::new(bytes)];
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        loop {
            self.sock.writable().await?;
            let sent = self.sock.try_io(Interest::WRITABLE, || {
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("too many descriptors"));
                }
                let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
                sendmsg(&self.sock, &iov, &mut control, flags).map_err(io::Error::from)
            });
            match sent {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if closed(&e) => return Err(WireError::Closed),
                Err(e) => return Err(WireError::Io(e)),
            }
        }
    }

    /// The next message; `None` once the peer closed its end.
    pub async fn recv(&mut self) -> Result<Option<Received>, WireError> {
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS + 16))];
        let (n, fds) = loop {
            self.sock.readable().await?;
            let buf = &mut self.buf;
            let sock = &self.sock;
            let got = sock.try_io(Interest::READABLE, || {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [IoSliceMut::new(buf)];
                let flags = RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC;
                let r = recvmsg(sock.as_fd(), &mut iov, &mut control, flags)?;
                let mut fds = VecDeque::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(got) = m {
                        fds.extend(got);
                    }
                }
                Ok((r, fds))
            });
            match got {
                Ok((r, fds)) => {
                    if r.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
                        return Err(WireError::Protocol(
                            "a record was cut short (too large, or too many descriptors)".into(),
                        ));
                    }
                    break (r.bytes, fds);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // It exited with records unread.
                Err(e) if closed(&e) => return Ok(None),
                Err(e) => return Err(WireError::Io(e)),
            }
        };
        if n == 0 {
            return Ok(None);
        }
        let record = &self.buf[..n];
        let Some((len, rest)) = record.split_first_chunk::<4>() else {
            return Err(WireError::Protocol(format!(
                "a record of {n} bytes has no header"
            )));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(WireError::Protocol(format!(
                "a header of {len} bytes in a record of {n}"
            )));
        }
        let msg = serde_json::from_slice(&rest[..len])
            .map_err(|e| WireError::Protocol(format!("not a handover message: {e}")))?;
        Ok(Some(Received {
            msg,
            fds,
            bytes: rest[len..].to_vec(),
        }))
    }
}

/// The other end is gone.
fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_carry_descriptors_and_bytes() {
        let (a, b) = pair().unwrap();
        let (a, mut b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, b"in the pipe").unwrap();
        let msg = Msg::Ack { seq: 7 };
        a.send(&msg, &[r.as_fd(), w.as_fd()], b"tail")
            .await
            .unwrap();
        drop((r, w));
        let got = b.recv().await.unwrap().unwrap();
        assert!(matches!(got.msg, Msg::Ack { seq: 7 }), "{got:?}");
        assert_eq!(got.bytes, b"tail");
        assert_eq!(got.fds.len(), 2);
        let mut buf = [0u8; 32];
        let n = nix::unistd::read(&got.fds[0], &mut buf).unwrap();
        assert_eq!(&buf[..n], b"in the pipe", "the pipe's bytes came along");
        let too_many: Vec<_> = (0..MAX_FDS + 1).map(|_| got.fds[0].as_fd()).collect();
        assert!(a.send(&msg, &too_many, b"").await.is_err());
        drop(a);
        assert!(b.recv().await.unwrap().is_none(), "closed");
    }
}
