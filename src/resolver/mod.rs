//! The Session Resolver: from a DCV session id to the agent that hosts it,
//! by the API the DCV Connection Gateway calls
//! (`POST {url}/resolveSession?sessionId=ID&transport=HTTP|QUIC&clientIpAddress=IP`,
//! see docs/session-resolver.md).
//!
//! Sits between [`crate::route`], which finds a session id in the name or
//! the request ([`crate::route::Target::Session`]), and
//! [`crate::upstream`], which dials what the resolver answered. Whatever
//! it answers, only endpoints inside the configured allowlist (networks,
//! host-name suffixes, ports) come out of here.
//!
//! Answers are cached per (session, transport, client address): a resolver
//! may answer differently per client, as the Gateway's API lets it.
//! Concurrent lookups of one key share one request (single flight), which
//! runs in a task of its own so a client that goes away does not cancel it
//! for the others. Requests to the resolver are bounded in number
//! (`max_in_flight`, held until the resolver answers or [`LATE_MAX`], not
//! only until the waiters give up) and the wait for an answer in time
//! (`timeout`).
//!
//! A QUIC lookup starts from an unauthenticated, spoofable datagram, so it
//! never costs what the TCP half's does: it is answered from the cache
//! entry the client's TCP half filled (same session, same client) when
//! there is one, and otherwise asks on a small share of the requests of
//! its own ([`quic_share`]), refused at once rather than queued when that
//! share is busy. A flood of Initials naming random sessions can neither
//! push the resolver past `max_in_flight` nor delay a TCP lookup.

mod client;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::cidr::Cidr;
use crate::metrics::Metrics;
use crate::outcome::Kind;
use crate::route::{valid_session_id, Target};

pub use client::{parse_answer, Wire};

/// Settings of the `[resolver]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Base URL (`http://host:port[/prefix]` or `https://...`).
    pub url: String,
    /// CA certificates (PEM) the resolver's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Time allowed for one request, connection included.
    pub timeout: Duration,
    /// How long an answer is reused (zero: not cached).
    pub cache_ttl: Duration,
    /// How long a `404` is reused (zero: not cached).
    pub negative_ttl: Duration,
    /// Most cached answers.
    pub cache_max: usize,
    /// Most requests to the resolver at once.
    pub max_in_flight: usize,
    /// Networks an answered IP address must fall in.
    pub allow: Vec<Cidr>,
    /// Host-name suffixes an answered name must end with (on a label
    /// boundary).
    pub allow_names: Vec<String>,
    /// Ports an answer may name.
    pub ports: Vec<u16>,
}

impl ResolverConfig {
    /// Defaults around a URL.
    pub fn new(url: &str) -> Self {
        ResolverConfig {
            url: url.to_owned(),
            ca: None,
            client_cert: None,
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            cache_max: 10_000,
            max_in_flight: 64,
            allow: Vec::new(),
            allow_names: Vec::new(),
            ports: vec![8443],
        }
    }
}

/// How long a request the waiters gave up on may still hold its slot,
/// waiting for the resolver's answer.
pub const LATE_MAX: Duration = Duration::from_secs(30);

/// The requests of `max_in_flight` QUIC lookups may use: an eighth
/// (none below 8: QUIC lookups then come from the TCP half's answers only).
pub fn quic_share(max_in_flight: usize) -> usize {
    max_in_flight / 8
}

/// Which of a DCV session's transports a lookup is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// HTTPS and WebSocket over TCP.
    Http,
    /// QUIC over UDP.
    Quic,
}

impl Transport {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "HTTP",
            Transport::Quic => "QUIC",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a session lives, checked against the allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The agent to dial.
    pub target: Target,
    /// The path the agent serves DCV under (`/` unless the agent sets
    /// `web-url-path`).
    pub web_url_path: String,
}

/// Why a session was not resolved to an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No answer: timeout, refused, TLS failure or a 5xx.
    #[error("resolver: {0}")]
    Unavailable(String),
    /// The resolver does not know the session (404, or 400 for an id it
    /// rejects).
    #[error("resolver: session {session:?} is unknown ({why})")]
    Unknown {
        /// The session id.
        session: String,
        /// What the resolver answered.
        why: String,
    },
    /// An answer splicegate does not act on: not JSON, the wrong session or
    /// transport, or an endpoint outside the allowlist.
    #[error("resolver: {0}")]
    BadAnswer(String),
}

