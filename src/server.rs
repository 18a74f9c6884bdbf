//! The running proxy: binds every listener, spawns accept loops, and drains
//! on shutdown. The state the steps share lives in [`crate::routing`],
//! [`crate::shutdown`] and [`crate::context`]; this module only starts,
//! reloads and stops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::context::ListenerCtx;
use crate::limits::{Caps, FdBudget, Limits};
use crate::listener;
use crate::metrics::Metrics;
use crate::notify;
use crate::resolver::Resolver;
use crate::routing::{Routing, SharedRoutes};
use crate::shutdown::{Drain, Tracker};
use crate::terminate::certs::CertStore;
use crate::terminate::Tls;

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
    /// The session resolver's client could not be built.
    #[error("{0}")]
    Resolver(String),
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

/// The routing state `config` describes, with its pools' health checks
/// started (inside a runtime). The resolver keeps `previous`'s cache when
/// its URL is unchanged. Fails when the resolver's files do not load.
pub fn routing(
    config: &Config,
    metrics: &Arc<Metrics>,
    previous: Option<&Routing>,
) -> Result<Routing, String> {
    let resolver = match &config.resolver {
        Some(r) => {
            let old = previous.and_then(|p| p.resolver.as_deref());
            let built = Resolver::new(r.clone(), Arc::clone(metrics), old)
                .map_err(|e| format!("[resolver]: {e}"))?;
            Some(Arc::new(built))
        }
        None => None,
    };
    Ok(Routing::start(
        config.routes.clone(),
        config.paths.clone(),
        &config.pools,
        config.required_pools.clone(),
    )
    .with_resolver(resolver, config.require_resolver))
}

/// Derive the connection cap from the descriptor limit (raised to the
/// hard limit first) so that no client is accepted that cannot dial its
/// agent: at the cap, new connections wait in the backlog. Logs the
/// resulting capacity; a configured `max_connections` above it is capped.
///
/// QUIC flows hold one descriptor each (their agent socket): the UDP
/// listeners' `max_flows` are kept aside first, at most a quarter of the
/// limit; larger caps are lowered to fit and the change is logged.
fn admission(config: &mut Config) -> Caps {
    let health_checks: usize = config.pools.iter().map(|p| p.agents.len()).sum();
    let extra = if config.admin.is_some() { 8 } else { 0 } + health_checks as u64;
    let configured = config.limits.max_connections;
    let per_connection = config
        .listeners
        .iter()
        .map(|l| l.engine.fds_per_connection())
        .max()
        .unwrap_or(2);
    let mut budget = FdBudget::measure(configured, extra, per_connection);
    let flows: u64 = config
        .udp_listeners
        .iter()
        .map(|u| (u.max_flows * u.bind.len()) as u64)
        .sum();
    if flows > 0 {
        let room = (budget.limit / 4).max(1);
        if flows > room {
            for u in &mut config.udp_listeners {
                let share = (u.max_flows as u64 * room / flows).max(1) as usize;
                tracing::warn!(
                    event = "udp_max_flows_capped",
                    listener = %u.name,
                    configured = u.max_flows,
                    max_flows = share,
                    "max_flows {} of UDP listener {} does not fit a quarter of the file descriptor limit ({}); using {share}",
                    u.max_flows, u.name, budget.limit
                );
                u.max_flows = share;
            }
        }
        let kept: u64 = config
            .udp_listeners
            .iter()
            .map(|u| (u.max_flows * u.bind.len()) as u64)
            .sum();
        budget = FdBudget::split(
            budget.limit,
            budget.reserved + kept,
            configured,
            per_connection,
        );
    }
    crate::forward::splice::set_pipe_budget(budget.pipes);
    tracing::info!(
        event = "capacity",
        fd_limit = budget.limit,
        reserved = budget.reserved,
        connections = budget.connections,
        pipes = budget.pipes,
        "file descriptors allow {} connections at once ({} each) and {} splice pipes",
        budget.connections,
        budget.per_connection,
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
    Caps {
        max_connections: Some(budget.connections),
        ..config.limits
    }
}

/// A started proxy.
pub struct Server {
    addrs: Vec<(String, SocketAddr)>,
    stop: watch::Sender<bool>,
    drain: Drain,
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
    pub fn start(mut config: Config) -> Result<Server, StartError> {
        if config.listeners.is_empty() && config.udp_listeners.is_empty() {
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
                let state = Tls::new(t).map_err(|what| StartError::Tls {
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
        let routes = routing(&config, &metrics, None).map_err(StartError::Resolver)?;
        let routes = Arc::new(SharedRoutes::new(routes));
        let (stop, stop_rx) = watch::channel(false);
        let drain = Drain::default();
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
        let mut udp_bound = Vec::new();
        for u in &config.udp_listeners {
            for &addr in &u.bind {
                let sock = crate::udp::bind(addr).map_err(|source| StartError::Bind {
                    listener: u.name.clone(),
                    addr,
                    source,
                })?;
                udp_bound.push((u.name.clone(), addr, sock));
            }
        }
        let limits = Arc::new(Limits::new(admission(&mut config)));
        if let (Some(l), Some(a)) = (admin_listener, &config.admin) {
            let admin = crate::admin::Admin {
                metrics: Arc::clone(&metrics),
                routes: Arc::clone(&routes),
                drain: drain.clone(),
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
                config: l,
                routes: Arc::clone(&routes),
                drain: drain.clone(),
                metrics: Arc::clone(&metrics),
                limits: Arc::clone(&limits),
            });
            accept_loops.push(tokio::spawn(listener::serve(
                listener,
                ctx,
                tls.get(&name).cloned(),
                stop_rx.clone(),
                tracker.clone(),
            )));
        }
        for (name, addr, sock) in udp_bound {
            let Some(u) = config.udp_listeners.iter().find(|u| u.name == name) else {
                continue;
            };
            let bind_err = |source| StartError::Bind {
                listener: name.clone(),
                addr,
                source,
            };
            let local = sock.local_addr().map_err(bind_err)?;
            tracing::info!(event = "listening", listener = %name, addr = %local, proto = "udp", idle_timeout = ?u.idle_timeout, max_flows = u.max_flows, "listening for QUIC");
            addrs.push((name.clone(), local));
            let ctx = Arc::new(crate::udp::UdpCtx {
                config: u.clone(),
                routes: Arc::clone(&routes),
                drain: drain.clone(),
                metrics: Arc::clone(&metrics),
                tracker: tracker.clone(),
            });
            crate::udp::spawn(sock, ctx, stop_rx.clone()).map_err(bind_err)?;
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
    pub fn reload_routes(&self, config: &Config) -> Result<(), String> {
        let next = routing(config, &self.metrics, Some(&self.routes.current()))?;
        self.routes.replace(next);
        Ok(())
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
        self.drain.start();
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
            self.drain.expire();
            // Each connection ends within one scheduling round once told.
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait_idle()).await;
        }
        for h in self.background {
            h.abort();
        }
        tracing::info!(event = "stopped", "all connections closed");
    }
}
