//! Events (control plane): what the daemons did, as typed values with the µs timestamp
//! taken where it happened.
//!
//! Logs are for people and may change wording at any time; events are the declared
//! interface for programs (`vfabric events`, `vfabric measure`, `demo.sh`, the tests),
//! like QEMU's QMP events or `bridge monitor`. An emitter calls [`EventBus::emit`],
//! which logs the event through `tracing` and publishes it to every subscriber.
//!
//! Publishing never blocks: each subscriber has a bounded queue; a subscriber whose queue
//! is full is dropped on the spot (and told so by the server), so a slow reader can never
//! slow the switch's data path or a migration.

use std::fmt;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::clock::unix_micros;
use crate::migration::announce::Announce;
use crate::migration::{Progress, Step};
use crate::wire::MacAddr;

/// Events one subscriber may have queued before it counts as too slow and is dropped.
pub const SUBSCRIBER_QUEUE: usize = 4096;

/// Something a daemon did. Serialized with an `event` tag (`"event": "mac_moved"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    // The switch.
    /// A source MAC seen for the first time, on `port` (behind its endpoint `remote`
    /// when `port` is a tunnel port).
    MacLearned {
        mac: MacAddr,
        port: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote: Option<SocketAddrV4>,
    },
    /// A known MAC seen on another port (or behind another endpoint of a tunnel port);
    /// `ethertype` is that of the frame that moved it.
    MacMoved {
        mac: MacAddr,
        from: String,
        to: String,
        ethertype: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_remote: Option<SocketAddrV4>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_remote: Option<SocketAddrV4>,
    },
    /// An entry not refreshed within the ageing time.
    MacAged { mac: MacAddr, port: String },
    /// An entry evicted to make room in a full table.
    MacEvicted { mac: MacAddr, port: String },
    /// The whole table emptied on request.
    FdbFlushed { entries: usize },
    /// A port is in place and forwarding.
    PortUp { port: String, ifname: String },
    /// A port stopped forwarding (the switch is stopping).
    PortDown { port: String },
    /// A port's device went away; its FDB entries went with it.
    PortGone {
        port: String,
        ifname: String,
        fdb_entries_removed: usize,
    },
    /// A port was deleted at run time (`vfabric port del`); its FDB entries went with it.
    PortDeleted {
        port: String,
        ifname: String,
        fdb_entries_removed: usize,
    },
    /// A port's interface became operationally up or down: floods skip it while down.
    PortLink {
        port: String,
        ifname: String,
        up: bool,
    },

    // The hosts.
    /// A VM was admitted and its memory reserved.
    VmCreated {
        vm: String,
        host: String,
        memory_mb: u64,
        vcpus: u8,
        mac: MacAddr,
        ip: std::net::Ipv4Addr,
        reserved_mb: u64,
    },
    /// A VM's vCPUs started.
    VmStarted { vm: String, host: String },
    /// A VM stopped on the source for the switch-over, with `dirty_pages` still to move.
    VmQuiesced {
        vm: String,
        host: String,
        dirty_pages: u64,
    },
    /// A VM runs (again): on the target after a migration, or on the source after a
    /// failed one (`after_failure`).
    VmResumed {
        vm: String,
        host: String,
        #[serde(default)]
        after_failure: bool,
    },
    /// A VM was stopped and removed on request.
    VmDestroyed { vm: String, host: String },
    /// A VM that left freed its memory here (book step 6); the daemon's resident memory
    /// right after.
    VmMemoryFreed {
        vm: String,
        host: String,
        rss_kib: u64,
    },
    /// A coming migration's memory was mapped and faulted in here, before its stream,
    /// in `ms`.
    IncomingMemoryPrepared {
        vm: String,
        host: String,
        memory_mb: u64,
        ms: u64,
    },
    /// This host gave up a VM's disk lock.
    DiskLockReleased { vm: String, host: String },
    /// This host took (or took back) a VM's disk lock.
    DiskLockTaken { vm: String, host: String },
    /// An announce frame left for a VM (`seq` 0 is the first, right after resume).
    AnnounceSent {
        vm: String,
        host: String,
        mac: MacAddr,
        kind: Announce,
        seq: usize,
    },

    // Migrations (source side unless said otherwise).
    /// A cancel of the outgoing migration was asked for (the VM stays on the source
    /// unless the switch-over is past the point of no return).
    MigrationCancelRequested { vm: String, host: String },
    /// A migration was asked for.
    MigrationStarted {
        vm: String,
        from: String,
        to: String,
    },
    /// A pre-copy round ended.
    MigrationRound {
        vm: String,
        round: u32,
        pages_sent: u64,
        dirty_pages: u64,
        throughput_mbps: f64,
    },
    /// The final dirty bitmap went to the target.
    MigrationBitmap { vm: String, bits: u64 },
    /// The target pulled the bitmap's pages.
    MigrationPulled { vm: String, pages: u64 },
    /// Any other progress report of the engine.
    MigrationProgress { vm: String, progress: Progress },
    /// The migration ended: the VM runs on `to`.
    MigrationDone {
        vm: String,
        from: String,
        to: String,
        rounds: u32,
        downtime_us: u64,
        total_ms: u64,
        pages_pulled: u64,
        converged: bool,
    },
    /// The migration failed in `step`; `vm_running` tells whether the VM runs here.
    MigrationFailed {
        vm: String,
        host: String,
        step: Option<Step>,
        error: String,
        vm_running: bool,
    },
    /// An incoming migration ended on the target.
    MigrationIncomingDone {
        vm: String,
        host: String,
        downtime_us: u64,
        /// How the stream was protected (tls, plaintext).
        transport: String,
    },
    /// The source did not verify the memory that arrived here: the copy stopped and the
    /// VM runs on the source (target side).
    MigrationRolledBack { vm: String, host: String },
    /// vMotion connections refused before authentication during the last `period_s`
    /// (one summary per period, however many there were).
    VmotionRefused {
        host: String,
        connections: u64,
        reasons: String,
        period_s: u64,
    },
    /// An incoming migration failed on the target (it keeps nothing).
    MigrationIncomingFailed {
        host: String,
        error: String,
        transport: String,
    },
    /// The host entered maintenance mode: it admits no new VM and no incoming
    /// migration; `vms` VMs were on it then.
    MaintenanceEntered { host: String, vms: usize },
    /// The host left maintenance mode and admits VMs again.
    MaintenanceExited { host: String, vms: usize },
}

