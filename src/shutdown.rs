//! Drain state and connection tracking, shared by the server that starts
//! the drain, the listeners that stop accepting, the connections that end
//! at the deadline, and the health answers that turn 503; and [`Stop`],
//! the signal that tells one session to stop forwarding (the drain
//! deadline, an operator's `close`, or a live upgrade's pause).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use tokio::sync::{watch, Notify};

/// The drain: `draining` from the first signal (health answers 503), and
/// the deadline after which every connection still open is closed.
#[derive(Debug, Clone)]
pub struct Drain(Arc<DrainInner>);

#[derive(Debug)]
struct DrainInner {
    draining: AtomicBool,
    deadline: watch::Sender<bool>,
    /// An operator asked for the drain (`ctl drain`), with its timeout.
    requested: watch::Sender<Option<Option<Duration>>>,
    /// When the drain deadline falls, once the drain has started.
    deadline_at: std::sync::Mutex<Option<Instant>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain(Arc::new(DrainInner {
            draining: AtomicBool::new(false),
            deadline: watch::channel(false).0,
            requested: watch::channel(None).0,
            deadline_at: std::sync::Mutex::new(None),
        }))
    }
}

impl Drain {
    /// Mark the process as draining (health turns 503).
    pub fn start(&self) {
        self.0.draining.store(true, Ordering::Release);
    }

    /// Whether the process is draining.
    pub fn draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    /// The drain deadline has passed: connections still open close now.
    pub fn expire(&self) {
        self.0.deadline.send_replace(true);
    }

    /// Resolves when the drain deadline passes.
    pub fn deadline(&self) -> watch::Receiver<bool> {
        self.0.deadline.subscribe()
    }

    /// Ask the process to drain as SIGTERM does, with `timeout` in place
    /// of `drain_timeout` if given; false if it already drains.
    pub fn request(&self, timeout: Option<Duration>) -> bool {
        if self.draining() {
            return false;
        }
        self.0.requested.send_replace(Some(timeout));
        true
    }

    /// Resolves when an operator asked for the drain, with the timeout
    /// asked for.
    pub async fn requested(&self) -> Option<Duration> {
        let mut rx = self.0.requested.subscribe();
        let got = rx.wait_for(Option::is_some).await.map(|v| *v);
        match got {
            Ok(Some(t)) => t,
            _ => std::future::pending().await,
        }
    }

    /// The drain's deadline falls at `at`.
    pub fn set_deadline_at(&self, at: Instant) {
        *self.0.deadline_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
    }

    /// When the drain's deadline falls (None: not draining).
    pub fn deadline_at(&self) -> Option<Instant> {
        *self.0.deadline_at.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Resolves once the watch value is true; never if the sender is gone.
pub async fn wait_true(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Counts live connections so shutdown can wait for them.
#[derive(Debug, Clone, Default)]
pub struct Tracker(Arc<TrackerInner>);

#[derive(Debug, Default)]
struct TrackerInner {
    active: AtomicUsize,
    idle: Notify,
}

/// Held by each connection task; dropping it marks the connection gone.
#[derive(Debug)]
pub struct Guard(Tracker);

impl Tracker {
    /// Register a connection.
    pub fn enter(&self) -> Guard {
        self.0.active.fetch_add(1, Ordering::AcqRel);
        Guard(self.clone())
    }

    /// Live connections.
    pub fn active(&self) -> usize {
        self.0.active.load(Ordering::Acquire)
    }

    /// Resolves when no connection is live.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0 .0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0 .0.idle.notify_waiters();
        }
    }
}

/// Why a session was told to stop forwarding. Stronger reasons win: a
/// session told to pause for a handover and then to close closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Halt {
    /// A live upgrade: pause at the next safe point and hand the session
    /// to the new process.
    Handover = 1,
    /// An operator closed the session.
    Close = 2,
    /// The drain deadline passed.
    Deadline = 3,
}

/// One session's stop signal: set by whoever stops it, polled by its
/// forwarding loop. Polling costs an atomic load and a lock-free waker
/// registration; nothing is allocated or locked.
#[derive(Debug, Default)]
pub struct Stop {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl Stop {
    /// Tell the session to stop for `why` (a weaker reason never replaces
    /// a stronger one) and wake its task.
    pub fn raise(&self, why: Halt) {
        self.state.fetch_max(why as u8, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Withdraw `why` if it is still the reason (a handover that did not
    /// happen: the session goes on here).
    pub fn withdraw(&self, why: Halt) {
        let _ = self
            .state
            .compare_exchange(why as u8, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The reason the session was told to stop, if it was.
    pub fn get(&self) -> Option<Halt> {
        match self.state.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Halt::Handover),
            2 => Some(Halt::Close),
            _ => Some(Halt::Deadline),
        }
    }

    /// Ready once told to stop; registers `cx`'s waker otherwise.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<Halt> {
        if let Some(h) = self.get() {
            return Poll::Ready(h);
        }
        self.waker.register(cx.waker());
        match self.get() {
            Some(h) => Poll::Ready(h),
            None => Poll::Pending,
        }
    }

    /// Resolves when told to stop, with the reason.
    pub fn wait(&self) -> impl Future<Output = Halt> + '_ {
        std::future::poll_fn(|cx| self.poll(cx))
    }

    /// Resolves when told to close or at the deadline; a handover request
    /// is not for a session that cannot move (terminate mode, io_uring).
    pub fn wait_final(&self) -> impl Future<Output = Halt> + '_ {
        let final_only = |h: Option<Halt>| h.filter(|&h| h != Halt::Handover);
        std::future::poll_fn(move |cx| {
            if let Some(h) = final_only(self.get()) {
                return Poll::Ready(h);
            }
            self.waker.register(cx.waker());
            match final_only(self.get()) {
                Some(h) => Poll::Ready(h),
                None => Poll::Pending,
            }
        })
    }
}
