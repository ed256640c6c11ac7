//! End-to-end tests of the switch on real namespaces (need root): ping through the
//! switch, learning, a RARP moving a MAC, garbage input, a port vanishing, and clean
//! teardown. Each test builds its own fabric under a unique prefix, so they run in
//! parallel.

mod common;

use std::time::Duration;

use common::{require_root, send_raw, EventWatch, Topology};
use vfabric::events::Event;
use vfabric::migration::announce::rarp_frame;
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

#[test]
fn one_thread_per_port_forwards_too() {
    if !require_root() {
        return;
    }
    let t = Topology::up_with(&[
        ("VF_HOSTS", "0"),
        ("VF_SWITCH_ARGS", "--threading per-port"),
    ]);
    assert!(t.ping("client", "10.10.0.104", 3), "client -> silo104");
    assert!(t.ping("silo105", "10.10.0.1", 2), "silo105 -> client");
    let client = t.mac("client", "eth0");
    assert_eq!(fdb_port_of(&t, &client).as_deref(), Some("client"));
    let threads = std::fs::read_dir(format!("/proc/{}/task", t.switch_pid().unwrap()))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("port-"))
        .count();
    assert_eq!(threads, 3, "one data-path thread per port");
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
    // Learned while the test ran, not made up.
    let learned = v[0]["updated_t_us"].as_u64().unwrap_or(0);
    let now = vfabric::clock::unix_micros();
    assert!(learned <= now && now - learned < 60_000_000, "{v}");
    // Text output: one line per entry with MAC, port, age and since when.
    let out = t.vfabric(&["fdb", "show"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with(&client) && l.contains("port client") && l.contains(" since ")),
        "{text}"
    );
    let c = port_stats(&t, "client");
    assert!(c["rx_frames"].as_u64().unwrap() >= 3);
    assert!(c["tx_frames"].as_u64().unwrap() >= 3);
    // Flush empties the table; traffic relearns it, and the switch says so.
    let watch = EventWatch::start(&t, &["--switch"]);
    let flushed = t.vfabric_json(&["fdb", "flush"]);
    assert!(flushed["flushed"].as_u64().unwrap() >= 2);
    assert!(t.ping("client", "10.10.0.104", 1));
    assert_eq!(fdb_port_of(&t, &client).as_deref(), Some("client"));
    let records = watch.stop();
    let client_mac: MacAddr = client.parse().unwrap();
    assert!(
        matches!(records.first().map(|r| &r.event), Some(Event::FdbFlushed { entries }) if *entries >= 2),
        "{records:?}"
    );
    let learned = records
        .iter()
        .find(|r| matches!(&r.event, Event::MacLearned { mac, port, .. } if *mac == client_mac && port == "client"))
        .unwrap_or_else(|| panic!("client not relearned: {records:?}"));
    let now = vfabric::clock::unix_micros();
    assert!(learned.t_us <= now && now - learned.t_us < 60_000_000);
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
    // The announce a hypervisor sends after a migration, from silo105's uplink.
    let watch = EventWatch::start(&t, &[]);
    let sent = send_raw(&t, "silo105", "vmnic0", &[rarp_frame(mac).to_vec()]);
    assert_eq!(sent, 1);
    assert!(
        t.wait_for(Duration::from_secs(3), || fdb_port_of(&t, &client)
            .as_deref()
            == Some("silo105")),
        "MAC did not move: {}",
        t.switch_log()
    );
    // Read at once: the client's own next frame moves its MAC back.
    let v = t.vfabric_json(&["fdb", "show"]);
    let records = watch.stop();
    let moved = records
        .iter()
        .find(|r| matches!(r.event, Event::MacMoved { mac: m, .. } if m == mac))
        .unwrap_or_else(|| panic!("no mac_moved event: {records:?}"));
    assert_eq!(moved.source, "switch");
    assert_eq!(
        moved.event,
        Event::MacMoved {
            mac,
            from: "client".into(),
            to: "silo105".into(),
            ethertype: "rarp".into(),
            from_remote: None,
            to_remote: None,
        }
    );
    // The entry's stamp is the move's: the same clock reading as the event's.
    let t_us = moved.t_us;
    let entry = v
        .as_array()
        .and_then(|a| a.iter().find(|e| e["mac"] == client.as_str()))
        .unwrap_or_else(|| panic!("{client} not in {v}"));
    assert_eq!(entry["updated_t_us"].as_u64(), Some(t_us), "{entry}");
}

