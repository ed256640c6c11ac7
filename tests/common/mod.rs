//! Helpers of the namespace tests: a root check and a topology guard that builds the
//! fabric with netns-scripts/up.sh (the default one, or a topology file's) under a unique
//! prefix and run directory, and tears it down with down.sh when dropped (also when the
//! test panics).

#![allow(dead_code)]

pub mod capture;
pub mod fleet;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vfabric::port::packet::PacketSocket;

/// True if the test may run. Without root it prints a loud notice and returns false,
/// unless CI=true, where it fails: a skipped namespace test must not pass silently.
pub fn require_root() -> bool {
    if vfabric::sys::tap::is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("namespace tests need root and CI=true: refusing to skip");
    }
    eprintln!();
    eprintln!(
        "!!!!!!!! SKIPPED: this namespace test needs root (run: sudo -E cargo test) !!!!!!!!"
    );
    eprintln!();
    false
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vfabric")
}

/// A short prefix no other topology on the machine uses: "vt" + 4 hex digits.
fn unique_prefix() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut x = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
        .wrapping_add(SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503));
    loop {
        let p = format!("vt{:04x}", x & 0xffff);
        if !Path::new("/run/netns").join(format!("{p}-client")).exists() {
            return p;
        }
        x = x.wrapping_add(7919);
    }
}

/// A shipped topology file: `netns-scripts/topologies/NAME` (e.g. "four-hosts.toml").
pub fn topology_file(name: &str) -> PathBuf {
    repo().join("netns-scripts/topologies").join(name)
}

/// The fabric of one test: the default three namespaces, or what a topology file says.
pub struct Topology {
    pub prefix: String,
    pub run_dir: tempfile::TempDir,
    /// What up.sh built, as the binary validated it: hosts, clients, VMs created at
    /// start, addresses and capacities (for the default fabric: the built-in default).
    pub spec: vfabric::topology::Topology,
    /// The extra environment up.sh ran with; later script runs get it too.
    env: Vec<(String, String)>,
    /// What up.sh printed on stderr (its progress and hints).
    pub up_stderr: String,
    downed: bool,
}

/// An up.sh run that failed (see [`Topology::try_up_file`]): nothing was torn down
/// after it, so a test can check what it left.
pub struct FailedUp {
    pub prefix: String,
    pub run_dir: tempfile::TempDir,
    pub output: Output,
}

impl FailedUp {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
}

impl Topology {
    /// Runs up.sh; panics with its output if it fails.
    pub fn up() -> Topology {
        Self::up_with(&[])
    }

    /// Runs up.sh with extra environment (e.g. VF_SWITCH_ARGS).
    pub fn up_with(env: &[(&str, &str)]) -> Topology {
        Self::up_prepared(env, |_| {})
    }

    /// Runs up.sh with extra environment after `prepare` has seen the (empty) run
    /// directory, e.g. to mount the datastore's file system there.
    pub fn up_prepared(env: &[(&str, &str)], prepare: impl FnOnce(&Path)) -> Topology {
        Self::up_inner(None, env, prepare)
    }

    /// Runs `up.sh FILE`: the fabric a topology file describes, VMs created at start
    /// included; panics with up.sh's output if it fails.
    pub fn up_file(file: impl AsRef<Path>) -> Topology {
        Self::up_file_with(file, &[])
    }

    /// Runs `up.sh FILE` with extra environment (e.g. VF_HOST_ARGS).
    pub fn up_file_with(file: impl AsRef<Path>, env: &[(&str, &str)]) -> Topology {
        Self::up_inner(Some(file.as_ref()), env, |_| {})
    }

