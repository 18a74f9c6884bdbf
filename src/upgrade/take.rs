//! The new process's side of a live upgrade: the channel on its standard
//! input, the sockets of the old process's hello, then — once it is
//! ready — the flows and connections, each batch acknowledged before any
//! of it is touched, so a batch is never served by both processes.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use super::wire::{self, Channel, ConnMeta, DirMeta, FlowMeta, Msg, WireError};
use super::{ENV, ID_GAP};
use crate::conn::Adopted;
use crate::forward::splice::Pipe;
use crate::forward::{InFlight, Paused};
use crate::inventory::Key;
use crate::process::Process;
use crate::udp::AdoptedFlow;

/// In a process started by a live upgrade: the handover channel, taken
/// from standard input (which becomes `/dev/null`). None otherwise.
pub fn take_channel() -> std::io::Result<Option<OwnedFd>> {
    if std::env::var_os(ENV).is_none() {
        return Ok(None);
    }
    let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
    let null = std::fs::File::open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
    Ok(Some(fd))
}

/// The old process's hello: its sockets, and the channel for the rest.
pub struct Incoming {
    chan: Channel,
    /// The listening sockets handed over, by key.
    pub sockets: Vec<(Key, OwnedFd)>,
    /// The agents the old process had drained.
    pub drained: Vec<String>,
    /// The old process.
    pub from: u32,
}

impl Incoming {
    /// Read the hello on `fd` (inside the runtime). Connection ids go on
    /// above the old process's.
    pub async fn open(fd: OwnedFd) -> Result<Incoming, String> {
        let mut chan = Channel::new(fd).map_err(|e| format!("handover channel: {e}"))?;
        let got = tokio::time::timeout(Duration::from_secs(10), chan.recv())
            .await
            .map_err(|_| "no hello from the old process within 10s".to_owned())?
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the old process closed the handover channel".to_owned())?;
        let Msg::Hello {
            version,
            pid,
            next_id,
            sockets,
            drained,
        } = got.msg
        else {
            return Err(format!(
                "expected the old process's hello, got {:?}",
                got.msg
            ));
        };
        if version != wire::VERSION {
            let reason = format!(
                "handover protocol {version} of the old process is not {} (this binary's)",
                wire::VERSION
            );
            let _ = chan
                .send(
                    &Msg::Failed {
                        reason: reason.clone(),
                    },
                    &[],
                    &[],
                )
                .await;
            return Err(reason);
        }
        if sockets.len() != got.fds.len() {
            return Err(format!(
                "the hello names {} sockets and carries {} descriptors",
                sockets.len(),
                got.fds.len()
            ));
        }
        crate::session::ids_from(next_id.saturating_add(ID_GAP));
        Ok(Incoming {
            chan,
            sockets: sockets.into_iter().zip(got.fds).collect(),
            drained,
            from: pid,
        })
    }

    /// This process cannot take over: tell the old one why (it goes on
    /// serving).
    pub async fn fail(self, reason: &str) {
        let msg = Msg::Failed {
            reason: reason.to_owned(),
        };
        let _ = self.chan.send(&msg, &[], &[]).await;
    }

    /// Ready: say so, and take what the old process sends from now on.
    pub async fn ready(self, p: Arc<Process>) -> Result<(), WireError> {
        let msg = Msg::Ready {
            pid: std::process::id(),
        };
        self.chan.send(&msg, &[], &[]).await?;
        tracing::info!(
            event = "upgrade_ready",
            from = self.from,
            "taking over from the old process"
        );
        tokio::spawn(receive(self.chan, p));
        Ok(())
    }
}

