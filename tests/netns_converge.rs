//! Namespace test (root) of the stun guard's user-facing side: a migration whose
//! pre-copy cannot converge and is stopped anyway prints a warning line with the
//! estimated downtime before the VM stops, through the real CLI and daemons.

mod common;

use common::{require_root, Topology};

fn ok(out: std::process::Output, what: &str) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed:\n{stdout}{stderr}");
    (stdout, stderr)
}

#[test]
fn a_forced_stop_and_copy_is_announced_before_the_vm_stops() {
    if !require_root() {
        return;
    }
    let t = Topology::up();
    ok(
        t.vfabric(&[
            "vm",
            "create",
            "vm1",
            "--host",
            "silo104",
            "--memory-mb",
            "32",
            "--ip",
            "10.10.0.100",
            "--workload",
            "uniform",
            "--dirty-rate",
            "20000",
        ]),
        "vm create",
    );
    // 20 000 pages/s over a 200 Mbit/s cap (6 100 pages/s), two rounds, no throttle:
    // pre-copy ends at the round limit with most of memory dirty, about a second of
    // estimated downtime, which the 5 s guard lets through.
    let migrate = |to: &str, json: bool| {
        let mut args = vec![
            "migrate",
            "vm1",
            "--to",
            to,
            "--bandwidth-mbps",
            "200",
            "--auto-converge",
            "off",
            "--max-rounds",
            "2",
            "--downtime-ms",
            "1",
            "--max-downtime-ms",
            "5000",
        ];
        if json {
            args.push("--json");
        }
        ok(t.vfabric(&args), "migrate")
    };
    let (stdout, stderr) = migrate("silo105", false);
    let lines: Vec<&str> = stderr.lines().collect();
    let warning = lines
        .iter()
        .position(|l| l.starts_with("vfabric: warning: pre-copy did not converge"))
        .unwrap_or_else(|| panic!("no warning line in:\n{stderr}"));
    let quiesced = lines
        .iter()
        .position(|l| l.contains("quiesced on the source"))
        .unwrap_or_else(|| panic!("no quiesce line in:\n{stderr}"));
    assert!(warning < quiesced, "warning after the stop:\n{stderr}");
    let w = lines[warning];
    assert!(
        w.contains("stopping the VM anyway for an estimated") && w.ends_with("Mbit/s)"),
        "{w}"
    );
    // Human units: an estimate in ms or s, never raw µs.
    assert!(w.contains(" ms (") || w.contains(" s ("), "{w}");
    assert!(!stdout.contains(" us "), "raw µs in:\n{stdout}");
    assert!(
        stdout.contains("did not converge: round limit reached"),
        "{stdout}"
    );
    // Stdout is not a terminal here: no live line redrawn into it.
    assert!(
        !stdout.contains('\r'),
        "live progress in a pipe:\n{stdout:?}"
    );

    // Back with --json: stdout is one JSON object with the per-round figures; the
    // warning still comes, on stderr.
    let (stdout, stderr) = migrate("silo104", true);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("pure JSON");
    assert_eq!(v["converged"], false);
    assert_eq!(v["stop_reason"], "RoundLimit");
    for key in [
        "throttle_pct_per_round",
        "dirty_rate_pages_per_s_per_round",
        "expected_downtime_us_per_round",
    ] {
        assert_eq!(v[key].as_array().map(Vec::len), Some(2), "{key}: {v}");
    }
    assert!(
        stderr.contains("vfabric: warning: pre-copy did not converge"),
        "{stderr}"
    );
}
