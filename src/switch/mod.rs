//! Learning switch core (sans-IO): the forwarding database and the forwarding decision.
//!
//! It sees an ingress port, the Ethernet bytes of one frame and the time, and answers
//! where the frame goes. No TAP, socket or clock lives here, so every rule of the Linux
//! bridge we follow is unit-tested: runts and invalid sources are dropped, multicast,
//! broadcast and unknown unicast flood to every port but the ingress port, known
//! unicast goes to its one port, and nothing goes back out of its ingress port.

pub mod fdb;
pub mod gso;

use std::fmt;
use std::net::SocketAddrV4;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use fdb::{Fdb, FdbConfig, FdbEntry, FdbEvent};

use crate::wire::ethernet::Frame;
use crate::wire::MacAddr;

/// A switch port, numbered from 0 in the order ports were given.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub struct PortId(pub u16);

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a frame was not forwarded (to one port or at all). Counted per port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than an Ethernet header (after the virtio-net header, if any).
    Runt,
    /// Source address multicast, broadcast or all-zero (the Linux bridge drops these).
    InvalidSource,
    /// IEEE 802.1D link-local group (01:80:c2:00:00:01..0f: pause, LACP, LLDP, …),
    /// which a bridge must not forward.
    LinkLocal,
    /// The destination lives on the ingress port: the frame would go back where it came.
    SamePort,
    /// Larger than the read buffer (counted on the ingress port), or larger than the
    /// egress port's MTU and not a GSO frame (counted on the egress port, as the Linux
    /// bridge drops such frames).
    Oversize,
    /// The virtio-net header is inconsistent with the frame.
    BadVnetHeader,
    /// A GSO frame for a port that cannot take one (counted on the egress port).
    GsoUnsupported,
    /// The write to the egress port failed (counted on the egress port).
    TxError,
    /// The egress port is down.
    PortDown,
    /// The egress port's interface is not operationally up (administratively down, or
    /// no carrier): unicast to it is dropped, floods skip it, as a bridge port that is
    /// not forwarding.
    LinkDown,
    /// A tunnel datagram shorter than the VXLAN header plus an Ethernet header.
    VxlanTruncated,
    /// A VXLAN header without the I flag or with a reserved bit set.
    VxlanBadFlags,
    /// A VXLAN header for another segment (VNI).
    VxlanWrongVni,
    /// A tunnel datagram from an address that is none of the port's remotes.
    VxlanUnknownRemote,
    /// The egress port has no peer connected (a QEMU socket port nobody is on).
    NoPeer,
    /// A datagram from a sender that is not the port's peer.
    UnknownPeer,
}

impl DropReason {
    pub const ALL: [DropReason; 16] = [
        DropReason::Runt,
        DropReason::InvalidSource,
        DropReason::LinkLocal,
        DropReason::SamePort,
        DropReason::Oversize,
        DropReason::BadVnetHeader,
        DropReason::GsoUnsupported,
        DropReason::TxError,
        DropReason::PortDown,
        DropReason::LinkDown,
        DropReason::VxlanTruncated,
        DropReason::VxlanBadFlags,
        DropReason::VxlanWrongVni,
        DropReason::VxlanUnknownRemote,
        DropReason::NoPeer,
        DropReason::UnknownPeer,
    ];

    /// Index into per-reason counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Name used by counters and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::InvalidSource => "invalid_source",
            DropReason::LinkLocal => "link_local",
            DropReason::SamePort => "same_port",
            DropReason::Oversize => "oversize",
            DropReason::BadVnetHeader => "bad_vnet_header",
            DropReason::GsoUnsupported => "gso_unsupported",
            DropReason::TxError => "tx_error",
            DropReason::PortDown => "port_down",
            DropReason::LinkDown => "link_down",
            DropReason::VxlanTruncated => "vxlan_truncated",
            DropReason::VxlanBadFlags => "vxlan_bad_flags",
            DropReason::VxlanWrongVni => "vxlan_wrong_vni",
            DropReason::VxlanUnknownRemote => "vxlan_unknown_remote",
            DropReason::NoPeer => "no_peer",
            DropReason::UnknownPeer => "unknown_peer",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// To exactly this port (never the ingress port).
    Unicast(PortId),
    /// To one remote endpoint of this tunnel port (never the ingress port).
    Remote(PortId, SocketAddrV4),
    /// To every port except the ingress port.
    Flood,
    Drop(DropReason),
}

