//! Pre-copy convergence policy (a pure core): after each round, stop or go on?
//!
//! The decision is a function of measured figures only, so it is tested without a VM or
//! a socket. Rules, in order:
//!
//! 1. **Converged**: the dirty set would be sent within the downtime target at the
//!    measured bandwidth (`dirty × page size ÷ bandwidth ≤ target`), as QEMU decides.
//! 2. **Round limit**: `max_rounds` rounds were sent (Xen stopped after 30).
//! 3. **Byte limit**: more than `max_bytes_factor ×` memory went out (Xen: 3×).
//! 4. **Not shrinking**: the round did not shrink the dirty set (the VM dirties memory
//!    at least as fast as the link drains it); another round cannot help.
//!
//! Otherwise another round is sent. Rules 2-4 end pre-copy without convergence; the
//! engine then stops the VM anyway or aborts, as configured.

use std::time::Duration;

use crate::memory::PAGE_SIZE;

/// Limits of the policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub downtime_target: Duration,
    pub max_rounds: u32,
    pub max_bytes_factor: f64,
}

/// What was measured at the end of a pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// Rounds completed so far (1 after the first).
    pub round: u32,
    /// Pages sent in the round just completed (the dirty set it started from).
    pub sent_pages: u64,
    /// Pages dirtied since that round's dirty set was taken.
    pub dirty_pages: u64,
    /// Measured link bandwidth, bytes per second.
    pub bandwidth_bps: f64,
    /// Bytes sent by every round so far.
    pub bytes_sent: u64,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
}

impl Figures {
    /// Time to send the current dirty set at the measured bandwidth.
    pub fn estimated_downtime(&self) -> Duration {
        if self.dirty_pages == 0 {
            return Duration::ZERO;
        }
        if self.bandwidth_bps <= 0.0 || !self.bandwidth_bps.is_finite() {
            return Duration::MAX;
        }
        let secs = (self.dirty_pages * PAGE_SIZE as u64) as f64 / self.bandwidth_bps;
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

/// Why pre-copy ended without converging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Reason {
    RoundLimit,
    ByteLimit,
    NotShrinking,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::RoundLimit => "round limit reached",
            Reason::ByteLimit => "byte limit reached",
            Reason::NotShrinking => "dirty set no longer shrinks",
        })
    }
}

/// The policy's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send another round.
    Continue,
    /// The remaining dirty set fits the downtime target: stop the VM now.
    Converged,
    /// Pre-copy cannot converge.
    NoConvergence(Reason),
}

