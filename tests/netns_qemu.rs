//! Namespace tests with a real QEMU on vfabric's QEMU socket ports: QEMU's own
//! announce frames cross the switch byte-identical, and a QEMU live migration between
//! two ports moves the switch's FDB on the destination QEMU's first RARP, on socket
//! ports and on attach ports over the QEMUs' own TAPs.
//!
//! The QEMUs boot nothing (no disk; the firmware halts): QEMU itself writes the RARP
//! frames (QMP `announce-self`, and on resume after a migration), so these tests need
//! no guest OS and run in a few seconds with KVM or TCG. Needs root and
//! qemu-system-x86 (netns-scripts/test.sh installs it).

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::qemu::{require_qemu, Netdev, Qemu};
use common::{require_root, EventWatch, Topology};
use serde_json::json;
use vfabric::events::Event;
use vfabric::migration::announce::rarp_frame;
use vfabric::port::packet::PacketSocket;
use vfabric::wire::MacAddr;

const MAC: &str = "52:54:00:0a:0a:65";

/// RARP frames seen on `ifname` in namespace `ns` while `f` runs: (µs since the
/// epoch when read, bytes).
fn capture_rarp<T>(ns: &str, ifname: &str, f: impl FnOnce() -> T) -> (T, Vec<(u64, Vec<u8>)>) {
    let stop = AtomicBool::new(false);
    let ready = AtomicBool::new(false);
    let netns = Path::new("/run/netns").join(ns);
    std::thread::scope(|s| {
        let cap = s.spawn(|| {
            vfabric::sys::packet::enter_netns(&netns).expect("enter netns");
            let sock = PacketSocket::open(ifname).expect("packet socket");
            ready.store(true, Ordering::SeqCst);
            let mut buf = vec![0u8; 65_600];
            let mut got = vec![];
            while !stop.load(Ordering::SeqCst) {
                if let Ok(Some(n)) = sock.recv(&mut buf, Duration::from_millis(20)) {
                    let t = vfabric::clock::unix_micros();
                    if n >= 14 && buf[12..14] == [0x80, 0x35] {
                        got.push((t, buf[..n].to_vec()));
                    }
                }
            }
            got
        });
        while !ready.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = f();
        // QEMU's default schedule ends 800 ms after the first frame: let it finish.
        std::thread::sleep(Duration::from_millis(1200));
        stop.store(true, Ordering::SeqCst);
        (r, cap.join().expect("capture thread"))
    })
}

/// The switch alone (no hosts) with the `--port` arguments `ports` makes for the fabric
/// (its prefix and run directory are known by then).
fn switch_with_ports(ports: impl FnOnce(&Topology) -> String) -> Topology {
    Topology::up_around(|t| {
        vec![
            ("VF_HOSTS".into(), "0".into()),
            ("VF_SWITCH_ARGS".into(), ports(t)),
        ]
    })
}

/// True when the 1-minute load average exceeds the number of CPUs.
fn load_over_cpus() -> bool {
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    load > cpus as f64
}

fn moved_to(r: &vfabric::events::Record, mac: MacAddr, port: &str) -> bool {
    matches!(&r.event, Event::MacMoved { mac: m, to, .. } if *m == mac && to == port)
}

/// QEMU `a`'s own announce (two rounds) on port qa: every frame reaches the client as
/// QEMU wrote it, and the switch learns the MAC on qa.
fn announce_reaches_the_client(t: &Topology, a: &mut Qemu, rarp: &[u8]) {
    let ((), seen) = capture_rarp(&t.ns(t.client()), "eth0", || {
        a.execute(
            "announce-self",
            json!({"initial": 50, "max": 550, "rounds": 2, "step": 50}),
        );
    });
    assert_eq!(seen.len(), 2, "two announce rounds: {seen:?}");
    for (_, f) in &seen {
        assert_eq!(f, rarp, "QEMU's RARP, byte for byte");
    }
    let fdb = t.vfabric_json(&["fdb", "show"]);
    assert!(
        fdb.as_array()
            .unwrap()
            .iter()
            .any(|r| r["mac"] == MAC && r["port"] == "qa"),
        "learned on qa: {fdb}"
    );
}

/// What a QEMU live migration from qa to qb showed.
struct Migrated {
    /// QMP's `query-migrate` at the end.
    mig: serde_json::Value,
    /// The destination QEMU's RESUME event.
    resume: serde_json::Value,
    /// The switch's move of the MAC to qb.
    moved: vfabric::events::Record,
    /// When the client read the first RARP after the migration, µs since the epoch.
    first_at_client: u64,
}

