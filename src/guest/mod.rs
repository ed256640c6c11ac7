//! The emulated VM (guest layer): configuration, device state, vCPU workloads and the
//! QEMU-style memory-integrity check.
//!
//! A VM is its memory ([`crate::memory::GuestMemory`]) plus a small device state (MAC,
//! IP, per-vCPU registers such as the sweep cursor and random-generator state). vCPU
//! threads write memory through `GuestMemory`, so every write marks its page dirty and
//! the migration engine sees it. Quiescing joins the vCPU threads; starting again
//! continues from the saved state, on this host or on another one.

pub mod nic;
pub mod vm;
pub mod workload;

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::memory::{GuestAddress, GuestMemory, MAX_MEMORY_BYTES, PAGE_SIZE};
use crate::wire::MacAddr;

pub use vm::Vm;

/// Pages `0..SERVICE_PAGES` belong to the guest's network service (its counter and
/// key-value store); workloads never write them.
pub const SERVICE_PAGES: u64 = 16;

/// Smallest guest accepted, in MB (MB here and in every flag: 2^20 bytes).
pub const MIN_MEMORY_MB: u64 = 4;
/// Largest guest accepted, in MB.
pub const MAX_MEMORY_MB: u64 = MAX_MEMORY_BYTES >> 20;
/// Longest VM name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Byte offset inside each page that the sweep workload increments.
pub const SWEEP_OFFSET: u64 = 0;

/// Errors of VM configuration and lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    #[error("invalid VM name {0:?}: use 1-{MAX_NAME_LEN} of A-Z a-z 0-9 . _ -, not starting with . or -")]
    BadName(String),
    #[error("invalid vCPU count {0}: must be 1, 2 or 4")]
    BadVcpus(u8),
    #[error("invalid memory size {0} MB: must be {MIN_MEMORY_MB} to {MAX_MEMORY_MB} MB")]
    BadMemory(u64),
    #[error("invalid guest word size {0} bits: must be 32 or 64")]
    BadWordBits(u8),
    #[error("invalid MAC {0}: must be unicast and non-zero")]
    BadMac(MacAddr),
    #[error("invalid IP {0}: must be a unicast host address")]
    BadIp(Ipv4Addr),
    #[error("invalid hot set of {pages} pages: must be 1 to {max}")]
    BadHotSet { pages: u64, max: u64 },
    #[error("invalid workload pattern {0:?}: expected idle, uniform, hot:N or sweep")]
    BadPattern(String),
    #[error("guest memory")]
    Memory(#[source] crate::memory::MemoryError),
}

/// What the vCPUs write while the VM runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Pattern {
    /// No writes (only the guest's network service touches memory).
    Idle,
    /// One 8-byte word at a random place of a random non-service page per write.
    Uniform,
    /// Like `Uniform`, restricted to the first `pages` non-service pages.
    HotSet { pages: u64 },
    /// QEMU's migration-test guest: increment one byte in every non-service page, in
    /// order, forever. Run by vCPU 0 alone so that memory always holds a single edge and
    /// [`check_sweep`] needs nothing but memory; other vCPUs stay idle.
    Sweep,
}

impl FromStr for Pattern {
    type Err = GuestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "idle" => Ok(Pattern::Idle),
            "uniform" => Ok(Pattern::Uniform),
            "sweep" => Ok(Pattern::Sweep),
            _ => match s.strip_prefix("hot:").map(str::parse::<u64>) {
                Some(Ok(pages)) => Ok(Pattern::HotSet { pages }),
                _ => Err(GuestError::BadPattern(s.to_string())),
            },
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Idle => f.write_str("idle"),
            Pattern::Uniform => f.write_str("uniform"),
            Pattern::HotSet { pages } => write!(f, "hot:{pages}"),
            Pattern::Sweep => f.write_str("sweep"),
        }
    }
}

/// The workload of a VM: a pattern and how many pages per second the whole VM writes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkloadConfig {
    pub pattern: Pattern,
    /// Pages written per second by the whole VM, split over its vCPUs;
    /// `u64::MAX` = as fast as the vCPU threads can go.
    pub dirty_rate: u64,
}

impl WorkloadConfig {
    /// No writes at all.
    pub const IDLE: WorkloadConfig = WorkloadConfig {
        pattern: Pattern::Idle,
        dirty_rate: 0,
    };

    /// True when the vCPUs never write memory.
    pub fn is_idle(&self) -> bool {
        self.pattern == Pattern::Idle || self.dirty_rate == 0
    }
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig::IDLE
    }
}