impl ResolveError {
    /// The outcome this refusal closes the connection with.
    pub fn kind(&self) -> Kind {
        match self {
            ResolveError::Unavailable(_) => Kind::ResolverUnavailable,
            ResolveError::Unknown { .. } => Kind::SessionUnknown,
            ResolveError::BadAnswer(_) => Kind::ResolverBadAnswer,
        }
    }
}

type Key = (String, Transport, Option<IpAddr>);
type Outcome = Result<Answer, ResolveError>;

enum Slot {
    /// A cached answer (or 404) until `expires`.
    Ready { outcome: Outcome, expires: Instant },
    /// A request in flight; its outcome arrives on the channel.
    Pending(watch::Receiver<Option<Outcome>>),
}

/// Cached answers, kept across reloads that keep the URL.
#[derive(Default)]
struct Cache {
    slots: Mutex<HashMap<Key, Slot>>,
}

impl Cache {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// A configured resolver: its HTTP client, cache and health.
pub struct Resolver {
    config: ResolverConfig,
    client: client::Client,
    cache: Arc<Cache>,
    /// Requests for TCP (HTTP transport) lookups.
    permits: Arc<Semaphore>,
    /// Requests for QUIC lookups: [`quic_share`] of `max_in_flight`.
    quic_permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    health: AtomicU8,
}

impl Resolver {
    /// Build the client (loading the CA and client certificate). The
    /// cache of `previous` is kept when the URL and the allowlist are the
    /// same. Errors name
    /// the file or value at fault.
    pub fn new(
        config: ResolverConfig,
        metrics: Arc<Metrics>,
        previous: Option<&Resolver>,
    ) -> Result<Resolver, String> {
        let client = client::build(&config)?;
        // Cached answers passed the old allowlist: kept only if it is the
        // same.
        let same = |p: &ResolverConfig| {
            p.url == config.url
                && p.allow == config.allow
                && p.allow_names == config.allow_names
                && p.ports == config.ports
        };
        let cache = match previous {
            Some(p) if same(&p.config) => Arc::clone(&p.cache),
            _ => Arc::default(),
        };
        let quic = quic_share(config.max_in_flight);
        Ok(Resolver {
            permits: Arc::new(Semaphore::new(config.max_in_flight - quic)),
            quic_permits: Arc::new(Semaphore::new(quic)),
            health: AtomicU8::new(previous.map_or(UNKNOWN, |p| p.health.load(Ordering::Relaxed))),
            config,
            client,
            cache,
            metrics,
        })
    }

    /// Check that `config`'s files load, without building anything that
    /// needs a runtime (`splicegate check`).
    pub fn check(config: &ResolverConfig) -> Result<(), String> {
        client::tls_config(config).map(drop)
    }

    /// The settings.
    pub fn config(&self) -> &ResolverConfig {
        &self.config
    }

    /// Whether the resolver answered its last request (any answer below
    /// 500 counts). Unknown before the first request.
    pub fn is_up(&self) -> bool {
        self.health.load(Ordering::Relaxed) == UP
    }

    /// Where `session` lives, for a client at `client` (None: unknown).
    /// Waits at most the resolver's `timeout` (plus the wait for a
    /// request another connection started).
    pub async fn resolve(
        self: &Arc<Self>,
        session: &str,
        transport: Transport,
        client: Option<IpAddr>,
    ) -> Outcome {
        if !valid_session_id(session) {
            return Err(ResolveError::Unknown {
                session: crate::logging::printable(session).into_owned(),
                why: "not a valid session id, not sent to the resolver".to_owned(),
            });
        }
        let key: Key = (session.to_owned(), transport, client);
        let mut rx = {
            let mut slots = self.cache.lock();
            let now = Instant::now();
            if transport == Transport::Quic {
                // The client's TCP half placed the session already.
                let tcp: Key = (session.to_owned(), Transport::Http, client);
                match slots.get(&tcp) {
                    Some(Slot::Ready {
                        outcome: Ok(answer),
                        expires,
                    }) if *expires > now => {
                        self.metrics.resolver_cache("hit_tcp");
                        return Ok(answer.clone());
                    }
                    _ => {}
                }
            }
            match slots.get(&key) {
                Some(Slot::Ready { outcome, expires }) if *expires > now => {
                    self.metrics.resolver_cache("hit");
                    return outcome.clone();
                }
                // (A request whose task is gone, with its runtime, is
                // started again below.)
                Some(Slot::Pending(rx)) if rx.has_changed().is_ok() => {
                    self.metrics.resolver_cache("shared");
                    rx.clone()
                }
                _ => {
                    // A QUIC lookup takes a request of its share now or
                    // not at all.
                    let permit = match transport {
                        Transport::Http => None,
                        Transport::Quic => match Arc::clone(&self.quic_permits).try_acquire_owned()
                        {
                            Ok(p) => Some(p),
                            Err(_) => {
                                self.metrics.resolver_cache("quic_busy");
                                return Err(ResolveError::Unavailable(format!(
                                    "QUIC lookups at their share of {} requests in flight; not asked",
                                    quic_share(self.config.max_in_flight)
                                )));
                            }
                        },
                    };
                    self.metrics.resolver_cache("miss");
                    let (tx, rx) = watch::channel(None);
                    slots.insert(key.clone(), Slot::Pending(rx.clone()));
                    tokio::spawn(Arc::clone(self).fetch(key, tx, permit));
                    rx
                }
            }
        };
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        outcome.unwrap_or_else(|| {
            Err(ResolveError::Unavailable(
                "the request to the resolver was abandoned".to_owned(),
            ))
        })
    }

