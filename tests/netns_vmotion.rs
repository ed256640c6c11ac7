//! vMotion on the real vMotion network (root): a secret the client stores in the VM's
//! memory never appears in a capture of vmk1 when the migration is encrypted, and does
//! when encryption is disabled for one migration (which shows the capture would see it).

mod common;

use std::time::Duration;

use common::capture::Capture;
use common::{bin, require_root, Topology};

const VM_IP: &str = "10.10.0.100";

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Captures vMotion traffic on silo104's vmk1 while `f` runs; returns the captured
/// frames' bytes, one frame after another.
fn capture_vmk1(t: &Topology, name: &str, f: impl FnOnce()) -> Vec<u8> {
    let capture = Capture::start(t, "silo104", "vmk1", "tcp port 8000", name);
    f();
    std::thread::sleep(Duration::from_millis(200));
    capture
        .stop()
        .into_iter()
        .flat_map(|(_, frame)| frame)
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_secret_in_guest_memory_never_crosses_vmk1_in_clear() {
    if !require_root() {
        return;
    }
    // Opportunistic hosts accept the plaintext control migration below; the first
    // migration asks for `required` itself.
    let t = Topology::up_with(&[("VF_HOST_ARGS", "--vmotion-encryption opportunistic")]);
    ok(
        t.vfabric(&[
            "vm",
            "create",
            "vm1",
            "--host",
            "silo104",
            "--memory-mb",
            "64",
            "--ip",
            VM_IP,
        ]),
        "vm create",
    );
    assert!(t.ping("client", VM_IP, 2), "vm1 does not answer ping");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let secret = format!("s3cret-{nanos:08x}");
    // Several copies: one that straddles two captured segments still leaves others.
    for key in ["k1", "k2", "k3", "k4"] {
        ok(
            t.exec("client", &[bin(), "udp", VM_IP, "put", key, &secret]),
            "udp put",
        );
    }

    let pcap = capture_vmk1(&t, "encrypted.pcap", || {
        let s = t.vfabric_json(&[
            "migrate",
            "vm1",
            "--to",
            "silo105",
            "--encryption",
            "required",
        ]);
        assert!(
            s["transport"].as_str().unwrap().starts_with("TLS 1.3"),
            "{s}"
        );
    });
    assert!(pcap.len() > 64 << 10, "the capture saw no migration");
    assert!(
        !contains(&pcap, secret.as_bytes()),
        "the secret crossed vmk1 in clear"
    );
    let got = ok(
        t.exec("client", &[bin(), "udp", VM_IP, "get", "k1"]),
        "udp get",
    );
    assert!(got.contains(&secret), "the VM lost its state: {got}");

    // The control: with encryption disabled for one migration, the capture finds it.
    let pcap = capture_vmk1(&t, "plain.pcap", || {
        let s = t.vfabric_json(&[
            "migrate",
            "vm1",
            "--to",
            "silo104",
            "--encryption",
            "disabled",
        ]);
        assert!(
            s["transport"].as_str().unwrap().starts_with("plaintext"),
            "{s}"
        );
    });
    assert!(
        contains(&pcap, secret.as_bytes()),
        "a plaintext migration should show the secret: the capture is blind"
    );
}
