//! The `vfabric` binary as a user meets it, without any daemon: completions, manual
//! pages, help, and the one-line errors of bad input (no root needed).

use std::process::{Command, Output};

const VERBS: [&str; 11] = [
    "switch",
    "fdb",
    "ports",
    "host",
    "vm",
    "migrate",
    "measure",
    "udp",
    "pki",
    "completions",
    "man",
];

fn vfabric(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfabric"))
        .args(args)
        // No daemon answers here: nothing may reach a real fabric.
        .env("VFABRIC_RUN_DIR", "/nonexistent/vfabric-cli-test")
        .output()
        .expect("run vfabric")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Bad input: a non-zero exit and exactly one line, `vfabric: error: …`.
fn assert_one_line_error(args: &[&str], code: i32) -> String {
    let o = vfabric(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.starts_with("vfabric: error: "), "{args:?}: {err:?}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err:?}");
    assert!(stdout(&o).is_empty(), "{args:?}");
    err
}

#[test]
fn completions_for_each_shell_know_every_verb() {
    for shell in ["bash", "zsh", "fish"] {
        let o = vfabric(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let script = stdout(&o);
        for verb in VERBS {
            assert!(script.contains(verb), "{shell} completion lacks {verb}");
        }
        // The options of a verb too (fish writes them without the dashes).
        assert!(script.contains("on-no-convergence"), "{shell}");
        assert!(script.contains("svg"), "{shell}");
    }
    assert!(vfabric(&["completions", "bash"])
        .stdout
        .starts_with(b"_vfabric()"));
    assert_one_line_error(&["completions", "tcsh"], 2);
}

#[test]
fn man_pages_cover_every_verb() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let o = vfabric(&["man", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let main = std::fs::read_to_string(out.join("vfabric.1")).unwrap();
    assert!(
        main.starts_with(".ie") || main.contains(".TH vfabric 1"),
        "{main}"
    );
    for verb in VERBS {
        assert!(main.contains(verb), "vfabric.1 lacks {verb}");
        let page = out.join(format!("vfabric-{verb}.1"));
        let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{page:?}: {e}"));
        assert!(text.contains(&format!(".TH vfabric-{verb} 1")), "{page:?}");
    }
    let migrate = std::fs::read_to_string(out.join("vfabric-migrate.1")).unwrap();
    assert!(migrate.contains("on\\-no\\-convergence"));
    assert!(out.join("vfabric-vm-create.1").exists());
    // Without a directory, vfabric.1 goes to stdout.
    let o = vfabric(&["man"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), main);
}

#[test]
fn help_and_version_are_answers_not_errors() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["--version"],
        &["migrate", "--help"],
    ] {
        let o = vfabric(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(!stdout(&o).is_empty(), "{args:?}");
        assert!(stderr(&o).is_empty(), "{args:?}: {}", stderr(&o));
    }
    let help = stdout(&vfabric(&["--help"]));
    for verb in VERBS {
        assert!(help.contains(verb), "--help lacks {verb}");
    }
    assert!(stdout(&vfabric(&["--version"])).starts_with("vfabric "));
}

#[test]
fn clap_errors_say_vfabric_error_on_one_line() {
    let e = assert_one_line_error(&["migrate", "vm1"], 2);
    assert!(e.contains("--to"), "{e}");
    assert!(e.contains("vfabric migrate --help"), "{e}");
    let e = assert_one_line_error(&["migrat"], 2);
    assert!(e.contains("'migrate'"), "the tip survives: {e}");
    assert_one_line_error(&["fdb", "show", "--jsn"], 2);
    assert_one_line_error(&["vm", "create", "x", "--host", "h", "--ip", "nope"], 2);
}

#[test]
fn bad_values_are_refused_before_anything_is_sent() {
    let e = assert_one_line_error(
        &[
            "vm",
            "create",
            "x",
            "--host",
            "h",
            "--ip",
            "10.0.0.5",
            "--memory-mb",
            "0",
        ],
        1,
    );
    assert!(e.contains("0 MB: must be 4 to 65536 MB"), "{e}");
    assert!(!e.contains("..="), "{e}");
    assert!(!e.contains("MiB"), "{e}");

    // Refused here, not by the VM: nothing listens on this address anyway.
    let e = assert_one_line_error(&["udp", "127.0.0.1:9", "frobnicate"], 1);
    assert!(e.contains("unknown request \"frobnicate\""), "{e}");
    let e = assert_one_line_error(&["udp", "127.0.0.1:9", "put", "k"], 1);
    assert!(e.contains("usage: put KEY VALUE"), "{e}");
}
