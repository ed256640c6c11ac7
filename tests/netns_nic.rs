//! The guest NIC answers a real kernel: ARP, ping and the UDP service, through a packet
//! socket on one end of a veth pair whose other end is a client with an IP stack.
//! Needs root (namespaces, raw sockets); skipped loudly otherwise, failed under CI=true.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vfabric::guest::nic::{read_counter, Nic};
use vfabric::memory::GuestMemory;
use vfabric::port::packet::PacketSocket;
use vfabric::wire::MacAddr;

const VM_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x01, 0x01]);
const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 100);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace holding a client interface `<ns>c` (10.10.0.1/24) and its veth peer
/// `<ns>u`, the uplink the VM's frames use. Deleted on drop, even after a failure.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn in_ns(ns: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("run ip netns exec")
}

#[test]
fn kernel_client_pings_and_queries_the_guest() {
    if !common::require_root() {
        return;
    }
    let tag = (std::process::id() as u64 ^ vfabric::clock::unix_micros() >> 4) & 0xffff;
    let ns = Netns(format!("vn{tag:04x}"));
    ip(&["netns", "add", &ns.0]);
    let (client, uplink) = (format!("{}c", ns.0), format!("{}u", ns.0));
    ip(&[
        "-n", &ns.0, "link", "add", &client, "type", "veth", "peer", "name", &uplink,
    ]);
    ip(&["-n", &ns.0, "addr", "add", "10.10.0.1/24", "dev", &client]);
    ip(&["-n", &ns.0, "link", "set", &client, "up"]);
    ip(&["-n", &ns.0, "link", "set", &uplink, "up"]);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);

    let path = PathBuf::from("/run/netns").join(&ns.0);
    let up = uplink.clone();
    let sock = std::thread::spawn(move || {
        vfabric::sys::packet::enter_netns(&path).expect("enter namespace");
        PacketSocket::open(&up)
    })
    .join()
    .unwrap()
    .unwrap();

    let mem = Arc::new(GuestMemory::new(1 << 20).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let responder = {
        let (mem, stop) = (Arc::clone(&mem), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut nic = Nic::new(VM_MAC, VM_IP);
            let mut buf = vec![0u8; 65536 + 64];
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(n) = sock.recv(&mut buf, Duration::from_millis(50)).unwrap() {
                    nic.handle(&buf[..n], &mem, &mut out);
                    for f in out.drain(..) {
                        sock.send(&f).unwrap();
                    }
                }
            }
            *nic.stats()
        })
    };

    let ping = in_ns(
        &ns.0,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.10.0.100"],
    );
    let ping_big = in_ns(
        &ns.0,
        &[
            "ping",
            "-c",
            "1",
            "-s",
            "1472",
            "-M",
            "do",
            "-W",
            "2",
            "10.10.0.100",
        ],
    );
    let bin = env!("CARGO_BIN_EXE_vfabric");
    let incr1 = in_ns(&ns.0, &[bin, "udp", "10.10.0.100", "incr"]);
    let incr2 = in_ns(&ns.0, &[bin, "udp", "10.10.0.100", "incr"]);
    let put = in_ns(
        &ns.0,
        &[bin, "udp", "10.10.0.100:7777", "put", "colour", "blue"],
    );
    let get = in_ns(&ns.0, &[bin, "udp", "10.10.0.100", "get", "colour"]);
    let silent = in_ns(
        &ns.0,
        &[bin, "udp", "10.10.0.100:9", "get", "--timeout-ms", "200"],
    );

    stop.store(true, Ordering::Relaxed);
    let stats = responder.join().unwrap();

    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(ping.status.success(), "ping: {}", text(&ping));
    assert!(text(&ping).contains("3 received"), "{}", text(&ping));
    assert!(
        ping_big.status.success(),
        "ping -s 1472: {}",
        text(&ping_big)
    );
    // Offloaded UDP checksums from the client's veth must be completed by the port.
    assert_eq!(
        text(&incr1),
        "counter 1",
        "{} {stats:?}",
        String::from_utf8_lossy(&incr1.stderr)
    );
    assert_eq!(text(&incr2), "counter 2");
    assert_eq!(text(&put), "ok");
    assert_eq!(text(&get), "value blue");
    assert!(!silent.status.success());
    assert!(
        String::from_utf8_lossy(&silent.stderr)
            .contains("no reply from 10.10.0.100:9 within 200 ms"),
        "{}",
        String::from_utf8_lossy(&silent.stderr)
    );
    assert_eq!(read_counter(&mem), 2);
    assert!(stats.arp_replies >= 1, "{stats:?}");
    assert_eq!(stats.echo_replies, 4, "{stats:?}");
    assert_eq!(stats.udp_replies, 4, "{stats:?}");
    assert_eq!(stats.dropped_bad, 0, "{stats:?}");
}
