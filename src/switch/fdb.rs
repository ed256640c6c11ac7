//! Forwarding database (sans-IO core): which port each unicast MAC was last seen on.
//!
//! The clock is injected (`now` on every call), so learning, moves, ageing and eviction
//! are tested without sleeping. Semantics follow the Linux bridge (802.1D): entries age
//! out after `ageing` (default 300 s; zero means learn nothing and flood everything), a
//! MAC seen on a new port moves at once (an optional hold-down refuses moves for a while
//! after the MAC was last seen on its old port, as vde_switch does), and, as in Open
//! vSwitch, a full table (default 8192) evicts from the port holding the most MACs.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddrV4;
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

/// What changed in the table; the adapter logs these. `remote` is the tunnel endpoint
/// a MAC lives behind on a tunnel port (None on other ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdbEvent {
    Learned {
        mac: MacAddr,
        port: PortId,
        remote: Option<SocketAddrV4>,
    },
    /// The MAC was seen on another port, or behind another remote endpoint of the same
    /// tunnel port; `ethertype` is that of the frame that moved it (RARP after a
    /// migration, typically).
    Moved {
        mac: MacAddr,
        from: PortId,
        to: PortId,
        from_remote: Option<SocketAddrV4>,
        to_remote: Option<SocketAddrV4>,
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
    /// The remote endpoint behind `port` (a tunnel port) the MAC was learned from.
    pub remote: Option<SocketAddrV4>,
    /// Time since a frame from `mac` was last seen.
    pub age: Duration,
    /// Wall-clock stamp (µs since the epoch, as given by the caller) of the frame that
    /// put `mac` on `port`: its learn or its last move. Refreshes leave it alone, so
    /// tools read off it when a migrated MAC reached its new port.
    pub updated_t_us: u64,
}

/// No node: the end of a list.
const NIL: u32 = u32::MAX;

/// One entry, a node of two intrusive lists: the table-wide list ordered by last frame
/// seen (its head ages out first) and its port's list in the same order (its head is
/// evicted first).
#[derive(Debug, Clone, Copy)]
struct Node {
    mac: MacAddr,
    port: PortId,
    remote: Option<SocketAddrV4>,
    last_seen: Instant,
    updated_t_us: u64,
    all: Links,
    on_port: Links,
}

#[derive(Debug, Clone, Copy)]
struct Links {
    prev: u32,
    next: u32,
}

impl Links {
    const NONE: Links = Links {
        prev: NIL,
        next: NIL,
    };
}

/// Ends of one list and its length.
#[derive(Debug, Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
    len: usize,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// Which of a node's two lists an operation is about.
#[derive(Clone, Copy)]
enum Which {
    All,
    Port,
}

/// The table. Not thread-safe by itself: the daemon holds it under a lock.
///
/// Every operation a frame can cause is O(1) in the number of entries (a hash lookup
/// and a few list links), including when the table is full: the expired entries are
/// the head of the table-wide list, the victim of an eviction is the head of the
/// busiest port's list, and the busiest port is the last element of an ordered set of
/// (count, port) pairs, O(log ports). A flood of new MACs therefore costs the same per
/// frame whether the table is empty or full.
#[derive(Debug)]
pub struct Fdb {
    cfg: FdbConfig,
    index: HashMap<MacAddr, u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    all: List,
    ports: HashMap<PortId, List>,
    /// (entries, port) of every port holding at least one entry; the last element is
    /// the busiest port, the lowest id among equals.
    busiest: BTreeSet<(usize, Reverse<PortId>)>,
}

impl Fdb {
    pub fn new(cfg: FdbConfig) -> Fdb {
        let cap = cfg.max_entries.min(DEFAULT_MAX_ENTRIES);
        Fdb {
            cfg,
            index: HashMap::with_capacity(cap),
            nodes: Vec::with_capacity(cap),
            free: Vec::new(),
            all: List::EMPTY,
            ports: HashMap::new(),
            busiest: BTreeSet::new(),
        }
    }

    pub fn config(&self) -> &FdbConfig {
        &self.cfg
    }

    /// Number of entries, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// False in hub mode (ageing zero).
    pub fn learns(&self) -> bool {
        !self.cfg.ageing.is_zero() && self.cfg.max_entries > 0
    }

    fn expired_at(&self, last_seen: Instant, now: Instant) -> bool {
        now.saturating_duration_since(last_seen) >= self.cfg.ageing
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
        self.learn_from(mac, port, None, ethertype, now, t_us, events);
    }

