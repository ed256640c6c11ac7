//! Control API of the hypervisor daemon (`vfabric host`), shared by the daemon and its
//! clients: one type per request, naming its reply. One request per connection; see
//! [`crate::control`] for the framing and [`crate::host::client`] for the calls.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::guest::{GuestError, VmConfig};
use crate::host::admission::AdmissionError;
use crate::host::datastore::DatastoreError;
use crate::migration::announce::Announce;
use crate::migration::{MigrationError, MigrationSummary, NoConvergence};
use crate::wire::MacAddr;

/// A request to a host daemon: one variant per action, each carrying its request type,
/// which names its reply type ([`crate::control::Request`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostRequest {
    Info(Info),
    VmCreate(VmCreate),
    VmList(VmList),
    VmShow(VmShow),
    VmDigest(VmDigest),
    VmDestroy(VmDestroy),
    VmStart(VmStart),
    Migrate(Migrate),
    MigrateCancel(MigrateCancel),
    PrepareIncoming(PrepareIncoming),
    MaintenanceEnter(MaintenanceEnter),
    MaintenanceExit(MaintenanceExit),
}

/// The host's identity and capacity.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Info {}

/// Create and start a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmCreate {
    pub config: VmConfig,
}

/// Every VM on this host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmList {}

/// One VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmShow {
    pub name: String,
}

/// The digest of one VM's memory as it is now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmDigest {
    pub name: String,
}

/// Stop a VM, release its disk and free its memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmDestroy {
    pub name: String,
}

/// Start a VM that is stopped here because its disk lock could not be retaken: take the
/// lock, then resume (and announce) it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStart {
    pub name: String,
}

/// Cancel the outgoing migration of `name`. Replies once the VM runs on this host again;
/// an error if it is not migrating, or if the switch-over had passed the point of no
/// return (the VM then runs on the target).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateCancel {
    pub name: String,
}

/// Live-migrate a VM from this host to the host listening at `target_addr`; progress
/// lines are [`crate::migration::Progress`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Migrate {
    pub name: String,
    pub target: String,
    pub target_addr: SocketAddr,
    #[serde(default)]
    pub options: MigrateOptions,
}

/// Announce mode for the next incoming migration of `name` (this host is the target);
/// None forgets an earlier choice.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareIncoming {
    pub name: String,
    pub announce: Option<Announce>,
    /// The VM's memory: the target maps and faults it in now, before the stream, if
    /// it has room (see `host::prepared`). None drops memory prepared before.
    #[serde(default)]
    pub memory_mb: Option<u64>,
}

/// Put the host in maintenance mode: from the reply on it admits no new VM and no
/// incoming migration; VMs already here stay until moved away.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MaintenanceEnter {}

/// Take the host out of maintenance mode: it admits VMs again.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MaintenanceExit {}

crate::api_requests!(HostRequest:
    Info => HostInfo,
    VmCreate => VmInfo,
    VmList => Vec<VmInfo>,
    VmShow => VmInfo,
    VmDigest => MemoryDigest,
    VmDestroy => (),
    VmStart => VmInfo,
    Migrate => MigrationSummary,
    MigrateCancel => VmInfo,
    PrepareIncoming => (),
    MaintenanceEnter => HostInfo,
    MaintenanceExit => HostInfo,
);

/// Whether a host admits VMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostMode {
    /// Admits new VMs and incoming migrations.
    #[default]
    Normal,
    /// Admits nothing: the host is being emptied (or is empty) for maintenance.
    Maintenance,
}

impl std::fmt::Display for HostMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostMode::Normal => "normal",
            HostMode::Maintenance => "maintenance",
        })
    }
}

/// Per-migration overrides of the host's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateOptions {
    pub downtime_ms: Option<u64>,
    pub max_rounds: Option<u32>,
    pub on_no_convergence: Option<NoConvergence>,
    pub bandwidth_mbps: Option<u64>,
    /// Throttle the vCPUs if pre-copy cannot otherwise converge.
    #[serde(default)]
    pub auto_converge: Option<bool>,
    /// The stun guard, ms.
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// vMotion encryption of this migration (default: the source host's setting).
    #[serde(default)]
    pub encryption: Option<crate::migration::tls::Encryption>,
}

