//! Live migration (migration layer): moves a running VM's memory and device state to
//! another host over one TCP stream, vMotion style.
//!
//! Phases: pre-check (hello, admission) → pre-copy rounds while the VM runs → quiesce
//! → the final dirty bitmap goes to the target → the target pulls those pages → device
//! state → the target resumes the VM. [`proto`] is the sans-IO wire codec, [`policy`]
//! the pure convergence decision, [`conn`] the framing adapter over the socket;
//! [`migrate_out`] and [`migrate_in`] drive the two ends.
//!
//! Failure rule: until the target reports the VM resumed, the source can take the VM
//! back. The disk lock arbitrates: the target takes it before resuming; the source
//! resumes after a failure only if it can retake it ([`SourceHooks::reclaim`]). So the
//! VM never runs on both hosts, and runs on one of them once the migration has ended.

pub mod announce;
pub mod conn;
pub mod policy;
pub mod proto;
pub mod records;
mod source;
mod target;
pub mod tls;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::guest::{Vm, VmConfig};
use crate::memory::hex;

pub use conn::ConnError;
pub use source::{migrate_out, migrate_out_cancellable};
pub use target::migrate_in;

/// Default TCP port of the migration stream (vMotion's).
pub const DEFAULT_PORT: u16 = 8000;
/// Xen's bound on pre-copy traffic: at most this many times memory is sent.
pub const MAX_BYTES_FACTOR: f64 = 3.0;

/// What to do when pre-copy does not converge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum NoConvergence {
    /// Stop the VM anyway and pull the rest (longer downtime).
    #[default]
    ForceStop,
    /// Give up; the VM keeps running on the source.
    Abort,
}

impl FromStr for NoConvergence {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "force-stop" | "force" => Ok(NoConvergence::ForceStop),
            "abort" => Ok(NoConvergence::Abort),
            _ => Err(format!("{s:?}: expected force-stop or abort")),
        }
    }
}

impl fmt::Display for NoConvergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoConvergence::ForceStop => "force-stop",
            NoConvergence::Abort => "abort",
        })
    }
}

/// Settings of one migration (both ends read `io_timeout` and `verify_memory`; the rest
/// is the source's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationConfig {
    /// Largest acceptable downtime: pre-copy stops once the dirty set can be sent
    /// within it at the measured bandwidth.
    pub downtime_target: Duration,
    /// Most pre-copy rounds.
    pub max_rounds: u32,
    pub on_no_convergence: NoConvergence,
    /// Longest wait for any read or write on the stream.
    pub io_timeout: Duration,
    /// Pre-copy bandwidth cap in bytes per second (QEMU's max-bandwidth); `None` =
    /// as fast as the link goes. The stop-and-copy pull is never capped.
    pub bandwidth_limit: Option<u64>,
    /// Compare the memory digest (`GuestMemory::digest`, a SHA-256 hash list) at quiesce
    /// on the source with the one at resume on the target. The source digests its
    /// frozen memory beside the pull; the target records each page's digest as it
    /// arrives and hashes that list once the VM runs, so neither adds to the downtime.
    /// The target's per-page hashing costs receive throughput (see the notes): both
    /// ends read this flag.
    pub verify_memory: bool,
    /// Stop pre-copy when the dirty set shrank by less than a fraction over the last
    /// rounds (`None`: only when it no longer shrinks at all).
    #[serde(default = "default_plateau")]
    pub plateau: Option<policy::Plateau>,
    /// Throttle the vCPUs when pre-copy cannot otherwise converge (SDPS, QEMU's
    /// auto-converge). The throttle is released at switch-over and on failure.
    #[serde(default = "default_true")]
    pub auto_converge: bool,
    /// The stun guard: pre-copy that ends without converging stops the VM only if the
    /// estimated downtime is within this; otherwise the migration aborts.
    #[serde(default = "default_max_downtime")]
    pub max_downtime: Duration,
    /// The target faults its fresh guest memory in on a thread of its own, ahead of the
    /// stream, instead of on the receive path.
    #[serde(default = "default_true")]
    pub prefault: bool,
}

fn default_plateau() -> Option<policy::Plateau> {
    Some(policy::Plateau::default())
}

fn default_true() -> bool {
    true
}

/// vMotion's switch-over goal.
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_secs(1);

