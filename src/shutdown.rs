//! Drain state and connection tracking, shared by the server that starts
//! the drain, the listeners that stop accepting, the connections that end
//! at the deadline, and the health answers that turn 503.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

/// The drain: `draining` from the first signal (health answers 503), and
/// the deadline after which every connection still open is closed.
#[derive(Debug, Clone)]
pub struct Drain(Arc<DrainInner>);

#[derive(Debug)]
struct DrainInner {
    draining: AtomicBool,
    deadline: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain(Arc::new(DrainInner {
            draining: AtomicBool::new(false),
            deadline: watch::channel(false).0,
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
