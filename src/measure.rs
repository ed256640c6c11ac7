//! Loss-window arithmetic (a core: text in, figures out, no I/O).
//!
//! Two sources are read: the output of the system's `ping -D -O` run from the client
//! namespace, and the daemons' own log lines (each user-facing event carries `t_us`,
//! microseconds since the epoch on the machine's one clock). From them come the figures
//! a user wants after a migration: probes lost, the longest gap between replies, and
//! the chain quiesce → resume → first announce → switch moves the MAC.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::timeline::{AnnounceMark, FdbMove, Probe, Round, Timeline};

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

/// One event from a daemon's log: message text and `key=value` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEvent {
    pub t_us: u64,
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

impl LogEvent {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(|s| s.as_str())
    }
}

/// Parses a line written by the daemons' `tracing` formatter:
/// `2026-11-26T03:40:00.123456Z  INFO mac moved mac=02:… from=silo104 to=silo105 t_us=…`.
/// Lines without `t_us` are not events users correlate, and give None.
pub fn parse_log_line(line: &str) -> Option<LogEvent> {
    let mut words = line.split_whitespace();
    let _timestamp = words.next()?;
    let level = words.next()?;
    if !matches!(level, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR") {
        return None;
    }
    let mut message = Vec::new();
    let mut fields = BTreeMap::new();
    for w in words {
        match w.split_once('=') {
            Some((k, v))
                if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                fields.insert(k.to_string(), v.trim_matches('"').to_string());
            }
            _ if fields.is_empty() => message.push(w),
            _ => {}
        }
    }
    let t_us = fields.get("t_us")?.parse().ok()?;
    Some(LogEvent {
        t_us,
        message: message.join(" "),
        fields,
    })
}

/// The chain of events around one migration, from the daemons' logs.
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

/// Finds the window of the migration of `vm` (MAC `mac`) that started at or after
/// `since_us`, among `events` from every daemon's log.
pub fn find_window(events: &[LogEvent], vm: &str, mac: &str, since_us: u64) -> Window {
    let mut w = Window::default();
    let mut sorted: Vec<&LogEvent> = events.iter().filter(|e| e.t_us >= since_us).collect();
    sorted.sort_by_key(|e| e.t_us);
    for e in sorted {
        let is_vm = e.get("vm") == Some(vm);
        match e.message.as_str() {
            "migration phase" if is_vm && e.get("phase") == Some("quiesce") => {
                w.quiesce_t_us.get_or_insert(e.t_us);
            }
            "vm resumed" if is_vm => {
                w.resume_t_us.get_or_insert(e.t_us);
            }
            "announce sent" if is_vm && w.resume_t_us.is_some() => {
                w.first_announce_t_us.get_or_insert(e.t_us);
            }
            "mac moved"
                if e.get("mac") == Some(mac)
                    && w.quiesce_t_us.is_some()
                    && w.fdb_move_t_us.is_none() =>
            {
                w.fdb_move_t_us = Some(e.t_us);
                w.fdb_port_before = e.get("from").map(str::to_string);
                w.fdb_port_after = e.get("to").map(str::to_string);
                w.fdb_moved_by = e.get("ethertype").map(str::to_string);
            }
            _ => {}
        }
    }
    w
}

/// One line of the story of a migration, as the daemons logged it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub t_us: u64,
    /// Milliseconds after the first entry.
    pub offset_ms: f64,
    /// Which daemon's log it comes from.
    pub daemon: String,
    pub what: String,
}

