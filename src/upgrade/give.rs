//! The old process's side of a live upgrade: start the new binary, send
//! it the listening sockets, wait until it is ready, then hand over the
//! QUIC flows and the passthrough connections, and retire.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::wire::{self, Channel, ConnMeta, DirMeta, FlowMeta, Msg, WireError};
use super::{Report, UpgradeError, ENV};
use crate::forward::InFlight;
use crate::inventory::Kind;
use crate::process::{Gate, Process, UpgradeState};
use crate::session::{Handoff, Offer};
use crate::udp::HandoverAsk;

/// How long the new process has to acknowledge a batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the first pass waits for connections still on their way to
/// forwarding (sending the replayed hello, at most `connect_timeout`);
/// later ones are handed over as they arrive.
const FIRST_PASS: Duration = Duration::from_secs(5);

/// Upgrade: start the binary at the process's own path and hand it
/// everything that can move. Fails (and changes nothing) while another
/// upgrade runs, after this process handed over, during a drain, or when
/// the new process cannot start, refuses its configuration or is not
/// ready within `timeout`.
pub async fn upgrade(p: &Arc<Process>, timeout: Duration) -> Result<Report, UpgradeError> {
    {
        let mut st = p.upgrade_state();
        match *st {
            UpgradeState::InProgress => return Err(UpgradeError::InProgress),
            UpgradeState::Retired(pid) => return Err(UpgradeError::Retired(pid)),
            UpgradeState::Idle => {}
        }
        if p.drain.draining() {
            return Err(UpgradeError::Draining);
        }
        *st = UpgradeState::InProgress;
    }
    let result = attempt(p, timeout).await;
    *p.upgrade_state() = match &result {
        Ok(r) => UpgradeState::Retired(r.pid),
        Err(_) => UpgradeState::Idle,
    };
    match &result {
        Ok(r) => {
            tracing::info!(
                event = "upgraded",
                pid = r.pid,
                listeners = r.listeners,
                connections = r.connections,
                in_flight_bytes = r.in_flight,
                pipes = r.pipes,
                flows = r.flows,
                staying = r.staying,
                "handed over to the new process; this one exits once what stays with it has ended"
            );
            let _ = p.retired.send(Some(r.pid));
        }
        Err(e) => {
            tracing::error!(event = "upgrade_failed", kind = e.kind(), error = %e, "live upgrade failed; this process goes on serving everything");
        }
    }
    result
}

async fn attempt(p: &Arc<Process>, timeout: Duration) -> Result<Report, UpgradeError> {
    let (ours, theirs) = wire::pair().map_err(WireError::Io)?;
    let exe = p.launch.exe.display().to_string();
    let mut cmd = std::process::Command::new(&p.launch.exe);
    cmd.args(&p.launch.args)
        .env(ENV, "1")
        // The watchdog is the new process's once it is the main one.
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::from(theirs));
    let spawned = cmd.spawn();
    // The command holds the child's end of the channel: without this the
    // channel would never report a child that exits.
    drop(cmd);
    let mut child = spawned.map_err(|source| UpgradeError::Spawn {
        exe: exe.clone(),
        source,
    })?;
    let pid = child.id();
    tracing::info!(event = "upgrade_started", exe = %exe, pid, "live upgrade: started the new process");
    let mut chan = match Channel::new(ours) {
        Ok(c) => c,
        Err(e) => {
            stop(&mut child, true).await;
            return Err(WireError::Io(e).into());
        }
    };
    if let Err(e) = hello_and_ready(p, &mut chan, pid, timeout).await {
        // One that closed the channel is exiting: let it say how.
        let exited = matches!(e, UpgradeError::Exited { .. });
        let status = stop(&mut child, !exited).await;
        return Err(match (e, status) {
            (UpgradeError::Exited { pid, .. }, Some(status)) => UpgradeError::Exited {
                pid,
                status: status.to_string(),
            },
            (e, _) => e,
        });
    }
    // The new process outlives this one; reap it if it ends first.
    std::thread::spawn(move || child.wait());
    tracing::info!(
        event = "upgrade_ready",
        pid,
        "the new process is ready and accepting; handing over"
    );
    p.traffic.send_replace(Gate::Paused);
    p.local.send_replace(Gate::Paused);

    let mut giver = Giver {
        chan,
        seq: 0,
        connections: 0,
        in_flight: 0,
        pipes: 0,
        flows: 0,
    };
    if let Err(e) = giver.flows(p).await {
        p.traffic.send_replace(Gate::Open);
        p.local.send_replace(Gate::Open);
        return Err(e);
    }
    let (tx, mut offers) = mpsc::unbounded_channel();
    p.sessions.begin_handover(tx);
    if let Err(e) = giver.first_pass(p, &mut offers).await {
        p.sessions.end_handover();
        p.traffic.send_replace(Gate::Open);
        p.local.send_replace(Gate::Open);
        return Err(e);
    }
    // What stays: the connections whose tasks go on here once the ones
    // handed over have ended (terminate sessions, hellos in progress).
    let settle = Instant::now() + Duration::from_millis(500);
    while p.sessions.movable() > 0 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let report = Report {
        pid,
        listeners: [Kind::Tcp, Kind::Udp, Kind::Admin, Kind::Control]
            .iter()
            .map(|&k| p.inventory.count(k))
            .sum(),
        connections: giver.connections,
        in_flight: giver.in_flight,
        pipes: giver.pipes,
        flows: giver.flows,
        staying: p.tracker.active() as u64,
    };
    let done = Msg::Done {
        connections: report.connections,
        flows: report.flows,
        staying: report.staying,
    };
    if let Err(e) = giver.chan.send(&done, &[], &[]).await {
        tracing::warn!(error = %e, "cannot tell the new process the handover is done");
    }
    crate::notify::main_pid(pid).await;
    if let Err(e) = giver.chan.send(&Msg::Main, &[], &[]).await {
        tracing::warn!(error = %e, "cannot tell the new process it is the main process");
    }
    // The sockets live on in the new process: this one's copies close.
    p.traffic.send_replace(Gate::Closed);
    p.local.send_replace(Gate::Closed);
    p.inventory.release();
    // Connections still finishing their hello here move when they are
    // ready to forward.
    tokio::spawn(async move { giver.late(&mut offers).await });
    Ok(report)
}

