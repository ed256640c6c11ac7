//! One fabric over two simulated machines (root): `up.sh two-machines.toml` builds
//! machine a (the client, silo104, its switches) and machine b (silo105, its switches),
//! joined by a veth underlay that carries the VM network (VXLAN 42) and the vMotion
//! network (VXLAN 43). The CLI runs on machine a, in its namespace, with machine a's
//! run directory only: it reaches silo105 over TCP and TLS across the underlay, never
//! through a socket file. vm1 moves from silo104 to silo105 and back while the client
//! pings it every 10 ms; the first RARP crosses the tunnel and switch a moves the MAC
//! to the tunnel port within 1 ms of the datagram's arrival (typed events and a
//! capture, never log text); memory digests match both ways.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::capture::Capture;
use common::fleet::{lost, ok, Pinger};
use common::{bin, require_root, topology_file, Topology};
use vfabric::events::{Event, Record};

/// The first machine's namespace (where the CLI runs) and the second's.
const MACHINE_A: &str = "a";
const MACHINE_B: &str = "b";
const UNDERLAY_B: &str = "10.30.0.2";

/// The CLI on machine a: in its namespace, with its run directory and nothing else.
fn cli(t: &Topology, args: &[&str]) -> Output {
    cli_cmd(t, args).output().expect("run vfabric")
}

fn cli_cmd(t: &Topology, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &t.ns(MACHINE_A), bin()])
        .args(args)
        .env("VFABRIC_RUN_DIR", t.run_dir.path())
        .env_remove("VFABRIC_REMOTE")
        .env_remove("VFABRIC_OPERATOR");
    c
}

fn json(t: &Topology, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(cli(t, &a), &format!("{args:?}"))).unwrap()
}

/// `vfabric events --json` on machine a: its local daemons and silo105 over TCP.
struct Watch {
    child: Child,
    out: PathBuf,
}

