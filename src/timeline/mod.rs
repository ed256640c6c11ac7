//! The timeline of one migration as a client saw it (a core: a value, no I/O).
//!
//! Ping probes with their round-trip times, the pre-copy rounds, the quiesce and the
//! resume, each announce frame and the switch's move of the VM's MAC, all on the
//! machine's one clock (µs since the epoch). Where the figures come from (the daemons'
//! logs today, an event stream tomorrow, a JSON file) is the caller's business: this
//! type knows nothing of it, and [`svg::render`] draws any value of it.

pub mod svg;

use serde::{Deserialize, Serialize};

/// Everything drawn in the picture of one migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// The VM that moved.
    pub vm: String,
    /// Source host.
    pub from: String,
    /// Target host.
    pub to: String,
    /// Seconds between probes, as asked of ping (the real spacing may be longer).
    pub interval_s: f64,
    /// Every probe, in sequence order.
    pub probes: Vec<Probe>,
    /// Pre-copy rounds, in order.
    pub rounds: Vec<Round>,
    /// The VM stopped on the source.
    pub quiesce_t_us: Option<u64>,
    /// The VM runs on the target.
    pub resume_t_us: Option<u64>,
    /// Announce frames the target sent for the VM after the resume.
    pub announces: Vec<AnnounceMark>,
    /// The switch moved the VM's MAC to the target's port.
    pub fdb_move: Option<FdbMove>,
}

/// One ping probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub seq: u64,
    /// When the probe left the client (for a lost probe, an estimate between its
    /// neighbours' send times).
    pub sent_t_us: u64,
    /// Round-trip time; `None`: no reply.
    pub rtt_us: Option<u64>,
}

/// One pre-copy round: the VM keeps running while the pages are copied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// 1-based.
    pub round: u32,
    pub start_t_us: u64,
    pub end_t_us: u64,
    /// Pages this round copied.
    pub pages_sent: u64,
    /// Pages the VM wrote meanwhile (what the next round, or the pull, must copy).
    pub pages_dirtied: u64,
}

/// One announce frame (RARP or gratuitous ARP) sent for the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnounceMark {
    pub t_us: u64,
    /// `rarp` or `garp`.
    pub kind: String,
}

/// The switch learned the VM's MAC on a new port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FdbMove {
    pub t_us: u64,
    pub from: String,
    pub to: String,
    /// Ethertype of the frame that moved it (rarp, arp, ipv4…).
    pub ethertype: String,
}

impl Timeline {
    /// Probes sent and lost.
    pub fn probe_counts(&self) -> (usize, usize) {
        let lost = self.probes.iter().filter(|p| p.rtt_us.is_none()).count();
        (self.probes.len(), lost)
    }

    /// The longest time between two consecutive replies, µs (replies arrive at send
    /// time + RTT).
    pub fn longest_gap_us(&self) -> Option<u64> {
        let mut arrivals: Vec<u64> = self
            .probes
            .iter()
            .filter_map(|p| p.rtt_us.map(|r| p.sent_t_us + r))
            .collect();
        arrivals.sort_unstable();
        arrivals.windows(2).map(|w| w[1] - w[0]).max()
    }

    /// Quiesce → resume, µs.
    pub fn downtime_us(&self) -> Option<u64> {
        self.resume_t_us?.checked_sub(self.quiesce_t_us?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_gap_and_downtime() {
        let p = |seq, sent_t_us, rtt_us| Probe {
            seq,
            sent_t_us,
            rtt_us,
        };
        let t = Timeline {
            probes: vec![
                p(1, 1_000, Some(100)),
                p(2, 11_000, None),
                p(3, 21_000, Some(300)),
            ],
            quiesce_t_us: Some(5_000),
            resume_t_us: Some(8_500),
            ..Timeline::default()
        };
        assert_eq!(t.probe_counts(), (3, 1));
        assert_eq!(t.longest_gap_us(), Some(21_300 - 1_100));
        assert_eq!(t.downtime_us(), Some(3_500));
        assert_eq!(Timeline::default().longest_gap_us(), None);
    }
}
