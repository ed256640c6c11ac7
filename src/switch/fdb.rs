//! Forwarding database (sans-IO core): which port each unicast MAC was last seen on.
//!
//! The clock is injected (`now` on every call), so learning, moves, ageing and eviction
//! are tested without sleeping. Semantics follow the Linux bridge (802.1D): entries age
//! out after `ageing` (default 300 s; zero means learn nothing and flood everything), a
//! MAC seen on a new port moves at once (an optional hold-down refuses moves for a while
//! after the MAC was last seen on its old port, as vde_switch does), and, as in Open
//! vSwitch, a full table (default 8192) evicts from the port holding the most MACs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::PortId;
use crate::wire::{EtherType, MacAddr};

/// Default ageing time of the Linux bridge.
pub const DEFAULT_AGEING: Duration = Duration::from_secs(300);
/// Default table size of Open vSwitch.
pub const DEFAULT_MAX_ENTRIES: usize = 8192;

/// Tunables of a forwarding database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbConfig {
    /// An entry not refreshed for this long is gone. Zero: never learn (hub mode).
    pub ageing: Duration,
    /// Most entries held at once; a new MAC beyond it evicts one.
    pub max_entries: usize,
    /// A MAC seen on another port within this time of its last frame on its current
    /// port does not move. Zero (the default, as in Linux) moves at once.
    pub hold_down: Duration,
}

impl Default for FdbConfig {
    fn default() -> Self {
        FdbConfig {
            ageing: DEFAULT_AGEING,
            max_entries: DEFAULT_MAX_ENTRIES,
            hold_down: Duration::ZERO,
        }
    }
}

/// What changed in the table; the adapter logs these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdbEvent {
    Learned {
        mac: MacAddr,
        port: PortId,
    },
    /// The MAC was seen on another port; `ethertype` is that of the frame that moved it
    /// (RARP after a migration, typically).
    Moved {
        mac: MacAddr,
        from: PortId,
        to: PortId,
        ethertype: EtherType,
    },
    Aged {
        mac: MacAddr,
        port: PortId,
    },
    Evicted {
        mac: MacAddr,
        port: PortId,
    },
}

/// One entry as listed to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: MacAddr,
    pub port: PortId,
    /// Time since a frame from `mac` was last seen.
    pub age: Duration,
    /// Wall-clock stamp (µs since the epoch, as given by the caller) of the frame that
    /// put `mac` on `port`: its learn or its last move. Refreshes leave it alone, so
    /// tools read off it when a migrated MAC reached its new port.
    pub updated_t_us: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    port: PortId,
    last_seen: Instant,
    updated_t_us: u64,
}

/// The table. Not thread-safe by itself: the daemon holds it under a lock.
#[derive(Debug)]
pub struct Fdb {
    cfg: FdbConfig,
    table: HashMap<MacAddr, Entry>,
    per_port: HashMap<PortId, usize>,
}

impl Fdb {
    pub fn new(cfg: FdbConfig) -> Fdb {
        Fdb {
            cfg,
            table: HashMap::with_capacity(cfg.max_entries.min(DEFAULT_MAX_ENTRIES)),
            per_port: HashMap::new(),
        }
    }

    pub fn config(&self) -> &FdbConfig {
        &self.cfg
    }

    /// Number of entries, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// False in hub mode (ageing zero).
    pub fn learns(&self) -> bool {
        !self.cfg.ageing.is_zero() && self.cfg.max_entries > 0
    }

