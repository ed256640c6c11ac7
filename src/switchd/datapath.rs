//! The data path (adapter): the threads that read frames off the ports, ask the sans-IO
//! [`crate::switch`] core where each goes, and write it out.
//!
//! By default ([`Threading::Single`]) one thread sleeps in a single poll over every
//! port, reads what is ready, asks the core where each frame goes (the FDB sits under
//! one mutex, held for a hash lookup or two), and writes the frame straight to the
//! destination ports' fds from the same buffer. A reply caused by that write is usually
//! ready when the write returns, so a round trip costs one wake-up. With
//! [`Threading::PerPort`] each port has its own thread doing the same for its port.
//! No queue, no allocation per frame. Counters are atomics.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{FdbRow, PortStats, DEFAULT_NAME};
use crate::events::{Event, EventBus};
use crate::port::{Port, PortError, Recv};
use crate::switch::{Decision, DropReason, FdbConfig, FdbEvent, PortId, Switch};
use crate::sys::poll::{PollSet, Readiness};
use crate::wire::ethernet::HEADER_LEN;
use crate::wire::vnet::{self, VnetHdr};

/// Largest Ethernet frame the data path takes: a 64 KiB GSO frame plus header and tag.
pub const MAX_FRAME: usize = 65536 + HEADER_LEN + 4;
/// How long a port thread blocks before checking for shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Most frames a thread takes from another port after writing to it (see `steal`).
const STEAL_BUDGET: usize = 8;

/// Per-port counters, updated by the data path without locks.
#[derive(Debug, Default)]
pub struct PortCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames received on this port that were flooded.
    pub flooded: AtomicU64,
    /// Receive errors other than the port going away.
    pub rx_errors: AtomicU64,
    pub dropped: [AtomicU64; DropReason::ALL.len()],
}

impl PortCounters {
    fn drop(&self, r: DropReason) {
        self.dropped[r.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// One port of the running switch.
pub struct SwitchPort {
    pub id: PortId,
    pub name: String,
    /// Namespace the port's interface lives in (None: the switch's own).
    pub netns: Option<String>,
    port: Box<dyn Port>,
    pub counters: PortCounters,
    up: AtomicBool,
    /// The interface is operationally up as the kernel last said (or unknown): floods
    /// skip a port whose link is down and unicast to it is dropped, as a bridge does
    /// with a port that is not forwarding.
    link: AtomicBool,
    /// The operational state last published as a `port_link` event.
    link_reported: AtomicBool,
    /// The interface's MTU as last read from the kernel (0: unknown, no limit).
    mtu: AtomicU32,
    /// Held while a frame of this port is read and forwarded: whichever thread does it,
    /// the port's frames leave in the order they came.
    rx: Mutex<()>,
}

impl SwitchPort {
    pub fn new(id: PortId, name: &str, netns: Option<String>, port: Box<dyn Port>) -> SwitchPort {
        SwitchPort {
            id,
            name: name.to_string(),
            netns,
            port,
            counters: PortCounters::default(),
            up: AtomicBool::new(true),
            link: AtomicBool::new(true),
            link_reported: AtomicBool::new(true),
            mtu: AtomicU32::new(0),
            rx: Mutex::new(()),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// True while the port's interface is operationally up (or its state unknown).
    pub fn link_up(&self) -> bool {
        self.link.load(Ordering::Relaxed)
    }

    /// The port takes frames: not gone or deleted, and its link up.
    fn forwarding(&self) -> bool {
        self.is_up() && self.link_up()
    }

    /// What the port is (`tap`, `attach`, `vxlan`, …).
    pub fn kind(&self) -> &'static str {
        self.port.kind()
    }

    /// Rereads the interface's MTU and operational state; returns what changed.
    fn refresh_link(&self) -> LinkChange {
        let st = self.port.link_state();
        let mtu = st.mtu.and_then(|new| {
            let old = self.mtu.swap(new, Ordering::Relaxed);
            (old != new).then_some((old, new))
        });
        let running = st.running.and_then(|new| {
            self.link.store(new, Ordering::Relaxed);
            let old = self.link_reported.swap(new, Ordering::Relaxed);
            (old != new).then_some(new)
        });
        LinkChange { mtu, running }
    }

    /// True if an Ethernet frame of `eth_len` bytes (`tagged`: with an 802.1Q tag)
    /// exceeds what this port's interface takes: its MTU plus the Ethernet header, and
    /// the tag, as the Linux bridge counts (`is_skb_forwardable`).
    fn exceeds_mtu(&self, eth_len: usize, tagged: bool) -> bool {
        let mtu = self.mtu.load(Ordering::Relaxed);
        mtu != 0 && eth_len > mtu as usize + HEADER_LEN + if tagged { 4 } else { 0 }
    }
}

/// What [`SwitchPort::refresh_link`] found changed.
struct LinkChange {
    /// (old, new) MTU.
    mtu: Option<(u32, u32)>,
    /// The new operational state.
    running: Option<bool>,
}

/// Every port slot (index = [`PortId`]); a deleted port leaves its slot empty until a
/// new port takes it. Replaced whole on every change, so the data path reads a snapshot
/// without a lock per frame (see [`View`]).
type Table = Arc<[Option<Arc<SwitchPort>>]>;

/// A data-path thread's copy of the port table, refreshed when its generation moves:
/// one atomic load per round while nothing changes.
struct View {
    gen: u64,
    ports: Table,
}

impl View {
    fn new(s: &Shared) -> View {
        let gen = s.table_gen.load(Ordering::Acquire);
        View {
            gen,
            ports: s.table(),
        }
    }

    /// Takes the current table if it changed; true if it did.
    fn refresh(&mut self, s: &Shared) -> bool {
        let gen = s.table_gen.load(Ordering::Acquire);
        if gen == self.gen {
            return false;
        }
        self.ports = s.table();
        self.gen = gen;
        true
    }

    fn get(&self, id: PortId) -> Option<&SwitchPort> {
        self.ports.get(usize::from(id.0))?.as_deref()
    }
}

/// Most `mac moved` lines logged per second; more moves than that (a flood, a loop)
/// are counted and summed up instead.
pub const MOVE_LINES_PER_SEC: u64 = 20;
/// How often [`Fabric::sweep`] sums up FDB activity at INFO (when there was any).
const ACTIVITY_SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// FDB changes since the switch started, for the log summary.
#[derive(Debug, Default)]
struct FdbActivity {
    learned: AtomicU64,
    moved: AtomicU64,
    aged: AtomicU64,
    evicted: AtomicU64,
    moves_unlogged: AtomicU64,
    /// The second (of `t_us`) the move lines are being counted in, and how many.
    move_second: AtomicU64,
    move_lines: AtomicU64,
}

impl FdbActivity {
    fn move_line_allowed(&self, t_us: u64) -> bool {
        let sec = t_us / 1_000_000;
        if self.move_second.swap(sec, Ordering::Relaxed) != sec {
            self.move_lines.store(0, Ordering::Relaxed);
        }
        self.move_lines.fetch_add(1, Ordering::Relaxed) < MOVE_LINES_PER_SEC
    }

    fn snapshot(&self) -> [u64; 5] {
        [
            &self.learned,
            &self.moved,
            &self.aged,
            &self.evicted,
            &self.moves_unlogged,
        ]
        .map(|a| a.load(Ordering::Relaxed))
    }
}

/// What the periodic summary last reported.
struct Summary {
    at: Instant,
    counts: [u64; 5],
}

struct Shared {
    fdb_activity: FdbActivity,
    summary: Mutex<Summary>,
    /// The ports; changed only by [`Fabric::add_port`] and [`Fabric::remove_port`].
    table: Mutex<Table>,
    /// Moves on every change of `table` (after it).
    table_gen: AtomicU64,
    mirror: Option<SwitchPort>,
    /// How the data path runs (threads, priority, CPU).
    opts: DataPathOptions,
    core: Mutex<Switch>,
    stop: AtomicBool,
    hdr_len: usize,
    events: EventBus,
}

/// How the data path uses threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Threading {
    /// One thread per port, each sleeping on its own port.
    PerPort,
    /// One thread polling every port at once (falls back to one thread per port when
    /// a port has no file descriptor to poll, as in-memory ports).
    #[default]
    Single,
}

/// How the data-path threads run: their threading, and optionally a real-time priority
/// and a CPU to stay on. Off by default: a real-time thread that spins would starve
/// the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataPathOptions {
    pub threading: Threading,
    /// SCHED_FIFO priority (1–99) for the data-path threads.
    pub rt_priority: Option<u8>,
    /// CPU the data-path threads are pinned to.
    pub cpu: Option<usize>,
    /// Frames the single data-path thread forwards between two polls, across all ports
    /// (0: [`ROUND_BUDGET`]).
    pub batch: usize,
}

impl DataPathOptions {
    fn batch(&self) -> usize {
        if self.batch == 0 {
            ROUND_BUDGET
        } else {
            self.batch
        }
    }

    /// Applies priority and affinity to the calling thread; a refusal is logged once
    /// and the thread runs on as a normal one.
    fn apply_to_current_thread(&self) {
        if let Some(prio) = self.rt_priority {
            if let Err(e) = crate::sys::set_current_thread_fifo(prio) {
                tracing::warn!(priority = prio, error = %e, "data path: cannot take real-time priority");
            }
        }
        if let Some(cpu) = self.cpu {
            if let Err(e) = crate::sys::pin_current_thread(cpu) {
                tracing::warn!(cpu, error = %e, "data path: cannot pin to the CPU");
            }
        }
    }
}

impl std::str::FromStr for Threading {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "per-port" => Ok(Threading::PerPort),
            "single" => Ok(Threading::Single),
            other => Err(format!("{other:?} is not per-port or single")),
        }
    }
}