impl Event {
    /// The VM the event is about, if any.
    pub fn vm(&self) -> Option<&str> {
        use Event::*;
        match self {
            VmCreated { vm, .. }
            | VmStarted { vm, .. }
            | VmQuiesced { vm, .. }
            | VmResumed { vm, .. }
            | VmDestroyed { vm, .. }
            | VmMemoryFreed { vm, .. }
            | IncomingMemoryPrepared { vm, .. }
            | DiskLockReleased { vm, .. }
            | DiskLockTaken { vm, .. }
            | AnnounceSent { vm, .. }
            | MigrationStarted { vm, .. }
            | MigrationRound { vm, .. }
            | MigrationBitmap { vm, .. }
            | MigrationPulled { vm, .. }
            | MigrationProgress { vm, .. }
            | MigrationDone { vm, .. }
            | MigrationFailed { vm, .. }
            | MigrationIncomingDone { vm, .. }
            | MigrationRolledBack { vm, .. }
            | MigrationCancelRequested { vm, .. } => Some(vm),
            _ => None,
        }
    }

    /// The MAC the event is about, if any.
    pub fn mac(&self) -> Option<MacAddr> {
        use Event::*;
        match self {
            MacLearned { mac, .. }
            | MacMoved { mac, .. }
            | MacAged { mac, .. }
            | MacEvicted { mac, .. }
            | AnnounceSent { mac, .. }
            | VmCreated { mac, .. } => Some(*mac),
            _ => None,
        }
    }

    /// The serde tag, e.g. `mac_moved`.
    pub fn kind(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("event").and_then(|k| k.as_str().map(str::to_string)))
            .unwrap_or_default()
    }

    fn is_warning(&self) -> bool {
        matches!(
            self,
            Event::PortGone { .. }
                | Event::MigrationFailed { .. }
                | Event::MigrationRolledBack { .. }
                | Event::VmotionRefused { .. }
                | Event::MigrationIncomingFailed { .. }
        )
    }
}

