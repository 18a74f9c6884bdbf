//! The open sessions: every connection that is forwarding (passthrough or
//! terminate) and every routed QUIC flow, with what the access log says
//! about it and the [`Stop`] that ends or pauses it. Operator commands list
//! and close sessions here, the drain deadline stops them all, and a live
//! upgrade pauses the passthrough ones and collects them as [`Handoff`]s.
//!
//! A session registers once, when it starts forwarding, and is removed when
//! its task ends (the [`Open`] guard). Nothing here runs per chunk of data:
//! the registry's mutex is taken at open, at close and by commands.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};

use crate::forward::Paused;
use crate::shutdown::{Halt, Stop};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A new connection (or QUIC flow) id, unique in the process.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// The id the next connection gets.
pub fn peek_next_id() -> u64 {
    NEXT_ID.load(Ordering::Relaxed)
}

/// Number connections from `first` on (a process started by a live
/// upgrade continues above the old process's ids).
pub fn ids_from(first: u64) {
    NEXT_ID.fetch_max(first, Ordering::Relaxed);
}

/// How a session reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TLS passthrough over TCP (spliced).
    Tcp,
    /// A terminate listener: TLS ends at splicegate.
    Terminate,
    /// A QUIC flow of the UDP relay.
    Quic,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Terminate => "terminate",
            Transport::Quic => "quic",
        })
    }
}

/// What the access log knows about a session once it is routed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Info {
    /// Connection (or flow) id, unique in the process and kept across a
    /// live upgrade.
    pub id: u64,
    /// How it arrived.
    pub transport: Transport,
    /// The listener's name.
    pub listener: String,
    /// The TCP (or UDP) peer: the load balancer over PrivateLink.
    pub peer: SocketAddr,
    /// The real client (from the PROXY header, else the peer).
    pub client: SocketAddr,
    /// The PrivateLink endpoint id from the PROXY header.
    pub vpce: Option<String>,
    /// The SNI of its ClientHello.
    pub sni: Option<String>,
    /// The ALPN names its ClientHello offered.
    pub alpn: Vec<String>,
    /// The route that chose the agent.
    pub route: String,
    /// The agent (for pools, the one chosen).
    pub agent: String,
    /// The pool the agent was chosen from.
    #[serde(default)]
    pub pool: Option<String>,
    /// The agent came from the client's name or path: `/metrics` labels
    /// it `dynamic`.
    pub dynamic: bool,
    /// When the connection was accepted (or the flow's first datagram).
    pub started: SystemTime,
}

impl Info {
    /// The `agent` label for `/metrics`.
    pub fn metrics_agent(&self) -> &str {
        if self.dynamic {
            "dynamic"
        } else {
            &self.agent
        }
    }
}

pub use crate::counters::Bytes;

/// One open session.
#[derive(Debug)]
pub struct Session {
    /// What the access log says about it.
    pub info: Info,
    /// Its byte counters.
    pub bytes: Bytes,
    /// Tells it to stop (close, deadline) or to pause for a handover.
    pub stop: Stop,
    /// A live upgrade may move it: a passthrough connection on the splice
    /// or copy engine. Terminate sessions keep their TLS state in this
    /// process; QUIC flows move with their listener's relay.
    pub movable: bool,
    /// Its span (`conn` or `flow`): progress lines are written in it.
    pub span: tracing::Span,
    /// A `progress` line this often (None: never).
    pub progress: Option<Duration>,
    /// What the once-a-second sampler last saw.
    activity: Mutex<Activity>,
}

/// What the sampler saw of a session.
#[derive(Debug, Clone, Copy)]
struct Activity {
    /// Bytes both ways at the last sample.
    total: u64,
    /// When that total last changed (or the session opened).
    changed: Instant,
    /// When the last progress line was written (or the session opened).
    progress_at: Instant,
}

impl Session {
    /// How long no byte moved either way, to within a second (the
    /// sampler's period).
    pub fn idle(&self, now: Instant) -> Duration {
        let a = *self.activity.lock().unwrap_or_else(|p| p.into_inner());
        now.saturating_duration_since(a.changed)
    }

    /// Note the totals at `now`; true when a progress line is due.
    fn sample(&self, now: Instant) -> bool {
        let (to_agent, to_client) = self.bytes.totals();
        let total = to_agent.wrapping_add(to_client);
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        if total != a.total {
            a.total = total;
            a.changed = now;
        }
        match self.progress {
            Some(every) if now.saturating_duration_since(a.progress_at) >= every => {
                a.progress_at = now;
                true
            }
            _ => false,
        }
    }
}

