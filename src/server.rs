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
use crate::metrics::Metrics;
use crate::notify;
use crate::route::path::PathTable;
use crate::route::RouteTable;
use crate::terminate::certs::CertStore;
use crate::upstream::health;
use crate::upstream::pool::Pool;
use std::collections::HashMap;

/// The proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No listener is configured.
    #[error("no listener configured: give --listen ADDR or a [[listener]] in the config file")]
    NoListeners,
    /// A terminate listener's certificates or agent TLS settings are unusable.
    #[error("listener {listener}: {what}")]
    Tls {
        /// Listener name.
        listener: String,
        /// What is wrong (file and reason).
        what: String,
    },
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

/// The routing table with the pools it refers to and their health-check
/// tasks. Replaced as one on reload; dropping it stops its checks.
pub struct Routing {
    /// Name → target rules.
    pub table: RouteTable,
    /// Path rules for terminate listeners.
    pub paths: PathTable,
    /// Pools by name.
    pub pools: HashMap<String, Arc<Pool>>,
    /// Pools that must have a healthy agent for health to answer 200.
    pub required: Vec<String>,
    checks: Vec<JoinHandle<()>>,
}

impl Routing {
    /// Build the pools of `config` and start their health checks (inside
    /// a runtime).
    pub fn start(config: &Config) -> Routing {
        let pools: HashMap<String, Arc<Pool>> = config
            .pools
            .iter()
            .map(|p| (p.name.clone(), Arc::new(Pool::new(p.clone()))))
            .collect();
        let checks = pools.values().flat_map(health::spawn).collect();
        Routing {
            table: config.routes.clone(),
            paths: config.paths.clone(),
            pools,
            required: config.required_pools.clone(),
            checks,
        }
    }

    /// Why the proxy should be reported unhealthy, if it should: draining,
    /// or a required pool with no agent up (active and passive health).
    pub fn unhealthy(&self, draining: bool) -> Option<String> {
        if draining {
            return Some("draining".to_owned());
        }
        let now = tokio::time::Instant::now();
        self.required.iter().find_map(|name| {
            let pool = self.pools.get(name)?;
            (!pool.agents().iter().any(|a| a.is_up(now)))
                .then(|| format!("pool {name}: no healthy agent"))
        })
    }
}

impl Drop for Routing {
    fn drop(&mut self) {
        for c in &self.checks {
            c.abort();
        }
    }
}

/// The current [`Routing`], replaceable while the proxy runs. Each
/// connection takes it once, when its ClientHello is complete, so a reload
/// never disturbs established sessions.
pub struct SharedRoutes(std::sync::RwLock<Arc<Routing>>);

impl SharedRoutes {
    /// A holder with `routing` as the current one.
    pub fn new(routing: Routing) -> Self {
        SharedRoutes(std::sync::RwLock::new(Arc::new(routing)))
    }

    /// The current routing.
    pub fn current(&self) -> Arc<Routing> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Make `routing` current for new connections.
    pub fn replace(&self, routing: Routing) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routing);
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

/// Derive the connection cap from the descriptor limit (raised to the
/// hard limit first) so that no client is accepted that cannot dial its
/// agent: at the cap, new connections wait in the backlog. Logs the
/// resulting capacity; a configured `max_connections` above it is capped.
fn admission(config: &Config) -> crate::config::Limits {
    let health_checks: usize = config.pools.iter().map(|p| p.agents.len()).sum();
    let extra = if config.admin.is_some() { 8 } else { 0 } + health_checks as u64;
    let configured = config.limits.max_connections;
    let budget = crate::limits::FdBudget::measure(configured, extra);
    crate::forward::splice::set_pipe_budget(budget.pipes);
    tracing::info!(
        event = "capacity",
        fd_limit = budget.limit,
        reserved = budget.reserved,
        connections = budget.connections,
        pipes = budget.pipes,
        "file descriptors allow {} connections at once (2 each) and {} splice pipes",
        budget.connections,
        budget.pipes
    );
    if let Some(m) = configured.filter(|&m| m > budget.connections) {
        tracing::warn!(
            event = "max_connections_capped",
            configured = m,
            connections = budget.connections,
            "max_connections {m} exceeds what the file descriptor limit ({}) allows; using {}",
            budget.limit,
            budget.connections
        );
    }
    crate::config::Limits {
        max_connections: Some(budget.connections),
        ..config.limits
    }
}

/// A started proxy.
pub struct Server {
    addrs: Vec<(String, SocketAddr)>,
    stop: watch::Sender<bool>,
    drain: watch::Sender<bool>,
    tracker: Tracker,
    accept_loops: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
    drain_grace: Duration,
    metrics: Arc<Metrics>,
    admin: Option<SocketAddr>,
    routes: Arc<SharedRoutes>,
    certs: Vec<(String, Arc<CertStore>)>,
}