/// For people: one short sentence (the log line and `vfabric events` without `--json`).
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Event::*;
        match self {
            MacLearned { mac, port, remote } => {
                write!(f, "{mac} learned on port {port}")?;
                if let Some(r) = remote {
                    write!(f, " behind {r}")?;
                }
                Ok(())
            }
            MacMoved {
                mac,
                from,
                to,
                ethertype,
                from_remote,
                to_remote,
            } => {
                let at = |port: &str, r: &Option<SocketAddrV4>| match r {
                    Some(r) => format!("{port} ({r})"),
                    None => port.to_string(),
                };
                write!(
                    f,
                    "{mac} moved from port {} to {} by a {ethertype} frame",
                    at(from, from_remote),
                    at(to, to_remote)
                )
            }
            MacAged { mac, port } => write!(f, "{mac} aged out of port {port}"),
            MacEvicted { mac, port } => write!(f, "{mac} evicted from port {port}: table full"),
            FdbFlushed { entries } => write!(f, "forwarding table flushed ({entries} entries)"),
            PortUp { port, ifname } => write!(f, "port {port} up ({ifname})"),
            PortDown { port } => write!(f, "port {port} down"),
            PortGone {
                port,
                ifname,
                fdb_entries_removed,
            } => write!(
                f,
                "port {port} gone: device {ifname} vanished, {fdb_entries_removed} entries removed"
            ),
            PortDeleted {
                port,
                ifname,
                fdb_entries_removed,
            } => write!(
                f,
                "port {port} deleted ({ifname}), {fdb_entries_removed} entries removed"
            ),
            PortLink { port, ifname, up } => write!(
                f,
                "port {port} link {} ({ifname})",
                if *up { "up" } else { "down" }
            ),
            VmCreated {
                vm,
                host,
                memory_mb,
                vcpus,
                mac,
                ip,
                reserved_mb,
            } => write!(
                f,
                "{vm} created on {host}: {memory_mb} MB, {vcpus} vCPU, {mac} {ip}, {reserved_mb} MB reserved"
            ),
            VmStarted { vm, host } => write!(f, "{vm} started on {host}"),
            VmQuiesced {
                vm,
                host,
                dirty_pages,
            } => write!(f, "{vm} quiesced on {host}, {dirty_pages} pages still dirty"),
            VmResumed {
                vm,
                host,
                after_failure,
            } => {
                write!(f, "{vm} resumed on {host}")?;
                if *after_failure {
                    f.write_str(" after a failed migration")?;
                }
                Ok(())
            }
            VmDestroyed { vm, host } => write!(f, "{vm} destroyed on {host}"),
            VmMemoryFreed { vm, host, rss_kib } => write!(
                f,
                "{vm}'s memory freed on {host}; the host daemon now holds {rss_kib} KiB"
            ),
            IncomingMemoryPrepared {
                vm,
                host,
                memory_mb,
                ms,
            } => write!(
                f,
                "{host} made {memory_mb} MB ready for {vm}'s coming migration in {ms} ms"
            ),
            DiskLockReleased { vm, host } => write!(f, "{host} released {vm}'s disk lock"),
            DiskLockTaken { vm, host } => write!(f, "{host} took {vm}'s disk lock"),
            AnnounceSent {
                vm,
                host,
                kind,
                seq,
                ..
            } => write!(f, "{host} announced {vm} ({kind} #{seq})"),
            MigrationCancelRequested { vm, host } => {
                write!(f, "cancel of {vm}'s migration from {host} requested")
            }
            MigrationStarted { vm, from, to } => write!(f, "migration of {vm}: {from} -> {to}"),
            MigrationRound {
                vm,
                round,
                pages_sent,
                dirty_pages,
                throughput_mbps,
            } => write!(
                f,
                "{vm} pre-copy round {round}: {pages_sent} pages sent, {dirty_pages} dirtied meanwhile, {throughput_mbps:.0} Mbit/s"
            ),
            MigrationBitmap { vm, bits } => write!(f, "{vm} dirty bitmap sent: {bits} pages"),
            MigrationPulled { vm, pages } => write!(f, "{vm}: the target pulled {pages} pages"),
            MigrationProgress { vm, progress } => write!(f, "{vm}: {progress:?}"),
            MigrationDone {
                vm,
                from,
                to,
                rounds,
                downtime_us,
                total_ms,
                pages_pulled,
                converged,
            } => write!(
                f,
                "{vm} migrated {from} -> {to}: {rounds} rounds{}, {pages_pulled} pages pulled, downtime {downtime_us} us, {total_ms} ms in all",
                if *converged { "" } else { " (stopped by policy)" }
            ),
            MigrationFailed {
                vm,
                host,
                step,
                error,
                vm_running,
            } => {
                write!(f, "migration of {vm} failed")?;
                if let Some(s) = step {
                    write!(f, " in {s}")?;
                }
                write!(
                    f,
                    ": {error}; {vm} {} on {host}",
                    if *vm_running { "runs" } else { "does not run" }
                )
            }
            MigrationIncomingDone {
                vm,
                host,
                downtime_us,
                transport,
            } => write!(
                f,
                "{vm} arrived on {host} over {transport}, downtime {downtime_us} us"
            ),
            MigrationRolledBack { vm, host } => write!(
                f,
                "{vm}'s copy on {host} stopped: the source did not verify its memory"
            ),
            VmotionRefused {
                host,
                connections,
                reasons,
                period_s,
            } => write!(
                f,
                "{host} refused {connections} vMotion connections in the last {period_s} s ({reasons})"
            ),
            MigrationIncomingFailed {
                host,
                error,
                transport,
            } => write!(f, "incoming migration to {host} over {transport} failed: {error}"),
            MaintenanceEntered { host, vms } => write!(
                f,
                "{host} entered maintenance mode with {vms} VMs: it admits no VM"
            ),
            MaintenanceExited { host, vms } => {
                write!(f, "{host} left maintenance mode with {vms} VMs: it admits VMs")
            }
        }
    }
}

