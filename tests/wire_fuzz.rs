//! Robustness of every wire parser: arbitrary bytes are errors or values, never panics;
//! and agreement with an independent implementation (etherparse) on checksums.

use std::net::Ipv4Addr;

use vfabric::wire::tls_record::{self, Direction, Suite};
use vfabric::wire::{arp, ethernet, icmp, ipv4, udp, vxlan, EtherType, MacAddr};

/// xorshift64*: deterministic, dependency-free bytes.
fn bytes(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed >> 12;
            *seed ^= *seed << 25;
            *seed ^= *seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn parse_all(b: &[u8]) {
    if let Ok(f) = ethernet::Frame::new_checked(b) {
        let _ = ethernet::Repr::parse(&f);
        let _ = f.payload();
    }
    if let Ok(p) = arp::Packet::new_checked(b) {
        let _ = (p.source_hardware_addr(), p.target_protocol_addr());
        let _ = arp::Repr::parse(&p);
    }
    if let Ok(p) = ipv4::Packet::new_checked(b) {
        let _ = (p.payload(), p.is_fragment(), p.verify_checksum());
        let _ = ipv4::Repr::parse(&p);
    }
    if let Ok(p) = icmp::Packet::new_checked(b) {
        let _ = p.data();
        let _ = icmp::Repr::parse(&p);
    }
    if let Ok(p) = udp::Packet::new_checked(b) {
        let _ = p.payload();
        let _ = udp::Repr::parse(&p, Ipv4Addr::LOCALHOST, Ipv4Addr::BROADCAST);
    }
    if let Ok(h) = vxlan::Header::new_checked(b) {
        let _ = (h.vni(), h.payload(), vxlan::Repr::parse(&h));
    }
    for vni in [0, 42] {
        let vni = vxlan::Vni::new(vni).unwrap();
        if let Ok(inner) = vxlan::decapsulate(b, vni, 64) {
            assert!(inner.len() <= 64 && inner.len() >= ethernet::HEADER_LEN);
        }
    }
}

#[test]
fn random_bytes_of_every_length_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..200 {
        for _ in 0..200 {
            parse_all(&bytes(&mut seed, len));
        }
    }
}

#[test]
fn tls_records_with_random_headers_and_bodies_are_refused_never_opened() {
    let mut seed = 0x7e57_7e57_u64;
    let mut rx = Direction::new(Suite::Aes128Gcm, &[1; 16], &[2; 12], 0).unwrap();
    for i in 0..4000 {
        let mut b = bytes(&mut seed, (i * 7) % 600);
        if i % 2 == 0 && b.len() >= 5 {
            // A plausible header: only the length and the body are random.
            b[..3].copy_from_slice(&[tls_record::APPLICATION_DATA, 3, 3]);
        }
        match rx.open(&mut b) {
            Ok(None) => assert!(b.len() < tls_record::MAX_RECORD),
            Ok(Some(o)) => panic!("forged record opened: {o:?}"),
            Err(_) => {}
        }
    }
}

#[test]
fn vxlan_headers_with_random_fields_decapsulate_or_say_why() {
    // A valid flags byte often, so the VNI and length checks run too.
    let mut seed = 7u64;
    let mut ok = 0;
    for len in 0..120 {
        for i in 0..200 {
            let mut b = bytes(&mut seed, len);
            if i % 2 == 0 && len >= 8 {
                b[0] = vxlan::FLAG_I;
                b[1..4].fill(0);
                b[7] = 0;
                b[4..7].copy_from_slice(&[0, 0, 42]);
            }
            match vxlan::decapsulate(&b, vxlan::Vni::new(42).unwrap(), 100) {
                Ok(inner) => {
                    assert_eq!(inner, &b[8..]);
                    ok += 1;
                }
                Err(vxlan::DecapError::Truncated) => assert!(len < 22),
                Err(vxlan::DecapError::Oversize) => assert!(len > 108),
                Err(_) => assert_ne!(b[..8], [8, 0, 0, 0, 0, 0, 42, 0]),
            }
        }
    }
    assert!(ok > 0);
}

#[test]
fn plausible_headers_with_random_lengths_never_panic() {
    // Random bytes rarely pass the first checks; seed the version/IHL and ARP lengths
    // so the deeper paths run too.
    let mut seed = 42u64;
    for len in 0..200 {
        for _ in 0..200 {
            let mut b = bytes(&mut seed, len);
            if len > 5 {
                b[0] = 0x40 | (b[0] & 0x0f);
                b[4] = 6;
                b[5] = 4;
            }
            parse_all(&b);
        }
    }
}