#[test]
fn frames_over_the_egress_mtu_are_dropped_and_counted() {
    if !require_root() {
        return;
    }
    let t = Topology::up_with(&[("VF_HOSTS", "0")]);
    let out = t.exec("client", &["ip", "link", "set", "eth0", "mtu", "9000"]);
    assert!(out.status.success(), "{out:?}");
    assert!(t.ping("client", "10.10.0.104", 1));
    let silo104: MacAddr = t.mac("silo104", "vmnic0").parse().unwrap();
    let client: MacAddr = t.mac("client", "eth0").parse().unwrap();
    assert_eq!(port_stats(&t, "silo104")["mtu"], 1500);
    // 9014 bytes to silo104's known MAC: the client may send it (MTU 9000), silo104's
    // interface (MTU 1500) may not take it. A 1514-byte frame may.
    let frame = |len: usize| {
        let mut f = vec![0u8; len];
        Repr {
            src: client,
            dst: silo104,
            ethertype: EtherType::Unknown(0x88b5),
        }
        .emit(&mut Frame::new_checked(&mut f[..]).unwrap());
        f
    };
    let sent = send_raw(
        &t,
        "client",
        "eth0",
        &[frame(9014), frame(9014), frame(1514)],
    );
    assert_eq!(sent, 3);
    assert!(
        t.wait_for(Duration::from_secs(3), || port_stats(&t, "silo104")
            ["dropped"]["oversize"]
            == 2),
        "{}",
        port_stats(&t, "silo104")
    );
    let s = port_stats(&t, "silo104");
    assert!(
        s["tx_bytes"].as_u64().unwrap() < 9014,
        "nothing jumbo went out: {s}"
    );
    assert!(t.ping("client", "10.10.0.104", 2), "forwarding goes on");
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
    let sent = send_raw(&t, "client", "eth0", &frames);
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
    let watch = EventWatch::start(&t, &["--switch"]);
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
    let records = watch.stop();
    assert!(
        records
            .iter()
            .any(|r| matches!(&r.event, Event::PortGone { port, .. } if port == "silo105")),
        "{records:?}"
    );
}

#[test]
fn up_hints_name_the_fabric_they_need() {
    if !common::require_root() {
        return;
    }
    // A test fabric has its own prefix and run directory: a hint without them would
    // reach the default fabric, or none.
    let t = Topology::up_with(&[("VF_HOSTS", "0")]);
    let dir = t.run_dir.path().display().to_string();
    let hint = t
        .up_stderr
        .lines()
        .find(|l| l.contains("fdb show"))
        .unwrap_or_else(|| panic!("no fdb hint in:\n{}", t.up_stderr));
    assert!(
        hint.contains(&format!("VF_PREFIX={} VFABRIC_RUN_DIR={dir} ", t.prefix)),
        "{hint}"
    );
    // Pasted as printed, the hint reaches this fabric's switch.
    let cmd = hint.split("; ").nth(1).expect("two commands in the hint");
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .env_remove("VFABRIC_RUN_DIR")
        .env_remove("VF_PREFIX")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let watch = EventWatch::start(&t, &["--switch"]);
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
    // The switch said goodbye port by port, and its stream ended.
    let records = watch.stop();
    let down: Vec<&str> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::PortDown { port } => Some(port.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(down, ["client", "silo104", "silo105"], "{records:?}");
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

#[test]
fn up_that_fails_half_way_removes_what_it_created() {
    if !require_root() {
        return;
    }
    let prefix = format!("vu{:04x}", std::process::id() & 0xffff);
    let run = tempfile::tempdir().unwrap();
    // The host daemons refuse the extra argument: up.sh fails after the namespaces and
    // the switch exist.
    let out = std::process::Command::new("bash")
        .arg(common::repo().join("netns-scripts/up.sh"))
        .env("VF_PREFIX", &prefix)
        .env("VFABRIC_RUN_DIR", run.path())
        .env("VFABRIC_BIN", common::bin())
        .env("VF_HOST_ARGS", "--no-such-option")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("removing what was created"), "{err}");
    let ns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout);
    assert!(!ns.contains(&prefix), "left behind: {ns}");
    assert!(!run.path().join("switch.sock").exists());
    assert!(!run.path().join("switch.pid").exists());
}
