//! systemd readiness notification (`sd_notify`), written directly: one
//! datagram per message to `$NOTIFY_SOCKET`. Without that variable every
//! call does nothing.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A datagram socket connected to `$NOTIFY_SOCKET` (None: not under a
/// service manager).
fn connect() -> Option<io::Result<UnixDatagram>> {
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    Some(UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.connect_addr(&addr)?;
        } else {
            sock.connect(&path)?;
        }
        Ok(sock)
    }))
}

/// Send one message such as `READY=1`. Errors are logged, never fatal.
pub fn notify(msg: &str) {
    let Some(sock) = connect() else {
        return;
    };
    if let Err(e) = sock.and_then(|s| s.send(msg.as_bytes())) {
        tracing::warn!(error = %e, message = msg, "cannot notify systemd");
    }
}

/// A live upgrade handed over: tell systemd the new process `pid` is the
/// service's main process now, and wait (up to 5 s) until it has read
/// that (`BARRIER=1`: it closes the pipe end sent with it once it
/// processed every earlier message), so this process may exit without
/// systemd taking that for the service stopping.
pub async fn main_pid(pid: u32) {
    let Some(sock) = connect() else {
        return;
    };
    let barrier = sock.and_then(|sock| {
        sock.send(format!("MAINPID={pid}").as_bytes())?;
        let (r, w) = nix::unistd::pipe()?;
        let iov = [io::IoSlice::new(b"BARRIER=1")];
        let fds = [w.as_fd()];
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
        rustix::net::sendmsg(&sock, &iov, &mut control, rustix::net::SendFlags::empty())?;
        drop(w);
        Ok(r)
    });
    let r = match barrier {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, pid, "cannot tell systemd the new main process");
            return;
        }
    };
    let waited = tokio::task::spawn_blocking(move || {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(5000u16)).map(|n| n > 0)
    })
    .await;
    match waited {
        Ok(Ok(true)) => tracing::info!(
            event = "main_pid",
            pid,
            "systemd: the new process is the main process"
        ),
        _ => tracing::warn!(
            pid,
            "systemd did not confirm the new main process within 5 s"
        ),
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
