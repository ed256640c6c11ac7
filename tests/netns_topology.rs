//! Topology files, for real: up.sh builds the four-host example (four host daemons, a
//! vMotion switch of its own, eight VMs created at start), a migration between two hosts
//! the default fabric does not have crosses the vMotion switch and nothing else, the
//! restarts work for any host set, and down.sh leaves nothing behind. Bad files give one
//! line and build nothing.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{require_root, topology_file, EventWatch, Topology};
use vfabric::events::Event;

/// Port `port`'s counters on switch `switch`.
fn port(t: &Topology, switch: &str, port: &str) -> serde_json::Value {
    let v = t.vfabric_json(&["ports", "--switch", switch]);
    v.as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port)
        .cloned()
        .unwrap_or_else(|| panic!("no port {port} on {switch}: {v}"))
}

fn rx_bytes(t: &Topology, switch: &str, p: &str) -> u64 {
    port(t, switch, p)["rx_bytes"].as_u64().unwrap()
}

fn fdb_macs(t: &Topology, switch: &str) -> BTreeSet<String> {
    t.vfabric_json(&["fdb", "show", "--switch", switch])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["mac"].as_str().unwrap().to_string())
        .collect()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn four_hosts_come_up_migrate_over_the_vmotion_switch_and_go_away() {
    if !require_root() {
        return;
    }
    let mut t = Topology::up_file(topology_file("four-hosts.toml"));
    let hosts = t.hosts();
    assert_eq!(hosts, ["silo104", "silo105", "silo106", "silo107"]);
    assert_eq!(t.vms().len(), 8);

    // Every host's daemon answers, with the capacity and the VMs the file gives it.
    for h in &hosts {
        let vms = t.vfabric_json(&["vm", "list", "--host", h]);
        let mut have: Vec<String> = vms
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect();
        have.sort();
        let want: Vec<String> = t
            .vms()
            .iter()
            .filter(|v| &v.host == h)
            .map(|v| v.name.clone())
            .collect();
        assert_eq!(have, want, "VMs on {h}");
    }
    // Every VM created at start answers ping from the client.
    for v in t.vms() {
        assert!(
            t.ping(t.client(), &v.ip.to_string(), 2),
            "{} ({}) does not answer",
            v.name,
            v.ip
        );
    }

    // One vMotion segment for all four hosts, apart from the VM network: each vmk1 is
    // a port of the vmotion switch and of no other.
    assert!(t.ping("silo106", &t.vmotion_ip("silo107"), 1));
    assert!(t.ping("silo104", &t.vmotion_ip("silo106"), 1));
    let vm_ports: BTreeSet<String> = t
        .vfabric_json(&["ports"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("{}:{}", p["port"], p["ifname"]))
        .collect();
    assert!(vm_ports.iter().all(|p| !p.contains("vmk1")), "{vm_ports:?}");
    for h in &hosts {
        assert_eq!(port(&t, "vmotion", h)["ifname"], "vmk1");
    }
    let vmk_macs: BTreeSet<String> = hosts.iter().map(|h| t.mac(h, "vmk1")).collect();
    assert!(fdb_macs(&t, "vmotion").is_subset(&vmk_macs));
    assert!(fdb_macs(&t, "switch").is_disjoint(&vmk_macs));

    // A migration between two hosts the default fabric lacks, over the vmotion switch.
    // The switch forgets what it learned, so that it reports learning vmk1 again: the
    // events of every daemon, both switches included, reach `vfabric events`.
    let watch = EventWatch::start(&t, &[]);
    let vmotion_watch = EventWatch::start(&t, &["--switch", "vmotion"]);
    t.vfabric(&["fdb", "flush", "--switch", "vmotion"]);
    let vm = "vm5";
    assert_eq!(t.vm_host(vm).as_deref(), Some("silo106"));
    let vmk_before = rx_bytes(&t, "vmotion", "silo106");
    let uplink_before = rx_bytes(&t, "switch", "silo106");
    let out = t.vfabric(&["migrate", vm, "--to", "silo107", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(t.vm_host(vm).as_deref(), Some("silo107"));
    assert!(t.ping(t.client(), &t.vm_ip(vm), 2), "{vm} after the move");
    let vmk_sent = rx_bytes(&t, "vmotion", "silo106") - vmk_before;
    let uplink_sent = rx_bytes(&t, "switch", "silo106") - uplink_before;
    // 24,576 pages went over vmk1 (at least their indexes, 8 bytes each, for the zero
    // ones); the uplink carried pings and announces only.
    assert!(vmk_sent > 24_576 * 8, "vMotion switch carried {vmk_sent} B");
    assert!(
        uplink_sent < vmk_sent / 4,
        "the VM network carried {uplink_sent} B, the vMotion one {vmk_sent} B"
    );
    let records = watch.stop();
    let vmotion_learned: BTreeSet<String> = records
        .iter()
        .filter(|r| r.source == "vmotion")
        .filter_map(|r| match &r.event {
            Event::MacLearned { port, .. } => Some(port.clone()),
            _ => None,
        })
        .collect();
    assert!(
        vmotion_learned.contains("silo106") && vmotion_learned.contains("silo107"),
        "the vmotion switch's events: {vmotion_learned:?}"
    );
    let only = vmotion_watch.stop();
    assert!(!only.is_empty(), "events --switch vmotion printed nothing");
    assert!(
        only.iter().all(|r| r.source == "vmotion"),
        "events --switch vmotion: {:?}",
        only.iter().map(|r| &r.source).collect::<BTreeSet<_>>()
    );

    // The restarts work for any host set: the vMotion switch, a host the default
    // fabric lacks (its daemon starts empty), an unknown host refused.
    let o = t.up_sh(&["--restart-switch", "vmotion"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = t.up_sh(&["--restart-host", "silo106"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = t.up_sh(&["--restart-host", "silo999"]);
    assert!(!o.status.success());
    assert!(
        text(&o)
            .contains("unknown host silo999 (the fabric's hosts: silo104 silo105 silo106 silo107)"),
        "{}",
        text(&o)
    );
    let out = t.vfabric(&["migrate", vm, "--to", "silo106"]);
    assert!(out.status.success(), "after the restarts: {}", text(&out));
    assert!(t.ping(t.client(), &t.vm_ip(vm), 2));

    // down.sh removes it all: namespaces (their interfaces with them), processes,
    // sockets, pid files and the recorded plan.
    let mut pids = vec![t.daemon_pid("switch"), t.daemon_pid("vmotion")];
    pids.extend(hosts.iter().map(|h| t.daemon_pid(h)));
    let pids: Vec<u32> = pids.into_iter().map(|p| p.expect("pid file")).collect();
    assert!(t.run_dir.path().join("topology.sh").exists());
    let out = t.down();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(t.namespaces(), Vec::<String>::new());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still runs"
        );
    }
    let left: Vec<String> = std::fs::read_dir(t.run_dir.path())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".log") && !n.starts_with("events-"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(left, Vec::<String>::new(), "left in the run directory");
}

/// A topology file that up.sh must refuse, and what its one line must say.
struct Bad {
    what: &'static str,
    toml: String,
    /// `:LINE:` and the field, as they must appear.
    line: usize,
    field: &'static str,
    says: &'static str,
}

const BASE: &str = r#"[[client]]
name = "client"
ip = "10.10.0.1"

[[host]]
name = "h1"
ip = "10.10.0.11"
"#;

fn bad_files() -> Vec<Bad> {
    vec![
        Bad {
            what: "malformed",
            toml: format!("{BASE}capacity_mb = 1024 MB\n"),
            line: 8,
            field: "host[1].capacity_mb",
            says: "",
        },
        Bad {
            what: "duplicate host",
            toml: format!("{BASE}\n[[host]]\nname = \"h1\"\nip = \"10.10.0.12\"\n"),
            line: 10,
            field: "host[2].name",
            says: "duplicate name h1 (already a host at line 6)",
        },
        Bad {
            what: "unknown host",
            toml: format!("{BASE}\n[[vm]]\nname = \"v1\"\nhost = \"h2\"\nip = \"10.10.0.50\"\n"),
            line: 11,
            field: "vm[1].host",
            says: "unknown host \"h2\"",
        },
        Bad {
            what: "bad name",
            toml: BASE.replace("name = \"h1\"", "name = \"H_1\""),
            line: 6,
            field: "host[1].name",
            says: "invalid host name",
        },
        Bad {
            what: "duplicate IP",
            toml: format!("{BASE}\n[[vm]]\nname = \"v1\"\nhost = \"h1\"\nip = \"10.10.0.11\"\n"),
            line: 12,
            field: "vm[1].ip",
            says: "duplicate IP 10.10.0.11",
        },
    ]
}

#[test]
fn bad_topology_files_give_one_line_and_build_nothing() {
    // up.sh checks the file before it needs root: no root check here.
    let dir = tempfile::tempdir().unwrap();
    for b in bad_files() {
        let file = dir
            .path()
            .join(format!("{}.toml", b.what.replace(' ', "-")));
        std::fs::write(&file, &b.toml).unwrap();
        let failed = match Topology::try_up_file(&file) {
            Ok(_) => panic!("{}: up.sh accepted\n{}", b.what, b.toml),
            Err(f) => f,
        };
        let err = failed.stderr();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{}: one line, not:\n{err}", b.what);
        let want = format!("{}:{}:", file.display(), b.line);
        assert!(
            lines[0].starts_with(&format!("vfabric: error: {want}")),
            "{}: {err}",
            b.what
        );
        assert!(
            lines[0].contains(&format!(": {}: ", b.field)),
            "{}: {err}",
            b.what
        );
        assert!(lines[0].contains(b.says), "{}: {err}", b.what);
        // Nothing built: no namespace of the prefix, nothing in the run directory.
        let ns = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&ns.stdout).contains(&format!("{}-", failed.prefix)),
            "{}: a namespace was made",
            b.what
        );
        let entries = std::fs::read_dir(failed.run_dir.path()).unwrap().count();
        assert_eq!(entries, 0, "{}: the run directory was written", b.what);
    }
    // The checker says the same as up.sh, and a good file is summarised.
    let file = dir.path().join("duplicate-host.toml");
    let out = std::process::Command::new(common::bin())
        .args(["topology", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("host[2].name: duplicate name h1"));
    let out = std::process::Command::new(common::bin())
        .args(["topology", "check"])
        .arg(topology_file("four-hosts.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("ok: 4 host(s), 1 client(s), 8 VM(s), vMotion network: switch"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_default_fabric_is_the_built_in_file() {
    // up.sh with no file and up.sh with the shipped default.toml build the same plan.
    let render = |file: Option<&Path>| {
        let mut c = std::process::Command::new(common::bin());
        c.args(["topology", "render", "--format", "shell"]);
        if let Some(f) = file {
            c.arg(f);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let builtin = render(None);
    assert_eq!(builtin, render(Some(&topology_file("default.toml"))));
    assert!(
        builtin.contains("VF_TOPO_HOSTS=('silo104' 'silo105')\n"),
        "{builtin}"
    );
    assert!(builtin.contains("VF_TOPO_VMOTION='veth'\n"), "{builtin}");
}
