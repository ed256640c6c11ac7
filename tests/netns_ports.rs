//! Ports of other kinds and ports at run time, on real namespaces (need root): a veth
//! end attached to the switch carries its kernel stack's pings and TCP, and never feeds
//! the switch's own writes back; ports added and deleted while pings flow on the others
//! cost those pings nothing and take their FDB entries with them. Each test builds its
//! own fabric under a unique prefix.

mod common;

use std::process::Command;
use std::time::Duration;

use common::fleet::{lost, Pinger};
use common::{require_root, EventWatch, Topology};
use vfabric::events::Event;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespace `<prefix>-att` with a veth pair: `att0` (10.10.0.50/24, the kernel stack
/// that pings) and `att1` (no address: the end the switch attaches to).
fn veth_namespace(prefix: &str) -> String {
    let ns = format!("{prefix}-att");
    ip(&["netns", "add", &ns]);
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &ns, "link", "add", "att0", "type", "veth", "peer", "name", "att1",
    ]);
    ip(&["-n", &ns, "addr", "add", "10.10.0.50/24", "dev", "att0"]);
    let _ = Command::new("ip")
        .args(["netns", "exec", &ns, "sysctl", "-qw"])
        .arg("net.ipv6.conf.att1.disable_ipv6=1")
        .status();
    ip(&["-n", &ns, "link", "set", "att0", "up"]);
    ip(&["-n", &ns, "link", "set", "att1", "up"]);
    ns
}

fn port_row(t: &Topology, name: &str) -> Option<serde_json::Value> {
    let v = t.vfabric_json(&["ports"]);
    v.as_array()?.iter().find(|p| p["port"] == name).cloned()
}

