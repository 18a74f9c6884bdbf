//! What a UDP listener's relay exchanges in a live upgrade: the ask for its
//! flows, the paused flows it offers, and the flows a new process adopts
//! (the relay's side is in `relay/upgrade.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Flow;
use crate::session::{self, Open, Session};

/// A live upgrade asks a relay for its flows: it stops reading its
/// sockets, pauses every routed flow and answers on `reply`.
#[derive(Debug)]
pub struct HandoverAsk {
    /// Where the paused flows go.
    pub reply: oneshot::Sender<PausedFlows>,
}

/// A relay's routed flows, paused: nothing reads the listener's socket or
/// theirs until `decided` says whether the new process took them (`true`:
/// the relay forgets them and ends; `false` or dropped: they go on here).
/// Flows whose hello was not complete are dropped: their clients
/// retransmit their Initials, which the new process reads.
#[derive(Debug)]
pub struct PausedFlows {
    /// The flows.
    pub flows: Vec<(Arc<Flow>, Arc<Session>)>,
    /// The new process's answer.
    pub decided: oneshot::Sender<bool>,
}

/// A flow handed over by the previous process of a live upgrade.
#[derive(Debug)]
pub struct AdoptedFlow {
    /// What the access log says about it.
    pub info: session::Info,
    /// The agent's address.
    pub agent: SocketAddr,
    /// Its socket, connected to the agent.
    pub sock: std::net::UdpSocket,
    /// Datagrams and bytes each way, and drops, so far (as
    /// [`DatagramCounters`](crate::counters::DatagramCounters)).
    pub counts: [u64; 5],
    /// How long it has existed, and how long ago a datagram last moved.
    pub age: (Duration, Duration),
}

/// How a relay is reached by a live upgrade: in the old process, where to
/// ask for its flows; in the new one, the flows it starts with.
#[derive(Debug, Default)]
pub struct Handover {
    /// Asks for the flows (old process).
    pub asks: Option<mpsc::UnboundedReceiver<HandoverAsk>>,
    /// The flows to start with, before the socket is read (new process;
    /// a closed channel: none).
    pub adopt: Option<oneshot::Receiver<Vec<AdoptedFlow>>>,
}

/// A live upgrade collecting this relay's flows.
pub(super) struct Handing {
    /// Where the paused flows go, once every task has stopped.
    pub(super) reply: Option<oneshot::Sender<PausedFlows>>,
    /// Flow tasks not stopped yet.
    pub(super) running: usize,
    /// The sessions of the stopped flows, held until the new process
    /// answers.
    pub(super) parked: HashMap<u64, Open>,
}