/// The events of the migration of `vm` (MAC `mac`) between `since_us` and `until_us`:
/// migration phases, resume, announces and the switch's learning of the VM's MAC.
pub fn timeline(
    events: &[LogEvent],
    vm: &str,
    mac: &str,
    since_us: u64,
    until_us: u64,
) -> Vec<TimelineEntry> {
    let mut picked: Vec<&LogEvent> = events
        .iter()
        .filter(|e| e.t_us >= since_us && e.t_us <= until_us)
        .filter(|e| e.get("vm") == Some(vm) || e.get("mac") == Some(mac))
        .collect();
    picked.sort_by_key(|e| e.t_us);
    let t0 = picked.first().map(|e| e.t_us).unwrap_or(0);
    picked
        .into_iter()
        .map(|e| {
            let skip = ["t_us", "daemon", "vm", "mac"];
            let detail: Vec<String> = e
                .fields
                .iter()
                .filter(|(k, _)| !skip.contains(&k.as_str()))
                .map(|(k, v)| match v.parse::<f64>() {
                    Ok(f) if v.contains('.') => format!("{k}={f:.1}"),
                    _ => format!("{k}={v}"),
                })
                .collect();
            TimelineEntry {
                t_us: e.t_us,
                offset_ms: (e.t_us - t0) as f64 / 1000.0,
                daemon: e.get("daemon").unwrap_or("").to_string(),
                what: format!("{} {}", e.message, detail.join(" "))
                    .trim()
                    .to_string(),
            }
        })
        .collect()
}

/// Every probe of a ping run, in sequence order: a reply's send time is its arrival
/// minus its RTT; a lost probe's is interpolated between the nearest answered
/// neighbours (ping's real spacing drifts from the interval it was asked for).
pub fn probes(lines: &[PingLine], interval_s: f64) -> Vec<Probe> {
    let mut sent: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut max_seq = 0;
    for l in lines {
        match *l {
            PingLine::Reply { seq, t_us, rtt_ms } => {
                let rtt_us = (rtt_ms.max(0.0) * 1000.0).round() as u64;
                sent.entry(seq)
                    .or_insert((t_us.saturating_sub(rtt_us), rtt_us));
                max_seq = max_seq.max(seq);
            }
            PingLine::NoAnswer { seq, .. } => max_seq = max_seq.max(seq),
            PingLine::Totals { transmitted, .. } => max_seq = max_seq.max(transmitted),
        }
    }
    // The measured spacing, for probes with an answered neighbour on one side only.
    let spacing = match (sent.first_key_value(), sent.last_key_value()) {
        (Some((&a, &(ta, _))), Some((&b, &(tb, _)))) if b > a => (tb - ta) / (b - a),
        _ => (interval_s.max(0.0) * 1e6) as u64,
    };
    (1..=max_seq)
        .filter_map(|seq| {
            if let Some(&(t, rtt)) = sent.get(&seq) {
                return Some(Probe {
                    seq,
                    sent_t_us: t,
                    rtt_us: Some(rtt),
                });
            }
            let before = sent.range(..seq).next_back();
            let after = sent.range(seq..).next();
            let t = match (before, after) {
                (Some((&a, &(ta, _))), Some((&b, &(tb, _)))) => {
                    ta + (tb.saturating_sub(ta)) * (seq - a) / (b - a)
                }
                (Some((&a, &(ta, _))), None) => ta + spacing * (seq - a),
                (None, Some((&b, &(tb, _)))) => tb.saturating_sub(spacing * (b - seq)),
                (None, None) => return None,
            };
            Some(Probe {
                seq,
                sent_t_us: t,
                rtt_us: None,
            })
        })
        .collect()
}