/// Send the sockets, then wait for the new process to be ready.
async fn hello_and_ready(
    p: &Process,
    chan: &mut Channel,
    pid: u32,
    timeout: Duration,
) -> Result<(), UpgradeError> {
    let held: Vec<(crate::inventory::Key, OwnedFd)> = p.inventory.with_held(|h| {
        h.iter()
            .filter_map(|(k, fd)| Some((k.clone(), fd.try_clone_to_owned().ok()?)))
            .collect()
    });
    if held.len() > wire::MAX_FDS {
        return Err(WireError::Protocol(format!(
            "{} listening sockets: more than one handover record carries ({})",
            held.len(),
            wire::MAX_FDS
        ))
        .into());
    }
    let hello = Msg::Hello {
        version: wire::VERSION,
        pid: std::process::id(),
        next_id: crate::session::peek_next_id(),
        sockets: held.iter().map(|(k, _)| k.clone()).collect(),
        drained: p.routes.drained.list(),
    };
    let fds: Vec<BorrowedFd<'_>> = held.iter().map(|(_, fd)| fd.as_fd()).collect();
    match chan.send(&hello, &fds, &[]).await {
        Err(WireError::Closed) => {
            return Err(UpgradeError::Exited {
                pid,
                status: "it closed the handover channel".into(),
            })
        }
        r => r?,
    }
    drop(fds);
    drop(held);
    let deadline = Instant::now() + timeout;
    let got = tokio::select! {
        r = chan.recv() => r?,
        _ = tokio::time::sleep_until(deadline) => {
            return Err(UpgradeError::Timeout { pid, after: timeout });
        }
    };
    match got.map(|r| r.msg) {
        Some(Msg::Ready { .. }) => Ok(()),
        Some(Msg::Failed { reason }) => Err(UpgradeError::Refused {
            pid,
            reason: crate::logging::printable(&reason).into_owned(),
        }),
        Some(other) => Err(WireError::Protocol(format!("expected ready, got {other:?}")).into()),
        None => Err(UpgradeError::Exited {
            pid,
            status: "it closed the handover channel".into(),
        }),
    }
}

/// Stop a new process that will not take over and reap it: killed at
/// once, or (`kill` false: it is exiting) after up to 2 s; how it ended.
async fn stop(child: &mut Child, kill: bool) -> Option<std::process::ExitStatus> {
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if (kill || Instant::now() >= deadline) && !killed {
            let _ = child.kill();
            killed = true;
        }
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline + Duration::from_secs(3) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            _ => return None,
        }
    }
}

/// What the old process sends, batch by batch.
struct Giver {
    chan: Channel,
    seq: u64,
    connections: u64,
    in_flight: u64,
    pipes: u64,
    flows: u64,
}