fn default_max_downtime() -> Duration {
    DEFAULT_MAX_DOWNTIME
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            downtime_target: Duration::from_millis(30),
            max_rounds: 30,
            on_no_convergence: NoConvergence::ForceStop,
            io_timeout: Duration::from_secs(10),
            bandwidth_limit: None,
            verify_memory: true,
            plateau: default_plateau(),
            auto_converge: true,
            max_downtime: DEFAULT_MAX_DOWNTIME,
            prefault: true,
        }
    }
}

impl MigrationConfig {
    pub(crate) fn policy_limits(&self) -> policy::Limits {
        policy::Limits {
            downtime_target: self.downtime_target,
            max_rounds: self.max_rounds.max(1),
            max_bytes_factor: MAX_BYTES_FACTOR,
            plateau: self.plateau,
            auto_converge: self.auto_converge,
            max_downtime: self.max_downtime,
            on_no_convergence: self.on_no_convergence,
        }
    }
}

/// A wait the engine sits out at a phase boundary before it goes on (see
/// [`SourceHooks::at_phase`]).
pub type PhaseWait = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A [`PhaseWait`] that does not wait.
pub fn no_wait() -> PhaseWait {
    Box::pin(std::future::ready(()))
}

/// The operator's request to stop a running migration (`vfabric migrate cancel`, Ctrl-C).
/// The source honours it between page batches and rounds of pre-copy and in the
/// switch-over until the device state is sent: the point of no return, after which the
/// target may resume the VM at any moment. A cancelled migration ends like a failed one:
/// the VM runs on the source, its memory untouched. Cheap to clone; all clones share
/// the signal.
#[derive(Clone, Debug)]
pub struct Cancel(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Cancel {
    fn default() -> Self {
        Cancel(Arc::new(tokio::sync::watch::channel(false).0))
    }
}

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Signals the cancel (idempotent).
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once [`Cancel::cancel`] has been called.
    pub async fn cancelled(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// What the source host does at the switch-over points.
pub trait SourceHooks: Send {
    /// The migration is at `step`, and waits for the returned future before going on.
    /// Source points: `PreCopy` (the target accepted, before round 1), `Quiesce` (the
    /// VM just stopped, its disk still held), `Bitmap` (the disk released, before the
    /// bitmap goes out). The host daemon's test pause points use it to land a fault in
    /// a given phase; the default does not wait.
    fn at_phase(&mut self, _step: Step) -> PhaseWait {
        no_wait()
    }
    /// The VM is quiesced: stop its NIC and give up its disk lock.
    fn quiesced(&mut self, vm: &Arc<Vm>) -> Result<(), String>;
    /// The migration failed after quiesce: retake the disk lock. `false` means the VM
    /// must not run here: the target owns the disk (the VM lives there), or the lock
    /// cannot be taken at all (the VM stays stopped, memory kept).
    fn reclaim(&mut self, vm: &Arc<Vm>) -> bool;
}

/// What the target host does at admission and switch-over.
pub trait TargetHooks: Send {
    /// As [`SourceHooks::at_phase`]. Target points: `Pull` (the bitmap is in, before
    /// the first page request), `Resume` (the VM runs here and was announced, before
    /// the source is told).
    fn at_phase(&mut self, _step: Step) -> PhaseWait {
        no_wait()
    }
    /// Is there room, and is the name free? Runs before any page moves.
    fn admit(&mut self, cfg: &VmConfig) -> Result<(), String>;
    /// Take the disk lock; an error stops the resume and the source takes the VM back.
    fn before_resume(&mut self, vm: &Arc<Vm>) -> Result<(), String>;
    /// The VM runs here: add it to the inventory, announce its MAC.
    fn resumed(&mut self, vm: &Arc<Vm>);
    /// The source rejected this copy after the resume (its memory digest did not
    /// match): stop the VM and release its disk lock before returning, so the source
    /// can take the VM back.
    fn rolled_back(&mut self, vm: &Arc<Vm>) {
        vm.quiesce();
    }
}

/// The hooks of a migration with no host around it (benchmarks, experiments): any
/// valid configuration is admitted, there is no disk lock to hand over, and the
/// source always takes a VM back.
pub struct BareHooks;

impl SourceHooks for BareHooks {
    fn quiesced(&mut self, _: &Arc<Vm>) -> Result<(), String> {
        Ok(())
    }
    fn reclaim(&mut self, _: &Arc<Vm>) -> bool {
        true
    }
}

impl TargetHooks for BareHooks {
    fn admit(&mut self, cfg: &VmConfig) -> Result<(), String> {
        cfg.validate().map_err(|e| e.to_string())
    }
    fn before_resume(&mut self, _: &Arc<Vm>) -> Result<(), String> {
        Ok(())
    }
    fn resumed(&mut self, _: &Arc<Vm>) {}
}

/// Events of a running migration, for the caller (source side).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Progress {
    /// A pre-copy round ended: pages it sent, pages dirtied meanwhile, its throughput.
    Round {
        round: u32,
        pages_sent: u64,
        dirty_pages: u64,
        throughput_mbps: f64,
        /// The vCPU throttle during the round, percent.
        #[serde(default)]
        throttle_pct: u8,
        /// Distinct pages dirtied per second during the round.
        #[serde(default)]
        dirty_rate_pages_per_s: u64,
        /// Time to send the dirty set left by the round, at the measured bandwidth.
        #[serde(default)]
        expected_downtime_us: u64,
    },
    /// While a round runs, a few times a second: the fields of QEMU's `info migrate`.
    Tick(Tick),
    /// The throttle changes from the next round on.
    Throttle { round: u32, pct: u8 },
    /// Pre-copy ended without converging; the VM is about to stop for about
    /// `expected_downtime_us` anyway (within the stun guard).
    ForcedStop {
        reason: policy::Reason,
        expected_downtime_us: u64,
        dirty_pages: u64,
        dirty_rate_pages_per_s: u64,
        bandwidth_mbps: f64,
    },
    /// The VM stopped on the source with `dirty_pages` still to move.
    Quiesced { t_us: u64, dirty_pages: u64 },
    /// The bitmap of `bits` pages went to the target.
    Bitmap { bits: u64 },
    /// The target pulled `pages` pages.
    Pulled { pages: u64 },
    /// The VM runs on the target since `t_us` (the target's clock).
    Resumed { t_us: u64 },
}

/// Live figures of a running pre-copy round (QEMU `info migrate` plus an ETA).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Tick {
    pub round: u32,
    /// Bytes sent so far, every round.
    pub transferred_bytes: u64,
    /// Pages still to send: the rest of this round plus those dirtied meanwhile.
    pub remaining_pages: u64,
    /// Guest memory, bytes.
    pub total_bytes: u64,
    /// Distinct pages dirtied per second (this round so far).
    pub dirty_rate_pages_per_s: u64,
    /// Time to send what remains at the measured bandwidth.
    pub expected_downtime_us: u64,
    pub throttle_pct: u8,
    /// Pre-copy bandwidth so far, Mbit/s.
    pub bandwidth_mbps: f64,
    /// Time until this round and the next one's dirty set would be sent.
    pub eta_ms: u64,
}

