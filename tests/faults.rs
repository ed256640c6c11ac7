//! The fault matrix (root): each fault driven through each migration phase on one
//! fabric, and after every case the promise checked: the VM runs on exactly one host,
//! holds its disk lock there, has the memory it had before the fault (digest), kept its
//! UDP counter, and answers a real ping from the client namespace within 1 s of the
//! outcome. When the fault killed the only running copy (the source, before the target
//! resumed), the promise is instead that the target kept nothing and the error says the
//! VM is lost with that host.
//!
//! Faults: SIGKILL of the target or of the source daemon; SIGSTOP of the target for
//! longer than the migration I/O timeout; the vMotion link down, then up; every vMotion
//! packet dropped (nftables); the datastore full (a small tmpfs, filled); the
//! `vfabric migrate` CLI killed; the switch killed and restarted. Phases: pre-copy,
//! quiesce, bitmap, pull, resume.
//!
//! Each fault lands in its phase through the host daemons' test pause points
//! (`vfabric host --test-pause-dir`, src/host/pause.rs): the migration stops where the
//! phase begins, the fault strikes, the migration goes on and meets it. No sleep decides
//! where a fault lands, and no log is read. A Ctrl-C (SIGINT of `vfabric migrate`)
//! counts as struck once the source has published the typed `migration_cancel_requested`
//! event (`vfabric events --json`): only then does the held phase go on.
//!
//! Where each point is: `precopy` (source: the target admitted the VM, before round 1),
//! `quiesce` (source: the VM just stopped, its disk lock still held), `bitmap` (source:
//! the disk lock released, before the bitmap goes out), `pull` (target: the bitmap is
//! in, before the first page request), `resume` (target: the VM runs there, holds the
//! lock and was announced, before the source is told).
//!
//! The matrix prints a table fault × phase → outcome: where the VM runs (source or
//! target), what `vfabric migrate` answered (migrated, failed, or "cli gone" when the
//! fault killed it), and how long the first answered ping took; FAIL cells are
//! explained below the table. Cells that wait for behaviour
//! not built yet are listed in [`PENDING`] with the reason; they are skipped, and shown
//! as such, unless `VF_FAULTS_PENDING=1`. `VF_FAULTS=kill-target,link-down` and
//! `VF_FAULT_PHASES=pull,resume` run a subset.

mod common;

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, require_root, EventWatch, Topology};
use serde_json::Value;
use vfabric::events::Event;
use vfabric::host::api::{self, HostInfo, VmInfo};

const VM: &str = "vm1";
const VM_IP: &str = "10.10.0.100";
const HOSTS: [&str; 2] = ["silo104", "silo105"];
/// The hosts' migration I/O timeout here: a silent peer fails a migration after this.
/// Long enough that a pause point held while a fault is applied (milliseconds, more on
/// a loaded machine) never trips it, short enough to keep the matrix quick.
const IO_TIMEOUT_MS: u64 = 3000;
/// Size of the datastore's tmpfs: room for the VM's disk records over the whole run.
const DATASTORE_SIZE: &str = "4m";
/// A VM answers ping within this long of the outcome.
const PING_WITHIN: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    KillTarget,
    KillSource,
    StopTarget,
    LinkDown,
    DropVmotion,
    DatastoreFull,
    KillCli,
    InterruptCli,
    SwitchRestart,
}

impl Fault {
    /// In the order they run: the switch last, since a switch that does not come back
    /// leaves nothing for later cases.
    const ALL: [Fault; 9] = [
        Fault::KillTarget,
        Fault::KillSource,
        Fault::StopTarget,
        Fault::LinkDown,
        Fault::DropVmotion,
        Fault::DatastoreFull,
        Fault::KillCli,
        Fault::InterruptCli,
        Fault::SwitchRestart,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillTarget => "kill-target",
            Fault::KillSource => "kill-source",
            Fault::StopTarget => "stop-target",
            Fault::LinkDown => "link-down",
            Fault::DropVmotion => "drop-vmotion",
            Fault::DatastoreFull => "datastore-full",
            Fault::KillCli => "kill-cli",
            Fault::InterruptCli => "ctrl-c-cli",
            Fault::SwitchRestart => "switch-restart",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    PreCopy,
    Quiesce,
    Bitmap,
    Pull,
    Resume,
}

impl Phase {
    const ALL: [Phase; 5] = [
        Phase::PreCopy,
        Phase::Quiesce,
        Phase::Bitmap,
        Phase::Pull,
        Phase::Resume,
    ];

