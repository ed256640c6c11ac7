//! Migration announce (pure): the frames a target host sends after resuming a VM so that
//! switches relearn the VM's MAC on the target's port, and when to send them.
//!
//! The default is what QEMU and cloud-hypervisor send: a RARP reverse request (RFC 903)
//! from the VM's MAC to broadcast, with both hardware addresses set to the VM's MAC and
//! both protocol addresses 0.0.0.0, five times at 0, 50, 200, 450 and 800 ms after resume.
//! A gratuitous ARP is offered as an alternative for fabrics that drop RARP.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use crate::wire::{arp, ethernet, EtherType, MacAddr};

/// Length of every announce frame: the Ethernet minimum, without FCS.
pub const FRAME_LEN: usize = ethernet::MIN_FRAME_LEN;
/// Most entries a schedule may have.
pub const MAX_SCHEDULE_ENTRIES: usize = 20;
/// Latest offset a schedule may name.
pub const MAX_SCHEDULE_OFFSET: Duration = Duration::from_secs(60);

/// Which frame announces a VM after it resumes on a new host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Announce {
    /// RARP reverse request (what QEMU sends): learnable by every switch, answered by none.
    #[default]
    Rarp,
    /// Gratuitous ARP request for the VM's own address: also refreshes peers' ARP caches.
    Garp,
    /// Send nothing: the switch relearns the MAC only when the VM next transmits.
    None,
}

/// Error of parsing an [`Announce`] kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown announce kind {0:?} (expected rarp, garp or none)")]
pub struct ParseAnnounceError(pub String);

impl FromStr for Announce {
    type Err = ParseAnnounceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rarp" => Ok(Announce::Rarp),
            "garp" => Ok(Announce::Garp),
            "none" => Ok(Announce::None),
            _ => Err(ParseAnnounceError(s.to_string())),
        }
    }
}

impl fmt::Display for Announce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Announce::Rarp => "rarp",
            Announce::Garp => "garp",
            Announce::None => "none",
        })
    }
}

/// Builds a broadcast Ethernet frame carrying `packet`, zero-padded to 60 bytes.
fn broadcast_frame(src: MacAddr, ethertype: EtherType, packet: &arp::Repr) -> [u8; FRAME_LEN] {
    let mut buf = [0u8; FRAME_LEN];
    let eth = ethernet::Repr {
        src,
        dst: MacAddr::BROADCAST,
        ethertype,
    };
    // The buffer is 60 bytes: header (14) and ARP packet (28) fit, so neither view can
    // fail; the rest stays zero, which is the padding.
    if let Ok(mut frame) = ethernet::Frame::new_checked(&mut buf[..]) {
        eth.emit(&mut frame);
        let bytes = packet.to_bytes();
        frame.payload_mut()[..bytes.len()].copy_from_slice(&bytes);
    }
    buf
}

/// The RARP announce of `mac`: reverse request, sender = target = `mac`, addresses 0.0.0.0.
pub fn rarp_frame(mac: MacAddr) -> [u8; FRAME_LEN] {
    let packet = arp::Repr {
        operation: arp::Operation::ReverseRequest,
        source_hardware_addr: mac,
        source_protocol_addr: Ipv4Addr::UNSPECIFIED,
        target_hardware_addr: mac,
        target_protocol_addr: Ipv4Addr::UNSPECIFIED,
    };
    broadcast_frame(mac, EtherType::Rarp, &packet)
}

/// A gratuitous ARP request of `mac` for `ip` (sender = target = `ip`, target hardware
/// address zero, as Linux's `arping -U` sends it), broadcast.
pub fn garp_frame(mac: MacAddr, ip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let packet = arp::Repr {
        operation: arp::Operation::Request,
        source_hardware_addr: mac,
        source_protocol_addr: ip,
        target_hardware_addr: MacAddr::ZERO,
        target_protocol_addr: ip,
    };
    broadcast_frame(mac, EtherType::Arp, &packet)
}

