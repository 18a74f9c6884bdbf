//! What the running process shares with its operator commands and its
//! live upgrade: the open sessions, the drain, the metrics and routing,
//! the listening sockets, the gates that pause accepting, the UDP relays,
//! how the process was started, and the state of an upgrade. The server
//! builds it; the control socket and the upgrade act on it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::context::ListenerCtx;
use crate::inventory::{Inventory, Key};
use crate::metrics::Metrics;
use crate::routing::SharedRoutes;
use crate::session::Sessions;
use crate::shutdown::{Drain, Tracker};
use crate::udp::{AdoptedFlow, HandoverAsk};

/// Whether a listening socket accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Accepting.
    Open,
    /// Not accepting for now: new connections wait in the socket's queue
    /// (a live upgrade until the new process is ready to take them).
    Paused,
    /// Stopped for good: the socket closes (the drain, or after a live
    /// upgrade handed it over).
    Closed,
}

/// Wait while the gate is paused; true once it is open, false once it is
/// closed (or its sender is gone).
pub async fn gate_open(rx: &mut watch::Receiver<Gate>) -> bool {
    match rx.wait_for(|g| *g != Gate::Paused).await {
        Ok(g) => *g == Gate::Open,
        Err(_) => false,
    }
}

/// The next accepted connection while `gate` is open; None once it is
/// closed. A pause waits.
pub async fn accept_gated<T, F: std::future::Future<Output = T>>(
    gate: &mut watch::Receiver<Gate>,
    mut accept: impl FnMut() -> F,
) -> Option<T> {
    loop {
        if !gate_open(gate).await {
            return None;
        }
        tokio::select! {
            biased;
            _ = gate_shut(gate) => {}
            r = accept() => return Some(r),
        }
    }
}

/// Resolves once the gate is no longer open (paused or closed).
pub async fn gate_shut(rx: &mut watch::Receiver<Gate>) {
    if rx.wait_for(|g| *g != Gate::Open).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How the process was started: a live upgrade starts the binary found at
/// the same path with the same arguments.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The executable, as it was found at start (a package upgrade may
    /// replace the file; the new one is started).
    pub exe: PathBuf,
    /// The arguments after the executable.
    pub args: Vec<OsString>,
}

impl Launch {
    /// The running binary's path as it was started (argv\[0\], made
    /// absolute, or looked up in `PATH`), not the inode that runs
    /// (`/proc/self/exe` says `(deleted)` once a package replaced it), and
    /// its arguments.
    pub fn current() -> Launch {
        let mut argv = std::env::args_os();
        let arg0 = argv.next().map(PathBuf::from);
        let args = argv.collect();
        let exe = arg0
            .and_then(|a| resolve_exe(&a))
            .or_else(|| std::fs::read_link("/proc/self/exe").ok())
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        Launch { exe, args }
    }
}

/// Where `arg0` names an executable: a path with a slash relative to the
/// current directory, or a bare name looked up in `PATH`.
fn resolve_exe(arg0: &std::path::Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if arg0.components().count() > 1 || arg0.is_absolute() {
        // Absolute without resolving symlinks: an operator who points a
        // link at another version gets that version.
        let p = std::path::absolute(arg0).ok()?;
        return runnable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(arg0))
        .find(|p| runnable(p))
}

/// Where a live upgrade stands in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeState {
    /// None in progress.
    Idle,
    /// One is in progress.
    InProgress,
    /// This process handed over to the new one (its pid) and serves only
    /// what stayed with it.
    Retired(u32),
}

/// The running process's shared handles.
pub struct Process {
    /// When it started.
    pub started: Instant,
    /// How it was started.
    pub launch: Launch,
    /// The open sessions.
    pub sessions: Arc<Sessions>,
    /// Draining, and the drain deadline.
    pub drain: Drain,
    /// Every connection and flow, open or still in its hello.
    pub tracker: Tracker,
    /// Admin and control connections being answered (a process that
    /// handed over answers them before it exits).
    pub local_tracker: Tracker,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The live routing.
    pub routes: Arc<SharedRoutes>,
    /// The listening sockets.
    pub inventory: Arc<Inventory>,
    /// The traffic listeners' gate (closed by the drain, paused by a
    /// live upgrade).
    pub traffic: watch::Sender<Gate>,
    /// The admin listener's and control socket's gate (paused and closed
    /// by a live upgrade only: during a drain they keep answering).
    pub local: watch::Sender<Gate>,
    /// Each UDP listener socket's relay, where a live upgrade asks for
    /// its flows.
    pub relays: Mutex<Vec<(Key, mpsc::UnboundedSender<HandoverAsk>)>>,
    /// In a process started by a live upgrade: where each inherited UDP
    /// socket's relay waits for its flows.
    pub adopting: Mutex<HashMap<Key, oneshot::Sender<Vec<AdoptedFlow>>>>,
    /// The TCP listeners' shared state, by listener name (sessions
    /// adopted in a live upgrade continue on their listener).
    pub listeners: HashMap<String, Arc<ListenerCtx>>,
    /// Where a live upgrade stands.
    pub upgrade: Mutex<UpgradeState>,
    /// Set to the new process's pid once a live upgrade handed over.
    pub retired: watch::Sender<Option<u32>>,
    /// The drain timeout: how long sessions left with a retired process
    /// may go on.
    pub drain_timeout: std::time::Duration,
}

impl Process {
    /// Where a live upgrade stands.
    pub fn upgrade_state(&self) -> MutexGuard<'_, UpgradeState> {
        self.upgrade.lock().unwrap_or_else(|p| p.into_inner())
    }
}