impl Giver {
    /// Send a batch and wait for its acknowledgement.
    async fn send_acked(
        &mut self,
        msg_of: impl FnOnce(u64) -> Msg,
        fds: &[BorrowedFd<'_>],
        bytes: &[u8],
    ) -> Result<(), UpgradeError> {
        self.seq += 1;
        let seq = self.seq;
        self.chan.send(&msg_of(seq), fds, bytes).await?;
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let got = tokio::select! {
                r = self.chan.recv() => r?,
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(WireError::Protocol(format!("no acknowledgement of batch {seq} within {ACK_TIMEOUT:?}")).into());
                }
            };
            match got.map(|r| r.msg) {
                Some(Msg::Ack { seq: s }) if s == seq => return Ok(()),
                Some(other) => {
                    tracing::debug!(message = ?other, "unexpected handover message while waiting for an acknowledgement");
                }
                None => {
                    return Err(WireError::Protocol(
                        "the new process closed the handover channel".into(),
                    )
                    .into())
                }
            }
        }
    }

    /// Every UDP listener socket's routed flows: the relay pauses, its
    /// flows go over, and the relay ends; the new process's relay for that
    /// socket starts reading only once it has them.
    async fn flows(&mut self, p: &Process) -> Result<(), UpgradeError> {
        let relays: Vec<_> = p
            .relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, tx)| (k.clone(), tx.clone()))
            .collect();
        for (key, ask) in relays {
            let (reply, answer) = oneshot::channel();
            let paused = match ask.send(HandoverAsk { reply }) {
                Ok(()) => tokio::time::timeout(Duration::from_secs(5), answer)
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            };
            let Some(paused) = paused else {
                // The relay is gone: the new process starts that socket
                // with no flows.
                let socket = key.clone();
                self.send_acked(
                    |seq| Msg::Flows {
                        seq,
                        socket,
                        items: Vec::new(),
                        last: true,
                    },
                    &[],
                    &[],
                )
                .await?;
                continue;
            };
            let items: Vec<FlowMeta> = paused
                .flows
                .iter()
                .map(|(f, s)| {
                    let c = &f.counters;
                    let [pa, ba, pc, bc] = c.snapshot();
                    let dropped = c.dropped.load(std::sync::atomic::Ordering::Relaxed);
                    FlowMeta {
                        info: s.info.clone(),
                        agent: f.agent,
                        counts: [pa, ba, pc, bc, dropped],
                        age_us: f.age().as_micros() as u64,
                        quiet_us: f.quiet().as_micros() as u64,
                    }
                })
                .collect();
            let fds: Vec<BorrowedFd<'_>> =
                paused.flows.iter().map(|(f, _)| f.sock.as_fd()).collect();
            let chunks = items.len().div_ceil(wire::MAX_FDS / 2).max(1);
            let mut sent = Ok(());
            let mut items = items.into_iter();
            for i in 0..chunks {
                let part: Vec<FlowMeta> = items.by_ref().take(wire::MAX_FDS / 2).collect();
                let from = i * (wire::MAX_FDS / 2);
                let part_fds = &fds[from..from + part.len()];
                let socket = key.clone();
                let last = i + 1 == chunks;
                sent = self
                    .send_acked(
                        |seq| Msg::Flows {
                            seq,
                            socket,
                            items: part,
                            last,
                        },
                        part_fds,
                        &[],
                    )
                    .await;
                if sent.is_err() {
                    break;
                }
            }
            let n = paused.flows.len() as u64;
            drop(fds);
            let _ = paused.decided.send(sent.is_ok());
            sent?;
            self.flows += n;
        }
        Ok(())
    }

    /// Pause and send every movable connection: done once none is left
    /// that has not been handed over, or after [`FIRST_PASS`].
    async fn first_pass(
        &mut self,
        p: &Process,
        offers: &mut mpsc::UnboundedReceiver<Offer>,
    ) -> Result<(), UpgradeError> {
        let until = Instant::now() + FIRST_PASS;
        let mut carry = None;
        loop {
            match gather(offers, &mut carry, Duration::from_millis(5)).await {
                Some(batch) if !batch.is_empty() => self.connections(batch).await?,
                // Sessions handed over leave the list as their tasks end.
                Some(_) if p.sessions.movable() > 0 && Instant::now() < until => {}
                _ => return Ok(()),
            }
        }
    }

    /// After the first pass: connections that become ready to forward in
    /// this process move as they do, until it exits. A batch the new
    /// process does not take goes on here.
    async fn late(mut self, offers: &mut mpsc::UnboundedReceiver<Offer>) {
        let mut carry = None;
        while let Some(batch) = gather(offers, &mut carry, Duration::from_secs(3600)).await {
            if batch.is_empty() {
                continue;
            }
            if let Err(e) = self.connections(batch).await {
                tracing::warn!(error = %e, "late handover failed; those connections stay here");
                return;
            }
        }
    }

    /// Send one batch of paused connections. Acknowledged: this process's
    /// copies close and the sessions end here. Not: they go on here.
    async fn connections(&mut self, batch: Vec<Offer>) -> Result<(), UpgradeError> {
        let mut items = Vec::with_capacity(batch.len());
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        let mut bytes = Vec::new();
        for (h, _) in &batch {
            let (to_agent, to_client) = h.session.bytes.totals();
            fds.push(h.client.as_fd());
            fds.push(h.agent.as_fd());
            let up = direction(&h.paused.to_agent, &mut fds, &mut bytes);
            let down = direction(&h.paused.to_client, &mut fds, &mut bytes);
            items.push(ConnMeta {
                info: h.session.info.clone(),
                age_us: h.age.as_micros() as u64,
                to_agent,
                to_client,
                up,
                down,
            });
        }
        let n = items.len() as u64;
        let held: u64 = items
            .iter()
            .map(|m| (m.up.pending + m.up.in_pipe + m.down.pending + m.down.in_pipe) as u64)
            .sum();
        let pipes = items
            .iter()
            .map(|m| u64::from(m.up.in_pipe > 0) + u64::from(m.down.in_pipe > 0))
            .sum::<u64>();
        let sent = self
            .send_acked(|seq| Msg::Connections { seq, items }, &fds, &bytes)
            .await;
        drop(fds);
        for (h, reply) in batch {
            match &sent {
                Ok(()) => {
                    // Taken: this process's copies close here.
                    drop(h);
                    let _ = reply.send(Ok(()));
                }
                Err(_) => {
                    let _ = reply.send(Err(h));
                }
            }
        }
        sent?;
        self.connections += n;
        self.in_flight += held;
        self.pipes += pipes;
        Ok(())
    }
}

