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

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clock::unix_micros;
use crate::control::{self, Progress, Request};
use crate::events::{Event, EventBus};
use crate::guest::nic::{self, Nic};
use crate::guest::{Vm, VmConfig};
use crate::host::admission;
use crate::host::api::{
    self, HostApiError, HostInfo, HostRequest, MemoryDigest, MigrateOptions, VmInfo,
};
use crate::host::datastore::{ClaimKey, ClaimMode, Claims, Datastore, DatastoreError, DiskLock};
use crate::host::pause::PausePoints;
use crate::migration::announce::{self, Announce, Schedule};
use crate::migration::tls::{self, Encryption, Protection, Rejection, Rejections, Tls};
use crate::migration::{
    self, Cancel, ErrorKind, MigrationConfig, PhaseWait, SourceHooks, Step, TargetHooks,
};
use crate::port::uplink::{Uplink, UplinkEvent, UplinkRx};
use crate::wire::ethernet::Frame;
use crate::wire::MacAddr;

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

/// Lifecycle of a VM on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmState {
    Running,
    MigratingOut,
    /// Stopped, memory kept: its disk lock could not be retaken after a failed
    /// migration, and a VM never runs without its lock. `vm start` retries.
    NoDiskLock,
}

impl VmState {
    fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::MigratingOut => "migrating",
            VmState::NoDiskLock => "no-disk-lock",
        }
    }
}

