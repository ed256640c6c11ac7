//! vCPU workloads (guest layer): what a vCPU thread writes into guest memory, and how
//! fast.
//!
//! Each vCPU runs [`run`] on its own thread until its stop flag is raised. The rate is
//! held against a clock, in batches: the vCPU writes as many pages as are due since it
//! started, then sleeps until the next one is due (or until it is woken to stop), so a
//! thousand pages a second costs a few hundred wake-ups, not a thousand sleeps. The
//! vCPU's registers (generator state, sweep cursor, counters) are published after each
//! batch, so a quiesced VM continues exactly where it stopped.
//!
//! The throttle (auto-converge, SDPS) takes a share of the vCPU's time away, as QEMU's
//! CPU throttle does: a vCPU throttled by `t` % runs `100 − t` % of the time. A paced
//! vCPU's clock then advances at that share of real time, so its rate falls by `t` %;
//! an unpaced one sleeps after each batch for `t ÷ (100 − t)` of the time the batch
//! took.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::{Pattern, VcpuState, WorkloadConfig, SERVICE_PAGES, SWEEP_OFFSET};
use crate::memory::{GuestAddress, GuestMemory, PAGE_SIZE};

/// Most pages written between two looks at the stop flag.
const MAX_BATCH: u64 = 1024;
/// Longest sleep between two looks at the clock when throttled.
const MAX_NAP: Duration = Duration::from_millis(10);

/// The registers of one vCPU, shared between its thread and the VM (which reads them
/// for `device_state` while running and after joining the thread).
#[derive(Debug, Default)]
pub struct VcpuRegs {
    rng: AtomicU64,
    sweep_cursor: AtomicU64,
    pages_written: AtomicU64,
}

impl VcpuRegs {
    pub fn load(&self, index: u8) -> VcpuState {
        VcpuState {
            index,
            rng: self.rng.load(Ordering::Acquire),
            sweep_cursor: self.sweep_cursor.load(Ordering::Acquire),
            pages_written: self.pages_written.load(Ordering::Acquire),
        }
    }

    pub fn store(&self, s: &VcpuState) {
        self.rng.store(s.rng, Ordering::Release);
        self.sweep_cursor.store(s.sweep_cursor, Ordering::Release);
        self.pages_written.store(s.pages_written, Ordering::Release);
    }
}