/// A session that starts forwarding, as [`Sessions::open`] takes it.
#[derive(Debug)]
pub struct New {
    /// What the access log says about it.
    pub info: Info,
    /// Its counters.
    pub bytes: Bytes,
    /// A live upgrade may move it.
    pub movable: bool,
    /// Its span.
    pub span: tracing::Span,
    /// How often it logs its progress (None: never).
    pub progress: Option<Duration>,
}

/// A passthrough session paused for a live upgrade: its sockets, the
/// bytes in flight each way, and what the access log and metrics need.
#[derive(Debug)]
pub struct Handoff {
    /// The session (its info and counters).
    pub session: Arc<Session>,
    /// The client's socket.
    pub client: std::net::TcpStream,
    /// The agent's socket.
    pub agent: std::net::TcpStream,
    /// The bytes in flight each way, and each direction's state.
    pub paused: Paused,
    /// How long the session has been open.
    pub age: Duration,
}

/// A handoff and where to say whether it was taken (`Err` gives it back:
/// the session goes on in this process).
pub type Offer = (Handoff, oneshot::Sender<Result<(), Handoff>>);

/// Every open session of the process.
#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    open: HashMap<u64, Arc<Session>>,
    /// The drain deadline passed: sessions that open now stop at once.
    expired: bool,
    /// A live upgrade is collecting sessions: movable ones that open now
    /// pause at once and are offered here.
    handover: Option<mpsc::UnboundedSender<Offer>>,
}

/// Held by a session's task; dropping it removes the session.
#[derive(Debug)]
pub struct Open {
    sessions: Arc<Sessions>,
    session: Arc<Session>,
}

