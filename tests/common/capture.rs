//! Packet captures of the namespace tests: tcpdump writing a pcap file inside a
//! namespace, and a reader of the classic pcap format (the project's own, so the tests
//! read frames, not tcpdump's text).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Topology;

/// A tcpdump writing a pcap file inside a namespace until stopped.
pub struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    pub fn start(t: &Topology, host: &str, ifname: &str, filter: &str, name: &str) -> Capture {
        let file = t.run_dir.path().join(name);
        let err = t.run_dir.path().join(format!("{name}.err"));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &t.ns(host),
                "tcpdump",
                "-i",
                ifname,
                "-n",
                "-U",
                "--immediate-mode",
            ])
            .arg("-w")
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("tcpdump");
        let t0 = Instant::now();
        while !std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("listening")
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "tcpdump did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Capture { child, file }
    }

    /// Stops tcpdump and returns (timestamp µs, frame bytes) of every captured frame.
    pub fn stop(mut self) -> Vec<(u64, Vec<u8>)> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        read_pcap(&std::fs::read(&self.file).expect("pcap file"))
    }

    /// Stops tcpdump and returns its own decoding of the capture (`tcpdump -nn -r`):
    /// for checking that tcpdump reads what the fabric sent.
    pub fn decode(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .expect("tcpdump -r");
        assert!(
            out.status.success(),
            "tcpdump -r: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a classic pcap file (microsecond or nanosecond timestamps, either byte order).
pub fn read_pcap(b: &[u8]) -> Vec<(u64, Vec<u8>)> {
    assert!(b.len() >= 24, "pcap too short");
    let magic = u32::from_le_bytes(b[0..4].try_into().unwrap());
    let (le, nanos) = match magic {
        0xa1b2c3d4 => (true, false),
        0xa1b23c4d => (true, true),
        0xd4c3b2a1 => (false, false),
        0x4d3cb2a1 => (false, true),
        m => panic!("not a pcap file (magic {m:#x})"),
    };
    let u32_at = |o: usize| {
        let a: [u8; 4] = b[o..o + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let mut out = Vec::new();
    let mut o = 24;
    while o + 16 <= b.len() {
        let sec = u32_at(o) as u64;
        let frac = u32_at(o + 4) as u64;
        let len = u32_at(o + 8) as usize;
        o += 16;
        if o + len > b.len() {
            break;
        }
        let us = if nanos { frac / 1000 } else { frac };
        out.push((sec * 1_000_000 + us, b[o..o + len].to_vec()));
        o += len;
    }
    out
}