/// Live-migrates QEMU `a` (on qa) to `b` (on qb, started with `-incoming` on
/// `dir/mig.sock`) while `watch` follows the switch: QEMU's five RARPs after resume
/// reach the client byte for byte, and the first moves the MAC from qa to qb, once and
/// before the client sees it.
fn migration_moves_the_fdb(
    t: &Topology,
    dir: &Path,
    (a, b): (&mut Qemu, &mut Qemu),
    watch: EventWatch,
    rarp: &[u8],
) -> Migrated {
    let mac: MacAddr = MAC.parse().unwrap();
    let (mig, seen) = capture_rarp(&t.ns(t.client()), "eth0", || {
        a.migrate(
            &format!("unix:{}", dir.join("mig.sock").display()),
            Duration::from_secs(60),
        )
    });
    let resume = b
        .wait_event("RESUME", Duration::from_secs(10))
        .expect("destination QEMU resumed");
    let moved = watch
        .wait_for(Duration::from_secs(5), |r| moved_to(r, mac, "qb"))
        .expect("the FDB moved to qb");
    let records = watch.stop();
    assert!(
        matches!(&moved.event, Event::MacMoved { from, ethertype, .. } if from == "qa" && ethertype == "rarp"),
        "{moved:?}"
    );
    // QEMU's default announce: 5 rounds after resume, each reaching the client whole.
    assert_eq!(seen.len(), 5, "QEMU's five RARPs after resume: {seen:?}");
    for (_, f) in &seen {
        assert_eq!(f, rarp, "QEMU's RARP, byte for byte");
    }
    assert!(
        seen[0].0 >= moved.t_us,
        "the client saw the RARP before the move"
    );
    let moves = records.iter().filter(|r| moved_to(r, mac, "qb")).count();
    assert_eq!(moves, 1, "one move: the later RARPs find the MAC on qb");
    Migrated {
        mig,
        resume,
        moved,
        first_at_client: seen[0].0,
    }
}

#[test]
fn qemu_announce_and_migration_through_stream_ports() {
    if !require_root() || !require_qemu() {
        return;
    }
    let mut t = switch_with_ports(|t| {
        let dir = t.run_dir.path();
        format!(
            "--port qa=qemu-stream:{} --port qb=qemu-stream:{}",
            dir.join("qa.sock").display(),
            dir.join("qb.sock").display()
        )
    });
    let dir = t.run_dir.path().to_path_buf();
    let mac: MacAddr = MAC.parse().unwrap();
    let rarp = rarp_frame(mac).to_vec();
    let client_ns = t.ns(t.client());

    let mut a = Qemu::start(
        &dir,
        "qa",
        MAC,
        Netdev::Stream(&dir.join("qa.sock")),
        None,
        &[],
    );
    let mut b = Qemu::start(
        &dir,
        "qb",
        MAC,
        Netdev::Stream(&dir.join("qb.sock")),
        Some(&dir.join("mig.sock")),
        &[],
    );

    // QEMU's own announce on the source, then a live migration to the QEMU on qb.
    let watch = EventWatch::start(&t, &["--switch"]);
    announce_reaches_the_client(&t, &mut a, &rarp);
    let Migrated {
        mig,
        resume,
        moved,
        first_at_client,
    } = migration_moves_the_fdb(&t, &dir, (&mut a, &mut b), watch, &rarp);
    let resume_us = Qemu::event_t_us(&resume);
    let lag_resume_us = moved.t_us as i64 - resume_us as i64;
    let lag_client_us = first_at_client as i64 - moved.t_us as i64;
    eprintln!(
        "qemu downtime {} ms; FDB moved {lag_resume_us} µs after QEMU's RESUME event; \
         first RARP at the client {lag_client_us} µs after the move; load {}",
        mig["downtime"],
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    // QEMU writes its first RARP right after its RESUME event: the move comes within
    // 1 ms of that, and before the client sees the frame the switch forwarded after
    // deciding. On a machine with more runnable threads than CPUs (others compiling
    // beside the test) QEMU or the switch may simply not be scheduled for a few ms: the
    // bound is then 10 ms, and the test says so.
    let busy = load_over_cpus();
    let bound = if busy { 10_000 } else { 1000 };
    if busy {
        eprintln!("machine overloaded: the resume-to-move bound is {bound} µs, not 1000");
    }
    assert!(
        (0..=bound).contains(&lag_resume_us),
        "FDB moved {lag_resume_us} µs after QEMU's resume (bound {bound})"
    );

    // The source QEMU quits, as after a migration: its port waits for the next peer,
    // and frames for it are dropped and counted, not queued.
    drop(a);
    let frames = vec![rarp_frame("02:00:00:00:00:99".parse().unwrap()).to_vec(); 3];
    assert_eq!(common::send_raw(&t, t.client(), "eth0", &frames), 3);
    let qa = |t: &Topology| {
        t.vfabric_json(&["ports"])
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["port"] == "qa")
            .cloned()
            .unwrap()
    };
    assert!(
        t.wait_for(Duration::from_secs(5), || qa(&t)["dropped"]["no_peer"]
            .as_u64()
            .unwrap_or(0)
            >= 3),
        "{}",
        qa(&t)
    );
    assert_eq!(qa(&t)["up"], true, "the port stays up, listening");
    let mut again = Qemu::start(
        &dir,
        "qa2",
        MAC,
        Netdev::Stream(&dir.join("qa.sock")),
        None,
        &[],
    );
    let ((), seen) = capture_rarp(&client_ns, "eth0", || {
        again.execute(
            "announce-self",
            json!({"initial": 50, "max": 550, "rounds": 1, "step": 50}),
        );
    });
    assert_eq!(seen.len(), 1, "a new QEMU on the same port is heard");
    drop(b);
    t.down();
}