impl Open {
    /// The session.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.sessions.lock().open.remove(&self.session.info.id);
    }
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a session that starts forwarding. If the drain deadline
    /// has passed it is told to stop at once; during a live upgrade a
    /// movable one is told to pause.
    pub fn open(self: &Arc<Self>, new: New) -> Open {
        let now = Instant::now();
        let total = {
            let (a, c) = new.bytes.totals();
            a.wrapping_add(c)
        };
        let movable = new.movable;
        let session = Arc::new(Session {
            info: new.info,
            bytes: new.bytes,
            stop: Stop::default(),
            movable,
            span: new.span,
            progress: new.progress,
            activity: Mutex::new(Activity {
                total,
                changed: now,
                progress_at: now,
            }),
        });
        let mut g = self.lock();
        if g.expired {
            session.stop.raise(Halt::Deadline);
        } else if movable && g.handover.is_some() {
            session.stop.raise(Halt::Handover);
        }
        g.open.insert(session.info.id, Arc::clone(&session));
        drop(g);
        Open {
            sessions: Arc::clone(self),
            session,
        }
    }

    /// Every open session, by id.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut v: Vec<_> = self.lock().open.values().cloned().collect();
        v.sort_by_key(|s| s.info.id);
        v
    }

    /// The session with this id.
    pub fn get(&self, id: u64) -> Option<Arc<Session>> {
        self.lock().open.get(&id).cloned()
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// No session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Open sessions a live upgrade may move.
    pub fn movable(&self) -> usize {
        self.lock().open.values().filter(|s| s.movable).count()
    }

    /// Note every session's totals at `now` (once a second: how long a
    /// session has been idle is known to that much); the ones whose
    /// progress line is due.
    pub fn sample(&self, now: Instant) -> Vec<Arc<Session>> {
        let open: Vec<Arc<Session>> = self.lock().open.values().cloned().collect();
        open.into_iter().filter(|s| s.sample(now)).collect()
    }

    /// Once a second until the task is dropped: note every session's
    /// activity, and write the `progress` line of each that is due (in its
    /// span: the same fields as its `closed` line will have, so far).
    pub async fn sampler(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            for s in self.sample(now) {
                let (to_agent, to_client) = s.bytes.totals();
                let i = &s.info;
                let age = SystemTime::now()
                    .duration_since(i.started)
                    .unwrap_or_default();
                tracing::info!(
                    target: crate::logging::ACCESS_LOG,
                    parent: &s.span,
                    event = "progress",
                    transport = %i.transport,
                    sni = i.sni.as_deref().unwrap_or("-"),
                    route = %i.route,
                    agent = %i.agent,
                    bytes_to_agent = to_agent,
                    bytes_to_client = to_client,
                    idle_s = s.idle(now).as_secs(),
                    duration_ms = age.as_millis() as u64,
                    "session in progress"
                );
            }
        }
    }

    /// The drain deadline passed: tell every session, and every one that
    /// opens from now on, to stop.
    pub fn expire(&self) {
        let mut g = self.lock();
        g.expired = true;
        for s in g.open.values() {
            s.stop.raise(Halt::Deadline);
        }
    }

    /// A live upgrade starts collecting: every movable session pauses and
    /// is offered on `to`, and so is every one that opens until
    /// [`Sessions::end_handover`]. Returns how many were told.
    pub fn begin_handover(&self, to: mpsc::UnboundedSender<Offer>) -> usize {
        let mut g = self.lock();
        g.handover = Some(to);
        let mut n = 0;
        for s in g.open.values().filter(|s| s.movable) {
            s.stop.raise(Halt::Handover);
            n += 1;
        }
        n
    }

    /// The live upgrade stopped collecting: sessions not paused yet go on
    /// here, and those that offer themselves from now on are given back.
    pub fn end_handover(&self) {
        let mut g = self.lock();
        g.handover = None;
        for s in g.open.values() {
            s.stop.withdraw(Halt::Handover);
        }
    }

    /// Offer a paused session to the live upgrade in progress. `Ok`: the
    /// new process took it (this one closes its copies). `Err` gives it
    /// back: no upgrade is collecting, or the new process did not take it.
    pub async fn hand_off(&self, h: Handoff) -> Result<(), Handoff> {
        let to = self.lock().handover.clone();
        let Some(to) = to else {
            return Err(h);
        };
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError((h, _))) = to.send((h, tx)) {
            return Err(h);
        }
        // A dropped reply means the upgrade ended without an answer: the
        // handoff went with it, and the session with its sockets. That
        // never happens while the upgrade runs (it answers every offer).
        match rx.await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Counters;

    fn info(id: u64) -> Info {
        Info {
            id,
            transport: Transport::Tcp,
            listener: "l".into(),
            peer: "127.0.0.1:1".parse().unwrap(),
            client: "127.0.0.1:1".parse().unwrap(),
            vpce: None,
            sni: Some("a.test".into()),
            alpn: Vec::new(),
            route: "exact:a.test".into(),
            agent: "127.0.0.1:2".into(),
            pool: None,
            dynamic: false,
            started: SystemTime::now(),
        }
    }

    #[test]
    fn open_sessions_are_listed_stopped_and_paused() {
        let s = Arc::new(Sessions::default());
        let new = |id, movable| New {
            info: info(id),
            bytes: Bytes::Stream(Arc::default()),
            movable,
            span: tracing::Span::none(),
            progress: None,
        };
        let a = s.open(new(1, true));
        let b = s.open(new(2, false));
        assert_eq!(s.len(), 2);
        assert_eq!(s.movable(), 1);
        let (tx, _rx) = mpsc::unbounded_channel();
        assert_eq!(s.begin_handover(tx), 1);
        assert_eq!(a.session().stop.get(), Some(Halt::Handover));
        assert_eq!(b.session().stop.get(), None, "not movable");
        let c = s.open(new(3, true));
        assert_eq!(c.session().stop.get(), Some(Halt::Handover), "late");
        s.end_handover();
        assert_eq!(a.session().stop.get(), None, "withdrawn");
        s.expire();
        assert_eq!(b.session().stop.get(), Some(Halt::Deadline));
        let d = s.open(new(4, true));
        assert_eq!(d.session().stop.get(), Some(Halt::Deadline));
        drop((a, b, c));
        assert_eq!(s.list().iter().map(|x| x.info.id).collect::<Vec<_>>(), [4]);
        drop(d);
        assert!(s.is_empty());
    }

    #[test]
    fn the_sampler_knows_idle_time_and_when_progress_is_due() {
        let s = Arc::new(Sessions::default());
        let counters: Arc<Counters> = Arc::default();
        let open = s.open(New {
            info: info(1),
            bytes: Bytes::Stream(Arc::clone(&counters)),
            movable: true,
            span: tracing::Span::none(),
            progress: Some(Duration::from_secs(300)),
        });
        let t0 = Instant::now();
        assert!(s.sample(t0 + Duration::from_secs(1)).is_empty());
        assert!(open.session().idle(t0 + Duration::from_secs(10)) >= Duration::from_secs(9));
        counters.to_client.fetch_add(5, Ordering::Relaxed);
        assert!(s.sample(t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(
            open.session().idle(t0 + Duration::from_secs(10)),
            Duration::ZERO
        );
        let due = s.sample(t0 + Duration::from_secs(301));
        assert_eq!(due.len(), 1, "a progress line after 300 s");
        assert!(
            s.sample(t0 + Duration::from_secs(302)).is_empty(),
            "one per period"
        );
    }
}
