//! The accept loop of a TCP listener. Its sockets come from
//! [`crate::inventory`] (bound there, or handed over by the previous
//! process of a live upgrade).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::conn;
use crate::context::ListenerCtx;
use crate::process::{gate_open, gate_shut, Gate};
use crate::session::next_id;
use crate::shutdown::Tracker;
use crate::terminate::Tls;

/// Accept while `gate` is open, spawning one task per connection: paused,
/// new connections wait in the socket's queue; closed, the loop ends and
/// drops its socket.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ListenerCtx>,
    tls: Option<Arc<Tls>>,
    mut gate: watch::Receiver<Gate>,
    tracker: Tracker,
) {
    let mut starved = false;
    let mut full = false;
    loop {
        if !gate_open(&mut gate).await {
            break;
        }
        // Take a global connection permit before accepting: at the cap, new
        // connections wait in the kernel's backlog.
        let permit = tokio::select! {
            biased;
            _ = gate_shut(&mut gate) => continue,
            p = ctx.limits.admit(&mut full) => p,
        };
        let accepted = tokio::select! {
            biased;
            _ = gate_shut(&mut gate) => continue,
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
    use crate::net::DEFAULT_KEEPALIVE;
    use socket2::SockRef;

    /// The client leg relies on this: options set on the listening socket
    /// are copied to accepted sockets.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let inv = crate::inventory::Inventory::default();
        let addr = "127.0.0.1:0".parse().unwrap();
        let (l, _) = inv
            .tcp(crate::inventory::Kind::Tcp, addr, 16, false)
            .unwrap();
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