    /// Runs `up.sh FILE` and hands back the failure instead of panicking; on success,
    /// the fabric.
    pub fn try_up_file(file: impl AsRef<Path>) -> Result<Topology, FailedUp> {
        let mut t = Self::new_guard(env_vec(&[]), Some(file.as_ref()));
        let out = t.script("up.sh", &[file.as_ref().to_str().expect("utf-8 path")]);
        t.up_stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            return Ok(t);
        }
        t.downed = true;
        let run_dir = std::mem::replace(&mut t.run_dir, tempfile::tempdir().expect("temp dir"));
        Err(FailedUp {
            prefix: t.prefix.clone(),
            run_dir,
            output: out,
        })
    }

    fn new_guard(env: Vec<(String, String)>, file: Option<&Path>) -> Topology {
        // What up.sh will read: the same defaults it gets from the environment.
        let capacity = env
            .iter()
            .find(|(k, _)| k == "VF_HOST_CAPACITY_MB")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(vfabric::topology::DEFAULT_CAPACITY_MB);
        let spec = match file {
            None => vfabric::topology::Topology::builtin(capacity),
            // A file up.sh will refuse gets an empty spec; up.sh says why.
            Some(f) => vfabric::topology::load(f, capacity).unwrap_or_else(|_| {
                vfabric::topology::Topology {
                    vmotion: vfabric::topology::VmotionNetwork::Switch,
                    machines: vec![],
                    clients: vec![],
                    hosts: vec![],
                    vms: vec![],
                }
            }),
        };
        Topology {
            prefix: unique_prefix(),
            run_dir: tempfile::Builder::new()
                .prefix("vfabric-test-")
                .tempdir()
                .expect("temp dir"),
            spec,
            env,
            up_stderr: String::new(),
            downed: false,
        }
    }

    /// Runs up.sh (the default fabric) after `prepare` has seen the topology-to-be (its
    /// prefix and run directory) and returned extra environment. Namespaces `prepare`
    /// makes under the prefix (`<prefix>-NAME`) are removed with the rest, also when
    /// up.sh fails.
    pub fn up_around(prepare: impl FnOnce(&Topology) -> Vec<(String, String)>) -> Topology {
        let mut t = Self::new_guard(vec![], None);
        t.env = prepare(&t);
        let out = t.script("up.sh", &[]);
        t.up_stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "up.sh failed:\n{}\n{}\nswitch log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            t.switch_log()
        );
        t
    }

    fn up_inner(
        file: Option<&Path>,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&Path),
    ) -> Topology {
        let mut t = Self::new_guard(env_vec(env), file);
        prepare(t.run_dir.path());
        let args: Vec<&str> = file
            .map(|f| f.to_str().expect("utf-8 path"))
            .into_iter()
            .collect();
        let out = t.script("up.sh", &args);
        t.up_stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "up.sh failed:\n{}\n{}\nswitch log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            t.switch_log()
        );
        t
    }

    /// Host names, in the topology's order.
    pub fn hosts(&self) -> Vec<String> {
        self.spec.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// The first client's name (the default fabric's: "client").
    pub fn client(&self) -> &str {
        &self
            .spec
            .clients
            .first()
            .expect("the topology has a client")
            .name
    }

    /// Host `name` as the topology gives it (IP, vMotion IP, capacity, extra args).
    pub fn host_spec(&self, name: &str) -> &vfabric::topology::HostSpec {
        self.spec
            .host(name)
            .unwrap_or_else(|| panic!("no host {name} in the topology"))
    }

    /// Host `name`'s vmk1 address (its vMotion listener is on port 8000 there).
    pub fn vmotion_ip(&self, host: &str) -> String {
        self.host_spec(host).vmotion_ip.to_string()
    }

    /// The VMs the topology creates at start.
    pub fn vms(&self) -> &[vfabric::topology::VmSpec] {
        &self.spec.vms
    }

    /// VM `name`'s IP as the topology gives it.
    pub fn vm_ip(&self, name: &str) -> String {
        self.spec
            .vm(name)
            .unwrap_or_else(|| panic!("no VM {name} in the topology"))
            .ip
            .to_string()
    }

    /// Where VM `name` runs now, asking the hosts (`vfabric vm show`).
    pub fn vm_host(&self, name: &str) -> Option<String> {
        let out = self.vfabric(&["vm", "show", name, "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["host"].as_str().map(str::to_string)
    }

    fn script(&self, name: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("netns-scripts").join(name))
            .args(args)
            .env("VF_PREFIX", &self.prefix)
            .env("VFABRIC_RUN_DIR", self.run_dir.path())
            .env("VFABRIC_BIN", bin())
            .env_remove("VF_MIRROR");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("run bash")
    }

    /// Runs `up.sh --restart-switch`: the switch again, same ports, hosts untouched.
    pub fn restart_switch(&self) -> Output {
        self.script("up.sh", &["--restart-switch"])
    }

    /// Runs `up.sh ARGS` (e.g. `--restart-host silo105`) on this fabric, with the
    /// environment it was brought up with.
    pub fn up_sh(&self, args: &[&str]) -> Output {
        self.script("up.sh", args)
    }

    /// The pid of a daemon as recorded by up.sh (`switch`, `vmotion`, a host's name).
    pub fn daemon_pid(&self, name: &str) -> Option<u32> {
        let s = std::fs::read_to_string(self.run_dir.path().join(format!("{name}.pid"))).ok()?;
        s.split_whitespace().next()?.parse().ok()
    }

    /// Runs down.sh (the guard also does on drop).
    pub fn down(&mut self) -> Output {
        self.downed = true;
        self.script("down.sh", &[])
    }

    /// Namespace of `host` (a client's or host's name: client, silo104, …).
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Runs a command inside `host`'s namespace.
    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .args(args)
            .output()
            .expect("run ip netns exec")
    }

    /// Runs the vfabric CLI against this topology's run directory.
    pub fn vfabric(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("VFABRIC_RUN_DIR", self.run_dir.path())
            .output()
            .expect("run vfabric")
    }

    /// `vfabric ARGS --json`, parsed; panics with stderr on failure.
    pub fn vfabric_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.vfabric(&a);
        assert!(
            out.status.success(),
            "vfabric {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// MAC of `ifname` in `host`'s namespace.
    pub fn mac(&self, host: &str, ifname: &str) -> String {
        let out = self.exec(host, &["cat", &format!("/sys/class/net/{ifname}/address")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Pings `ip` from `host`: true if every probe was answered.
    pub fn ping(&self, host: &str, ip: &str, count: u32) -> bool {
        let c = count.to_string();
        self.exec(host, &["ping", "-c", &c, "-i", "0.2", "-W", "2", "-q", ip])
            .status
            .success()
    }

    pub fn switch_log(&self) -> String {
        std::fs::read_to_string(self.run_dir.path().join("switch.log")).unwrap_or_default()
    }

    /// The switch's pid as recorded by up.sh.
    pub fn switch_pid(&self) -> Option<u32> {
        self.daemon_pid("switch")
    }

    /// Namespaces of this prefix that exist now.
    pub fn namespaces(&self) -> Vec<String> {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .map(str::to_string)
            .collect()
    }

    /// Polls `f` every 20 ms for up to `timeout`.
    pub fn wait_for(&self, timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if f() {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if !self.downed {
            let _ = self.script("down.sh", &[]);
        }
    }
}

fn env_vec(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `vfabric events --json` running against a topology, as a user would run it in another
/// shell: started before the action, stopped after, its lines parsed into records.
pub struct EventWatch {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl EventWatch {
    /// Starts `vfabric events --json ARGS` and waits until every daemon it follows has
    /// acknowledged the subscription (it says so on stderr, as tcpdump says
    /// "listening").
    pub fn start(t: &Topology, args: &[&str]) -> EventWatch {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let out = t.run_dir.path().join(format!("events-{n}.jsonl"));
        let err = t.run_dir.path().join(format!("events-{n}.err"));
        let child = Command::new(bin())
            .args(["events", "--json"])
            .args(args)
            .env("VFABRIC_RUN_DIR", t.run_dir.path())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("vfabric events");
        let t0 = Instant::now();
        while !std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("following")
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "vfabric events did not subscribe: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        EventWatch { child, out }
    }

    /// Waits up to `timeout` for a record `want` accepts (the records printed so far
    /// included), and returns it.
    pub fn wait_for(
        &self,
        timeout: Duration,
        want: impl Fn(&vfabric::events::Record) -> bool,
    ) -> Option<vfabric::events::Record> {
        let end = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.out).unwrap_or_default();
            // Only whole lines: the last one may be half written.
            let found = text
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .filter_map(|l| serde_json::from_str::<vfabric::events::Record>(l).ok())
                .find(|r| want(r));
            if found.is_some() || Instant::now() > end {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the watch (after the merge delay has let the last events out) and returns
    /// every record it printed.
    pub fn stop(mut self) -> Vec<vfabric::events::Record> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends raw Ethernet frames out of `ifname` inside `host`'s namespace through an
/// AF_PACKET socket, from a thread of its own that enters the namespace (the test's
/// other threads stay where they are). Frames the kernel refuses (shorter than an
/// Ethernet header, longer than the MTU) are counted, not fatal. Returns how many were
/// sent.
pub fn send_raw(t: &Topology, host: &str, ifname: &str, frames: &[Vec<u8>]) -> usize {
    let netns = Path::new("/run/netns").join(t.ns(host));
    std::thread::scope(|s| {
        s.spawn(|| {
            vfabric::sys::packet::enter_netns(&netns)
                .unwrap_or_else(|e| panic!("enter {}: {e}", netns.display()));
            let sock = PacketSocket::open(ifname)
                .unwrap_or_else(|e| panic!("packet socket on {ifname} in {host}: {e}"));
            frames.iter().filter(|f| sock.send(f).is_ok()).count()
        })
        .join()
        .expect("raw sender thread")
    })
}