/// Figures of one migration, from either end.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MigrationSummary {
    pub vm: String,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Pages sent by each pre-copy round (round 1 = every page).
    pub pages_sent_per_round: Vec<u64>,
    /// Bytes on the wire for each pre-copy round.
    pub bytes_per_round: Vec<u64>,
    /// Pages that travelled as a zero flag instead of 4 KiB (every round and the pull).
    pub zero_pages: u64,
    /// Pages set in the final bitmap (dirty at quiesce).
    pub bitmap_bits: u64,
    /// Pages the target pulled; equals `bitmap_bits` after a successful migration.
    pub pages_pulled: u64,
    /// Quiesce on the source to resume on the target.
    pub downtime_us: u64,
    /// Start of the pre-check to resume (target) or to the resume report (source).
    pub total_ms: u64,
    /// Bytes on the wire ÷ `total_ms`, in Mbit/s.
    pub throughput_mbps: f64,
    /// Pre-copy reached the downtime target (false: stopped by a limit).
    pub converged: bool,
    /// Memory digest at quiesce (`GuestMemory::digest`: SHA-256 over the SHA-256 of
    /// every page in page order), hex; empty when not verified.
    pub memory_sha256_source: String,
    /// Memory digest at resume on the target, from the page digests recorded as pages
    /// arrived; empty when not verified.
    pub memory_sha256_target: String,
    pub quiesce_t_us: u64,
    pub resume_t_us: u64,
    /// Bytes of the pull (stop-and-copy) phase.
    pub bytes_pulled: u64,
    /// Every byte of the stream in the main direction (source → target).
    pub bytes_total: u64,
    /// The vCPU throttle during each pre-copy round, percent (source only).
    #[serde(default)]
    pub throttle_pct_per_round: Vec<u8>,
    /// Distinct pages dirtied per second during each round (source only).
    #[serde(default)]
    pub dirty_rate_pages_per_s_per_round: Vec<u64>,
    /// Time to send the dirty set each round left, at the bandwidth measured by then
    /// (source only).
    #[serde(default)]
    pub expected_downtime_us_per_round: Vec<u64>,
    /// Why pre-copy ended without converging (none when it converged).
    #[serde(default)]
    pub stop_reason: Option<policy::Reason>,
    /// How the stream was protected (filled in by the host daemon).
    #[serde(default)]
    pub transport: String,
}

