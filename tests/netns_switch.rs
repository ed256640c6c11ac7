//! End-to-end tests of the switch on real namespaces (need root): ping through the
//! switch, learning, a RARP moving a MAC, garbage input, a port vanishing, and clean
//! teardown. Each test builds its own fabric under a unique prefix, so they run in
//! parallel.

mod common;

use std::time::Duration;

use common::{require_root, send_raw, Topology};
use vfabric::wire::ethernet::{Frame, Repr};
use vfabric::wire::{EtherType, MacAddr};

fn fdb_port_of(t: &Topology, mac: &str) -> Option<String> {
    let v = t.vfabric_json(&["fdb", "show"]);
    v.as_array()?
        .iter()
        .find(|e| e["mac"] == mac)
        .and_then(|e| e["port"].as_str().map(str::to_string))
}

fn port_stats(t: &Topology, name: &str) -> serde_json::Value {
    let v = t.vfabric_json(&["ports"]);
    v.as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no port {name} in {v}"))
}

/// The announce a hypervisor sends after a migration: broadcast RARP "reverse request"
/// with the VM's MAC as sender and target hardware address, zero-padded to 60 bytes.
fn rarp(mac: MacAddr) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    Repr {
        src: mac,
        dst: MacAddr::BROADCAST,
        ethertype: EtherType::Rarp,
    }
    .emit(&mut Frame::new_checked(&mut f[..]).unwrap());
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    arp.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    arp.extend_from_slice(&[6, 4]); // address lengths
    arp.extend_from_slice(&3u16.to_be_bytes()); // operation: reverse request
    arp.extend_from_slice(mac.as_bytes()); // sender hardware address
    arp.extend_from_slice(&[0; 4]); // sender protocol address
    arp.extend_from_slice(mac.as_bytes()); // target hardware address
    arp.extend_from_slice(&[0; 4]); // target protocol address
    f[14..14 + arp.len()].copy_from_slice(&arp);
    f
}

#[test]
fn ping_crosses_the_switch_both_ways_and_the_fdb_learns() {
    if !require_root() {
        return;
    }
    let t = Topology::up();
    assert!(t.ping("client", "10.10.0.104", 3), "client -> silo104");
    assert!(t.ping("silo104", "10.10.0.1", 3), "silo104 -> client");
    assert!(t.ping("silo105", "10.10.0.104", 2), "silo105 -> silo104");
    assert!(t.ping("silo104", "10.20.0.105", 1), "vMotion network");
    let client = t.mac("client", "eth0");
    let silo104 = t.mac("silo104", "vmnic0");
    assert_eq!(fdb_port_of(&t, &client).as_deref(), Some("client"));
    assert_eq!(fdb_port_of(&t, &silo104).as_deref(), Some("silo104"));
    let v = t.vfabric_json(&["fdb", "show"]);
    assert!(v[0]["age_s"].as_f64().is_some(), "{v}");
    // Text output: one line per entry with MAC, port and age.
    let out = t.vfabric(&["fdb", "show"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with(&client) && l.contains("port client")),
        "{text}"
    );
    let log = t.switch_log();
    assert!(
        log.contains("mac learned") && log.contains(&client) && log.contains("t_us="),
        "{log}"
    );
    let c = port_stats(&t, "client");
    assert!(c["rx_frames"].as_u64().unwrap() >= 3);
    assert!(c["tx_frames"].as_u64().unwrap() >= 3);
    // Flush empties the table; traffic relearns it.
    let flushed = t.vfabric_json(&["fdb", "flush"]);
    assert!(flushed["flushed"].as_u64().unwrap() >= 2);
    assert!(t.ping("client", "10.10.0.104", 1));
    assert_eq!(fdb_port_of(&t, &client).as_deref(), Some("client"));
}

#[test]
fn rarp_on_another_port_moves_the_mac_at_once() {
    if !require_root() {
        return;
    }
    let t = Topology::up();
    assert!(t.ping("client", "10.10.0.104", 1));
    let client = t.mac("client", "eth0");
    assert_eq!(fdb_port_of(&t, &client).as_deref(), Some("client"));
    let mac: MacAddr = client.parse().unwrap();
    let Some(sent) = send_raw(&t, "silo105", "vmnic0", &[rarp(mac)]) else {
        panic!("python3 is needed for the raw-frame sender");
    };
    assert_eq!(sent, 1);
    assert!(
        t.wait_for(Duration::from_secs(3), || fdb_port_of(&t, &client)
            .as_deref()
            == Some("silo105")),
        "MAC did not move: {}",
        t.switch_log()
    );
    let log = t.switch_log();
    let moved = log
        .lines()
        .find(|l| l.contains("mac moved") && l.contains(&client))
        .unwrap_or_else(|| panic!("no `mac moved` line:\n{log}"));
    for want in ["from=client", "to=silo105", "ethertype=rarp", "t_us="] {
        assert!(moved.contains(want), "{want} missing in {moved}");
    }
}

