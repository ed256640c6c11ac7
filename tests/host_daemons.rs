//! Two real `vfabric host` processes on loopback (no namespaces, no root), driven by the
//! real CLI: create, migrate back and forth, admission refusal, memory freed, disk lock
//! handed over, clear errors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vfabric");

struct Hosts {
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Hosts {
    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn datastore(&self) -> PathBuf {
        self.dir.path().join("datastore")
    }

    fn start(names: &[(&str, u64)]) -> Hosts {
        Self::start_with(names, &[])
    }

    fn start_with(names: &[(&str, u64)], extra: &[&str]) -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Hosts {
            dir,
            children: vec![],
        };
        // The fabric CA and one certificate per host, as up.sh makes them.
        let mut pki = vec!["pki", "issue"];
        pki.extend(names.iter().map(|(n, _)| *n));
        for args in [&["pki", "init"][..], &pki] {
            let o = h.cli(args);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        for (name, capacity) in names {
            let log = std::fs::File::create(h.dir.path().join(format!("{name}.log"))).unwrap();
            let child = Command::new(BIN)
                .args(["host", "--name", name, "--vmotion-addr", "127.0.0.1:0"])
                .args(["--capacity-mb", &capacity.to_string()])
                .args(extra)
                .arg("--datastore")
                .arg(h.datastore())
                .env("VFABRIC_RUN_DIR", h.run_dir())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            h.children.push(child);
        }
        for (name, _) in names {
            let sock = h.run_dir().join(format!("{name}.sock"));
            let t = Instant::now();
            while !sock.exists() {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "host {name} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        h
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("VFABRIC_RUN_DIR", self.run_dir())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "vfabric {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn fail(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(!o.status.success(), "vfabric {args:?} should fail");
        let err = String::from_utf8(o.stderr).unwrap();
        let errors: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("vfabric: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "one clear error line, got: {err}");
        assert_eq!(err.lines().last(), Some(errors[0]), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    }

    fn host_info(&self, name: &str) -> Value {
        let sock = self.run_dir().join(format!("{name}.sock"));
        let v: Value =
            vfabric::control::call_simple(&sock, &vfabric::host::api::HostRequest::Info).unwrap();
        v
    }
}

fn lock_owner(ds: &Path, vm: &str) -> Option<String> {
    vfabric::host::datastore::Datastore::open(ds)
        .unwrap()
        .owner(vm)
}

#[test]
fn vm_moves_back_and_forth_and_leaves_nothing_behind() {
    let h = Hosts::start(&[("silo104", 4096), ("silo105", 4096)]);
    h.ok(&[
        "vm",
        "create",
        "vm1",
        "--host",
        "silo104",
        "--memory-mb",
        "64",
        "--ip",
        "10.10.0.100",
        "--workload",
        "sweep",
        "--dirty-rate",
        "50000",
    ]);
    let list = h.json(&["vm", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["host"], "silo104");
    assert_eq!(
        lock_owner(&h.datastore(), "vm1").as_deref(),
        Some("silo104")
    );
    // Let the workload touch memory so that freeing it shows.
    std::thread::sleep(Duration::from_millis(1000));
    let rss_before = h.host_info("silo104")["rss_kib"].as_u64().unwrap();

    let s = h.json(&["migrate", "vm1", "--to", "silo105", "--json"]);
    assert_eq!(s["memory_sha256_source"], s["memory_sha256_target"]);
    assert_eq!(s["pages_pulled"], s["bitmap_bits"]);
    assert!(s["rounds"].as_u64().unwrap() >= 1);
    assert!(s["downtime_us"].as_u64().unwrap() > 0);

    // Step 6: the source lists nothing and gave the memory back; the target owns the disk.
    assert!(h.host_info("silo104")["vms"].as_array().unwrap().is_empty());
    let rss_after = h.host_info("silo104")["rss_kib"].as_u64().unwrap();
    assert!(
        rss_after + 16 * 1024 < rss_before,
        "source RSS should drop by most of 64 MiB: {rss_before} -> {rss_after} KiB"
    );
    let list = h.json(&["vm", "list", "--json"]);
    assert_eq!(list[0]["host"], "silo105");
    assert_eq!(list[0]["state"], "running");
    assert_eq!(
        lock_owner(&h.datastore(), "vm1").as_deref(),
        Some("silo105")
    );

    // And back again.
    let s = h.json(&["migrate", "vm1", "--to", "silo104", "--json"]);
    assert_eq!(s["memory_sha256_source"], s["memory_sha256_target"]);
    assert_eq!(
        lock_owner(&h.datastore(), "vm1").as_deref(),
        Some("silo104")
    );

    // The human output tells the story.
    let out = h.ok(&["migrate", "vm1", "--to", "silo105"]);
    for word in ["round", "pages pulled", "downtime", "memory sha256"] {
        assert!(out.contains(word), "missing {word:?} in:\n{out}");
    }
    // The VM wrote its disk once a second wherever it ran. Three moves allow at most
    // four runs of one writer (silo104, silo105, silo104, silo105): more would mean two
    // hosts wrote the disk at once.
    std::thread::sleep(Duration::from_millis(1200));
    let disk = std::fs::read_to_string(h.datastore().join("vm1.vmdk")).unwrap();
    let mut writers: Vec<&str> = disk
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("host=")))
        .collect();
    writers.dedup();
    assert_eq!(writers.first(), Some(&"silo104"), "{disk}");
    assert!(writers.len() <= 4, "disk writers interleave: {writers:?}");
    assert_eq!(writers.last(), Some(&"silo105"), "{disk}");
    h.ok(&["vm", "destroy", "vm1"]);
    assert!(h
        .json(&["vm", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(lock_owner(&h.datastore(), "vm1"), None);
}

#[test]
fn admission_refuses_before_any_page_moves() {
    let h = Hosts::start(&[("big", 4096), ("small", 600)]);
    h.ok(&[
        "vm",
        "create",
        "vm2",
        "--host",
        "big",
        "--memory-mb",
        "512",
        "--ip",
        "10.10.0.102",
    ]);
    // 512 MB + 176 MB overhead (1 vCPU, 64-bit) does not fit in 600 MB.
    let err = h.fail(&["migrate", "vm2", "--to", "small"]);
    assert!(err.contains("512") && err.contains("600"), "{err}");
    assert!(err.contains("keeps running on big"), "{err}");
    let list = h.json(&["vm", "list", "--json"]);
    assert_eq!(list[0]["host"], "big");
    assert_eq!(list[0]["state"], "running");
    assert_eq!(h.host_info("small")["reserved_mb"], 0);
    // Creating straight onto the small host is refused with the figures too.
    let err = h.fail(&[
        "vm",
        "create",
        "vm3",
        "--host",
        "small",
        "--memory-mb",
        "512",
        "--ip",
        "10.10.0.103",
    ]);
    assert!(err.contains("176") && err.contains("512"), "{err}");
}

#[test]
fn bad_input_gives_one_clear_line() {
    let h = Hosts::start(&[("silo104", 1024)]);
    h.fail(&["vm", "create", "x", "--host", "nosuch", "--ip", "10.0.0.1"]);
    h.fail(&[
        "vm", "create", "x", "--host", "silo104", "--ip", "10.0.0.1", "--vcpus", "3",
    ]);
    h.fail(&[
        "vm",
        "create",
        "x",
        "--host",
        "silo104",
        "--ip",
        "10.0.0.1",
        "--mac",
        "01:00:00:00:00:01",
    ]);
    h.fail(&["migrate", "ghost", "--to", "silo104"]);
    h.ok(&[
        "vm",
        "create",
        "x",
        "--host",
        "silo104",
        "--memory-mb",
        "16",
        "--ip",
        "10.0.0.1",
    ]);
    h.fail(&[
        "vm",
        "create",
        "x",
        "--host",
        "silo104",
        "--memory-mb",
        "16",
        "--ip",
        "10.0.0.2",
    ]);
    h.fail(&["migrate", "x", "--to", "silo104"]);
    h.fail(&["migrate", "x", "--to", "nowhere"]);
    // Nothing of the refused requests changed the VM.
    let v = h.json(&["vm", "show", "x", "--json"]);
    assert_eq!(v["state"], "running");
    assert_eq!(v["ip"], "10.0.0.1");
}

#[test]
fn hosts_without_verification_report_no_digest() {
    let h = Hosts::start_with(&[("a", 1024), ("b", 1024)], &["--no-verify-memory"]);
    h.ok(&[
        "vm",
        "create",
        "v",
        "--host",
        "a",
        "--memory-mb",
        "16",
        "--ip",
        "10.0.0.9",
    ]);
    let s = h.json(&["migrate", "v", "--to", "b", "--json"]);
    assert_eq!(s["memory_sha256_source"], "");
    assert_eq!(s["memory_sha256_target"], "");
    assert_eq!(s["pages_pulled"], s["bitmap_bits"]);
}

#[test]
fn an_announce_chosen_for_a_failed_migration_is_forgotten() {
    let h = Hosts::start(&[("a", 2048), ("b", 2048)]);
    h.ok(&[
        "vm",
        "create",
        "w",
        "--host",
        "a",
        "--memory-mb",
        "16",
        "--ip",
        "10.0.0.7",
        "--workload",
        "uniform",
        "--dirty-rate",
        "max",
    ]);
    // Dirtying faster than 20 Mbit/s drains: the policy aborts, the VM stays on a.
    let err = h.fail(&[
        "migrate",
        "w",
        "--to",
        "b",
        "--announce",
        "none",
        "--bandwidth-mbps",
        "20",
        "--max-rounds",
        "2",
        "--on-no-convergence",
        "abort",
        "--quiet",
    ]);
    assert!(err.contains("keeps running on a"), "{err}");
    // The next migration, with no choice made, announces as the target's default does.
    h.ok(&["migrate", "w", "--to", "b", "--json"]);
    let v = h.json(&["vm", "show", "w", "--json"]);
    assert_eq!(v["host"], "b");
    assert_eq!(v["announce"], "rarp");
}

#[test]
fn vm_digest_reads_the_figure_a_verified_migration_compares() {
    let h = Hosts::start(&[("silo104", 4096), ("silo105", 4096)]);
    h.ok(&[
        "vm",
        "create",
        "vm1",
        "--host",
        "silo104",
        "--memory-mb",
        "16",
        "--ip",
        "10.10.0.100",
        "--workload",
        "idle",
    ]);
    let digest = |h: &Hosts| {
        let d = h.json(&["vm", "digest", "vm1", "--json"]);
        d["memory_sha256"].as_str().unwrap().to_string()
    };
    let before = digest(&h);
    assert_eq!(before.len(), 64, "{before}");
    let s = h.json(&["migrate", "vm1", "--to", "silo105", "--json"]);
    assert_eq!(s["memory_sha256_source"], before.as_str());
    assert_eq!(s["memory_sha256_target"], before.as_str());
    let d = h.json(&["vm", "digest", "vm1", "--json"]);
    assert_eq!(d["host"], "silo105");
    assert_eq!(d["memory_sha256"], before.as_str());
    // A sweep rewrites memory: its digest moves.
    h.ok(&[
        "vm",
        "create",
        "vm2",
        "--host",
        "silo104",
        "--memory-mb",
        "16",
        "--ip",
        "10.10.0.101",
        "--workload",
        "sweep",
    ]);
    let a = h.json(&["vm", "digest", "vm2", "--json"]);
    std::thread::sleep(Duration::from_millis(300));
    let b = h.json(&["vm", "digest", "vm2", "--json"]);
    assert_ne!(a["memory_sha256"], b["memory_sha256"]);
    h.fail(&["vm", "digest", "vm9"]);
}
