//! Pre-copy convergence policy (a pure core): after each round, stop, go on, or slow
//! the vCPUs down?
//!
//! The decision is a function of the round history only, so it is tested without a VM
//! or a socket. Rules, in order:
//!
//! 1. **Converged**: the dirty set would be sent within the downtime target at the
//!    measured bandwidth (`dirty × page size ÷ bandwidth ≤ target`), as QEMU decides.
//! 2. **Round limit**: `max_rounds` rounds were sent (Xen stopped after 30).
//! 3. **Byte limit**: more than `max_bytes_factor ×` memory went out (Xen: 3×).
//! 4. **Plateau**: over the last `K` rounds the dirty set shrank by less than a
//!    fraction `f` (default 10 % over 2 rounds): more rounds cannot pay back their time.
//! 5. **Not shrinking**: the round did not shrink the dirty set at all.
//!
//! **Auto-converge** (SDPS, QEMU's auto-converge): when a round's dirty set is more
//! than half of what it sent (QEMU's trigger), the dirty rate outruns the link, or rule
//! 4 or 5 would end pre-copy above the downtime target, the vCPUs are throttled
//! instead and another round is sent. The steps are computed, not fixed (see
//! [`next_throttle`]): QEMU's 20 % + 10 % per period needs up to eight periods, each a
//! full round over the link, to reach what a fast dirtier needs; the measured dirty rate
//! and bandwidth say in one step how much of the vCPUs' time the target leaves room for.
//!
//! **Stun guard**: pre-copy that ends without converging stops the VM anyway only when
//! the estimated downtime is within `max_downtime`; otherwise the migration aborts and
//! the VM keeps running on the source. Never a silent multi-second stun.

use std::time::Duration;

use super::NoConvergence;
use crate::memory::PAGE_SIZE;

/// The first throttle step (QEMU's `cpu-throttle-initial`).
pub const INITIAL_THROTTLE: u8 = 20;
/// The smallest raise of an active throttle (QEMU's `cpu-throttle-increment`).
pub const MIN_THROTTLE_STEP: u8 = 10;
/// The highest throttle: the vCPUs keep 1 % of their time (QEMU's `max-cpu-throttle`).
pub const MAX_THROTTLE: u8 = 99;

/// The plateau rule: stop when the dirty set shrank by less than `min_shrink` over the
/// last `rounds` rounds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plateau {
    pub rounds: u32,
    pub min_shrink: f64,
}

impl Default for Plateau {
    fn default() -> Self {
        Plateau {
            rounds: 2,
            min_shrink: 0.10,
        }
    }
}

/// Limits of the policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub downtime_target: Duration,
    pub max_rounds: u32,
    pub max_bytes_factor: f64,
    /// `None`: only rule 5 (the set no longer shrinks) detects a stall.
    pub plateau: Option<Plateau>,
    pub auto_converge: bool,
    /// The stun guard: the longest downtime a forced stop-and-copy may take.
    pub max_downtime: Duration,
    pub on_no_convergence: NoConvergence,
}

/// One completed pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Round {
    /// Pages sent (the dirty set the round started from).
    pub sent_pages: u64,
    /// Pages dirtied while it ran (the next round's set).
    pub dirty_pages: u64,
    /// How long it ran, seconds.
    pub secs: f64,
    /// The vCPU throttle while it ran, percent.
    pub throttle_pct: u8,
}

impl Round {
    /// Pages dirtied per second during the round (distinct pages).
    pub fn dirty_rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.dirty_pages as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// What was measured up to the end of the latest pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct History<'a> {
    /// Every round so far, oldest first.
    pub rounds: &'a [Round],
    /// Measured link bandwidth, bytes per second.
    pub bandwidth_bps: f64,
    /// Bytes sent by every round so far.
    pub bytes_sent: u64,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
}

