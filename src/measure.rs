//! Loss-window arithmetic (a core: text in, figures out, no I/O).
//!
//! Two sources are read: the output of the system's `ping -D -O` run from the client
//! namespace, and the daemons' events ([`crate::events`]; each carries `t_us`,
//! microseconds since the epoch on the machine's one clock, taken where it happened).
//! From them comes a [`Timeline`] and the figures a user wants after a migration:
//! probes lost, the longest gap between replies, and the chain quiesce → resume →
//! first announce → switch moves the MAC.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::{Event, Record};
use crate::migration::announce::Announce;
use crate::timeline as picture;
use crate::wire::MacAddr;

/// One line of `ping -D -O` output that matters.
#[derive(Debug, Clone, PartialEq)]
pub enum PingLine {
    /// A reply arrived at `t_us` for probe `seq`.
    Reply { seq: u64, t_us: u64, rtt_ms: f64 },
    /// Probe `seq` had no answer when the next one was sent.
    NoAnswer { seq: u64, t_us: u64 },
    /// The closing statistics: probes transmitted and received.
    Totals { transmitted: u64, received: u64 },
}

/// Parses one line of iputils `ping -D -O` output.
pub fn parse_ping_line(line: &str) -> Option<PingLine> {
    let line = line.trim();
    if let Some(rest) = line
        .strip_suffix("% packet loss")
        .or_else(|| line.contains(" packets transmitted, ").then_some(line))
    {
        let mut it = rest.split(',');
        let transmitted = it.next()?.split_whitespace().next()?.parse().ok()?;
        let received = it.next()?.split_whitespace().next()?.parse().ok()?;
        return Some(PingLine::Totals {
            transmitted,
            received,
        });
    }
    let rest = line.strip_prefix('[')?;
    let (ts, rest) = rest.split_once(']')?;
    let t_us = parse_epoch_us(ts)?;
    let seq = field(rest, "icmp_seq=")?.parse().ok()?;
    if rest.contains("no answer yet") {
        return Some(PingLine::NoAnswer { seq, t_us });
    }
    if rest.contains("bytes from") {
        let rtt_ms = field(rest, "time=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        return Some(PingLine::Reply { seq, t_us, rtt_ms });
    }
    None
}

fn field<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    let start = s.find(key)? + key.len();
    let v = &s[start..];
    v.split(|c: char| c.is_whitespace() || c == ',').next()
}

/// "1732590000.123456" → µs.
fn parse_epoch_us(s: &str) -> Option<u64> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, "0"));
    let secs: u64 = secs.parse().ok()?;
    let mut frac = frac.to_string();
    frac.truncate(6);
    while frac.len() < 6 {
        frac.push('0');
    }
    let us: u64 = frac.parse().ok()?;
    Some(secs * 1_000_000 + us)
}

/// What a ping run shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PingStats {
    pub pings_sent: u64,
    pub pings_received: u64,
    pub pings_lost: u64,
    /// The longest time between two consecutive replies, ms.
    pub longest_gap_ms: f64,
    /// Receive time of the reply that ended the longest gap (µs since the epoch).
    pub gap_end_t_us: u64,
    /// Receive time of the reply that started it.
    pub gap_start_t_us: u64,
    /// Sequence numbers of the probes that had no reply.
    pub lost_seqs: Vec<u64>,
}