#[test]
fn frames_built_by_etherparse_parse_with_valid_checksums() {
    let src_mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let dst_mac = [0x02, 0, 0, 0, 0, 0x64];
    let (src_ip, dst_ip) = ([10, 10, 0, 1], [10, 10, 0, 100]);
    for len in [0usize, 1, 5, 56, 1472] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();

        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv4(src_ip, dst_ip, 64)
            .udp(40000, 7777)
            .write(&mut frame, &payload)
            .unwrap();
        let eth = ethernet::Frame::new_checked(&frame[..]).unwrap();
        assert_eq!(eth.ethertype(), EtherType::Ipv4);
        assert_eq!(eth.dst_addr(), MacAddr(dst_mac));
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        let ip_repr = ipv4::Repr::parse(&ip).unwrap();
        assert_eq!(ip_repr.protocol, ipv4::Protocol::Udp);
        let u = udp::Packet::new_checked(ip.payload()).unwrap();
        assert_ne!(u.checksum(), 0);
        let r = udp::Repr::parse(&u, ip_repr.src_addr, ip_repr.dst_addr).unwrap();
        assert_eq!(
            (r.src_port, r.dst_port, r.payload),
            (40000, 7777, &payload[..])
        );

        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv4(src_ip, dst_ip, 64)
            .icmpv4_echo_request(0x1234, 7)
            .write(&mut frame, &payload)
            .unwrap();
        let eth = ethernet::Frame::new_checked(&frame[..]).unwrap();
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        ipv4::Repr::parse(&ip).unwrap();
        let i = icmp::Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            icmp::Repr::parse(&i).unwrap(),
            icmp::Repr::EchoRequest {
                ident: 0x1234,
                seq_no: 7,
                data: &payload[..]
            }
        );
    }
}

#[test]
fn our_frames_parse_in_etherparse() {
    let src = Ipv4Addr::new(10, 10, 0, 100);
    let dst = Ipv4Addr::new(10, 10, 0, 1);
    for len in [0usize, 1, 5, 56, 1472] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let u = udp::Repr {
            src_port: 7777,
            dst_port: 40000,
            payload: &payload,
        };
        let ip = ipv4::Repr {
            src_addr: src,
            dst_addr: dst,
            protocol: ipv4::Protocol::Udp,
            payload_len: u.buffer_len(),
            ttl: 64,
        };
        let mut buf = vec![0u8; ipv4::HEADER_LEN + u.buffer_len()];
        u.emit_into(&mut buf[ipv4::HEADER_LEN..], src, dst).unwrap();
        ipv4::emit_header(&ip, &mut buf).unwrap();
        let sliced = etherparse::SlicedPacket::from_ip(&buf).unwrap();
        let Some(etherparse::TransportSlice::Udp(us)) = sliced.transport else {
            panic!("not udp");
        };
        let h = etherparse::Ipv4Header::from_slice(&buf).unwrap().0;
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(
            us.checksum(),
            us.to_header().calc_checksum_ipv4(&h, &payload).unwrap()
        );
    }
}

#[test]
fn qemu_streams_of_random_bytes_give_capped_frames_or_an_error_never_a_panic() {
    use vfabric::wire::qemu::{StreamDecoder, StreamError};
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..300 {
        let max = 64 + round * 7;
        let mut d = StreamDecoder::new(max);
        // Random bytes, with small lengths planted now and then so frames do come out.
        let mut stream = bytes(&mut seed, 4096);
        for at in (0..stream.len().saturating_sub(4)).step_by(97) {
            if stream[at] & 1 == 0 {
                let len = (u16::from_be_bytes([stream[at + 1], stream[at + 2]]) as u32) % 200;
                stream[at..at + 4].copy_from_slice(&len.to_be_bytes());
            }
        }
        let mut at = 0;
        'feed: while at < stream.len() {
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => assert!(f.len() <= max),
                    Ok(None) => break,
                    Err(StreamError::Oversize { len, .. }) => {
                        assert!(len as usize > max);
                        // A real port closes the connection here; start a new stream.
                        d.reset();
                        at += 4;
                        continue 'feed;
                    }
                }
            }
            let spare = d.spare();
            assert!(!spare.is_empty());
            let n = spare
                .len()
                .min(1 + (stream[at] as usize % 50))
                .min(stream.len() - at);
            spare[..n].copy_from_slice(&stream[at..at + n]);
            d.filled(n);
            at += n;
        }
    }
}
