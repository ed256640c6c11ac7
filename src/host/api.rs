//! Control-plane messages of the hypervisor daemon (`vfabric host`), shared by the daemon
//! and the CLI. One request per connection; see [`crate::control`] for the framing.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::guest::VmConfig;
use crate::migration::MigrationSummary;
use crate::wire::MacAddr;

/// A request to a host daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostRequest {
    /// The host's identity and capacity.
    Info,
    /// Create and start a VM.
    VmCreate { config: VmConfig },
    /// Every VM on this host.
    VmList,
    /// One VM.
    VmShow { name: String },
    /// The digest of one VM's memory as it is now.
    VmDigest { name: String },
    /// Stop a VM, release its disk and free its memory.
    VmDestroy { name: String },
    /// Start a VM that is stopped here because its disk lock could not be retaken: take
    /// the lock, then resume (and announce) it. Replies [`VmInfo`].
    VmStart { name: String },
    /// Live-migrate a VM from this host to the host listening at `target_addr`.
    Migrate {
        name: String,
        target: String,
        target_addr: SocketAddr,
        #[serde(default)]
        options: MigrateOptions,
    },
    /// Cancel the outgoing migration of `name`. Replies [`VmInfo`] once the VM runs on
    /// this host again; an error if it is not migrating, or if the switch-over had passed
    /// the point of no return (the VM then runs on the target).
    MigrateCancel { name: String },
    /// Announce mode for the next incoming migration of `name` (this host is the
    /// target); None forgets an earlier choice.
    PrepareIncoming {
        name: String,
        announce: Option<String>,
    },
}

/// Per-migration overrides of the host's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrateOptions {
    pub downtime_ms: Option<u64>,
    pub max_rounds: Option<u32>,
    pub on_no_convergence: Option<String>,
    pub bandwidth_mbps: Option<u64>,
    /// vMotion encryption of this migration (default: the source host's setting).
    #[serde(default)]
    pub encryption: Option<crate::migration::tls::Encryption>,
}

/// Reply to [`HostRequest::Info`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub vmotion_addr: SocketAddr,
    pub uplink: Option<String>,
    pub capacity_mb: u64,
    pub reserved_mb: u64,
    pub vms: Vec<String>,
    /// Resident memory of the daemon process, KiB.
    pub rss_kib: u64,
}

/// One VM as the host sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub host: String,
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

/// Reply to [`HostRequest::VmDigest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryDigest {
    pub name: String,
    pub host: String,
    /// SHA-256 hash list of guest memory, hex: the figure a verified migration reports
    /// as `memory_sha256_source`/`_target`.
    pub memory_sha256: String,
}

/// Final reply to [`HostRequest::Migrate`].
pub type MigrateReply = MigrationSummary;