    /// The pause point's name (src/host/pause.rs).
    fn name(self) -> &'static str {
        match self {
            Phase::PreCopy => "precopy",
            Phase::Quiesce => "quiesce",
            Phase::Bitmap => "bitmap",
            Phase::Pull => "pull",
            Phase::Resume => "resume",
        }
    }

    /// Whether the pause point is on the source (else on the target).
    fn on_source(self) -> bool {
        matches!(self, Phase::PreCopy | Phase::Quiesce | Phase::Bitmap)
    }
}

/// Where the VM must run once a case is over.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Back on the source.
    Source,
    /// On the target: it had resumed the VM, holds the disk lock, and the fault only
    /// cut it off from the source.
    Target,
    /// On one host, either: the fault does not decide which (the datastore full: the
    /// target may or may not get its lock; the switch restarted: the vMotion link does
    /// not go through it).
    OneHost,
    /// Nowhere: its only running copy died with the source, and the target must have
    /// discarded its own.
    Lost,
}

fn expect(f: Fault, p: Phase) -> Expect {
    match (f, p) {
        (Fault::KillTarget, _) => Expect::Source,
        (Fault::KillSource, Phase::Resume) => Expect::Target,
        (Fault::KillSource, _) => Expect::Lost,
        (Fault::StopTarget | Fault::LinkDown | Fault::DropVmotion, Phase::Resume) => Expect::Target,
        (Fault::StopTarget | Fault::LinkDown | Fault::DropVmotion, _) => Expect::Source,
        // The daemon runs the migration, not the CLI: a CLI killed outright (no
        // chance to cancel) leaves it to finish, as QEMU does when its QMP client goes.
        (Fault::KillCli, _) => Expect::Target,
        // Ctrl-C cancels, up to the point of no return (the device state sent; the
        // target may resume at any moment after it).
        (Fault::InterruptCli, Phase::Resume) => Expect::Target,
        (Fault::InterruptCli, _) => Expect::Source,
        (Fault::DatastoreFull | Fault::SwitchRestart, _) => Expect::OneHost,
    }
}

/// Cells that fail until work not merged yet lands: (fault, phases, the behaviour they
/// wait for). Remove an entry as soon as its cells pass; the matrix
/// reports a pending cell that passes when run with `VF_FAULTS_PENDING=1`.
const PENDING: &[(Fault, &[Phase], &str)] = &[];

fn pending(f: Fault, p: Phase) -> Option<&'static str> {
    PENDING
        .iter()
        .find(|(pf, pp, _)| *pf == f && pp.contains(&p))
        .map(|(_, _, why)| *why)
}

/// The result of one cell.
enum Cell {
    /// As expected; what happened.
    Pass(String),
    Fail(String),
    /// Not run: pending on unmerged work.
    Pending(&'static str),
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cell::Pass(s) => f.write_str(s),
            Cell::Fail(_) => f.write_str("FAIL"),
            Cell::Pending(_) => f.write_str("pending"),
        }
    }
}

fn other(host: &str) -> &'static str {
    if host == HOSTS[0] {
        HOSTS[1]
    } else {
        HOSTS[0]
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
    .trim()
    .to_string()
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(format!("{cmd:?}: {}", text(&o)))
    }
}

fn signal(pid: u32, sig: &str) -> Result<(), String> {
    run(Command::new("kill").args([sig, &pid.to_string()])).map(|_| ())
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Polls `f` every 5 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What a struck fault leaves to undo once the outcome is known.
enum Undo {
    Nothing,
    Continue(u32),
    LinkUp(String),
    DropTable(String),
    FreeDatastore(PathBuf),
    RestartSwitch,
}

/// The fabric the matrix runs on: the usual three namespaces, the datastore on a small
/// tmpfs (so that it can be filled), both hosts with a short I/O timeout and the pause
/// points on.
struct Fabric {
    t: Topology,
    pause_dir: tempfile::TempDir,
    datastore: PathBuf,
    /// The host that runs the VM between cases.
    home: String,
    /// A restart of the switch failed: nothing later can pass.
    broken: Option<String>,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        // Nothing of ours may stay stopped, or it would ignore down.sh's SIGTERM.
        for name in ["silo104", "silo105", "switch"] {
            if let Some(pid) = self.t.daemon_pid(name) {
                let _ = signal(pid, "-CONT");
            }
        }
        self.t.down();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.datastore)
            .status();
    }
}

