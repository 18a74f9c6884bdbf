//! Socket options shared by both legs of a connection.

use std::io;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::Keepalive;

/// TCP_NODELAY (no delayed-ACK stalls on small DCV input events) and TCP
/// keepalive (keeps idle flows alive in the NLB's connection table).
pub fn tune(stream: &TcpStream, keepalive: Option<Keepalive>) -> io::Result<()> {
    tune_sock(SockRef::from(stream), keepalive)
}

/// [`tune`] for any TCP socket. On a listening socket, Linux copies these
/// options to every accepted socket, so the client leg needs no
/// `setsockopt` of its own (checked by a test in `listener`).
pub fn tune_sock(sock: SockRef<'_>, keepalive: Option<Keepalive>) -> io::Result<()> {
    sock.set_tcp_nodelay(true)?;
    if let Some(k) = keepalive {
        let params = TcpKeepalive::new()
            .with_time(k.time)
            .with_interval(k.interval)
            .with_retries(k.retries);
        sock.set_tcp_keepalive(&params)?;
    }
    Ok(())
}
