//! IPv4 header (RFC 791): a checked view and a `Repr`, plus the Internet checksum that
//! ICMP and UDP share. Options are carried but skipped (by IHL); fragments are visible
//! through the view so that responders can refuse what they cannot reassemble.

use std::net::Ipv4Addr;

use super::WireError;

mod field {
    use std::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLG_OFF: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC_ADDR: Range<usize> = 12..16;
    pub const DST_ADDR: Range<usize> = 16..20;
}

/// Length of a header without options.
pub const HEADER_LEN: usize = 20;
/// Default TTL of emitted packets (Linux's default).
pub const DEFAULT_TTL: u8 = 64;
const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// The Internet checksum (RFC 1071), in pieces so that pseudo-headers can be added.
pub mod checksum {
    use std::net::Ipv4Addr;

    /// One's-complement sum of `data` as big-endian 16-bit words, folded to 16 bits
    /// (not complemented). An odd trailing byte is padded with zero.
    pub fn data(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        let mut chunks = data.chunks_exact(2);
        for c in &mut chunks {
            sum += u16::from_be_bytes([c[0], c[1]]) as u32;
            // Fold early so the u32 can never overflow whatever the length.
            if sum > 0xffff_0000 {
                sum = (sum & 0xffff) + (sum >> 16);
            }
        }
        if let [last] = chunks.remainder() {
            sum += (*last as u32) << 8;
        }
        fold(sum)
    }

    fn fold(mut sum: u32) -> u16 {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// One's-complement sum of partial sums.
    pub fn combine(parts: &[u16]) -> u16 {
        fold(parts.iter().map(|&p| p as u32).sum())
    }

    /// Partial sum of the IPv4 pseudo-header used by UDP and TCP.
    pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u16 {
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&src.octets());
        b[4..8].copy_from_slice(&dst.octets());
        b[9] = protocol;
        b[10..12].copy_from_slice(&length.to_be_bytes());
        data(&b)
    }
}

/// The protocol carried by an IPv4 packet. Unknown numbers are kept as values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Icmp,
    Tcp,
    Udp,
    Unknown(u8),
}

impl From<u8> for Protocol {
    fn from(v: u8) -> Self {
        match v {
            1 => Protocol::Icmp,
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            other => Protocol::Unknown(other),
        }
    }
}

impl From<Protocol> for u8 {
    fn from(p: Protocol) -> u8 {
        match p {
            Protocol::Icmp => 1,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Unknown(v) => v,
        }
    }
}

