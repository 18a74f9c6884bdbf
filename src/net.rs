//! Socket options shared by both legs of a connection.

use std::io;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::Keepalive;

/// TCP_NODELAY (no delayed-ACK stalls on small DCV input events) and TCP
/// keepalive (keeps idle flows alive in the NLB's connection table).
pub fn tune(stream: &TcpStream, keepalive: Option<Keepalive>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    if let Some(k) = keepalive {
        let params = TcpKeepalive::new()
            .with_time(k.time)
            .with_interval(k.interval)
            .with_retries(k.retries);
        SockRef::from(stream).set_tcp_keepalive(&params)?;
    }
    Ok(())
}
