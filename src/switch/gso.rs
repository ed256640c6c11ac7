//! Software segmentation of TCP GSO frames (sans-IO), for ports that cannot hand a
//! 64 KiB super-frame to anyone who would segment it: a tunnel port must put each
//! MTU-sized segment in a datagram of its own.
//!
//! What the kernel's `tcp_gso_segment` does, for one frame at a time: every segment
//! gets a copy of the Ethernet, IP and TCP headers; IPv4 total length, identification
//! (+1 per segment) and header checksum, or the IPv6 payload length, are rewritten; the
//! TCP sequence number advances by `gso_size` per segment; FIN and PSH stay on the last
//! segment only and CWR on the first only; and each TCP checksum is computed in full
//! (the super-frame's is partial). Segments are built one at a time in a buffer the
//! caller owns, so memory stays at one segment whatever the frame.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::wire::ipv4::checksum;
use crate::wire::vnet::{VnetHdr, GSO_ECN, GSO_TCPV4, GSO_TCPV6};

/// Why a frame cannot be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// A GSO type other than TCP over IPv4 or IPv6 (the only ones our TAPs enable).
    #[error("unsupported GSO type")]
    Unsupported,
    /// The headers do not match the virtio-net header or are cut short.
    #[error("malformed GSO frame")]
    Malformed,
}

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
const PROTO_TCP: u8 = 6;

/// Where the layers of a frame start.
struct Layout {
    l3: usize,
    l4: usize,
    payload: usize,
    v6: bool,
}

fn layout(eth: &[u8], v6_expected: bool) -> Result<Layout, GsoError> {
    let get = |r: std::ops::Range<usize>| eth.get(r).ok_or(GsoError::Malformed);
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes(get(12..14)?.try_into().unwrap_or([0; 2]));
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes(get(16..18)?.try_into().unwrap_or([0; 2]));
        l3 = 18;
    }
    let (l4, v6) = match ethertype {
        0x0800 if !v6_expected => {
            let b = get(l3..l3 + 20)?;
            let ihl = usize::from(b[0] & 0x0f) * 4;
            if b[0] >> 4 != 4 || ihl < 20 || b[9] != PROTO_TCP {
                return Err(GsoError::Malformed);
            }
            (l3 + ihl, false)
        }
        0x86dd if v6_expected => {
            let b = get(l3..l3 + 40)?;
            if b[0] >> 4 != 6 || b[6] != PROTO_TCP {
                return Err(GsoError::Malformed);
            }
            (l3 + 40, true)
        }
        _ => return Err(GsoError::Malformed),
    };
    let doff = usize::from(get(l4 + 12..l4 + 13)?[0] >> 4) * 4;
    if doff < 20 || l4 + doff > eth.len() {
        return Err(GsoError::Malformed);
    }
    Ok(Layout {
        l3,
        l4,
        payload: l4 + doff,
        v6,
    })
}

