//! `vfabric measure`: ping a VM from the client namespace with the system's real `ping`
//! while it migrates, and explain the loss window from the daemons' events.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use vfabric::clock::unix_micros;
use vfabric::host::client::{self, MigrationPlan};
use vfabric::measure::{self, PingLine, PingStats, Timeline, Window};
use vfabric::migration::announce::Announce;
use vfabric::migration::MigrationSummary;
use vfabric::monitor::{self, Monitor};
use vfabric::timeline::svg;

use super::CliError;

/// Ping a VM from the client namespace around a migration and report the loss window.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    vfabric measure vm1 --to silo105                   # one probe a second, like ping -t\n  \
    vfabric measure vm1 --to silo104 --interval 0.01   # a close look at the window\n  \
    vfabric measure vm1 --to silo105 --interval 0.01 --svg timeline.svg   # and a picture of it\n\n\
    Probes go from the client namespace ($VF_PREFIX-client unless --client-netns) with\n\
    `ip netns exec <ns> ping -D -O -i <interval>`.\n\
    The downtime, the first announce and the switch's MAC move come from the daemons' events\n\
    (what `vfabric events` shows), subscribed to before the migration starts.")]
pub struct MeasureArgs {
    /// The VM to ping and move.
    vm: String,
    /// Target host.
    #[arg(long, value_name = "HOST")]
    to: String,
    /// Seconds between probes: the book's `ping -t` sends one a second; use 0.01 for a
    /// close look at the window (root may go down to 0.002).
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    interval: f64,
    /// Namespace the probes leave from [default: $VF_PREFIX-client, i.e. vf-client
    /// unless VF_PREFIX names another fabric].
    #[arg(long, value_name = "NETNS")]
    client_netns: Option<String>,
    /// How the target announces the VM: rarp, garp or none (default: the target's setting).
    #[arg(long, value_name = "MODE")]
    announce: Option<Announce>,
    /// Ping this long before migrating, ms.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    before_ms: u64,
    /// Keep pinging this long after replies are back, ms.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    after_ms: u64,
    /// Give up waiting for replies to come back after this long, s.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    max_wait_s: u64,
    /// Keep ping's own output in this file.
    #[arg(long, value_name = "FILE")]
    ping_log: Option<PathBuf>,
    /// Before and after the migration, send the VM's UDP service an `incr` from the
    /// client namespace and report the counter (it must carry on: memory moved).
    #[arg(long)]
    udp_check: bool,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
    /// Also write the JSON object to this file.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Draw the migration's timeline into this SVG file (open it in a browser): every
    /// probe, the pre-copy rounds, the downtime, each announce and the FDB move, and a
    /// close-up of the switch-over.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

/// The client namespace of the fabric named by `prefix` (`VF_PREFIX`, default `vf`),
/// as netns-scripts/up.sh names it.
fn client_netns_of(prefix: Option<&str>) -> String {
    let prefix = prefix.filter(|p| !p.is_empty()).unwrap_or("vf");
    format!("{prefix}-client")
}

/// The measurement's result.
#[derive(Debug, Serialize)]
pub struct Report {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub interval_s: f64,
    pub announce: String,
    #[serde(flatten)]
    pub ping: PingStats,
    pub downtime_us: u64,
    pub rarp_after_resume_us: Option<u64>,
    pub fdb_move_after_rarp_us: Option<u64>,
    pub fdb_move_after_resume_us: Option<u64>,
    pub fdb_port_before: Option<String>,
    pub fdb_port_after: Option<String>,
    pub fdb_moved_by: Option<String>,
    /// From the first lost reply to the switch's move of the MAC, ms (what the loss
    /// window is made of when nothing announces the VM).
    pub unreachable_ms: f64,
    pub memory_sha256_source: String,
    pub memory_sha256_target: String,
    /// The guest UDP counter as the client read it before and after (with --udp-check).
    pub udp_counter_before: Option<u64>,
    pub udp_counter_after: Option<u64>,
    pub window: Window,
    /// The probes, rounds, quiesce, resume, announces and FDB move on one time axis, and
    /// the migration's events from every daemon in time order (`entries`).
    pub timeline: Timeline,
    pub migration: MigrationSummary,
}

struct Pinger {
    child: Child,
    lines: Arc<Mutex<Vec<PingLine>>>,
    raw: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pinger {
    fn start(netns: &str, ip: &str, interval: f64) -> Result<Pinger, CliError> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "ping", "-D", "-O", "-n", "-i"])
            .arg(format!("{interval}"))
            .arg(ip)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run `ip netns exec {netns} ping`: {e}"))?;
        let stdout = child.stdout.take().ok_or("ping has no stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (l2, r2) = (lines.clone(), raw.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(p) = measure::parse_ping_line(&line) {
                    l2.lock().unwrap_or_else(|p| p.into_inner()).push(p);
                }
                r2.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Ok(Pinger {
            child,
            lines,
            raw,
            reader: Some(reader),
        })
    }

    fn last_reply_us(&self) -> Option<u64> {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find_map(|l| match l {
                PingLine::Reply { t_us, .. } => Some(*t_us),
                _ => None,
            })
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                Some(format!("ping exited ({status}): {}", err.trim()))
            }
            _ => None,
        }
    }

    /// Stops ping with SIGINT so that it prints its totals, and returns every line.
    fn stop(mut self) -> (Vec<PingLine>, Vec<String>) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let lines = std::mem::take(&mut *self.lines.lock().unwrap_or_else(|p| p.into_inner()));
        let raw = std::mem::take(&mut *self.raw.lock().unwrap_or_else(|p| p.into_inner()));
        (lines, raw)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(a: MeasureArgs) -> Result<(), CliError> {
    let report = measure(&a)?;
    let json = serde_json::to_string(&report)?;
    if let Some(p) = &a.json_out {
        std::fs::write(p, format!("{json}\n"))
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Pings, migrates, and builds the timeline and report.
pub fn measure(a: &MeasureArgs) -> Result<Report, CliError> {
    if !(a.interval > 0.0 && a.interval <= 60.0) {
        return Err(format!("--interval {} is not between 0 and 60 s", a.interval).into());
    }
    let client_netns = a
        .client_netns
        .clone()
        .unwrap_or_else(|| client_netns_of(std::env::var("VF_PREFIX").ok().as_deref()));
    let info = client::vm_show(&a.vm)?;
    let say = |s: String| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    say(format!(
        "pinging {} ({}) from {} every {} s",
        a.vm, info.ip, client_netns, a.interval
    ));
    let mut pinger = Pinger::start(&client_netns, &info.ip.to_string(), a.interval)?;
    // Wait for the VM to answer before moving it: a window measured from nothing is noise.
    let t0 = Instant::now();
    loop {
        if let Some(e) = pinger.exited() {
            return Err(e.into());
        }
        let answered = pinger.last_reply_us().is_some();
        if answered && t0.elapsed() >= Duration::from_millis(a.before_ms) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10).max(Duration::from_millis(a.before_ms * 2)) {
            return Err(format!(
                "{} ({}) does not answer ping from {} before the migration",
                a.vm, info.ip, client_netns
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let udp_before = if a.udp_check {
        Some(udp_incr(&client_netns, &info.ip.to_string())?)
    } else {
        None
    };
    // Subscribed before the migration starts: no event of it can be missed.
    let events = Monitor::open(&monitor::daemon_endpoints()?, true)?;
    let since_us = unix_micros();
    let plan = MigrationPlan {
        vm: a.vm.clone(),
        to: a.to.clone(),
        announce: a.announce,
        ..MigrationPlan::default()
    };
    let migrated = super::host::migrate(&plan, !a.json)?;
    let (summary, from, to) = (migrated.summary, migrated.from, migrated.to);
    let done_us = unix_micros();
    // Replies come back once the switch has followed the VM.
    let wait = Instant::now();
    loop {
        if pinger.last_reply_us().is_some_and(|t| t > done_us) {
            break;
        }
        if wait.elapsed() > Duration::from_secs(a.max_wait_s) {
            say(format!(
                "no reply within {} s after the migration; giving up",
                a.max_wait_s
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(
        Duration::from_millis(a.after_ms).max(Duration::from_secs_f64(a.interval * 2.0)),
    );
    let (lines, raw) = pinger.stop();
    let udp_after = if a.udp_check {
        Some(udp_incr(&client_netns, &info.ip.to_string())?)
    } else {
        None
    };
    if let Some(p) = &a.ping_log {
        std::fs::write(p, raw.join("\n") + "\n")
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    let ping = measure::ping_stats(&lines);
    let until_us = unix_micros();
    let records = events.finish(Duration::from_millis(50));
    let timeline = Timeline::build(&records, &lines, &a.vm, info.mac, since_us, until_us);
    let window = timeline.window();
    if let Some(path) = &a.svg {
        let picture = timeline.picture(&from, &to, a.interval);
        std::fs::write(path, svg::render(&picture))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        say(format!("timeline picture written to {}", path.display()));
    }
    let unreachable_ms = match window.fdb_move_t_us {
        Some(m) if ping.gap_start_t_us > 0 => m.saturating_sub(ping.gap_start_t_us) as f64 / 1000.0,
        _ => ping.longest_gap_ms,
    };
    let report = Report {
        vm: a.vm.clone(),
        from,
        to,
        interval_s: a.interval,
        announce: a
            .announce
            .as_ref()
            .map(|x| x.to_string())
            .unwrap_or_else(|| "host default".into()),
        downtime_us: summary.downtime_us,
        rarp_after_resume_us: window.announce_after_resume_us(),
        fdb_move_after_rarp_us: window.fdb_move_after_announce_us(),
        fdb_move_after_resume_us: window.fdb_move_after_resume_us(),
        fdb_port_before: window.fdb_port_before.clone(),
        fdb_port_after: window.fdb_port_after.clone(),
        fdb_moved_by: window.fdb_moved_by.clone(),
        unreachable_ms,
        ping,
        memory_sha256_source: summary.memory_sha256_source.clone(),
        memory_sha256_target: summary.memory_sha256_target.clone(),
        udp_counter_before: udp_before,
        udp_counter_after: udp_after,
        window,
        timeline,
        migration: summary,
    };
    Ok(report)
}

/// Sends `incr` to the guest's UDP service from `netns` with this same binary, as a
/// user would from a shell, and returns the counter it answered.
fn udp_incr(netns: &str, ip: &str) -> Result<u64, CliError> {
    let exe = std::env::current_exe()?;
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(exe)
        .args(["udp", ip, "incr"])
        .output()
        .map_err(|e| format!("cannot run the UDP client in {netns}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("counter ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            format!(
                "UDP service of {ip} did not answer incr: {}{}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into()
        })
}

fn us(v: Option<u64>) -> String {
    v.map(|v| format!("{:.3} ms", v as f64 / 1000.0))
        .unwrap_or_else(|| "not seen".into())
}

pub fn print_report(r: &Report) {
    if !r.timeline.entries.is_empty() {
        println!("what the daemons reported (ms from the first event):");
        for e in &r.timeline.entries {
            println!("  {:>10.3}  {:<8} {}", e.offset_ms, e.source, e.event);
        }
    }
    println!(
        "loss window of {} ({} -> {}), ping every {} s:",
        r.vm, r.from, r.to, r.interval_s
    );
    println!(
        "  pings sent {}, lost {}{}",
        r.ping.pings_sent,
        r.ping.pings_lost,
        if r.ping.lost_seqs.is_empty() {
            String::new()
        } else {
            format!(" (icmp_seq {:?})", r.ping.lost_seqs)
        }
    );
    println!(
        "  longest gap between replies  {:.3} ms",
        r.ping.longest_gap_ms
    );
    println!(
        "  downtime (quiesce -> resume)  {:.3} ms",
        r.downtime_us as f64 / 1000.0
    );
    println!(
        "  resume -> first announce      {}",
        us(r.rarp_after_resume_us)
    );
    println!(
        "  first announce -> FDB move    {}{}",
        us(r.fdb_move_after_rarp_us),
        match (&r.fdb_port_before, &r.fdb_port_after, &r.fdb_moved_by) {
            (Some(b), Some(a), Some(by)) => format!(" ({b} -> {a}, moved by a {by} frame)"),
            _ => String::new(),
        }
    );
    if let (Some(b), Some(a)) = (r.udp_counter_before, r.udp_counter_after) {
        println!("  UDP counter (guest memory)    {b} before, {a} after");
    }
    if !r.memory_sha256_source.is_empty() {
        let same = if r.memory_sha256_source == r.memory_sha256_target {
            "identical"
        } else {
            "DIFFERENT"
        };
        println!(
            "  memory digest at quiesce/resume {same}: {}",
            r.memory_sha256_source
        );
    }
    if r.rarp_after_resume_us.is_none() {
        println!(
            "  no announce: the switch kept sending to the old port; resume -> FDB move {}",
            us(r.fdb_move_after_resume_us)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_namespace_follows_the_fabric_prefix() {
        assert_eq!(client_netns_of(None), "vf-client");
        assert_eq!(client_netns_of(Some("")), "vf-client");
        assert_eq!(client_netns_of(Some("xcli")), "xcli-client");
    }
}
