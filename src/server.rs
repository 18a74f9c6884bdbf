//! The running proxy: binds every listener, spawns accept loops, and drains
//! on shutdown. The state the steps share lives in [`crate::routing`],
//! [`crate::shutdown`] and [`crate::context`]; this module only starts,
//! reloads and stops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, ControlSocket};
use crate::context::ListenerCtx;
use crate::inventory::{Inventory, Key as InvKey, Kind as InvKind, Origin};
use crate::limits::{Caps, FdBudget, Limits};
use crate::listener;
use crate::metrics::Metrics;
use crate::notify;
use crate::process::{Gate, Launch, Process, UpgradeState};
use crate::resolver::Resolver;
use crate::routing::{Routing, SharedRoutes};
use crate::session::Sessions;
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
    /// The configured control socket could not be bound.
    #[error("control socket {path}: {source}")]
    Control {
        /// Its path.
        path: String,
        /// OS error.
        source: std::io::Error,
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
        .map(|u| u.max_flows as u64)
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
            .map(|u| u.max_flows as u64)
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

/// How the process starts: with the sockets a previous process handed
/// over (none for a fresh start) and how it was launched.
pub struct Start {
    /// The listening sockets, bound here or inherited.
    pub inventory: Arc<Inventory>,
    /// How this process was started (a live upgrade starts the same).
    pub launch: Launch,
    /// Started by a live upgrade: the old process tells systemd about the
    /// new main process, and inherited UDP sockets wait for their flows.
    pub upgrade: bool,
    /// Agents drained from the start (what the previous process had
    /// drained).
    pub drained: Vec<String>,
}

impl Start {
    /// A fresh start: nothing inherited.
    pub fn fresh() -> Start {
        Start {
            inventory: Arc::new(Inventory::default()),
            launch: Launch::current(),
            upgrade: false,
            drained: Vec::new(),
        }
    }
}

/// A started proxy.
pub struct Server {
    addrs: Vec<(String, SocketAddr)>,
    /// The UDP relays' drain signal (no new flows).
    stop: watch::Sender<bool>,
    process: Arc<Process>,
    accept_loops: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
    drain_timeout: Duration,
    drain_grace: Duration,
    admin: Option<SocketAddr>,
    control: Option<std::path::PathBuf>,
    certs: Vec<(String, Arc<CertStore>)>,
}

impl Server {
    /// Bind every listener (or take the inherited sockets) and start
    /// accepting. Must run inside a Tokio runtime. Logs one `listening`
    /// event per address and tells systemd `READY=1` (when run under it,
    /// and not started by a live upgrade).
    pub fn start(mut config: Config, start: Start) -> Result<Server, StartError> {
        if config.listeners.is_empty() && config.udp_listeners.is_empty() {
            return Err(StartError::NoListeners);
        }
        let inventory = start.inventory;
        let metrics = Arc::new(Metrics::default());
        let sessions = Arc::new(Sessions::default());
        let mut background = Vec::new();
        let mut admin = None;
        let mut admin_listener = None;
        let mut inherited = 0u64;
        let mut count = |o: Origin| {
            if o == Origin::Inherited {
                inherited += 1;
            }
        };
        if let Some(a) = &config.admin {
            let bind_err = |source| StartError::Bind {
                listener: "admin".into(),
                addr: a.bind,
                source,
            };
            let (sock, origin) = inventory
                .tcp(InvKind::Admin, a.bind, 1024, false)
                .map_err(bind_err)?;
            count(origin);
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
        routes.drained.extend(start.drained);
        let (stop, stop_rx) = watch::channel(false);
        let drain = Drain::default();
        let tracker = Tracker::default();
        let mut bound = Vec::new();
        for l in &config.listeners {
            for &addr in &l.bind {
                let (sock, origin) = inventory
                    .tcp(InvKind::Tcp, addr, l.backlog, l.reuse_port)
                    .and_then(|(s, o)| {
                        crate::net::tune_sock(socket2::SockRef::from(&s), l.keepalive)?;
                        Ok((s, o))
                    })
                    .map_err(|source| StartError::Bind {
                        listener: l.name.clone(),
                        addr,
                        source,
                    })?;
                count(origin);
                bound.push((l.clone(), addr, sock));
            }
        }
        let mut udp_bound = Vec::new();
        for u in &config.udp_listeners {
            let workers = u.workers.max(1);
            for &addr in &u.bind {
                // Port 0: the first socket's port for the others.
                let mut at = addr;
                for w in 0..workers {
                    let (sock, origin) = inventory
                        .udp(addr, at, workers > 1, crate::udp::SOCKET_BUFFER)
                        .map_err(|source| StartError::Bind {
                            listener: u.name.clone(),
                            addr,
                            source,
                        })?;
                    if w == 0 {
                        if let Ok(a) = sock.local_addr() {
                            at = a;
                        }
                    }
                    count(origin);
                    let key = InvKey {
                        kind: InvKind::Udp,
                        addr: addr.to_string(),
                        index: udp_bound.iter().filter(|(_, a, _, _)| *a == addr).count() as u32,
                    };
                    udp_bound.push((u.name.clone(), addr, sock, (key, origin)));
                }
            }
        }
        let control_path = config.control.path();
        let control = match &control_path {
            None => None,
            Some(path) => match inventory.control(path) {
                Ok((l, origin)) => {
                    count(origin);
                    tracing::info!(event = "control_listening", path = %path.display(), "control socket listening");
                    Some(l)
                }
                Err(e) if config.control == ControlSocket::Default => {
                    tracing::warn!(event = "control_unavailable", path = %path.display(), error = %e, "no control socket (splicegate ctl and upgrade need one): set [control] path or --control, or create the directory");
                    None
                }
                Err(source) => {
                    return Err(StartError::Control {
                        path: path.display().to_string(),
                        source,
                    })
                }
            },
        };
        let unclaimed = inventory.close_unclaimed();
        let caps = admission(&mut config);
        metrics.set_capacity(caps.max_connections.unwrap_or(0));
        let limits = Arc::new(Limits::new(caps));
        let (traffic, traffic_rx) = watch::channel(Gate::Open);
        let (local, _) = watch::channel(Gate::Open);
        let local_tracker = Tracker::default();
        if let (Some(l), Some(a)) = (admin_listener, &config.admin) {
            let admin = crate::admin::Admin {
                metrics: Arc::clone(&metrics),
                routes: Arc::clone(&routes),
                drain: drain.clone(),
                proxy_trusted: a.proxy_trusted.clone(),
                max_connections: a.max_connections,
                max_per_peer: a.max_per_peer,
                request_timeout: a.request_timeout,
                logged: Default::default(),
            };
            background.push(tokio::spawn(crate::admin::serve(
                l,
                Arc::new(admin),
                local.subscribe(),
                local_tracker.clone(),
            )));
        }
        let mut addrs = Vec::new();
        let mut accept_loops = Vec::new();
        let mut listeners = HashMap::new();
        for (l, addr, sock) in bound {
            let name = l.name.clone();
            let bind_err = |source| StartError::Bind {
                listener: name.clone(),
                addr,
                source,
            };
            let listener = TcpListener::from_std(sock).map_err(bind_err)?;
            let local_addr = listener.local_addr().map_err(bind_err)?;
            tracing::info!(event = "listening", listener = %name, addr = %local_addr, engine = %l.engine, "listening");
            addrs.push((name.clone(), local_addr));
            let ctx = Arc::new(ListenerCtx {
                config: l,
                routes: Arc::clone(&routes),
                drain: drain.clone(),
                metrics: Arc::clone(&metrics),
                limits: Arc::clone(&limits),
                sessions: Arc::clone(&sessions),
            });
            listeners
                .entry(name.clone())
                .or_insert_with(|| Arc::clone(&ctx));
            accept_loops.push(tokio::spawn(listener::serve(
                listener,
                ctx,
                tls.get(&name).cloned(),
                traffic_rx.clone(),
                tracker.clone(),
            )));
        }
        let mut relays = Vec::new();
        let mut adopting = HashMap::new();
        let mut udp_limits: HashMap<String, (Arc<crate::udp::FlowLimits>, usize)> = HashMap::new();
        for (name, addr, sock, (key, origin)) in udp_bound {
            let Some(u) = config.udp_listeners.iter().find(|u| u.name == name) else {
                continue;
            };
            let bind_err = |source| StartError::Bind {
                listener: name.clone(),
                addr,
                source,
            };
            let local_addr = sock.local_addr().map_err(bind_err)?;
            tracing::info!(event = "listening", listener = %name, addr = %local_addr, proto = "udp", idle_timeout = ?u.idle_timeout, max_flows = u.max_flows, "listening for QUIC");
            addrs.push((name.clone(), local_addr));
            let (limits, socket) = {
                let e = udp_limits.entry(name.clone()).or_default();
                e.1 += 1;
                (Arc::clone(&e.0), e.1 - 1)
            };
            let ctx = Arc::new(crate::udp::UdpCtx {
                limits,
                socket,
                config: u.clone(),
                routes: Arc::clone(&routes),
                drain: drain.clone(),
                metrics: Arc::clone(&metrics),
                tracker: tracker.clone(),
                sessions: Arc::clone(&sessions),
            });
            let (ask, asks) = mpsc::unbounded_channel();
            let adopt = (start.upgrade && origin == Origin::Inherited).then(|| {
                let (tx, rx) = oneshot::channel();
                adopting.insert(key.clone(), tx);
                rx
            });
            relays.push((key, ask));
            let handover = crate::udp::Handover {
                asks: Some(asks),
                adopt,
            };
            crate::udp::spawn(sock, ctx, stop_rx.clone(), handover).map_err(bind_err)?;
        }
        metrics.upgrade_adopted("listener", inherited);
        if start.upgrade {
            tracing::info!(
                event = "sockets_taken",
                inherited,
                closed = unclaimed,
                "took the old process's listening sockets"
            );
        }
        let process = Arc::new(Process {
            started: std::time::Instant::now(),
            launch: start.launch,
            sessions,
            drain: drain.clone(),
            tracker: tracker.clone(),
            local_tracker,
            metrics: Arc::clone(&metrics),
            routes: Arc::clone(&routes),
            inventory: Arc::clone(&inventory),
            traffic,
            local,
            relays: Mutex::new(relays),
            adopting: Mutex::new(adopting),
            listeners,
            upgrade: Mutex::new(UpgradeState::Idle),
            retired: watch::channel(None).0,
            drain_timeout: config.drain_timeout,
        });
        if let Some(l) = control {
            match tokio::net::UnixListener::from_std(l) {
                Ok(l) => {
                    background.push(tokio::spawn(crate::control::serve(l, Arc::clone(&process))))
                }
                Err(e) => {
                    tracing::warn!(event = "control_unavailable", error = %e, "cannot serve the control socket")
                }
            }
        }
        background.push(tokio::spawn(Arc::clone(&process.sessions).sampler()));
        let mut watchdog = None;
        if !start.upgrade {
            notify::notify("READY=1");
            if let Some(period) = notify::watchdog_interval() {
                watchdog = Some(tokio::spawn(notify::watchdog(period)));
            }
        }
        Ok(Server {
            addrs,
            stop,
            process,
            accept_loops,
            background,
            watchdog,
            drain_timeout: config.drain_timeout,
            drain_grace: config.drain_grace,
            admin,
            control: control_path,
            certs,
        })
    }

    /// What operator commands and the live upgrade act on.
    pub fn process(&self) -> &Arc<Process> {
        &self.process
    }

    /// Replace the routing table and pools for new connections (SIGHUP
    /// reload). Pools start with fresh health state.
    pub fn reload_routes(&self, config: &Config) -> Result<(), String> {
        let p = &self.process;
        let next = routing(config, &p.metrics, Some(&p.routes.current()))?;
        p.routes.replace(next);
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
        &self.process.metrics
    }

    /// Bound addresses, by listener name.
    pub fn local_addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    /// Live connections.
    pub fn active(&self) -> usize {
        self.process.tracker.active()
    }

    /// The drain sequence for load-balancer deregistration:
    /// 1. health turns 503 and systemd is told `STOPPING=1`;
    /// 2. listeners keep accepting for the drain grace, so the load
    ///    balancer's health checks notice before connections are refused;
    /// 3. listeners close;
    /// 4. established connections run until they end or the drain deadline
    ///    passes (or `force` resolves), then the rest are closed.
    pub async fn shutdown(self, force: impl std::future::Future<Output = ()>) {
        self.shutdown_within(None, force).await;
    }

    /// [`Server::shutdown`] with `timeout` in place of `drain_timeout`, if
    /// given (`splicegate ctl drain --deadline`).
    pub async fn shutdown_within(
        mut self,
        timeout: Option<Duration>,
        force: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(force);
        if let Some(t) = timeout {
            self.drain_timeout = t;
        }
        let p = Arc::clone(&self.process);
        p.drain.start();
        p.drain
            .set_deadline_at(std::time::Instant::now() + self.drain_grace + self.drain_timeout);
        notify::notify("STOPPING=1");
        let mut forced = false;
        if !self.drain_grace.is_zero() {
            tracing::info!(event = "drain_grace", grace = ?self.drain_grace, active = p.tracker.active(), "health now answers 503; still accepting during the grace period");
            tokio::select! {
                _ = tokio::time::sleep(self.drain_grace) => {}
                _ = &mut force => forced = true,
            }
        }
        p.traffic.send_replace(Gate::Closed);
        let _ = self.stop.send(true);
        for h in self.accept_loops {
            let _ = h.await;
        }
        p.inventory.release_traffic();
        let active = p.tracker.active();
        tracing::info!(event = "draining", active, drain_timeout = ?self.drain_timeout, "stopped accepting; draining established connections");
        let finished = forced
            || tokio::select! {
                _ = p.tracker.wait_idle() => true,
                _ = tokio::time::sleep(self.drain_timeout) => false,
                _ = &mut force => false,
            };
        let finished = finished && p.tracker.active() == 0;
        if !finished {
            let left = p.tracker.active();
            tracing::warn!(
                event = "drain_deadline",
                active = left,
                "closing connections still open"
            );
            p.drain.expire();
            p.sessions.expire();
            // Each connection ends within one scheduling round once told.
            let _ = tokio::time::timeout(Duration::from_secs(5), p.tracker.wait_idle()).await;
        }
        for h in self.background {
            h.abort();
        }
        if let Some(w) = self.watchdog {
            w.abort();
        }
        remove_control(&p, self.control.as_deref());
        tracing::info!(event = "stopped", "all connections closed");
    }

    /// Resolves when a live upgrade handed this process over, with the new
    /// process's pid.
    pub async fn retired(&self) -> u32 {
        let mut rx = self.process.retired.subscribe();
        let got = rx.wait_for(Option::is_some).await.map(|pid| *pid);
        match got {
            Ok(Some(pid)) => pid,
            _ => std::future::pending().await,
        }
    }

    /// After a live upgrade: serve what stayed here (terminate sessions,
    /// connections that were still in their hello) until it ends, the
    /// drain timeout passes or `force` resolves; then close the rest.
    pub async fn retire(self, force: impl std::future::Future<Output = ()>) {
        let p = Arc::clone(&self.process);
        // The new process is systemd's main one now, and pings its watchdog.
        if let Some(w) = self.watchdog {
            w.abort();
        }
        let left = p.tracker.active();
        tracing::info!(event = "retiring", active = left, drain_timeout = ?self.drain_timeout, "serving what stays with this process until it ends");
        let finished = tokio::select! {
            _ = p.tracker.wait_idle() => true,
            _ = tokio::time::sleep(self.drain_timeout) => false,
            _ = force => false,
        };
        if !finished || p.tracker.active() > 0 {
            tracing::warn!(
                event = "drain_deadline",
                active = p.tracker.active(),
                "closing connections still open"
            );
            p.drain.expire();
            p.sessions.expire();
            let _ = tokio::time::timeout(Duration::from_secs(5), p.tracker.wait_idle()).await;
        }
        let _ = self.stop.send(true);
        // Health checks and commands this process accepted before it
        // handed its sockets over are answered (each within 5 s).
        let _ = tokio::time::timeout(Duration::from_secs(6), p.local_tracker.wait_idle()).await;
        for h in self.background {
            h.abort();
        }
        tracing::info!(event = "stopped", "all connections closed");
    }
}

/// Remove the control socket's file at exit, unless a live upgrade handed
/// it to the new process.
fn remove_control(p: &Process, path: Option<&std::path::Path>) {
    let Some(path) = path else { return };
    if matches!(*p.upgrade_state(), UpgradeState::Retired(_)) {
        return;
    }
    let _ = std::fs::remove_file(path);
}