/// The migration of `vm` (MAC `mac`) that started at or after `since_us`, from every
/// daemon's events: its pre-copy rounds, quiesce, resume, announces and the switch's
/// move of the MAC. Probes and names are left for the caller to fill in.
pub fn migration_timeline(events: &[LogEvent], vm: &str, mac: &str, since_us: u64) -> Timeline {
    let w = find_window(events, vm, mac, since_us);
    let mut sorted: Vec<&LogEvent> = events
        .iter()
        .filter(|e| e.t_us >= since_us && e.get("vm") == Some(vm))
        .collect();
    sorted.sort_by_key(|e| e.t_us);
    let num = |e: &LogEvent, k: &str| e.get(k).and_then(|v| v.parse::<u64>().ok());
    let mut rounds = Vec::new();
    let mut announces = Vec::new();
    let mut round_start = None;
    for e in sorted {
        match (e.message.as_str(), e.get("phase")) {
            ("migration phase", Some("precheck")) if round_start.is_none() => {
                round_start = Some(e.t_us)
            }
            ("migration phase", Some("precopy")) if w.quiesce_t_us.is_none_or(|q| e.t_us <= q) => {
                let start = round_start.unwrap_or(e.t_us);
                rounds.push(Round {
                    round: num(e, "round").unwrap_or(rounds.len() as u64 + 1) as u32,
                    start_t_us: start,
                    end_t_us: e.t_us,
                    pages_sent: num(e, "pages_sent").unwrap_or(0),
                    pages_dirtied: num(e, "dirty_pages").unwrap_or(0),
                });
                round_start = Some(e.t_us);
            }
            ("announce sent", _) if w.resume_t_us.is_some_and(|r| e.t_us >= r) => {
                announces.push(AnnounceMark {
                    t_us: e.t_us,
                    kind: e.get("kind").unwrap_or("announce").to_string(),
                })
            }
            _ => {}
        }
    }
    Timeline {
        rounds,
        quiesce_t_us: w.quiesce_t_us,
        resume_t_us: w.resume_t_us,
        announces,
        fdb_move: w.fdb_move_t_us.map(|t_us| FdbMove {
            t_us,
            from: w.fdb_port_before.clone().unwrap_or_default(),
            to: w.fdb_port_after.clone().unwrap_or_default(),
            ethertype: w.fdb_moved_by.clone().unwrap_or_default(),
        }),
        ..Timeline::default()
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

    #[test]
    fn log_lines_give_events_with_fields() {
        let e = parse_log_line(
            "2026-11-26T03:40:00.123456Z  INFO mac moved mac=02:00:00:00:01:01 from=silo104 to=silo105 ethertype=rarp t_us=1764128400123456",
        )
        .unwrap();
        assert_eq!(e.message, "mac moved");
        assert_eq!(e.get("to"), Some("silo105"));
        assert_eq!(e.t_us, 1_764_128_400_123_456);
        assert!(parse_log_line("2026-11-26T03:40:00Z  INFO host ready").is_none());
        assert!(parse_log_line("garbage").is_none());
        assert!(parse_log_line("").is_none());
    }

    #[test]
    fn window_follows_the_chain() {
        let log = "\
2026-11-26T03:40:00.000000Z  INFO mac learned mac=02:00:00:00:01:01 port=silo104 t_us=900
2026-11-26T03:40:00.000000Z  INFO migration phase vm=vm1 phase=quiesce t_us=1000
2026-11-26T03:40:00.000000Z  INFO vm resumed vm=vm1 host=silo105 t_us=4000
2026-11-26T03:40:00.000000Z  INFO announce sent vm=vm1 host=silo105 seq=0 t_us=4100
2026-11-26T03:40:00.000000Z  INFO mac moved mac=02:00:00:00:01:01 from=silo104 to=silo105 ethertype=rarp t_us=4150
2026-11-26T03:40:00.000000Z  INFO announce sent vm=vm1 host=silo105 seq=1 t_us=54100";
        let events: Vec<LogEvent> = log.lines().filter_map(parse_log_line).collect();
        let w = find_window(&events, "vm1", "02:00:00:00:01:01", 0);
        assert_eq!(w.downtime_us(), Some(3000));
        assert_eq!(w.announce_after_resume_us(), Some(100));
        assert_eq!(w.fdb_move_after_announce_us(), Some(50));
        assert_eq!(w.fdb_port_before.as_deref(), Some("silo104"));
        assert_eq!(w.fdb_port_after.as_deref(), Some("silo105"));
        assert_eq!(w.fdb_moved_by.as_deref(), Some("rarp"));
    }

    #[test]
    fn probes_place_lost_ones_between_their_neighbours() {
        let lines: Vec<PingLine> = PING.lines().filter_map(parse_ping_line).collect();
        let p = probes(&lines, 0.01);
        assert_eq!(p.iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        // Replies left at arrival minus RTT.
        assert_eq!(p[0].sent_t_us, 1_764_127_200_000_100 - 101);
        assert_eq!(p[0].rtt_us, Some(101));
        assert_eq!(p[4].sent_t_us, 1_764_127_200_050_300 - 200);
        // 3 and 4 lost: a third and two thirds of the way from 2 to 5.
        let (t2, t5) = (p[1].sent_t_us, p[4].sent_t_us);
        assert_eq!(p[2].rtt_us, None);
        assert_eq!(p[2].sent_t_us, t2 + (t5 - t2) / 3);
        assert_eq!(p[3].sent_t_us, t2 + (t5 - t2) * 2 / 3);
        // A loss at the end is placed one measured spacing after the last reply.
        let tail: Vec<PingLine> = vec![
            PingLine::Reply {
                seq: 1,
                t_us: 1_000,
                rtt_ms: 0.0,
            },
            PingLine::Reply {
                seq: 2,
                t_us: 17_000,
                rtt_ms: 0.0,
            },
            PingLine::Totals {
                transmitted: 3,
                received: 2,
            },
        ];
        let p = probes(&tail, 0.01);
        assert_eq!((p[2].sent_t_us, p[2].rtt_us), (33_000, None));
        assert!(probes(&[], 0.01).is_empty());
    }

    #[test]
    fn migration_timeline_has_rounds_marks_and_the_move() {
        let log = "\
2026-11-26T03:40:00.000000Z  INFO migration phase vm=vm1 phase=precheck memory_mb=256 t_us=100
2026-11-26T03:40:00.000000Z  INFO migration phase vm=vm1 phase=precopy round=1 pages_sent=65536 dirty_pages=300 t_us=700
2026-11-26T03:40:00.000000Z  INFO migration phase vm=vm2 phase=precopy round=1 pages_sent=9 dirty_pages=9 t_us=750
2026-11-26T03:40:00.000000Z  INFO migration phase vm=vm1 phase=precopy round=2 pages_sent=300 dirty_pages=20 t_us=900
2026-11-26T03:40:00.000000Z  INFO migration phase vm=vm1 phase=quiesce t_us=1000
2026-11-26T03:40:00.000000Z  INFO vm resumed vm=vm1 host=silo105 t_us=4000
2026-11-26T03:40:00.000000Z  INFO announce sent vm=vm1 host=silo105 kind=rarp seq=0 t_us=4100
2026-11-26T03:40:00.000000Z  INFO mac moved mac=02:00:00:00:01:01 from=silo104 to=silo105 ethertype=rarp t_us=4150
2026-11-26T03:40:00.000000Z  INFO announce sent vm=vm1 host=silo105 kind=rarp seq=1 t_us=54100";
        let events: Vec<LogEvent> = log.lines().filter_map(parse_log_line).collect();
        let t = migration_timeline(&events, "vm1", "02:00:00:00:01:01", 0);
        assert_eq!(
            t.rounds,
            vec![
                Round {
                    round: 1,
                    start_t_us: 100,
                    end_t_us: 700,
                    pages_sent: 65536,
                    pages_dirtied: 300
                },
                Round {
                    round: 2,
                    start_t_us: 700,
                    end_t_us: 900,
                    pages_sent: 300,
                    pages_dirtied: 20
                },
            ]
        );
        assert_eq!((t.quiesce_t_us, t.resume_t_us), (Some(1000), Some(4000)));
        assert_eq!(
            t.announces
                .iter()
                .map(|a| (a.t_us, a.kind.as_str()))
                .collect::<Vec<_>>(),
            [(4100, "rarp"), (54100, "rarp")]
        );
        let m = t.fdb_move.unwrap();
        assert_eq!(
            (m.t_us, m.from.as_str(), m.to.as_str()),
            (4150, "silo104", "silo105")
        );
        // Events before `since` belong to an earlier migration.
        assert!(
            migration_timeline(&events, "vm1", "02:00:00:00:01:01", 5000)
                .rounds
                .is_empty()
        );
    }
}