/// The phase in which a migration failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    PreCheck,
    PreCopy,
    Quiesce,
    Bitmap,
    Pull,
    DeviceState,
    Resume,
    /// After the resume: the target's memory digest against the source's.
    Verify,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::PreCheck => "pre-check",
            Step::PreCopy => "pre-copy",
            Step::Quiesce => "quiesce",
            Step::Bitmap => "bitmap",
            Step::Pull => "pull",
            Step::DeviceState => "device state",
            Step::Resume => "resume",
            Step::Verify => "verification",
        })
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("refused by the target: {0}")]
    Refused(String),
    #[error("the peer gave up: {0}")]
    PeerAborted(String),
    #[error("pre-copy did not converge: {0}")]
    NoConvergence(policy::Reason),
    #[error("stream: {0}")]
    Conn(#[from] ConnError),
    #[error("unexpected {0} message")]
    Unexpected(proto::Kind),
    #[error("bad VM configuration: {0}")]
    Config(String),
    #[error("bad device state: {0}")]
    State(String),
    #[error("{0}")]
    Hook(String),
    #[error("pull does not match the bitmap: {0}")]
    Pull(String),
    #[error("bad pages: {0}")]
    Pages(String),
    #[error("bad bitmap: {0}")]
    Bitmap(String),
    #[error(
        "stun guard: {reason}, and stopping now would stun the VM for about {} \
         (limit {}): {dirty_pages} pages dirty, dirty rate {dirty_rate_pages_per_s} pages/s, \
         bandwidth {bandwidth_mbps:.0} Mbit/s",
        human_us(*expected_downtime_us), human_us(*max_downtime_us)
    )]
    StunGuard {
        reason: policy::Reason,
        expected_downtime_us: u64,
        max_downtime_us: u64,
        dirty_pages: u64,
        dirty_rate_pages_per_s: u64,
        bandwidth_mbps: f64,
    },
    #[error("cannot allocate guest memory: {0}")]
    Memory(crate::memory::MemoryError),
    #[error("memory not verified: {0}")]
    Verify(String),
    #[error("cancelled by the operator")]
    Cancelled,
}

/// A failed migration: the step, the cause, and where the VM is now.
#[derive(Debug, thiserror::Error)]
#[error("migration failed in {step}: {kind}")]
pub struct MigrationError {
    pub step: Step,
    pub kind: ErrorKind,
    /// The VM runs on this host after the failure. Source: true unless the VM was not
    /// running before, or `reclaim` said the target owns it. Target: always false (the
    /// target keeps nothing).
    pub vm_running: bool,
}

