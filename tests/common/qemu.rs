//! A real QEMU for the namespace tests: started on a vfabric QEMU socket port (or a TAP
//! a vfabric attach port uses), driven
//! over QMP (JSON lines on a Unix socket), killed when dropped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const QEMU: &str = "qemu-system-x86_64";

/// True if QEMU is installed (netns-scripts/test.sh installs it as root). Without it a
/// test prints a loud notice and returns false, unless CI=true, where it fails.
pub fn require_qemu() -> bool {
    let ok = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{QEMU} is missing and CI=true: refusing to skip (netns-scripts/test.sh installs it)"
        );
    }
    eprintln!("\n!!!!!!!! SKIPPED: {QEMU} not found (apt-get install qemu-system-x86) !!!!!!!!\n");
    false
}

/// How a QEMU joins the fabric.
pub enum Netdev<'a> {
    /// `-netdev stream` connecting to a vfabric `qemu-stream:` port.
    Stream(&'a Path),
    /// `-netdev dgram` paired with a vfabric `qemu-dgram:` port: QEMU's own socket and
    /// the port's.
    Dgram { qemu: &'a Path, port: &'a Path },
    /// `-netdev tap` on the TAP `ifname` in namespace `netns` (QEMU runs there), for a
    /// vfabric `attach:` port on that TAP.
    Tap { netns: &'a str, ifname: &'a str },
}

/// One QEMU process and its QMP connection.
pub struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
    /// QMP events seen while waiting for replies.
    pub events: Vec<Value>,
    pub log: PathBuf,
    /// The guest's serial console.
    pub console: PathBuf,
}

impl Qemu {
    /// Starts a QEMU with one virtio NIC of `mac` on `net` and no boot disk (its
    /// firmware finds nothing to boot and halts; the NIC and QEMU's own announce work
    /// all the same). The option ROM is off so the firmware does not PXE-boot.
    /// `incoming`: wait for a migration on that Unix socket. `extra`: more arguments
    /// (a kernel and initramfs to boot, memory size).
    pub fn start(
        dir: &Path,
        name: &str,
        mac: &str,
        net: Netdev<'_>,
        incoming: Option<&Path>,
        extra: &[&str],
    ) -> Qemu {
        Self::start_accel(dir, name, mac, net, incoming, extra, &["kvm", "tcg"])
    }

    /// [`Qemu::start`] with the accelerators to try, in order (QEMU takes the first
    /// that opens).
    #[allow(clippy::too_many_arguments)]
    pub fn start_accel(
        dir: &Path,
        name: &str,
        mac: &str,
        net: Netdev<'_>,
        incoming: Option<&Path>,
        extra: &[&str],
        accel: &[&str],
    ) -> Qemu {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let console = dir.join(format!("{name}.console"));
        let log = dir.join(format!("{name}.log"));
        let netdev = match net {
            Netdev::Stream(p) => format!(
                "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                p.display()
            ),
            Netdev::Dgram { qemu, port } => format!(
                "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                qemu.display(),
                port.display()
            ),
            Netdev::Tap { ifname, .. } => {
                format!("tap,id=n0,ifname={ifname},script=no,downscript=no")
            }
        };
        // In a namespace, `ip netns exec` execs QEMU: the child's pid is QEMU's.
        let mut cmd = match net {
            Netdev::Tap { netns, .. } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns, QEMU]);
                c
            }
            _ => Command::new(QEMU),
        };
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(accel.iter().flat_map(|a| ["-accel", a]))
            .args(["-netdev", &netdev])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
            ])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp_path.display()),
            ])
            .args([
                "-serial",
                &format!("file:{}", dir.join(format!("{name}.console")).display()),
            ])
            .args(extra);
        if let Some(p) = incoming {
            cmd.args(["-incoming", &format!("unix:{}", p.display())]);
        }
        let child = cmd
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("start qemu");
        let t0 = Instant::now();
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&qmp_path) {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "QEMU {name} did not open QMP: {}",
                std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut q = Qemu {
            child,
            qmp: BufReader::new(stream),
            events: vec![],
            log,
            console,
        };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "not QMP: {greeting}");
        q.execute("qmp_capabilities", json!({}));
        q
    }

    fn line(&mut self) -> Value {
        let mut s = String::new();
        let n = self.qmp.read_line(&mut s).expect("read QMP");
        assert!(n > 0, "QEMU closed QMP");
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"))
    }

    /// Runs a QMP command; returns its `return` value (panics on `error`).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let req = json!({"execute": cmd, "arguments": args});
        let stream = self.qmp.get_mut();
        writeln!(stream, "{req}").expect("write QMP");
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            panic!("QMP {cmd} failed: {v}");
        }
    }

    /// Waits up to `timeout` for event `name` (one seen already counts); returns it.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Option<Value> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.iter().find(|e| e["event"] == name) {
                return Some(e.clone());
            }
            if Instant::now() > end {
                return None;
            }
            // A cheap command: its reply brings the events queued before it.
            self.execute("query-status", json!({}));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Migrates to `uri` and waits until it is done; returns `query-migrate`'s reply.
    pub fn migrate(&mut self, uri: &str, timeout: Duration) -> Value {
        self.execute("migrate", json!({"uri": uri}));
        let end = Instant::now() + timeout;
        loop {
            let r = self.execute("query-migrate", json!({}));
            match r["status"].as_str() {
                Some("completed") => return r,
                Some("failed") | Some("cancelled") => panic!("migration failed: {r}"),
                _ => {}
            }
            assert!(Instant::now() < end, "migration did not finish: {r}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of the QEMU process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// µs since the epoch of a QMP event's timestamp.
    pub fn event_t_us(e: &Value) -> u64 {
        e["timestamp"]["seconds"].as_u64().unwrap() * 1_000_000
            + e["timestamp"]["microseconds"].as_u64().unwrap()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