    /// One request for `key`, its outcome cached and sent to every waiter.
    /// The waiters give up after `timeout` (the wait for a request slot
    /// included); the request itself, and the slot it holds, goes on
    /// until the resolver answers (that late answer is cached) or
    /// [`LATE_MAX`], so `max_in_flight` bounds what the resolver is
    /// working on.
    async fn fetch(
        self: Arc<Self>,
        key: Key,
        tx: watch::Sender<Option<Outcome>>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let started = Instant::now();
        let limit = self.config.timeout;
        let deadline = started + limit;
        let unavailable = || {
            Err(ResolveError::Unavailable(format!(
                "no answer from {} within {limit:?}",
                self.config.url
            )))
        };
        let permit = match permit {
            Some(p) => Some(p),
            None => tokio::time::timeout_at(deadline, Arc::clone(&self.permits).acquire_owned())
                .await
                .ok()
                .and_then(Result::ok),
        };
        let Some(permit) = permit else {
            let outcome: Outcome = unavailable();
            self.record(&outcome, started.elapsed());
            self.settle(key, &outcome);
            let _ = tx.send(Some(outcome));
            return;
        };
        let session = key.0.clone();
        let request = client::request(&self.client, &self.config, &session, key.1, key.2);
        tokio::pin!(request);
        let outcome = match tokio::time::timeout_at(deadline, &mut request).await {
            Ok(wire) => wire.and_then(|w| check_answer(&self.config, &key.0, key.1, w)),
            Err(_) => {
                let outcome: Outcome = unavailable();
                self.record(&outcome, started.elapsed());
                self.settle(key.clone(), &outcome);
                let _ = tx.send(Some(outcome));
                // The resolver is still working on it: keep its slot.
                let late = tokio::time::timeout_at(started + LATE_MAX, request).await;
                if let Ok(wire) = late {
                    let outcome = wire.and_then(|w| check_answer(&self.config, &key.0, key.1, w));
                    if !matches!(outcome, Err(ResolveError::Unavailable(_))) {
                        self.settle(key, &outcome);
                    }
                }
                drop(permit);
                return;
            }
        };
        drop(permit);
        self.record(&outcome, started.elapsed());
        self.settle(key, &outcome);
        let _ = tx.send(Some(outcome));
    }

    /// Cache `outcome` for `key` for its time to live (none for an
    /// unavailable resolver), replacing the pending request.
    fn settle(&self, key: Key, outcome: &Outcome) {
        let ttl = match outcome {
            Ok(_) => self.config.cache_ttl,
            Err(ResolveError::Unknown { .. }) => self.config.negative_ttl,
            Err(_) => Duration::ZERO,
        };
        let mut slots = self.cache.lock();
        if matches!(slots.get(&key), Some(Slot::Pending(_))) || !ttl.is_zero() {
            slots.remove(&key);
        }
        if !ttl.is_zero() && self.room(&mut slots) {
            slots.insert(
                key,
                Slot::Ready {
                    outcome: outcome.clone(),
                    expires: Instant::now() + ttl,
                },
            );
        }
    }

    /// Whether one more answer may be cached, dropping expired ones when
    /// the cache is full.
    fn room(&self, slots: &mut HashMap<Key, Slot>) -> bool {
        if slots.len() < self.config.cache_max {
            return true;
        }
        let now = Instant::now();
        slots.retain(|_, s| !matches!(s, Slot::Ready { expires, .. } if *expires <= now));
        slots.len() < self.config.cache_max
    }