/// A duration in µs for people: `0.42 ms`, `412 ms`, `10.4 s`.
pub fn human_us(us: u64) -> String {
    match us {
        u64::MAX => "forever".to_string(),
        0..10_000 => format!("{:.2} ms", us as f64 / 1e3),
        10_000..1_000_000 => format!("{} ms", (us + 500) / 1000),
        _ => format!("{:.1} s", us as f64 / 1e6),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A failed step of either driver: where, and what.
type Failure = (Step, ErrorKind);

/// Maps a stream error to a failure of `step`.
fn at(step: Step) -> impl Fn(ConnError) -> Failure {
    move |e| (step, ErrorKind::Conn(e))
}

/// The one answer to "expect this message": `pick` takes the message wanted (returning
/// the others back); a peer's abort becomes `PeerAborted`, anything else `Unexpected`.
fn expect<'m, T>(
    step: Step,
    msg: proto::Message<'m>,
    pick: impl FnOnce(proto::Message<'m>) -> Result<T, proto::Message<'m>>,
) -> Result<T, Failure> {
    pick(msg).map_err(|m| match m {
        proto::Message::Abort { reason } => (step, ErrorKind::PeerAborted(reason.into_owned())),
        m => (step, ErrorKind::Unexpected(m.kind())),
    })
}

/// What both ends count while pages flow, and how they make a summary of it.
#[derive(Debug, Default)]
struct Stats {
    vm: String,
    pages_per_round: Vec<u64>,
    bytes_per_round: Vec<u64>,
    throttle_pct_per_round: Vec<u8>,
    dirty_rate_per_round: Vec<u64>,
    expected_downtime_us_per_round: Vec<u64>,
    zero_pages: u64,
    stop_reason: Option<policy::Reason>,
}

/// The switch-over figures of a finished migration, from either end.
struct Ending {
    bitmap_bits: u64,
    pages_pulled: u64,
    bytes_pulled: u64,
    quiesce_t_us: u64,
    resume_t_us: u64,
    total: Duration,
    bytes_total: u64,
    converged: bool,
    sha_source: Option<[u8; 32]>,
    sha_target: Option<[u8; 32]>,
}

impl Stats {
    fn summary(&mut self, e: Ending) -> MigrationSummary {
        let s = MigrationSummary {
            vm: self.vm.clone(),
            rounds: self.pages_per_round.len() as u32,
            pages_sent_per_round: std::mem::take(&mut self.pages_per_round),
            bytes_per_round: std::mem::take(&mut self.bytes_per_round),
            zero_pages: self.zero_pages,
            bitmap_bits: e.bitmap_bits,
            pages_pulled: e.pages_pulled,
            downtime_us: e.resume_t_us.saturating_sub(e.quiesce_t_us),
            total_ms: e.total.as_millis() as u64,
            throughput_mbps: mbps(e.bytes_total, e.total),
            converged: e.converged,
            memory_sha256_source: e.sha_source.map(|h| hex(&h)).unwrap_or_default(),
            memory_sha256_target: e.sha_target.map(|h| hex(&h)).unwrap_or_default(),
            quiesce_t_us: e.quiesce_t_us,
            resume_t_us: e.resume_t_us,
            bytes_pulled: e.bytes_pulled,
            bytes_total: e.bytes_total,
            throttle_pct_per_round: std::mem::take(&mut self.throttle_pct_per_round),
            dirty_rate_pages_per_s_per_round: std::mem::take(&mut self.dirty_rate_per_round),
            expected_downtime_us_per_round: std::mem::take(
                &mut self.expected_downtime_us_per_round,
            ),
            stop_reason: self.stop_reason,
            transport: String::new(),
        };
        tracing::info!(
            t_us = crate::clock::unix_micros(),
            vm = %s.vm,
            phase = "done",
            rounds = s.rounds,
            downtime_us = s.downtime_us,
            total_ms = s.total_ms,
            throughput_mbps = s.throughput_mbps,
            bitmap_bits = s.bitmap_bits,
            pages_pulled = s.pages_pulled,
            converged = s.converged,
            "migration phase"
        );
        s
    }
}

/// Slowest hashing a wait for the peer's digest allows for (an unoptimised build on a
/// loaded machine); optimised builds hash 1-2 GB/s.
const HASH_ALLOWANCE_BYTES_PER_SEC: f64 = 20e6;

/// Extra time to wait for a peer that hashes `bytes`.
fn hash_allowance(bytes: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / HASH_ALLOWANCE_BYTES_PER_SEC)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        bytes as f64 * 8.0 / s / 1e6
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_their_step() {
        let e = MigrationError {
            step: Step::DeviceState,
            kind: ErrorKind::Refused("no room on silo105".into()),
            vm_running: true,
        };
        assert_eq!(
            e.to_string(),
            "migration failed in device state: refused by the target: no room on silo105"
        );
        assert_eq!(Step::PreCheck.to_string(), "pre-check");
        assert_eq!("abort".parse(), Ok(NoConvergence::Abort));
        assert!("maybe".parse::<NoConvergence>().is_err());
        let c = MigrationConfig::default();
        assert_eq!(c.downtime_target, Duration::from_millis(30));
        assert_eq!(c.max_rounds, 30);
    }
}
