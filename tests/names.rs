//! Names that become paths, run through the real binary: every daemon and verb refuses a
//! name that could escape the run directory or the datastore, says so in one line, and
//! creates nothing (no socket, no directory, no changed permissions). No root needed:
//! the names are refused before anything privileged happens.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_vfabric");

fn bad_names() -> Vec<String> {
    vec!["../x".into(), "a/b".into(), String::new(), "a".repeat(200)]
}

/// Everything under `dir`, as relative paths with their modes.
fn snapshot(dir: &Path) -> Vec<(String, u32)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            out.push((
                p.strip_prefix(dir).unwrap().display().to_string(),
                md.permissions().mode(),
            ));
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Runs `vfabric ARGS` with its run directory at `<tmp>/run/vfabric` (not created) and
/// checks it fails with exactly one line naming the bad `what` name, leaving `<tmp>`
/// (the parent of the run directory's parent, where `../x` would land) untouched.
fn refused(args: &[&str], what: &str) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("run")).unwrap();
    std::fs::set_permissions(
        tmp.path().join("run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let before = snapshot(tmp.path());
    let out = Command::new(BIN)
        .args(args)
        .env("VFABRIC_RUN_DIR", tmp.path().join("run").join("vfabric"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} was accepted: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line, got: {err}");
    assert!(
        err.starts_with("vfabric: error: ") && err.contains(&format!("invalid {what} name")),
        "{args:?}: {err}"
    );
    assert!(err.len() < 300, "{args:?}: the line stays short: {err}");
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "{args:?} created or changed files"
    );
}

#[test]
fn host_names_that_could_escape_are_refused() {
    for n in bad_names() {
        refused(
            &[
                "host",
                "--name",
                &n,
                "--vmotion-addr",
                "127.0.0.1:0",
                "--datastore",
                "/nonexistent-vfabric-datastore",
            ],
            "host",
        );
    }
}

#[test]
fn switch_and_port_names_that_could_escape_are_refused() {
    for n in bad_names() {
        refused(
            &["switch", "--name", &n, "--port", "client=:vfx0"],
            "switch",
        );
        refused(&["switch", "--port", &format!("{n}=:vfx0")], "port");
        refused(&["fdb", "show", "--switch", &n], "switch");
    }
}

#[test]
fn vm_names_that_could_escape_are_refused() {
    for n in bad_names() {
        refused(
            &[
                "vm",
                "create",
                &n,
                "--host",
                "silo104",
                "--ip",
                "10.10.0.100",
            ],
            "VM",
        );
        refused(
            &["vm", "create", "vm1", "--host", &n, "--ip", "10.10.0.100"],
            "host",
        );
    }
}