/// The decision after a round.
pub fn decide(f: &Figures, l: &Limits) -> Decision {
    if f.estimated_downtime() <= l.downtime_target {
        return Decision::Converged;
    }
    if f.round >= l.max_rounds {
        return Decision::NoConvergence(Reason::RoundLimit);
    }
    if f.bytes_sent as f64 > l.max_bytes_factor * f.memory_bytes as f64 {
        return Decision::NoConvergence(Reason::ByteLimit);
    }
    if f.dirty_pages >= f.sent_pages {
        return Decision::NoConvergence(Reason::NotShrinking);
    }
    Decision::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn limits() -> Limits {
        Limits {
            downtime_target: Duration::from_millis(30),
            max_rounds: 30,
            max_bytes_factor: 3.0,
        }
    }

    fn figures() -> Figures {
        Figures {
            round: 1,
            sent_pages: 262_144,
            dirty_pages: 10_000,
            bandwidth_bps: 1e9,
            bytes_sent: GIB,
            memory_bytes: GIB,
        }
    }

    #[test]
    fn estimate_is_dirty_bytes_over_bandwidth() {
        let f = figures();
        // 10 000 pages × 4096 B ÷ 1 GB/s = 40.96 ms.
        assert_eq!(f.estimated_downtime().as_micros(), 40_960);
        let z = Figures {
            dirty_pages: 0,
            bandwidth_bps: 0.0,
            ..f
        };
        assert_eq!(z.estimated_downtime(), Duration::ZERO);
        let no_bw = Figures {
            bandwidth_bps: 0.0,
            ..f
        };
        assert_eq!(no_bw.estimated_downtime(), Duration::MAX);
    }

    #[test]
    fn converges_when_the_dirty_set_fits_the_target() {
        let f = Figures {
            dirty_pages: 7_000, // 28.7 ms at 1 GB/s
            ..figures()
        };
        assert_eq!(decide(&f, &limits()), Decision::Converged);
        // Converged wins even on the last allowed round or when not shrinking.
        let f = Figures {
            round: 30,
            sent_pages: 10,
            dirty_pages: 20,
            ..figures()
        };
        assert_eq!(decide(&f, &limits()), Decision::Converged);
        let f = Figures {
            dirty_pages: 0,
            ..figures()
        };
        assert_eq!(decide(&f, &limits()), Decision::Converged);
    }

    #[test]
    fn continues_while_shrinking_and_above_target() {
        assert_eq!(decide(&figures(), &limits()), Decision::Continue);
        let f = Figures {
            round: 29,
            sent_pages: 10_001,
            ..figures()
        };
        assert_eq!(decide(&f, &limits()), Decision::Continue);
    }

    #[test]
    fn stops_at_the_round_limit() {
        let f = Figures {
            round: 30,
            ..figures()
        };
        assert_eq!(
            decide(&f, &limits()),
            Decision::NoConvergence(Reason::RoundLimit)
        );
        let one = Limits {
            max_rounds: 1,
            ..limits()
        };
        assert_eq!(
            decide(&figures(), &one),
            Decision::NoConvergence(Reason::RoundLimit)
        );
    }

    #[test]
    fn stops_at_the_byte_limit() {
        let f = Figures {
            round: 5,
            bytes_sent: 3 * GIB + 1,
            ..figures()
        };
        assert_eq!(
            decide(&f, &limits()),
            Decision::NoConvergence(Reason::ByteLimit)
        );
    }

    #[test]
    fn stops_when_the_dirty_set_stops_shrinking() {
        // A VM dirtying faster than the link: the set is as large as what was sent.
        let f = Figures {
            round: 2,
            sent_pages: 10_000,
            dirty_pages: 10_000,
            ..figures()
        };
        assert_eq!(
            decide(&f, &limits()),
            Decision::NoConvergence(Reason::NotShrinking)
        );
        // A slow link makes the same dirty set unconvergeable at once.
        let f = Figures {
            bandwidth_bps: 1e6,
            sent_pages: 5_000,
            ..figures()
        };
        assert_eq!(
            decide(&f, &limits()),
            Decision::NoConvergence(Reason::NotShrinking)
        );
    }

    #[test]
    fn a_sequence_of_rounds_always_ends() {
        // Simulate a VM dirtying `rate` pages/s over a link of `bw` bytes/s: whatever
        // the figures, the policy ends within max_rounds.
        for (rate, bw) in [(0.0, 1e9), (1e3, 1e9), (1e5, 1e8), (1e7, 1e8), (2.5e5, 1e9)] {
            let mut sent = 262_144u64;
            let mut total = 0u64;
            let mut round = 0;
            let d = loop {
                round += 1;
                let secs = (sent * 4096) as f64 / bw;
                total += sent * 4096;
                let dirty = ((rate * secs) as u64).min(262_144);
                let f = Figures {
                    round,
                    sent_pages: sent,
                    dirty_pages: dirty,
                    bandwidth_bps: bw,
                    bytes_sent: total,
                    memory_bytes: GIB,
                };
                match decide(&f, &limits()) {
                    Decision::Continue => sent = dirty,
                    other => break other,
                }
            };
            assert!(round <= 30, "rate {rate} bw {bw}: {round} rounds");
            if rate * 4096.0 < bw / 2.0 {
                assert_eq!(d, Decision::Converged, "rate {rate} bw {bw}");
            }
        }
    }
}