/// The configuration of one VM; sent to the target in the migration pre-check.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmConfig {
    pub name: String,
    /// 1, 2 or 4.
    pub vcpus: u8,
    pub memory_mb: u64,
    /// Guest word size, 32 or 64 (it changes the host's memory overhead).
    pub word_bits: u8,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub workload: WorkloadConfig,
}

impl VmConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), GuestError> {
        if !valid_name(&self.name) {
            return Err(GuestError::BadName(self.name.clone()));
        }
        if !matches!(self.vcpus, 1 | 2 | 4) {
            return Err(GuestError::BadVcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&self.memory_mb) {
            return Err(GuestError::BadMemory(self.memory_mb));
        }
        if !matches!(self.word_bits, 32 | 64) {
            return Err(GuestError::BadWordBits(self.word_bits));
        }
        if !self.mac.is_unicast() {
            return Err(GuestError::BadMac(self.mac));
        }
        let ip = self.ip;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return Err(GuestError::BadIp(ip));
        }
        if let Pattern::HotSet { pages } = self.workload.pattern {
            let max = self.page_count() - SERVICE_PAGES;
            if pages == 0 || pages > max {
                return Err(GuestError::BadHotSet { pages, max });
            }
        }
        Ok(())
    }

    /// Guest memory size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb.saturating_mul(1 << 20)
    }

    /// Guest memory size in pages.
    pub fn page_count(&self) -> u64 {
        self.memory_bytes() / PAGE_SIZE as u64
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The registers of one vCPU: enough to continue its workload where it stopped.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VcpuState {
    pub index: u8,
    /// State of the vCPU's xorshift generator (uniform and hot-set patterns).
    pub rng: u64,
    /// Next page the sweep pattern increments.
    pub sweep_cursor: u64,
    /// Pages written by this vCPU since the VM was created.
    pub pages_written: u64,
}

/// Everything of a VM beside its memory. Small: it travels after the pull, during the
/// downtime.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceState {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub vcpus: Vec<VcpuState>,
    /// Times the vCPUs were started (creation, resumes after failed migrations, and
    /// resumes on a target).
    pub starts: u64,
    /// Microseconds the vCPUs have run, summed over every start.
    pub run_us: u64,
}

impl DeviceState {
    /// The state of a VM that has never run.
    pub fn initial(config: &VmConfig) -> DeviceState {
        let seed = name_seed(&config.name);
        DeviceState {
            mac: config.mac,
            ip: config.ip,
            vcpus: (0..config.vcpus)
                .map(|i| VcpuState {
                    index: i,
                    rng: workload::seed_rng(seed, i),
                    sweep_cursor: SERVICE_PAGES,
                    pages_written: 0,
                })
                .collect(),
            starts: 0,
            run_us: 0,
        }
    }

    /// Total pages written by every vCPU.
    pub fn pages_written(&self) -> u64 {
        self.vcpus.iter().map(|v| v.pages_written).sum()
    }
}

fn name_seed(name: &str) -> u64 {
    // FNV-1a: a stable seed per VM name, so runs are reproducible.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Failures of [`check_sweep`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SweepError {
    #[error("page {page} holds {found}, expected {expected} or {expected}-1 (previous page holds {expected})")]
    Mismatch { page: u64, expected: u8, found: u8 },
    #[error("second sweep edge at page {second} (first at page {first})")]
    TwoEdges { first: u64, second: u64 },
    #[error("memory of {0} pages has no sweep area")]
    TooSmall(u64),
}

