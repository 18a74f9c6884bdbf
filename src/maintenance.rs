//! Agents an operator took out of rotation (`splicegate ctl drain-agent`):
//! no new session is routed to them; the open ones go on. The set belongs
//! to the process, not to a routing table: it survives reloads, and a live
//! upgrade hands it to the new process.
//!
//! An agent is named as the access log names it: `IP:PORT` (or
//! `HOST:PORT` for a pool agent configured by name). A dial checks the set
//! once per connection; with nothing drained that is one atomic load.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The drained agents.
#[derive(Debug, Default)]
pub struct Drained {
    /// Any agent drained at all (the common case is none).
    any: AtomicBool,
    set: RwLock<BTreeSet<String>>,
}

impl Drained {
    fn read(&self) -> RwLockReadGuard<'_, BTreeSet<String>> {
        self.set.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeSet<String>> {
        self.set.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `agent` is drained.
    pub fn contains(&self, agent: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.read().contains(agent)
    }

    /// Drain `agent`; false if it already was.
    pub fn insert(&self, agent: String) -> bool {
        let mut s = self.write();
        let new = s.insert(agent);
        self.any.store(true, Ordering::Release);
        new
    }

    /// Put `agent` back in rotation; false if it was not drained.
    pub fn remove(&self, agent: &str) -> bool {
        let mut s = self.write();
        let was = s.remove(agent);
        self.any.store(!s.is_empty(), Ordering::Release);
        was
    }

    /// The drained agents, sorted.
    pub fn list(&self) -> Vec<String> {
        self.read().iter().cloned().collect()
    }

    /// Drain every agent of `agents` (what a live upgrade hands over).
    pub fn extend(&self, agents: impl IntoIterator<Item = String>) {
        let mut s = self.write();
        s.extend(agents);
        self.any.store(!s.is_empty(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::Drained;

    #[test]
    fn agents_drain_and_come_back() {
        let d = Drained::default();
        assert!(!d.contains("10.0.0.1:8443"));
        assert!(d.insert("10.0.0.1:8443".into()));
        assert!(!d.insert("10.0.0.1:8443".into()));
        assert!(d.contains("10.0.0.1:8443"));
        assert!(!d.contains("10.0.0.2:8443"));
        d.extend(["10.0.0.2:8443".to_owned()]);
        assert_eq!(d.list(), ["10.0.0.1:8443", "10.0.0.2:8443"]);
        assert!(d.remove("10.0.0.1:8443"));
        assert!(!d.remove("10.0.0.1:8443"));
        assert!(d.remove("10.0.0.2:8443"));
        assert!(!d.contains("10.0.0.2:8443"));
    }
}