fn fdb_ports(t: &Topology) -> Vec<(String, String)> {
    let v = t.vfabric_json(&["fdb", "show"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["mac"].as_str().unwrap().to_string(),
                e["port"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn mac_of(ns: &str, ifname: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{ifname}/address"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn an_attached_veth_end_carries_its_stacks_pings_and_tcp() {
    if !require_root() {
        return;
    }
    let t = Topology::up_around(|t| {
        let ns = veth_namespace(&t.prefix);
        vec![
            ("VF_HOSTS".into(), "0".into()),
            (
                "VF_SWITCH_ARGS".into(),
                format!("--port att=attach:{ns}:att1"),
            ),
        ]
    });
    let ns = format!("{}-att", t.prefix);
    let watch = EventWatch::start(&t, &[]);
    let row = port_row(&t, "att").expect("the attach port is listed");
    assert_eq!(row["kind"], "attach");
    assert_eq!(row["ifname"], "att1");
    assert_eq!(row["link_up"], true);
    assert!(t.ping("client", "10.10.0.50", 3), "client -> veth stack");
    // Large probes: IP fragments, each a full-sized frame.
    let out = t.exec(
        "client",
        &[
            "ping",
            "-c",
            "2",
            "-s",
            "4000",
            "-W",
            "2",
            "-q",
            "10.10.0.50",
        ],
    );
    assert!(out.status.success(), "4000-byte pings");
    let att0 = mac_of(&ns, "att0");
    let client = t.mac("client", "eth0");
    let fdb = fdb_ports(&t);
    assert!(fdb.contains(&(att0.clone(), "att".into())), "{fdb:?}");
    assert!(fdb.contains(&(client.clone(), "client".into())), "{fdb:?}");
    // TCP both ways: GSO frames and partial checksums from the TAP reach the veth's
    // stack, and the veth stack's reach the client, or the transfer stalls.
    let serve = || {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "iperf3",
                "-s",
                "-1",
                "-D",
                "-B",
                "10.10.0.50",
            ])
            .status();
    };
    serve();
    std::thread::sleep(Duration::from_millis(300));
    for reverse in [false, true] {
        let mut args = vec!["iperf3", "-c", "10.10.0.50", "-t", "1", "-J"];
        if reverse {
            args.push("-R");
        }
        let out = t.exec("client", &args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        assert!(
            bps > 50e6,
            "TCP through the attach port (reverse {reverse}): {bps} bit/s: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        if !reverse {
            // The one-off server quits after a test; start it again for the reverse.
            serve();
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    // What the switch wrote into att1 was never read back: the client's MAC never moved.
    let records = watch.stop();
    let moved: Vec<_> = records
        .iter()
        .filter(|r| matches!(&r.event, Event::MacMoved { .. }))
        .collect();
    assert!(moved.is_empty(), "MACs moved: {moved:?}");
    let row = port_row(&t, "att").unwrap();
    assert_eq!(row["dropped"].get("tx_error"), None, "{row}");
    // The link goes down: the port stays but is not flooded into, and says so.
    ip(&["-n", &ns, "link", "set", "att0", "down"]);
    assert!(t.wait_for(Duration::from_secs(3), || port_row(&t, "att")
        .is_some_and(|r| r["link_up"] == false)));
    let before = port_row(&t, "att").unwrap()["tx_frames"].as_u64().unwrap();
    // Broadcast from the client: ARP for an unknown address floods.
    let _ = t.exec(
        "client",
        &["ping", "-c", "2", "-W", "1", "-q", "10.10.0.77"],
    );
    let after = port_row(&t, "att").unwrap();
    assert_eq!(after["tx_frames"].as_u64().unwrap(), before, "{after}");
    assert_eq!(after["dropped"].get("tx_error"), None, "{after}");
    ip(&["-n", &ns, "link", "set", "att0", "up"]);
    assert!(t.wait_for(Duration::from_secs(3), || t.ping("client", "10.10.0.50", 1)));
}

#[test]
fn ports_added_and_deleted_while_pings_flow_cost_the_others_nothing() {
    if !require_root() {
        return;
    }
    let t = Topology::up_around(|t| {
        veth_namespace(&t.prefix);
        vec![("VF_HOSTS".into(), "0".into())]
    });
    let ns = format!("{}-att", t.prefix);
    let watch = EventWatch::start(&t, &[]);
    assert!(t.ping("client", "10.10.0.104", 2));
    let pinger = Pinger::start(&t, "10.10.0.104");
    std::thread::sleep(Duration::from_millis(300));

    let add = t.vfabric_json(&["port", "add", "att", &format!("attach:{ns}:att1")]);
    assert_eq!(
        (add["port"].as_str(), add["kind"].as_str()),
        (Some("att"), Some("attach"))
    );
    // A TAP made at run time, its kernel side in the same namespace.
    let tap = t.vfabric_json(&["port", "add", "tap2", &format!("{ns}:vtap2")]);
    assert_eq!(tap["kind"], "tap");
    let kinds: Vec<(String, String)> = t
        .vfabric_json(&["ports"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_str().unwrap().into(),
                p["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    for want in [("client", "tap"), ("att", "attach"), ("tap2", "tap")] {
        assert!(kinds.contains(&(want.0.into(), want.1.into())), "{kinds:?}");
    }
    // The vtap2 side is administratively down: floods skip it, no tx_error counted.
    assert!(t.ping("client", "10.10.0.50", 2), "client -> attached veth");
    let row = port_row(&t, "tap2").unwrap();
    assert_eq!(row["link_up"], false, "{row}");
    assert_eq!(row["tx_frames"], 0, "{row}");
    assert_eq!(row["dropped"].get("tx_error"), None, "{row}");
    let att0 = mac_of(&ns, "att0");
    assert!(fdb_ports(&t).contains(&(att0.clone(), "att".into())));

    // Refusals: a name taken, an interface already in use, no such port.
    let out = t.vfabric(&["port", "add", "att", &format!("{ns}:other")]);
    assert!(!out.status.success());
    let out = t.vfabric(&["port", "add", "att2", &format!("attach:{ns}:att1")]);
    assert!(!out.status.success());
    let out = t.vfabric(&["port", "del", "nope"]);
    assert!(!out.status.success());

    let del = t.vfabric_json(&["port", "del", "att"]);
    assert!(del["fdb_entries_removed"].as_u64().unwrap() >= 1, "{del}");
    assert!(
        fdb_ports(&t).iter().all(|(_, p)| p != "att"),
        "the deleted port's entries are gone"
    );
    assert!(port_row(&t, "att").is_none());
    assert!(
        !t.ping("client", "10.10.0.50", 1),
        "the deleted port forwards nothing"
    );
    t.vfabric_json(&["port", "del", "tap2"]);
    // Added back: it works again.
    t.vfabric_json(&["port", "add", "att", &format!("attach:{ns}:att1")]);
    assert!(t.ping("client", "10.10.0.50", 2));

    std::thread::sleep(Duration::from_millis(300));
    let stats = pinger.stop();
    assert!(stats.pings_sent > 50, "{stats:?}");
    assert_eq!(
        lost(&stats),
        Vec::<u64>::new(),
        "pings lost on the other ports"
    );

    let records = watch.stop();
    let deleted: Vec<usize> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::PortDeleted {
                port,
                fdb_entries_removed,
                ..
            } if port == "att" => Some(*fdb_entries_removed),
            _ => None,
        })
        .collect();
    assert_eq!(deleted.len(), 1, "one port_deleted event for att");
    assert!(deleted[0] >= 1);
    assert!(records
        .iter()
        .any(|r| matches!(&r.event, Event::PortUp { port, .. } if port == "tap2")));
}
