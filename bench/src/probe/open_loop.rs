//! Rate mode: messages leave on a fixed schedule whatever the replies do,
//! and each reply's latency counts from its message's *scheduled* time, so
//! a stall shows as the queue of messages it delayed (coordinated omission
//! corrected, as wrk2 does) instead of one slow sample.
//!
//! A pacing thread sleeps to each scheduled time (with the thread's timer
//! slack lowered to 1 ns, so it wakes within microseconds instead of the
//! 1 ms of tokio's timer) and hands the message to the writer task; the
//! reader matches replies to messages by order (the agent echoes in order).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{ProbeError, MSG};
use crate::load::{hist, ns};

/// How well the schedule held.
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    /// Messages planned.
    pub planned: u64,
    /// Messages handed to the writer.
    pub sent: u64,
    /// Seconds the plan spans (`planned` × period).
    pub planned_s: f64,
    /// Seconds from the first scheduled time to the last send.
    pub actual_s: f64,
    /// How late the pacing thread woke for a message, p99 and max (µs).
    pub lateness_p99_us: f64,
    /// Largest lateness (µs).
    pub lateness_max_us: f64,
}

impl Schedule {
    /// Several connections' schedules as one (sums, and the worst timing).
    pub fn merge(all: &[Schedule]) -> Option<Schedule> {
        let first = all.first()?;
        let mut m = first.clone();
        for s in &all[1..] {
            m.planned += s.planned;
            m.sent += s.sent;
            m.planned_s = m.planned_s.max(s.planned_s);
            m.actual_s = m.actual_s.max(s.actual_s);
            m.lateness_p99_us = m.lateness_p99_us.max(s.lateness_p99_us);
            m.lateness_max_us = m.lateness_max_us.max(s.lateness_max_us);
        }
        Some(m)
    }
}

/// `total` messages at `rate` per second on `s` (already connected,
/// upgraded if asked); the first `warmup` replies are not recorded.
pub async fn run(
    s: TlsStream<TcpStream>,
    rate: f64,
    total: u64,
    warmup: u64,
    reply_timeout: Duration,
) -> Result<(Histogram<u64>, Schedule), ProbeError> {
    let (mut rd, mut wr) = tokio::io::split(s);
    wr.write_all(b"E")
        .await
        .map_err(|e| ProbeError::from_io("echo request", &e))?;
    let period = Duration::from_secs_f64(1.0 / rate);
    let at = move |k: u64| period.mul_f64(k as f64);
    // Start a little ahead, so the first messages are not late already.
    let t0 = Instant::now() + Duration::from_millis(20);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let stop = Arc::new(AtomicBool::new(false));

    let stop2 = Arc::clone(&stop);
    let pacer = std::thread::spawn(move || {
        // Wake within microseconds of each scheduled time, not within the
        // default 50 µs slack.
        let _ = nix::sys::prctl::set_timerslack(1);
        let mut late = hist();
        let mut sent = 0u64;
        let mut last = t0;
        for k in 0..total {
            if stop2.load(Ordering::Relaxed) {
                break;
            }
            let due = t0 + at(k);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            last = Instant::now();
            let _ = late.record(ns(last.saturating_duration_since(due)));
            if tx.send(()).is_err() {
                break;
            }
            sent += 1;
        }
        (late, sent, last)
    });

    let writer = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            wr.write_all(&MSG).await?;
        }
        std::io::Result::Ok(())
    });

    let mut h = hist();
    let mut back = [0u8; 64];
    let mut result = Ok(());
    for k in 0..total {
        let due = t0 + at(k);
        let deadline = tokio::time::Instant::from_std(due.max(Instant::now()) + reply_timeout);
        match tokio::time::timeout_at(deadline, rd.read_exact(&mut back)).await {
            Ok(Ok(_)) => {
                if k >= warmup {
                    let _ = h.record(ns(Instant::now().saturating_duration_since(due)));
                }
            }
            Ok(Err(e)) => {
                result = Err(ProbeError::from_io("round trip", &e));
                break;
            }
            Err(_) => {
                result = Err(ProbeError::new(
                    "timeout",
                    format!("round trip: reply {k} of {total} not within {reply_timeout:?}"),
                ));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (late, sent, last) = tokio::task::spawn_blocking(move || pacer.join())
        .await
        .map_err(|e| ProbeError::new("io", format!("pacer: {e}")))?
        .map_err(|_| ProbeError::new("io", "pacer thread panicked"))?;
    writer.abort();
    result?;
    let schedule = Schedule {
        planned: total,
        sent,
        planned_s: at(total.saturating_sub(1)).as_secs_f64(),
        actual_s: last.saturating_duration_since(t0).as_secs_f64(),
        lateness_p99_us: late.value_at_quantile(0.99) as f64 / 1e3,
        lateness_max_us: late.max() as f64 / 1e3,
    };
    Ok((h, schedule))
}