impl Server {
    /// Bind every listener and start accepting. Must run inside a Tokio
    /// runtime. Logs one `listening` event per bound address and tells
    /// systemd `READY=1` (when run under it).
    pub fn start(config: Config) -> Result<Server, StartError> {
        if config.listeners.is_empty() {
            return Err(StartError::NoListeners);
        }
        let metrics = Arc::new(Metrics::default());
        let mut background = Vec::new();
        let mut admin = None;
        let mut admin_listener = None;
        if let Some(a) = &config.admin {
            let bind_err = |source| StartError::Bind {
                listener: "admin".into(),
                addr: a.bind,
                source,
            };
            let sock = listener::bind(a.bind, 128, false).map_err(bind_err)?;
            let l = TcpListener::from_std(sock).map_err(bind_err)?;
            let local = l.local_addr().map_err(bind_err)?;
            tracing::info!(event = "listening", listener = "admin", addr = %local, "admin listening: /health and /metrics");
            admin = Some(local);
            admin_listener = Some(l);
        }
        let mut tls = HashMap::new();
        for l in &config.listeners {
            if let Some(t) = &l.terminate {
                if config.paths.is_empty() {
                    tracing::warn!(event = "no_path_routes", listener = %l.name, "terminate listener without [[path_route]] or [path_agent]: every request but the health path gets 404");
                }
                let state = crate::terminate::Tls::new(t).map_err(|what| StartError::Tls {
                    listener: l.name.clone(),
                    what,
                })?;
                tls.insert(l.name.clone(), Arc::new(state));
            }
        }
        let certs = tls
            .iter()
            .map(|(name, t)| (name.clone(), Arc::clone(&t.store)))
            .collect();
        let routes = Arc::new(SharedRoutes::new(Routing::start(&config)));
        let (stop, stop_rx) = watch::channel(false);
        let (drain, drain_rx) = watch::channel(false);
        let tracker = Tracker::default();
        let mut bound = Vec::new();
        for l in &config.listeners {
            for &addr in &l.bind {
                let sock = listener::bind(addr, l.backlog, l.reuse_port)
                    .and_then(|s| {
                        crate::net::tune_sock(socket2::SockRef::from(&s), l.keepalive)?;
                        Ok(s)
                    })
                    .map_err(|source| StartError::Bind {
                        listener: l.name.clone(),
                        addr,
                        source,
                    })?;
                bound.push((l.clone(), sock));
            }
        }
        let limits = Arc::new(crate::limits::Limits::new(admission(&config)));
        if let (Some(l), Some(a)) = (admin_listener, &config.admin) {
            let admin = crate::admin::Admin {
                metrics: Arc::clone(&metrics),
                routes: Arc::clone(&routes),
                proxy_trusted: a.proxy_trusted.clone(),
                max_connections: a.max_connections,
            };
            background.push(tokio::spawn(crate::admin::serve(l, Arc::new(admin))));
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
            addrs.push((name.clone(), local));
            let ctx = Arc::new(ListenerCtx {
                tls: tls.get(&name).cloned(),
                config: l,
                routes: Arc::clone(&routes),
                drain: drain_rx.clone(),
                metrics: Arc::clone(&metrics),
                limits: Arc::clone(&limits),
            });
            accept_loops.push(tokio::spawn(listener::serve(
                listener,
                ctx,
                stop_rx.clone(),
                tracker.clone(),
            )));
        }
        notify::notify("READY=1");
        if let Some(period) = notify::watchdog_interval() {
            background.push(tokio::spawn(notify::watchdog(period)));
        }
        Ok(Server {
            addrs,
            stop,
            drain,
            tracker,
            accept_loops,
            background,
            drain_timeout: config.drain_timeout,
            drain_grace: config.drain_grace,
            metrics,
            admin,
            routes,
            certs,
        })
    }

    /// Replace the routing table and pools for new connections (SIGHUP
    /// reload). Pools start with fresh health state.
    pub fn reload_routes(&self, config: &Config) {
        self.routes.replace(Routing::start(config));
    }

    /// Re-read every terminate listener's certificate files (SIGHUP). A
    /// listener whose new files fail to load keeps its running
    /// certificates; the error is logged with the file and reason.
    /// Established connections are not touched.
    pub fn reload_certs(&self) {
        for (name, store) in &self.certs {
            match store.reload() {
                Ok(n) => {
                    tracing::info!(event = "certs_reloaded", listener = %name, certificates = n, "certificates reloaded")
                }
                Err(e) => {
                    tracing::error!(event = "certs_reload_failed", listener = %name, error = %e, "certificate reload failed; keeping the running certificates")
                }
            }
        }
    }

    /// The admin listener's address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Bound addresses, by listener name.
    pub fn local_addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    /// Live connections.
    pub fn active(&self) -> usize {
        self.tracker.active()
    }

    /// The drain sequence for load-balancer deregistration:
    /// 1. health turns 503 and systemd is told `STOPPING=1`;
    /// 2. listeners keep accepting for the drain grace, so the load
    ///    balancer's health checks notice before connections are refused;
    /// 3. listeners close;
    /// 4. established connections run until they end or the drain deadline
    ///    passes (or `force` resolves), then the rest are closed.
    pub async fn shutdown(self, force: impl std::future::Future<Output = ()>) {
        tokio::pin!(force);
        self.metrics.set_draining();
        notify::notify("STOPPING=1");
        let mut forced = false;
        if !self.drain_grace.is_zero() {
            tracing::info!(event = "drain_grace", grace = ?self.drain_grace, active = self.tracker.active(), "health now answers 503; still accepting during the grace period");
            tokio::select! {
                _ = tokio::time::sleep(self.drain_grace) => {}
                _ = &mut force => forced = true,
            }
        }
        let _ = self.stop.send(true);
        for h in self.accept_loops {
            let _ = h.await;
        }
        let active = self.tracker.active();
        tracing::info!(event = "draining", active, drain_timeout = ?self.drain_timeout, "stopped accepting; draining established connections");
        let finished = forced
            || tokio::select! {
                _ = self.tracker.wait_idle() => true,
                _ = tokio::time::sleep(self.drain_timeout) => false,
                _ = &mut force => false,
            };
        let finished = finished && self.tracker.active() == 0;
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
        for h in self.background {
            h.abort();
        }
        tracing::info!(event = "stopped", "all connections closed");
    }
}
