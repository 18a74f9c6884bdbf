//! Low-latency mode for a UDP listener: when the listener's thread has
//! nothing left to run, it polls its sockets for a short window before it
//! sleeps.
//!
//! A QUIC round trip through the relay wakes the listener's thread twice:
//! once for the client's datagram, once for the agent's reply. On a
//! virtual machine an idle vCPU halts, and waking it costs tens of
//! microseconds each time (see [`crate::forward::spin`] for TCP). Here the
//! whole listener — its socket, its flows, their timers — runs on one
//! thread with a single-threaded runtime, so the spin sits where that
//! thread would go to sleep (tokio's park hook) rather than inside a task:
//! it starts only when no task is ready, so it delays no other flow's
//! work that is already waiting.
//!
//! The spin is one `poll(2)` with a zero timeout over the listener's
//! socket and the socket of the flow that last moved datagrams, repeated
//! until one of them is readable or the window ends. It reads nothing:
//! when a socket turns readable the hook returns, and the runtime's
//! `epoll_wait` finds the event at once instead of sleeping for it.
//!
//! It runs only
//! - within `window` of the last datagram relayed (an idle listener stays
//!   at zero CPU);
//! - while one flow is moving datagrams: when another flow moved some
//!   within [`QUIET`], its next datagram would wait for the spin to end;
//! - within the thread's share of spins that find nothing
//!   ([`crate::forward::spin::SHARE_PERCENT`] % of each
//!   [`crate::forward::spin::WINDOW`]; one that finds a datagram replaced a
//!   wake-up and is not counted).
//!
//! Per datagram this costs a thread-local pointer comparison (is it the
//! same flow as the last one?); per batch, a clock read. When the mode is
//! off, one thread-local load.

use std::cell::{Cell, RefCell};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::Flow;
use crate::forward::spin::{charge, worker_allows, QUIET};

thread_local! {
    /// The spin window; None: the mode is off on this thread.
    static WINDOW: Cell<Option<Duration>> = const { Cell::new(None) };
    /// A duplicate of the listener's socket (same socket, own descriptor).
    static LISTENER: RefCell<Option<std::net::UdpSocket>> = const { RefCell::new(None) };
    /// The flow that last moved datagrams.
    static FLOW: RefCell<Option<Arc<Flow>>> = const { RefCell::new(None) };
    /// Another flow than the last one moved datagrams since the last batch.
    static SWITCHED: Cell<bool> = const { Cell::new(false) };
    /// When datagrams last moved.
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    /// When datagrams of another flow than the last one last moved.
    static OTHER: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Turn the mode on for this thread, which serves `listener` (a duplicate
/// of the listener's socket).
pub(super) fn enable(listener: std::net::UdpSocket, window: Duration) {
    WINDOW.set(Some(window));
    LISTENER.set(Some(listener));
}

/// Turn the mode off and let go of the sockets (before the thread's
/// runtime ends).
pub(super) fn disable() {
    WINDOW.set(None);
    LISTENER.set(None);
    FLOW.set(None);
    LAST.set(None);
}

/// A datagram of `flow` was relayed.
pub(super) fn note(flow: &Arc<Flow>) {
    if WINDOW.get().is_none() {
        return;
    }
    FLOW.with_borrow_mut(|f| {
        if !f.as_ref().is_some_and(|f| Arc::ptr_eq(f, flow)) {
            if f.is_some() {
                SWITCHED.set(true);
            }
            *f = Some(Arc::clone(flow));
        }
    });
}

/// A batch of datagrams was relayed (after [`note`] for each).
pub(super) fn moved() {
    if WINDOW.get().is_none() {
        return;
    }
    let now = Instant::now();
    let before = LAST.replace(Some(now));
    if SWITCHED.replace(false) {
        OTHER.set(before);
    }
}

/// `flow` ended: the spin no longer watches its socket.
pub(super) fn forget(flow: &Flow) {
    FLOW.with_borrow_mut(|f| {
        if f.as_deref().is_some_and(|f| std::ptr::eq(f, flow)) {
            *f = None;
        }
    });
}

/// The runtime's park hook: spin while the mode allows, and return as soon
/// as a socket is readable.
pub(super) fn park() {
    let (Some(window), Some(last)) = (WINDOW.get(), LAST.get()) else {
        return;
    };
    let now = Instant::now();
    if now.duration_since(last) >= window
        || OTHER.get().is_some_and(|o| now.duration_since(o) < QUIET)
    {
        return;
    }
    LISTENER.with_borrow(|l| {
        FLOW.with_borrow(|f| {
            let Some(l) = l else {
                return;
            };
            let listener = PollFd::new(l.as_fd(), PollFlags::POLLIN);
            match f {
                Some(f) => spin(
                    &mut [listener, PollFd::new(f.sock.as_fd(), PollFlags::POLLIN)],
                    now,
                    last + window,
                ),
                None => spin(&mut [listener], now, last + window),
            }
        });
    });
}

/// Poll `fds` until one is readable, `until`, or the thread's share of
/// fruitless spinning is spent; a spin that finds nothing is charged.
fn spin(fds: &mut [PollFd<'_>], start: Instant, until: Instant) {
    let mut now = start;
    while now < until && worker_allows(now, now.duration_since(start)) {
        match nix::poll::poll(fds, PollTimeout::ZERO) {
            Ok(0) => {}
            // Readable (or an error to report): the runtime takes it.
            _ => return,
        }
        now = Instant::now();
    }
    charge(now, now.duration_since(start));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spins_only_after_datagrams_and_returns_when_a_socket_is_readable() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let l = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let agent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = "127.0.0.1:9".parse().unwrap();
        let (f, g) = rt.block_on(async {
            let f = Flow::connect(1, client, agent.local_addr().unwrap()).await;
            let g = Flow::connect(2, client, agent.local_addr().unwrap()).await;
            (Arc::new(f.unwrap()), Arc::new(g.unwrap()))
        });
        enable(l.try_clone().unwrap(), Duration::from_millis(20));
        let parked = || {
            let t = Instant::now();
            park();
            t.elapsed()
        };

        assert!(
            parked() < Duration::from_millis(2),
            "no datagram yet: no spin"
        );

        // After a datagram it spins, until the window ends or the thread's
        // share (5 ms of each 10 ms) is spent.
        note(&f);
        moved();
        let spun = parked();
        assert!(spun >= Duration::from_millis(4), "spun {spun:?}");
        assert!(spun < Duration::from_millis(100), "spun {spun:?}");

        // A readable socket (the flow's) ends it at once.
        std::thread::sleep(Duration::from_millis(20));
        note(&f);
        moved();
        agent.send_to(b"x", f.sock.local_addr().unwrap()).unwrap();
        assert!(
            parked() < Duration::from_millis(2),
            "the flow's socket is readable"
        );
        let mut buf = [0u8; 8];
        rt.block_on(f.sock.recv(&mut buf)).unwrap();

        // And the listener's.
        note(&f);
        moved();
        agent.send_to(b"x", l.local_addr().unwrap()).unwrap();
        assert!(
            parked() < Duration::from_millis(2),
            "the listener is readable"
        );
        l.recv(&mut buf).unwrap();

        // Two flows busy: no spin.
        note(&g);
        moved();
        note(&f);
        moved();
        assert!(
            parked() < Duration::from_millis(2),
            "two flows moved datagrams"
        );

        forget(&f);
        assert!(FLOW.with_borrow(Option::is_none));
        disable();
        assert!(parked() < Duration::from_millis(2), "off");
    }
}