/// Splits the GSO frame `eth` (Ethernet first), described by virtio-net header `vnet`,
/// into segments of at most `gso_size` bytes of TCP payload. Each segment is written
/// to `buf` after `headroom` bytes the caller may fill (a tunnel header), and `emit`
/// gets the whole of `buf` (headroom + segment). Stops at the first error of `emit`.
/// Returns how many segments were emitted. A frame whose payload already fits is
/// emitted once, with its checksums computed.
pub fn segment<E>(
    vnet: &[u8],
    eth: &[u8],
    buf: &mut Vec<u8>,
    headroom: usize,
    mut emit: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<Result<usize, E>, GsoError> {
    let h = VnetHdr::new_checked(vnet).map_err(|_| GsoError::Malformed)?;
    let v6 = match h.gso_type() & !GSO_ECN {
        GSO_TCPV4 => false,
        GSO_TCPV6 => true,
        _ => return Err(GsoError::Unsupported),
    };
    let mss = usize::from(h.gso_size());
    if mss == 0 {
        return Err(GsoError::Malformed);
    }
    let lay = layout(eth, v6)?;
    let headers = &eth[..lay.payload];
    let data = &eth[lay.payload..];
    let seq0 = u32::from_be_bytes(eth[lay.l4 + 4..lay.l4 + 8].try_into().unwrap_or([0; 4]));
    let id0 = u16::from_be_bytes(eth[lay.l3 + 4..lay.l3 + 6].try_into().unwrap_or([0; 2]));
    let count = data.len().div_ceil(mss).max(1);
    for i in 0..count {
        let chunk = data
            .get(i * mss..((i + 1) * mss).min(data.len()))
            .unwrap_or(&[]);
        buf.clear();
        buf.resize(headroom, 0);
        buf.extend_from_slice(headers);
        buf.extend_from_slice(chunk);
        let seg = &mut buf[headroom..];
        let tcp_len = seg.len() - lay.l4;
        if lay.v6 {
            let plen = (seg.len() - lay.l3 - 40) as u16;
            seg[lay.l3 + 4..lay.l3 + 6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let ip = &mut seg[lay.l3..lay.l4];
            let total = (tcp_len + ip.len()) as u16;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let sum = !checksum::data(ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        let tcp = lay.l4;
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        if i + 1 < count {
            seg[tcp + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            seg[tcp + 13] &= !TCP_CWR;
        }
        seg[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
        let pseudo = if lay.v6 {
            pseudo_v6(&seg[lay.l3..lay.l3 + 40], tcp_len as u32)
        } else {
            let ip = &seg[lay.l3..lay.l4];
            checksum::pseudo_header(
                Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap_or([0; 4])),
                Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap_or([0; 4])),
                PROTO_TCP,
                tcp_len as u16,
            )
        };
        let sum = !checksum::combine(&[pseudo, checksum::data(&seg[tcp..])]);
        seg[tcp + 16..tcp + 18].copy_from_slice(&sum.to_be_bytes());
        if let Err(e) = emit(buf) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(count))
}

/// What [`finish_partial_checksum`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// Not an unfragmented TCP or UDP packet over IPv4 or IPv6, or a UDP packet
    /// without a checksum: nothing to check.
    NotApplicable,
    /// The checksum verifies.
    Valid,
    /// The field held only the pseudo-header sum, as a sender that left the checksum
    /// to its NIC writes it; it has now been computed.
    Completed,
    /// Wrong, and not a partial checksum either: left as it is for the receiver to drop.
    Bad,
}

/// Verifies the TCP or UDP checksum of the Ethernet frame `eth`, and finishes it if the
/// sender left it partial. A kernel that sends through a virtual device (veth) keeps
/// checksums partial to the end, and a UDP socket hands the tunnelled frame to us as it
/// is: without this, the receiving TAP's stack would see a wrong checksum. Costs one
/// pass over the segment.
pub fn finish_partial_checksum(eth: &mut [u8]) -> Checksum {
    let Some(at) = l4_of(eth) else {
        return Checksum::NotApplicable;
    };
    let (l3, l4, end, proto, v6) = at;
    let field = l4 + if proto == PROTO_TCP { 16 } else { 6 };
    let stored = u16::from_be_bytes([eth[field], eth[field + 1]]);
    if proto == 17 && !v6 && stored == 0 {
        return Checksum::NotApplicable;
    }
    let len = end - l4;
    let pseudo = if v6 {
        let mut b = [0u8; 40];
        b[0..32].copy_from_slice(&eth[l3 + 8..l3 + 40]);
        b[32..36].copy_from_slice(&(len as u32).to_be_bytes());
        b[39] = proto;
        checksum::data(&b)
    } else {
        let ip = &eth[l3..l3 + 20];
        checksum::pseudo_header(
            Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            proto,
            len as u16,
        )
    };
    if checksum::combine(&[pseudo, checksum::data(&eth[l4..end])]) == 0xffff {
        return Checksum::Valid;
    }
    if stored != pseudo {
        return Checksum::Bad;
    }
    eth[field..field + 2].copy_from_slice(&[0, 0]);
    let mut sum = !checksum::combine(&[pseudo, checksum::data(&eth[l4..end])]);
    if sum == 0 && proto == 17 {
        sum = 0xffff;
    }
    eth[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Checksum::Completed
}

/// (l3, l4, end of the L4 segment, protocol, IPv6) of an unfragmented TCP or UDP
/// packet whose header fits in `eth`.
fn l4_of(eth: &[u8]) -> Option<(usize, usize, usize, u8, bool)> {
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([*eth.get(12)?, *eth.get(13)?]);
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*eth.get(16)?, *eth.get(17)?]);
        l3 = 18;
    }
    let (l4, end, proto, v6) = match ethertype {
        0x0800 => {
            let ip = eth.get(l3..l3 + 20)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || fragment {
                return None;
            }
            (l3 + ihl, l3 + total, ip[9], false)
        }
        0x86dd => {
            let ip = eth.get(l3..l3 + 40)?;
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            (l3 + 40, l3 + 40 + plen, ip[6], true)
        }
        _ => return None,
    };
    let min = match proto {
        PROTO_TCP => 20,
        17 => 8,
        _ => return None,
    };
    (end <= eth.len() && end >= l4 + min).then_some((l3, l4, end, proto, v6))
}

/// Partial sum of the IPv6 pseudo-header (RFC 8200 section 8.1) of a TCP segment.
fn pseudo_v6(ip: &[u8], tcp_len: u32) -> u16 {
    let addr = |r: std::ops::Range<usize>| {
        Ipv6Addr::from(<[u8; 16]>::try_from(&ip[r]).unwrap_or([0; 16])).octets()
    };
    let mut b = [0u8; 40];
    b[0..16].copy_from_slice(&addr(8..24));
    b[16..32].copy_from_slice(&addr(24..40));
    b[32..36].copy_from_slice(&tcp_len.to_be_bytes());
    b[39] = PROTO_TCP;
    checksum::data(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::vnet::{F_NEEDS_CSUM, GSO_UDP};

    /// A TCPv4 GSO frame: 10.0.0.1:1000 -> 10.0.0.2:2000, seq 1000, PSH|ACK|CWR,
    /// `payload` bytes of 0..=255 repeating, mss `mss`.
    fn frame_v4(payload: usize, mss: u16, flags: u8) -> (Vec<u8>, Vec<u8>) {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let tcp = &mut f[34..54];
        tcp[0..2].copy_from_slice(&1000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&2000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        f.extend((0..payload).map(|i| i as u8));
        let mut vnet = vec![0u8; 12];
        vnet[0] = F_NEEDS_CSUM;
        vnet[1] = GSO_TCPV4;
        vnet[2..4].copy_from_slice(&54u16.to_le_bytes());
        vnet[4..6].copy_from_slice(&mss.to_le_bytes());
        vnet[6..8].copy_from_slice(&34u16.to_le_bytes());
        vnet[8..10].copy_from_slice(&16u16.to_le_bytes());
        (vnet, f)
    }

    fn collect(vnet: &[u8], eth: &[u8], headroom: usize) -> Result<Vec<Vec<u8>>, GsoError> {
        let mut out = vec![];
        let mut buf = vec![];
        segment(vnet, eth, &mut buf, headroom, |s| {
            out.push(s.to_vec());
            Ok::<(), ()>(())
        })?
        .unwrap();
        Ok(out)
    }

    #[test]
    fn tcpv4_segments_agree_with_an_independent_parser() {
        let (vnet, f) = frame_v4(3000, 1448, 0x80 | 0x18 | 0x01);
        let segs = collect(&vnet, &f, 8).unwrap();
        assert_eq!(segs.len(), 3);
        let mut data = vec![];
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(&s[..8], &[0u8; 8], "headroom left to the caller");
            let p = etherparse::SlicedPacket::from_ethernet(&s[8..]).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                panic!("not IPv4")
            };
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            assert_eq!(h.identification, 0xfffeu16.wrapping_add(i as u16));
            let Some(etherparse::TransportSlice::Tcp(tcp)) = &p.transport else {
                panic!("not TCP")
            };
            let want = tcp
                .to_header()
                .calc_checksum_ipv4(&h, tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), want, "segment {i}");
            assert_eq!(tcp.sequence_number(), 1000 + (i as u32) * 1448);
            assert_eq!(tcp.fin(), i == 2);
            assert_eq!(tcp.psh(), i == 2);
            assert_eq!(tcp.cwr(), i == 0);
            assert!(tcp.ack());
            assert_eq!(
                usize::from(h.total_len),
                40 + tcp.payload().len(),
                "segment {i}"
            );
            assert!(tcp.payload().len() <= 1448);
            data.extend_from_slice(tcp.payload());
        }
        assert_eq!(data, f[54..], "the payload, in order, nothing lost");
    }

    #[test]
    fn tcpv6_segments_have_valid_checksums() {
        let (mut vnet, v4) = frame_v4(2000, 1000, 0x10);
        vnet[1] = GSO_TCPV6;
        let mut f = v4[..14].to_vec();
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[6] = 6;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        ip[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&v4[34..]);
        let segs = collect(&vnet, &f, 0).unwrap();
        assert_eq!(segs.len(), 2);
        for s in &segs {
            let p = etherparse::SlicedPacket::from_ethernet(s).unwrap();
            let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else {
                panic!("not IPv6")
            };
            let h = ip.header().to_header();
            let Some(etherparse::TransportSlice::Tcp(tcp)) = &p.transport else {
                panic!("not TCP")
            };
            assert_eq!(usize::from(h.payload_length), 20 + tcp.payload().len());
            let want = tcp
                .to_header()
                .calc_checksum_ipv6(&h, tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), want);
        }
    }

    #[test]
    fn a_frame_that_fits_is_emitted_once_with_its_checksum() {
        let (vnet, f) = frame_v4(100, 1448, 0x18);
        let segs = collect(&vnet, &f, 0).unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].len(), f.len());
    }

    #[test]
    fn emit_errors_stop_the_frame() {
        let (vnet, f) = frame_v4(5000, 1000, 0x10);
        let mut n = 0;
        let r = segment(&vnet, &f, &mut vec![], 0, |_| {
            n += 1;
            if n == 2 {
                Err("full")
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Ok(Err("full")));
        assert_eq!(n, 2);
    }

    #[test]
    fn partial_checksums_are_finished_and_others_left_alone() {
        let (vnet, f) = frame_v4(500, 1448, 0x18);
        let mut seg = collect(&vnet, &f, 0).unwrap().remove(0);
        let good = seg.clone();
        assert_eq!(finish_partial_checksum(&mut seg), Checksum::Valid);
        assert_eq!(seg, good);
        // What a sender with checksum offload writes: the pseudo-header sum only.
        let pseudo = checksum::pseudo_header(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            6,
            520,
        );
        seg[34 + 16..34 + 18].copy_from_slice(&pseudo.to_be_bytes());
        assert_eq!(finish_partial_checksum(&mut seg), Checksum::Completed);
        assert_eq!(seg, good);
        // Anything else wrong stays wrong.
        seg[60] ^= 1;
        assert_eq!(finish_partial_checksum(&mut seg), Checksum::Bad);
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(finish_partial_checksum(&mut arp), Checksum::NotApplicable);
        // Lengths that point past the frame are not followed.
        let mut cut = good[..100].to_vec();
        assert_eq!(finish_partial_checksum(&mut cut), Checksum::NotApplicable);
    }

    #[test]
    fn bad_frames_are_errors_never_panics() {
        let (mut vnet, f) = frame_v4(3000, 1448, 0x10);
        vnet[1] = GSO_UDP;
        assert_eq!(collect(&vnet, &f, 0), Err(GsoError::Unsupported));
        vnet[1] = GSO_TCPV4;
        vnet[4..6].copy_from_slice(&[0, 0]);
        assert_eq!(collect(&vnet, &f, 0), Err(GsoError::Malformed));
        vnet[4..6].copy_from_slice(&1448u16.to_le_bytes());
        for n in 0..54 {
            assert_eq!(
                collect(&vnet, &f[..n], 0),
                Err(GsoError::Malformed),
                "{n} bytes"
            );
        }
        // IPv6 header under a TCPv4 GSO type, and the reverse.
        let mut v6 = f.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(collect(&vnet, &v6, 0), Err(GsoError::Malformed));
        // Random bytes behind a valid header.
        let mut x = 0x1234_5678u32;
        for len in 0..400 {
            let g: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = collect(&vnet, &g, 8);
            let mut g = g;
            let _ = finish_partial_checksum(&mut g);
            if g.len() > 40 {
                g[12..14].copy_from_slice(&[0x08, 0x00]);
                g[14] = 0x45;
                let _ = finish_partial_checksum(&mut g);
            }
        }
    }
}
