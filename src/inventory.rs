//! Every listening socket the process serves, TCP and UDP alike, with the
//! admin listener and the control socket: one inventory that everything
//! which binds goes through and that a live upgrade walks.
//!
//! A socket is known by its [`Key`]: what it is for, the address (or path)
//! the configuration names, and its position among the sockets of that
//! kind and address. A new process started by a live upgrade receives the
//! old one's sockets with their keys; when its configuration asks for a
//! socket with the same key it takes that one — the same socket, never
//! closed and bound again, so no connection waiting in its accept queue or
//! datagram in its buffer is lost — and binds only what is new.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use socket2::{Domain, Protocol, Socket, Type};

/// What a listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A `[[listener]]` address.
    Tcp,
    /// A `[[udp_listener]]` address.
    Udp,
    /// The admin listener.
    Admin,
    /// The control socket.
    Control,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Tcp => "tcp",
            Kind::Udp => "udp",
            Kind::Admin => "admin",
            Kind::Control => "control",
        })
    }
}

/// A listening socket's identity across a live upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Key {
    /// What it is for.
    pub kind: Kind,
    /// The address (or control socket path) as the configuration names it
    /// (`0.0.0.0:8443`; port 0 stays 0).
    pub addr: String,
    /// Its position among the sockets of this kind and address.
    pub index: u32,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.addr)?;
        if self.index > 0 {
            write!(f, " #{}", self.index)?;
        }
        Ok(())
    }
}

/// The process's listening sockets.
#[derive(Debug, Default)]
pub struct Inventory {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// A duplicate of every socket this process serves, to hand over.
    held: Vec<(Key, OwnedFd)>,
    /// Sockets received from the previous process, not taken yet.
    inherited: HashMap<Key, OwnedFd>,
}

/// Where a socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Bound by this process.
    Bound,
    /// Received from the previous process of a live upgrade.
    Inherited,
}