/// Time to send `pages` at `bandwidth_bps`.
pub fn send_time(pages: u64, bandwidth_bps: f64) -> Duration {
    if pages == 0 {
        return Duration::ZERO;
    }
    if bandwidth_bps <= 0.0 || !bandwidth_bps.is_finite() {
        return Duration::MAX;
    }
    let secs = (pages * PAGE_SIZE as u64) as f64 / bandwidth_bps;
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

impl History<'_> {
    /// Time to send the current dirty set at the measured bandwidth.
    pub fn estimated_downtime(&self) -> Duration {
        send_time(self.dirty_pages(), self.bandwidth_bps)
    }

    /// The current dirty set.
    pub fn dirty_pages(&self) -> u64 {
        self.rounds.last().map_or(0, |r| r.dirty_pages)
    }

    /// The throttle of the latest round.
    pub fn throttle_pct(&self) -> u8 {
        self.rounds.last().map_or(0, |r| r.throttle_pct)
    }

    /// The link's rate in pages per second.
    pub fn link_pages_per_s(&self) -> f64 {
        self.bandwidth_bps / PAGE_SIZE as f64
    }

    /// The dirty set after round `n` (1-based); after round 0, the first round's set.
    fn set_after(&self, n: usize) -> Option<u64> {
        match n {
            0 => self.rounds.first().map(|r| r.sent_pages),
            n => self.rounds.get(n - 1).map(|r| r.dirty_pages),
        }
    }

    /// Rule 4: over the last `p.rounds` rounds the set shrank by less than `p.min_shrink`.
    pub fn on_plateau(&self, p: &Plateau) -> bool {
        let n = self.rounds.len();
        let k = p.rounds.max(1) as usize;
        if n < k {
            return false;
        }
        match (self.set_after(n - k), self.set_after(n)) {
            (Some(then), Some(now)) => now as f64 > (1.0 - p.min_shrink) * then as f64,
            _ => false,
        }
    }
}

/// Why pre-copy ended without converging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Reason {
    RoundLimit,
    ByteLimit,
    Plateau,
    NotShrinking,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::RoundLimit => "round limit reached",
            Reason::ByteLimit => "byte limit reached",
            Reason::Plateau => "dirty set on a plateau",
            Reason::NotShrinking => "dirty set no longer shrinks",
        })
    }
}

/// The policy's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send another round with the vCPUs throttled by this much (percent).
    Continue { throttle_pct: u8 },
    /// The remaining dirty set fits the downtime target: stop the VM now.
    Converged,
    /// Pre-copy cannot converge, but the estimated downtime is within the stun guard:
    /// stop the VM anyway (the caller warns first).
    ForceStop(Reason),
    /// Pre-copy cannot converge and the configuration says give up.
    Abort(Reason),
    /// Pre-copy cannot converge and stopping now would stun the VM for longer than
    /// `max_downtime`: give up, the VM keeps running on the source.
    StunGuard(Reason),
}

/// The decision after a round.
pub fn decide(h: &History<'_>, l: &Limits) -> Decision {
    let throttle_pct = h.throttle_pct();
    let Some(last) = h.rounds.last() else {
        return Decision::Continue { throttle_pct };
    };
    if h.estimated_downtime() <= l.downtime_target {
        return Decision::Converged;
    }
    let stall = if h.rounds.len() as u32 >= l.max_rounds {
        Some(Reason::RoundLimit)
    } else if h.bytes_sent as f64 > l.max_bytes_factor * h.memory_bytes as f64 {
        Some(Reason::ByteLimit)
    } else if last.dirty_pages >= last.sent_pages {
        Some(Reason::NotShrinking)
    } else if l.plateau.is_some_and(|p| h.on_plateau(&p)) {
        Some(Reason::Plateau)
    } else {
        None
    };
    let hard_limit = matches!(stall, Some(Reason::RoundLimit | Reason::ByteLimit));
    if l.auto_converge
        && throttle_pct < MAX_THROTTLE
        && !hard_limit
        && (stall.is_some() || outruns_link(last, h))
    {
        return Decision::Continue {
            throttle_pct: next_throttle(h, l),
        };
    }
    match stall {
        None => Decision::Continue { throttle_pct },
        Some(reason) if l.on_no_convergence == NoConvergence::Abort => Decision::Abort(reason),
        Some(reason) if h.estimated_downtime() > l.max_downtime => Decision::StunGuard(reason),
        Some(reason) => Decision::ForceStop(reason),
    }
}

