//! The hypervisor daemon (`vfabric host`): an adapter that owns the VMs of one emulated
//! host, its uplink packet socket, its vMotion listener and its control socket.
//!
//! The migration engine ([`crate::migration`]) does the moving; this module decides what
//! the host does around it: admission, the disk lock hand-over, the VM's NIC on the
//! uplink, and the RARP announce after an incoming VM resumes.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::clock::unix_micros;
use crate::control::{self, Progress, Request};
use crate::events::{Event, EventBus};
use crate::guest::nic::{self, Nic};
use crate::guest::{Vm, VmConfig};
use crate::host::admission::{self, Reservation};
use crate::host::api::{self, HostApiError, HostInfo, HostMode, HostRequest, MemoryDigest, VmInfo};
use crate::host::datastore::{ClaimKey, ClaimMode, Claims, Datastore, DatastoreError, DiskLock};
use crate::host::pause::PausePoints;
use crate::host::prepared;
use crate::host::slot::{self, Slot};
use crate::memory::GuestMemory;
use crate::migration::announce::{Announce, Schedule};
use crate::migration::tls::{Encryption, Rejection, Rejections, Tls};
use crate::migration::MigrationConfig;
use crate::port::uplink::{Uplink, UplinkEvent, UplinkRx};
use crate::wire::ethernet::Frame;
use crate::wire::MacAddr;

mod announcer;
mod hooks;
mod vmotion;

use announcer::{start_announce, VmEntryHandles};

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Name(#[from] crate::names::NameError),
    #[error("cannot listen for vMotion on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for control connections on {addr}")]
    ControlListen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open uplink {0}")]
    Uplink(String, #[source] crate::port::packet::PacketError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("cannot start the NIC thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Datastore(#[from] crate::host::datastore::DatastoreError),
}

/// How one host daemon is set up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub name: String,
    /// Address of the vMotion listener (port 0 picks a free one).
    pub vmotion_addr: SocketAddr,
    /// The uplink interface the VMs' NICs use; None runs the VMs without a network.
    pub uplink: Option<String>,
    pub capacity_mb: u64,
    pub datastore: PathBuf,
    pub socket: PathBuf,
    pub announce: Announce,
    pub schedule: Schedule,
    pub migration: MigrationConfig,
    /// Test pause points (`--test-pause-dir`, see [`crate::host::pause`]); None in
    /// normal use.
    pub test_pause_dir: Option<PathBuf>,
    pub vmotion: VmotionSecurity,
    /// Testing only: exit the daemon right after an incoming VM's first announce, before
    /// the resume is reported to the source, so that a failed switch-over (the target
    /// gone after announcing) lands deterministically.
    pub test_exit_after_announce: bool,
    /// The control API over TCP and TLS, for the CLI on another machine; None (the
    /// default) serves the Unix socket only.
    pub control_tcp: Option<ControlTcp>,
}

/// A TCP control listener: where, with which certificate, and its limits on strangers.
#[derive(Debug, Clone)]
pub struct ControlTcp {
    pub at: control::tls::ListenAddr,
    pub tls: Arc<control::tls::ServerTls>,
    pub limits: control::tls::Limits,
}

/// How the vMotion listener and outgoing migrations protect themselves.
#[derive(Debug, Clone)]
pub struct VmotionSecurity {
    /// The host's default; a migrate request may override it for one migration.
    pub encryption: Encryption,
    /// The host's credentials; None runs plaintext only (not with `Required`).
    pub tls: Option<Arc<Tls>>,
    /// An incoming connection must be authenticated (or, in plaintext, have sent its
    /// first byte) within this time.
    pub handshake_timeout: Duration,
    /// Most incoming vMotion connections at once, handshaking or migrating; more are
    /// closed at once.
    pub max_incoming: usize,
}

impl Default for VmotionSecurity {
    fn default() -> Self {
        VmotionSecurity {
            encryption: Encryption::Required,
            tls: None,
            handshake_timeout: Duration::from_secs(5),
            max_incoming: 16,
        }
    }
}

/// Refused vMotion connections are summed up in one warning per this period.
const REFUSALS_EVERY: Duration = Duration::from_secs(10);