/// Folds parsed ping lines into statistics.
pub fn ping_stats(lines: &[PingLine]) -> PingStats {
    let mut replies: BTreeMap<u64, u64> = BTreeMap::new();
    let mut max_seq = 0;
    let mut totals = None;
    for l in lines {
        match *l {
            PingLine::Reply { seq, t_us, .. } => {
                replies.entry(seq).or_insert(t_us);
                max_seq = max_seq.max(seq);
            }
            PingLine::NoAnswer { seq, .. } => max_seq = max_seq.max(seq),
            PingLine::Totals {
                transmitted,
                received,
            } => totals = Some((transmitted, received)),
        }
    }
    let (sent, received) = totals.unwrap_or((max_seq, replies.len() as u64));
    let mut times: Vec<u64> = replies.values().copied().collect();
    times.sort_unstable();
    let mut s = PingStats {
        pings_sent: sent,
        pings_received: received,
        pings_lost: sent.saturating_sub(received),
        lost_seqs: (1..=sent).filter(|q| !replies.contains_key(q)).collect(),
        ..PingStats::default()
    };
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        if gap as f64 / 1000.0 > s.longest_gap_ms {
            s.longest_gap_ms = gap as f64 / 1000.0;
            s.gap_start_t_us = w[0];
            s.gap_end_t_us = w[1];
        }
    }
    s
}

/// The chain of events around one migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub quiesce_t_us: Option<u64>,
    pub resume_t_us: Option<u64>,
    pub first_announce_t_us: Option<u64>,
    pub fdb_move_t_us: Option<u64>,
    pub fdb_port_before: Option<String>,
    pub fdb_port_after: Option<String>,
    /// Ethertype of the frame that moved the MAC (rarp, arp, ipv4…).
    pub fdb_moved_by: Option<String>,
}

impl Window {
    pub fn downtime_us(&self) -> Option<u64> {
        self.resume_t_us?.checked_sub(self.quiesce_t_us?)
    }
    pub fn announce_after_resume_us(&self) -> Option<u64> {
        self.first_announce_t_us?.checked_sub(self.resume_t_us?)
    }
    pub fn fdb_move_after_announce_us(&self) -> Option<u64> {
        self.fdb_move_t_us?.checked_sub(self.first_announce_t_us?)
    }
    pub fn fdb_move_after_resume_us(&self) -> Option<u64> {
        self.fdb_move_t_us?.checked_sub(self.resume_t_us?)
    }
}

/// One pre-copy round on the time axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMark {
    /// When the round ended.
    pub t_us: u64,
    pub round: u32,
    pub pages_sent: u64,
    pub dirty_pages: u64,
}

/// One announce frame on the time axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnounceMark {
    pub t_us: u64,
    pub seq: usize,
    pub kind: Announce,
    pub host: String,
}

/// The switch moving the VM's MAC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FdbMove {
    pub t_us: u64,
    pub from: String,
    pub to: String,
    pub ethertype: String,
}

/// One ping probe on the time axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub seq: u64,
    /// Reply: when it arrived; lost: when ping gave up on it (the next probe's send).
    pub t_us: u64,
    /// None: no reply.
    pub rtt_ms: Option<f64>,
}

/// One event of the migration in the story, with its offset from the first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub t_us: u64,
    /// Milliseconds after the first entry.
    pub offset_ms: f64,
    /// The daemon that published it.
    pub source: String,
    #[serde(flatten)]
    pub event: Event,
}

/// Everything that happened to one VM around one migration, on one time axis (µs since
/// the epoch): the probes, the pre-copy rounds, the quiesce and resume, the announces,
/// the switch's move of the MAC, and every event of the VM and its MAC in time order.
/// Built from the daemons' events and ping's output, never from log text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub vm: String,
    pub probes: Vec<Probe>,
    pub rounds: Vec<RoundMark>,
    pub quiesce_t_us: Option<u64>,
    pub resume_t_us: Option<u64>,
    /// Announces sent by the host the VM resumed on, after the resume.
    pub announces: Vec<AnnounceMark>,
    /// The first move of the VM's MAC after the quiesce.
    pub fdb_move: Option<FdbMove>,
    pub entries: Vec<TimelineEntry>,
}

