//! The live routing state: the route tables with the pools they refer to
//! and their health checks, and the session resolver, swapped as one on
//! reload. Each connection takes
//! the current one once, when it is ready to route, so a reload never
//! disturbs established sessions.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::maintenance::Drained;
use crate::resolver::{Answer, ResolveError, Resolver, Transport};
use crate::route::path::PathTable;
use crate::route::{RouteTable, Target};
use crate::upstream::health;
use crate::upstream::pool::{Pool, PoolConfig};

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
    /// The session resolver, for routes that name sessions.
    pub resolver: Option<Arc<Resolver>>,
    /// Health answers 503 while the resolver does not answer.
    require_resolver: bool,
    checks: Vec<JoinHandle<()>>,
}

/// What the routing says about one agent it names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedAgent {
    /// Rules that send sessions to it (directly or through a pool).
    pub routes: Vec<String>,
    /// Pools it is in.
    pub pools: Vec<String>,
    /// Up by the pools' health checks (None: no pool checks it).
    pub up: Option<bool>,
    /// Connections open to it, as its pools count them.
    pub active: usize,
}

/// How often a required resolver is probed.
pub const RESOLVER_PROBE_INTERVAL: Duration = Duration::from_secs(5);

impl Routing {
    /// Build the pools and start their health checks (inside a runtime).
    pub fn start(
        table: RouteTable,
        paths: PathTable,
        pools: &[PoolConfig],
        required: Vec<String>,
    ) -> Routing {
        let pools: HashMap<String, Arc<Pool>> = pools
            .iter()
            .map(|p| (p.name.clone(), Arc::new(Pool::new(p.clone()))))
            .collect();
        let checks = pools.values().flat_map(health::spawn).collect();
        Routing {
            table,
            paths,
            pools,
            required,
            resolver: None,
            require_resolver: false,
            checks,
        }
    }

    /// Add the session resolver; with `required`, probe it so that health
    /// reports whether it answers.
    pub fn with_resolver(mut self, resolver: Option<Arc<Resolver>>, required: bool) -> Routing {
        if let (Some(r), true) = (&resolver, required) {
            let probe = Arc::clone(r).probe(RESOLVER_PROBE_INTERVAL);
            self.checks.push(tokio::spawn(probe));
        }
        self.resolver = resolver;
        self.require_resolver = required;
        self
    }

    /// Where the DCV session `id` lives, asked of the resolver for a
    /// client at `client` (None: unknown).
    pub async fn resolve_session(
        &self,
        id: &str,
        transport: Transport,
        client: Option<IpAddr>,
    ) -> Result<Answer, ResolveError> {
        match &self.resolver {
            Some(r) => r.resolve(id, transport, client).await,
            None => Err(ResolveError::Unavailable(
                "a route names a session but no [resolver] is configured".to_owned(),
            )),
        }
    }

    /// A slot on `agent` (its display name) of `pool`, for a connection
    /// adopted in a live upgrade, so least-conn and `max_conns` count it.
    /// None when the pool or the agent is no longer configured.
    pub fn adopt_slot(&self, pool: &str, agent: &str) -> Option<crate::upstream::pool::Slot> {
        self.pools
            .get(pool)?
            .agents()
            .iter()
            .find(|a| a.name == agent)
            .map(|a| a.adopt_slot())
    }

    /// Every agent the routes and pools name, by its name in the access
    /// log: the rules that name it, the pools it is in, and its health
    /// (pool agents only: up by active and passive checks).
    pub fn named_agents(&self) -> BTreeMap<String, NamedAgent> {
        let mut out: BTreeMap<String, NamedAgent> = BTreeMap::new();
        let now = tokio::time::Instant::now();
        for (name, pool) in &self.pools {
            for a in pool.agents() {
                let e = out.entry(a.name.clone()).or_default();
                e.pools.push(name.clone());
                e.up = Some(e.up.unwrap_or(true) && a.is_up(now));
                e.active += a.active();
            }
        }
        for (route, target) in self.table.targets().into_iter().chain(self.paths.targets()) {
            match target {
                Target::Addr(_) | Target::Host { .. } => {
                    out.entry(target.to_string())
                        .or_default()
                        .routes
                        .push(route);
                }
                Target::Pool(p) => {
                    for a in self.pools.get(&p).map(|p| p.agents()).unwrap_or_default() {
                        out.entry(a.name.clone())
                            .or_default()
                            .routes
                            .push(route.clone());
                    }
                }
                Target::Session(_) => {}
            }
        }
        for e in out.values_mut() {
            e.pools.sort();
            e.routes.sort();
            e.routes.dedup();
        }
        out
    }

    /// Why the proxy should be reported unhealthy, if it should: draining,
    /// or a required pool with no agent up (active and passive health).
    pub fn unhealthy(&self, draining: bool) -> Option<String> {
        if draining {
            return Some("draining".to_owned());
        }
        if self.require_resolver && !self.resolver.as_ref().is_some_and(|r| r.is_up()) {
            return Some("session resolver: not answering".to_owned());
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

/// The current [`Routing`], replaceable while the proxy runs, and what
/// outlives every replacement: the agents an operator drained.
pub struct SharedRoutes {
    current: RwLock<Arc<Routing>>,
    /// Agents no new session is routed to (kept across reloads).
    pub drained: Drained,
}

impl SharedRoutes {
    /// A holder with `routing` as the current one.
    pub fn new(routing: Routing) -> Self {
        SharedRoutes {
            current: RwLock::new(Arc::new(routing)),
            drained: Drained::default(),
        }
    }

    /// The current routing.
    pub fn current(&self) -> Arc<Routing> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Make `routing` current for new connections.
    pub fn replace(&self, routing: Routing) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routing);
    }
}