    /// Metrics and health from one request's outcome.
    fn record(&self, outcome: &Outcome, took: Duration) {
        let label = match outcome {
            Ok(_) => "ok",
            Err(e) => e.kind().as_str(),
        };
        self.metrics.resolver_request(label, took);
        let up = !matches!(outcome, Err(ResolveError::Unavailable(_)));
        self.health
            .store(if up { UP } else { DOWN }, Ordering::Relaxed);
    }

    /// Probe the resolver every `interval` (for `require_resolver`): any
    /// answer below 500 to a lookup of a session nobody has counts as up.
    pub async fn probe(self: Arc<Self>, interval: Duration) {
        loop {
            let started = Instant::now();
            let asked = client::request(
                &self.client,
                &self.config,
                "splicegate-health-probe",
                Transport::Http,
                None,
            );
            let outcome = tokio::time::timeout(self.config.timeout, asked)
                .await
                .unwrap_or_else(|_| Err(ResolveError::Unavailable("probe timed out".into())));
            let up = !matches!(outcome, Err(ResolveError::Unavailable(_)));
            let before = self
                .health
                .swap(if up { UP } else { DOWN }, Ordering::Relaxed);
            if before != UNKNOWN && (before == UP) != up {
                match &outcome {
                    Err(ResolveError::Unavailable(why)) => tracing::warn!(
                        event = "resolver_down",
                        url = %self.config.url,
                        reason = %why,
                        "session resolver is not answering"
                    ),
                    _ => tracing::info!(
                        event = "resolver_up",
                        url = %self.config.url,
                        "session resolver answers again"
                    ),
                }
            }
            tokio::time::sleep_until(started + interval).await;
        }
    }
}

/// An answer as splicegate will act on it: the session and transport
/// asked for, an endpoint inside `config`'s allowlist. Pure.
pub fn check_answer(
    config: &ResolverConfig,
    session: &str,
    transport: Transport,
    wire: Wire,
) -> Outcome {
    let bad = |what: String| Err(ResolveError::BadAnswer(what));
    if let Some(id) = &wire.session_id {
        if id != session {
            return bad(format!(
                "answered for session {:?}, asked for {session:?}",
                crate::logging::printable(id)
            ));
        }
    }
    if !wire.transport.eq_ignore_ascii_case(transport.as_str()) {
        return bad(format!(
            "answered transport {:?} for a {transport} lookup",
            crate::logging::printable(&wire.transport)
        ));
    }
    let port = wire.port;
    let target = allowed_endpoint(config, &wire.endpoint, port)?;
    if !config.ports.contains(&port) {
        return bad(format!(
            "endpoint {}:{port}: port {port} is not in the allowed ports; not dialled",
            crate::logging::printable(&wire.endpoint)
        ));
    }
    let path = wire.web_url_path.as_deref().unwrap_or("/");
    let path_ok = path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic());
    if !path_ok || path.len() > 1024 {
        return bad(format!(
            "WebUrlPath {:?} is not an absolute path",
            crate::logging::printable(path)
        ));
    }
    Ok(Answer {
        target,
        web_url_path: path.to_owned(),
    })
}

/// The endpoint as a target, if the allowlist admits it.
fn allowed_endpoint(
    config: &ResolverConfig,
    endpoint: &str,
    port: u16,
) -> Result<Target, ResolveError> {
    let shown = crate::logging::printable(endpoint);
    let bare = endpoint
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .unwrap_or(endpoint);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if config.allow.iter().any(|c| c.contains(ip)) {
            return Ok(Target::Addr(std::net::SocketAddr::new(ip, port)));
        }
        return Err(ResolveError::BadAnswer(format!(
            "endpoint {shown} is outside the allowed networks; not dialled"
        )));
    }
    let Some(name) = crate::sniff::normalise_sni(endpoint.as_bytes()) else {
        return Err(ResolveError::BadAnswer(format!(
            "endpoint {shown:?} is neither an IP address nor a host name"
        )));
    };
    let covered = config.allow_names.iter().any(|s| {
        name == *s
            || name
                .strip_suffix(s.as_str())
                .is_some_and(|head| head.ends_with('.'))
    });
    if covered {
        return Ok(Target::Host { name, port });
    }
    Err(ResolveError::BadAnswer(format!(
        "endpoint {shown} is not under an allowed host-name suffix; not dialled"
    )))
}

/// A `200` answer's body as splicegate will act on it ([`parse_answer`],
/// then [`check_answer`]). Pure: the fuzz target's entry point.
pub fn answer(
    config: &ResolverConfig,
    session: &str,
    transport: Transport,
    body: &[u8],
) -> Outcome {
    check_answer(config, session, transport, parse_answer(body)?)
}