/// An error with its causes, on one line (the OS error of a failed file operation
/// included: "write claim …: No space left on device (os error 28)").
use crate::errors::chain;

/// What the NIC thread, the announcer and the disk writer share about one VM.
///
/// They act only while the VM runs (`vm.is_running()`): every path that takes a VM off
/// this host quiesces it first, and a quiesced VM never runs again from the same
/// `Vm` here unless its slot says so (a failed migration, `vm start`).
struct VmShared {
    vm: Arc<Vm>,
    nic: Mutex<Nic>,
    disk: Mutex<Option<DiskLock>>,
    /// The VM's name, MAC and IP claims on the datastore, held while it is on this host.
    claims: Mutex<Option<Claims>>,
    nic_rx: AtomicU64,
    nic_tx: AtomicU64,
}

impl VmShared {
    /// Gives up the VM's disk lock (the VM no longer writes its disk from here).
    fn release_disk(&self) {
        self.disk.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Stops the vCPUs and gives up the disk.
    fn stop(&self) {
        self.vm.quiesce();
        self.release_disk();
    }
}

/// A VM on this host, as its [`Slot`] holds it.
struct VmEntry {
    shared: Arc<VmShared>,
    resumed_t_us: Option<u64>,
    first_announce_t_us: Arc<AtomicU64>,
    announce: Announce,
}

impl VmEntry {
    fn handles(&self) -> Arc<VmEntryHandles> {
        Arc::new(VmEntryHandles {
            shared: self.shared.clone(),
            first_announce: self.first_announce_t_us.clone(),
        })
    }
}

type Inventory = slot::Inventory<VmEntry>;

struct Host {
    cfg: HostConfig,
    vmotion_addr: SocketAddr,
    datastore: Arc<Datastore>,
    inv: Mutex<Inventory>,
    /// VMs by MAC, for the NIC thread.
    by_mac: RwLock<HashMap<MacAddr, Arc<VmShared>>>,
    uplink: Option<Arc<Uplink>>,
    stop: AtomicBool,
    pause: PausePoints,
    events: EventBus,
    /// vMotion connections refused before authentication, since the last summary.
    rejections: Rejections,
    /// Memory made ready for coming migrations.
    prepared: Mutex<prepared::Pool<Arc<GuestMemory>>>,
}

/// Runs a host daemon until `shutdown` resolves. On return every VM has been stopped,
/// its disk lock released, and the control socket removed.
pub async fn run<S: Future<Output = ()>>(cfg: HostConfig, shutdown: S) -> Result<(), HostError> {
    crate::names::validate("host", &cfg.name)?;
    let datastore = Datastore::open(&cfg.datastore)?;
    let uplink = match &cfg.uplink {
        Some(ifname) => Some(Arc::new(
            Uplink::open_filtered(ifname).map_err(|e| HostError::Uplink(ifname.clone(), e))?,
        )),
        None => None,
    };
    let listener = TcpListener::bind(cfg.vmotion_addr)
        .await
        .map_err(|source| HostError::Listen {
            addr: cfg.vmotion_addr,
            source,
        })?;
    let vmotion_addr = listener.local_addr().map_err(|source| HostError::Listen {
        addr: cfg.vmotion_addr,
        source,
    })?;
    let control = control::bind(&cfg.socket)?;
    let control_tcp = match &cfg.control_tcp {
        Some(c) => {
            let l = control::tls::bind(&c.at).map_err(|source| HostError::ControlListen {
                addr: c.at.to_string(),
                source,
            })?;
            Some(control::tls::ControlListener::new(
                l,
                c.tls.clone(),
                c.limits,
            ))
        }
        None => None,
    };
    let pause = PausePoints::new(cfg.test_pause_dir.clone(), &cfg.name);
    let events = EventBus::new(&cfg.name);
    let inv = Mutex::new(Inventory::new(&cfg.name, cfg.capacity_mb));
    let host = Arc::new(Host {
        inv,
        pause,
        cfg,
        events: events.clone(),
        vmotion_addr,
        datastore: Arc::new(datastore),
        by_mac: RwLock::new(HashMap::new()),
        uplink,
        stop: AtomicBool::new(false),
        rejections: Rejections::default(),
        prepared: Mutex::default(),
    });
    tracing::info!(
        host = %host.cfg.name,
        vmotion = %vmotion_addr,
        uplink = host.cfg.uplink.as_deref().unwrap_or("-"),
        capacity_mb = host.cfg.capacity_mb,
        socket = %host.cfg.socket.display(),
        control_tcp = %host.cfg.control_tcp.as_ref().map(|c| c.at.to_string()).unwrap_or_else(|| "-".into()),
        vmotion_encryption = %host.cfg.vmotion.encryption,
        certificate = host.cfg.vmotion.tls.as_ref().map(|t| t.name()).unwrap_or("-"),
        "host ready"
    );
    let nic_thread = match host.uplink.clone() {
        Some(up) => {
            let h = host.clone();
            Some(
                std::thread::Builder::new()
                    .name("nic".into())
                    .spawn(move || nic_loop(h, up))
                    .map_err(HostError::Thread)?,
            )
        }
        None => None,
    };
    let accept = {
        let h = host.clone();
        let slots = Arc::new(Semaphore::new(h.cfg.vmotion.max_incoming.max(1)));
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            h.refused(peer, Rejection::OverCap, "too many connections");
                            drop(stream);
                            continue;
                        };
                        let h = h.clone();
                        tokio::spawn(async move { h.incoming(stream, peer, slot).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "vMotion accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    let handler = {
        let h = host.clone();
        move |req: HostRequest, progress: Progress| {
            let h = h.clone();
            async move { h.handle(req, progress).await }
        }
    };
    let summaries = {
        let h = host.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFUSALS_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (n, why) = h.rejections.take();
                if n > 0 {
                    h.events.emit_now(Event::VmotionRefused {
                        host: h.cfg.name.clone(),
                        connections: n,
                        reasons: why.to_string(),
                        period_s: REFUSALS_EVERY.as_secs(),
                    });
                }
            }
        })
    };
    control::serve_with(control, control_tcp, handler, Some(events), shutdown).await;
    accept.abort();
    summaries.abort();
    host.stop.store(true, Ordering::SeqCst);
    if let Some(t) = nic_thread {
        let _ = t.join();
    }
    host.shutdown_vms();
    let _ = std::fs::remove_file(&host.cfg.socket);
    tracing::info!(host = %host.cfg.name, "host stopped");
    Ok(())
}