/// The switch core: an FDB plus the forwarding rules.
#[derive(Debug)]
pub struct Switch {
    fdb: Fdb,
}

impl Switch {
    pub fn new(cfg: FdbConfig) -> Switch {
        Switch { fdb: Fdb::new(cfg) }
    }

    pub fn fdb(&self) -> &Fdb {
        &self.fdb
    }

    pub fn fdb_mut(&mut self) -> &mut Fdb {
        &mut self.fdb
    }

    /// Decides the fate of `frame` (Ethernet header first, no virtio-net header) that
    /// arrived on `ingress` at `now` (`t_us` on the wall clock, recorded with what it
    /// learns), learning its source on the way. FDB changes are appended to `events`.
    /// Never panics, whatever the bytes.
    pub fn handle(
        &mut self,
        ingress: PortId,
        frame: &[u8],
        now: Instant,
        t_us: u64,
        events: &mut Vec<FdbEvent>,
    ) -> Decision {
        self.handle_from(ingress, None, frame, now, t_us, events)
    }

    /// [`Switch::handle`] for a frame that came out of tunnel port `ingress` from the
    /// endpoint `from`: its source is learned against that endpoint, and a destination
    /// learned behind a tunnel port goes to its endpoint only. Frames never go back into
    /// their ingress port, not even towards another endpoint of it (split horizon: the
    /// endpoints of a tunnel reach each other directly, RFC 7348 section 4).
    pub fn handle_from(
        &mut self,
        ingress: PortId,
        from: Option<SocketAddrV4>,
        frame: &[u8],
        now: Instant,
        t_us: u64,
        events: &mut Vec<FdbEvent>,
    ) -> Decision {
        let Ok(frame) = Frame::new_checked(frame) else {
            return Decision::Drop(DropReason::Runt);
        };
        let src = frame.src_addr();
        if !src.is_unicast() {
            return Decision::Drop(DropReason::InvalidSource);
        }
        self.fdb
            .learn_from(src, ingress, from, frame.ethertype(), now, t_us, events);
        let dst = frame.dst_addr();
        if is_link_local(&dst) {
            return Decision::Drop(DropReason::LinkLocal);
        }
        if dst.is_multicast() {
            return Decision::Flood;
        }
        match self.fdb.lookup_remote(&dst, now) {
            Some((p, _)) if p == ingress => Decision::Drop(DropReason::SamePort),
            Some((p, Some(r))) => Decision::Remote(p, r),
            Some((p, None)) => Decision::Unicast(p),
            None => Decision::Flood,
        }
    }
}