/// A read/write view of an IPv4 packet. Construction checks that the header (with its
/// options) and the total length fit in the buffer, so no accessor can panic. Bytes
/// after the total length (Ethernet padding) are not part of the payload.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let header_len = ((b[field::VER_IHL] & 0x0f) as usize) * 4;
        let total_len = u16::from_be_bytes([b[2], b[3]]) as usize;
        if header_len < HEADER_LEN || total_len < header_len {
            return Err(WireError::Malformed);
        }
        if b.len() < header_len || b.len() < total_len {
            return Err(WireError::Truncated);
        }
        Ok(Packet { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    fn u16_at(&self, r: std::ops::Range<usize>) -> u16 {
        let b = &self.b()[r];
        u16::from_be_bytes([b[0], b[1]])
    }

    pub fn version(&self) -> u8 {
        self.b()[field::VER_IHL] >> 4
    }

    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        ((self.b()[field::VER_IHL] & 0x0f) as usize) * 4
    }

    pub fn dscp_ecn(&self) -> u8 {
        self.b()[field::DSCP_ECN]
    }

    pub fn total_len(&self) -> usize {
        self.u16_at(field::LENGTH) as usize
    }

    pub fn ident(&self) -> u16 {
        self.u16_at(field::IDENT)
    }

    pub fn dont_frag(&self) -> bool {
        self.u16_at(field::FLG_OFF) & FLAG_DF != 0
    }

    pub fn more_frags(&self) -> bool {
        self.u16_at(field::FLG_OFF) & FLAG_MF != 0
    }

    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> usize {
        ((self.u16_at(field::FLG_OFF) & OFFSET_MASK) as usize) * 8
    }

    /// True for any piece of a fragmented datagram.
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    pub fn ttl(&self) -> u8 {
        self.b()[field::TTL]
    }

    pub fn protocol(&self) -> Protocol {
        Protocol::from(self.b()[field::PROTOCOL])
    }

    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    pub fn src_addr(&self) -> Ipv4Addr {
        let a = &self.b()[field::SRC_ADDR];
        Ipv4Addr::new(a[0], a[1], a[2], a[3])
    }

    pub fn dst_addr(&self) -> Ipv4Addr {
        let a = &self.b()[field::DST_ADDR];
        Ipv4Addr::new(a[0], a[1], a[2], a[3])
    }

    /// True when the header checksum (options included) is valid.
    pub fn verify_checksum(&self) -> bool {
        checksum::data(&self.b()[..self.header_len()]) == 0xffff
    }

    /// The payload: from the end of the options to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..self.total_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_u16_at(&mut self, r: std::ops::Range<usize>, v: u16) {
        self.buffer.as_mut()[r].copy_from_slice(&v.to_be_bytes());
    }

    /// Sets version and header length (bytes, a multiple of 4 from 20 to 60).
    pub fn set_version_and_header_len(&mut self, version: u8, header_len: usize) {
        self.buffer.as_mut()[field::VER_IHL] = (version << 4) | ((header_len / 4) as u8 & 0x0f);
    }

    pub fn set_dscp_ecn(&mut self, v: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = v;
    }

    pub fn set_total_len(&mut self, v: u16) {
        self.set_u16_at(field::LENGTH, v)
    }

    pub fn set_ident(&mut self, v: u16) {
        self.set_u16_at(field::IDENT, v)
    }

    /// Sets flags and fragment offset: `dont_frag`, no more fragments, offset 0.
    pub fn set_unfragmented(&mut self, dont_frag: bool) {
        self.set_u16_at(field::FLG_OFF, if dont_frag { FLAG_DF } else { 0 })
    }

    pub fn set_ttl(&mut self, v: u8) {
        self.buffer.as_mut()[field::TTL] = v;
    }

    pub fn set_protocol(&mut self, p: Protocol) {
        self.buffer.as_mut()[field::PROTOCOL] = p.into();
    }

    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&a.octets());
    }

    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&a.octets());
    }

    /// Computes and stores the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_u16_at(field::CHECKSUM, 0);
        let hl = self.header_len();
        let sum = !checksum::data(&self.buffer.as_ref()[..hl]);
        self.set_u16_at(field::CHECKSUM, sum);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (s, e) = (self.header_len(), self.total_len());
        &mut self.buffer.as_mut()[s..e]
    }
}

/// A validated IPv4 header: version 4, good checksum. Options are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src_addr: Ipv4Addr,
    pub dst_addr: Ipv4Addr,
    pub protocol: Protocol,
    pub payload_len: usize,
    pub ttl: u8,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr, WireError> {
        if packet.version() != 4 {
            return Err(WireError::Malformed);
        }
        if !packet.verify_checksum() {
            return Err(WireError::Checksum);
        }
        Ok(Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            protocol: packet.protocol(),
            payload_len: packet.total_len() - packet.header_len(),
            ttl: packet.ttl(),
        })
    }

    /// Header length of emitted packets (no options).
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Header plus payload; `None` if it exceeds the 16-bit total length.
    pub fn total_len(&self) -> Option<u16> {
        u16::try_from(HEADER_LEN + self.payload_len).ok()
    }

    /// Writes the header (no options, DF set, ident 0: an atomic datagram per RFC 6864)
    /// with its checksum. `packet` was built over a buffer of at least `total_len` bytes;
    /// `payload_len` must fit in 16 bits with the header ([`total_len`](Repr::total_len)).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_version_and_header_len(4, HEADER_LEN);
        packet.set_dscp_ecn(0);
        packet.set_total_len(self.total_len().unwrap_or(u16::MAX));
        packet.set_ident(0);
        packet.set_unfragmented(true);
        packet.set_ttl(self.ttl);
        packet.set_protocol(self.protocol);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
        packet.fill_checksum();
    }
}

