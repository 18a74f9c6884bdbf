//! Listening sockets: socket2 setup and the accept loop.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::conn;
use crate::context::ListenerCtx;
use crate::shutdown::{wait_true, Tracker};
use crate::terminate::Tls;

/// Bind a listening socket: SO_REUSEADDR always, SO_REUSEPORT on request,
/// IPV6_V6ONLY for IPv6 so `[::]:P` and `0.0.0.0:P` can coexist.
pub fn bind(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A new connection (or QUIC flow) id, unique in the process.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Accept until `stop` turns true, spawning one task per connection.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ListenerCtx>,
    tls: Option<Arc<Tls>>,
    mut stop: watch::Receiver<bool>,
    tracker: Tracker,
) {
    let mut starved = false;
    let mut full = false;
    loop {
        // Take a global connection permit before accepting: at the cap, new
        // connections wait in the kernel's backlog.
        let permit = tokio::select! {
            biased;
            _ = wait_true(&mut stop) => break,
            p = ctx.limits.admit(&mut full) => p,
        };
        let accepted = tokio::select! {
            biased;
            _ = wait_true(&mut stop) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                if starved {
                    tracing::info!(event = "accept_recovered", listener = %ctx.config.name, "accepting again after resource exhaustion");
                    starved = false;
                }
                let id = next_id();
                let guard = tracker.enter();
                let (ctx, tls) = (Arc::clone(&ctx), tls.clone());
                tokio::spawn(async move {
                    conn::handle(stream, peer, ctx, tls, id).await;
                    drop(guard);
                    drop(permit);
                });
            }
            Err(e) if is_exhaustion(&e) => {
                // Back off instead of spinning: the pending connection stays
                // in the backlog until an fd frees up. Logged once per episode.
                if !starved {
                    tracing::warn!(event = "accept_exhausted", listener = %ctx.config.name, error = %e, "accept failed: out of file descriptors or memory; backing off");
                    starved = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                // Per-connection failures (ECONNABORTED and the like).
                tracing::debug!(listener = %ctx.config.name, error = %e, "accept failed");
            }
        }
    }
}

fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno) if [nix::libc::EMFILE, nix::libc::ENFILE, nix::libc::ENOBUFS, nix::libc::ENOMEM].contains(&libc_errno)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::DEFAULT_KEEPALIVE;
    use socket2::SockRef;

    /// The client leg relies on this: options set on the listening socket
    /// are copied to accepted sockets.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let l = bind("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        crate::net::tune_sock(SockRef::from(&l), Some(DEFAULT_KEEPALIVE)).unwrap();
        l.set_nonblocking(false).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let s = SockRef::from(&a);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), DEFAULT_KEEPALIVE.time);
        assert_eq!(
            s.tcp_keepalive_interval().unwrap(),
            DEFAULT_KEEPALIVE.interval
        );
        assert_eq!(
            s.tcp_keepalive_retries().unwrap(),
            DEFAULT_KEEPALIVE.retries
        );
    }
}