#[test]
fn qemu_announce_through_a_dgram_port() {
    if !require_root() || !require_qemu() {
        return;
    }
    let mut t = switch_with_ports(|t| {
        let dir = t.run_dir.path();
        format!(
            "--port qd=qemu-dgram:local={},remote={}",
            dir.join("qd.sock").display(),
            dir.join("qd-qemu.sock").display()
        )
    });
    let dir = t.run_dir.path().to_path_buf();
    let mac: MacAddr = MAC.parse().unwrap();
    let mut q = Qemu::start(
        &dir,
        "qd",
        MAC,
        Netdev::Dgram {
            qemu: &dir.join("qd-qemu.sock"),
            port: &dir.join("qd.sock"),
        },
        None,
        &[],
    );
    let ((), seen) = capture_rarp(&t.ns(t.client()), "eth0", || {
        q.execute(
            "announce-self",
            json!({"initial": 50, "max": 550, "rounds": 3, "step": 50}),
        );
    });
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (_, f) in &seen {
        assert_eq!(f, &rarp_frame(mac).to_vec());
    }
    // The client answers towards the MAC: the frame reaches QEMU's socket (QEMU takes
    // it; the port counts it sent).
    let frame = {
        let mut f = rarp_frame("02:00:00:00:00:98".parse().unwrap()).to_vec();
        f[..6].copy_from_slice(mac.as_bytes());
        f
    };
    assert_eq!(common::send_raw(&t, t.client(), "eth0", &[frame]), 1);
    let ports = t.vfabric_json(&["ports"]);
    let qd = ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == "qd")
        .unwrap()
        .clone();
    assert!(
        t.wait_for(Duration::from_secs(5), || {
            t.vfabric_json(&["ports"])
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["port"] == "qd" && p["tx_frames"].as_u64().unwrap_or(0) >= 1)
        }),
        "{qd}"
    );
    drop(q);
    t.down();
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TAP `ifname` in namespace `ns`, up and without IPv6 (its kernel side stays
/// silent), for a QEMU `-netdev tap` to open and a vfabric attach port to use.
fn tap_for_qemu(ns: &str, ifname: &str) {
    ip(&[
        "-n", ns, "tuntap", "add", "dev", ifname, "mode", "tap", "vnet_hdr",
    ]);
    let _ = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw"])
        .arg(format!("net.ipv6.conf.{ifname}.disable_ipv6=1"))
        .status();
    ip(&["-n", ns, "link", "set", ifname, "up"]);
}

#[test]
fn qemu_migration_between_attach_ports_on_its_taps() {
    if !require_root() || !require_qemu() {
        return;
    }
    // Namespace <prefix>-qv holds both QEMUs' TAPs (removed with the fabric, also when
    // the test fails): the source's is a port from the start, the destination's is
    // added while the switch runs.
    let mut t = switch_with_ports(|t| {
        let ns = format!("{}-qv", t.prefix);
        ip(&["netns", "add", &ns]);
        tap_for_qemu(&ns, &format!("{}-qa", t.prefix));
        tap_for_qemu(&ns, &format!("{}-qb", t.prefix));
        format!("--port qa=attach:{ns}:{}-qa", t.prefix)
    });
    let dir = t.run_dir.path().to_path_buf();
    let ns = format!("{}-qv", t.prefix);
    let (tap_a, tap_b) = (format!("{}-qa", t.prefix), format!("{}-qb", t.prefix));
    let mac: MacAddr = MAC.parse().unwrap();
    let rarp = rarp_frame(mac).to_vec();

    let add = t.vfabric_json(&["port", "add", "qb", &format!("attach:{ns}:{tap_b}")]);
    assert_eq!(
        (add["kind"].as_str(), add["ifname"].as_str()),
        (Some("attach"), Some(tap_b.as_str())),
        "{add}"
    );
    let mut a = Qemu::start(
        &dir,
        "qa",
        MAC,
        Netdev::Tap {
            netns: &ns,
            ifname: &tap_a,
        },
        None,
        &[],
    );
    let mut b = Qemu::start(
        &dir,
        "qb",
        MAC,
        Netdev::Tap {
            netns: &ns,
            ifname: &tap_b,
        },
        Some(&dir.join("mig.sock")),
        &[],
    );
    // With a QEMU on each TAP the switch sees both links up.
    let link_up = |t: &Topology, port: &str| {
        t.vfabric_json(&["ports"])
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == port && p["link_up"] == true)
    };
    assert!(
        t.wait_for(Duration::from_secs(5), || link_up(&t, "qa")
            && link_up(&t, "qb")),
        "{}",
        t.vfabric_json(&["ports"])
    );

    // QEMU's own announce through its TAP and the attach port, then a live migration
    // to the QEMU on the other TAP: its RARPs move the FDB to qb.
    let watch = EventWatch::start(&t, &["--switch"]);
    announce_reaches_the_client(&t, &mut a, &rarp);
    let Migrated { mig, .. } = migration_moves_the_fdb(&t, &dir, (&mut a, &mut b), watch, &rarp);
    eprintln!("qemu downtime {} ms over attach ports", mig["downtime"]);
    let fdb = t.vfabric_json(&["fdb", "show"]);
    assert!(
        fdb.as_array()
            .unwrap()
            .iter()
            .any(|r| r["mac"] == MAC && r["port"] == "qb"),
        "on qb: {fdb}"
    );
    drop(a);
    drop(b);
    t.down();
}