/// An error with its causes, on one line (the OS error of a failed file operation
/// included: "write claim …: No space left on device (os error 28)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// What the NIC thread, the announcer and the disk writer share about one VM.
struct VmShared {
    vm: Arc<Vm>,
    nic: Mutex<Nic>,
    disk: Mutex<Option<DiskLock>>,
    /// The VM's name, MAC and IP claims on the datastore, held while it is on this host.
    claims: Mutex<Option<Claims>>,
    alive: AtomicBool,
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

struct VmEntry {
    shared: Arc<VmShared>,
    state: VmState,
    reserved_mb: u64,
    overhead_mb: u64,
    resumed_t_us: Option<u64>,
    first_announce_t_us: Arc<AtomicU64>,
    announce: Announce,
    /// Why the VM is not running (state `NoDiskLock`).
    problem: Option<String>,
    /// The cancel of the outgoing migration under way.
    cancel: Option<Cancel>,
}

#[derive(Default)]
struct Inventory {
    vms: HashMap<String, VmEntry>,
    /// Reservations of incoming migrations that have not resumed yet.
    pending: HashMap<String, u64>,
    /// Announce overrides for the next incoming migration of a VM.
    announce_next: HashMap<String, Announce>,
}

impl Inventory {
    fn reserved_mb(&self) -> u64 {
        self.vms.values().map(|e| e.reserved_mb).sum::<u64>() + self.pending.values().sum::<u64>()
    }
}

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
    let pause = PausePoints::new(cfg.test_pause_dir.clone(), &cfg.name);
    let events = EventBus::new(&cfg.name);
    let host = Arc::new(Host {
        pause,
        cfg,
        events: events.clone(),
        vmotion_addr,
        datastore: Arc::new(datastore),
        inv: Mutex::new(Inventory::default()),
        by_mac: RwLock::new(HashMap::new()),
        uplink,
        stop: AtomicBool::new(false),
        rejections: Rejections::default(),
    });
    tracing::info!(
        host = %host.cfg.name,
        vmotion = %vmotion_addr,
        uplink = host.cfg.uplink.as_deref().unwrap_or("-"),
        capacity_mb = host.cfg.capacity_mb,
        socket = %host.cfg.socket.display(),
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
    control::serve_events(control, handler, Some(events), shutdown).await;
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
            if !vm.alive.load(Ordering::Acquire) || !vm.vm.is_running() {
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
    let vms = host.lock_inv().vms.len();
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
        let Some(shared) = vm.upgrade() else { return };
        if !shared.alive.load(Ordering::Acquire) {
            return;
        }
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
                let mut inv = self.lock_inv();
                match r.announce {
                    Some(a) => {
                        inv.announce_next.insert(r.name, a);
                    }
                    None => {
                        inv.announce_next.remove(&r.name);
                    }
                }
                api::PrepareIncoming::reply(Ok::Ok(()))
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
            .vms
            .values()
            .filter(|e| e.state == VmState::Running && e.shared.vm.is_running())
            .map(|e| {
                (
                    Arc::new(VmEntryHandles {
                        shared: e.shared.clone(),
                        first_announce: e.first_announce_t_us.clone(),
                    }),
                    e.announce,
                )
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
        let mut vms: Vec<String> = inv.vms.keys().cloned().collect();
        vms.sort();
        HostInfo {
            name: self.cfg.name.clone(),
            vmotion_addr: self.vmotion_addr,
            uplink: self.cfg.uplink.clone(),
            capacity_mb: self.cfg.capacity_mb,
            reserved_mb: inv.reserved_mb(),
            vms,
            rss_kib: rss_kib(),
            uplink_frames_read: self.uplink.as_ref().map_or(0, |u| u.frames_read()),
        }
    }

    fn vm_info(&self, e: &VmEntry) -> VmInfo {
        let c = e.shared.vm.config();
        VmInfo {
            name: c.name.clone(),
            host: self.cfg.name.clone(),
            state: if e.shared.vm.is_running() || e.state != VmState::Running {
                e.state.as_str().to_string()
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
            reserved_mb: e.reserved_mb,
            overhead_mb: e.overhead_mb,
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
            problem: e.problem.clone(),
        }
    }

    fn list(&self) -> Vec<VmInfo> {
        let inv = self.lock_inv();
        let mut v: Vec<VmInfo> = inv.vms.values().map(|e| self.vm_info(e)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn show(&self, name: &str) -> Result<VmInfo, HostApiError> {
        let inv = self.lock_inv();
        inv.vms
            .get(name)
            .map(|e| self.vm_info(e))
            .ok_or_else(|| self.no_such_vm(name))
    }

    /// The digest of the VM's memory as it is now (`GuestMemory::digest`, the one a
    /// verified migration compares). Meaningful for a VM whose memory is at rest: one
    /// with the idle workload and no client writing to it.
    async fn digest(&self, name: &str) -> Result<MemoryDigest, String> {
        let mem = {
            let inv = self.lock_inv();
            let e = inv
                .vms
                .get(name)
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

    /// Checks that `config` may come to this host and reserves room for it.
    fn admit(&self, inv: &mut Inventory, config: &VmConfig) -> Result<(u64, u64), HostApiError> {
        config.validate()?;
        if inv.vms.contains_key(&config.name) || inv.pending.contains_key(&config.name) {
            return Err(HostApiError::Exists {
                vm: config.name.clone(),
                host: self.cfg.name.clone(),
            });
        }
        if inv
            .vms
            .values()
            .any(|e| e.shared.vm.config().mac == config.mac)
        {
            return Err(HostApiError::MacInUse {
                mac: config.mac,
                host: self.cfg.name.clone(),
            });
        }
        let r = admission::reservation(config.vcpus, config.memory_mb, config.word_bits)?;
        admission::check_room_for(
            &self.cfg.name,
            self.cfg.capacity_mb,
            inv.reserved_mb(),
            &config.name,
            r,
        )?;
        let (need, overhead) = (r.total_mb(), r.overhead_mb);
        Ok((need, overhead))
    }

    /// Puts a running VM into the inventory and onto the NIC.
    fn install(
        self: &Arc<Self>,
        inv: &mut Inventory,
        vm: Arc<Vm>,
        (disk, claims): (DiskLock, Option<Claims>),
        reserved_mb: u64,
        overhead_mb: u64,
        announce: Announce,
    ) -> Arc<VmEntryHandles> {
        let cfg = vm.config().clone();
        let shared = Arc::new(VmShared {
            nic: Mutex::new(Nic::new(cfg.mac, cfg.ip)),
            vm,
            disk: Mutex::new(Some(disk)),
            claims: Mutex::new(claims),
            alive: AtomicBool::new(true),
            nic_rx: AtomicU64::new(0),
            nic_tx: AtomicU64::new(0),
        });
        let first_announce = Arc::new(AtomicU64::new(0));
        inv.vms.insert(
            cfg.name.clone(),
            VmEntry {
                shared: shared.clone(),
                state: VmState::Running,
                reserved_mb,
                overhead_mb,
                resumed_t_us: None,
                first_announce_t_us: first_announce.clone(),
                announce,
                problem: None,
                cancel: None,
            },
        );
        self.by_mac
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cfg.mac, shared.clone());
        if let Some(u) = &self.uplink {
            u.admit(cfg.mac);
        }
        tokio::spawn(disk_writer(Arc::downgrade(&shared), self.cfg.name.clone()));
        Arc::new(VmEntryHandles {
            shared,
            first_announce,
        })
    }

    /// Takes a VM off this host: off the NIC, out of the inventory. Returns its entry.
    fn uninstall(&self, inv: &mut Inventory, name: &str) -> Option<VmEntry> {
        let e = inv.vms.remove(name)?;
        e.shared.alive.store(false, Ordering::Release);
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
        let (need, overhead) = self.admit(&mut inv, &config)?;
        let claims = self
            .datastore
            .claim(
                &name,
                &self.cfg.name,
                &ClaimKey::of_vm(&name, config.mac, config.ip),
                ClaimMode::Create,
            )
            .map_err(|e| refused(&e))?;
        let (disk, fresh) = match self.datastore.create_locked(&name, &self.cfg.name) {
            Ok(d) => d,
            Err(e) => {
                let _ = self.datastore.release_claims(claims);
                return Err(refused(&e));
            }
        };
        let vm = match Vm::create(config.clone()) {
            Ok(vm) => vm,
            Err(e) => {
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
            reserved_mb: need,
        });
        vm.start();
        self.events.emit_now(Event::VmStarted {
            vm: config.name.clone(),
            host: self.cfg.name.clone(),
        });
        let announce = self.cfg.announce;
        let handles = self.install(&mut inv, vm, (disk, Some(claims)), need, overhead, announce);
        let info = self.vm_info(
            inv.vms
                .get(&config.name)
                .ok_or_else(|| self.no_such_vm(&config.name))?,
        );
        drop(inv);
        // The switch may know the MAC on another port (a VM of that MAC ran elsewhere):
        // announce, as after a migration, so the VM is reachable at once.
        start_announce(self, handles, announce);
        Ok(info)
    }

    /// `vm start`: a VM stopped without its disk lock takes the lock and runs again.
    fn start(self: &Arc<Self>, name: &str) -> Result<VmInfo, String> {
        let mut inv = self.lock_inv();
        let e = inv
            .vms
            .get_mut(name)
            .ok_or_else(|| format!("no VM named {name} on host {}", self.cfg.name))?;
        match e.state {
            VmState::NoDiskLock => {}
            VmState::Running => {
                return Err(format!("VM {name} is already running on {}", self.cfg.name))
            }
            VmState::MigratingOut => return Err(format!("VM {name} is migrating")),
        }
        let lock = self.datastore.lock(name, &self.cfg.name).map_err(|err| {
            format!(
                "{name} stays stopped on {}: its disk lock cannot be taken: {}",
                self.cfg.name,
                chain(&err)
            )
        })?;
        *e.shared.disk.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
        e.shared.vm.start();
        e.state = VmState::Running;
        e.problem = None;
        let handles = Arc::new(VmEntryHandles {
            shared: e.shared.clone(),
            first_announce: e.first_announce_t_us.clone(),
        });
        let announce = e.announce;
        let info = self.vm_info(e);
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
        let cancel = {
            let inv = self.lock_inv();
            let e = inv
                .vms
                .get(name)
                .ok_or_else(|| format!("no VM named {name} on host {}", self.cfg.name))?;
            match (&e.cancel, e.state) {
                (Some(c), VmState::MigratingOut) => c.clone(),
                _ => {
                    return Err(format!(
                        "{name} is not migrating from {} ({}): nothing to cancel",
                        self.cfg.name,
                        e.state.as_str()
                    ))
                }
            }
        };
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
                match inv.vms.get(name) {
                    None => {
                        return Err(format!(
                            "too late to cancel: {name} had passed the point of no return and \
                             runs on the target now"
                        ))
                    }
                    Some(e) if e.state == VmState::MigratingOut => {}
                    Some(e) => return Ok(self.vm_info(e)),
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
        match inv.vms.get(name) {
            None => return Err(self.no_such_vm(name)),
            Some(e) if e.state == VmState::MigratingOut => {
                return Err(HostApiError::Busy(name.to_string()))
            }
            Some(_) => {}
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
        let names: Vec<String> = inv.vms.keys().cloned().collect();
        for name in names {
            if let Some(e) = self.uninstall(&mut inv, &name) {
                e.shared.stop();
            }
        }
    }

    fn migration_config(&self, o: &MigrateOptions) -> MigrationConfig {
        let mut cfg = self.cfg.migration.clone();
        if let Some(ms) = o.downtime_ms {
            cfg.downtime_target = Duration::from_millis(ms);
        }
        if let Some(r) = o.max_rounds {
            cfg.max_rounds = r;
        }
        if let Some(p) = o.on_no_convergence {
            cfg.on_no_convergence = p;
        }
        if let Some(b) = o.bandwidth_mbps {
            cfg.bandwidth_limit = Some(b.saturating_mul(1_000_000) / 8);
        }
        if let Some(on) = o.auto_converge {
            cfg.auto_converge = on;
        }
        if let Some(ms) = o.max_downtime_ms {
            // The CLI refuses 0; a raw request asking for it gets the smallest guard.
            cfg.max_downtime = Duration::from_millis(ms.max(1));
        }
        cfg
    }

    async fn migrate(
        self: Arc<Self>,
        name: String,
        target: String,
        target_addr: SocketAddr,
        options: MigrateOptions,
        progress: Progress,
    ) -> Result<migration::MigrationSummary, HostApiError> {
        let cfg = self.migration_config(&options);
        let cancel = Cancel::new();
        let shared = {
            let mut inv = self.lock_inv();
            let e = inv
                .vms
                .get_mut(&name)
                .ok_or_else(|| self.no_such_vm(&name))?;
            match e.state {
                VmState::Running => {}
                VmState::MigratingOut => return Err(HostApiError::AlreadyMigrating(name)),
                VmState::NoDiskLock => {
                    return Err(HostApiError::Other(format!(
                    "VM {name} is stopped without its disk lock; `vfabric vm start {name}` first"
                )))
                }
            }
            e.state = VmState::MigratingOut;
            e.cancel = Some(cancel.clone());
            e.shared.clone()
        };
        self.events.emit_now(Event::MigrationStarted {
            vm: name.clone(),
            from: self.cfg.name.clone(),
            to: target.clone(),
        });
        let mode = options.encryption.unwrap_or(self.cfg.vmotion.encryption);
        let tls = self.cfg.vmotion.tls.as_deref();
        // Nothing of the VM crosses before the target has proven who it is.
        let (stream, protection) =
            match tls::connect(target_addr, &target, mode, tls, cfg.io_timeout).await {
                Ok(s) => s,
                Err(error) => {
                    self.set_state(&name, VmState::Running);
                    let e = HostApiError::Unreachable {
                        error,
                        vm: name.clone(),
                        host: self.cfg.name.clone(),
                    };
                    self.events.emit_now(Event::MigrationFailed {
                        vm: name,
                        host: self.cfg.name.clone(),
                        step: Some(migration::Step::PreCheck),
                        error: e.to_string(),
                        vm_running: true,
                    });
                    return Err(e);
                }
            };
        tracing::info!(vm = %name, to = %target, vmotion = %protection, "vMotion stream open");
        let mut hooks = SourceSide {
            shared: shared.clone(),
            datastore: self.datastore.clone(),
            host: self.cfg.name.clone(),
            pause: self.pause.clone(),
            events: self.events.clone(),
            lock_error: None,
        };
        let vm = shared.vm.clone();
        let events = self.events.clone();
        let host_name = self.cfg.name.clone();
        let mut report = |p: migration::Progress| {
            publish_progress(&events, &host_name, &name, &p);
            progress.send(&p);
        };
        let result =
            migration::migrate_out_cancellable(vm, stream, &cfg, &mut hooks, &mut report, &cancel)
                .await;
        let lock_error = hooks.lock_error.take();
        drop(hooks);
        let mut inv = self.lock_inv();
        if let Some(e) = inv.vms.get_mut(&name) {
            e.cancel = None;
        }
        match result {
            Ok(mut summary) => {
                summary.transport = protection.to_string();
                // Step 6: the VM runs on the target; free it here.
                let entry = self.uninstall(&mut inv, &name);
                drop(inv);
                drop(shared);
                drop(entry);
                self.events.emit_now(Event::MigrationDone {
                    vm: name.clone(),
                    from: self.cfg.name.clone(),
                    to: target,
                    rounds: summary.rounds,
                    downtime_us: summary.downtime_us,
                    total_ms: summary.total_ms,
                    pages_pulled: summary.pages_pulled,
                    converged: summary.converged,
                });
                self.events.emit_now(Event::VmMemoryFreed {
                    vm: name,
                    host: self.cfg.name.clone(),
                    rss_kib: rss_kib(),
                });
                Ok(summary)
            }
            Err(e) => {
                let running = shared.vm.is_running();
                self.events.emit_now(Event::MigrationFailed {
                    vm: name.clone(),
                    host: self.cfg.name.clone(),
                    step: Some(e.step),
                    error: e.kind.to_string(),
                    vm_running: running,
                });
                if running {
                    let mut reannounce = None;
                    if let Some(entry) = inv.vms.get_mut(&name) {
                        entry.state = VmState::Running;
                        // Past the quiesce the target may have announced the VM before
                        // it failed: the switch then sends the VM's frames there. Pull
                        // them back at once instead of waiting for a client's ARP.
                        if !matches!(e.step, Step::PreCheck | Step::PreCopy) {
                            reannounce = Some((
                                Arc::new(VmEntryHandles {
                                    shared: entry.shared.clone(),
                                    first_announce: entry.first_announce_t_us.clone(),
                                }),
                                entry.announce,
                            ));
                        }
                    }
                    drop(inv);
                    // A target that resumed it may have written its name into the
                    // VM's claims: they name this host again.
                    if reannounce.is_some() {
                        let mut claims = shared.claims.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(c) = claims.as_mut() {
                            if let Err(err) = self.datastore.move_claims(c, &self.cfg.name) {
                                tracing::warn!(vm = %name, error = %chain(&err),
                                    "claims keep naming the target");
                            }
                        }
                    }
                    if let Some((handles, kind)) = reannounce {
                        // Past the quiesce, the VM stopped here and runs again; its
                        // announces from here are `announce_sent` events of this host.
                        self.events.emit_now(Event::VmResumed {
                            vm: name.clone(),
                            host: self.cfg.name.clone(),
                            after_failure: true,
                        });
                        start_announce(&self, handles, kind);
                    }
                    if matches!(e.kind, ErrorKind::Cancelled) {
                        return Err(HostApiError::Cancelled {
                            vm: name,
                            step: e.step,
                            host: self.cfg.name.clone(),
                        });
                    }
                    Err(HostApiError::FailedKeptHere {
                        error: e,
                        vm: name,
                        host: self.cfg.name.clone(),
                    })
                } else if let Some(lock_err) = lock_error {
                    // Nobody holds the disk, yet it cannot be locked here: the VM stays
                    // stopped (memory kept) rather than run without its lock.
                    let problem = format!(
                        "stopped after a failed migration: its disk lock cannot be retaken \
                         ({lock_err}); fix the datastore, then run `vfabric vm start {name}`"
                    );
                    if let Some(entry) = inv.vms.get_mut(&name) {
                        entry.state = VmState::NoDiskLock;
                        entry.problem = Some(problem.clone());
                    }
                    tracing::error!(vm = %name, host = %self.cfg.name, error = %e,
                        lock_error = %lock_err, t_us = unix_micros(),
                        "VM STOPPED: migration failed and the disk lock cannot be retaken");
                    Err(HostApiError::Other(format!(
                        "{e}; {name} is {problem} (on {})",
                        self.cfg.name
                    )))
                } else {
                    // The target took the disk lock: the VM lives there now.
                    let entry = self.uninstall(&mut inv, &name);
                    drop(inv);
                    drop(entry);
                    Err(HostApiError::FailedTakenOver {
                        error: e,
                        vm: name,
                        target,
                    })
                }
            }
        }
    }

    fn set_state(&self, name: &str, state: VmState) {
        if let Some(e) = self.lock_inv().vms.get_mut(name) {
            e.state = state;
        }
    }

    /// Counts a connection refused before authentication; the log hears of it at DEBUG
    /// only, and the event stream in the periodic summary.
    fn refused(&self, peer: SocketAddr, why: Rejection, detail: &str) {
        self.rejections.record(why);
        tracing::debug!(peer = %peer, reason = why.as_str(), detail, "vMotion connection refused");
    }

    /// One incoming vMotion connection: authenticate it within the handshake deadline,
    /// then run the migration. `_slot` holds one of the incoming-connection slots.
    async fn incoming(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        _slot: OwnedSemaphorePermit,
    ) {
        let sec = &self.cfg.vmotion;
        let accepted = tokio::time::timeout(
            sec.handshake_timeout,
            tls::accept(stream, sec.encryption, sec.tls.as_deref()),
        )
        .await;
        let (stream, protection) = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err((why, detail))) => return self.refused(peer, why, &detail),
            Err(_) => return self.refused(peer, Rejection::Deadline, "handshake deadline"),
        };
        let mut hooks = TargetSide {
            host: self.clone(),
            name: None,
            disk: None,
            claims: None,
            resumed: false,
            admitted: None,
        };
        let cfg = self.cfg.migration.clone();
        match migration::migrate_in(stream, &cfg, &mut hooks).await {
            Ok((vm, summary)) => {
                tracing::debug!(peer = %peer, "incoming migration from this peer complete");
                self.events.emit_now(Event::MigrationIncomingDone {
                    vm: vm.config().name.clone(),
                    host: self.cfg.name.clone(),
                    downtime_us: summary.downtime_us,
                    transport: protection.to_string(),
                });
            }
            // A plaintext peer that never got through the pre-check is as anonymous as
            // one refused at the handshake.
            Err(e)
                if protection == Protection::Plaintext
                    && e.step == migration::Step::PreCheck
                    && hooks.name.is_none() =>
            {
                self.refused(peer, Rejection::Garbage, &e.to_string())
            }
            Err(e) => {
                tracing::debug!(peer = %peer, "incoming migration from this peer failed");
                self.events.emit_now(Event::MigrationIncomingFailed {
                    host: self.cfg.name.clone(),
                    error: e.to_string(),
                    transport: protection.to_string(),
                });
            }
        }
    }
}

/// Handles returned by [`Host::install`], for the announcer.
struct VmEntryHandles {
    shared: Arc<VmShared>,
    first_announce: Arc<AtomicU64>,
}

/// Publishes the engine's progress reports as events, stamped where they were made.
fn publish_progress(events: &EventBus, host: &str, vm: &str, p: &migration::Progress) {
    use migration::Progress as P;
    let vm = vm.to_string();
    let (t_us, ev) = match *p {
        P::Round {
            round,
            pages_sent,
            dirty_pages,
            throughput_mbps,
            ..
        } => (
            unix_micros(),
            Event::MigrationRound {
                vm,
                round,
                pages_sent,
                dirty_pages,
                throughput_mbps,
            },
        ),
        P::Quiesced { t_us, dirty_pages } => (
            t_us,
            Event::VmQuiesced {
                vm,
                host: host.to_string(),
                dirty_pages,
            },
        ),
        P::Bitmap { bits } => (unix_micros(), Event::MigrationBitmap { vm, bits }),
        P::Pulled { pages } => (unix_micros(), Event::MigrationPulled { vm, pages }),
        // The target publishes its own resume, stamped by its clock.
        P::Resumed { .. } => return,
        // Live figures are for the CLI's progress line, four a second: not events. The
        // throttle and a forced stop-and-copy are (as `MigrationProgress`).
        P::Tick(_) => return,
        #[allow(unreachable_patterns)]
        ref other => (
            unix_micros(),
            Event::MigrationProgress {
                vm,
                progress: other.clone(),
            },
        ),
    };
    events.emit(t_us, ev);
}

/// The source's side of the disk-lock hand-over.
struct SourceSide {
    shared: Arc<VmShared>,
    datastore: Arc<Datastore>,
    host: String,
    pause: PausePoints,
    events: EventBus,
    /// Set when the disk lock could be neither retaken nor found held by another host.
    lock_error: Option<String>,
}

impl SourceHooks for SourceSide {
    fn at_phase(&mut self, step: Step) -> PhaseWait {
        self.pause.at(step, &self.shared.vm.config().name)
    }

    fn quiesced(&mut self, vm: &Arc<Vm>) -> Result<(), String> {
        // A NIC reply that passed its running check before the quiesce may still be
        // writing guest memory: wait for it, so its write is in the final bitmap.
        drop(self.shared.nic.lock().unwrap_or_else(|p| p.into_inner()));
        // Step 3: the source gives up the disk so that the target can take it.
        self.shared.release_disk();
        self.events.emit_now(Event::DiskLockReleased {
            vm: vm.config().name.clone(),
            host: self.host.clone(),
        });
        Ok(())
    }

    fn reclaim(&mut self, vm: &Arc<Vm>) -> bool {
        let name = &vm.config().name;
        match self.datastore.lock(name, &self.host) {
            Ok(lock) => {
                *self.shared.disk.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
                self.events.emit_now(Event::DiskLockTaken {
                    vm: name.clone(),
                    host: self.host.clone(),
                });
                true
            }
            Err(e @ DatastoreError::Held { .. }) => {
                tracing::warn!(vm = %name, host = %self.host, error = %e,
                    "disk lock not retaken: the target owns the VM");
                false
            }
            Err(e) => {
                // Nobody holds the disk, so the target never took over; but a VM never
                // runs without its lock: it stays stopped here, memory kept.
                let e = chain(&e);
                tracing::error!(vm = %name, host = %self.host, error = %e,
                    "disk lock cannot be retaken: the VM stays stopped");
                self.lock_error = Some(e);
                false
            }
        }
    }
}

/// The target's side: admission, disk lock, inventory and announce.
struct TargetSide {
    host: Arc<Host>,
    name: Option<String>,
    disk: Option<DiskLock>,
    /// The incoming VM's claims, shared with the source until the move ends.
    claims: Option<Claims>,
    resumed: bool,
    /// The incoming VM's MAC, admitted by the uplink's filter from admission on, so
    /// that its frames reach it the moment it resumes.
    admitted: Option<MacAdmitted>,
}

/// Frames for a MAC pass the host's uplink filter while this lives.
struct MacAdmitted(Arc<Uplink>, MacAddr);

impl MacAdmitted {
    fn new(host: &Host, mac: MacAddr) -> Option<MacAdmitted> {
        let u = host.uplink.clone()?;
        u.admit(mac);
        Some(MacAdmitted(u, mac))
    }
}

impl Drop for MacAdmitted {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

impl Drop for TargetSide {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            if !self.resumed {
                let mut inv = self.host.lock_inv();
                inv.pending.remove(name);
                // An announce chosen for this migration must not outlive it.
                inv.announce_next.remove(name);
            }
        }
    }
}

impl TargetHooks for TargetSide {
    fn at_phase(&mut self, step: Step) -> PhaseWait {
        self.host
            .pause
            .at(step, self.name.as_deref().unwrap_or_default())
    }

    fn admit(&mut self, cfg: &VmConfig) -> Result<(), String> {
        let mut inv = self.host.lock_inv();
        let (need, _) = self
            .host
            .admit(&mut inv, cfg)
            .map_err(|e| control::error_line(&e))?;
        // Fabric-wide: no other VM may hold this VM's name, MAC or IP. Its own claims,
        // held by the source, are shared until the move ends.
        let claims = self
            .host
            .datastore
            .claim(
                &cfg.name,
                &self.host.cfg.name,
                &ClaimKey::of_vm(&cfg.name, cfg.mac, cfg.ip),
                ClaimMode::Migrate,
            )
            .map_err(|e| chain(&e))?;
        self.claims = Some(claims);
        inv.pending.insert(cfg.name.clone(), need);
        self.name = Some(cfg.name.clone());
        self.admitted = MacAdmitted::new(&self.host, cfg.mac);
        Ok(())
    }

    fn before_resume(&mut self, vm: &Arc<Vm>) -> Result<(), String> {
        let name = &vm.config().name;
        let lock = self
            .host
            .datastore
            .lock(name, &self.host.cfg.name)
            .map_err(|e| chain(&e))?;
        self.host.events.emit_now(Event::DiskLockTaken {
            vm: name.clone(),
            host: self.host.cfg.name.clone(),
        });
        self.disk = Some(lock);
        Ok(())
    }

    fn resumed(&mut self, vm: &Arc<Vm>) {
        let resumed_t_us = unix_micros();
        let cfg = vm.config().clone();
        let host = &self.host;
        let mut inv = host.lock_inv();
        let reserved = inv.pending.remove(&cfg.name).unwrap_or(0);
        let overhead = reserved.saturating_sub(cfg.memory_mb);
        let announce = inv
            .announce_next
            .remove(&cfg.name)
            .unwrap_or_else(|| host.cfg.announce);
        let Some(disk) = self.disk.take() else {
            return;
        };
        let mut claims = self.claims.take();
        if let Some(c) = claims.as_mut() {
            if let Err(e) = host.datastore.move_claims(c, &host.cfg.name) {
                tracing::warn!(vm = %cfg.name, error = %chain(&e),
                    "claims keep naming the previous host");
            }
        }
        let handles = host.install(
            &mut inv,
            vm.clone(),
            (disk, claims),
            reserved,
            overhead,
            announce,
        );
        if let Some(e) = inv.vms.get_mut(&cfg.name) {
            e.resumed_t_us = Some(resumed_t_us);
        }
        drop(inv);
        self.resumed = true;
        host.events.emit(
            resumed_t_us,
            Event::VmResumed {
                vm: cfg.name.clone(),
                host: host.cfg.name.clone(),
                after_failure: false,
            },
        );
        start_announce(host, handles, announce);
        if host.cfg.test_exit_after_announce {
            tracing::error!(vm = %cfg.name, host = %host.cfg.name, t_us = unix_micros(),
                "--test-exit-after-announce: exiting before reporting the resume");
            std::process::exit(75);
        }
    }

    fn rolled_back(&mut self, vm: &Arc<Vm>) {
        let name = vm.config().name.clone();
        let mut inv = self.host.lock_inv();
        let entry = self.host.uninstall(&mut inv, &name);
        drop(inv);
        vm.quiesce();
        // Stopping releases the disk lock, for the source to retake; the claims go
        // back to the source alone.
        if let Some(e) = entry {
            e.shared.stop();
            e.shared
                .claims
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
        self.disk.take();
        self.host.events.emit_now(Event::MigrationRolledBack {
            vm: name.clone(),
            host: self.host.cfg.name.clone(),
        });
        self.host.events.emit_now(Event::DiskLockReleased {
            vm: name,
            host: self.host.cfg.name.clone(),
        });
    }
}

/// Step 5's announce: the first frame goes out now, the rest on the schedule.
fn start_announce(host: &Arc<Host>, handles: Arc<VmEntryHandles>, kind: Announce) {
    let (name, mac, ip) = {
        let c = handles.shared.vm.config();
        (c.name.clone(), c.mac, c.ip)
    };
    let Some(frame) = announce::frame(&kind, mac, ip) else {
        tracing::info!(vm = %name, "announce disabled");
        return;
    };
    let Some(uplink) = host.uplink.clone() else {
        tracing::info!(vm = %name, "no uplink: announce skipped");
        return;
    };
    let schedule = host.cfg.schedule.0.clone();
    let host_name = host.cfg.name.clone();
    let events = host.events.clone();
    let start = Instant::now();
    let send = move |seq: usize| {
        // A VM that left (or is leaving) this host must not be announced from here: a
        // late frame would pull the switch back to this port, away from the VM.
        if !handles.shared.alive.load(Ordering::Acquire) || !handles.shared.vm.is_running() {
            return;
        }
        // The timestamp is taken before the write: once written, the switch may have
        // moved the MAC before this thread runs again.
        let t = unix_micros();
        match uplink.send(&frame) {
            Ok(()) => {
                let _ = handles.first_announce.compare_exchange(
                    0,
                    t,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                events.emit(
                    t,
                    Event::AnnounceSent {
                        vm: name.clone(),
                        host: host_name.clone(),
                        mac,
                        kind,
                        seq,
                    },
                );
            }
            Err(e) => tracing::warn!(vm = %name, error = %e, "announce send failed"),
        }
    };
    let mut offsets: Vec<(usize, Duration)> = schedule.into_iter().enumerate().collect();
    // A frame due at once leaves on this thread, right after resume.
    if offsets.first().is_some_and(|(_, at)| at.is_zero()) {
        send(0);
        offsets.remove(0);
    }
    if offsets.is_empty() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            for (seq, at) in offsets {
                if let Some(wait) = at.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                send(seq);
            }
        });
}