    fn expired(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.last_seen) >= self.cfg.ageing
    }

    /// Records that `mac` sent a frame of type `ethertype` on `port` at `now`; `t_us`
    /// is the same moment on the wall clock, only stored (as `updated_t_us`) when the
    /// entry is learned or moves. Callers pass only unicast, non-zero sources (the
    /// forwarding decision filters the rest); others are ignored here too.
    pub fn learn(
        &mut self,
        mac: MacAddr,
        port: PortId,
        ethertype: EtherType,
        now: Instant,
        t_us: u64,
        events: &mut Vec<FdbEvent>,
    ) {
        if !self.learns() || !mac.is_unicast() {
            return;
        }
        if let Some(e) = self.table.get(&mac).copied() {
            if self.expired(&e, now) {
                // Not swept yet: report it as the sweep would have, then learn afresh.
                self.remove(&mac);
                events.push(FdbEvent::Aged { mac, port: e.port });
            } else if e.port == port {
                if let Some(e) = self.table.get_mut(&mac) {
                    e.last_seen = now;
                }
                return;
            } else {
                if now.saturating_duration_since(e.last_seen) < self.cfg.hold_down {
                    return;
                }
                self.dec(e.port);
                self.inc(port);
                self.table.insert(
                    mac,
                    Entry {
                        port,
                        last_seen: now,
                        updated_t_us: t_us,
                    },
                );
                events.push(FdbEvent::Moved {
                    mac,
                    from: e.port,
                    to: port,
                    ethertype,
                });
                return;
            }
        }
        if self.table.len() >= self.cfg.max_entries {
            self.sweep(now, events);
        }
        if self.table.len() >= self.cfg.max_entries {
            self.evict_one(events);
        }
        self.table.insert(
            mac,
            Entry {
                port,
                last_seen: now,
                updated_t_us: t_us,
            },
        );
        self.inc(port);
        events.push(FdbEvent::Learned { mac, port });
    }

    /// The port `mac` lives on, unless unknown or expired.
    pub fn lookup(&self, mac: &MacAddr, now: Instant) -> Option<PortId> {
        let e = self.table.get(mac)?;
        (!self.expired(e, now)).then_some(e.port)
    }

    /// Removes expired entries. Runs periodically so entries age without traffic.
    pub fn sweep(&mut self, now: Instant, events: &mut Vec<FdbEvent>) {
        let ageing = self.cfg.ageing;
        let mut gone = Vec::new();
        self.table.retain(|mac, e| {
            let keep = now.saturating_duration_since(e.last_seen) < ageing;
            if !keep {
                gone.push((*mac, e.port));
            }
            keep
        });
        gone.sort();
        for (mac, port) in gone {
            self.dec(port);
            events.push(FdbEvent::Aged { mac, port });
        }
    }

    /// Empties the table; returns how many entries were removed.
    pub fn flush(&mut self) -> usize {
        let n = self.table.len();
        self.table.clear();
        self.per_port.clear();
        n
    }

    /// Removes the entries of one port (the port went down); returns how many.
    pub fn flush_port(&mut self, port: PortId) -> usize {
        let before = self.table.len();
        self.table.retain(|_, e| e.port != port);
        self.per_port.remove(&port);
        before - self.table.len()
    }

    /// Live entries, ordered by port then MAC.
    pub fn entries(&self, now: Instant) -> Vec<FdbEntry> {
        let mut v: Vec<FdbEntry> = self
            .table
            .iter()
            .filter(|(_, e)| !self.expired(e, now))
            .map(|(mac, e)| FdbEntry {
                mac: *mac,
                port: e.port,
                age: now.saturating_duration_since(e.last_seen),
                updated_t_us: e.updated_t_us,
            })
            .collect();
        v.sort_by_key(|e| (e.port, e.mac));
        v
    }

    /// Number of entries on `port`.
    pub fn port_entries(&self, port: PortId) -> usize {
        self.per_port.get(&port).copied().unwrap_or(0)
    }

    /// Evicts the least recently seen entry of the port holding the most entries
    /// (ties: the lowest port id). A linear scan: it runs only when the table is full.
    fn evict_one(&mut self, events: &mut Vec<FdbEvent>) {
        let Some(port) = self
            .per_port
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(p, _)| *p)
        else {
            return;
        };
        let victim = self
            .table
            .iter()
            .filter(|(_, e)| e.port == port)
            .min_by_key(|(mac, e)| (e.last_seen, **mac))
            .map(|(mac, _)| *mac);
        if let Some(mac) = victim {
            self.remove(&mac);
            events.push(FdbEvent::Evicted { mac, port });
        }
    }

    fn remove(&mut self, mac: &MacAddr) {
        if let Some(e) = self.table.remove(mac) {
            self.dec(e.port);
        }
    }

    fn inc(&mut self, port: PortId) {
        *self.per_port.entry(port).or_insert(0) += 1;
    }

    fn dec(&mut self, port: PortId) {
        if let Some(n) = self.per_port.get_mut(&port) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_port.remove(&port);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x02, 0, 0, 0, 0, n])
    }

    const P1: PortId = PortId(1);
    const P2: PortId = PortId(2);
    const P3: PortId = PortId(3);
    const IP: EtherType = EtherType::Ipv4;

    #[test]
    fn learn_then_lookup() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig::default());
        let mut ev = vec![];
        fdb.learn(mac(1), P1, IP, t0, 0, &mut ev);
        assert_eq!(
            ev,
            vec![FdbEvent::Learned {
                mac: mac(1),
                port: P1
            }]
        );
        assert_eq!(fdb.lookup(&mac(1), t0), Some(P1));
        assert_eq!(fdb.lookup(&mac(2), t0), None);
        // Refreshing on the same port is silent.
        ev.clear();
        fdb.learn(mac(1), P1, IP, t0 + Duration::from_secs(1), 0, &mut ev);
        assert!(ev.is_empty());
        assert_eq!(fdb.entries(t0 + Duration::from_secs(3))[0].age.as_secs(), 2);
    }

    #[test]
    fn move_is_immediate_and_reports_ethertype() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig::default());
        let mut ev = vec![];
        fdb.learn(mac(1), P1, IP, t0, 0, &mut ev);
        ev.clear();
        fdb.learn(mac(1), P2, EtherType::Rarp, t0, 0, &mut ev);
        assert_eq!(
            ev,
            vec![FdbEvent::Moved {
                mac: mac(1),
                from: P1,
                to: P2,
                ethertype: EtherType::Rarp
            }]
        );
        assert_eq!(fdb.lookup(&mac(1), t0), Some(P2));
        assert_eq!(fdb.port_entries(P1), 0);
        assert_eq!(fdb.port_entries(P2), 1);
    }

    #[test]
    fn updated_stamp_marks_learn_and_move_not_refresh() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig::default());
        let mut ev = vec![];
        let stamp = |fdb: &Fdb| fdb.entries(t0 + Duration::from_secs(3))[0].updated_t_us;
        fdb.learn(mac(1), P1, IP, t0, 1_000, &mut ev);
        assert_eq!(stamp(&fdb), 1_000);
        fdb.learn(mac(1), P1, IP, t0 + Duration::from_secs(1), 2_000, &mut ev);
        assert_eq!(stamp(&fdb), 1_000, "a refresh keeps the learn stamp");
        fdb.learn(
            mac(1),
            P2,
            EtherType::Rarp,
            t0 + Duration::from_secs(2),
            3_000,
            &mut ev,
        );
        assert_eq!(stamp(&fdb), 3_000, "a move sets it");
        // A move refused by the hold-down changes nothing.
        let mut held = Fdb::new(FdbConfig {
            hold_down: Duration::from_secs(3),
            ..FdbConfig::default()
        });
        held.learn(mac(1), P1, IP, t0, 1_000, &mut ev);
        held.learn(mac(1), P2, IP, t0, 2_000, &mut ev);
        assert_eq!(stamp(&held), 1_000);
    }

    #[test]
    fn hold_down_refuses_early_moves() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig {
            hold_down: Duration::from_millis(3000),
            ..FdbConfig::default()
        });
        let mut ev = vec![];
        fdb.learn(mac(1), P1, IP, t0, 0, &mut ev);
        ev.clear();
        fdb.learn(
            mac(1),
            P2,
            EtherType::Rarp,
            t0 + Duration::from_millis(2999),
            0,
            &mut ev,
        );
        assert!(ev.is_empty());
        assert_eq!(fdb.lookup(&mac(1), t0), Some(P1));
        fdb.learn(
            mac(1),
            P2,
            EtherType::Rarp,
            t0 + Duration::from_millis(3000),
            0,
            &mut ev,
        );
        assert_eq!(ev.len(), 1);
        assert_eq!(fdb.lookup(&mac(1), t0 + Duration::from_secs(3)), Some(P2));
    }

    #[test]
    fn entries_age_out_on_lookup_and_sweep() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig {
            ageing: Duration::from_secs(10),
            ..FdbConfig::default()
        });
        let mut ev = vec![];
        fdb.learn(mac(1), P1, IP, t0, 0, &mut ev);
        fdb.learn(mac(2), P2, IP, t0 + Duration::from_secs(5), 0, &mut ev);
        ev.clear();
        let t = t0 + Duration::from_secs(10);
        assert_eq!(fdb.lookup(&mac(1), t), None);
        assert_eq!(fdb.lookup(&mac(2), t), Some(P2));
        assert_eq!(fdb.entries(t).len(), 1);
        fdb.sweep(t, &mut ev);
        assert_eq!(
            ev,
            vec![FdbEvent::Aged {
                mac: mac(1),
                port: P1
            }]
        );
        assert_eq!(fdb.len(), 1);
        assert_eq!(fdb.port_entries(P1), 0);
    }

    #[test]
    fn expired_entry_relearned_on_another_port_is_aged_then_learned() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig {
            ageing: Duration::from_secs(10),
            ..FdbConfig::default()
        });
        let mut ev = vec![];
        fdb.learn(mac(1), P1, IP, t0, 0, &mut ev);
        ev.clear();
        fdb.learn(mac(1), P2, IP, t0 + Duration::from_secs(11), 0, &mut ev);
        assert_eq!(
            ev,
            vec![
                FdbEvent::Aged {
                    mac: mac(1),
                    port: P1
                },
                FdbEvent::Learned {
                    mac: mac(1),
                    port: P2
                }
            ]
        );
    }

    #[test]
    fn hub_mode_learns_nothing() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig {
            ageing: Duration::ZERO,
            ..FdbConfig::default()
        });
        let mut ev = vec![];
        fdb.learn(mac(1), P1, IP, t0, 0, &mut ev);
        assert!(ev.is_empty());
        assert!(fdb.is_empty());
        assert_eq!(fdb.lookup(&mac(1), t0), None);
    }

    #[test]
    fn group_and_zero_sources_are_not_learned() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig::default());
        let mut ev = vec![];
        fdb.learn(MacAddr::BROADCAST, P1, IP, t0, 0, &mut ev);
        fdb.learn(MacAddr([0x01, 0, 0x5e, 0, 0, 1]), P1, IP, t0, 0, &mut ev);
        fdb.learn(MacAddr::ZERO, P1, IP, t0, 0, &mut ev);
        assert!(ev.is_empty() && fdb.is_empty());
    }

    #[test]
    fn full_table_evicts_oldest_of_the_busiest_port() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig {
            max_entries: 4,
            ..FdbConfig::default()
        });
        let mut ev = vec![];
        let s = Duration::from_secs;
        fdb.learn(mac(1), P1, IP, t0, 0, &mut ev);
        fdb.learn(mac(2), P2, IP, t0 + s(1), 0, &mut ev);
        fdb.learn(mac(3), P2, IP, t0 + s(2), 0, &mut ev);
        fdb.learn(mac(4), P2, IP, t0 + s(3), 0, &mut ev);
        ev.clear();
        fdb.learn(mac(5), P3, IP, t0 + s(4), 0, &mut ev);
        assert_eq!(
            ev,
            vec![
                FdbEvent::Evicted {
                    mac: mac(2),
                    port: P2
                },
                FdbEvent::Learned {
                    mac: mac(5),
                    port: P3
                }
            ]
        );
        assert_eq!(fdb.len(), 4);
        // mac(1) is older than everything but sits alone on its port: it stays.
        assert_eq!(fdb.lookup(&mac(1), t0 + s(4)), Some(P1));
        assert_eq!(fdb.port_entries(P2), 2);
    }

    #[test]
    fn full_table_prefers_expired_entries() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig {
            max_entries: 2,
            ageing: Duration::from_secs(10),
            ..FdbConfig::default()
        });
        let mut ev = vec![];
        fdb.learn(mac(1), P1, IP, t0, 0, &mut ev);
        fdb.learn(mac(2), P1, IP, t0 + Duration::from_secs(8), 0, &mut ev);
        ev.clear();
        fdb.learn(mac(3), P2, IP, t0 + Duration::from_secs(10), 0, &mut ev);
        assert_eq!(
            ev[0],
            FdbEvent::Aged {
                mac: mac(1),
                port: P1
            }
        );
        assert_eq!(fdb.len(), 2);
    }

    #[test]
    fn flush_empties_everything_or_one_port() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig::default());
        let mut ev = vec![];
        fdb.learn(mac(1), P1, IP, t0, 0, &mut ev);
        fdb.learn(mac(2), P2, IP, t0, 0, &mut ev);
        fdb.learn(mac(3), P2, IP, t0, 0, &mut ev);
        assert_eq!(fdb.flush_port(P2), 2);
        assert_eq!(fdb.entries(t0).len(), 1);
        assert_eq!(fdb.flush(), 1);
        assert!(fdb.is_empty());
        assert_eq!(fdb.port_entries(P1), 0);
    }
}