/// Builds (or takes from the cache) the busybox guest of netns-scripts/qemu-lib.sh:
/// (kernel, initramfs).
fn build_guest() -> (String, String) {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(
            ". netns-scripts/lib.sh && . netns-scripts/qemu-lib.sh && ensure_qemu_packages \
             && GUEST_DIRTY_MB=8 build_guest && echo \"$GUEST_KERNEL\" && echo \"$GUEST_INITRD\"",
        )
        .current_dir(common::repo())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "building the guest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines().rev();
    let initrd = lines.next().expect("initramfs path").to_string();
    let kernel = lines.next().expect("kernel path").to_string();
    (kernel, initrd)
}

/// Boots the guest on `sock`: KVM first, TCG if KVM prints nothing within 10 s (a
/// nested KVM that cannot run a guest). Returns the QEMU and the accelerator used.
fn boot(dir: &Path, name: &str, sock: &Path, extra: &[&str]) -> (Qemu, &'static str) {
    for accel in ["kvm", "tcg"] {
        if accel == "kvm" && !Path::new("/dev/kvm").exists() {
            continue;
        }
        let q = Qemu::start_accel(dir, name, MAC, Netdev::Stream(sock), None, extra, &[accel]);
        let limit = if accel == "kvm" { 10 } else { 120 };
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(limit) {
            let console = std::fs::read_to_string(&q.console).unwrap_or_default();
            if console.contains("vfabric-guest: eth0 up") {
                eprintln!(
                    "guest booted with {accel} in {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
                return (q, accel);
            }
            if accel == "kvm" && t0.elapsed() > Duration::from_secs(10) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{accel} did not boot the guest in {limit} s");
    }
    panic!("QEMU could not boot the guest");
}

#[test]
#[ignore = "boots a Linux guest in QEMU (about 15 s on TCG here; KVM cannot run one in \
            this nested machine), and TCG's timing decides the loss: run with --ignored"]
fn a_booted_guest_answers_ping_through_vfabric_and_migrates() {
    if !require_root() || !require_qemu() {
        return;
    }
    let (kernel, initrd) = build_guest();
    let mut t = switch_with_ports(|t| {
        let dir = t.run_dir.path();
        format!(
            "--port qa=qemu-stream:{} --port qb=qemu-stream:{}",
            dir.join("qa.sock").display(),
            dir.join("qb.sock").display()
        )
    });
    let dir = t.run_dir.path().to_path_buf();
    let client = t.client().to_string();
    let client_ns = t.ns(&client);
    let mac: MacAddr = MAC.parse().unwrap();
    let extra = [
        "-m",
        "128",
        "-no-reboot",
        "-kernel",
        &kernel,
        "-initrd",
        &initrd,
        "-append",
        "console=ttyS0 panic=-1",
    ];
    let (mut a, accel) = boot(&dir, "qa", &dir.join("qa.sock"), &extra);
    assert!(
        t.wait_for(Duration::from_secs(30), || t.ping(
            &client,
            "10.10.0.100",
            1
        )),
        "the guest answers ping through vfabric"
    );
    let mut b = Qemu::start_accel(
        &dir,
        "qb",
        MAC,
        Netdev::Stream(&dir.join("qb.sock")),
        Some(&dir.join("mig.sock")),
        &extra,
        &[accel],
    );
    let ping_log = dir.join("ping.txt");
    let mut ping = std::process::Command::new("ip")
        .args([
            "netns", "exec", &client_ns, "ping", "-D", "-O", "-i", "0.01",
        ])
        .args(["-W", "1", "10.10.0.100"])
        .stdout(std::fs::File::create(&ping_log).unwrap())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_secs(1));
    let watch = EventWatch::start(&t, &["--switch"]);
    let (mig, seen) = capture_rarp(&client_ns, "eth0", || {
        a.migrate(
            &format!("unix:{}", dir.join("mig.sock").display()),
            Duration::from_secs(120),
        )
    });
    std::thread::sleep(Duration::from_secs(1));
    // SIGINT, so that ping prints its totals.
    let _ = std::process::Command::new("kill")
        .args(["-INT", &ping.id().to_string()])
        .status();
    let _ = ping.wait();
    let moved = watch
        .wait_for(Duration::from_secs(5), |r| moved_to(r, mac, "qb"))
        .expect("the FDB moved to qb");
    drop(watch);
    let lines: Vec<_> = std::fs::read_to_string(&ping_log)
        .unwrap()
        .lines()
        .filter_map(vfabric::measure::parse_ping_line)
        .collect();
    let stats = vfabric::measure::ping_stats(&lines);
    let downtime_ms = mig["downtime"].as_f64().expect("QEMU's downtime");
    // The real spacing of ping's probes (iputils rounds its timer).
    let replies: Vec<u64> = lines
        .iter()
        .filter_map(|l| match l {
            vfabric::measure::PingLine::Reply { t_us, .. } => Some(*t_us),
            _ => None,
        })
        .collect();
    let spacing_ms = (replies.last().unwrap() - replies[0]) as f64
        / 1000.0
        / (stats.pings_sent.max(2) - 1) as f64;
    let allowed = ((downtime_ms + 5.0) / spacing_ms).ceil() as u64;
    eprintln!(
        "{accel}: QEMU downtime {downtime_ms} ms; {} of {} pings lost (allowed {allowed} at \
         {spacing_ms:.1} ms spacing); longest gap {:.1} ms; move {:?}",
        stats.pings_lost, stats.pings_sent, stats.longest_gap_ms, moved.event
    );
    assert_eq!(seen.len(), 5, "QEMU's five RARPs reach the client");
    for (_, f) in &seen {
        assert_eq!(f, &rarp_frame(mac).to_vec(), "byte for byte");
    }
    assert!(
        stats.pings_lost <= allowed,
        "{} pings lost; QEMU's downtime {downtime_ms} ms + 5 ms allows {allowed}",
        stats.pings_lost
    );
    drop(a);
    assert!(
        t.ping(&client, "10.10.0.100", 3),
        "the guest answers from qb (console: {})",
        b.console.display()
    );
    let _ = b.execute("query-status", json!({}));
    t.down();
}
