//! A UDP listener's limits on routed flows (`max_flows`,
//! `max_flows_per_client`), shared by all its sockets and workers: taken
//! once per flow when its hello completes, given back when it ends —
//! never per datagram. Source addresses inside `lb_networks` (a load
//! balancer's, which many clients share) have no per-client limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::cidr::Cidr;

/// Routed flows of one listener, in total and per client address.
#[derive(Debug, Default)]
pub struct FlowLimits {
    routed: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// Which limit refused a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_flows`.
    Flows(usize),
    /// `max_flows_per_client`.
    Client(usize),
}

/// The limits a flow is admitted under.
#[derive(Debug, Clone, Copy)]
pub struct Caps<'a> {
    /// `max_flows`.
    pub flows: usize,
    /// `max_flows_per_client`.
    pub per_client: usize,
    /// `lb_networks`.
    pub exempt: &'a [Cidr],
}

impl FlowLimits {
    /// Routed flows now.
    pub fn routed(&self) -> usize {
        self.routed.load(Ordering::Relaxed)
    }

    /// Count one more routed flow from `client`, if the caps allow.
    pub fn admit(&self, client: IpAddr, caps: Caps<'_>) -> Result<(), Full> {
        let before = self.routed.fetch_add(1, Ordering::AcqRel);
        if before >= caps.flows {
            self.routed.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Flows(caps.flows));
        }
        if caps.exempt.iter().any(|c| c.contains(client)) {
            return Ok(());
        }
        let mut g = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.entry(client).or_default();
        if *n >= caps.per_client {
            drop(g);
            self.routed.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Client(caps.per_client));
        }
        *n += 1;
        Ok(())
    }

    /// Count a flow adopted in a live upgrade, above the caps if need be:
    /// it is established.
    pub fn adopt(&self, client: IpAddr, exempt: &[Cidr]) {
        self.routed.fetch_add(1, Ordering::AcqRel);
        if !exempt.iter().any(|c| c.contains(client)) {
            let mut g = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
            *g.entry(client).or_default() += 1;
        }
    }

    /// A flow admitted with [`FlowLimits::admit`] or
    /// [`FlowLimits::adopt`] ended (or moved to a new process).
    pub fn release(&self, client: IpAddr, exempt: &[Cidr]) {
        self.routed.fetch_sub(1, Ordering::AcqRel);
        if exempt.iter().any(|c| c.contains(client)) {
            return;
        }
        let mut g = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(&client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.remove(&client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_balancer_sources_have_no_per_client_limit() {
        let l = FlowLimits::default();
        let exempt: Vec<Cidr> = vec!["10.0.0.0/24".parse().unwrap()];
        let caps = Caps {
            flows: 10,
            per_client: 2,
            exempt: &exempt,
        };
        let nlb: IpAddr = "10.0.0.7".parse().unwrap();
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            l.admit(nlb, caps).unwrap();
        }
        l.admit(client, caps).unwrap();
        l.admit(client, caps).unwrap();
        assert_eq!(l.admit(client, caps), Err(Full::Client(2)));
        for _ in 0..3 {
            l.admit(nlb, caps).unwrap();
        }
        assert_eq!(l.admit(nlb, caps), Err(Full::Flows(10)));
        l.release(client, &exempt);
        l.release(nlb, &exempt);
        assert_eq!(l.routed(), 8);
        l.admit(client, caps).unwrap();
        assert_eq!(l.admit(client, caps), Err(Full::Client(2)));
    }
}