impl Timeline {
    /// Builds the timeline of the migration of `vm` (MAC `mac`) from `records` (any
    /// order, any daemons) and ping's lines, keeping what lies in `since_us..=until_us`.
    pub fn build(
        records: &[Record],
        pings: &[PingLine],
        vm: &str,
        mac: MacAddr,
        since_us: u64,
        until_us: u64,
    ) -> Timeline {
        let mut picked: Vec<&Record> = records
            .iter()
            .filter(|r| r.t_us >= since_us && r.t_us <= until_us)
            .filter(|r| r.event.vm() == Some(vm) || r.event.mac() == Some(mac))
            .collect();
        picked.sort_by_key(|r| r.t_us);
        let mut t = Timeline {
            vm: vm.to_string(),
            ..Timeline::default()
        };
        let mut resumed_on: Option<&str> = None;
        for r in &picked {
            match &r.event {
                Event::MigrationRound {
                    round,
                    pages_sent,
                    dirty_pages,
                    ..
                } if t.quiesce_t_us.is_none() => t.rounds.push(RoundMark {
                    t_us: r.t_us,
                    round: *round,
                    pages_sent: *pages_sent,
                    dirty_pages: *dirty_pages,
                }),
                Event::VmQuiesced { .. } => {
                    t.quiesce_t_us.get_or_insert(r.t_us);
                }
                Event::VmResumed {
                    host,
                    after_failure: false,
                    ..
                } if t.quiesce_t_us.is_some() && t.resume_t_us.is_none() => {
                    t.resume_t_us = Some(r.t_us);
                    resumed_on = Some(host);
                }
                Event::AnnounceSent {
                    host, seq, kind, ..
                } if resumed_on == Some(host.as_str()) => t.announces.push(AnnounceMark {
                    t_us: r.t_us,
                    seq: *seq,
                    kind: *kind,
                    host: host.clone(),
                }),
                Event::MacMoved {
                    mac: m,
                    from,
                    to,
                    ethertype,
                    ..
                } if *m == mac && t.quiesce_t_us.is_some() && t.fdb_move.is_none() => {
                    t.fdb_move = Some(FdbMove {
                        t_us: r.t_us,
                        from: from.clone(),
                        to: to.clone(),
                        ethertype: ethertype.clone(),
                    })
                }
                _ => {}
            }
        }
        let t0 = picked.first().map_or(0, |r| r.t_us);
        t.entries = picked
            .into_iter()
            .map(|r| TimelineEntry {
                t_us: r.t_us,
                offset_ms: (r.t_us - t0) as f64 / 1000.0,
                source: r.source.clone(),
                event: r.event.clone(),
            })
            .collect();
        t.probes = pings
            .iter()
            .filter_map(|p| match *p {
                PingLine::Reply { seq, t_us, rtt_ms } => Some(Probe {
                    seq,
                    t_us,
                    rtt_ms: Some(rtt_ms),
                }),
                PingLine::NoAnswer { seq, t_us } => Some(Probe {
                    seq,
                    t_us,
                    rtt_ms: None,
                }),
                PingLine::Totals { .. } => None,
            })
            .collect();
        t
    }