/// One event as published: when (µs since the epoch, taken where it happened), which
/// daemon, what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub t_us: u64,
    /// The daemon that published it (a host name, or the switch's name).
    pub source: String,
    #[serde(flatten)]
    pub event: Event,
}

struct Subscriber {
    tx: mpsc::Sender<Record>,
    dropped: Arc<AtomicBool>,
}

struct Inner {
    source: String,
    subs: Mutex<Vec<Subscriber>>,
    /// Number of subscribers, read without the lock: with none, publishing costs one load.
    count: AtomicUsize,
}

/// The events of one daemon: emitters log and publish through it; the control server
/// hands out subscriptions. Cheap to clone.
#[derive(Clone)]
pub struct EventBus(Arc<Inner>);

/// What a subscriber reads: the records, and whether it was dropped for being slow.
pub struct Subscription {
    pub rx: mpsc::Receiver<Record>,
    dropped: Arc<AtomicBool>,
}

impl Subscription {
    /// True once the bus dropped this subscriber because its queue was full.
    pub fn was_dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }
}

impl EventBus {
    pub fn new(source: &str) -> EventBus {
        EventBus(Arc::new(Inner {
            source: source.to_string(),
            subs: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
        }))
    }

    pub fn source(&self) -> &str {
        &self.0.source
    }

    /// Logs `event` (stamped `t_us`) for people and publishes it to every subscriber.
    pub fn emit(&self, t_us: u64, event: Event) {
        if event.is_warning() {
            tracing::warn!(t_us, "{event}");
        } else {
            tracing::info!(t_us, "{event}");
        }
        self.publish(t_us, event);
    }

    /// [`EventBus::emit`] stamped now.
    pub fn emit_now(&self, event: Event) {
        self.emit(unix_micros(), event);
    }

    /// Queues the event for every subscriber without ever waiting: a subscriber whose
    /// queue is full is dropped.
    pub fn publish(&self, t_us: u64, event: Event) {
        if self.0.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let record = Record {
            t_us,
            source: self.0.source.clone(),
            event,
        };
        let mut subs = self.0.subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| match s.tx.try_send(record.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                s.dropped.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        self.0.count.store(subs.len(), Ordering::Release);
    }

    /// A new subscriber with a queue of `capacity` events.
    pub fn subscribe(&self, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicBool::new(false));
        let mut subs = self.0.subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.push(Subscriber {
            tx,
            dropped: dropped.clone(),
        });
        self.0.count.store(subs.len(), Ordering::Release);
        Subscription { rx, dropped }
    }

    /// Subscribers now queued on the bus.
    pub fn subscribers(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 1, 1]);

    fn moved() -> Event {
        Event::MacMoved {
            mac: MAC,
            from: "silo104".into(),
            to: "silo105".into(),
            ethertype: "rarp".into(),
            from_remote: None,
            to_remote: None,
        }
    }

    #[test]
    fn records_are_flat_tagged_json_and_parse_back() {
        let r = Record {
            t_us: 42,
            source: "switch".into(),
            event: moved(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"t_us":42,"source":"switch","event":"mac_moved","mac":"02:00:00:00:01:01","from":"silo104","to":"silo105","ethertype":"rarp"}"#
        );
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
        assert_eq!(r.event.kind(), "mac_moved");
        assert_eq!(r.event.mac(), Some(MAC));
        let p = Record {
            t_us: 1,
            source: "silo104".into(),
            event: Event::MigrationProgress {
                vm: "vm1".into(),
                progress: Progress::Pulled { pages: 3 },
            },
        };
        let back: Record = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.event.vm(), Some("vm1"));
    }

    #[test]
    fn subscribers_get_events_in_order_and_a_slow_one_is_dropped() {
        let bus = EventBus::new("switch");
        // Nobody listens: nothing is queued anywhere.
        bus.publish(1, moved());
        let mut fast = bus.subscribe(16);
        let slow = bus.subscribe(2);
        assert_eq!(bus.subscribers(), 2);
        for t in 10..13 {
            bus.publish(t, moved());
        }
        // The third event did not fit the slow queue: it was dropped, not waited for.
        assert!(slow.was_dropped());
        assert!(!fast.was_dropped());
        assert_eq!(bus.subscribers(), 1);
        let got: Vec<u64> = (0..3).map(|_| fast.rx.try_recv().unwrap().t_us).collect();
        assert_eq!(got, vec![10, 11, 12]);
        // A subscriber that went away is forgotten at the next event.
        drop(fast);
        bus.publish(20, moved());
        assert_eq!(bus.subscribers(), 0);
    }

    #[test]
    fn the_text_for_people_is_a_sentence() {
        assert_eq!(
            moved().to_string(),
            "02:00:00:00:01:01 moved from port silo104 to silo105 by a rarp frame"
        );
    }
}