/// One direction of a paused connection into a record: its pipe's ends
/// (when it holds bytes) among the descriptors, its pending bytes among
/// the bytes.
fn direction<'a>(d: &'a InFlight, fds: &mut Vec<BorrowedFd<'a>>, bytes: &mut Vec<u8>) -> DirMeta {
    bytes.extend_from_slice(&d.pending);
    let in_pipe = match &d.pipe {
        Some(pipe) if d.in_pipe > 0 => {
            let (r, w) = pipe.ends();
            fds.push(r);
            fds.push(w);
            d.in_pipe
        }
        _ => 0,
    };
    DirMeta {
        pending: d.pending.len(),
        in_pipe,
        done: d.done,
        no_splice: d.no_splice,
    }
}

/// Descriptors and bytes one offer takes in a record.
fn weight(h: &Handoff) -> (usize, usize) {
    let pipes = [&h.paused.to_agent, &h.paused.to_client]
        .iter()
        .filter(|d| d.pipe.is_some() && d.in_pipe > 0)
        .count();
    // The JSON of one connection is well under 1 KiB.
    (
        2 + 2 * pipes,
        h.paused.to_agent.pending.len() + h.paused.to_client.pending.len() + 1024,
    )
}

/// Wait up to `wait` for an offer, then take what else is waiting, as far
/// as one record carries (empty: none came; None: no more can come).
async fn gather(
    offers: &mut mpsc::UnboundedReceiver<Offer>,
    carry: &mut Option<Offer>,
    wait: Duration,
) -> Option<Vec<Offer>> {
    let first = match carry.take() {
        Some(o) => o,
        None => match tokio::time::timeout(wait, offers.recv()).await {
            Ok(Some(o)) => o,
            Ok(None) => return None,
            Err(_) => return Some(Vec::new()),
        },
    };
    let (mut fds, mut bytes) = weight(&first.0);
    let mut batch = vec![first];
    while let Ok(o) = offers.try_recv() {
        let (f, b) = weight(&o.0);
        if fds + f > wire::MAX_FDS || bytes + b > wire::MAX_RECORD - 4096 {
            *carry = Some(o);
            break;
        }
        fds += f;
        bytes += b;
        batch.push(o);
    }
    Some(batch)
}
