//! The VM object (guest layer): memory, device state and the vCPU threads' lifecycle.
//!
//! `start` spawns one thread per vCPU from the saved registers; `quiesce` raises the stop
//! flag, wakes and joins them and returns the device state. Threads hold a clone of the
//! memory `Arc` only while they run, so once a quiesced VM is dropped its memory is
//! freed. Dropping a running VM quiesces it first.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use super::workload::{self, VcpuRegs};
use super::{DeviceState, GuestError, VcpuState, VmConfig};
use crate::memory::GuestMemory;
use crate::wire::MacAddr;

struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    since: Instant,
}

/// An emulated VM. Shared as `Arc<Vm>`: the host's inventory, its NIC and the migration
/// engine all hold it.
pub struct Vm {
    config: VmConfig,
    memory: Arc<GuestMemory>,
    mac: MacAddr,
    ip: Ipv4Addr,
    regs: Arc<[VcpuRegs]>,
    /// Share of the vCPUs' time taken away (auto-converge), percent.
    throttle: Arc<AtomicU8>,
    running: AtomicBool,
    starts: AtomicU64,
    run_us: AtomicU64,
    run: Mutex<Option<Running>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.config.name)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// A new VM with zeroed memory, not started.
    pub fn create(config: VmConfig) -> Result<Arc<Vm>, GuestError> {
        config.validate()?;
        let memory = Arc::new(GuestMemory::new(config.memory_bytes()).map_err(GuestError::Memory)?);
        let state = DeviceState::initial(&config);
        Ok(Vm::restore(config, memory, state))
    }

    /// A VM rebuilt from migrated memory and device state, not started. Its dirty
    /// bitmap is cleared: it logs writes made from here on. vCPU registers missing from
    /// `state` start fresh; extra ones are ignored.
    pub fn restore(config: VmConfig, memory: Arc<GuestMemory>, state: DeviceState) -> Arc<Vm> {
        memory.dirty().clear();
        let fresh = DeviceState::initial(&config);
        let regs: Arc<[VcpuRegs]> = (0..config.vcpus)
            .map(|i| {
                let r = VcpuRegs::default();
                let s = state
                    .vcpus
                    .iter()
                    .find(|v| v.index == i)
                    .unwrap_or(&fresh.vcpus[i as usize]);
                r.store(s);
                r
            })
            .collect();
        Arc::new(Vm {
            mac: state.mac,
            ip: state.ip,
            memory,
            regs,
            throttle: Arc::new(AtomicU8::new(0)),
            running: AtomicBool::new(false),
            starts: AtomicU64::new(state.starts),
            run_us: AtomicU64::new(state.run_us),
            run: Mutex::new(None),
            config,
        })
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    fn lock(&self) -> MutexGuard<'_, Option<Running>> {
        // A panicking vCPU join cannot leave the slot half-written: recover it.
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts (or continues) the vCPU threads from the saved registers. Not a reboot:
    /// memory and registers are kept. No-op when already running.
    pub fn start(&self) {
        let mut run = self.lock();
        if run.is_some() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..self.config.vcpus)
            .filter_map(|i| {
                let rate = workload::vcpu_rate(&self.config.workload, i, self.config.vcpus);
                if rate == 0 {
                    return None;
                }
                let mem = Arc::clone(&self.memory);
                let regs = Arc::clone(&self.regs);
                let stop = Arc::clone(&stop);
                let throttle = Arc::clone(&self.throttle);
                let pattern = self.config.workload.pattern.clone();
                std::thread::Builder::new()
                    .name(format!("vcpu{i}-{}", self.config.name))
                    .spawn(move || {
                        workload::run(&mem, &pattern, rate, &regs[i as usize], i, &stop, &throttle)
                    })
                    .map_err(|e| tracing::error!(vm = %self.config.name, vcpu = i, error = %e, "cannot spawn vCPU thread"))
                    .ok()
            })
            .collect();
        *run = Some(Running {
            stop,
            threads,
            since: Instant::now(),
        });
        self.starts.fetch_add(1, Ordering::Relaxed);
        self.running.store(true, Ordering::Release);
    }

    /// Stops and joins the vCPU threads; returns the device state. The VM no longer runs
    /// (`is_running` is false) but keeps its memory. No-op when already stopped.
    pub fn quiesce(&self) -> DeviceState {
        let mut run = self.lock();
        if let Some(r) = run.take() {
            self.running.store(false, Ordering::Release);
            r.stop.store(true, Ordering::Release);
            for t in &r.threads {
                t.thread().unpark();
            }
            for t in r.threads {
                if t.join().is_err() {
                    tracing::error!(vm = %self.config.name, "vCPU thread panicked");
                }
            }
            self.run_us
                .fetch_add(r.since.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        drop(run);
        self.device_state()
    }

    /// Throttles the vCPUs by `pct` percent of their time (capped at 99); 0 releases
    /// them. Takes effect within one batch, running or not.
    pub fn set_throttle(&self, pct: u8) {
        let pct = pct.min(workload::MAX_THROTTLE_PCT);
        if self.throttle.swap(pct, Ordering::Relaxed) != pct {
            if let Some(r) = self.lock().as_ref() {
                for t in &r.threads {
                    t.thread().unpark();
                }
            }
        }
    }

    /// The current vCPU throttle, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }

    /// True while the vCPUs run: the NIC answers only then.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// The device state: exact once quiesced, a live snapshot while running.
    pub fn device_state(&self) -> DeviceState {
        DeviceState {
            mac: self.mac,
            ip: self.ip,
            vcpus: self
                .regs
                .iter()
                .enumerate()
                .map(|(i, r)| r.load(i as u8))
                .collect::<Vec<VcpuState>>(),
            starts: self.starts.load(Ordering::Relaxed),
            run_us: self.run_us.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Joining the vCPU threads releases their clones of the memory.
        self.quiesce();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{check_sweep, Pattern, WorkloadConfig, SERVICE_PAGES};
    use std::time::Duration;

    fn config(pattern: Pattern, rate: u64, vcpus: u8) -> VmConfig {
        VmConfig {
            name: "t".into(),
            vcpus,
            memory_mb: 4,
            word_bits: 64,
            mac: "02:00:00:00:00:01".parse().unwrap(),
            ip: Ipv4Addr::new(10, 0, 0, 1),
            workload: WorkloadConfig {
                pattern,
                dirty_rate: rate,
            },
        }
    }

    #[test]
    fn quiesce_stops_writes_and_start_continues() {
        let vm = Vm::create(config(Pattern::Sweep, u64::MAX, 2)).unwrap();
        assert!(!vm.is_running());
        vm.start();
        assert!(vm.is_running());
        std::thread::sleep(Duration::from_millis(30));
        let s1 = vm.quiesce();
        assert!(!vm.is_running());
        assert!(s1.pages_written() > 0);
        assert_eq!(s1.vcpus[1].pages_written, 0, "sweep runs on vCPU 0 only");
        let h = vm.memory().digest();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(vm.memory().digest(), h, "no writes after quiesce");
        check_sweep(vm.memory()).unwrap();
        // Rebuild on "another host" from memory + state: the sweep continues its edge.
        let mem = Arc::clone(vm.memory());
        drop(vm);
        let vm2 = Vm::restore(config(Pattern::Sweep, u64::MAX, 2), mem, s1.clone());
        vm2.start();
        std::thread::sleep(Duration::from_millis(30));
        let s2 = vm2.quiesce();
        assert!(s2.pages_written() > s1.pages_written());
        assert_eq!(s2.starts, 2);
        check_sweep(vm2.memory()).unwrap();
    }

    #[test]
    fn dropping_a_running_vm_frees_its_memory() {
        let vm = Vm::create(config(Pattern::Uniform, u64::MAX, 4)).unwrap();
        vm.start();
        let weak = Arc::downgrade(vm.memory());
        std::thread::sleep(Duration::from_millis(10));
        drop(vm);
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn idle_vm_writes_nothing() {
        let vm = Vm::create(config(Pattern::Idle, 1000, 1)).unwrap();
        vm.start();
        std::thread::sleep(Duration::from_millis(20));
        let s = vm.quiesce();
        assert_eq!(s.pages_written(), 0);
        assert_eq!(vm.memory().dirty().count(), 0);
        assert_eq!(s.vcpus[0].sweep_cursor, SERVICE_PAGES);
    }
}