impl Watch {
    fn start(t: &Topology) -> Watch {
        let out = t.run_dir.path().join("span-events.jsonl");
        let err = t.run_dir.path().join("span-events.err");
        let child = cli_cmd(t, &["events", "--json"])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("vfabric events");
        let t0 = Instant::now();
        loop {
            let e = std::fs::read_to_string(&err).unwrap_or_default();
            if e.contains("following") {
                assert!(e.contains("silo105"), "not following silo105: {e}");
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "events: {e}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Watch { child, out }
    }

    fn records(&self) -> Vec<Record> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Outer Ethernet 14 + IPv4 20 + UDP 8, then the VXLAN header (8), then the frame.
const VXLAN_AT: usize = 42;
const INNER_AT: usize = VXLAN_AT + 8;

/// Arrival times of the VXLAN datagrams from machine b carrying a RARP of `mac`, with
/// their VNI.
fn rarps_from_b(pcap: &[(u64, Vec<u8>)], mac: &[u8; 6]) -> Vec<(u64, u32)> {
    pcap.iter()
        .filter(|(_, f)| f.len() >= INNER_AT + 14)
        .filter(|(_, f)| f[26..30] == UNDERLAY_B.parse::<std::net::Ipv4Addr>().unwrap().octets())
        .filter(|(_, f)| f[INNER_AT + 12..INNER_AT + 14] == [0x80, 0x35])
        .filter(|(_, f)| f[INNER_AT + 6..INNER_AT + 12] == mac[..])
        .map(|(t, f)| {
            let vni = u32::from_be_bytes([0, f[VXLAN_AT + 4], f[VXLAN_AT + 5], f[VXLAN_AT + 6]]);
            (*t, vni)
        })
        .collect()
}

/// One move of a MAC on switch a: (t_us, from, to, ethertype).
type Move = (u64, String, String, String);

/// Switch a's moves of `mac`.
fn moves(records: &[Record], mac: vfabric::wire::MacAddr) -> Vec<Move> {
    records
        .iter()
        .filter(|r| r.source == "switch")
        .filter_map(|r| match &r.event {
            Event::MacMoved {
                mac: m,
                from,
                to,
                ethertype,
                ..
            } if *m == mac => Some((r.t_us, from.clone(), to.clone(), ethertype.clone())),
            _ => None,
        })
        .collect()
}

/// One move of vm1 to `to` under pings, with the RARP captured on the underlay.
/// Returns switch a's first move of the MAC after the migration started, and the
/// arrival of the first RARP from machine b (if the VM came from a, to b).
fn move_vm(
    t: &Topology,
    watch: &Watch,
    mac: vfabric::wire::MacAddr,
    to: &str,
) -> (Move, Option<(u64, u32)>) {
    let before = watch.records().len();
    let cap = // tcpdump on machine a's end of the underlay (VXLAN of the VM network only).
    Capture::start(t, MACHINE_A, "ul0", "udp dst port 4789", &format!("underlay-{to}.pcap"));
    let pinger = Pinger::start(t, &t.vm_ip("vm1"));
    std::thread::sleep(Duration::from_millis(500));
    let s = json(t, &["migrate", "vm1", "--to", to]);
    assert_eq!(s["memory_sha256_source"], s["memory_sha256_target"], "{s}");
    assert!(
        !s["memory_sha256_target"].as_str().unwrap_or("").is_empty(),
        "{s}"
    );
    assert!(
        s["transport"].as_str().unwrap().starts_with("TLS 1.3"),
        "{s}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let stats = pinger.stop();
    let pcap = cap.stop();
    let lost = lost(&stats);
    eprintln!(
        "to {to}: {} pings, lost {:?}, longest gap {:.1} ms",
        stats.pings_sent, lost, stats.longest_gap_ms
    );
    assert!(stats.pings_sent > 100, "the pinger did not run: {stats:?}");
    assert!(
        lost.len() <= 5,
        "lost {} pings moving to {to}: {lost:?}",
        lost.len()
    );
    let t0 = Instant::now();
    let moved = loop {
        let recs = watch.records();
        if let Some(m) = moves(&recs[before.min(recs.len())..], mac)
            .into_iter()
            .next()
        {
            break m;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no mac_moved of vm1 on switch a"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rarp = rarps_from_b(&pcap, &mac.0).into_iter().next();
    (moved, rarp)
}

#[test]
fn vmotion_across_machines_with_the_cli_over_tcp_only() {
    if !require_root() {
        return;
    }
    let t = Topology::up_file(topology_file("two-machines.toml"));
    // The CLI's run directory (machine a) has no socket of silo105: it lives on b, and
    // the remotes file names its TCP control port on b's underlay address.
    let run = t.run_dir.path().to_path_buf();
    assert!(run.join("silo104.sock").exists());
    assert!(!run.join("silo105.sock").exists());
    assert!(run.join("machine-b/silo105.sock").exists());
    let remotes = std::fs::read_to_string(run.join("remotes")).unwrap();
    assert!(
        remotes.contains(&format!("silo105={UNDERLAY_B}:")),
        "{remotes}"
    );
    // The root namespace cannot reach that address: only machine a's underlay can.
    assert!(
        !Command::new(bin())
            .args(["vm", "list", "--host", "silo105"])
            .env("VFABRIC_RUN_DIR", &run)
            .output()
            .unwrap()
            .status
            .success(),
        "silo105 was reached from outside machine a's network"
    );
    let hosts = json(&t, &["hosts"]);
    let names: Vec<&str> = hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["silo104", "silo105"], "{hosts}");

    let vm = json(&t, &["vm", "show", "vm1"]);
    assert_eq!(vm["host"], "silo104");
    let mac: vfabric::wire::MacAddr = vm["mac"].as_str().unwrap().parse().unwrap();
    let watch = Watch::start(&t);

    // a -> b: the MAC moves from silo104's port to the tunnel, on the first RARP.
    let ((moved_t, from, to, ethertype), rarp) = move_vm(&t, &watch, mac, "silo105");
    assert_eq!(
        (from.as_str(), to.as_str(), ethertype.as_str()),
        ("silo104", "tunnel", "rarp")
    );
    let (arrival, vni) = rarp.expect("a RARP of vm1 from machine b on the underlay");
    assert_eq!(vni, vfabric::topology::VM_VNI);
    let lag = moved_t as i64 - arrival as i64;
    eprintln!("switch a moved vm1 to the tunnel {lag} us after the RARP's datagram arrived");
    assert!(
        (0..1000).contains(&lag),
        "FDB move {lag} us after the RARP arrived"
    );
    // The announce was silo105's, heard over TCP, and preceded the move.
    let recs = watch.records();
    let sent = recs
        .iter()
        .find_map(|r| match &r.event {
            Event::AnnounceSent {
                vm, host, seq: 0, ..
            } if vm == "vm1" && host == "silo105" => Some(r.t_us),
            _ => None,
        })
        .expect("silo105's first announce, over the TCP event stream");
    assert!(sent <= moved_t, "announce at {sent}, move at {moved_t}");
    let fdb = t.vfabric_json(&["fdb", "show"]);
    let entry = fdb
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["mac"] == vm["mac"])
        .cloned()
        .expect("vm1 in switch a's table");
    assert_eq!(entry["port"], "tunnel", "{entry}");
    assert_eq!(entry["remote"], format!("{UNDERLAY_B}:4789"), "{entry}");
    assert_eq!(json(&t, &["vm", "show", "vm1"])["host"], "silo105");

    // b -> a: back to the local port, again on a RARP.
    let ((_, from, to, ethertype), _) = move_vm(&t, &watch, mac, "silo104");
    assert_eq!(
        (from.as_str(), to.as_str(), ethertype.as_str()),
        ("tunnel", "silo104", "rarp")
    );
    assert_eq!(json(&t, &["vm", "show", "vm1"])["host"], "silo104");
    // Both machines' daemons are where they were: nothing on b was restarted.
    assert!(run
        .join(format!("machine-{MACHINE_B}/silo105.sock"))
        .exists());
    drop(watch);

    // down.sh removes both machines: namespaces, daemons, sockets, keys, remotes.
    let mut t = t;
    let out = t.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t.namespaces().is_empty(), "{:?}", t.namespaces());
    let b = run.join(format!("machine-{MACHINE_B}"));
    for gone in [
        b.join("silo105.sock"),
        b.join("switch.pid"),
        b.join("pki"),
        run.join("remotes"),
    ] {
        assert!(!gone.exists(), "{} is left", gone.display());
    }
}