/// The trigger of auto-converge besides a stall: the VM dirtied more than half of
/// what the round sent (QEMU's `throttle-trigger-threshold`, 50 %), or dirties pages
/// faster than the link carries them. Either way the next rounds would mostly resend
/// the same pages. (Distinct pages under-report a fast writer: a VM rewriting all of
/// its memory within one round shows a dirty rate of memory ÷ round time, however
/// fast it writes; the first test catches it.)
fn outruns_link(last: &Round, h: &History<'_>) -> bool {
    last.dirty_pages.saturating_mul(2) > last.sent_pages
        || last.dirty_rate() >= h.link_pages_per_s()
}

/// The throttle for the next round: enough for that round to leave a dirty set that
/// fits the downtime target, given the measured figures; at least [`INITIAL_THROTTLE`]
/// when starting and [`MIN_THROTTLE_STEP`] above the current one (a hot set rewritten in
/// place under-reports the write rate as distinct pages, so the computed figure can be
/// low: the minimum step guarantees progress); at most [`MAX_THROTTLE`]. It never falls
/// during a migration: lowering it would undo the progress it bought.
///
/// The next round sends the current set of `d` pages in `d ÷ link` seconds, during which
/// the vCPUs, at `(1 − t)` of their unthrottled rate `r₀`, dirty `r₀ (1 − t) d ÷ link`
/// pages. That must be at most `target × link` pages, so
/// `1 − t ≤ target × link² ÷ (r₀ d)`.
pub fn next_throttle(h: &History<'_>, l: &Limits) -> u8 {
    let current = h.throttle_pct().min(MAX_THROTTLE);
    let Some(last) = h.rounds.last() else {
        return current;
    };
    let link = h.link_pages_per_s();
    let kept = 1.0 - current as f64 / 100.0;
    let r0 = last.dirty_rate() / kept.max(0.01);
    let d = last.dirty_pages.max(1) as f64;
    let allowed = l.downtime_target.as_secs_f64() * link;
    let keep = if r0 > 0.0 {
        (allowed * link / (r0 * d)).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let needed = ((1.0 - keep) * 100.0).ceil() as u8;
    let floor = if current == 0 {
        INITIAL_THROTTLE
    } else {
        current.saturating_add(MIN_THROTTLE_STEP)
    };
    needed.max(floor).min(MAX_THROTTLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const PAGES: u64 = GIB / PAGE_SIZE as u64;

    fn limits() -> Limits {
        Limits {
            downtime_target: Duration::from_millis(30),
            max_rounds: 30,
            max_bytes_factor: 3.0,
            plateau: Some(Plateau::default()),
            auto_converge: false,
            max_downtime: Duration::from_secs(1),
            on_no_convergence: NoConvergence::ForceStop,
        }
    }

    fn round(sent: u64, dirty: u64, secs: f64, throttle_pct: u8) -> Round {
        Round {
            sent_pages: sent,
            dirty_pages: dirty,
            secs,
            throttle_pct,
        }
    }

    fn hist(rounds: &[Round]) -> History<'_> {
        History {
            rounds,
            bandwidth_bps: 1e9,
            bytes_sent: GIB,
            memory_bytes: GIB,
        }
    }

    #[test]
    fn estimate_is_dirty_bytes_over_bandwidth() {
        let r = [round(PAGES, 10_000, 1.0, 0)];
        // 10 000 pages × 4096 B ÷ 1 GB/s = 40.96 ms.
        assert_eq!(hist(&r).estimated_downtime().as_micros(), 40_960);
        let z = [round(PAGES, 0, 1.0, 0)];
        let h = History {
            bandwidth_bps: 0.0,
            ..hist(&z)
        };
        assert_eq!(h.estimated_downtime(), Duration::ZERO);
        let h = History {
            bandwidth_bps: 0.0,
            ..hist(&r)
        };
        assert_eq!(h.estimated_downtime(), Duration::MAX);
        assert_eq!(r[0].dirty_rate(), 10_000.0);
    }

    #[test]
    fn converges_when_the_dirty_set_fits_the_target() {
        let r = [round(PAGES, 7_000, 1.0, 0)]; // 28.7 ms at 1 GB/s
        assert_eq!(decide(&hist(&r), &limits()), Decision::Converged);
        // Converged wins even on the last allowed round or when not shrinking.
        let one = Limits {
            max_rounds: 1,
            ..limits()
        };
        assert_eq!(decide(&hist(&r), &one), Decision::Converged);
        let r = [round(10, 20, 1.0, 0)];
        assert_eq!(decide(&hist(&r), &limits()), Decision::Converged);
    }

    #[test]
    fn continues_while_shrinking_and_above_target() {
        let r = [round(PAGES, 20_000, 8.0, 0), round(20_000, 12_000, 0.1, 0)];
        assert_eq!(
            decide(&hist(&r), &limits()),
            Decision::Continue { throttle_pct: 0 }
        );
        // With auto-converge, a round that leaves more than half of what it sent dirty
        // (QEMU's trigger) throttles at once; one that leaves less does not.
        let ac = Limits {
            auto_converge: true,
            ..limits()
        };
        assert!(matches!(
            decide(&hist(&r), &ac),
            Decision::Continue { throttle_pct } if throttle_pct >= INITIAL_THROTTLE
        ));
        let r = [round(PAGES, 20_000, 8.0, 0), round(20_000, 9_000, 0.1, 0)];
        assert_eq!(
            decide(&hist(&r), &ac),
            Decision::Continue { throttle_pct: 0 }
        );
    }

    #[test]
    fn hard_limits_end_precopy() {
        let r = vec![round(20_000, 10_000, 0.1, 0); 30];
        assert_eq!(
            decide(&hist(&r), &limits()),
            Decision::ForceStop(Reason::RoundLimit)
        );
        // Auto-converge does not lift the hard limits.
        let ac = Limits {
            auto_converge: true,
            ..limits()
        };
        assert_eq!(
            decide(&hist(&r), &ac),
            Decision::ForceStop(Reason::RoundLimit)
        );
        let r = [round(PAGES, 20_000, 8.0, 0), round(20_000, 10_000, 0.1, 0)];
        let h = History {
            bytes_sent: 3 * GIB + 1,
            ..hist(&r)
        };
        assert_eq!(
            decide(&h, &limits()),
            Decision::ForceStop(Reason::ByteLimit)
        );
    }

    #[test]
    fn a_long_flat_tail_is_a_plateau() {
        // The figures of a hot set rewritten faster than a 1 Gbit/s link: each round
        // shrinks the set by 1-2 %.
        let r = [
            round(32_768, 1_664, 0.27, 0),
            round(1_664, 1_645, 0.014, 0),
            round(1_645, 1_638, 0.014, 0),
        ];
        let h = History {
            bandwidth_bps: 125e6,
            ..hist(&r)
        };
        // Today's rule alone lets this tail run on.
        let today = Limits {
            plateau: None,
            ..limits()
        };
        assert_eq!(decide(&h, &today), Decision::Continue { throttle_pct: 0 });
        // The plateau rule ends it at round 3: 1 638 > 90 % of 1 664.
        assert_eq!(decide(&h, &limits()), Decision::ForceStop(Reason::Plateau));
        // Two rounds are not a plateau yet: round 1 shrank memory 20-fold.
        let h2 = History {
            rounds: &r[..2],
            ..h
        };
        assert!(!h2.on_plateau(&Plateau::default()));
        assert_eq!(
            decide(&h2, &limits()),
            Decision::Continue { throttle_pct: 0 }
        );
        // A 15 % shrink over two rounds is progress.
        let r = [
            round(32_768, 2_000, 0.27, 0),
            round(2_000, 1_900, 0.016, 0),
            round(1_900, 1_690, 0.015, 0),
        ];
        let h = History {
            bandwidth_bps: 125e6,
            ..hist(&r)
        };
        assert!(!h.on_plateau(&Plateau::default()));
        // A set that grows back is caught at once, plateau or not.
        let r = [round(PAGES, 20_000, 8.0, 0), round(20_000, 20_000, 0.1, 0)];
        assert_eq!(
            decide(&hist(&r), &today),
            Decision::ForceStop(Reason::NotShrinking)
        );
    }

    #[test]
    fn throttle_steps_are_computed_bounded_and_rising() {
        let ac = Limits {
            auto_converge: true,
            ..limits()
        };
        // A dirtier at 1 000 000 pages/s over a 1 GB/s link (244 140 pages/s): it
        // outruns the link in round 1 already, and needs nearly all of the vCPUs' time.
        let r = [round(PAGES, 262_144, 1.07, 0)];
        // keep = 7 324 × 244 141 ÷ (244 994 × 262 144) = 0.028 → 98 %.
        let d = decide(&hist(&r), &ac);
        assert_eq!(d, Decision::Continue { throttle_pct: 98 });
        // A milder one: 150 000 pages/s, 40 000 pages left after a slow round. It does
        // not outrun the link, and plateaus: the computed step is between the bounds.
        let r = [
            round(PAGES, 40_000, 0.27, 0),
            round(40_000, 39_000, 0.26, 0),
            round(39_000, 38_500, 0.26, 0),
        ];
        let h = History {
            bandwidth_bps: 0.6e9,
            ..hist(&r)
        };
        let t = next_throttle(&h, &ac);
        // link = 146 484 pages/s; r0 = 148 077/s; allowed = 4 395 pages;
        // keep = 4 395 × 146 484 ÷ (148 077 × 38 500) = 0.113 → 89 %.
        assert_eq!(t, 89);
        assert_eq!(decide(&h, &ac), Decision::Continue { throttle_pct: 89 });
        // The first step is at least the initial one; later ones rise by the minimum step
        // even when the figures ask for less, and stop at the maximum.
        // r = 140 000/s: keep = 7 324 × 244 141 ÷ (140 000 × 28 000) = 0.456 → 55 %.
        let mild = [round(29_000, 28_000, 0.2, 0)];
        assert_eq!(next_throttle(&hist(&mild), &ac), 55);
        // r = 2 800/s asks for nothing: the first step is still the initial one.
        let slow = [round(29_000, 28_000, 10.0, 0)];
        assert_eq!(next_throttle(&hist(&slow), &ac), INITIAL_THROTTLE);
        let calm = [round(30_000, 28_000, 10.0, 50)];
        let h = hist(&calm);
        assert_eq!(next_throttle(&h, &ac), 60);
        let top = [round(30_000, 28_000, 10.0, 95)];
        assert_eq!(next_throttle(&hist(&top), &ac), MAX_THROTTLE);
        // At the maximum, auto-converge has nothing left: the stall decides.
        let r = [
            round(PAGES, 40_000, 8.0, 0),
            round(40_000, 39_000, 0.26, 99),
            round(39_000, 38_900, 0.26, 99),
        ];
        assert_eq!(decide(&hist(&r), &ac), Decision::ForceStop(Reason::Plateau));
    }

    #[test]
    fn the_stun_guard_aborts_a_long_forced_stop() {
        // 10 000 pages still dirty at 12.5 MB/s: 3.3 s of downtime.
        let r = [round(PAGES, 10_000, 80.0, 0), round(10_000, 10_000, 3.3, 0)];
        let h = History {
            bandwidth_bps: 12.5e6,
            ..hist(&r)
        };
        assert_eq!(
            decide(&h, &limits()),
            Decision::StunGuard(Reason::NotShrinking)
        );
        // With auto-converge on, it throttles first...
        let ac = Limits {
            auto_converge: true,
            ..limits()
        };
        assert!(
            matches!(decide(&h, &ac), Decision::Continue { throttle_pct } if throttle_pct >= 20)
        );
        // ...and aborts only once the throttle is at its maximum.
        let r = [
            round(PAGES, 10_000, 80.0, 0),
            round(10_000, 10_000, 3.3, 99),
        ];
        let h = History { rounds: &r, ..h };
        assert_eq!(decide(&h, &ac), Decision::StunGuard(Reason::NotShrinking));
        // The configured abort is an abort whatever the estimate.
        let abort = Limits {
            on_no_convergence: NoConvergence::Abort,
            ..limits()
        };
        assert_eq!(decide(&h, &abort), Decision::Abort(Reason::NotShrinking));
    }

    #[test]
    fn the_stun_guard_lets_a_short_forced_stop_pass() {
        // 2 000 pages at 125 MB/s: 65.5 ms, over the 30 ms target, under the 1 s guard.
        let r = [round(PAGES, 2_000, 8.0, 0), round(2_000, 2_000, 0.07, 0)];
        let h = History {
            bandwidth_bps: 125e6,
            ..hist(&r)
        };
        assert_eq!(
            decide(&h, &limits()),
            Decision::ForceStop(Reason::NotShrinking)
        );
        // The same with a 50 ms guard is refused.
        let tight = Limits {
            max_downtime: Duration::from_millis(50),
            ..limits()
        };
        assert_eq!(
            decide(&h, &tight),
            Decision::StunGuard(Reason::NotShrinking)
        );
    }

    #[test]
    fn a_sequence_of_rounds_always_ends_and_throttling_converges() {
        // Simulate a VM dirtying `rate` distinct pages/s (at most all memory) over a link
        // of `bw` bytes/s: the policy ends within max_rounds; with auto-converge every
        // case converges, since the throttle reaches 99 %.
        for ac in [false, true] {
            let l = Limits {
                auto_converge: ac,
                ..limits()
            };
            for (rate, bw) in [(0.0, 1e9), (1e3, 1e9), (1e5, 1e8), (1e6, 1e8), (2.5e5, 1e9)] {
                let mut rounds = Vec::new();
                let mut sent = PAGES;
                let mut total = 0u64;
                let mut throttle = 0u8;
                let d = loop {
                    let secs = (sent * 4096) as f64 / bw;
                    total += sent * 4096;
                    let eff = rate * (1.0 - throttle as f64 / 100.0);
                    let dirty = ((eff * secs) as u64).min(PAGES);
                    rounds.push(round(sent, dirty, secs, throttle));
                    let h = History {
                        rounds: &rounds,
                        bandwidth_bps: bw,
                        bytes_sent: total,
                        memory_bytes: GIB,
                    };
                    match decide(&h, &l) {
                        Decision::Continue { throttle_pct } => {
                            assert!(throttle_pct >= throttle, "the throttle never falls");
                            throttle = throttle_pct;
                            sent = dirty;
                        }
                        other => break other,
                    }
                };
                assert!(
                    rounds.len() <= 30,
                    "rate {rate} bw {bw}: {} rounds",
                    rounds.len()
                );
                if ac || rate * 4096.0 < bw / 2.0 {
                    assert_eq!(d, Decision::Converged, "rate {rate} bw {bw} ac {ac}");
                }
            }
        }
    }
}
