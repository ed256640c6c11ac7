//! Helpers of the fleet tests (maintenance mode, balancing): one-line refusals, the
//! hosts' figures, a capacity sampler and background pings.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{bin, Topology};
use vfabric::measure::{parse_ping_line, ping_stats, PingStats};

pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn ok(out: std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates VM `name` on `host` with a workload dirtying `rate` pages/s, and checks that
/// it answers ping from the client.
pub fn create_vm(
    t: &Topology,
    name: &str,
    host: &str,
    ip: &str,
    memory_mb: u64,
    workload: &str,
    rate: u32,
) {
    ok(
        t.vfabric(&[
            "vm",
            "create",
            name,
            "--host",
            host,
            "--memory-mb",
            &memory_mb.to_string(),
            "--ip",
            ip,
            "--workload",
            workload,
            "--dirty-rate",
            &rate.to_string(),
        ]),
        "vm create",
    );
    assert!(t.ping("client", ip, 2), "{name} does not answer ping");
}

/// The one line the binary prints for a refused command.
pub fn refused(out: std::process::Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} should be refused:\n{}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{what}: one line, not {err}");
    assert!(err.starts_with("vfabric: error: "), "{err}");
    err
}

/// Host name → (the host's JSON), from `vfabric hosts --json`.
pub fn hosts(t: &Topology) -> BTreeMap<String, serde_json::Value> {
    t.vfabric_json(&["hosts"])
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["name"].as_str().unwrap().to_string(), h.clone()))
        .collect()
}

pub fn vm_host(t: &Topology, vm: &str) -> String {
    t.vfabric_json(&["vm", "show", vm])["host"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Samples every host's reservation every 100 ms on a thread of its own until stopped;
/// records any host above its capacity.
pub struct CapacityWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>, u64)>,
}

impl CapacityWatch {
    pub fn start(t: &Topology) -> CapacityWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let run_dir = t.run_dir.path().to_path_buf();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut samples, mut over, mut max_incoming) = (0, Vec::new(), 0);
            while !s.load(Ordering::Relaxed) {
                let out = Command::new(bin())
                    .args(["hosts", "--json"])
                    .env("VFABRIC_RUN_DIR", &run_dir)
                    .output()
                    .expect("vfabric hosts");
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                    samples += 1;
                    for h in v.as_array().unwrap() {
                        let (r, c) = (h["reserved_mb"].as_u64(), h["capacity_mb"].as_u64());
                        if r > c {
                            over.push(h.to_string());
                        }
                        max_incoming = max_incoming.max(h["incoming_mb"].as_u64().unwrap_or(0));
                    }
                }
                // Often enough to see every migration (each lasts half a second or
                // more), seldom enough not to load the daemons it watches.
                std::thread::sleep(Duration::from_millis(100));
            }
            (samples, over, max_incoming)
        });
        CapacityWatch { stop, thread }
    }

    /// (samples taken, any sample above capacity, the largest in-flight reservation seen)
    pub fn stop(self) -> (usize, Vec<String>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// `ping -D -O -i 0.01 IP` from the client, in the background.
pub struct Pinger {
    child: Child,
}

impl Pinger {
    pub fn start(t: &Topology, ip: &str) -> Pinger {
        let child = Command::new("ip")
            .args(["netns", "exec", &t.ns("client")])
            .args(["ping", "-D", "-O", "-n", "-i", "0.01", ip])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ping");
        Pinger { child }
    }

    pub fn stop(mut self) -> PingStats {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut o, &mut out);
        }
        let _ = self.child.wait();
        let lines: Vec<_> = out.lines().filter_map(parse_ping_line).collect();
        ping_stats(&lines)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn udp(t: &Topology, ip: &str, req: &[&str]) -> String {
    let mut args = vec![bin(), "udp", ip];
    args.extend_from_slice(req);
    ok(t.exec("client", &args), "vfabric udp")
}

/// The probes of `s` lost before ping was stopped (the last one may still have been in
/// flight then).
pub fn lost(s: &PingStats) -> Vec<u64> {
    s.lost_seqs
        .iter()
        .copied()
        .filter(|&q| q < s.pings_sent)
        .collect()
}

/// Most probes (10 ms apart) a VM may lose to its switch-over: the book's "on a bad
/// day, one packet" at 100 probes a second, with the RARP and FDB move after resume.
pub const MAX_LOST: usize = 5;

/// Each VM (name, its pings) lost at most [`MAX_LOST`] probes, all in one window.
pub fn check_losses<'a>(losses: impl IntoIterator<Item = (&'a str, &'a PingStats)>) {
    for (vm, s) in losses {
        let lost = lost(s);
        assert!(s.pings_sent >= 50, "{vm}: {s:?}");
        assert!(
            lost.len() <= MAX_LOST,
            "{vm} lost {} pings (at most {MAX_LOST}): {s:?}",
            lost.len()
        );
        assert!(
            lost.windows(2).all(|w| w[1] - w[0] <= 5),
            "{vm} lost pings apart from its switch-over: {lost:?}"
        );
    }
}
