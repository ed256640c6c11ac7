//! Guest memory made ready for a coming migration (pure: the daemon owns the memory,
//! this module only its bookkeeping, with time passed in).
//!
//! Before it starts a migration, the orchestrator asks the target to prepare: the
//! target maps the VM's memory and faults it in then, as a QEMU started with
//! `-incoming` and `-mem-prealloc` has its memory before `migrate` is issued. The
//! stream then lands in memory the kernel has already backed, and the fault-in of
//! fresh memory (on a virtual machine, several µs a page) is off the migration's
//! clock. A prepared block waits at most [`TTL`] for its migration, holds one VM's
//! memory at most, and counts against the host's free capacity while it waits, so
//! preparing can never make room appear that admission would not grant.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long prepared memory waits for its migration.
pub const TTL: Duration = Duration::from_secs(30);

struct Entry<M> {
    memory: M,
    bytes: u64,
    at: Instant,
}

/// Prepared memory by VM name.
pub struct Pool<M> {
    entries: BTreeMap<String, Entry<M>>,
    /// Migrations that landed in prepared memory.
    used: u64,
}

impl<M> Default for Pool<M> {
    fn default() -> Self {
        Pool {
            entries: BTreeMap::new(),
            used: 0,
        }
    }
}

impl<M> Pool<M> {
    /// Keeps `memory` (`bytes` long) for `vm`'s coming migration, in place of any
    /// block kept for it before.
    pub fn insert(&mut self, vm: &str, memory: M, bytes: u64, now: Instant) {
        self.expire(now);
        self.entries.insert(
            vm.to_string(),
            Entry {
                memory,
                bytes,
                at: now,
            },
        );
    }

    /// The block kept for `vm`, if it is still fresh and `bytes` long. A block of
    /// another size is dropped: the VM is not the one it was prepared for.
    pub fn take(&mut self, vm: &str, bytes: u64, now: Instant) -> Option<M> {
        self.expire(now);
        let e = self.entries.remove(vm)?;
        if e.bytes != bytes {
            return None;
        }
        self.used += 1;
        Some(e.memory)
    }

    /// Drops the block kept for `vm` (its migration will not come).
    pub fn forget(&mut self, vm: &str) -> bool {
        self.entries.remove(vm).is_some()
    }

    /// Drops every block older than [`TTL`]; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.at) < TTL);
        before - self.entries.len()
    }

    /// Bytes held now, for all VMs but `except` (whose block a new one replaces).
    pub fn bytes_except(&self, except: &str) -> u64 {
        self.entries
            .iter()
            .filter(|(k, _)| k.as_str() != except)
            .map(|(_, e)| e.bytes)
            .sum()
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.bytes_except("")
    }

    /// Migrations that landed in prepared memory so far.
    pub fn used(&self) -> u64 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_goes_to_its_vm_once_at_its_size_and_within_its_time() {
        let t0 = Instant::now();
        let mut p = Pool::default();
        p.insert("vm1", 'a', 64, t0);
        p.insert("vm2", 'b', 32, t0);
        assert_eq!(p.bytes(), 96);
        assert_eq!(p.bytes_except("vm1"), 32);
        assert_eq!(p.take("vm1", 64, t0 + Duration::from_secs(1)), Some('a'));
        assert_eq!(p.take("vm1", 64, t0), None, "taken once");
        assert_eq!(p.take("vm2", 64, t0), None, "another size: dropped");
        assert_eq!(p.bytes(), 0);
        assert_eq!(p.used(), 1);

        p.insert("vm3", 'c', 8, t0);
        p.insert("vm3", 'd', 8, t0 + Duration::from_secs(5));
        assert_eq!(p.bytes(), 8, "replaced, not added");
        assert_eq!(p.expire(t0 + TTL), 0);
        assert_eq!(p.take("vm3", 8, t0 + TTL + Duration::from_secs(5)), None);
        assert_eq!(p.bytes(), 0, "expired");

        p.insert("vm4", 'e', 8, t0);
        assert!(p.forget("vm4"));
        assert!(!p.forget("vm4"));
        assert_eq!(p.used(), 1);
    }
}