/// Writes the header of `repr` at the start of `buf` (which holds header and payload)
/// Errors if `buf` is shorter than header plus payload.
pub fn emit_header(repr: &Repr, buf: &mut [u8]) -> Result<(), WireError> {
    let total = repr.total_len().ok_or(WireError::Malformed)? as usize;
    if buf.len() < total {
        return Err(WireError::Truncated);
    }
    // A zero buffer has IHL 0, which new_checked refuses: write the fields new_checked
    // reads first.
    buf[field::VER_IHL] = 0x45;
    buf[field::LENGTH].copy_from_slice(&(total as u16).to_be_bytes());
    let mut p = Packet::new_checked(&mut buf[..total])?;
    repr.emit(&mut p);
    Ok(())
}

/// Recomputes the UDP or TCP checksum of the IPv4 packet in `buf` (header first), as a
/// NIC completes an offloaded checksum. Other protocols, fragments and malformed packets
/// are left as they are.
pub fn fill_transport_checksum(buf: &mut [u8]) {
    let Ok(p) = Packet::new_checked(&*buf) else {
        return;
    };
    let offset = match p.protocol() {
        Protocol::Udp => 6,
        Protocol::Tcp => 16,
        _ => return,
    };
    let (src, dst, proto) = (p.src_addr(), p.dst_addr(), p.protocol());
    let (start, end) = (p.header_len(), p.total_len());
    if p.is_fragment() || end - start < offset + 2 {
        return;
    }
    let seg = &mut buf[start..end];
    seg[offset..offset + 2].copy_from_slice(&[0, 0]);
    let len = seg.len() as u16;
    let mut sum = !checksum::combine(&[
        checksum::pseudo_header(src, dst, proto.into(), len),
        checksum::data(seg),
    ]);
    if sum == 0 && proto == Protocol::Udp {
        sum = 0xffff;
    }
    seg[offset..offset + 2].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    // 10.10.0.1 -> 10.10.0.100, UDP, 4 bytes of payload, DF, ttl 64.
    const PACKET: [u8; 24] = [
        0x45, 0x00, 0x00, 0x18, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x26, 0x5d, 10, 10, 0, 1, 10,
        10, 0, 100, 0xaa, 0xbb, 0xcc, 0xdd,
    ];

    fn repr() -> Repr {
        Repr {
            src_addr: Ipv4Addr::new(10, 10, 0, 1),
            dst_addr: Ipv4Addr::new(10, 10, 0, 100),
            protocol: Protocol::Udp,
            payload_len: 4,
            ttl: 64,
        }
    }

    #[test]
    fn checksum_reference() {
        // RFC 1071 section 3 example.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum::data(&d), 0xddf2);
        assert_eq!(checksum::data(&[0xff]), 0xff00);
        assert_eq!(checksum::combine(&[0xffff, 0x0001]), 0x0001);
    }

    #[test]
    fn deconstruct() {
        let p = Packet::new_checked(&PACKET[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 24);
        assert!(p.dont_frag() && !p.more_frags() && !p.is_fragment());
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), Protocol::Udp);
        assert_eq!(p.checksum(), 0x265d);
        assert!(p.verify_checksum());
        assert_eq!(p.src_addr(), Ipv4Addr::new(10, 10, 0, 1));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(10, 10, 0, 100));
        assert_eq!(p.payload(), &[0xaa, 0xbb, 0xcc, 0xdd]);
    }

    #[test]
    fn construct() {
        let mut buf = [0u8; 24];
        buf[20..].copy_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd]);
        buf[0] = 0x45;
        buf[3] = 24;
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        p.set_version_and_header_len(4, 20);
        p.set_total_len(24);
        p.set_unfragmented(true);
        p.set_ttl(64);
        p.set_protocol(Protocol::Udp);
        p.set_src_addr(Ipv4Addr::new(10, 10, 0, 1));
        p.set_dst_addr(Ipv4Addr::new(10, 10, 0, 100));
        p.fill_checksum();
        assert_eq!(buf, PACKET);
    }

    #[test]
    fn parse() {
        let p = Packet::new_checked(&PACKET[..]).unwrap();
        assert_eq!(Repr::parse(&p).unwrap(), repr());
    }

    #[test]
    fn emit() {
        let mut buf = [0u8; 24];
        buf[20..].copy_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd]);
        emit_header(&repr(), &mut buf).unwrap();
        assert_eq!(buf, PACKET);
    }

    #[test]
    fn padding_is_not_payload_and_options_are_skipped() {
        let mut padded = PACKET.to_vec();
        padded.extend_from_slice(&[0; 20]);
        let p = Packet::new_checked(&padded[..]).unwrap();
        assert_eq!(p.payload().len(), 4);

        // Same packet with 4 bytes of options (NOPs): IHL 6.
        let mut o = vec![0x46, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
        o.extend_from_slice(&[
            10, 10, 0, 1, 10, 10, 0, 100, 1, 1, 1, 1, 0xaa, 0xbb, 0xcc, 0xdd,
        ]);
        let mut p = Packet::new_checked(&mut o[..]).unwrap();
        p.fill_checksum();
        let p = Packet::new_checked(&o[..]).unwrap();
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.payload(), &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(Repr::parse(&p).unwrap(), repr());
    }

    #[test]
    fn bad_packets_are_errors() {
        for n in 0..PACKET.len() {
            assert!(Packet::new_checked(&PACKET[..n]).is_err());
        }
        let mut b = PACKET;
        b[3] = 30; // total length beyond the buffer
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            WireError::Truncated
        );
        let mut b = PACKET;
        b[3] = 10; // total length shorter than the header
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            WireError::Malformed
        );
        let mut b = PACKET;
        b[0] = 0x44; // IHL 4
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            WireError::Malformed
        );
        let mut b = PACKET;
        b[11] ^= 1;
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&p), Err(WireError::Checksum));
        let mut b = PACKET;
        b[0] = 0x65; // version 6
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&p), Err(WireError::Malformed));
    }

    #[test]
    fn transport_checksum_is_completed() {
        // The UDP fixture of wire::udp inside this header; its checksum field holds only a
        // partial sum, as an offloading sender leaves it.
        let mut b = PACKET.to_vec();
        b[3] = 32;
        b.truncate(20);
        b.extend_from_slice(&[0x9c, 0x40, 0x1e, 0x61, 0x00, 0x0c, 0x12, 0x34]);
        b.extend_from_slice(b"incr");
        Packet::new_checked(&mut b[..]).unwrap().fill_checksum();
        fill_transport_checksum(&mut b);
        assert_eq!(&b[26..28], &[0x63, 0xdb]);
        // Not UDP/TCP, or garbage: untouched.
        let mut icmp = PACKET;
        icmp[9] = 1;
        let before = icmp;
        fill_transport_checksum(&mut icmp);
        assert_eq!(icmp, before);
        fill_transport_checksum(&mut [0x45, 0, 0]);
    }

    #[test]
    fn fragments_are_visible() {
        let mut b = PACKET;
        b[6] = 0x20; // MF
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(p.is_fragment());
        b[6] = 0x00;
        b[7] = 0x01; // offset 8
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.frag_offset(), 8);
        assert!(p.is_fragment());
    }
}
