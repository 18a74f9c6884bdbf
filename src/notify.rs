//! systemd readiness notification (`sd_notify`), written directly: one
//! datagram per message to `$NOTIFY_SOCKET`. Without that variable every
//! call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Send one message such as `READY=1`. Errors are logged, never fatal.
pub fn notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)
        } else {
            sock.send_to(msg.as_bytes(), &path)
        }
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, message = msg, "cannot notify systemd");
    }
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`, for this
/// process per `WATCHDOG_PID`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Ping the watchdog at half its period, forever.
pub async fn watchdog(period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tick.tick().await;
        notify("WATCHDOG=1");
    }
}
