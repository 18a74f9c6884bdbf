//! Connection limits: a global cap taken before accept (so overload leaves
//! connections in the kernel's backlog instead of spinning), and a cap per
//! real client IP taken once the PROXY header (if any) has named the client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config;

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
    /// Limits from configuration.
    pub fn new(cfg: config::Limits) -> Self {
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
