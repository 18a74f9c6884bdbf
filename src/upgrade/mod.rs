//! Live upgrade: the running process starts the binary now found at its
//! own path, with its own arguments and environment, and hands it every
//! listening socket, every established passthrough connection (its two
//! sockets, its splice pipes with the bytes they hold, the bytes read and
//! not yet written, what the access log and metrics need) and every routed
//! QUIC flow. Then the old process exits, as soon as what it could not
//! hand over (terminate-mode sessions, connections still in their hello)
//! has ended.
//!
//! The steps, old process ([`give`]) and new ([`take`]):
//! 1. the old process makes a `SOCK_SEQPACKET` socketpair, starts the new
//!    binary with one end as its standard input, and sends the listening
//!    sockets ([`wire::Msg::Hello`]);
//! 2. the new process reads its configuration, takes the sockets its
//!    configuration names (binding what is new), starts accepting and
//!    says [`wire::Msg::Ready`] — or [`wire::Msg::Failed`] with the reason,
//!    or exits, or is not ready in time: then the old process kills it and
//!    goes on serving everything, and the upgrade fails with that reason;
//! 3. the old process stops accepting (the sockets live on in the new
//!    process), pauses each UDP relay and sends its flows, then pauses
//!    every passthrough connection at a safe point between two chunks and
//!    sends them in batches; after each batch's acknowledgement it closes
//!    its copies (a batch not acknowledged goes on in the old process:
//!    never two owners, never none);
//! 4. it tells systemd the new process is the service's main process
//!    (`MAINPID=`, then a `BARRIER=1` so that is known before the old one
//!    exits) and closes its copies of the listening sockets;
//! 5. connections that finish their hello in the old process afterwards
//!    are handed over as they do; the old process exits 0 once its last
//!    session has ended (or at its drain deadline).
//!
//! `/health` answers 200 throughout: an upgrade is not a drain.

pub mod give;
pub mod take;
pub mod wire;

use std::time::Duration;

pub use give::upgrade;
pub use take::{take_channel, Incoming};

/// The environment variable that tells a new process it is started by a
/// live upgrade (its standard input is then the handover channel).
pub const ENV: &str = "SPLICEGATE_UPGRADE";

/// How long `splicegate upgrade` waits for the new process to be ready
/// unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The new process numbers its connections from the old one's next id
/// plus this, so the connections the old process accepts before it stops
/// keep ids of their own.
pub const ID_GAP: u64 = 1_000_000;

/// What an upgrade did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// The new process.
    pub pid: u32,
    /// Listening sockets handed over.
    pub listeners: usize,
    /// Passthrough connections handed over.
    pub connections: u64,
    /// Bytes they held in flight (read, not yet written), in buffers and
    /// splice pipes.
    pub in_flight: u64,
    /// Splice pipes handed over with the bytes they held.
    pub pipes: u64,
    /// QUIC flows handed over.
    pub flows: u64,
    /// Sessions that stay with the old process until they end (terminate
    /// mode, connections still in their hello).
    pub staying: u64,
}

/// Why an upgrade did not happen; the old process goes on serving
/// everything.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Another upgrade is in progress.
    #[error("an upgrade is already in progress")]
    InProgress,
    /// This process already handed over.
    #[error("this process already handed over to pid {0}; ask that one")]
    Retired(u32),
    /// The process is draining for shutdown.
    #[error("the process is draining for shutdown")]
    Draining,
    /// The new binary could not be started.
    #[error("cannot start {exe}: {source}")]
    Spawn {
        /// The executable.
        exe: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The new process exited before it was ready.
    #[error("the new process (pid {pid}) exited before it was ready: {status}")]
    Exited {
        /// Its pid.
        pid: u32,
        /// Its exit status.
        status: String,
    },
    /// The new process could not start and said why.
    #[error("the new process (pid {pid}) refused to start: {reason}")]
    Refused {
        /// Its pid.
        pid: u32,
        /// What it said (the file, key or error).
        reason: String,
    },
    /// The new process was not ready in time.
    #[error("the new process (pid {pid}) was not ready within {after:?}; it was stopped")]
    Timeout {
        /// Its pid.
        pid: u32,
        /// The timeout.
        after: Duration,
    },
    /// The handover channel failed.
    #[error("{0}")]
    Channel(#[from] wire::WireError),
}

impl UpgradeError {
    /// A stable label for the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            UpgradeError::InProgress => "in_progress",
            UpgradeError::Retired(_) => "retired",
            UpgradeError::Draining => "draining",
            UpgradeError::Spawn { .. } => "spawn_failed",
            UpgradeError::Exited { .. } => "exited",
            UpgradeError::Refused { .. } => "refused",
            UpgradeError::Timeout { .. } => "timeout",
            UpgradeError::Channel(_) => "channel",
        }
    }
}