/// The VMs' NIC: frames from the uplink go to the VM whose MAC they are for (broadcast
/// and multicast to every VM); a VM that is not running neither answers nor forwards.
///
/// The uplink is the kernel side of a TAP whose other end the switch holds: when the
/// switch dies the interface vanishes, and a restarted switch makes a new one under
/// the same name. The uplink's receiver hears of both from the kernel at once and
/// re-binds; the thread says so, and announces every running VM as soon as frames
/// flow again, so the new switch learns where they are. VMs keep running meanwhile.
fn nic_loop(host: Arc<Host>, uplink: Arc<Uplink>) {
    let mut buf = vec![0u8; 65536 + 64];
    let mut out = Vec::new();
    let mut rx = UplinkRx::new(uplink.clone());
    while !host.stop.load(Ordering::Relaxed) {
        let n = match rx.next(&mut buf, Duration::from_millis(200)) {
            UplinkEvent::Frame(n) => n,
            UplinkEvent::Idle => continue,
            UplinkEvent::Lost { error } => {
                uplink_lost(&host, &uplink, error);
                continue;
            }
            UplinkEvent::Back { down, since_t_us } => {
                tracing::info!(host = %host.cfg.name, uplink = %uplink.ifname(),
                    since_t_us, down_ms = down.as_millis() as u64,
                    t_us = unix_micros(), "uplink back: VM NICs re-bound");
                host.reannounce();
                continue;
            }
        };
        let frame = &buf[..n];
        let Ok(eth) = Frame::new_checked(frame) else {
            continue;
        };
        let dst = eth.dst_addr();
        let targets: Vec<Arc<VmShared>> = {
            let map = host.by_mac.read().unwrap_or_else(|p| p.into_inner());
            if dst.is_multicast() {
                map.values().cloned().collect()
            } else {
                map.get(&dst).cloned().into_iter().collect()
            }
        };
        for vm in targets {
            // The running check happens under the NIC lock, and the source takes that
            // lock after quiescing (see `SourceSide::quiesced`): no reply can write
            // guest memory after the final dirty bitmap is taken.
            let mut nic = vm.nic.lock().unwrap_or_else(|p| p.into_inner());
            if !vm.vm.is_running() {
                continue;
            }
            vm.nic_rx.fetch_add(1, Ordering::Relaxed);
            out.clear();
            nic.handle(frame, vm.vm.memory(), &mut out);
            drop(nic);
            for reply in &out {
                match uplink.send(reply) {
                    Ok(()) => {
                        vm.nic_tx.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!(error = %e, "uplink send failed"),
                }
            }
        }
    }
}

/// Says once that the uplink went away (the switch stopped, most likely).
fn uplink_lost(host: &Host, uplink: &Uplink, error: Option<String>) {
    let vms = host.lock_inv().vms().count();
    tracing::warn!(host = %host.cfg.name, uplink = %uplink.ifname(),
        error = error.unwrap_or_else(|| "interface gone".into()),
        vms, t_us = unix_micros(),
        "uplink lost: its interface is gone (switch stopped?); VMs keep running, unreachable until it is back");
}

/// Appends a record to the VM's disk every second while it runs here and holds the lock,
/// so a lost disk hand-over shows in the file.
async fn disk_writer(vm: Weak<VmShared>, host: String) {
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        // Gone once the VM has left this host and nothing holds it any more.
        let Some(shared) = vm.upgrade() else { return };
        if !shared.vm.is_running() {
            continue;
        }
        let guard = shared.disk.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = guard.as_ref() {
            seq += 1;
            let record = format!(
                "t_us={} host={} vm={} seq={}",
                unix_micros(),
                host,
                shared.vm.config().name,
                seq
            );
            if let Err(e) = lock.append(&record) {
                tracing::warn!(vm = %shared.vm.config().name, error = %e, "disk write failed");
            }
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * 4)
        .unwrap_or(0)
}

impl Host {
    async fn handle(
        self: Arc<Self>,
        req: HostRequest,
        progress: Progress,
    ) -> Result<serde_json::Value, String> {
        type Ok<T> = Result<T, HostApiError>;
        match req {
            HostRequest::Info(_) => api::Info::reply(Ok::Ok(self.info())),
            HostRequest::VmCreate(r) => api::VmCreate::reply(self.create(r.config)),
            HostRequest::VmList(_) => api::VmList::reply(Ok::Ok(self.list())),
            HostRequest::VmShow(r) => api::VmShow::reply(self.show(&r.name)),
            HostRequest::VmDigest(r) => {
                api::VmDigest::reply(self.digest(&r.name).await.map_err(HostApiError::Other))
            }
            HostRequest::VmDestroy(r) => api::VmDestroy::reply(self.destroy(&r.name)),
            HostRequest::VmStart(r) => {
                api::VmStart::reply(self.start(&r.name).map_err(HostApiError::Other))
            }
            HostRequest::MigrateCancel(r) => api::MigrateCancel::reply(
                self.cancel_migration(&r.name)
                    .await
                    .map_err(HostApiError::Other),
            ),
            HostRequest::PrepareIncoming(r) => {
                self.lock_inv().expect(&r.name, r.announce);
                match r.memory_mb {
                    Some(mb) => self.prepare_memory(&r.name, mb).await,
                    None => {
                        self.lock_prepared().forget(&r.name);
                    }
                }
                api::PrepareIncoming::reply(Ok::Ok(()))
            }
            HostRequest::MaintenanceEnter(_) => {
                api::MaintenanceEnter::reply(Ok::Ok(self.set_mode(HostMode::Maintenance)))
            }
            HostRequest::MaintenanceExit(_) => {
                api::MaintenanceExit::reply(Ok::Ok(self.set_mode(HostMode::Normal)))
            }
            HostRequest::Migrate(r) => api::Migrate::reply(
                self.migrate(r.name, r.target, r.target_addr, r.options, progress)
                    .await,
            ),
        }
    }

    fn no_such_vm(&self, name: &str) -> HostApiError {
        HostApiError::NoSuchVm {
            vm: name.to_string(),
            host: self.cfg.name.clone(),
        }
    }

    /// Announces every VM running here, on the announce schedule: after the uplink came
    /// back, a restarted switch knows no MAC yet.
    fn reannounce(self: &Arc<Self>) {
        let vms: Vec<(Arc<VmEntryHandles>, Announce)> = self
            .lock_inv()
            .vms()
            .filter_map(|(_, s)| match s {
                Slot::Running { vm: e, .. } if e.shared.vm.is_running() => {
                    Some((e.handles(), e.announce))
                }
                _ => None,
            })
            .collect();
        for (handles, kind) in vms {
            start_announce(self, handles, kind);
        }
    }

    fn lock_inv(&self) -> std::sync::MutexGuard<'_, Inventory> {
        self.inv.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn info(&self) -> HostInfo {
        let inv = self.lock_inv();
        self.info_of(&inv)
    }

    fn lock_prepared(&self) -> std::sync::MutexGuard<'_, prepared::Pool<Arc<GuestMemory>>> {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps and faults in `memory_mb` for `vm`'s coming migration, if the host admits
    /// arrivals and has that much free beyond its reservations and what it has already
    /// prepared for others. Otherwise nothing: the migration then lands in fresh memory.
    async fn prepare_memory(self: &Arc<Self>, vm: &str, memory_mb: u64) {
        let free = {
            let inv = self.lock_inv();
            if inv.mode() != HostMode::Normal {
                return;
            }
            let held = self.lock_prepared().bytes_except(vm) >> 20;
            self.cfg
                .capacity_mb
                .saturating_sub(inv.reserved_mb())
                .saturating_sub(held)
        };
        if memory_mb > free || crate::names::validate("vm", vm).is_err() {
            tracing::debug!(vm, memory_mb, free_mb = free, "no memory prepared");
            return;
        }
        let bytes = memory_mb << 20;
        let t = Instant::now();
        let made = tokio::task::spawn_blocking(move || {
            let m = GuestMemory::new(bytes)?;
            m.prefault(&AtomicBool::new(false))?;
            Ok::<_, crate::memory::MemoryError>(m)
        })
        .await;
        match made {
            Ok(Ok(m)) => {
                let ms = t.elapsed().as_millis() as u64;
                self.lock_prepared()
                    .insert(vm, Arc::new(m), bytes, Instant::now());
                self.events.emit_now(Event::IncomingMemoryPrepared {
                    vm: vm.to_string(),
                    host: self.cfg.name.clone(),
                    memory_mb,
                    ms,
                });
                // Not claimed in time: give it back.
                let h = Arc::downgrade(self);
                tokio::spawn(async move {
                    tokio::time::sleep(prepared::TTL).await;
                    if let Some(h) = h.upgrade() {
                        if h.lock_prepared().expire(Instant::now()) > 0 {
                            crate::sys::trim_heap();
                        }
                    }
                });
            }
            Ok(Err(e)) => tracing::debug!(vm, error = %e, "no memory prepared"),
            Err(e) => tracing::debug!(vm, error = %e, "no memory prepared"),
        }
    }

    fn info_of(&self, inv: &Inventory) -> HostInfo {
        let (prepared_mb, arrivals_into_prepared_memory) = {
            let p = self.lock_prepared();
            (p.bytes() >> 20, p.used())
        };
        HostInfo {
            name: self.cfg.name.clone(),
            vmotion_addr: self.vmotion_addr,
            uplink: self.cfg.uplink.clone(),
            capacity_mb: self.cfg.capacity_mb,
            reserved_mb: inv.reserved_mb(),
            incoming_mb: inv.incoming_mb(),
            mode: inv.mode(),
            vms: inv.vms().map(|(n, _)| n.clone()).collect(),
            rss_kib: rss_kib(),
            uplink_frames_read: self.uplink.as_ref().map_or(0, |u| u.frames_read()),
            prepared_mb,
            arrivals_into_prepared_memory,
        }
    }

    /// Enters or leaves maintenance mode (idempotent); the host as it is then.
    fn set_mode(&self, mode: HostMode) -> HostInfo {
        let mut inv = self.lock_inv();
        if inv.set_mode(mode) {
            let vms = inv.vms().count();
            self.events.emit_now(match mode {
                HostMode::Maintenance => Event::MaintenanceEntered {
                    host: self.cfg.name.clone(),
                    vms,
                },
                HostMode::Normal => Event::MaintenanceExited {
                    host: self.cfg.name.clone(),
                    vms,
                },
            });
        }
        self.info_of(&inv)
    }

    /// One VM as `vm list` shows it; None for a slot without a VM (an arrival).
    fn vm_info(&self, inv: &Inventory, slot: &Slot<VmEntry>) -> Option<VmInfo> {
        let e = slot.vm()?;
        let reservation = slot.reservation()?;
        let c = e.shared.vm.config();
        Some(VmInfo {
            name: c.name.clone(),
            host: self.cfg.name.clone(),
            host_mode: inv.mode(),
            state: if e.shared.vm.is_running() || !matches!(slot, Slot::Running { .. }) {
                slot.state_name().to_string()
            } else {
                "stopped".to_string()
            },
            vcpus: c.vcpus,
            memory_mb: c.memory_mb,
            word_bits: c.word_bits,
            mac: c.mac,
            ip: c.ip,
            workload: format!("{}", c.workload.pattern),
            dirty_rate: c.workload.dirty_rate,
            reserved_mb: reservation.total_mb(),
            overhead_mb: reservation.overhead_mb,
            disk_owner: self.datastore.owner(&c.name),
            udp_counter: nic::read_counter(e.shared.vm.memory()),
            nic_rx: e.shared.nic_rx.load(Ordering::Relaxed),
            nic_tx: e.shared.nic_tx.load(Ordering::Relaxed),
            resumed_t_us: e.resumed_t_us,
            first_announce_t_us: match e.first_announce_t_us.load(Ordering::Relaxed) {
                0 => None,
                t => Some(t),
            },
            announce: e.announce.to_string(),
            problem: slot.problem().map(str::to_string),
        })
    }

    fn list(&self) -> Vec<VmInfo> {
        let inv = self.lock_inv();
        inv.vms()
            .filter_map(|(_, s)| self.vm_info(&inv, s))
            .collect()
    }

    fn show(&self, name: &str) -> Result<VmInfo, HostApiError> {
        let inv = self.lock_inv();
        inv.vm(name)
            .and_then(|s| self.vm_info(&inv, s))
            .ok_or_else(|| self.no_such_vm(name))
    }

    /// The digest of the VM's memory as it is now (`GuestMemory::digest`, the one a
    /// verified migration compares). Meaningful for a VM whose memory is at rest: one
    /// with the idle workload and no client writing to it.
    async fn digest(&self, name: &str) -> Result<MemoryDigest, String> {
        let mem = {
            let inv = self.lock_inv();
            let e = inv
                .vm(name)
                .and_then(Slot::vm)
                .ok_or_else(|| format!("no VM named {name} on host {}", self.cfg.name))?;
            Arc::clone(e.shared.vm.memory())
        };
        let d = tokio::task::spawn_blocking(move || mem.digest())
            .await
            .map_err(|e| format!("memory digest failed: {e}"))?;
        Ok(MemoryDigest {
            name: name.to_string(),
            host: self.cfg.name.clone(),
            memory_sha256: crate::memory::hex(&d),
        })
    }

    /// Checks that `config` may come to this host and reserves room for it: its slot is
    /// `Incoming` from here until it runs ([`Self::install`]) or is abandoned.
    fn admit(&self, inv: &mut Inventory, config: &VmConfig) -> Result<Reservation, HostApiError> {
        config.validate()?;
        if inv
            .vms()
            .filter_map(|(_, s)| s.vm())
            .any(|e| e.shared.vm.config().mac == config.mac)
        {
            return Err(HostApiError::MacInUse {
                mac: config.mac,
                host: self.cfg.name.clone(),
            });
        }
        let r = admission::reservation(config.vcpus, config.memory_mb, config.word_bits)?;
        inv.admit(&config.name, r)?;
        Ok(r)
    }

    /// Puts an admitted VM, running, into the inventory and onto the NIC. Returns its
    /// announce handles and how it is announced (an orchestrator's choice for this
    /// arrival, or the host's setting).
    fn install(
        self: &Arc<Self>,
        inv: &mut Inventory,
        vm: Arc<Vm>,
        (disk, claims): (DiskLock, Option<Claims>),
    ) -> Result<(Arc<VmEntryHandles>, Announce), HostApiError> {
        let cfg = vm.config().clone();
        let shared = Arc::new(VmShared {
            nic: Mutex::new(Nic::new(cfg.mac, cfg.ip)),
            vm,
            disk: Mutex::new(Some(disk)),
            claims: Mutex::new(claims),
            nic_rx: AtomicU64::new(0),
            nic_tx: AtomicU64::new(0),
        });
        let first_announce = Arc::new(AtomicU64::new(0));
        let default = self.cfg.announce;
        let entry = inv.arrived(&cfg.name, |chosen| VmEntry {
            shared: shared.clone(),
            resumed_t_us: None,
            first_announce_t_us: first_announce.clone(),
            announce: chosen.unwrap_or(default),
        })?;
        let announce = entry.announce;
        self.by_mac
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cfg.mac, shared.clone());
        if let Some(u) = &self.uplink {
            u.admit(cfg.mac);
        }
        tokio::spawn(disk_writer(Arc::downgrade(&shared), self.cfg.name.clone()));
        Ok((
            Arc::new(VmEntryHandles {
                shared,
                first_announce,
            }),
            announce,
        ))
    }

    /// Takes a VM off this host: off the NIC, out of the inventory. Returns its entry.
    /// The caller has quiesced it (or it never ran here again after a quiesce).
    fn uninstall(&self, inv: &mut Inventory, name: &str) -> Option<VmEntry> {
        let e = inv.remove(name)?;
        let mac = e.shared.vm.config().mac;
        self.by_mac
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&mac);
        if let Some(u) = &self.uplink {
            u.release(mac);
        }
        Some(e)
    }

    /// Creates and starts a VM. Whatever step fails, nothing is left behind: no claim,
    /// no lock or disk file this call created, no reservation.
    fn create(self: &Arc<Self>, config: VmConfig) -> Result<VmInfo, HostApiError> {
        let name = config.name.clone();
        let refused = |e: &dyn std::error::Error| {
            HostApiError::Other(format!("cannot create {name}: {}", chain(e)))
        };
        let mut inv = self.lock_inv();
        let need = self.admit(&mut inv, &config)?;
        let claims = match self.datastore.claim(
            &name,
            &self.cfg.name,
            &ClaimKey::of_vm(&name, config.mac, config.ip),
            ClaimMode::Create,
        ) {
            Ok(c) => c,
            Err(e) => {
                inv.abandon(&name);
                return Err(refused(&e));
            }
        };
        let (disk, fresh) = match self.datastore.create_locked(&name, &self.cfg.name) {
            Ok(d) => d,
            Err(e) => {
                inv.abandon(&name);
                let _ = self.datastore.release_claims(claims);
                return Err(refused(&e));
            }
        };
        let vm = match Vm::create(config.clone()) {
            Ok(vm) => vm,
            Err(e) => {
                inv.abandon(&name);
                drop(disk);
                if fresh {
                    let _ = self.datastore.remove_disk(&name);
                }
                let _ = self.datastore.release_claims(claims);
                return Err(refused(&e));
            }
        };
        self.events.emit_now(Event::VmCreated {
            vm: config.name.clone(),
            host: self.cfg.name.clone(),
            memory_mb: config.memory_mb,
            vcpus: config.vcpus,
            mac: config.mac,
            ip: config.ip,
            reserved_mb: need.total_mb(),
        });
        vm.start();
        self.events.emit_now(Event::VmStarted {
            vm: config.name.clone(),
            host: self.cfg.name.clone(),
        });
        let (handles, announce) = self.install(&mut inv, vm, (disk, Some(claims)))?;
        let info = inv
            .vm(&config.name)
            .and_then(|s| self.vm_info(&inv, s))
            .ok_or_else(|| self.no_such_vm(&config.name))?;
        drop(inv);
        // The switch may know the MAC on another port (a VM of that MAC ran elsewhere):
        // announce, as after a migration, so the VM is reachable at once.
        start_announce(self, handles, announce);
        Ok(info)
    }

    /// `vm start`: a VM stopped without its disk lock takes the lock and runs again.
    fn start(self: &Arc<Self>, name: &str) -> Result<VmInfo, String> {
        let mut inv = self.lock_inv();
        let started = inv
            .start_stopped(name, |e| {
                let lock = self.datastore.lock(name, &self.cfg.name)?;
                *e.shared.disk.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
                e.shared.vm.start();
                Ok::<(), DatastoreError>(())
            })
            .map_err(|e| e.to_string())?;
        let e = started.map_err(|err| {
            format!(
                "{name} stays stopped on {}: its disk lock cannot be taken: {}",
                self.cfg.name,
                chain(&err)
            )
        })?;
        let (handles, announce) = (e.handles(), e.announce);
        let info = inv
            .vm(name)
            .and_then(|s| self.vm_info(&inv, s))
            .ok_or_else(|| format!("no VM named {name} on host {}", self.cfg.name))?;
        drop(inv);
        self.events.emit_now(Event::DiskLockTaken {
            vm: name.to_string(),
            host: self.cfg.name.clone(),
        });
        self.events.emit_now(Event::VmStarted {
            vm: name.to_string(),
            host: self.cfg.name.clone(),
        });
        start_announce(self, handles, announce);
        Ok(info)
    }

    /// `migrate cancel`: signals the outgoing migration of `name` and waits until it has
    /// ended, then says where the VM runs.
    async fn cancel_migration(self: &Arc<Self>, name: &str) -> Result<VmInfo, String> {
        let cancel = self.lock_inv().cancel_of(name).map_err(|e| e.to_string())?;
        cancel.cancel();
        self.events.emit_now(Event::MigrationCancelRequested {
            vm: name.to_string(),
            host: self.cfg.name.clone(),
        });
        // The source checks the signal between page batches: this is short. The bound
        // only matters for a switch-over stuck on a silent target (its I/O timeout).
        let deadline = Instant::now() + self.cfg.migration.io_timeout * 3 + Duration::from_secs(5);
        loop {
            {
                let inv = self.lock_inv();
                match inv.vm(name) {
                    None => {
                        return Err(format!(
                            "too late to cancel: {name} had passed the point of no return and \
                             runs on the target now"
                        ))
                    }
                    Some(Slot::MigratingOut { .. }) => {}
                    Some(s) => {
                        return self
                            .vm_info(&inv, s)
                            .ok_or_else(|| format!("{name} left {}", self.cfg.name))
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!("{name} is still migrating; the cancel is pending"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn destroy(&self, name: &str) -> Result<(), HostApiError> {
        let mut inv = self.lock_inv();
        match inv.vm(name) {
            None => return Err(self.no_such_vm(name)),
            Some(Slot::MigratingOut { .. }) => return Err(HostApiError::Busy(name.to_string())),
            Some(s) => {
                if let Some(e) = s.vm() {
                    e.shared.vm.quiesce();
                }
            }
        }
        let e = self
            .uninstall(&mut inv, name)
            .ok_or_else(|| self.no_such_vm(name))?;
        drop(inv);
        e.shared.stop();
        if let Err(err) = self.datastore.remove_disk(name) {
            tracing::warn!(vm = name, error = %chain(&err), "could not remove disk");
        }
        let claims = e
            .shared
            .claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = claims {
            if let Err(err) = self.datastore.release_claims(c) {
                tracing::warn!(vm = name, error = %chain(&err), "could not remove claims");
            }
        }
        self.events.emit_now(Event::VmDestroyed {
            vm: name.to_string(),
            host: self.cfg.name.clone(),
        });
        Ok(())
    }

    fn shutdown_vms(&self) {
        let mut inv = self.lock_inv();
        for (_, s) in inv.vms() {
            if let Some(e) = s.vm() {
                e.shared.vm.quiesce();
            }
        }
        let names: Vec<String> = inv.vms().map(|(n, _)| n.clone()).collect();
        for name in names {
            if let Some(e) = self.uninstall(&mut inv, &name) {
                e.shared.stop();
            }
        }
    }
}