#[test]
fn garbage_leaves_the_switch_forwarding() {
    if !require_root() {
        return;
    }
    let t = Topology::up();
    assert!(t.ping("client", "10.10.0.104", 1));
    let mut frames: Vec<Vec<u8>> = vec![vec![], vec![0xff], vec![0x5a; 13]];
    let mut x: u32 = 0x9e37_79b9;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    };
    for len in (14..=1514).step_by(7) {
        frames.push((0..len).map(|_| rnd()).collect());
    }
    // Invalid sources (zero, multicast), a maximum-size frame, and one beyond the MTU.
    for src in [MacAddr::ZERO, MacAddr([0x01, 0, 0x5e, 0, 0, 1])] {
        let mut f = vec![0u8; 60];
        Repr {
            src,
            dst: MacAddr::BROADCAST,
            ethertype: EtherType::Ipv4,
        }
        .emit(&mut Frame::new_checked(&mut f[..]).unwrap());
        frames.push(f);
    }
    let mut big = vec![0u8; 1514];
    Repr {
        src: MacAddr([0x02, 0, 0, 0, 0xee, 1]),
        dst: MacAddr::BROADCAST,
        ethertype: EtherType::Unknown(0x88b5),
    }
    .emit(&mut Frame::new_checked(&mut big[..]).unwrap());
    frames.push(big.clone());
    big.resize(9000, 0xab);
    frames.push(big);
    let Some(sent) = send_raw(&t, "client", "eth0", &frames) else {
        panic!("python3 is needed for the raw-frame sender");
    };
    assert!(sent > 200, "only {sent} frames sent");
    assert!(
        t.ping("client", "10.10.0.104", 3),
        "forwarding after garbage"
    );
    assert!(
        t.ping("silo105", "10.10.0.1", 1),
        "forwarding after garbage"
    );
    let c = port_stats(&t, "client");
    assert_eq!(c["up"], true);
    assert!(
        c["dropped"]["invalid_source"].as_u64().unwrap_or(0) >= 2,
        "{c}"
    );
    assert!(c["rx_frames"].as_u64().unwrap() >= sent as u64);
}

#[test]
fn a_port_whose_namespace_vanishes_goes_down_and_the_rest_keep_working() {
    if !require_root() {
        return;
    }
    // No host daemons: a process inside the namespace would keep it (and the TAP) alive.
    let t = Topology::up_with(&[("VF_HOSTS", "0")]);
    assert!(t.ping("silo105", "10.10.0.1", 1));
    let ns = t.ns("silo105");
    let out = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        t.wait_for(Duration::from_secs(5), || port_stats(&t, "silo105")["up"]
            == false),
        "silo105 still up"
    );
    assert!(t.ping("client", "10.10.0.104", 2));
    assert!(t.switch_log().contains("port down"));
}

#[test]
fn down_leaves_nothing_behind_and_runs_twice() {
    if !require_root() {
        return;
    }
    let mut t = Topology::up();
    assert!(t.ping("client", "10.10.0.104", 1));
    let pid = t.switch_pid().expect("pid file");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let out = t.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t.namespaces().is_empty(), "{:?}", t.namespaces());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "switch still running"
    );
    for leftover in ["switch.sock", "switch.pid"] {
        assert!(!t.run_dir.path().join(leftover).exists(), "{leftover}");
    }
    let log = t.switch_log();
    assert!(log.contains("switch stopped"), "{log}");
    let out = t.down();
    assert!(out.status.success(), "second down.sh failed");
}

#[test]
fn bad_input_gives_one_clear_line() {
    let out = std::process::Command::new(common::bin())
        .args(["switch", "--port", "client"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("bad port spec"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["fdb", "show"])
        .env("VFABRIC_RUN_DIR", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is the daemon running?"), "{err}");
    if vfabric::sys::tap::is_root() {
        let out = std::process::Command::new(common::bin())
            .args(["switch", "--port", "c=vt-no-such-ns:eth0"])
            .env("VFABRIC_RUN_DIR", dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("not found"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