    /// [`Fdb::learn`] for a frame that came out of a tunnel port from the endpoint
    /// `remote` (flood-and-learn, RFC 7348 section 4): the MAC is learned against the
    /// port and that endpoint, and a MAC seen behind another endpoint of the same port
    /// moves as it would between ports.
    #[allow(clippy::too_many_arguments)]
    pub fn learn_from(
        &mut self,
        mac: MacAddr,
        port: PortId,
        remote: Option<SocketAddrV4>,
        ethertype: EtherType,
        now: Instant,
        t_us: u64,
        events: &mut Vec<FdbEvent>,
    ) {
        if !self.learns() || !mac.is_unicast() {
            return;
        }
        if let Some(&i) = self.index.get(&mac) {
            let e = self.nodes[i as usize];
            if self.expired_at(e.last_seen, now) {
                // Not swept yet: report it as the sweep would have, then learn afresh.
                self.remove_node(i);
                events.push(FdbEvent::Aged { mac, port: e.port });
            } else if e.port == port && e.remote == remote {
                self.nodes[i as usize].last_seen = now;
                self.make_youngest(i);
                return;
            } else {
                if now.saturating_duration_since(e.last_seen) < self.cfg.hold_down {
                    return;
                }
                if e.port == port {
                    // Another endpoint of the same tunnel port: the port's lists and
                    // counts stay as they are.
                    let n = &mut self.nodes[i as usize];
                    n.remote = remote;
                    n.last_seen = now;
                    n.updated_t_us = t_us;
                    self.make_youngest(i);
                } else {
                    self.unlink(i, Which::Port);
                    self.count_changed(e.port, -1);
                    let n = &mut self.nodes[i as usize];
                    n.port = port;
                    n.remote = remote;
                    n.last_seen = now;
                    n.updated_t_us = t_us;
                    self.push_back(i, Which::Port);
                    self.count_changed(port, 1);
                    self.unlink(i, Which::All);
                    self.push_back(i, Which::All);
                }
                events.push(FdbEvent::Moved {
                    mac,
                    from: e.port,
                    to: port,
                    from_remote: e.remote,
                    to_remote: remote,
                    ethertype,
                });
                return;
            }
        }
        if self.index.len() >= self.cfg.max_entries {
            self.sweep(now, events);
        }
        if self.index.len() >= self.cfg.max_entries {
            self.evict_one(events);
        }
        let node = Node {
            mac,
            port,
            remote,
            last_seen: now,
            updated_t_us: t_us,
            all: Links::NONE,
            on_port: Links::NONE,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.index.insert(mac, i);
        self.push_back(i, Which::All);
        self.push_back(i, Which::Port);
        self.count_changed(port, 1);
        events.push(FdbEvent::Learned { mac, port, remote });
    }

    /// The port `mac` lives on, unless unknown or expired.
    pub fn lookup(&self, mac: &MacAddr, now: Instant) -> Option<PortId> {
        self.lookup_remote(mac, now).map(|(p, _)| p)
    }

    /// The port `mac` lives on and, behind a tunnel port, its remote endpoint.
    pub fn lookup_remote(
        &self,
        mac: &MacAddr,
        now: Instant,
    ) -> Option<(PortId, Option<SocketAddrV4>)> {
        let e = &self.nodes[*self.index.get(mac)? as usize];
        (!self.expired_at(e.last_seen, now)).then_some((e.port, e.remote))
    }

    /// Removes expired entries, oldest first. Runs periodically so entries age without
    /// traffic; costs O(1) per entry removed, nothing for the live ones.
    pub fn sweep(&mut self, now: Instant, events: &mut Vec<FdbEvent>) {
        while self.all.head != NIL {
            let i = self.all.head;
            let e = self.nodes[i as usize];
            if !self.expired_at(e.last_seen, now) {
                break;
            }
            self.remove_node(i);
            events.push(FdbEvent::Aged {
                mac: e.mac,
                port: e.port,
            });
        }
    }

    /// Empties the table; returns how many entries were removed.
    pub fn flush(&mut self) -> usize {
        let n = self.index.len();
        self.index.clear();
        self.nodes.clear();
        self.free.clear();
        self.all = List::EMPTY;
        self.ports.clear();
        self.busiest.clear();
        n
    }

    /// Removes the entries of one port (the port went down); returns how many.
    pub fn flush_port(&mut self, port: PortId) -> usize {
        let mut n = 0;
        while let Some(i) = self.ports.get(&port).map(|l| l.head).filter(|&h| h != NIL) {
            self.remove_node(i);
            n += 1;
        }
        n
    }

    /// Live entries, ordered by port then MAC.
    pub fn entries(&self, now: Instant) -> Vec<FdbEntry> {
        let mut v: Vec<FdbEntry> = self
            .index
            .values()
            .map(|&i| &self.nodes[i as usize])
            .filter(|e| !self.expired_at(e.last_seen, now))
            .map(|e| FdbEntry {
                mac: e.mac,
                port: e.port,
                remote: e.remote,
                age: now.saturating_duration_since(e.last_seen),
                updated_t_us: e.updated_t_us,
            })
            .collect();
        v.sort_by_key(|e| (e.port, e.mac));
        v
    }

    /// Number of entries on `port`.
    pub fn port_entries(&self, port: PortId) -> usize {
        self.ports.get(&port).map_or(0, |l| l.len)
    }

    /// Evicts the least recently seen entry of the port holding the most entries
    /// (ties: the lowest port id): the head of that port's list.
    fn evict_one(&mut self, events: &mut Vec<FdbEvent>) {
        let Some(&(_, Reverse(port))) = self.busiest.last() else {
            return;
        };
        let Some(i) = self.ports.get(&port).map(|l| l.head).filter(|&h| h != NIL) else {
            return;
        };
        let mac = self.nodes[i as usize].mac;
        self.remove_node(i);
        events.push(FdbEvent::Evicted { mac, port });
    }

    fn remove_node(&mut self, i: u32) {
        let e = self.nodes[i as usize];
        self.unlink(i, Which::All);
        self.unlink(i, Which::Port);
        self.count_changed(e.port, -1);
        self.index.remove(&e.mac);
        self.free.push(i);
    }

    /// Moves a refreshed entry to the young end of both its lists.
    fn make_youngest(&mut self, i: u32) {
        for w in [Which::All, Which::Port] {
            let list = self.list(w, self.nodes[i as usize].port);
            if list.tail != i {
                self.unlink(i, w);
                self.push_back(i, w);
            }
        }
    }

    fn links(&mut self, i: u32, w: Which) -> &mut Links {
        let n = &mut self.nodes[i as usize];
        match w {
            Which::All => &mut n.all,
            Which::Port => &mut n.on_port,
        }
    }

    fn list(&self, w: Which, port: PortId) -> List {
        match w {
            Which::All => self.all,
            Which::Port => self.ports.get(&port).copied().unwrap_or(List::EMPTY),
        }
    }

    fn list_mut(&mut self, w: Which, port: PortId) -> &mut List {
        match w {
            Which::All => &mut self.all,
            Which::Port => self.ports.entry(port).or_insert(List::EMPTY),
        }
    }

    fn unlink(&mut self, i: u32, w: Which) {
        let port = self.nodes[i as usize].port;
        let Links { prev, next } = *self.links(i, w);
        if prev != NIL {
            self.links(prev, w).next = next;
        }
        if next != NIL {
            self.links(next, w).prev = prev;
        }
        let list = self.list_mut(w, port);
        if list.head == i {
            list.head = next;
        }
        if list.tail == i {
            list.tail = prev;
        }
        list.len -= 1;
        if let (Which::Port, 0) = (w, list.len) {
            self.ports.remove(&port);
        }
        *self.links(i, w) = Links::NONE;
    }

    fn push_back(&mut self, i: u32, w: Which) {
        let port = self.nodes[i as usize].port;
        let list = self.list_mut(w, port);
        let old_tail = list.tail;
        list.tail = i;
        if list.head == NIL {
            list.head = i;
        }
        list.len += 1;
        if old_tail != NIL {
            self.links(old_tail, w).next = i;
        }
        *self.links(i, w) = Links {
            prev: old_tail,
            next: NIL,
        };
    }

    /// Keeps `busiest` in step after `port`'s list grew or shrank by one (its list
    /// length is already updated).
    fn count_changed(&mut self, port: PortId, delta: isize) {
        let now = self.port_entries(port);
        let before = now.wrapping_add_signed(-delta);
        if before > 0 {
            self.busiest.remove(&(before, Reverse(port)));
        }
        if now > 0 {
            self.busiest.insert((now, Reverse(port)));
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
                port: P1,
                remote: None
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
                from_remote: None,
                to_remote: None,
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
                    port: P2,
                    remote: None
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
                    port: P3,
                    remote: None
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
    #[test]
    fn a_refreshed_entry_is_not_the_one_evicted() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(FdbConfig {
            max_entries: 3,
            ..FdbConfig::default()
        });
        let mut ev = vec![];
        let s = Duration::from_secs;
        fdb.learn(mac(1), P1, IP, t0, 0, &mut ev);
        fdb.learn(mac(2), P1, IP, t0 + s(1), 0, &mut ev);
        fdb.learn(mac(3), P1, IP, t0 + s(2), 0, &mut ev);
        fdb.learn(mac(1), P1, IP, t0 + s(3), 0, &mut ev);
        ev.clear();
        fdb.learn(mac(4), P2, IP, t0 + s(4), 0, &mut ev);
        assert_eq!(
            ev[0],
            FdbEvent::Evicted {
                mac: mac(2),
                port: P1
            }
        );
    }

    /// The table against a plain model (a map scanned in full for every decision, as
    /// the first version of this table did) over a long pseudo-random run of learns,
    /// moves, refreshes, sweeps and port flushes with a small cap: same events, same
    /// entries, same counts.
    #[test]
    fn matches_a_linear_scan_model() {
        #[derive(Clone, Copy)]
        struct M {
            port: PortId,
            seen: Instant,
            seq: u64,
        }
        let cfg = FdbConfig {
            max_entries: 16,
            ageing: Duration::from_millis(400),
            hold_down: Duration::ZERO,
        };
        let mut fdb = Fdb::new(cfg);
        let mut model: HashMap<MacAddr, M> = HashMap::new();
        let t0 = Instant::now();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut seq = 0u64;
        for step in 0..20_000u64 {
            let now = t0 + Duration::from_millis(step / 8);
            let mut ev = vec![];
            let mut want = vec![];
            match rnd(100) {
                0 => {
                    fdb.sweep(now, &mut ev);
                    let mut gone: Vec<_> = model
                        .iter()
                        .filter(|(_, m)| now.duration_since(m.seen) >= cfg.ageing)
                        .map(|(k, m)| (m.seq, *k, m.port))
                        .collect();
                    gone.sort();
                    for (_, k, p) in gone {
                        model.remove(&k);
                        want.push(FdbEvent::Aged { mac: k, port: p });
                    }
                }
                1 => {
                    let p = PortId(rnd(4) as u16);
                    let n = model.values().filter(|m| m.port == p).count();
                    assert_eq!(fdb.flush_port(p), n);
                    model.retain(|_, m| m.port != p);
                }
                _ => {
                    let m = mac(rnd(40) as u8);
                    let p = PortId(rnd(4) as u16);
                    fdb.learn(m, p, IP, now, 0, &mut ev);
                    seq += 1;
                    match model.get(&m).copied() {
                        Some(e) if now.duration_since(e.seen) >= cfg.ageing => {
                            model.remove(&m);
                            want.push(FdbEvent::Aged {
                                mac: m,
                                port: e.port,
                            });
                        }
                        Some(e) if e.port == p => {
                            model.insert(
                                m,
                                M {
                                    seen: now,
                                    seq,
                                    ..e
                                },
                            );
                        }
                        Some(e) => {
                            model.insert(
                                m,
                                M {
                                    port: p,
                                    seen: now,
                                    seq,
                                },
                            );
                            want.push(FdbEvent::Moved {
                                mac: m,
                                from: e.port,
                                to: p,
                                from_remote: None,
                                to_remote: None,
                                ethertype: IP,
                            });
                        }
                        None => {}
                    }
                    if !model.contains_key(&m) {
                        if model.len() >= cfg.max_entries {
                            let mut gone: Vec<_> = model
                                .iter()
                                .filter(|(_, e)| now.duration_since(e.seen) >= cfg.ageing)
                                .map(|(k, e)| (e.seq, *k, e.port))
                                .collect();
                            gone.sort();
                            for (_, k, p) in gone {
                                model.remove(&k);
                                want.push(FdbEvent::Aged { mac: k, port: p });
                            }
                        }
                        if model.len() >= cfg.max_entries {
                            let mut counts: HashMap<PortId, usize> = HashMap::new();
                            for e in model.values() {
                                *counts.entry(e.port).or_default() += 1;
                            }
                            let busiest = counts
                                .iter()
                                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                                .map(|(p, _)| *p)
                                .unwrap();
                            let (k, _) = model
                                .iter()
                                .filter(|(_, e)| e.port == busiest)
                                .min_by_key(|(_, e)| e.seq)
                                .map(|(k, e)| (*k, *e))
                                .unwrap();
                            model.remove(&k);
                            want.push(FdbEvent::Evicted {
                                mac: k,
                                port: busiest,
                            });
                        }
                        model.insert(
                            m,
                            M {
                                port: p,
                                seen: now,
                                seq,
                            },
                        );
                        want.push(FdbEvent::Learned {
                            mac: m,
                            port: p,
                            remote: None,
                        });
                    }
                }
            }
            assert_eq!(ev, want, "step {step}");
            assert_eq!(fdb.len(), model.len(), "step {step}");
            for p in 0..4 {
                let p = PortId(p);
                let n = model.values().filter(|m| m.port == p).count();
                assert_eq!(fdb.port_entries(p), n, "step {step}");
            }
            for (k, m) in &model {
                let live = now.duration_since(m.seen) < cfg.ageing;
                assert_eq!(fdb.lookup(k, now), live.then_some(m.port), "step {step}");
            }
        }
    }
}
