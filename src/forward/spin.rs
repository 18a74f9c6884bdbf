//! Low-latency mode: after a connection moved bytes, keep reading its two
//! sockets for a short window instead of waiting to be woken.
//!
//! On a virtual machine an idle vCPU halts, and waking it for the reply to
//! a small message costs tens of microseconds — twice per round trip, once
//! for each direction. A connection that has just forwarded a message
//! expects the answer soon; if its worker thread keeps reading for it, the
//! reply is forwarded without any wake-up, and the vCPU stays awake.
//!
//! The spin runs inside the connection's poll, so it must not delay other
//! connections:
//! - a connection spins only when no other connection of the process moved
//!   bytes within [`QUIET`]: with several busy connections the workers are
//!   not going idle, have no wake-up to save, and a spin would hold up the
//!   others' readiness events;
//! - a spinning connection gives its worker back to the scheduler at least
//!   every [`SLICE`] (it wakes itself and returns Pending: whatever else is
//!   ready on the worker runs first);
//! - a connection spins only within `window` of its last byte: an idle
//!   connection never spins, and an idle process stays at zero CPU.
//!   (A spin is at most 1 ms, so the drain and idle timers are late by at
//!   most that.)
//!
//! What a spin costs is capped per worker thread: spins that end without
//! finding a byte take at most [`SHARE_PERCENT`] % of each [`WINDOW`]. A
//! spin that finds the reply is not counted: it costs about the CPU of the
//! wake-up it replaces (measured: the machine's CPU per round trip is the
//! same with and without the mode), and counting it made a busy
//! interactive connection stop spinning for the rest of each window and pay
//! the wake-ups again (measured: p99 of a closed loop of round trips 256–279
//! µs with every spin counted, 139–148 µs uncounted).
//!
//! A check is one non-blocking `recv` (or `splice`) per socket, bypassing
//! tokio's readiness cache, which only epoll updates. Nothing is allocated,
//! locked or logged.
//!
//! (Yielding between every two checks instead — waking the task and
//! returning Pending — was measured and is worse: tokio may wake an idle
//! worker thread for every yielded task, which is exactly the wake-up this
//! avoids. Once per [`SLICE`] that is at most one wake-up a millisecond.)

use std::cell::Cell;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The accounting window of the per-worker cap.
pub const WINDOW: Duration = Duration::from_millis(10);

/// At most this share of each window is spent in spins that find nothing,
/// per worker thread.
pub const SHARE_PERCENT: u32 = 50;

/// A spinning connection returns its worker to the scheduler at least this
/// often.
pub const SLICE: Duration = Duration::from_millis(1);

/// A connection spins only if no other connection of the process moved
/// bytes for this long: with several busy connections the workers are not
/// going idle, and a spin would only delay them.
pub const QUIET: Duration = Duration::from_millis(1);

/// Process-wide activity, for [`QUIET`]: the connection that last moved
/// bytes, when, and when another one last did (nanoseconds since
/// [`epoch`]). Relaxed: a stale value only starts or stops one spin early.
static LAST_ID: AtomicUsize = AtomicUsize::new(0);
static LAST_AT: AtomicU64 = AtomicU64::new(0);
static OTHER_AT: AtomicU64 = AtomicU64::new(0);

/// The process's time origin for the activity stamps.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`], plus one: 0 stays "never".
fn stamp(t: Instant) -> u64 {
    let ns = t.saturating_duration_since(epoch()).as_nanos();
    u64::try_from(ns).unwrap_or(u64::MAX - 1) + 1
}

/// Connection `id` moved bytes at `now`.
fn moved(id: usize, now: Instant) {
    let t = stamp(now);
    if LAST_ID.swap(id, Relaxed) != id {
        OTHER_AT.store(LAST_AT.load(Relaxed), Relaxed);
    }
    LAST_AT.store(t, Relaxed);
}

/// Whether another connection than `id` moved bytes within [`QUIET`].
fn others_busy(id: usize, now: Instant) -> bool {
    let other = if LAST_ID.load(Relaxed) == id {
        OTHER_AT.load(Relaxed)
    } else {
        LAST_AT.load(Relaxed)
    };
    other != 0 && stamp(now).saturating_sub(other) < QUIET.as_nanos() as u64
}

thread_local! {
    /// This worker thread's spin time that found nothing: window start,
    /// time charged in it.
    static WORKER: Cell<(Option<Instant>, Duration)> = const { Cell::new((None, Duration::ZERO)) };
}

/// What this worker was charged in the window that holds `now`.
fn charged(now: Instant) -> Option<(Instant, Duration)> {
    match WORKER.get() {
        (Some(start), spent) if now.duration_since(start) < WINDOW => Some((start, spent)),
        _ => None,
    }
}

