//! VXLAN tunnel ports against the real thing: the Linux kernel's `vxlan` device.
//!
//! Beside the default fabric, three namespaces stand for another machine and the
//! network between: `<prefix>-ul` holds the switch's underlay socket (10.99.0.1 on a
//! veth), `<prefix>-kvx` the other end of that veth (10.99.0.2), a kernel `vxlan`
//! device `vx0` (VNI 42, dstport 4789) and a kernel bridge `br0` joining it to a veth
//! into `<prefix>-kh`, whose `eth0` holds 10.10.0.200 (MTU 1450: 1500 minus VXLAN's 50).
//! The switch gets `--port wan=vxlan:vni=42,local=<prefix>-ul:10.99.0.1,remote=10.99.0.2`.
//! Everything lives under the test's unique prefix and goes with it, also on failure.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::capture::Capture;
use common::{require_root, Topology};
use sha2::{Digest, Sha256};

const KH_IP: &str = "10.10.0.200";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the kernel side and the underlay under `prefix`; returns the switch's extra
/// arguments.
fn kernel_peer(prefix: &str) -> Vec<(String, String)> {
    let (ul, kvx, kh) = (
        format!("{prefix}-ul"),
        format!("{prefix}-kvx"),
        format!("{prefix}-kh"),
    );
    for ns in [&ul, &kvx, &kh] {
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    ip(&[
        "link", "add", "ul0", "netns", &ul, "type", "veth", "peer", "name", "ul1", "netns", &kvx,
    ]);
    ip(&["-n", &ul, "addr", "add", "10.99.0.1/24", "dev", "ul0"]);
    ip(&["-n", &kvx, "addr", "add", "10.99.0.2/24", "dev", "ul1"]);
    // A second address on the far side: a sender that is none of the port's remotes.
    ip(&["-n", &kvx, "addr", "add", "10.99.0.3/24", "dev", "ul1"]);
    ip(&["-n", &ul, "link", "set", "ul0", "up"]);
    ip(&["-n", &kvx, "link", "set", "ul1", "up"]);
    ip(&[
        "-n",
        &kvx,
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "42",
        "dstport",
        "4789",
        "local",
        "10.99.0.2",
        "remote",
        "10.99.0.1",
        "dev",
        "ul1",
    ]);
    ip(&["-n", &kvx, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &kvx, "link", "set", "vx0", "master", "br0"]);
    ip(&[
        "link", "add", "kb0", "netns", &kvx, "type", "veth", "peer", "name", "eth0", "netns", &kh,
    ]);
    ip(&["-n", &kvx, "link", "set", "kb0", "master", "br0"]);
    ip(&["-n", &kh, "link", "set", "eth0", "mtu", "1450"]);
    ip(&[
        "-n",
        &kh,
        "addr",
        "add",
        &format!("{KH_IP}/24"),
        "dev",
        "eth0",
    ]);
    for dev in ["vx0", "kb0", "br0"] {
        ip(&["-n", &kvx, "link", "set", dev, "up"]);
    }
    ip(&["-n", &kh, "link", "set", "eth0", "up"]);
    vec![
        ("VF_HOSTS".into(), "0".into()),
        (
            "VF_SWITCH_ARGS".into(),
            format!("--port wan=vxlan:vni=42,local={ul}:10.99.0.1,remote=10.99.0.2"),
        ),
    ]
}

fn up() -> Topology {
    Topology::up_around(|t| kernel_peer(&t.prefix))
}

/// Runs `f` on a thread of its own inside namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = Path::new("/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            vfabric::sys::packet::enter_netns(&path)
                .unwrap_or_else(|e| panic!("enter {}: {e}", path.display()));
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

/// The tunnel port's row of `vfabric ports --json`.
fn wan_stats(t: &Topology) -> serde_json::Value {
    let ports = t.vfabric_json(&["ports"]);
    ports
        .as_array()
        .and_then(|a| a.iter().find(|p| p["port"] == "wan"))
        .cloned()
        .unwrap_or_else(|| panic!("no wan port in {ports}"))
}

fn dropped(stats: &serde_json::Value, reason: &str) -> u64 {
    stats["dropped"][reason].as_u64().unwrap_or(0)
}

#[test]
fn the_kernel_vxlan_device_is_a_peer() {
    if !require_root() {
        return;
    }
    let t = up();
    let capture = Capture::start(&t, "kvx", "ul1", "udp port 4789", "underlay.pcap");
    let client_mac = t.mac("client", "eth0");
    let kh_mac = t.mac("kh", "eth0");

    assert!(
        t.ping("client", KH_IP, 3),
        "client -> vfabric -> VXLAN -> kernel bridge -> {KH_IP}: no reply\n{}",
        t.switch_log()
    );

    // Our FDB: the kernel side's MAC behind the tunnel, with the endpoint it came from.
    let fdb = t.vfabric_json(&["fdb", "show"]);
    let row = fdb
        .as_array()
        .and_then(|a| a.iter().find(|r| r["mac"] == kh_mac.as_str()))
        .unwrap_or_else(|| panic!("{kh_mac} not in {fdb}"));
    assert_eq!(row["port"], "wan", "{row}");
    assert_eq!(row["remote"], "10.99.0.2:4789", "{row}");
    let client_row = fdb
        .as_array()
        .and_then(|a| a.iter().find(|r| r["mac"] == client_mac.as_str()))
        .unwrap_or_else(|| panic!("{client_mac} not in {fdb}"));
    assert!(client_row.get("remote").is_none(), "{client_row}");

    // The kernel's FDB: our client's MAC behind our endpoint.
    let out = t.exec("kvx", &["bridge", "fdb", "show", "dev", "vx0"]);
    let kernel_fdb = String::from_utf8_lossy(&out.stdout);
    assert!(
        kernel_fdb
            .lines()
            .any(|l| l.starts_with(&client_mac) && l.contains("dst 10.99.0.1 ")),
        "{client_mac} dst 10.99.0.1 not in:\n{kernel_fdb}"
    );

    // TCP with GSO frames from the client's TAP: 8 MiB arrive whole and in order.
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want = Sha256::digest(&data);
    let listener = in_netns(&t.ns("kh"), || {
        TcpListener::bind((KH_IP, 5001)).expect("bind in kh")
    });
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        Sha256::digest(&got)
    });
    in_netns(&t.ns("client"), || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([10, 10, 0, 200], 5001)),
            Duration::from_secs(10),
        )
        .expect("connect across the tunnel");
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(&data).expect("send across the tunnel");
    });
    assert_eq!(
        server.join().expect("server"),
        want,
        "the stream arrived intact"
    );

    // A frame that cannot fit the underlay (1500 + 50 > 1500) is counted, not cut.
    let before = dropped(&wan_stats(&t), "oversize");
    let big = t.exec(
        "client",
        &[
            "ping", "-c", "2", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1472", KH_IP,
        ],
    );
    assert!(
        !big.status.success(),
        "a 1500-byte packet crossed a 1450 tunnel"
    );
    assert!(t.wait_for(Duration::from_secs(10), || {
        dropped(&wan_stats(&t), "oversize") >= before + 2
    }));

    // tcpdump's own reading of the underlay: VXLAN, I flag, VNI 42, nothing else.
    let decoded = capture.decode();
    let lines: Vec<&str> = decoded.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("10.99.0.1.4789 > 10.99.0.2.4789: VXLAN, flags [I] (0x08), vni 42")),
        "{decoded}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("> 10.99.0.1.4789: VXLAN, flags [I] (0x08), vni 42")),
        "{decoded}"
    );
    // tcpdump prints each datagram's inner frame on a line of its own after it.
    let outer: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains(" IP 10.99.0.") && l.contains(".4789: "))
        .collect();
    for l in &outer {
        assert!(l.contains(": VXLAN, flags [I] (0x08), vni 42"), "{l}");
    }
    assert_eq!(
        decoded.matches("vni ").count(),
        decoded.matches("vni 42").count()
    );
    assert!(outer.len() > 100, "{} datagrams", outer.len());
}