/// The running data path: port threads over a shared core.
pub struct Fabric {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Each port has its own thread (else one thread polls them all).
    per_port: bool,
}

/// Errors of starting the data path.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("all ports must use the same virtio-net header length")]
    MixedHeaders,
    #[error("too many ports (at most {max})", max = u16::MAX)]
    TooManyPorts,
    #[error("cannot start a port thread")]
    Thread(#[source] std::io::Error),
    #[error("port {0:?} exists already")]
    DuplicatePort(String),
    #[error("no port {0:?}")]
    NoSuchPort(String),
}

/// What [`Fabric::remove_port`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub id: PortId,
    pub ifname: String,
    pub fdb_entries_removed: usize,
}

impl Fabric {
    /// Starts one thread per port ([`Threading::PerPort`]; the in-memory ports of the
    /// tests need it). `ports` get ids 0, 1, … in order. The mirror, if any, receives a
    /// copy of every frame any port receives.
    pub fn start(
        ports: Vec<SwitchPort>,
        mirror: Option<SwitchPort>,
        cfg: FdbConfig,
    ) -> Result<Fabric, FabricError> {
        Self::start_with(ports, mirror, cfg, Threading::PerPort)
    }

    /// Like [`Fabric::start`], with a choice of threading.
    pub fn start_with(
        ports: Vec<SwitchPort>,
        mirror: Option<SwitchPort>,
        cfg: FdbConfig,
        threading: Threading,
    ) -> Result<Fabric, FabricError> {
        Self::start_events(ports, mirror, cfg, threading, EventBus::new(DEFAULT_NAME))
    }

    /// Like [`Fabric::start`], with a choice of threading and the bus its events go to.
    pub fn start_events(
        ports: Vec<SwitchPort>,
        mirror: Option<SwitchPort>,
        cfg: FdbConfig,
        threading: Threading,
        events: EventBus,
    ) -> Result<Fabric, FabricError> {
        let opts = DataPathOptions {
            threading,
            ..DataPathOptions::default()
        };
        Self::start_opts(ports, mirror, cfg, opts, events)
    }