/// The announce frame of `kind`, or `None` for [`Announce::None`].
pub fn frame(kind: &Announce, mac: MacAddr, ip: Ipv4Addr) -> Option<[u8; FRAME_LEN]> {
    match kind {
        Announce::Rarp => Some(rarp_frame(mac)),
        Announce::Garp => Some(garp_frame(mac, ip)),
        Announce::None => None,
    }
}

/// When to send the announce frames: offsets after resume, strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

impl Default for Schedule {
    /// QEMU's: 5 frames at 0, 50, 200, 450 and 800 ms (initial 50 ms, step 100 ms).
    fn default() -> Self {
        Schedule(
            [0u64, 50, 200, 450, 800]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
        )
    }
}

/// Error of parsing a [`Schedule`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("announce schedule is empty (expected milliseconds, e.g. 0,50,200,450,800)")]
    Empty,
    #[error("announce schedule entry {0:?} is not a whole number of milliseconds")]
    NotANumber(String),
    #[error("announce schedule has {0} entries, at most {MAX_SCHEDULE_ENTRIES} allowed")]
    TooMany(usize),
    #[error("announce schedule entry {0} ms is later than 60000 ms")]
    TooLate(u64),
    #[error("announce schedule is not strictly increasing at {0} ms")]
    NotIncreasing(u64),
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    /// Comma-separated milliseconds after resume, e.g. `0,50,200,450,800`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(ScheduleError::Empty);
        }
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.len() > MAX_SCHEDULE_ENTRIES {
            return Err(ScheduleError::TooMany(parts.len()));
        }
        let mut out = Vec::with_capacity(parts.len());
        let mut prev: Option<u64> = None;
        for p in parts {
            let ms: u64 = p
                .parse()
                .map_err(|_| ScheduleError::NotANumber(p.to_string()))?;
            if ms > MAX_SCHEDULE_OFFSET.as_millis() as u64 {
                return Err(ScheduleError::TooLate(ms));
            }
            if prev.is_some_and(|q| ms <= q) {
                return Err(ScheduleError::NotIncreasing(ms));
            }
            prev = Some(ms);
            out.push(Duration::from_millis(ms));
        }
        Ok(Schedule(out))
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", d.as_millis())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x01, 0x01]);

    // What QEMU's announce_self_create() puts on the wire for 02:00:00:00:01:01.
    const RARP: [u8; 60] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination: broadcast
        0x02, 0x00, 0x00, 0x00, 0x01, 0x01, // source: the VM
        0x80, 0x35, // RARP
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03, // Ethernet/IPv4, reverse request
        0x02, 0x00, 0x00, 0x00, 0x01, 0x01, 0, 0, 0, 0, // sender: VM MAC, 0.0.0.0
        0x02, 0x00, 0x00, 0x00, 0x01, 0x01, 0, 0, 0, 0, // target: VM MAC, 0.0.0.0
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding
    ];

    #[test]
    fn rarp_matches_fixture() {
        assert_eq!(rarp_frame(MAC), RARP);
        let f = ethernet::Frame::new_checked(&RARP[..]).unwrap();
        assert_eq!(f.ethertype(), EtherType::Rarp);
        let r = arp::Repr::parse(&arp::Packet::new_checked(f.payload()).unwrap()).unwrap();
        assert_eq!(r.operation, arp::Operation::ReverseRequest);
    }

    #[test]
    fn garp_is_a_broadcast_request_for_own_address() {
        let ip = Ipv4Addr::new(10, 10, 0, 100);
        let b = garp_frame(MAC, ip);
        let f = ethernet::Frame::new_checked(&b[..]).unwrap();
        assert_eq!(f.dst_addr(), MacAddr::BROADCAST);
        assert_eq!(f.src_addr(), MAC);
        assert_eq!(f.ethertype(), EtherType::Arp);
        let r = arp::Repr::parse(&arp::Packet::new_checked(f.payload()).unwrap()).unwrap();
        assert_eq!(
            r,
            arp::Repr {
                operation: arp::Operation::Request,
                source_hardware_addr: MAC,
                source_protocol_addr: ip,
                target_hardware_addr: MacAddr::ZERO,
                target_protocol_addr: ip,
            }
        );
        assert!(b[42..].iter().all(|&x| x == 0));
    }

    #[test]
    fn announce_kinds() {
        for k in [Announce::Rarp, Announce::Garp, Announce::None] {
            assert_eq!(k.to_string().parse::<Announce>().unwrap(), k);
        }
        assert_eq!("RARP".parse::<Announce>().unwrap(), Announce::Rarp);
        assert!("arp".parse::<Announce>().is_err());
        let ip = Ipv4Addr::new(10, 10, 0, 100);
        assert_eq!(frame(&Announce::Rarp, MAC, ip), Some(RARP));
        assert_eq!(frame(&Announce::None, MAC, ip), None);
    }

    #[test]
    fn schedule_default_and_parse() {
        let d = Schedule::default();
        assert_eq!(d.to_string(), "0,50,200,450,800");
        assert_eq!("0,50,200,450,800".parse::<Schedule>().unwrap(), d);
        assert_eq!(
            " 10 , 20 ".parse::<Schedule>().unwrap().0,
            vec![Duration::from_millis(10), Duration::from_millis(20)]
        );
        assert_eq!("".parse::<Schedule>(), Err(ScheduleError::Empty));
        assert_eq!(
            "0,x".parse::<Schedule>(),
            Err(ScheduleError::NotANumber("x".into()))
        );
        assert_eq!(
            "0,-5".parse::<Schedule>(),
            Err(ScheduleError::NotANumber("-5".into()))
        );
        assert_eq!(
            "0,50,50".parse::<Schedule>(),
            Err(ScheduleError::NotIncreasing(50))
        );
        assert_eq!(
            "0,60001".parse::<Schedule>(),
            Err(ScheduleError::TooLate(60001))
        );
        assert!("60000".parse::<Schedule>().is_ok());
        let many: Vec<String> = (0..21).map(|i| i.to_string()).collect();
        assert_eq!(
            many.join(",").parse::<Schedule>(),
            Err(ScheduleError::TooMany(21))
        );
        assert!(many[..20].join(",").parse::<Schedule>().is_ok());
    }

    /// A pcap file (microsecond timestamps, Ethernet link type) holding `frames`.
    fn pcap(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes()); // magic
        out.extend_from_slice(&2u16.to_le_bytes()); // version 2.4
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&0i32.to_le_bytes()); // thiszone
        out.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        out.extend_from_slice(&65535u32.to_le_bytes()); // snaplen
        out.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
        for (i, f) in frames.iter().enumerate() {
            out.extend_from_slice(&(1_700_000_000u32 + i as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(f.len() as u32).to_le_bytes()); // captured
            out.extend_from_slice(&(f.len() as u32).to_le_bytes()); // on the wire
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn tcpdump_decodes_the_announce_frames() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let found = std::process::Command::new("tcpdump")
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            assert!(!ci, "tcpdump is required when CI=true");
            eprintln!("SKIPPED tcpdump_decodes_the_announce_frames: tcpdump not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("announce.pcap");
        let ip = Ipv4Addr::new(10, 10, 0, 100);
        let (r, g) = (rarp_frame(MAC), garp_frame(MAC, ip));
        std::fs::write(&path, pcap(&[&r, &g])).unwrap();
        let out = std::process::Command::new("tcpdump")
            .arg("-r")
            .arg(&path)
            .args(["-nn", "-e"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "tcpdump failed: {out:?}");
        assert!(
            text.contains("Reverse Request who-is 02:00:00:00:01:01 tell 02:00:00:00:01:01"),
            "{text}"
        );
        assert!(text.contains("ethertype Reverse ARP (0x8035)"), "{text}");
        assert!(
            text.contains("Request who-has 10.10.0.100 tell 10.10.0.100"),
            "{text}"
        );
        let lower = text.to_lowercase();
        assert!(
            !lower.contains("malformed") && !lower.contains("truncated"),
            "{text}"
        );
    }
}