impl Inventory {
    /// An inventory that starts with the sockets a previous process handed
    /// over (none for a fresh start).
    pub fn new(inherited: Vec<(Key, OwnedFd)>) -> Inventory {
        Inventory {
            inner: Mutex::new(Inner {
                held: Vec::new(),
                inherited: inherited.into_iter().collect(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next key of this kind and address, and the inherited socket it
    /// names, if any.
    fn claim(&self, kind: Kind, addr: String) -> (Key, Option<OwnedFd>) {
        let mut g = self.lock();
        let index = g
            .held
            .iter()
            .filter(|(k, _)| k.kind == kind && k.addr == addr)
            .count() as u32;
        let key = Key { kind, addr, index };
        let fd = g.inherited.remove(&key);
        (key, fd)
    }

    fn hold(&self, key: Key, sock: impl AsFd) -> io::Result<()> {
        let dup = sock.as_fd().try_clone_to_owned()?;
        self.lock().held.push((key, dup));
        Ok(())
    }

    /// A TCP listening socket for `addr`: the inherited one, with its
    /// backlog set again, or a new one (SO_REUSEADDR always, SO_REUSEPORT
    /// on request, IPV6_V6ONLY for IPv6).
    pub fn tcp(
        &self,
        kind: Kind,
        addr: SocketAddr,
        backlog: u32,
        reuse_port: bool,
    ) -> io::Result<(std::net::TcpListener, Origin)> {
        let (key, fd) = self.claim(kind, addr.to_string());
        let backlog = backlog.min(i32::MAX as u32) as i32;
        let (sock, origin) = match fd {
            Some(fd) => {
                let s = Socket::from(fd);
                check(&s, Type::STREAM, addr, &key)?;
                // listen(2) on a listening socket sets its backlog again.
                s.listen(backlog)?;
                s.set_nonblocking(true)?;
                (s, Origin::Inherited)
            }
            None => {
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                s.set_reuse_address(true)?;
                if reuse_port {
                    s.set_reuse_port(true)?;
                }
                if addr.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                s.set_nonblocking(true)?;
                s.set_cloexec(true)?;
                s.bind(&addr.into())?;
                s.listen(backlog)?;
                (s, Origin::Bound)
            }
        };
        self.hold(key, &sock)?;
        Ok((sock.into(), origin))
    }

    /// A UDP socket for the configured address `addr`, bound at `at`
    /// (`addr` itself, or the port the first of its sockets got when `addr`
    /// names port 0): the inherited one, or a new one (address reuse,
    /// SO_REUSEPORT for a listener of several sockets, v6-only for IPv6,
    /// `buffer`-byte buffers as far as `net.core.rmem_max`/`wmem_max`
    /// allow).
    pub fn udp(
        &self,
        addr: SocketAddr,
        at: SocketAddr,
        reuse_port: bool,
        buffer: usize,
    ) -> io::Result<(std::net::UdpSocket, Origin)> {
        let (key, fd) = self.claim(Kind::Udp, addr.to_string());
        let (sock, origin) = match fd {
            Some(fd) => {
                let s = Socket::from(fd);
                check(&s, Type::DGRAM, addr, &key)?;
                s.set_nonblocking(true)?;
                (s, Origin::Inherited)
            }
            None => {
                let s = Socket::new(Domain::for_address(at), Type::DGRAM, Some(Protocol::UDP))?;
                s.set_reuse_address(true)?;
                if reuse_port {
                    s.set_reuse_port(true)?;
                }
                if at.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                let _ = s.set_recv_buffer_size(buffer);
                let _ = s.set_send_buffer_size(buffer);
                clamped_once(&s, buffer);
                s.set_nonblocking(true)?;
                s.set_cloexec(true)?;
                s.bind(&at.into())?;
                (s, Origin::Bound)
            }
        };
        self.hold(key, &sock)?;
        Ok((sock.into(), origin))
    }

    /// The control socket at `path`: the inherited one, or a new one (mode
    /// 0600). A socket file nobody answers on (left by a process that was
    /// killed) is replaced; one another process serves is an error.
    pub fn control(&self, path: &Path) -> io::Result<(UnixListener, Origin)> {
        let (key, fd) = self.claim(Kind::Control, path.display().to_string());
        let (sock, origin) = match fd {
            Some(fd) => {
                let s = Socket::from(fd);
                if s.r#type()? != Type::STREAM || s.domain()? != Domain::UNIX {
                    return Err(mismatch(&key, "not a Unix stream socket"));
                }
                s.set_nonblocking(true)?;
                (UnixListener::from(OwnedFd::from(s)), Origin::Inherited)
            }
            None => (bind_control(path)?, Origin::Bound),
        };
        self.hold(key, &sock)?;
        Ok((sock, origin))
    }

    /// Run `f` over every socket this process serves, for a live upgrade to
    /// hand them over.
    pub fn with_held<R>(&self, f: impl FnOnce(&[(Key, BorrowedFd<'_>)]) -> R) -> R {
        let g = self.lock();
        let held: Vec<(Key, BorrowedFd<'_>)> = g
            .held
            .iter()
            .map(|(k, fd)| (k.clone(), fd.as_fd()))
            .collect();
        f(&held)
    }

    /// Sockets held, by kind (for logs and reports).
    pub fn count(&self, kind: Kind) -> usize {
        self.lock()
            .held
            .iter()
            .filter(|(k, _)| k.kind == kind)
            .count()
    }

    /// Close the inherited sockets the configuration no longer names; each
    /// is logged. Returns how many.
    pub fn close_unclaimed(&self) -> usize {
        let left: Vec<(Key, OwnedFd)> = self.lock().inherited.drain().collect();
        for (key, _) in &left {
            tracing::warn!(event = "socket_not_configured", socket = %key, "a socket the previous process served is not in this configuration; closing it");
        }
        left.len()
    }

    /// Let go of this process's duplicates (the sockets live on in the new
    /// process, or close with their listeners).
    pub fn release(&self) {
        self.lock().held.clear();
    }

    /// Let go of the duplicates of the traffic listeners (TCP and UDP)
    /// when the drain closes them: a duplicate would keep a closed
    /// listener's port accepting into its queue.
    pub fn release_traffic(&self) {
        self.lock()
            .held
            .retain(|(k, _)| !matches!(k.kind, Kind::Tcp | Kind::Udp));
    }
}

/// An inherited socket must be what its key says.
fn check(s: &Socket, ty: Type, addr: SocketAddr, key: &Key) -> io::Result<()> {
    if s.r#type()? != ty {
        return Err(mismatch(key, "another socket type"));
    }
    let local = s
        .local_addr()?
        .as_socket()
        .ok_or_else(|| mismatch(key, "not an IP socket"))?;
    if local.is_ipv6() != addr.is_ipv6()
        || (!addr.ip().is_unspecified() && local.ip() != addr.ip())
        || (addr.port() != 0 && local.port() != addr.port())
    {
        return Err(mismatch(key, &format!("it is bound to {local}")));
    }
    Ok(())
}

fn mismatch(key: &Key, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("the socket handed over as {key} does not match: {what}"),
    )
}

/// Bind the control socket: replace a stale file, refuse a live one,
/// allow only the owner (mode 0600).
fn bind_control(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is served by another process (another splicegate?)",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Say once per process when the kernel gave a UDP socket smaller buffers
/// than asked (Linux reports twice what it grants; a bounded
/// `net.core.rmem_max` / `wmem_max` keeps them at its value).
fn clamped_once(s: &Socket, asked: usize) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let got = (
        s.recv_buffer_size().unwrap_or(0),
        s.send_buffer_size().unwrap_or(0),
    );
    if (got.0 >= asked && got.1 >= asked) || SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    tracing::warn!(
        event = "udp_buffers_clamped",
        asked,
        receive = got.0 / 2,
        send = got.1 / 2,
        "UDP socket buffers are smaller than asked: raise net.core.rmem_max and net.core.wmem_max (see docs/quic.md) or bursts of QUIC datagrams may be dropped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherited_sockets_are_taken_by_key_and_position() {
        let a = Inventory::default();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (t1, o1) = a.tcp(Kind::Tcp, addr, 16, false).unwrap();
        let (t2, _) = a.tcp(Kind::Tcp, addr, 16, false).unwrap();
        let (u, _) = a.udp(addr, addr, false, 1 << 16).unwrap();
        assert_eq!(o1, Origin::Bound);
        let sent: Vec<(Key, OwnedFd)> = a.with_held(|h| {
            h.iter()
                .map(|(k, fd)| (k.clone(), fd.try_clone_to_owned().unwrap()))
                .collect()
        });
        assert_eq!(sent[1].0.index, 1, "{sent:?}");
        let b = Inventory::new(sent);
        let (n1, o) = b.tcp(Kind::Tcp, addr, 64, false).unwrap();
        assert_eq!(o, Origin::Inherited);
        assert_eq!(n1.local_addr().unwrap(), t1.local_addr().unwrap());
        let (n2, _) = b.tcp(Kind::Tcp, addr, 64, false).unwrap();
        assert_eq!(n2.local_addr().unwrap(), t2.local_addr().unwrap());
        let (nu, o) = b.udp(addr, addr, false, 1 << 16).unwrap();
        assert_eq!(o, Origin::Inherited);
        assert_eq!(nu.local_addr().unwrap(), u.local_addr().unwrap());
        assert_eq!(b.close_unclaimed(), 0);
        // A connection waiting in the old socket's queue is accepted from
        // the new one: the same socket.
        let c = std::net::TcpStream::connect(t1.local_addr().unwrap()).unwrap();
        drop(t1);
        n1.set_nonblocking(false).unwrap();
        let (s, peer) = n1.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        drop(s);
        // A UDP socket handed over as TCP is refused.
        let wrong = vec![(
            Key {
                kind: Kind::Tcp,
                addr: addr.to_string(),
                index: 0,
            },
            OwnedFd::from(nu),
        )];
        let c = Inventory::new(wrong);
        let e = c.tcp(Kind::Tcp, addr, 16, false).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }
}
