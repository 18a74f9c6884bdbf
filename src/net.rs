//! Socket options shared by both legs of a connection.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// TCP keepalive parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub time: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub retries: u32,
}

/// Default keepalive: first probe after 60 s idle, well under the AWS NLB's
/// 350 s idle timeout, so idle flows stay in the NLB's table.
pub const DEFAULT_KEEPALIVE: Keepalive = Keepalive {
    time: Duration::from_secs(60),
    interval: Duration::from_secs(20),
    retries: 3,
};

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