/// 01:80:c2:00:00:01..0f. The bridge group address itself (…:00, STP) is forwarded, as
/// the Linux bridge does with STP off.
fn is_link_local(dst: &MacAddr) -> bool {
    let b = dst.as_bytes();
    b[..5] == [0x01, 0x80, 0xc2, 0x00, 0x00] && (1..=0x0f).contains(&b[5])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ethernet, EtherType};
    use std::time::Duration;

    const P0: PortId = PortId(0);
    const P1: PortId = PortId(1);
    const P2: PortId = PortId(2);
    const A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xa]);
    const B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xb]);

    fn frame(src: MacAddr, dst: MacAddr, ethertype: EtherType) -> Vec<u8> {
        let mut buf = vec![0u8; 60];
        let repr = ethernet::Repr {
            src,
            dst,
            ethertype,
        };
        repr.emit(&mut Frame::new_checked(&mut buf[..]).unwrap());
        buf
    }

    #[test]
    fn unknown_unicast_floods_then_known_unicast_goes_to_one_port() {
        let t = Instant::now();
        let mut sw = Switch::new(FdbConfig::default());
        let mut ev = vec![];
        assert_eq!(
            sw.handle(P0, &frame(A, B, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Flood
        );
        assert_eq!(
            ev,
            vec![FdbEvent::Learned {
                mac: A,
                port: P0,
                remote: None
            }]
        );
        assert_eq!(
            sw.handle(P1, &frame(B, A, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Unicast(P0)
        );
        assert_eq!(
            sw.handle(P0, &frame(A, B, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Unicast(P1)
        );
    }

    #[test]
    fn broadcast_and_multicast_flood() {
        let t = Instant::now();
        let mut sw = Switch::new(FdbConfig::default());
        let mut ev = vec![];
        for dst in [MacAddr::BROADCAST, MacAddr([0x33, 0x33, 0, 0, 0, 1])] {
            assert_eq!(
                sw.handle(P0, &frame(A, dst, EtherType::Arp), t, 0, &mut ev),
                Decision::Flood
            );
        }
    }

    #[test]
    fn no_hairpin() {
        let t = Instant::now();
        let mut sw = Switch::new(FdbConfig::default());
        let mut ev = vec![];
        sw.handle(P0, &frame(B, A, EtherType::Ipv4), t, 0, &mut ev);
        assert_eq!(
            sw.handle(P0, &frame(A, B, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Drop(DropReason::SamePort)
        );
    }

    #[test]
    fn rarp_moves_the_mac_at_once() {
        let t = Instant::now();
        let mut sw = Switch::new(FdbConfig::default());
        let mut ev = vec![];
        sw.handle(P1, &frame(A, B, EtherType::Ipv4), t, 0, &mut ev);
        ev.clear();
        sw.handle(
            P2,
            &frame(A, MacAddr::BROADCAST, EtherType::Rarp),
            t + Duration::from_millis(1),
            0,
            &mut ev,
        );
        assert_eq!(
            ev,
            vec![FdbEvent::Moved {
                mac: A,
                from: P1,
                to: P2,
                from_remote: None,
                to_remote: None,
                ethertype: EtherType::Rarp
            }]
        );
        assert_eq!(
            sw.handle(P0, &frame(B, A, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Unicast(P2)
        );
    }

    #[test]
    fn aged_entry_floods_again() {
        let t = Instant::now();
        let mut sw = Switch::new(FdbConfig {
            ageing: Duration::from_secs(1),
            ..FdbConfig::default()
        });
        let mut ev = vec![];
        sw.handle(P1, &frame(A, B, EtherType::Ipv4), t, 0, &mut ev);
        assert_eq!(
            sw.handle(P0, &frame(B, A, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Unicast(P1)
        );
        assert_eq!(
            sw.handle(
                P0,
                &frame(B, A, EtherType::Ipv4),
                t + Duration::from_secs(1),
                0,
                &mut ev
            ),
            Decision::Flood
        );
    }

    #[test]
    fn hub_mode_floods_everything() {
        let t = Instant::now();
        let mut sw = Switch::new(FdbConfig {
            ageing: Duration::ZERO,
            ..FdbConfig::default()
        });
        let mut ev = vec![];
        sw.handle(P1, &frame(A, B, EtherType::Ipv4), t, 0, &mut ev);
        assert_eq!(
            sw.handle(P0, &frame(B, A, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Flood
        );
        assert!(ev.is_empty());
    }

    #[test]
    fn invalid_sources_are_dropped_and_not_learned() {
        let t = Instant::now();
        let mut sw = Switch::new(FdbConfig::default());
        let mut ev = vec![];
        for src in [
            MacAddr::ZERO,
            MacAddr::BROADCAST,
            MacAddr([0x01, 0, 0x5e, 0, 0, 1]),
        ] {
            assert_eq!(
                sw.handle(P0, &frame(src, B, EtherType::Ipv4), t, 0, &mut ev),
                Decision::Drop(DropReason::InvalidSource)
            );
        }
        assert!(ev.is_empty() && sw.fdb().is_empty());
    }

    #[test]
    fn runts_and_garbage_never_panic() {
        let t = Instant::now();
        let mut sw = Switch::new(FdbConfig::default());
        let mut ev = vec![];
        for n in 0..14 {
            assert_eq!(
                sw.handle(P0, &[0xa5; 14][..n], t, 0, &mut ev),
                Decision::Drop(DropReason::Runt)
            );
        }
        // Deterministic pseudo-random garbage of every length up to 2 KiB.
        let mut x: u32 = 0x1234_5678;
        for len in 0..2048 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = sw.handle(PortId((len % 3) as u16), &buf, t, 0, &mut ev);
        }
    }

    #[test]
    fn link_local_groups_are_not_forwarded() {
        let t = Instant::now();
        let mut sw = Switch::new(FdbConfig::default());
        let mut ev = vec![];
        let lldp = MacAddr([0x01, 0x80, 0xc2, 0, 0, 0x0e]);
        assert_eq!(
            sw.handle(
                P0,
                &frame(A, lldp, EtherType::Unknown(0x88cc)),
                t,
                0,
                &mut ev
            ),
            Decision::Drop(DropReason::LinkLocal)
        );
        let stp = MacAddr([0x01, 0x80, 0xc2, 0, 0, 0]);
        assert_eq!(
            sw.handle(
                P0,
                &frame(A, stp, EtherType::Unknown(0x0026)),
                t,
                0,
                &mut ev
            ),
            Decision::Flood
        );
    }

    #[test]
    fn macs_behind_a_tunnel_are_reached_through_their_endpoint() {
        let t = Instant::now();
        let mut sw = Switch::new(FdbConfig::default());
        let mut ev = vec![];
        let r1: SocketAddrV4 = "10.99.0.2:4789".parse().unwrap();
        let r2: SocketAddrV4 = "10.99.0.3:4789".parse().unwrap();
        // B comes out of tunnel port P2 from r1: learned against r1.
        assert_eq!(
            sw.handle_from(P2, Some(r1), &frame(B, A, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Flood
        );
        assert_eq!(
            ev,
            vec![FdbEvent::Learned {
                mac: B,
                port: P2,
                remote: Some(r1)
            }]
        );
        assert_eq!(
            sw.handle(P0, &frame(A, B, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Remote(P2, r1)
        );
        // B shows up behind r2: a move within the port, reported with both endpoints.
        ev.clear();
        sw.handle_from(P2, Some(r2), &frame(B, A, EtherType::Rarp), t, 0, &mut ev);
        assert_eq!(
            ev,
            vec![FdbEvent::Moved {
                mac: B,
                from: P2,
                to: P2,
                from_remote: Some(r1),
                to_remote: Some(r2),
                ethertype: EtherType::Rarp
            }]
        );
        assert_eq!(sw.fdb().port_entries(P2), 1);
        assert_eq!(
            sw.handle(P0, &frame(A, B, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Remote(P2, r2)
        );
        // Split horizon: from one endpoint towards another, never back into the tunnel.
        let c = MacAddr([0x02, 0, 0, 0, 0, 0xc]);
        sw.handle_from(P2, Some(r1), &frame(c, A, EtherType::Ipv4), t, 0, &mut ev);
        assert_eq!(
            sw.handle_from(P2, Some(r1), &frame(c, B, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Drop(DropReason::SamePort)
        );
        // B moves to a local port: plain unicast again.
        sw.handle(P1, &frame(B, A, EtherType::Rarp), t, 0, &mut ev);
        assert_eq!(
            sw.handle(P0, &frame(A, B, EtherType::Ipv4), t, 0, &mut ev),
            Decision::Unicast(P1)
        );
        assert_eq!(
            sw.fdb()
                .entries(t)
                .iter()
                .find(|e| e.mac == B)
                .unwrap()
                .remote,
            None
        );
    }

    #[test]
    fn drop_reason_indices_match_the_table() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