    /// Like [`Fabric::start`], with every data-path option. Port `i` must have id `i`.
    pub fn start_opts(
        ports: Vec<SwitchPort>,
        mirror: Option<SwitchPort>,
        cfg: FdbConfig,
        opts: DataPathOptions,
        events: EventBus,
    ) -> Result<Fabric, FabricError> {
        let shared = Arc::new(Shared::new(ports, mirror, cfg, opts, events)?);
        let ports = shared.table();
        let pollable = ports.iter().flatten().all(|p| p.port.poll_fd().is_some());
        let fabric = Fabric {
            shared,
            threads: Mutex::new(Vec::new()),
            per_port: opts.threading == Threading::PerPort || !pollable,
        };
        let s = &fabric.shared;
        if !fabric.per_port {
            let sh = s.clone();
            let t = std::thread::Builder::new()
                .name("ports".into())
                .spawn(move || {
                    sh.opts.apply_to_current_thread();
                    poll_loop(&sh)
                })
                .map_err(FabricError::Thread)?;
            fabric.threads_mut().push(t);
            return Ok(fabric);
        }
        for p in ports.iter().flatten() {
            if let Err(e) = fabric.spawn_port_thread(p.clone()) {
                s.stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        Ok(fabric)
    }

    fn threads_mut(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_port_thread(&self, p: Arc<SwitchPort>) -> Result<(), FabricError> {
        let s = self.shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("port-{}", p.name))
            .spawn(move || {
                s.opts.apply_to_current_thread();
                port_loop(&s, &p)
            })
            .map_err(FabricError::Thread)?;
        self.threads_mut().push(t);
        Ok(())
    }

    /// Adds a port while the switch runs; returns its id (the first free slot). Its
    /// interface's MTU and link state are read before it takes its first frame.
    pub fn add_port(
        &self,
        name: &str,
        netns: Option<String>,
        port: Box<dyn Port>,
    ) -> Result<PortId, FabricError> {
        let s = &self.shared;
        if port.vnet_hdr_len() != s.hdr_len {
            return Err(FabricError::MixedHeaders);
        }
        if port.poll_fd().is_none() && !self.per_port {
            // The single poll thread could not wait on it.
            return Err(FabricError::Thread(std::io::Error::other(
                "the port has no descriptor to poll",
            )));
        }
        let p = {
            let mut table = s.table_lock();
            if table.iter().flatten().any(|p| p.name == name) {
                return Err(FabricError::DuplicatePort(name.to_string()));
            }
            let slot = match table.iter().position(Option::is_none) {
                Some(i) => i,
                None if table.len() < usize::from(u16::MAX) => table.len(),
                None => return Err(FabricError::TooManyPorts),
            };
            let p = Arc::new(SwitchPort::new(PortId(slot as u16), name, netns, port));
            p.refresh_link();
            let mut next: Vec<Option<Arc<SwitchPort>>> = table.iter().cloned().collect();
            if slot == next.len() {
                next.push(Some(p.clone()));
            } else {
                next[slot] = Some(p.clone());
            }
            *table = next.into();
            s.table_gen.fetch_add(1, Ordering::Release);
            p
        };
        if self.per_port {
            self.spawn_port_thread(p.clone())?;
        }
        Ok(p.id)
    }

    /// Deletes a port while the switch runs: it stops taking and sending frames at
    /// once, its FDB entries are flushed in the same step (no frame can be learned on
    /// it after), and its device closes once no data-path thread holds it.
    pub fn remove_port(&self, name: &str) -> Result<Removed, FabricError> {
        let s = &self.shared;
        let mut table = s.table_lock();
        let Some(p) = table.iter().flatten().find(|p| p.name == name).cloned() else {
            return Err(FabricError::NoSuchPort(name.to_string()));
        };
        let fdb_entries_removed = {
            let mut core = s.core();
            p.up.store(false, Ordering::Relaxed);
            core.fdb_mut().flush_port(p.id)
        };
        let mut next: Vec<Option<Arc<SwitchPort>>> = table.iter().cloned().collect();
        next[usize::from(p.id.0)] = None;
        while next.last().is_some_and(Option::is_none) {
            next.pop();
        }
        *table = next.into();
        s.table_gen.fetch_add(1, Ordering::Release);
        Ok(Removed {
            id: p.id,
            ifname: p.port.ifname().to_string(),
            fdb_entries_removed,
        })
    }

    /// The names of the ports (not the mirror's), in id order.
    pub fn port_names(&self) -> Vec<String> {
        let ports = self.shared.table();
        ports.iter().flatten().map(|p| p.name.clone()).collect()
    }

    /// Live FDB entries.
    pub fn fdb(&self) -> Vec<FdbRow> {
        let now = Instant::now();
        let ports = self.shared.table();
        let core = self.shared.core();
        core.fdb()
            .entries(now)
            .into_iter()
            .map(|e| FdbRow {
                mac: e.mac,
                port: self.shared.port_name(&ports, e.port).to_string(),
                port_id: e.port,
                remote: e.remote,
                age_s: (e.age.as_secs_f64() * 1000.0).round() / 1000.0,
                updated_t_us: e.updated_t_us,
            })
            .collect()
    }

    /// Empties the FDB; returns how many entries went.
    pub fn flush(&self) -> usize {
        let n = self.shared.core().fdb_mut().flush();
        self.shared
            .events
            .emit_now(Event::FdbFlushed { entries: n });
        n
    }

    /// Rereads every port's MTU and operational state (an ioctl or two per port: cheap
    /// enough once a second, and the data path then only loads an atomic per frame);
    /// logs changes, and publishes link changes as events.
    pub fn refresh_links(&self) {
        for p in self.shared.table().iter().flatten() {
            let change = p.refresh_link();
            if let Some((old, new)) = change.mtu {
                tracing::info!(port = %p.name, ifname = %p.port.ifname(), old, new,
                    t_us = crate::clock::unix_micros(), "port mtu changed");
            }
            if let Some(up) = change.running {
                self.shared.events.emit_now(Event::PortLink {
                    port: p.name.clone(),
                    ifname: p.port.ifname().to_string(),
                    up,
                });
            }
        }
    }

    /// Removes expired entries, and every [`ACTIVITY_SUMMARY_EVERY`] sums up at INFO
    /// what the FDB did meanwhile. Called once a second.
    pub fn sweep(&self) {
        let mut events = Vec::new();
        let now = Instant::now();
        let entries = {
            let mut core = self.shared.core();
            core.fdb_mut().sweep(now, &mut events);
            core.fdb().len()
        };
        let ports = self.shared.table();
        self.shared
            .emit_events(&ports, &events, crate::clock::unix_micros());
        let mut last = self
            .shared
            .summary
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if now.duration_since(last.at) < ACTIVITY_SUMMARY_EVERY {
            return;
        }
        let counts = self.shared.fdb_activity.snapshot();
        let d: Vec<u64> = counts
            .iter()
            .zip(last.counts.iter())
            .map(|(a, b)| a - b)
            .collect();
        if d.iter().any(|&n| n > 0) {
            tracing::info!(
                learned = d[0],
                moved = d[1],
                aged = d[2],
                evicted = d[3],
                moves_not_logged = d[4],
                entries,
                secs = now.duration_since(last.at).as_secs(),
                t_us = crate::clock::unix_micros(),
                "fdb activity"
            );
        }
        *last = Summary { at: now, counts };
    }

    /// The bus the switch's events go to.
    pub fn events(&self) -> &EventBus {
        &self.shared.events
    }

    /// Counters of every port (the mirror last).
    pub fn stats(&self) -> Vec<PortStats> {
        let ports = self.shared.table();
        let core = self.shared.core();
        ports
            .iter()
            .flatten()
            .map(|p| &**p)
            .chain(self.shared.mirror.iter())
            .map(|p| {
                let c = &p.counters;
                let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
                PortStats {
                    port: p.name.clone(),
                    id: p.id,
                    ifname: p.port.ifname().to_string(),
                    netns: p.netns.clone().unwrap_or_default(),
                    up: p.is_up(),
                    link_up: p.link_up(),
                    kind: p.kind().to_string(),
                    offload: p.port.offload(),
                    mtu: p.mtu.load(Ordering::Relaxed),
                    fdb_entries: core.fdb().port_entries(p.id),
                    rx_frames: ld(&c.rx_frames),
                    rx_bytes: ld(&c.rx_bytes),
                    tx_frames: ld(&c.tx_frames),
                    tx_bytes: ld(&c.tx_bytes),
                    flooded: ld(&c.flooded),
                    rx_errors: ld(&c.rx_errors),
                    dropped: DropReason::ALL
                        .iter()
                        .filter_map(|r| {
                            let n = ld(&c.dropped[r.index()]);
                            (n > 0).then(|| (r.as_str().to_string(), n))
                        })
                        .collect(),
                    vxlan: p.port.tunnel().cloned(),
                }
            })
            .collect()
    }

    /// Stops the port threads and waits for them. Ports close when the fabric drops.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn new(
        ports: Vec<SwitchPort>,
        mirror: Option<SwitchPort>,
        cfg: FdbConfig,
        opts: DataPathOptions,
        events: EventBus,
    ) -> Result<Shared, FabricError> {
        if ports.len() > usize::from(u16::MAX) {
            return Err(FabricError::TooManyPorts);
        }
        let hdr_len = ports.first().map_or(0, |p| p.port.vnet_hdr_len());
        if ports
            .iter()
            .chain(mirror.iter())
            .any(|p| p.port.vnet_hdr_len() != hdr_len)
        {
            return Err(FabricError::MixedHeaders);
        }
        for p in ports.iter().chain(mirror.iter()) {
            p.refresh_link();
        }
        let table: Vec<Option<Arc<SwitchPort>>> =
            ports.into_iter().map(|p| Some(Arc::new(p))).collect();
        Ok(Shared {
            fdb_activity: FdbActivity::default(),
            summary: Mutex::new(Summary {
                at: Instant::now(),
                counts: [0; 5],
            }),
            table: Mutex::new(table.into()),
            table_gen: AtomicU64::new(0),
            mirror,
            opts,
            core: Mutex::new(Switch::new(cfg)),
            stop: AtomicBool::new(false),
            hdr_len,
            events,
        })
    }

    fn table_lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current port table (a snapshot).
    fn table(&self) -> Table {
        self.table_lock().clone()
    }

    /// The core. A panic elsewhere while holding the lock leaves a usable table, so a
    /// poisoned lock is taken anyway rather than stopping the switch.
    fn core(&self) -> MutexGuard<'_, Switch> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn port_name<'a>(&self, ports: &'a [Option<Arc<SwitchPort>>], id: PortId) -> &'a str {
        ports
            .get(usize::from(id.0))
            .and_then(|p| p.as_deref())
            .map_or("?", |p| p.name.as_str())
    }

    /// Publishes every FDB event on the events stream, and logs them for people without
    /// letting a MAC flood write a line per frame: learn, age and evict go to DEBUG and
    /// into counters summed up at INFO by [`Fabric::sweep`]; a move (what a
    /// migration's RARP does, and what explains a loss window) stays at INFO with its
    /// µs stamp, up to [`MOVE_LINES_PER_SEC`] lines a second, the rest counted in the
    /// summary. `t_us` is when the frame that caused them was read.
    fn emit_events(&self, ports: &[Option<Arc<SwitchPort>>], events: &[FdbEvent], t_us: u64) {
        let a = &self.fdb_activity;
        for ev in events {
            let (counter, ev) = match *ev {
                FdbEvent::Learned { mac, port, remote } => (
                    &a.learned,
                    Event::MacLearned {
                        mac,
                        port: self.port_name(ports, port).to_string(),
                        remote,
                    },
                ),
                FdbEvent::Moved {
                    mac,
                    from,
                    to,
                    from_remote,
                    to_remote,
                    ethertype,
                } => (
                    &a.moved,
                    Event::MacMoved {
                        mac,
                        from: self.port_name(ports, from).to_string(),
                        to: self.port_name(ports, to).to_string(),
                        ethertype: ethertype.to_string(),
                        from_remote,
                        to_remote,
                    },
                ),
                FdbEvent::Aged { mac, port } => (
                    &a.aged,
                    Event::MacAged {
                        mac,
                        port: self.port_name(ports, port).to_string(),
                    },
                ),
                FdbEvent::Evicted { mac, port } => (
                    &a.evicted,
                    Event::MacEvicted {
                        mac,
                        port: self.port_name(ports, port).to_string(),
                    },
                ),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if matches!(ev, Event::MacMoved { .. }) && a.move_line_allowed(t_us) {
                self.events.emit(t_us, ev);
            } else {
                if matches!(ev, Event::MacMoved { .. }) {
                    a.moves_unlogged.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(t_us, "{ev}");
                self.events.publish(t_us, ev);
            }
        }
    }

    fn mark_down(&self, p: &SwitchPort) {
        // Under the core lock, so no one sees the port down with entries still on it.
        let mut core = self.core();
        if p.up.swap(false, Ordering::Relaxed) {
            let n = core.fdb_mut().flush_port(p.id);
            drop(core);
            self.events.emit_now(Event::PortGone {
                port: p.name.clone(),
                ifname: p.port.ifname().to_string(),
                fdb_entries_removed: n,
            });
        }
    }

    /// Sends `frame` (virtio-net header + Ethernet) out of `out`, adapting it to a port
    /// without offloads: partial checksums are completed in place (valid for every
    /// later receiver too); GSO frames are dropped and counted, never cut or corrupted,
    /// unless the port segments them itself. `to`: one remote endpoint of a tunnel port.
    fn transmit(&self, out: &SwitchPort, frame: &mut [u8], to: Option<std::net::SocketAddrV4>) {
        if !out.is_up() {
            out.counters.drop(DropReason::PortDown);
            return;
        }
        if !out.link_up() {
            out.counters.drop(DropReason::LinkDown);
            return;
        }
        let hdr = self.hdr_len;
        let eth = &frame[hdr..];
        let tagged = eth.len() >= HEADER_LEN && eth[12..14] == [0x81, 0x00];
        // GSO frames are exempt: the receiving stack gets them whole and segments them
        // to its MTU itself (or, without offloads, they are refused below).
        if out.exceeds_mtu(eth.len(), tagged)
            && !(hdr > 0 && VnetHdr::new_checked(&frame[..hdr]).is_ok_and(|h| h.is_gso()))
        {
            out.counters.drop(DropReason::Oversize);
            return;
        }
        if hdr > 0 && !out.port.offload() {
            let (vh, eth) = frame.split_at_mut(hdr);
            let gso = match VnetHdr::new_checked(&*vh) {
                Ok(h) if h.is_gso() && !out.port.segments_gso() => {
                    out.counters.drop(DropReason::GsoUnsupported);
                    return;
                }
                Ok(h) => h.is_gso(),
                Err(_) => {
                    out.counters.drop(DropReason::BadVnetHeader);
                    return;
                }
            };
            // A port that segments computes each segment's checksums itself.
            if !gso && vnet::complete_checksum(vh, eth).is_err() {
                out.counters.drop(DropReason::BadVnetHeader);
                return;
            }
        }
        match out.port.send_to(frame, to) {
            Ok(()) => {
                out.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                out.counters
                    .tx_bytes
                    .fetch_add((frame.len() - hdr) as u64, Ordering::Relaxed);
            }
            Err(PortError::Gone) => {
                out.counters.drop(DropReason::TxError);
                self.mark_down(out);
            }
            Err(PortError::Io(_)) => out.counters.drop(DropReason::TxError),
            Err(PortError::Refused(r)) => {
                out.counters.drop(r);
                // The kernel said so before the next look: stop flooding into it now.
                if r == DropReason::LinkDown {
                    out.link.store(false, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The reader thread of port `me`: read, decide, write, until shutdown or the port
/// goes away or is deleted.
fn port_loop(s: &Shared, me: &SwitchPort) {
    let hdr = s.hdr_len;
    // One buffer for the life of the thread; one byte more than the largest frame so a
    // read that fills it is known to be cut.
    let mut buf = vec![0u8; hdr + MAX_FRAME + 1];
    let mut events: Vec<FdbEvent> = Vec::with_capacity(4);
    let mut view = View::new(s);
    while !s.stop.load(Ordering::Relaxed) && me.is_up() {
        view.refresh(s);
        // Another thread forwarding this port's frames right now (see `steal`) is
        // about to finish: let it, rather than sleep on the lock and be woken.
        let Ok(rx) = me.rx.try_lock() else {
            std::thread::yield_now();
            continue;
        };
        let received = receive_one(s, &view, me, &mut buf, &mut events);
        drop(rx);
        match received {
            Received::Forwarded(Some(egress)) => steal(s, &view, egress, &mut buf, &mut events),
            Received::Forwarded(None) => {}
            Received::Nothing => match me.port.wait(POLL_INTERVAL) {
                Ok(_) => {}
                Err(PortError::Gone) => {
                    me.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                    s.mark_down(me);
                }
                Err(PortError::Io(e)) => {
                    tracing::warn!(port = %me.name, error = %e, "poll failed");
                    std::thread::sleep(POLL_INTERVAL);
                }
                Err(PortError::Refused(_)) => {}
            },
            Received::Gone => break,
        }
    }
}

/// The single data-path thread: sleeps in one poll on every port, then serves the
/// readable ports (see [`serve_ready`]). A frame written to a TAP usually makes its
/// reply ready before the write returns; the next poll returns at once with it, so a
/// round trip costs one wake-up (the request's), as in a kernel bridge's softirq,
/// minus the bridge.
fn poll_loop(s: &Shared) {
    let hdr = s.hdr_len;
    let mut buf = vec![0u8; hdr + MAX_FRAME + 1];
    let mut events: Vec<FdbEvent> = Vec::with_capacity(4);
    let mut view = View::new(s);
    let mut live: Vec<usize> = Vec::new();
    let mut ready: Vec<usize> = Vec::new();
    let mut set = PollSet::new();
    let mut rr = RoundRobin::default();
    let batch = s.opts.batch();
    while !s.stop.load(Ordering::Relaxed) {
        view.refresh(s);
        live.clear();
        live.extend(
            (0..view.ports.len()).filter(|&i| view.ports[i].as_ref().is_some_and(|p| p.is_up())),
        );
        if live.is_empty() {
            std::thread::sleep(POLL_INTERVAL);
            continue;
        }
        set.clear();
        for &i in &live {
            set.push(view.ports[i].as_ref().and_then(|p| p.port.poll_fd()));
        }
        if let Err(e) = set.wait(POLL_INTERVAL) {
            tracing::warn!(error = %e, "poll failed");
            std::thread::sleep(POLL_INTERVAL);
            continue;
        }
        ready.clear();
        for (k, &i) in live.iter().enumerate() {
            let Some(me) = view.ports[i].as_deref() else {
                continue;
            };
            match set.readiness(k) {
                Readiness::Idle => {}
                Readiness::Broken => {
                    me.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                    s.mark_down(me);
                }
                Readiness::Readable => ready.push(i),
            }
        }
        rr.serve(s, &view, &mut ready, batch, &mut buf, &mut events);
    }
}

/// Frames the single data-path thread forwards between two polls, across all ports, by
/// default (`--batch`). A port that becomes readable meanwhile waits at most this many
/// frames of the others. Measured (bench/fairness.sh): 4 roughly halves another port's
/// median RTT under a bulk stream compared with 32, at no cost in throughput; a poll
/// per frame (1) costs a poll over every port per frame.
pub const ROUND_BUDGET: usize = 4;

/// The order in which the single data-path thread serves the ports a poll found
/// readable: one frame from each in turn (round robin), the first turn starting one
/// port further on each time, until every one is empty or the budget is spent. So a
/// burst on one port delays a frame waiting on another by at most one frame per
/// readable port, and no port is always served first.
#[derive(Debug, Default)]
struct RoundRobin {
    start: usize,
}

impl RoundRobin {
    /// Serves `ready` (port slots, in slot order; emptied of the ports found drained).
    fn serve(
        &mut self,
        s: &Shared,
        view: &View,
        ready: &mut Vec<usize>,
        budget: usize,
        buf: &mut [u8],
        events: &mut Vec<FdbEvent>,
    ) -> usize {
        if ready.is_empty() {
            return 0;
        }
        let first = self.start % ready.len();
        ready.rotate_left(first);
        self.start = self.start.wrapping_add(1);
        let mut served = 0;
        while !ready.is_empty() && served < budget {
            let mut k = 0;
            while k < ready.len() && served < budget {
                let more = match view.ports.get(ready[k]).and_then(|p| p.as_deref()) {
                    Some(me) => {
                        let _rx = me.rx.lock().unwrap_or_else(|e| e.into_inner());
                        matches!(
                            receive_one(s, view, me, buf, events),
                            Received::Forwarded(_)
                        )
                    }
                    None => false,
                };
                if more {
                    served += 1;
                    k += 1;
                } else {
                    ready.remove(k);
                }
            }
        }
        served
    }
}

enum Received {
    /// A frame was handled; the unicast egress port, if any.
    Forwarded(Option<PortId>),
    Nothing,
    Gone,
}

/// Reads and forwards one frame of `me` without blocking. Callers hold `me`'s receive
/// lock, so a port's frames are forwarded in the order they arrived.
fn receive_one(
    s: &Shared,
    view: &View,
    me: &SwitchPort,
    buf: &mut [u8],
    events: &mut Vec<FdbEvent>,
) -> Received {
    match me.port.try_recv_from(buf) {
        Ok(Some(Recv::Frame { len, from })) => {
            let t_us = crate::clock::unix_micros();
            let now = Instant::now();
            let cap = buf.len();
            let frame = &mut buf[..len];
            Received::Forwarded(forward(s, view, me, frame, from, cap, now, t_us, events))
        }
        Ok(Some(Recv::Dropped(r))) => {
            me.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
            me.counters.drop(r);
            Received::Forwarded(None)
        }
        Ok(None) => Received::Nothing,
        Err(PortError::Gone) => {
            me.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
            s.mark_down(me);
            Received::Gone
        }
        Err(PortError::Refused(r)) => {
            me.counters.drop(r);
            Received::Nothing
        }
        Err(PortError::Io(e)) => {
            let errors = me.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
            if errors.is_power_of_two() {
                tracing::warn!(port = %me.name, error = %e, errors, "receive failed");
            }
            Received::Nothing
        }
    }
}

/// After writing a frame to `egress`, forwards what `egress` has ready from this thread.
/// A write into a TAP runs the receiving namespace's stack before it returns, so a
/// reply (echo reply, TCP ACK) is usually waiting already; handling it here saves
/// waking the egress port's own thread, which on an idle virtual CPU costs tens of
/// microseconds. Only if no one else is reading that port (try-lock), and a few frames
/// at most, so per-port order holds and no port starves.
fn steal(s: &Shared, view: &View, egress: PortId, buf: &mut [u8], events: &mut Vec<FdbEvent>) {
    let Some(p) = view.get(egress) else {
        return;
    };
    if !p.is_up() {
        return;
    }
    let Ok(_rx) = p.rx.try_lock() else {
        return;
    };
    for _ in 0..STEAL_BUDGET {
        if !matches!(receive_one(s, view, p, buf, events), Received::Forwarded(_)) {
            break;
        }
    }
}

/// Handles one frame received on `me` (from its remote endpoint `from`, on a tunnel
/// port). `cap` is the size of the read buffer.
#[allow(clippy::too_many_arguments)]
fn forward(
    s: &Shared,
    view: &View,
    me: &SwitchPort,
    frame: &mut [u8],
    from: Option<std::net::SocketAddrV4>,
    cap: usize,
    now: Instant,
    t_us: u64,
    events: &mut Vec<FdbEvent>,
) -> Option<PortId> {
    let hdr = s.hdr_len;
    let c = &me.counters;
    c.rx_frames.fetch_add(1, Ordering::Relaxed);
    c.rx_bytes
        .fetch_add(frame.len().saturating_sub(hdr) as u64, Ordering::Relaxed);
    if frame.len() >= cap {
        c.drop(DropReason::Oversize);
        return None;
    }
    if frame.len() < hdr + HEADER_LEN {
        c.drop(DropReason::Runt);
        return None;
    }
    events.clear();
    let decision = {
        let mut core = s.core();
        // Checked under the core lock, which a deletion holds while it flushes the
        // port's entries: a frame read just before cannot learn on a deleted port.
        if !me.is_up() {
            c.drop(DropReason::PortDown);
            return None;
        }
        // The kernel transmits only on an interface that is up: a frame from it says
        // its link is up without waiting for the next look (a switch that restarts
        // finds its TAPs down until up.sh has set them up a moment later).
        if !me.link_up() {
            me.link.store(true, Ordering::Relaxed);
        }
        core.handle_from(me.id, from, &frame[hdr..], now, t_us, events)
    };
    if !events.is_empty() {
        s.emit_events(&view.ports, events, t_us);
    }
    if let Some(m) = &s.mirror {
        s.transmit(m, frame, None);
    }
    match decision {
        Decision::Unicast(p) => {
            let out = view.get(p)?;
            s.transmit(out, frame, None);
            Some(p)
        }
        Decision::Remote(p, r) => {
            let out = view.get(p)?;
            s.transmit(out, frame, Some(r));
            Some(p)
        }
        Decision::Flood => {
            c.flooded.fetch_add(1, Ordering::Relaxed);
            for out in view
                .ports
                .iter()
                .flatten()
                .filter(|p| p.id != me.id && p.forwarding())
            {
                s.transmit(out, frame, None);
            }
            None
        }
        Decision::Drop(r) => {
            c.drop(r);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::mem::{self, MemPeer};
    use crate::wire::ethernet::{Frame, Repr};
    use crate::wire::{EtherType, MacAddr};

    const A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xa]);
    const B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xb]);
    const T: Duration = Duration::from_secs(2);
    const SHORT: Duration = Duration::from_millis(150);

    fn eth(hdr: usize, src: MacAddr, dst: MacAddr, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; hdr + len];
        Repr {
            src,
            dst,
            ethertype: EtherType::Ipv4,
        }
        .emit(&mut Frame::new_checked(&mut buf[hdr..]).unwrap());
        buf
    }

    /// `n` in-memory ports `p0`, `p1`, … with ids 0, 1, …, and their peers.
    fn mem_ports(n: usize, hdr: usize, offload: bool) -> (Vec<SwitchPort>, Vec<MemPeer>) {
        (0..n)
            .map(|i| {
                let (p, peer) = mem::pair(&format!("p{i}"), hdr, offload);
                let port = SwitchPort::new(PortId(i as u16), &format!("p{i}"), None, Box::new(p));
                (port, peer)
            })
            .unzip()
    }

    fn fabric(n: usize, hdr: usize, offload: bool, mirror: bool) -> (Fabric, Vec<MemPeer>) {
        let (ports, mut peers) = mem_ports(n, hdr, offload);
        let m = mirror.then(|| {
            let (p, peer) = mem::pair("mirror", hdr, true);
            peers.push(peer);
            SwitchPort::new(PortId(u16::MAX), "mirror", None, Box::new(p))
        });
        (
            Fabric::start(ports, m, FdbConfig::default()).unwrap(),
            peers,
        )
    }

    #[test]
    fn floods_learns_and_forwards_unicast() {
        let (f, peers) = fabric(3, 0, true, true);
        let ab = eth(0, A, B, 60);
        peers[0].inject(&ab);
        assert_eq!(peers[1].recv(T).unwrap(), ab);
        assert_eq!(peers[2].recv(T).unwrap(), ab);
        assert_eq!(peers[3].recv(T).unwrap(), ab, "mirror sees it");
        assert!(peers[0].recv(SHORT).is_none(), "never back to ingress");
        let ba = eth(0, B, A, 60);
        peers[1].inject(&ba);
        assert_eq!(peers[0].recv(T).unwrap(), ba);
        assert!(peers[2].recv(SHORT).is_none(), "unicast goes to one port");
        let rows = f.fdb();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].mac, rows[0].port.as_str()), (A, "p0"));
        assert_eq!((rows[1].mac, rows[1].port.as_str()), (B, "p1"));
        let st = f.stats();
        assert_eq!(st[0].rx_frames, 1);
        assert_eq!(st[0].flooded, 1);
        assert_eq!(st[0].tx_frames, 1);
        assert_eq!(st[0].tx_bytes, 60);
        assert_eq!(st[3].tx_frames, 2);
        assert_eq!(f.flush(), 2);
        assert!(f.fdb().is_empty());
        f.stop();
    }

    #[test]
    fn garbage_is_counted_and_forwarding_goes_on() {
        let (f, peers) = fabric(2, 12, true, false);
        for len in [0usize, 1, 11, 12, 13, 25] {
            peers[0].inject(&vec![0x5a; len]);
        }
        // Zero source, and a frame longer than any TAP can give.
        peers[0].inject(&eth(12, MacAddr::ZERO, B, 60));
        peers[0].inject(&eth(12, A, B, MAX_FRAME + 1));
        let ok = eth(12, A, B, 60);
        peers[0].inject(&ok);
        assert_eq!(peers[1].recv(T).unwrap(), ok);
        let st = &f.stats()[0];
        assert_eq!(st.dropped.get("runt"), Some(&6));
        assert_eq!(st.dropped.get("invalid_source"), Some(&1));
        assert_eq!(st.dropped.get("oversize"), Some(&1));
        f.stop();
    }

    #[test]
    fn frames_over_the_egress_mtu_are_dropped_and_counted() {
        let (f, peers) = fabric(3, 12, true, false);
        peers[1].set_mtu(1500);
        f.refresh_links();
        assert_eq!(f.stats()[1].mtu, 1500);
        // Each frame floods (unknown destination) to port 1 (MTU 1500: at most 1514
        // bytes of Ethernet) and port 2 (no limit); returns what port 1 got.
        let send = |frame: &[u8]| -> Option<Vec<u8>> {
            peers[0].inject(frame);
            assert_eq!(peers[2].recv(T).map(|f| f.len()), Some(frame.len()));
            peers[1].recv(SHORT)
        };
        let jumbo = eth(12, A, B, 9014);
        assert!(send(&jumbo).is_none(), "9014 bytes into a 1500-byte MTU");
        let full = eth(12, A, B, 1514);
        assert_eq!(send(&full).map(|f| f.len()), Some(full.len()));
        assert!(send(&eth(12, A, B, 1515)).is_none(), "one byte over");
        // A VLAN tag adds 4 bytes to what fits.
        let mut tagged = eth(12, A, B, 1518);
        tagged[12 + 12..12 + 14].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(send(&tagged).map(|f| f.len()), Some(tagged.len()));
        // A GSO frame is segmented by the receiver: it passes whatever its size.
        let mut gso = eth(12, A, B, 9014);
        gso[1] = vnet::GSO_TCPV4;
        assert_eq!(send(&gso).map(|f| f.len()), Some(gso.len()));
        let st = f.stats();
        assert_eq!(st[1].dropped.get("oversize"), Some(&2));
        assert_eq!(st[2].dropped.get("oversize"), None);
        // The MTU grows: the next refresh notices and the jumbo frame passes.
        peers[1].set_mtu(9000);
        f.refresh_links();
        assert_eq!(send(&jumbo).map(|f| f.len()), Some(jumbo.len()));
        f.stop();
    }

    #[test]
    fn gso_frames_are_refused_by_ports_without_offload() {
        let (f, peers) = fabric(2, 12, false, false);
        let mut gso = eth(12, A, B, 3000);
        gso[1] = vnet::GSO_TCPV4;
        peers[0].inject(&gso);
        let plain = eth(12, A, B, 60);
        peers[0].inject(&plain);
        assert_eq!(peers[1].recv(T).unwrap(), plain);
        assert_eq!(f.stats()[1].dropped.get("gso_unsupported"), Some(&1));
        f.stop();
    }

    /// Two TAP-like ports and a VXLAN port on loopback whose remotes are two sockets.
    fn fabric_with_tunnel() -> (Fabric, Vec<MemPeer>, [std::net::UdpSocket; 2]) {
        use crate::port::vxlan::{VxlanPort, VxlanSpec};
        use std::net::{SocketAddr, UdpSocket};
        let remotes = [
            UdpSocket::bind("127.0.0.2:0").unwrap(),
            UdpSocket::bind("127.0.0.3:0").unwrap(),
        ];
        let addr = |s: &UdpSocket| match s.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        for r in &remotes {
            r.set_read_timeout(Some(SHORT)).unwrap();
        }
        let spec = VxlanSpec {
            vni: crate::wire::vxlan::Vni::new(42).unwrap(),
            netns: None,
            local: "127.0.0.1:0".parse().unwrap(),
            remotes: remotes.iter().map(addr).collect(),
        };
        let vx = VxlanPort::open(&spec, 12).unwrap();
        let (mut ports, peers) = mem_ports(2, 12, true);
        ports.push(SwitchPort::new(PortId(2), "wan", None, Box::new(vx)));
        let f = Fabric::start(ports, None, FdbConfig::default()).unwrap();
        (f, peers, remotes)
    }

    fn from_tunnel(r: &std::net::UdpSocket, f: &Fabric, vni: u8, frame: &[u8]) {
        let mut d = vec![0x08, 0, 0, 0, 0, 0, vni, 0];
        d.extend_from_slice(frame);
        let to = f.stats()[2].vxlan.as_ref().unwrap().local;
        r.send_to(&d, to).unwrap();
    }

    fn datagram(r: &std::net::UdpSocket) -> Option<Vec<u8>> {
        let mut buf = [0u8; 2048];
        r.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    }

    #[test]
    fn a_tunnel_floods_to_every_remote_and_unicasts_to_the_learned_one() {
        let (f, peers, remotes) = fabric_with_tunnel();
        let mut sub = f.events().subscribe(64);
        // Unknown destination: one datagram to each remote (head-end replication).
        let ab = eth(12, A, B, 60);
        peers[0].inject(&ab);
        assert!(peers[1].recv(T).is_some());
        for r in &remotes {
            let d = datagram(r).expect("flooded to every remote");
            assert_eq!(&d[..8], &[0x08, 0, 0, 0, 0, 0, 42, 0]);
            assert_eq!(&d[8..], &ab[12..]);
        }
        // B answers from the second remote: learned behind it, with the remote.
        let ba = eth(0, B, A, 60);
        from_tunnel(&remotes[1], &f, 42, &ba);
        let got = peers[0].recv(T).expect("decapsulated to A");
        assert_eq!(&got[..12], &[0u8; 12], "a zero virtio-net header");
        assert_eq!(&got[12..], &ba[..]);
        let rows = f.fdb();
        let b = rows.iter().find(|r| r.mac == B).unwrap();
        assert_eq!(b.port, "wan");
        assert_eq!(
            b.remote,
            Some(f.stats()[2].vxlan.as_ref().unwrap().remotes[1])
        );
        let remote = b.remote;
        let learned: Vec<Event> = std::iter::from_fn(|| sub.rx.try_recv().ok())
            .map(|r| r.event)
            .filter(|e| matches!(e, Event::MacLearned { mac, .. } if *mac == B))
            .collect();
        assert_eq!(
            learned,
            vec![Event::MacLearned {
                mac: B,
                port: "wan".into(),
                remote
            }]
        );
        // Now A -> B goes to that remote only.
        peers[0].inject(&ab);
        assert!(datagram(&remotes[1]).is_some());
        assert!(
            datagram(&remotes[0]).is_none(),
            "unicast goes to one remote"
        );
        assert!(peers[1].recv(SHORT).is_none());
        // Another segment's frame is dropped and counted; forwarding goes on.
        from_tunnel(&remotes[0], &f, 43, &ba);
        from_tunnel(&remotes[1], &f, 42, &ba);
        assert!(peers[0].recv(T).is_some());
        assert_eq!(f.stats()[2].dropped.get("vxlan_wrong_vni"), Some(&1));
        f.stop();
    }

    #[test]
    fn a_frame_too_big_for_the_underlay_is_counted_not_cut() {
        let (f, peers, remotes) = fabric_with_tunnel();
        // Loopback's MTU is 65536: a frame whose datagram exceeds it cannot leave.
        let big = eth(12, A, B, 65_500);
        peers[0].inject(&big);
        assert!(peers[1].recv(T).is_some());
        assert!(datagram(&remotes[0]).is_none());
        let deadline = Instant::now() + T;
        while !f.stats()[2].dropped.contains_key("oversize") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(f.stats()[2].dropped.get("oversize"), Some(&1));
        f.stop();
    }

    #[test]
    fn a_port_that_goes_away_is_marked_down_and_the_rest_keep_working() {
        let (f, mut peers) = fabric(3, 0, true, false);
        peers[2].inject(&eth(0, B, A, 60));
        assert!(peers[0].recv(T).is_some());
        assert!(peers[1].recv(T).is_some());
        let gone = peers.pop().unwrap();
        drop(gone);
        let deadline = Instant::now() + T;
        while f.stats()[2].up && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!f.stats()[2].up);
        assert!(f.fdb().is_empty(), "its entries went with it");
        let ab = eth(0, A, B, 60);
        peers[0].inject(&ab);
        assert_eq!(peers[1].recv(T).unwrap(), ab);
        f.stop();
    }

    /// A RARP-like broadcast from `src` (it moves `src` to the port it enters on).
    fn announce(src: MacAddr) -> Vec<u8> {
        eth(0, src, MacAddr::BROADCAST, 60)
    }

    /// The scene of a migration seen by a loaded switch: the VM `B` was learned on the
    /// old port (2); while the data-path thread did not run, the client (port 0) queued a
    /// burst of frames for `B` and then the new port (1) queued the VM's announce. What
    /// reaches the old port after that is lost.
    #[test]
    fn a_burst_on_one_port_does_not_hold_back_another_ports_frame() {
        let (ports, peers) = mem_ports(3, 0, true);
        let opts = DataPathOptions::default();
        let s = Shared::new(ports, None, FdbConfig::default(), opts, EventBus::new("t")).unwrap();
        let view = View::new(&s);
        let mut buf = vec![0u8; MAX_FRAME + 1];
        let mut events = Vec::new();
        let mut rr = RoundRobin::default();
        // B learned on the old port.
        peers[2].inject(&announce(B));
        rr.serve(&s, &view, &mut vec![2], ROUND_BUDGET, &mut buf, &mut events);
        peers[0].drain();
        peers[1].drain();
        for start in 0..2 {
            rr.start = start;
            for _ in 0..40 {
                peers[0].inject(&eth(0, A, B, 60));
            }
            peers[1].inject(&announce(B));
            let mut ready = vec![0, 1];
            let mut served = 0;
            while !ready.is_empty() {
                served += rr.serve(&s, &view, &mut ready, ROUND_BUDGET, &mut buf, &mut events);
            }
            assert_eq!(served, 41);
            let to_old = peers[2].drain().iter().filter(|f| f[..6] == B.0).count();
            let to_new = peers[1].drain().len();
            // Round robin: at most the one frame served before the announce goes to the
            // old port. (Draining 32 frames per port in port order sent 32 there.)
            assert!(
                to_old <= 1,
                "start {start}: {to_old} frames to the old port"
            );
            assert_eq!(to_old + to_new, 40);
            // Move B back to the old port for the next turn.
            peers[2].inject(&announce(B));
            rr.serve(&s, &view, &mut vec![2], ROUND_BUDGET, &mut buf, &mut events);
            peers[0].drain();
            peers[1].drain();
        }
    }

    #[test]
    fn the_budget_bounds_a_round_and_each_port_keeps_its_order() {
        let (ports, peers) = mem_ports(3, 0, true);
        let s = Shared::new(
            ports,
            None,
            FdbConfig::default(),
            DataPathOptions::default(),
            EventBus::new("t"),
        )
        .unwrap();
        let view = View::new(&s);
        let mut buf = vec![0u8; MAX_FRAME + 1];
        let mut events = Vec::new();
        let mut rr = RoundRobin::default();
        for n in 0..100u8 {
            let mut f = eth(0, A, B, 60);
            f[20] = n;
            peers[0].inject(&f);
        }
        let mut ready = vec![0];
        assert_eq!(
            rr.serve(&s, &view, &mut ready, ROUND_BUDGET, &mut buf, &mut events),
            ROUND_BUDGET
        );
        assert_eq!(ready, vec![0], "still readable after its budget");
        while !ready.is_empty() {
            rr.serve(&s, &view, &mut ready, ROUND_BUDGET, &mut buf, &mut events);
        }
        let got: Vec<u8> = peers[1].drain().iter().map(|f| f[20]).collect();
        assert_eq!(got, (0..100).collect::<Vec<u8>>());
    }

    #[test]
    fn ports_come_and_go_at_run_time() {
        let (f, mut peers) = fabric(2, 0, true, false);
        let mut sub = f.events().subscribe(64);
        let (p, peer) = mem::pair("p2", 0, true);
        assert_eq!(f.add_port("p2", None, Box::new(p)).unwrap(), PortId(2));
        peers.push(peer);
        let (p, _peer) = mem::pair("p2", 0, true);
        assert!(matches!(
            f.add_port("p2", None, Box::new(p)),
            Err(FabricError::DuplicatePort(_))
        ));
        let (p, _peer) = mem::pair("p9", 12, true);
        assert!(matches!(
            f.add_port("p9", None, Box::new(p)),
            Err(FabricError::MixedHeaders)
        ));
        // The new port floods, learns and is flooded to.
        peers[2].inject(&eth(0, B, A, 60));
        assert!(peers[0].recv(T).is_some());
        assert!(peers[1].recv(T).is_some());
        peers[0].inject(&eth(0, A, B, 60));
        assert!(peers[2].recv(T).is_some());
        assert!(peers[1].recv(SHORT).is_none(), "B is known on p2");
        let st = f.stats();
        assert_eq!((st[2].port.as_str(), st[2].kind.as_str()), ("p2", "mem"));
        let r = f.remove_port("p2").unwrap();
        assert_eq!((r.id, r.fdb_entries_removed), (PortId(2), 1));
        assert!(f.fdb().iter().all(|e| e.port != "p2"));
        assert!(matches!(
            f.remove_port("p2"),
            Err(FabricError::NoSuchPort(_))
        ));
        // Traffic for B floods again, to the ports left only.
        peers[0].inject(&eth(0, A, B, 60));
        assert!(peers[1].recv(T).is_some());
        assert!(peers[2].recv(SHORT).is_none());
        assert_eq!(f.stats().len(), 2);
        // A new port takes the free slot.
        let (p, _peer) = mem::pair("p3", 0, true);
        assert_eq!(f.add_port("p3", None, Box::new(p)).unwrap(), PortId(2));
        let learned_on_p2 = std::iter::from_fn(|| sub.rx.try_recv().ok())
            .any(|r| matches!(r.event, Event::MacLearned { ref port, mac, .. } if port == "p2" && mac == B));
        assert!(learned_on_p2);
        f.stop();
    }

    #[test]
    fn a_port_whose_link_is_down_is_not_flooded_into() {
        let (f, peers) = fabric(3, 0, true, false);
        let mut sub = f.events().subscribe(64);
        // B lives behind port 2.
        peers[2].inject(&eth(0, B, MacAddr::BROADCAST, 60));
        assert!(peers[0].recv(T).is_some());
        assert!(peers[1].recv(T).is_some());
        peers[2].set_link(false);
        f.refresh_links();
        assert!(!f.stats()[2].link_up);
        let c = MacAddr([0x02, 0, 0, 0, 0, 0xc]);
        peers[0].inject(&eth(0, A, c, 60));
        assert!(peers[1].recv(T).is_some());
        assert!(
            peers[2].recv(SHORT).is_none(),
            "flooded into a link that is down"
        );
        // Unicast to it is dropped and counted as link_down, not tx_error.
        peers[0].inject(&eth(0, A, B, 60));
        assert!(peers[2].recv(SHORT).is_none());
        let st = &f.stats()[2];
        assert_eq!(st.dropped.get("link_down"), Some(&1));
        assert_eq!(st.dropped.get("tx_error"), None);
        // A frame from the port says its link is up before the next look.
        peers[2].inject(&eth(0, B, A, 60));
        assert!(peers[0].recv(T).is_some());
        assert!(f.stats()[2].link_up);
        peers[0].inject(&eth(0, A, c, 60));
        assert!(
            peers[2].recv(T).is_some(),
            "flooded again once the link is up"
        );
        peers[2].set_link(true);
        f.refresh_links();
        let links: Vec<bool> = std::iter::from_fn(|| sub.rx.try_recv().ok())
            .filter_map(|r| match r.event {
                Event::PortLink { port, up, .. } if port == "p2" => Some(up),
                _ => None,
            })
            .collect();
        assert_eq!(links, vec![false, true]);
        f.stop();
    }
}