/// A non-zero xorshift seed for vCPU `index` of a VM whose name hashes to `seed`.
pub fn seed_rng(seed: u64, index: u8) -> u64 {
    let mut z = seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser: spreads nearby seeds apart.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if z == 0 {
        1
    } else {
        z
    }
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Pages per second that vCPU `index` of `vcpus` writes for `cfg`; `u64::MAX` means
/// unthrottled, 0 idle.
pub fn vcpu_rate(cfg: &WorkloadConfig, index: u8, vcpus: u8) -> u64 {
    if cfg.is_idle() {
        return 0;
    }
    if cfg.pattern == Pattern::Sweep {
        // One sweeper keeps memory with a single edge.
        return if index == 0 { cfg.dirty_rate } else { 0 };
    }
    if cfg.dirty_rate == u64::MAX {
        return u64::MAX;
    }
    let n = vcpus.max(1) as u64;
    cfg.dirty_rate / n + u64::from((index as u64) < cfg.dirty_rate % n)
}

/// One page write of `pattern`; advances the registers in `s`.
pub fn write_one(mem: &GuestMemory, pattern: &Pattern, s: &mut VcpuState) {
    let pages = mem.page_count();
    let span = pages.saturating_sub(SERVICE_PAGES).max(1);
    let page = match pattern {
        Pattern::Idle => return,
        Pattern::Uniform => SERVICE_PAGES + xorshift(&mut s.rng) % span,
        Pattern::HotSet { pages: hot } => {
            SERVICE_PAGES + xorshift(&mut s.rng) % (*hot).clamp(1, span)
        }
        Pattern::Sweep => {
            if s.sweep_cursor < SERVICE_PAGES || s.sweep_cursor >= pages {
                s.sweep_cursor = SERVICE_PAGES;
            }
            let page = s.sweep_cursor;
            // In range by the check above.
            let _ = mem.increment_byte(GuestAddress(page * PAGE_SIZE as u64 + SWEEP_OFFSET));
            s.sweep_cursor = if page + 1 >= pages {
                SERVICE_PAGES
            } else {
                page + 1
            };
            s.pages_written = s.pages_written.wrapping_add(1);
            return;
        }
    };
    let value = xorshift(&mut s.rng);
    let word = value % (PAGE_SIZE as u64 / 8);
    // page < page_count and word < 512: in range.
    let _ = mem.write_u64(GuestAddress(page * PAGE_SIZE as u64 + word * 8), value | 1);
    s.pages_written = s.pages_written.wrapping_add(1);
}

/// The highest throttle: a vCPU keeps at least 1 % of its time.
pub const MAX_THROTTLE_PCT: u8 = 99;

/// The body of one vCPU thread: writes `rate` pages a second of `pattern` until `stop`,
/// slowed by `throttle` percent. Returns after at most one batch once `stop` is raised;
/// wake it with `Thread::unpark`.
pub fn run(
    mem: &GuestMemory,
    pattern: &Pattern,
    rate: u64,
    regs: &VcpuRegs,
    index: u8,
    stop: &AtomicBool,
    throttle: &AtomicU8,
) {
    let mut s = regs.load(index);
    let mut last = Instant::now();
    // The vCPU's own clock: real time less the share the throttle took.
    let mut vcpu_ns = 0u128;
    let mut done = 0u64;
    while !stop.load(Ordering::Acquire) {
        if rate == 0 {
            std::thread::park_timeout(MAX_NAP * 10);
            continue;
        }
        let t = throttle.load(Ordering::Relaxed).min(MAX_THROTTLE_PCT) as u128;
        let now = Instant::now();
        vcpu_ns += now.duration_since(last).as_nanos() * (100 - t) / 100;
        last = now;
        let batch = if rate == u64::MAX {
            MAX_BATCH
        } else {
            let due = (rate as u128 * vcpu_ns / 1_000_000_000).min(u64::MAX as u128) as u64;
            let n = due.saturating_sub(done).min(MAX_BATCH);
            if n == 0 {
                // Sleep until the next page is due on the vCPU's clock.
                let next_ns = ((done + 1) as u128 * 1_000_000_000).div_ceil(rate as u128);
                let wait = next_ns.saturating_sub(vcpu_ns) * 100 / (100 - t);
                let wait = Duration::from_nanos(wait.min(u64::MAX as u128) as u64);
                std::thread::park_timeout(wait.clamp(Duration::from_micros(50), MAX_NAP));
                continue;
            }
            n
        };
        for _ in 0..batch {
            write_one(mem, pattern, &mut s);
        }
        done += batch;
        regs.store(&s);
        if rate == u64::MAX && t > 0 {
            // Unpaced: give the throttle its share of the time the batch took.
            let busy = last.elapsed();
            let nap = busy.mul_f64(t as f64 / (100 - t) as f64);
            let until = Instant::now() + nap;
            while !stop.load(Ordering::Acquire) {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
            }
        }
    }
    regs.store(&s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_split_over_vcpus() {
        let w = |pattern, dirty_rate| WorkloadConfig {
            pattern,
            dirty_rate,
        };
        let u = w(Pattern::Uniform, 1001);
        assert_eq!(
            (0..4).map(|i| vcpu_rate(&u, i, 4)).collect::<Vec<_>>(),
            vec![251, 250, 250, 250]
        );
        assert_eq!(vcpu_rate(&w(Pattern::Uniform, u64::MAX), 3, 4), u64::MAX);
        assert_eq!(vcpu_rate(&w(Pattern::Sweep, 500), 0, 2), 500);
        assert_eq!(vcpu_rate(&w(Pattern::Sweep, 500), 1, 2), 0);
        assert_eq!(vcpu_rate(&w(Pattern::Idle, 500), 0, 1), 0);
        assert_eq!(vcpu_rate(&w(Pattern::Uniform, 0), 0, 1), 0);
    }

    #[test]
    fn writes_stay_out_of_service_pages_and_hot_set() {
        let mem = GuestMemory::new(64 * PAGE_SIZE as u64).unwrap();
        let mut s = VcpuState {
            index: 0,
            rng: seed_rng(42, 0),
            sweep_cursor: SERVICE_PAGES,
            pages_written: 0,
        };
        for _ in 0..2000 {
            write_one(&mem, &Pattern::HotSet { pages: 8 }, &mut s);
        }
        let dirty: Vec<u64> = crate::memory::set_pages(&mem.dirty().harvest()).collect();
        assert!(dirty
            .iter()
            .all(|&p| (SERVICE_PAGES..SERVICE_PAGES + 8).contains(&p)));
        assert_eq!(dirty.len(), 8);
        for _ in 0..5000 {
            write_one(&mem, &Pattern::Uniform, &mut s);
        }
        let dirty: Vec<u64> = crate::memory::set_pages(&mem.dirty().harvest()).collect();
        assert!(dirty.iter().all(|&p| p >= SERVICE_PAGES));
        assert_eq!(dirty.len() as u64, 64 - SERVICE_PAGES);
        assert_eq!(s.pages_written, 7000);
    }

    #[test]
    fn sweep_wraps_and_keeps_one_edge() {
        let mem = GuestMemory::new(32 * PAGE_SIZE as u64).unwrap();
        let mut s = VcpuState {
            index: 0,
            rng: 1,
            sweep_cursor: 0,
            pages_written: 0,
        };
        for i in 0..(16 * 300 + 5) {
            write_one(&mem, &Pattern::Sweep, &mut s);
            if i % 97 == 0 {
                assert_eq!(super::super::check_sweep(&mem), Ok(()));
            }
        }
        assert_eq!(s.sweep_cursor, SERVICE_PAGES + 5);
        assert_eq!(super::super::check_sweep(&mem), Ok(()));
        assert!(mem.dirty().count() <= 16);
        assert!(!mem.dirty().is_dirty(3));
    }

    #[test]
    fn throttled_run_holds_its_rate_and_stops() {
        let mem = GuestMemory::new(64 * PAGE_SIZE as u64).unwrap();
        let regs = VcpuRegs::default();
        regs.store(&VcpuState {
            index: 0,
            rng: 7,
            sweep_cursor: SERVICE_PAGES,
            pages_written: 0,
        });
        let stop = AtomicBool::new(false);
        let throttle = AtomicU8::new(0);
        std::thread::scope(|sc| {
            let h = sc.spawn(|| run(&mem, &Pattern::Uniform, 2000, &regs, 0, &stop, &throttle));
            std::thread::sleep(Duration::from_millis(250));
            stop.store(true, Ordering::Release);
            h.thread().unpark();
        });
        let n = regs.load(0).pages_written;
        assert!(
            (300..=600).contains(&n),
            "wrote {n} pages in 250 ms at 2000/s"
        );
    }

    /// Pages written in `ms` by one vCPU at `rate` throttled by `pct`.
    fn written(rate: u64, pct: u8, ms: u64) -> u64 {
        let mem = GuestMemory::new(64 * PAGE_SIZE as u64).unwrap();
        let regs = VcpuRegs::default();
        let stop = AtomicBool::new(false);
        let throttle = AtomicU8::new(pct);
        std::thread::scope(|sc| {
            let h = sc.spawn(|| run(&mem, &Pattern::Uniform, rate, &regs, 0, &stop, &throttle));
            std::thread::sleep(Duration::from_millis(ms));
            stop.store(true, Ordering::Release);
            h.thread().unpark();
        });
        regs.load(0).pages_written
    }

    #[test]
    fn the_throttle_takes_its_share_of_the_vcpu() {
        // Paced: 4000 pages/s at 75 % is 1000 pages/s.
        let n = written(4000, 75, 300);
        assert!((150..=450).contains(&n), "wrote {n} pages in 300 ms");
        // Unpaced: 90 % leaves about a tenth of the unthrottled pace. Both run side by
        // side, so the load of a shared machine weighs on both alike (loose bound).
        let (free, slowed) = std::thread::scope(|sc| {
            let free = sc.spawn(|| written(u64::MAX, 0, 300));
            let slowed = sc.spawn(|| written(u64::MAX, 90, 300));
            (free.join().unwrap(), slowed.join().unwrap())
        });
        assert!(
            slowed * 4 < free,
            "throttled {slowed} vs free {free} pages in 300 ms"
        );
    }
}