    /// The picture's view of this timeline (see [`crate::timeline::svg`]): each probe at
    /// its send time (a reply's arrival minus its RTT; a lost probe's interpolated
    /// between its answered neighbours), each round from the end of the one before
    /// (round 1 from the migration's first event).
    pub fn picture(&self, from: &str, to: &str, interval_s: f64) -> picture::Timeline {
        let mut answered: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for p in &self.probes {
            if let Some(rtt_ms) = p.rtt_ms {
                let rtt_us = (rtt_ms.max(0.0) * 1000.0).round() as u64;
                answered
                    .entry(p.seq)
                    .or_insert((p.t_us.saturating_sub(rtt_us), rtt_us));
            }
        }
        let spacing = match (answered.first_key_value(), answered.last_key_value()) {
            (Some((&a, &(ta, _))), Some((&b, &(tb, _)))) if b > a => (tb - ta) / (b - a),
            _ => (interval_s.max(0.0) * 1e6) as u64,
        };
        let probes = self
            .probes
            .iter()
            .map(|p| {
                if let Some(&(sent, rtt)) = answered.get(&p.seq) {
                    return picture::Probe {
                        seq: p.seq,
                        sent_t_us: sent,
                        rtt_us: Some(rtt),
                    };
                }
                let before = answered.range(..p.seq).next_back();
                let after = answered.range(p.seq..).next();
                let sent = match (before, after) {
                    (Some((&a, &(ta, _))), Some((&b, &(tb, _)))) => {
                        ta + tb.saturating_sub(ta) * (p.seq - a) / (b - a)
                    }
                    (Some((&a, &(ta, _))), None) => ta + spacing * (p.seq - a),
                    (None, Some((&b, &(tb, _)))) => tb.saturating_sub(spacing * (b - p.seq)),
                    (None, None) => p.t_us.saturating_sub(spacing),
                };
                picture::Probe {
                    seq: p.seq,
                    sent_t_us: sent,
                    rtt_us: None,
                }
            })
            .collect();
        let first_event = self.entries.first().map(|e| e.t_us);
        let mut start = None;
        let rounds = self
            .rounds
            .iter()
            .map(|r| {
                let s = start.or(first_event).unwrap_or(r.t_us).min(r.t_us);
                start = Some(r.t_us);
                picture::Round {
                    round: r.round,
                    start_t_us: s,
                    end_t_us: r.t_us,
                    pages_sent: r.pages_sent,
                    pages_dirtied: r.dirty_pages,
                }
            })
            .collect();
        picture::Timeline {
            vm: self.vm.clone(),
            from: from.to_string(),
            to: to.to_string(),
            interval_s,
            probes,
            rounds,
            quiesce_t_us: self.quiesce_t_us,
            resume_t_us: self.resume_t_us,
            announces: self
                .announces
                .iter()
                .map(|a| picture::AnnounceMark {
                    t_us: a.t_us,
                    kind: a.kind.to_string(),
                })
                .collect(),
            fdb_move: self.fdb_move.as_ref().map(|f| picture::FdbMove {
                t_us: f.t_us,
                from: f.from.clone(),
                to: f.to.clone(),
                ethertype: f.ethertype.clone(),
            }),
        }
    }