#[test]
fn garbage_to_the_tunnel_is_dropped_by_reason_and_forwarding_goes_on() {
    if !require_root() {
        return;
    }
    let t = up();
    assert!(t.ping("client", KH_IP, 2), "{}", t.switch_log());
    let before = wan_stats(&t);

    // A valid datagram to start from: VNI 42, a broadcast frame from a local MAC.
    let mut valid = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
    valid.extend_from_slice(&[0xff; 6]);
    valid.extend_from_slice(&[0x02, 0xee, 0, 0, 0, 1, 0x08, 0x06]);
    valid.resize(8 + 60, 0);
    let mut wrong_vni = valid.clone();
    wrong_vni[6] = 43;
    // Deterministic random bytes, the first never a lone I flag (0x08), so each is
    // either too short (under 22 bytes) or has bad flags.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
    };
    let random: Vec<Vec<u8>> = (0..300)
        .map(|i| {
            let mut d: Vec<u8> = (0..(i * 7) % 300).map(|_| rnd()).collect();
            if d.first() == Some(&0x08) {
                d[0] = 0x09;
            }
            d
        })
        .collect();
    let random_short = random.iter().filter(|d| d.len() < 22).count() as u64;
    let random_flags = random.len() as u64 - random_short;
    let truncated: Vec<&[u8]> = (0..22).map(|n| &valid[..n]).collect();
    let to = SocketAddr::from(([10, 99, 0, 1], 4789));
    in_netns(&t.ns("kvx"), || {
        let peer = UdpSocket::bind("10.99.0.2:0").expect("bind 10.99.0.2");
        let stranger = UdpSocket::bind("10.99.0.3:0").expect("bind 10.99.0.3");
        let pace = || std::thread::sleep(Duration::from_micros(200));
        for d in &random {
            peer.send_to(d, to).expect("send");
            pace();
        }
        for _ in 0..50 {
            peer.send_to(&wrong_vni, to).expect("send");
            pace();
        }
        for d in &truncated {
            peer.send_to(d, to).expect("send");
            pace();
        }
        for _ in 0..20 {
            stranger.send_to(&valid, to).expect("send");
            pace();
        }
    });
    let want = [
        ("vxlan_truncated", random_short + truncated.len() as u64),
        ("vxlan_bad_flags", random_flags),
        ("vxlan_wrong_vni", 50),
        ("vxlan_unknown_remote", 20),
    ];
    let counted = || {
        let now = wan_stats(&t);
        want.iter()
            .map(|(r, _)| dropped(&now, r) - dropped(&before, r))
            .collect::<Vec<_>>()
    };
    let expected: Vec<u64> = want.iter().map(|(_, n)| *n).collect();
    assert!(
        t.wait_for(Duration::from_secs(20), || counted() == expected),
        "dropped by reason {:?}, expected {want:?}: {}",
        counted(),
        wan_stats(&t)
    );
    // The stranger's frame was not learned, and forwarding carries on.
    let fdb = t.vfabric_json(&["fdb", "show"]);
    assert!(
        !fdb.to_string().contains("02:ee:00:00:00:01"),
        "a refused frame was learned: {fdb}"
    );
    assert!(t.ping("client", KH_IP, 3), "{}", t.switch_log());
    assert!(wan_stats(&t)["up"].as_bool().unwrap_or(false));
}