/// Why a host daemon refused or failed a request (text only at the socket).
#[derive(Debug, thiserror::Error)]
pub enum HostApiError {
    #[error("no VM named {vm} on host {host}")]
    NoSuchVm { vm: String, host: String },
    #[error("a VM named {vm} already exists on host {host}")]
    Exists { vm: String, host: String },
    #[error("MAC {mac} is already used by another VM on host {host}")]
    MacInUse { mac: MacAddr, host: String },
    #[error("host {host} is in maintenance mode and admits no VM ({vm} refused); `vfabric host maintenance exit {host}` re-admits")]
    InMaintenance { host: String, vm: String },
    #[error("VM {0} is migrating; try again when it ends")]
    Busy(String),
    #[error("VM {0} is already migrating")]
    AlreadyMigrating(String),
    #[error(transparent)]
    Config(#[from] GuestError),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error("pre-check failed: {error}; {vm} keeps running on {host}")]
    Unreachable {
        error: crate::migration::tls::ConnectError,
        vm: String,
        host: String,
    },
    #[error("{error}; {vm} keeps running on {host}")]
    FailedKeptHere {
        error: MigrationError,
        vm: String,
        host: String,
    },
    #[error("migration of {vm} cancelled in {step}; {vm} keeps running on {host}")]
    Cancelled {
        vm: String,
        step: crate::migration::Step,
        host: String,
    },
    /// Refusals of the datastore and lifecycle checks that carry their own wording.
    #[error("{0}")]
    Other(String),
    #[error("{error}; {vm} was taken over by {target}")]
    FailedTakenOver {
        error: MigrationError,
        vm: String,
        target: String,
    },
}

/// Reply to [`Info`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub vmotion_addr: SocketAddr,
    pub uplink: Option<String>,
    pub capacity_mb: u64,
    /// Memory reserved: the VMs here and the arrivals admitted (`incoming_mb`).
    pub reserved_mb: u64,
    /// The part of `reserved_mb` held by VMs admitted but not running yet (being created
    /// or migrating in).
    #[serde(default)]
    pub incoming_mb: u64,
    #[serde(default)]
    pub mode: HostMode,
    pub vms: Vec<String>,
    /// Resident memory of the daemon process, KiB.
    pub rss_kib: u64,
    /// Frames the host has read from its uplink: only its VMs' MACs, broadcast and
    /// multicast pass the uplink's filter.
    #[serde(default)]
    pub uplink_frames_read: u64,
    /// Memory mapped and faulted in for coming migrations, MB.
    #[serde(default)]
    pub prepared_mb: u64,
    /// Incoming migrations admitted into memory prepared for them (failed ones too).
    #[serde(default)]
    pub arrivals_into_prepared_memory: u64,
}

/// One VM as the host sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub host: String,
    /// The mode of the host it runs on.
    #[serde(default)]
    pub host_mode: HostMode,
    pub state: String,
    pub vcpus: u8,
    pub memory_mb: u64,
    pub word_bits: u8,
    pub mac: MacAddr,
    pub ip: std::net::Ipv4Addr,
    pub workload: String,
    pub dirty_rate: u64,
    /// Memory plus overhead reserved on the host, MB.
    pub reserved_mb: u64,
    pub overhead_mb: u64,
    /// Whether this host holds the VM's disk lock.
    pub disk_owner: Option<String>,
    /// The guest UDP service's request counter, read from guest memory.
    pub udp_counter: u64,
    pub nic_rx: u64,
    pub nic_tx: u64,
    /// µs timestamps of the last incoming migration, if the VM arrived by one.
    pub resumed_t_us: Option<u64>,
    pub first_announce_t_us: Option<u64>,
    pub announce: String,
    /// Why the VM is not running, and what the operator can do about it.
    #[serde(default)]
    pub problem: Option<String>,
}

/// Reply to [`VmDigest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryDigest {
    pub name: String,
    pub host: String,
    /// SHA-256 hash list of guest memory, hex: the figure a verified migration reports
    /// as `memory_sha256_source`/`_target`.
    pub memory_sha256: String,
}