/// QEMU's migration-test check: walking the non-service pages in order, every page's
/// sweep byte equals its predecessor's, except at one edge (the sweep cursor) where it
/// is one less, modulo 256.
pub fn check_sweep(mem: &GuestMemory) -> Result<(), SweepError> {
    let pages = mem.page_count();
    if pages <= SERVICE_PAGES {
        return Err(SweepError::TooSmall(pages));
    }
    let byte = |p: u64| {
        let mut b = [0u8; 1];
        // p < page_count, so the read is in range.
        let _ = mem.read(GuestAddress(p * PAGE_SIZE as u64 + SWEEP_OFFSET), &mut b);
        b[0]
    };
    let mut prev = byte(SERVICE_PAGES);
    let mut edge: Option<u64> = None;
    for p in SERVICE_PAGES + 1..pages {
        let b = byte(p);
        if b == prev {
            continue;
        }
        if b == prev.wrapping_sub(1) {
            if let Some(first) = edge {
                return Err(SweepError::TwoEdges { first, second: p });
            }
            edge = Some(p);
        } else {
            return Err(SweepError::Mismatch {
                page: p,
                expected: prev,
                found: b,
            });
        }
        prev = b;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn config(name: &str, memory_mb: u64) -> VmConfig {
        VmConfig {
            name: name.into(),
            vcpus: 1,
            memory_mb,
            word_bits: 64,
            mac: "02:00:00:00:01:01".parse().unwrap(),
            ip: Ipv4Addr::new(10, 10, 0, 100),
            workload: WorkloadConfig::IDLE,
        }
    }

    #[test]
    fn validation_names_the_bad_field() {
        let good = config("vm1", 16);
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(good.memory_bytes(), 16 << 20);
        let bad = |f: &dyn Fn(&mut VmConfig)| {
            let mut c = good.clone();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(matches!(bad(&|c| c.name.clear()), GuestError::BadName(_)));
        assert!(matches!(
            bad(&|c| c.name = "a/b".into()),
            GuestError::BadName(_)
        ));
        assert!(matches!(
            bad(&|c| c.name = "-x".into()),
            GuestError::BadName(_)
        ));
        assert!(matches!(
            bad(&|c| c.name = "x".repeat(65)),
            GuestError::BadName(_)
        ));
        assert_eq!(bad(&|c| c.vcpus = 3), GuestError::BadVcpus(3));
        assert_eq!(bad(&|c| c.vcpus = 0), GuestError::BadVcpus(0));
        assert_eq!(bad(&|c| c.memory_mb = 3), GuestError::BadMemory(3));
        // The message speaks as the flag does: MB, and a range in words.
        assert_eq!(
            GuestError::BadMemory(0).to_string(),
            format!("invalid memory size 0 MB: must be 4 to {MAX_MEMORY_MB} MB")
        );
        assert_eq!(
            bad(&|c| c.memory_mb = 1 << 20),
            GuestError::BadMemory(1 << 20)
        );
        assert_eq!(bad(&|c| c.word_bits = 16), GuestError::BadWordBits(16));
        assert!(matches!(
            bad(&|c| c.mac = MacAddr::BROADCAST),
            GuestError::BadMac(_)
        ));
        assert!(matches!(
            bad(&|c| c.mac = MacAddr::ZERO),
            GuestError::BadMac(_)
        ));
        assert!(matches!(
            bad(&|c| c.ip = Ipv4Addr::UNSPECIFIED),
            GuestError::BadIp(_)
        ));
        assert!(matches!(
            bad(&|c| c.workload.pattern = Pattern::HotSet { pages: 0 }),
            GuestError::BadHotSet { .. }
        ));
        assert!(matches!(
            bad(&|c| c.workload.pattern = Pattern::HotSet { pages: 4096 }),
            GuestError::BadHotSet { .. }
        ));
        for v in [1, 2, 4] {
            let mut c = good.clone();
            c.vcpus = v;
            c.word_bits = 32;
            c.name = "web-01.prod_a".into();
            assert_eq!(c.validate(), Ok(()));
        }
    }

    #[test]
    fn pattern_text_round_trips() {
        for p in [
            Pattern::Idle,
            Pattern::Uniform,
            Pattern::Sweep,
            Pattern::HotSet { pages: 64 },
        ] {
            assert_eq!(p.to_string().parse::<Pattern>().unwrap(), p);
        }
        assert!("hot:".parse::<Pattern>().is_err());
        assert!("hot:x".parse::<Pattern>().is_err());
        assert!("busy".parse::<Pattern>().is_err());
    }

    #[test]
    fn sweep_check_accepts_one_edge_and_wraps() {
        let m = GuestMemory::new(64 * PAGE_SIZE as u64).unwrap();
        assert_eq!(check_sweep(&m), Ok(()));
        let set = |p: u64, v: u8| {
            m.write(GuestAddress(p * PAGE_SIZE as u64 + SWEEP_OFFSET), &[v])
                .unwrap()
        };
        // Cursor at page 30: pages before it are one ahead, including a wrap 255 -> 0.
        for p in SERVICE_PAGES..64 {
            set(p, if p < 30 { 0 } else { 255 });
        }
        assert_eq!(check_sweep(&m), Ok(()));
        set(40, 7);
        assert!(matches!(
            check_sweep(&m),
            Err(SweepError::Mismatch { page: 40, .. })
        ));
        set(40, 255);
        set(50, 254);
        assert_eq!(
            check_sweep(&m),
            Err(SweepError::TwoEdges {
                first: 30,
                second: 50
            })
        );
        // Service pages do not take part.
        set(50, 255);
        set(3, 99);
        assert_eq!(check_sweep(&m), Ok(()));
    }
}