    /// The loss-window chain: quiesce → resume → first announce → FDB move.
    pub fn window(&self) -> Window {
        Window {
            quiesce_t_us: self.quiesce_t_us,
            resume_t_us: self.resume_t_us,
            first_announce_t_us: self.announces.first().map(|a| a.t_us),
            fdb_move_t_us: self.fdb_move.as_ref().map(|m| m.t_us),
            fdb_port_before: self.fdb_move.as_ref().map(|m| m.from.clone()),
            fdb_port_after: self.fdb_move.as_ref().map(|m| m.to.clone()),
            fdb_moved_by: self.fdb_move.as_ref().map(|m| m.ethertype.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING: &str = "PING 10.10.0.100 (10.10.0.100) 56(84) bytes of data.
[1764127200.000100] 64 bytes from 10.10.0.100: icmp_seq=1 ttl=64 time=0.101 ms
[1764127200.010200] 64 bytes from 10.10.0.100: icmp_seq=2 ttl=64 time=0.099 ms
[1764127200.030000] no answer yet for icmp_seq=3
[1764127200.040000] no answer yet for icmp_seq=4
[1764127200.050300] 64 bytes from 10.10.0.100: icmp_seq=5 ttl=64 time=0.2 ms

--- 10.10.0.100 ping statistics ---
5 packets transmitted, 3 received, 40% packet loss, time 50ms
";

    #[test]
    fn ping_output_gives_loss_and_longest_gap() {
        let lines: Vec<PingLine> = PING.lines().filter_map(parse_ping_line).collect();
        assert_eq!(lines.len(), 6);
        let s = ping_stats(&lines);
        assert_eq!(s.pings_sent, 5);
        assert_eq!(s.pings_received, 3);
        assert_eq!(s.pings_lost, 2);
        assert_eq!(s.lost_seqs, vec![3, 4]);
        assert!(
            (s.longest_gap_ms - 40.1).abs() < 1e-9,
            "{}",
            s.longest_gap_ms
        );
        assert_eq!(s.gap_start_t_us, 1_764_127_200_010_200);
    }

    #[test]
    fn ping_without_totals_counts_from_sequence_numbers() {
        let lines: Vec<PingLine> = PING
            .lines()
            .filter(|l| !l.contains("transmitted"))
            .filter_map(parse_ping_line)
            .collect();
        let s = ping_stats(&lines);
        assert_eq!((s.pings_sent, s.pings_lost), (5, 2));
    }

    fn rec(t_us: u64, source: &str, event: Event) -> Record {
        Record {
            t_us,
            source: source.into(),
            event,
        }
    }

    #[test]
    fn the_timeline_follows_the_chain() {
        let mac: MacAddr = "02:00:00:00:01:01".parse().unwrap();
        let vm = || "vm1".to_string();
        let announce = |t, seq| {
            rec(
                t,
                "silo105",
                Event::AnnounceSent {
                    vm: vm(),
                    host: "silo105".into(),
                    mac,
                    kind: Announce::Rarp,
                    seq,
                },
            )
        };
        // Out of order, as several daemons deliver them.
        let records = vec![
            announce(54_100, 1),
            rec(
                4_150,
                "switch",
                Event::MacMoved {
                    mac,
                    from: "silo104".into(),
                    to: "silo105".into(),
                    ethertype: "rarp".into(),
                    from_remote: None,
                    to_remote: None,
                },
            ),
            rec(
                900,
                "switch",
                Event::MacLearned {
                    mac,
                    port: "silo104".into(),
                    remote: None,
                },
            ),
            rec(
                800,
                "silo104",
                Event::MigrationRound {
                    vm: vm(),
                    round: 1,
                    pages_sent: 100,
                    dirty_pages: 3,
                    throughput_mbps: 1.0,
                },
            ),
            rec(
                1_000,
                "silo104",
                Event::VmQuiesced {
                    vm: vm(),
                    host: "silo104".into(),
                    dirty_pages: 3,
                },
            ),
            rec(
                4_000,
                "silo105",
                Event::VmResumed {
                    vm: vm(),
                    host: "silo105".into(),
                    after_failure: false,
                },
            ),
            announce(4_100, 0),
            // Another VM's events stay out.
            rec(
                4_200,
                "silo104",
                Event::VmQuiesced {
                    vm: "vm2".into(),
                    host: "silo104".into(),
                    dirty_pages: 0,
                },
            ),
        ];
        let pings: Vec<PingLine> = PING.lines().filter_map(parse_ping_line).collect();
        let t = Timeline::build(&records, &pings, "vm1", mac, 0, u64::MAX);
        let w = t.window();
        assert_eq!(w.downtime_us(), Some(3000));
        assert_eq!(w.announce_after_resume_us(), Some(100));
        assert_eq!(w.fdb_move_after_announce_us(), Some(50));
        assert_eq!(w.fdb_port_before.as_deref(), Some("silo104"));
        assert_eq!(w.fdb_port_after.as_deref(), Some("silo105"));
        assert_eq!(w.fdb_moved_by.as_deref(), Some("rarp"));
        assert_eq!(t.rounds.len(), 1);
        assert_eq!(
            t.announces.iter().map(|a| a.t_us).collect::<Vec<_>>(),
            vec![4_100, 54_100]
        );
        assert_eq!(t.entries.len(), 7);
        assert!(t.entries.windows(2).all(|w| w[0].t_us <= w[1].t_us));
        assert_eq!(t.entries[0].offset_ms, 0.0);
        assert_eq!(t.probes.len(), 5);
        assert_eq!(t.probes.iter().filter(|p| p.rtt_ms.is_none()).count(), 2);
        // Only what lies in the span counts.
        let late = Timeline::build(&records, &[], "vm1", mac, 2_000, u64::MAX);
        assert_eq!(late.window().quiesce_t_us, None);
        assert_eq!(late.fdb_move, None);
    }
}
