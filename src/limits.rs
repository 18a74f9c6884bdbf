//! Connection limits: a global cap taken before accept (so overload leaves
//! connections in the kernel's backlog instead of spinning), and a cap per
//! real client IP taken once the PROXY header (if any) has named the client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The caps, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    /// Connections open at once across all listeners (None: unlimited).
    /// Beyond it new connections wait in the kernel's backlog.
    pub max_connections: Option<usize>,
    /// Connections open at once per real client IP (None: unlimited).
    pub max_per_client: Option<usize>,
}

/// Shared limit state.
#[derive(Debug, Default)]
pub struct Limits {
    conns: Option<Arc<Semaphore>>,
    per_client: Option<usize>,
    clients: Mutex<HashMap<IpAddr, usize>>,
}

/// A client's share of `max_per_client`; dropping it frees the share.
#[derive(Debug)]
pub struct ClientSlot {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Limits {
    /// Limits with these caps.
    pub fn new(cfg: Caps) -> Self {
        Limits {
            conns: cfg.max_connections.map(|n| Arc::new(Semaphore::new(n))),
            per_client: cfg.max_per_client,
            clients: Mutex::default(),
        }
    }

    /// Wait for a global connection permit (None when unlimited). Logs when
    /// the cap is reached, once per episode.
    pub async fn admit(&self, full: &mut bool) -> Option<OwnedSemaphorePermit> {
        let sem = self.conns.as_ref()?;
        if sem.available_permits() == 0 && !*full {
            *full = true;
            tracing::warn!(
                event = "max_connections",
                "max_connections reached; new connections wait in the backlog"
            );
        }
        let permit = Arc::clone(sem).acquire_owned().await.ok();
        *full = false;
        permit
    }

    /// A global permit if one is free now (a connection adopted in a live
    /// upgrade is served either way: it is established).
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(self.conns.as_ref()?).try_acquire_owned().ok()
    }

    /// A share for `ip` even at the cap (a connection adopted in a live
    /// upgrade already holds it).
    pub fn adopt_client(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        self.per_client?;
        let mut c = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry(ip).or_default() += 1;
        Some(ClientSlot {
            limits: Arc::clone(self),
            ip,
        })
    }

    /// Take a share for `ip`, or Err(current count) when at the cap.
    pub fn enter_client(self: &Arc<Self>, ip: IpAddr) -> Result<Option<ClientSlot>, usize> {
        let Some(max) = self.per_client else {
            return Ok(None);
        };
        let mut c = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let n = c.entry(ip).or_default();
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(Some(ClientSlot {
            limits: Arc::clone(self),
            ip,
        }))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut c = self
            .limits
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// What the process's file-descriptor limit allows: how many connections
/// may be open at once so that each can still dial its agent, and how
/// many splice pipes may exist besides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// `RLIMIT_NOFILE` after raising the soft limit to the hard one.
    pub limit: u64,
    /// Descriptors kept for everything but connections: those open at
    /// start (listeners, the runtime, stdio) and a margin for the admin
    /// listener, health checks and name resolution.
    pub reserved: u64,
    /// Connections open at once.
    pub connections: usize,
    /// Descriptors each connection holds (2, more for the io_uring
    /// engines).
    pub per_connection: u64,
    /// Splice pipes that may exist at once: 2 descriptors each. A
    /// direction that finds none free keeps copying through userspace.
    pub pipes: usize,
}

/// Descriptors kept beyond those open at start.
const MARGIN: u64 = 16;

impl FdBudget {
    /// Split `limit` descriptors, `reserved` of them kept aside, between
    /// connections (`per_connection` each, at least 2) and pipes (2
    /// each). Without a configured cap, connections get half a pipe's
    /// worth more each — one pipe per four connections, HAProxy's default
    /// `maxpipes` ratio; with one, the cap is honoured as far as the limit
    /// allows and pipes get the rest.
    pub fn split(
        limit: u64,
        reserved: u64,
        configured: Option<usize>,
        per_connection: u64,
    ) -> FdBudget {
        let avail = usize::try_from(limit.saturating_sub(reserved)).unwrap_or(usize::MAX);
        let per = usize::try_from(per_connection.max(2)).unwrap_or(usize::MAX);
        let connections = match configured {
            Some(m) => m.min(avail / per),
            // avail / (per + 0.5)
            None => avail.saturating_mul(2) / per.saturating_mul(2).saturating_add(1),
        }
        .max(1);
        let pipes = avail.saturating_sub(connections.saturating_mul(per)) / 2;
        FdBudget {
            limit,
            reserved,
            connections,
            per_connection: per as u64,
            pipes,
        }
    }

    /// Raise the soft `RLIMIT_NOFILE` to the hard limit, count the
    /// descriptors open now, and split the rest. `extra` is kept aside too
    /// (admin connections, health checks).
    pub fn measure(configured: Option<usize>, extra: u64, per_connection: u64) -> FdBudget {
        use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
        let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) => {
                // The kernel refuses more than fs.nr_open, and "infinity".
                let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(1 << 20);
                let want = if hard == RLIM_INFINITY {
                    nr_open
                } else {
                    hard.min(nr_open)
                };
                if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
                    want
                } else {
                    soft
                }
            }
            Err(_) => 1024,
        };
        // One of the entries is the directory being read.
        let open = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count().saturating_sub(1) as u64)
            .unwrap_or(64);
        FdBudget::split(limit, open + MARGIN + extra, configured, per_connection)
    }
}

#[cfg(test)]
mod tests {
    use super::FdBudget;

    #[test]
    fn connections_and_pipes_fit_the_limit() {
        for (limit, reserved, configured, per) in [
            (64, 31, None, 2),
            (64, 31, Some(1000), 2),
            (1 << 20, 40, None, 2),
            (1 << 20, 40, Some(100), 2),
            (10, 40, None, 2),
            (20_000, 40, None, 4),
            (20_000, 40, Some(7000), 4),
            (20_000, 40, Some(7000), 8),
            (20_000, 40, None, 0),
        ] {
            let b = FdBudget::split(limit, reserved, configured, per);
            assert!(b.connections >= 1);
            assert_eq!(b.per_connection, per.max(2));
            if limit > reserved {
                assert!(
                    b.connections as u64 * b.per_connection + 2 * b.pipes as u64
                        <= limit - reserved,
                    "{b:?}"
                );
            }
            if let Some(m) = configured {
                assert!(b.connections <= m);
            }
        }
        for per in [2, 4, 8] {
            let b = FdBudget::split(1 << 20, 40, None, per);
            assert!(b.pipes.abs_diff(b.connections / 4) <= 1, "{b:?}");
        }
        // An io_uring engine's connections take more descriptors each.
        let b = FdBudget::split(20_000, 40, Some(7000), 4);
        assert_eq!(b.connections, 4990);
    }
}