/// Whether this worker may go on spinning, with `pending` spent so far in
/// the current spin (not charged yet).
pub(crate) fn worker_allows(now: Instant, pending: Duration) -> bool {
    let spent = charged(now).map_or(Duration::ZERO, |(_, s)| s);
    spent + pending <= WINDOW * SHARE_PERCENT / 100
}

/// A spin of `spent` found nothing: charge it to this worker.
pub(crate) fn charge(now: Instant, spent: Duration) {
    let (start, total) = charged(now).unwrap_or((now, Duration::ZERO));
    WORKER.set((Some(start), total + spent));
}

/// A spin check's read of `sock`: `read` goes to the socket (a
/// non-blocking syscall) even when tokio last saw it not readable.
///
/// When tokio thinks the socket readable, the read runs through tokio's
/// `try_io`, which clears that readiness on `EAGAIN` only if no epoll event
/// came in meanwhile. Otherwise the read runs on its own and leaves tokio's
/// state alone: bytes it finds arrived after tokio's last `EAGAIN`, so
/// their epoll event is pending or already marked the socket readable.
/// Clearing tokio's readiness any other way could leave bytes in the
/// socket with no event to come for them: a stalled connection.
pub(super) fn check<R>(
    sock: &tokio::net::TcpStream,
    mut read: impl FnMut() -> std::io::Result<R>,
) -> std::io::Result<R> {
    let mut ran = false;
    let r = sock.try_io(tokio::io::Interest::READABLE, || {
        ran = true;
        read()
    });
    if ran {
        r
    } else {
        read()
    }
}

/// One connection's spin state.
#[derive(Debug)]
pub(super) struct Spinner {
    /// Identifies the connection on its worker (the address of its
    /// counters, unique while it lives).
    id: usize,
    window: Duration,
    /// When bytes last moved either way.
    last: Option<Instant>,
    /// When the spin in progress started (None: not spinning).
    started: Option<Instant>,
}

impl Spinner {
    pub(super) fn new(id: usize, window: Duration) -> Spinner {
        Spinner {
            id,
            window,
            last: None,
            started: None,
        }
    }

    /// After both directions found their sockets empty: Some(now) to
    /// check them again at once rather than wait to be woken. `moved`:
    /// bytes moved since the last call (the spin in progress, if any, found
    /// them and is not charged).
    pub(super) fn again(&mut self, moved_now: bool) -> Option<Instant> {
        let now = Instant::now();
        if moved_now {
            self.last = Some(now);
            self.started = None;
            moved(self.id, now);
        }
        let pending = self
            .started
            .map_or(Duration::ZERO, |s| now.duration_since(s));
        let go = self
            .last
            .is_some_and(|l| now.duration_since(l) < self.window)
            && !others_busy(self.id, now)
            && worker_allows(now, pending);
        if go {
            self.started.get_or_insert(now);
            Some(now)
        } else {
            if self.started.take().is_some() {
                charge(now, pending);
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the activity record is process-wide.
    #[test]
    fn spins_after_traffic_alone_within_the_window_and_the_share() {
        let w = Duration::from_millis(20);
        let (mut a, mut b) = (Spinner::new(1, w), Spinner::new(2, w));
        assert!(a.again(false).is_none(), "no traffic yet: no spin");
        assert!(a.again(true).is_some());
        assert!(a.again(false).is_some(), "within the window");
        assert!(b.again(true).is_none(), "a moved bytes just now");
        assert!(a.again(false).is_none(), "b moved bytes just now");
        std::thread::sleep(QUIET + Duration::from_millis(1));
        assert!(a.again(true).is_some(), "b has been quiet");
        std::thread::sleep(w + Duration::from_millis(1));
        assert!(a.again(false).is_none(), "the window passed");

        // A spin that found nothing is charged to the worker; one that
        // found bytes is not.
        let cap = WINDOW * SHARE_PERCENT / 100;
        let now = Instant::now() + WINDOW;
        assert!(worker_allows(now, cap));
        assert!(!worker_allows(now, cap + Duration::from_micros(1)));
        charge(now, cap);
        assert!(!worker_allows(now, Duration::from_micros(1)));
        assert!(worker_allows(now + WINDOW, cap), "a new window");

        let mut c = Spinner::new(3, Duration::from_millis(3));
        std::thread::sleep(QUIET + Duration::from_millis(1));
        WORKER.set((None, Duration::ZERO));
        assert!(c.again(true).is_some());
        std::thread::sleep(Duration::from_millis(1));
        assert!(c.again(true).is_some(), "found bytes: a new spin");
        assert_eq!(WORKER.get().1, Duration::ZERO, "not charged");
        std::thread::sleep(Duration::from_millis(4));
        assert!(c.again(false).is_none(), "the window passed");
        assert!(WORKER.get().1 >= Duration::from_millis(4), "charged");
    }
}