/// Take batches until the old process closes the channel (it exits).
async fn receive(mut chan: Channel, p: Arc<Process>) {
    let mut flows: HashMap<Key, Vec<AdoptedFlow>> = HashMap::new();
    let (mut conns, mut nflows) = (0u64, 0u64);
    loop {
        let got = match chan.recv().await {
            Ok(Some(got)) => got,
            Ok(None) => break,
            Err(e) => {
                tracing::error!(event = "handover_failed", error = %e, "live upgrade: the handover channel failed");
                break;
            }
        };
        match got.msg {
            Msg::Connections { seq, items } => {
                let taken = match connections(items, got.fds, &got.bytes) {
                    Ok(t) => t,
                    Err(e) => {
                        // Not acknowledged: the old process keeps them.
                        tracing::error!(event = "handover_refused", error = %e, "live upgrade: a batch of connections could not be read; the old process keeps it");
                        continue;
                    }
                };
                // Acknowledged before any is touched: if this fails the
                // old process keeps serving them.
                if let Err(e) = chan.send(&Msg::Ack { seq }, &[], &[]).await {
                    tracing::error!(event = "handover_failed", error = %e, "live upgrade: cannot acknowledge a batch; the old process keeps it");
                    break;
                }
                conns += taken.len() as u64;
                for a in taken {
                    let ctx = p
                        .listeners
                        .get(&a.info.listener)
                        .or_else(|| p.listeners.values().next())
                        .cloned();
                    match ctx {
                        Some(ctx) => crate::conn::adopt(ctx, a, p.tracker.enter()),
                        None => {
                            tracing::warn!(event = "adopt_failed", id = a.info.id, listener = %a.info.listener, "no TCP listener to adopt the connection on; closing it")
                        }
                    }
                }
            }
            Msg::Flows {
                seq,
                socket,
                items,
                last,
            } => {
                let taken = match flow_batch(items, got.fds) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(event = "handover_refused", error = %e, "live upgrade: a batch of QUIC flows could not be read; the old process keeps it");
                        continue;
                    }
                };
                if let Err(e) = chan.send(&Msg::Ack { seq }, &[], &[]).await {
                    tracing::error!(event = "handover_failed", error = %e, "live upgrade: cannot acknowledge a batch; the old process keeps it");
                    break;
                }
                nflows += taken.len() as u64;
                flows.entry(socket.clone()).or_default().extend(taken);
                if last {
                    let these = flows.remove(&socket).unwrap_or_default();
                    let relay = p
                        .adopting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&socket);
                    match relay {
                        Some(tx) => {
                            let _ = tx.send(these);
                        }
                        None if these.is_empty() => {}
                        None => {
                            tracing::warn!(event = "adopt_failed", socket = %socket, flows = these.len(), "no UDP listener here serves the socket these QUIC flows belong to; closing them")
                        }
                    }
                }
            }
            Msg::Done {
                connections,
                flows: f,
                staying,
            } => {
                // Every flow has come: a relay still waiting has none.
                p.adopting.lock().unwrap_or_else(|e| e.into_inner()).clear();
                tracing::info!(
                    event = "taken_over",
                    connections,
                    flows = f,
                    staying,
                    "took over the old process's connections and flows; {staying} stay with it until they end"
                );
            }
            Msg::Main => {
                if let Some(period) = crate::notify::watchdog_interval() {
                    tokio::spawn(crate::notify::watchdog(period));
                }
            }
            other => {
                tracing::warn!(message = ?other, "live upgrade: unexpected message from the old process");
            }
        }
    }
    // Relays still waiting start with no flows.
    p.adopting.lock().unwrap_or_else(|e| e.into_inner()).clear();
    tracing::debug!(
        connections = conns,
        flows = nflows,
        "the old process closed the handover channel"
    );
}

/// The connections of one batch, from their metadata, descriptors and
/// bytes (nothing is touched yet).
fn connections(
    items: Vec<ConnMeta>,
    mut fds: VecDeque<OwnedFd>,
    bytes: &[u8],
) -> Result<Vec<Adopted>, String> {
    let mut out = Vec::with_capacity(items.len());
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<Vec<u8>, String> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= bytes.len())
            .ok_or("the batch's bytes are shorter than its connections say")?;
        let v = bytes[at..end].to_vec();
        at = end;
        Ok(v)
    };
    for m in items {
        let mut fd = || fds.pop_front().ok_or("fewer descriptors than connections");
        let client = std::net::TcpStream::from(fd()?);
        let agent = std::net::TcpStream::from(fd()?);
        let mut dir = |d: DirMeta| -> Result<InFlight, String> {
            let pipe = if d.in_pipe > 0 {
                let r = fds.pop_front().ok_or("a pipe end is missing")?;
                let w = fds.pop_front().ok_or("a pipe end is missing")?;
                Some(Pipe::adopt(r, w))
            } else {
                None
            };
            Ok(InFlight {
                pending: Vec::new(),
                pipe,
                in_pipe: d.in_pipe,
                done: d.done,
                no_splice: d.no_splice,
            })
        };
        let mut up = dir(m.up)?;
        let mut down = dir(m.down)?;
        up.pending = take(m.up.pending)?;
        down.pending = take(m.down.pending)?;
        out.push(Adopted {
            info: m.info,
            client,
            agent,
            paused: Paused {
                to_agent: up,
                to_client: down,
            },
            bytes: (m.to_agent, m.to_client),
            age: Duration::from_micros(m.age_us),
        });
    }
    if !fds.is_empty() {
        return Err(format!(
            "{} descriptors more than the connections name",
            fds.len()
        ));
    }
    Ok(out)
}

/// The flows of one batch.
fn flow_batch(
    items: Vec<FlowMeta>,
    mut fds: VecDeque<OwnedFd>,
) -> Result<Vec<AdoptedFlow>, String> {
    if items.len() != fds.len() {
        return Err(format!(
            "{} flows with {} descriptors",
            items.len(),
            fds.len()
        ));
    }
    Ok(items
        .into_iter()
        .filter_map(|m| {
            let sock = std::net::UdpSocket::from(fds.pop_front()?);
            Some(AdoptedFlow {
                info: m.info,
                agent: m.agent,
                sock,
                counts: m.counts,
                age: (
                    Duration::from_micros(m.age_us),
                    Duration::from_micros(m.quiet_us),
                ),
            })
        })
        .collect())
}
