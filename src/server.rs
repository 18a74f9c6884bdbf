//! The running proxy: binds every listener, spawns accept loops, and drains
//! on shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::conn::ListenerCtx;
use crate::listener;

/// The proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No listener is configured.
    #[error("no listener configured: give --listen ADDR or a [[listener]] in the config file")]
    NoListeners,
    /// A listener could not bind.
    #[error("listener {listener}: cannot listen on {addr}: {source}")]
    Bind {
        /// Listener name.
        listener: String,
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
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

/// A started proxy.
pub struct Server {
    addrs: Vec<(String, SocketAddr)>,
    stop: watch::Sender<bool>,
    drain: watch::Sender<bool>,
    tracker: Tracker,
    accept_loops: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
}

impl Server {
    /// Bind every listener and start accepting. Must run inside a Tokio
    /// runtime. Logs one `listening` event per bound address.
    pub fn start(config: Config) -> Result<Server, StartError> {
        if config.listeners.is_empty() {
            return Err(StartError::NoListeners);
        }
        let routes = Arc::new(config.routes);
        let (stop, stop_rx) = watch::channel(false);
        let (drain, drain_rx) = watch::channel(false);
        let tracker = Tracker::default();
        let mut bound = Vec::new();
        for l in &config.listeners {
            for &addr in &l.bind {
                let sock = listener::bind(addr, l.backlog, l.reuse_port).map_err(|source| {
                    StartError::Bind {
                        listener: l.name.clone(),
                        addr,
                        source,
                    }
                })?;
                bound.push((l.clone(), sock));
            }
        }
        let mut addrs = Vec::new();
        let mut accept_loops = Vec::new();
        for (l, sock) in bound {
            let name = l.name.clone();
            let listener = TcpListener::from_std(sock).map_err(|source| StartError::Bind {
                listener: name.clone(),
                addr: l.bind[0],
                source,
            })?;
            let local = listener.local_addr().map_err(|source| StartError::Bind {
                listener: name.clone(),
                addr: l.bind[0],
                source,
            })?;
            tracing::info!(event = "listening", listener = %name, addr = %local, engine = %l.engine, "listening");
            addrs.push((name, local));
            let ctx = Arc::new(ListenerCtx {
                config: l,
                routes: Arc::clone(&routes),
                drain: drain_rx.clone(),
            });
            accept_loops.push(tokio::spawn(listener::serve(
                listener,
                ctx,
                stop_rx.clone(),
                tracker.clone(),
            )));
        }
        Ok(Server {
            addrs,
            stop,
            drain,
            tracker,
            accept_loops,
            drain_timeout: config.drain_timeout,
        })
    }

    /// Bound addresses, by listener name.
    pub fn local_addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    /// Live connections.
    pub fn active(&self) -> usize {
        self.tracker.active()
    }

    /// Stop accepting, let established connections finish until the drain
    /// deadline (or until `force` resolves), then close what is left.
    pub async fn shutdown(self, force: impl std::future::Future<Output = ()>) {
        let _ = self.stop.send(true);
        for h in self.accept_loops {
            let _ = h.await;
        }
        let active = self.tracker.active();
        tracing::info!(event = "draining", active, drain_timeout = ?self.drain_timeout, "stopped accepting; draining established connections");
        let finished = tokio::select! {
            _ = self.tracker.wait_idle() => true,
            _ = tokio::time::sleep(self.drain_timeout) => false,
            _ = force => false,
        };
        if !finished {
            let left = self.tracker.active();
            tracing::warn!(
                event = "drain_deadline",
                active = left,
                "closing connections still open"
            );
            let _ = self.drain.send(true);
            // Each connection ends within one scheduling round once told.
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait_idle()).await;
        }
        tracing::info!(event = "stopped", "all connections closed");
    }
}