impl Fabric {
    fn up() -> Fabric {
        let pause_dir = tempfile::Builder::new()
            .prefix("vfabric-pause-")
            .tempdir()
            .expect("temp dir");
        let host_args = format!(
            "--io-timeout-ms {IO_TIMEOUT_MS} --test-pause-dir {}",
            pause_dir.path().display()
        );
        let mut datastore = PathBuf::new();
        let t = Topology::up_prepared(&[("VF_HOST_ARGS", &host_args)], |run_dir| {
            datastore = run_dir.join("datastore");
            std::fs::create_dir_all(&datastore).expect("datastore dir");
            // Mounted before the host daemons start: `ip netns exec` gives each its own
            // copy of the mount table, taken when it starts.
            run(Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={DATASTORE_SIZE},mode=0700"),
                ])
                .arg("vf-datastore")
                .arg(&datastore))
            .expect("mount the datastore tmpfs");
        });
        let mut fx = Fabric {
            t,
            pause_dir,
            datastore,
            home: HOSTS[0].to_string(),
            broken: None,
        };
        fx.create_vm(HOSTS[0]).expect("create vm1");
        fx
    }

    fn socket(&self, host: &str) -> PathBuf {
        self.t.run_dir.path().join(format!("{host}.sock"))
    }

    // The three control requests the matrix makes itself (the rest goes through the
    // CLI, as a user's would).

    fn info(&self, host: &str) -> Option<HostInfo> {
        vfabric::control::request(self.socket(host), api::Info {}).ok()
    }

    fn list(&self, host: &str) -> Option<Vec<VmInfo>> {
        vfabric::control::request(self.socket(host), api::VmList {}).ok()
    }

    fn destroy(&self, host: &str) {
        let _ = vfabric::control::request(
            self.socket(host),
            api::VmDestroy {
                name: VM.to_string(),
            },
        );
    }

    /// The VM on every host that answers.
    fn vms(&self) -> Vec<VmInfo> {
        HOSTS
            .iter()
            .filter_map(|h| self.list(h))
            .flatten()
            .filter(|v| v.name == VM)
            .collect()
    }

    fn vfabric(&self, args: &[&str]) -> Result<String, String> {
        let o = self.t.vfabric(args);
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
        } else {
            Err(format!("vfabric {}: {}", args.join(" "), text(&o)))
        }
    }

    fn udp(&self, req: &str) -> Result<String, String> {
        let o = self.t.exec("client", &[bin(), "udp", VM_IP, req]);
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
        } else {
            Err(format!("udp {req}: {}", text(&o)))
        }
    }

    fn digest(&self) -> Result<String, String> {
        let out = self.vfabric(&["vm", "digest", VM, "--json"])?;
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        Ok(v["memory_sha256"].as_str().unwrap_or_default().to_string())
    }

    /// Pings the VM from the client every 50 ms until it answers, for up to 1 s;
    /// returns how long the first answer took.
    fn ping_within(&self) -> Result<Duration, String> {
        let t0 = Instant::now();
        let o = self.t.exec(
            "client",
            &[
                "ping", "-n", "-q", "-c", "1", "-i", "0.05", "-w", "1", VM_IP,
            ],
        );
        // ping's own deadline (-w 1) bounds the wait; the time taken includes
        // starting it in the namespace.
        if o.status.success() {
            Ok(t0.elapsed())
        } else {
            Err(format!(
                "{VM} did not answer ping within {PING_WITHIN:?} of the outcome"
            ))
        }
    }

    fn create_vm(&mut self, host: &str) -> Result<(), String> {
        self.vfabric(&[
            "vm",
            "create",
            VM,
            "--host",
            host,
            "--ip",
            VM_IP,
            "--memory-mb",
            "32",
            "--workload",
            "idle",
        ])?;
        self.home = host.to_string();
        if !wait_until(Duration::from_secs(20), || self.t.ping("client", VM_IP, 1)) {
            return Err(format!("{VM} created on {host} does not answer ping"));
        }
        Ok(())
    }

    fn restart_host(&self, host: &str) -> Result<(), String> {
        let o = self.t.up_sh(&["--restart-host", host]);
        if o.status.success() {
            Ok(())
        } else {
            Err(format!("up.sh --restart-host {host}: {}", text(&o)))
        }
    }

    /// Waits until no host holds a migration in flight: nothing reserved beyond its
    /// VMs (an incoming migration's reservation is gone) and no VM migrating.
    fn settle(&self) -> Result<(), String> {
        let mut last = String::new();
        let ok = wait_until(Duration::from_secs(20), || {
            last.clear();
            for h in HOSTS {
                let Some(info) = self.info(h) else {
                    last = format!("{h} does not answer");
                    return false;
                };
                let list = self.list(h).unwrap_or_default();
                let held: u64 = list.iter().map(|v| v.reserved_mb).sum();
                if info.reserved_mb != held {
                    last = format!(
                        "{h} reserves {} MB, its VMs {held} MB: an incoming copy is kept",
                        info.reserved_mb
                    );
                    return false;
                }
                if let Some(v) = list.iter().find(|v| v.state == "migrating") {
                    last = format!("{} still migrating on {h}", v.name);
                    return false;
                }
            }
            true
        });
        if ok {
            Ok(())
        } else {
            Err(format!("the hosts did not settle within 20 s: {last}"))
        }
    }

    /// Brings the fabric back to its starting point after a case that failed: both
    /// hosts up, nothing in flight, the VM running once.
    fn repair(&mut self) -> Result<(), String> {
        if let Some(b) = &self.broken {
            return Err(b.clone());
        }
        for h in HOSTS {
            if let Some(pid) = self.t.daemon_pid(h) {
                let _ = signal(pid, "-CONT");
            }
            if self.info(h).is_none() {
                self.restart_host(h)?;
            }
        }
        self.settle()?;
        let vms = self.vms();
        let running: Vec<&VmInfo> = vms.iter().filter(|v| v.state == "running").collect();
        if vms.len() == 1 && running.len() == 1 {
            self.home = running[0].host.clone();
            if self.t.ping("client", VM_IP, 1) {
                return Ok(());
            }
            // A case that failed may leave the switch pointing at the wrong port (a VM
            // resumed without an announce): start the next one from a clean table.
            self.vfabric(&["fdb", "flush"])?;
            if wait_until(Duration::from_secs(10), || self.t.ping("client", VM_IP, 1)) {
                return Ok(());
            }
            return Err(format!("{VM} on {} does not answer ping", self.home));
        }
        for v in &vms {
            self.destroy(&v.host);
        }
        let home = self.home.clone();
        self.create_vm(&home)
    }

    /// Makes the datastore full: one file takes every free block.
    fn fill_datastore(&self) -> Result<PathBuf, String> {
        let path = self.datastore.join("filler");
        let mut f = std::fs::File::create(&path).map_err(|e| format!("filler: {e}"))?;
        let chunk = vec![0xa5u8; 64 << 10];
        let mut small = false;
        loop {
            let buf = if small { &chunk[..4096] } else { &chunk[..] };
            match f.write(buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    if small {
                        break;
                    }
                    small = true;
                }
                Err(e) => return Err(format!("filler: {e}")),
            }
        }
        Ok(path)
    }

    /// Strikes `f`; the migration of the case is paused meanwhile.
    fn strike(
        &mut self,
        f: Fault,
        (src, dst): (&str, &str),
        cli: &mut Child,
        watch: Option<&EventWatch>,
    ) -> Result<Undo, String> {
        let pid = |h: &str| {
            self.t
                .daemon_pid(h)
                .ok_or_else(|| format!("no pid file for {h}"))
        };
        match f {
            Fault::KillTarget | Fault::KillSource => {
                let victim = if f == Fault::KillTarget { dst } else { src };
                let p = pid(victim)?;
                signal(p, "-KILL")?;
                if !wait_until(Duration::from_secs(5), || !alive(p)) {
                    return Err(format!("{victim} (pid {p}) survived SIGKILL"));
                }
                Ok(Undo::Nothing)
            }
            Fault::StopTarget => {
                let p = pid(dst)?;
                signal(p, "-STOP")?;
                Ok(Undo::Continue(p))
            }
            Fault::LinkDown => {
                let ns = self.t.ns(src);
                run(Command::new("ip").args(["-n", &ns, "link", "set", "vmk1", "down"]))?;
                Ok(Undo::LinkUp(ns))
            }
            Fault::DropVmotion => {
                let ns = self.t.ns(src);
                let rules = "table inet vf_fault {\n\
                     chain input { type filter hook input priority 0; iifname \"vmk1\" drop; }\n\
                     chain output { type filter hook output priority 0; oifname \"vmk1\" drop; }\n\
                     }\n";
                let mut child = Command::new("ip")
                    .args(["netns", "exec", &ns, "nft", "-f", "-"])
                    .stdin(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("nft: {e}"))?;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(rules.as_bytes())
                    .map_err(|e| format!("nft: {e}"))?;
                let o = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
                if !o.status.success() {
                    return Err(format!("nft -f: {}", text(&o)));
                }
                Ok(Undo::DropTable(ns))
            }
            Fault::DatastoreFull => Ok(Undo::FreeDatastore(self.fill_datastore()?)),
            Fault::KillCli => {
                cli.kill().map_err(|e| format!("kill the CLI: {e}"))?;
                let _ = cli.wait();
                Ok(Undo::Nothing)
            }
            Fault::InterruptCli => {
                signal(cli.id(), "-INT")?;
                // The migration goes on only once the source has the cancel: Ctrl-C
                // lands in the phase, not wherever the CLI's request happens to reach
                // the daemon.
                let watch = watch.ok_or("no event watch")?;
                let asked = watch.wait_for(Duration::from_secs(10), |r| {
                    matches!(&r.event, Event::MigrationCancelRequested { vm, host }
                        if vm == VM && host == src)
                });
                if asked.is_none() {
                    return Err(format!(
                        "no migration_cancel_requested event from {src} within 10 s of SIGINT"
                    ));
                }
                Ok(Undo::Nothing)
            }
            Fault::SwitchRestart => {
                let p = pid("switch")?;
                signal(p, "-KILL")?;
                if !wait_until(Duration::from_secs(5), || !alive(p)) {
                    return Err(format!("the switch (pid {p}) survived SIGKILL"));
                }
                Ok(Undo::RestartSwitch)
            }
        }
    }

    fn undo(&mut self, u: Undo) -> Result<(), String> {
        match u {
            Undo::Nothing => Ok(()),
            Undo::Continue(pid) => signal(pid, "-CONT"),
            Undo::LinkUp(ns) => {
                run(Command::new("ip").args(["-n", &ns, "link", "set", "vmk1", "up"])).map(|_| ())
            }
            Undo::DropTable(ns) => run(Command::new("ip").args([
                "netns", "exec", &ns, "nft", "delete", "table", "inet", "vf_fault",
            ]))
            .map(|_| ()),
            Undo::FreeDatastore(p) => std::fs::remove_file(&p).map_err(|e| format!("{e}")),
            Undo::RestartSwitch => {
                let o = self.t.up_sh(&["--restart-switch"]);
                if o.status.success() {
                    Ok(())
                } else {
                    let why = format!("up.sh --restart-switch: {}", text(&o));
                    self.broken = Some(format!("the switch was not restarted ({why})"));
                    Err(why)
                }
            }
        }
    }

    /// One case: the VM moves from its home to the other host, and `f` strikes at the
    /// start of `p`. Returns what happened, or why it is not what the design promises.
    fn case(&mut self, f: Fault, p: Phase) -> Result<String, String> {
        self.repair()
            .map_err(|e| format!("fabric not ready: {e}"))?;
        let src = self.home.clone();
        let dst = other(&src).to_string();
        let counter = self.udp("incr")?;
        let digest = self.digest()?;

        let point_host = if p.on_source() { &src } else { &dst };
        let armed = self
            .pause_dir
            .path()
            .join(format!("{point_host}.{}", p.name()));
        let paused = self
            .pause_dir
            .path()
            .join(format!("{point_host}.{}.paused", p.name()));
        // Started before the migration, so that subscribing costs nothing while a phase
        // is held.
        let watch = (f == Fault::InterruptCli).then(|| EventWatch::start(&self.t, &[]));
        std::fs::write(&armed, b"").map_err(|e| format!("arm: {e}"))?;
        let mut cli = Command::new(bin())
            .args(["migrate", VM, "--to", &dst, "--json"])
            .env("VFABRIC_RUN_DIR", self.t.run_dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("vfabric migrate: {e}"))?;
        let reached = wait_until(Duration::from_secs(30), || {
            paused.exists() || matches!(cli.try_wait(), Ok(Some(_)))
        });
        if !paused.exists() {
            let _ = std::fs::remove_file(&armed);
            let _ = cli.kill();
            let o = cli.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "the migration never reached {} (timed out: {}): {}",
                p.name(),
                !reached,
                text(&o)
            ));
        }
        let held = Instant::now();
        let struck = self.strike(f, (&src, &dst), &mut cli, watch.as_ref());
        let _ = std::fs::remove_file(&paused);
        let held = held.elapsed();
        let released = Instant::now();
        let undo = struck?;
        // The peer waiting across the pause must not have timed out because of it, or
        // the outcome would be the timeout's, not the fault's.
        if held > Duration::from_millis(IO_TIMEOUT_MS / 2) {
            let _ = self.undo(undo);
            let _ = cli.wait();
            return Err(format!(
                "inconclusive: striking took {held:?}, near the {IO_TIMEOUT_MS} ms I/O timeout"
            ));
        }

        // The outcome: the CLI's answer, or, with the CLI gone, the hosts settling.
        let (cli_ok, cli_msg) = if f == Fault::KillCli {
            self.settle()?;
            (None, String::new())
        } else {
            let done = wait_until(Duration::from_secs(60), || {
                matches!(cli.try_wait(), Ok(Some(_)))
            });
            let answered = released.elapsed();
            if !done {
                let _ = cli.kill();
            }
            let o = cli.wait_with_output().map_err(|e| e.to_string())?;
            if !done {
                return Err(format!(
                    "vfabric migrate still running after 60 s: {}",
                    text(&o)
                ));
            }
            if f == Fault::InterruptCli && answered > Duration::from_secs(1) {
                return Err(format!(
                    "Ctrl-C: vfabric migrate answered {answered:?} after it, not within 1 s: {}",
                    text(&o)
                ));
            }
            (
                Some(o.status.success()),
                String::from_utf8_lossy(&o.stderr).trim().to_string(),
            )
        };
        if f == Fault::KillSource {
            eprintln!("    the CLI said: {cli_msg}");
        }
        let undone = self.undo(undo);
        let want = expect(f, p);
        let ping = if want == Expect::Lost {
            None
        } else {
            undone.clone()?;
            Some(self.ping_within())
        };
        undone?;
        for h in HOSTS {
            if self.info(h).is_none() {
                self.restart_host(h)?;
            }
        }
        self.settle()?;

        let vms = self.vms();
        if want == Expect::Lost {
            if !vms.is_empty() {
                let on: Vec<String> = vms
                    .iter()
                    .map(|v| format!("{} ({})", v.host, v.state))
                    .collect();
                return Err(format!(
                    "{VM} should be lost with {src}, yet it is on {on:?}"
                ));
            }
            if !(cli_msg.contains(&src) && cli_msg.contains("lost")) {
                return Err(format!(
                    "the error must say {VM} is lost with {src}; it said: {cli_msg:?}"
                ));
            }
            self.create_vm(&src)?;
            return Ok("lost with the source".to_string());
        }

        let running: Vec<&VmInfo> = vms.iter().filter(|v| v.state == "running").collect();
        let on: Vec<String> = vms
            .iter()
            .map(|v| format!("{} ({})", v.host, v.state))
            .collect();
        if vms.len() != 1 || running.len() != 1 {
            return Err(format!(
                "{VM} must run on exactly one host; it is on {on:?} (cli: {cli_msg:?})"
            ));
        }
        let host = running[0].host.clone();
        self.home = host.clone();
        match want {
            Expect::Source if host != src => {
                return Err(format!("{VM} should be back on {src}, it runs on {host}"))
            }
            Expect::Target if host != dst => {
                return Err(format!("{VM} should stay on {dst}, it runs on {host}"))
            }
            _ => {}
        }
        if f == Fault::KillSource && !cli_msg.contains(&host) {
            return Err(format!(
                "the source died; the error must say where {VM} is ({host}); it said: {cli_msg:?}"
            ));
        }
        if running[0].disk_owner.as_deref() != Some(host.as_str()) {
            return Err(format!(
                "{VM} runs on {host} without its disk lock (owner: {:?})",
                running[0].disk_owner
            ));
        }
        let took = match ping {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e),
            None => Duration::ZERO,
        };
        let after = self.digest()?;
        if after != digest {
            return Err(format!(
                "memory digest changed: {digest} before, {after} after"
            ));
        }
        let got = self.udp("get")?;
        if got != counter {
            return Err(format!("UDP counter: {got:?} after, {counter:?} before"));
        }
        let how = match cli_ok {
            Some(true) => "migrated",
            Some(false) => "failed",
            None => "cli gone",
        };
        let side = if host == src { "source" } else { "target" };
        Ok(format!("{side} ({how}) {} ms", took.as_millis()))
    }
}

