//! The control plane across machines, on loopback (no namespaces, no root): two real
//! `vfabric host` processes that stand for two machines, each with its own run
//! directory. The CLI sees machine A's run directory only, so it reaches host b (on
//! "machine B") only over TCP and TLS, named by $VFABRIC_REMOTE. It lists, creates,
//! migrates across and back; a CLI without an operator certificate, or with one of
//! another fabric's CA, is refused with one clear line.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vfabric");

struct Machines {
    dir: tempfile::TempDir,
    children: Vec<Child>,
    remote: String,
}

impl Drop for Machines {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("VFABRIC_RUN_DIR", dir)
        .env_remove("VFABRIC_REMOTE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The one error line of a failed command (and nothing else on stderr).
fn one_line(o: Output, what: &str) -> String {
    assert!(!o.status.success(), "{what} should fail");
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{what}: one clear line, got: {err}");
    assert!(err.starts_with("vfabric: error:"), "{err}");
    err
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Machines {
    fn a(&self) -> PathBuf {
        self.dir.path().join("a")
    }

    fn b(&self) -> PathBuf {
        self.dir.path().join("b")
    }

    /// The CLI on machine A: its run directory, and host b named as remote.
    fn cli(&self, args: &[&str]) -> Output {
        run(&self.a(), &[("VFABRIC_REMOTE", &self.remote)], args)
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&ok(self.cli(args), &format!("{args:?}"))).unwrap()
    }

    fn start() -> Machines {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        // The CA lives on machine A, with the operator's certificate; machine B gets a
        // copy of the CA certificate and its host's certificate, as an admin would.
        for args in [
            &["pki", "init"][..],
            &["pki", "issue", "a", "b"],
            &["pki", "issue-operator"],
        ] {
            ok(run(&a, &[], args), "pki");
        }
        let (pa, pb) = (a.join("pki"), b.join("pki"));
        std::fs::create_dir_all(&pb).unwrap();
        for f in ["ca.pem", "b.pem", "b.key"] {
            std::fs::copy(pa.join(f), pb.join(f)).unwrap();
        }
        let port = free_port();
        let mut m = Machines {
            dir,
            children: vec![],
            remote: format!("b=127.0.0.1:{port}"),
        };
        let ds = m.dir.path().join("datastore");
        let listen = format!("127.0.0.1:{port}");
        for (name, run_dir, extra) in [
            ("a", a.clone(), vec![]),
            ("b", b.clone(), vec!["--control-listen", listen.as_str()]),
        ] {
            let log = std::fs::File::create(m.dir.path().join(format!("{name}.log"))).unwrap();
            let child = Command::new(BIN)
                .args(["host", "--name", name, "--vmotion-addr", "127.0.0.1:0"])
                .args(["--capacity-mb", "1024", "--datastore"])
                .arg(&ds)
                .args(extra)
                .env("VFABRIC_RUN_DIR", &run_dir)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            m.children.push(child);
            let sock = run_dir.join(format!("{name}.sock"));
            let t = Instant::now();
            while !sock.exists() {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "{name} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The TCP listener is up with the socket; wait until it accepts, too.
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "b's control port");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }
}

#[test]
fn the_cli_drives_a_host_on_another_machine_over_tls_only() {
    let m = Machines::start();
    // Machine A's run directory holds no socket of b: whatever reaches b goes over TCP.
    assert!(!m.a().join("b.sock").exists());
    assert!(m.b().join("b.sock").exists());
    let hosts = m.json(&["hosts", "--json"]);
    let names: Vec<&str> = hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"], "{hosts}");
    ok(
        m.cli(&[
            "vm",
            "create",
            "v1",
            "--host",
            "a",
            "--memory-mb",
            "16",
            "--ip",
            "10.0.0.3",
        ]),
        "create",
    );
    // Across and back, with the memory verified by both ends each time.
    for (to, from) in [("b", "a"), ("a", "b")] {
        let out = ok(m.cli(&["migrate", "v1", "--to", to]), "migrate");
        assert!(
            out.contains(&format!("{from} -> {to}")) || out.contains(to),
            "{out}"
        );
        let v = m.json(&["vm", "show", "v1", "--json"]);
        assert_eq!(v["host"], to, "{v}");
        assert_eq!(v["state"], "running", "{v}");
    }
    // A VM made directly on the remote host, listed over TCP.
    ok(
        m.cli(&[
            "vm",
            "create",
            "v2",
            "--host",
            "b",
            "--memory-mb",
            "16",
            "--ip",
            "10.0.0.4",
        ]),
        "create on b",
    );
    let list = m.json(&["vm", "list", "--host", "b", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // Without the remote named, b is unknown to this CLI.
    let err = one_line(
        run(&m.a(), &[], &["vm", "list", "--host", "b", "--json"]),
        "no remote",
    );
    assert!(err.contains("unknown host b"), "{err}");
}

#[test]
fn a_cli_without_a_fabric_certificate_is_refused_with_one_line() {
    let m = Machines::start();
    // No operator certificate of that name here.
    let err = one_line(
        run(
            &m.a(),
            &[
                ("VFABRIC_REMOTE", &m.remote),
                ("VFABRIC_OPERATOR", "nobody"),
            ],
            &["vm", "list", "--host", "b"],
        ),
        "no certificate",
    );
    assert!(err.contains("no certificate for operator nobody"), "{err}");
    // Another fabric's CA and operator: the CLI does not trust b, b does not trust it.
    let other = m.dir.path().join("other");
    for args in [&["pki", "init"][..], &["pki", "issue-operator"]] {
        ok(run(&other, &[], args), "other pki");
    }
    let err = one_line(
        run(
            &other,
            &[("VFABRIC_REMOTE", &m.remote)],
            &["vm", "list", "--host", "b"],
        ),
        "other CA",
    );
    assert!(
        err.contains("host b:") && err.contains("did not prove it is b"),
        "{err}"
    );
    // Our CA trusted, but the certificate another CA's: b refuses it.
    std::fs::copy(m.a().join("pki/ca.pem"), other.join("pki/ca.pem")).unwrap();
    let err = one_line(
        run(
            &other,
            &[("VFABRIC_REMOTE", &m.remote)],
            &["vm", "list", "--host", "b"],
        ),
        "stranger's certificate",
    );
    assert!(err.contains("refused this CLI's certificate"), "{err}");
}