fn selected<T: Copy>(all: &[T], var: &str, name: impl Fn(T) -> &'static str) -> Vec<T> {
    match std::env::var(var) {
        Ok(list) if !list.trim().is_empty() => {
            let want: Vec<&str> = list.split(',').map(str::trim).collect();
            for w in &want {
                assert!(
                    all.iter().any(|&x| name(x) == *w),
                    "{var}: unknown name {w:?}"
                );
            }
            all.iter()
                .copied()
                .filter(|&x| want.contains(&name(x)))
                .collect()
        }
        _ => all.to_vec(),
    }
}

#[test]
fn every_fault_in_every_phase_leaves_the_vm_on_one_host_intact_and_reachable() {
    if !require_root() {
        return;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        panic!("nft not found: run netns-scripts/test.sh (it installs nftables) or apt-get install nftables");
    }
    let with_pending = std::env::var("VF_FAULTS_PENDING").as_deref() == Ok("1");
    let faults = selected(&Fault::ALL, "VF_FAULTS", Fault::name);
    let phases = selected(&Phase::ALL, "VF_FAULT_PHASES", Phase::name);
    let started = Instant::now();
    let mut fx = Fabric::up();
    let mut results: Vec<(Fault, Phase, Cell, Duration)> = Vec::new();
    for &f in &faults {
        for &p in &phases {
            let t0 = Instant::now();
            let cell = match pending(f, p) {
                Some(why) if !with_pending => Cell::Pending(why),
                _ => match fx.case(f, p) {
                    Ok(s) => Cell::Pass(s),
                    Err(e) => Cell::Fail(e),
                },
            };
            eprintln!(
                "{:<15} {:<8} {:>6} ms  {}",
                f.name(),
                p.name(),
                t0.elapsed().as_millis(),
                match &cell {
                    Cell::Fail(e) => format!("FAIL: {e}"),
                    Cell::Pending(why) => format!("pending: {why}"),
                    c => c.to_string(),
                }
            );
            results.push((f, p, cell, t0.elapsed()));
        }
    }
    drop(fx);

    // The table: fault × phase → outcome.
    let width = 23;
    let mut table = format!("\n{:<15}", "fault \\ phase");
    for p in &phases {
        table += &format!(" | {:<width$}", p.name());
    }
    table += "\n";
    for &f in &faults {
        table += &format!("{:<15}", f.name());
        for &p in &phases {
            let c = results
                .iter()
                .find(|(rf, rp, _, _)| *rf == f && *rp == p)
                .map(|(_, _, c, _)| c.to_string())
                .unwrap_or_default();
            let c: String = c.chars().take(width).collect();
            table += &format!(" | {c:<width$}");
        }
        table += "\n";
    }
    eprintln!("{table}");
    eprintln!(
        "fault matrix: {} cells in {:.0} s",
        results.len(),
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(f, p, c, _)| match c {
            Cell::Fail(e) => Some(format!("{} in {}: {e}", f.name(), p.name())),
            _ => None,
        })
        .collect();
    for (f, p, c, _) in &results {
        if let Cell::Pending(why) = c {
            eprintln!("pending {} in {}: {why}", f.name(), p.name());
        }
        if let (Cell::Pass(_), Some(_)) = (c, pending(*f, *p)) {
            eprintln!(
                "NOTE: {} in {} passes: remove it from PENDING",
                f.name(),
                p.name()
            );
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cells failed:\n{}",
        failed.len(),
        results.len(),
        failed.join("\n")
    );
}
