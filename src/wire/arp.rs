//! ARP and RARP (RFC 826, RFC 903): one checked view and one `Repr`, the operation tells
//! them apart. RARP reuses ARP's packet format under EtherType 0x8035, which is why the
//! migration announce is built from this same `Repr` with operation 3.

use std::net::Ipv4Addr;

use super::{MacAddr, WireError};

mod field {
    use std::ops::Range;
    pub const HTYPE: Range<usize> = 0..2;
    pub const PTYPE: Range<usize> = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Range<usize> = 6..8;
    /// First byte after the fixed part; the address fields follow, sized by HLEN/PLEN.
    pub const ADDRESSES: usize = 8;
}

/// Hardware type of Ethernet.
pub const HTYPE_ETHERNET: u16 = 1;
/// Protocol type of IPv4 (an EtherType).
pub const PTYPE_IPV4: u16 = 0x0800;
/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = field::ADDRESSES + 2 * (6 + 4);

/// ARP operation code. Unknown codes are kept as values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Request,
    Reply,
    /// RARP "who am I" (RFC 903); also what hypervisors send to announce a moved VM.
    ReverseRequest,
    ReverseReply,
    Unknown(u16),
}

impl From<u16> for Operation {
    fn from(v: u16) -> Self {
        match v {
            1 => Operation::Request,
            2 => Operation::Reply,
            3 => Operation::ReverseRequest,
            4 => Operation::ReverseReply,
            other => Operation::Unknown(other),
        }
    }
}

impl From<Operation> for u16 {
    fn from(op: Operation) -> u16 {
        match op {
            Operation::Request => 1,
            Operation::Reply => 2,
            Operation::ReverseRequest => 3,
            Operation::ReverseReply => 4,
            Operation::Unknown(v) => v,
        }
    }
}

/// A read/write view of an ARP packet whose fixed part and address fields were checked
/// to fit in the buffer.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` after checking that the fixed part and the four addresses (of the
    /// lengths the packet declares) fit. Trailing bytes (Ethernet padding) are allowed.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        let b = buffer.as_ref();
        if b.len() < field::ADDRESSES {
            return Err(WireError::Truncated);
        }
        let need = field::ADDRESSES + 2 * (b[field::HLEN] as usize + b[field::PLEN] as usize);
        if b.len() < need {
            return Err(WireError::Truncated);
        }
        Ok(Packet { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn u16_at(&self, r: std::ops::Range<usize>) -> u16 {
        let b = &self.buffer.as_ref()[r];
        u16::from_be_bytes([b[0], b[1]])
    }

    pub fn hardware_type(&self) -> u16 {
        self.u16_at(field::HTYPE)
    }

    pub fn protocol_type(&self) -> u16 {
        self.u16_at(field::PTYPE)
    }

    pub fn hardware_len(&self) -> u8 {
        self.buffer.as_ref()[field::HLEN]
    }

    pub fn protocol_len(&self) -> u8 {
        self.buffer.as_ref()[field::PLEN]
    }

    pub fn operation(&self) -> Operation {
        Operation::from(self.u16_at(field::OPER))
    }

    fn sha(&self) -> std::ops::Range<usize> {
        let s = field::ADDRESSES;
        s..s + self.hardware_len() as usize
    }

    fn spa(&self) -> std::ops::Range<usize> {
        let s = self.sha().end;
        s..s + self.protocol_len() as usize
    }

    fn tha(&self) -> std::ops::Range<usize> {
        let s = self.spa().end;
        s..s + self.hardware_len() as usize
    }

    fn tpa(&self) -> std::ops::Range<usize> {
        let s = self.tha().end;
        s..s + self.protocol_len() as usize
    }

    pub fn source_hardware_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[self.sha()]
    }

    pub fn source_protocol_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[self.spa()]
    }

    pub fn target_hardware_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[self.tha()]
    }

    pub fn target_protocol_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[self.tpa()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_u16_at(&mut self, r: std::ops::Range<usize>, v: u16) {
        self.buffer.as_mut()[r].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_hardware_type(&mut self, v: u16) {
        self.set_u16_at(field::HTYPE, v)
    }

    pub fn set_protocol_type(&mut self, v: u16) {
        self.set_u16_at(field::PTYPE, v)
    }

    /// Sets the hardware address length. The buffer must hold the addresses it implies
    /// (callers size it with [`Repr::buffer_len`]).
    pub fn set_hardware_len(&mut self, v: u8) {
        self.buffer.as_mut()[field::HLEN] = v
    }

    pub fn set_protocol_len(&mut self, v: u8) {
        self.buffer.as_mut()[field::PLEN] = v
    }

    pub fn set_operation(&mut self, op: Operation) {
        self.set_u16_at(field::OPER, op.into())
    }

    pub fn set_source_hardware_addr(&mut self, a: &[u8]) {
        let r = self.sha();
        self.buffer.as_mut()[r].copy_from_slice(a)
    }

    pub fn set_source_protocol_addr(&mut self, a: &[u8]) {
        let r = self.spa();
        self.buffer.as_mut()[r].copy_from_slice(a)
    }

    pub fn set_target_hardware_addr(&mut self, a: &[u8]) {
        let r = self.tha();
        self.buffer.as_mut()[r].copy_from_slice(a)
    }

    pub fn set_target_protocol_addr(&mut self, a: &[u8]) {
        let r = self.tpa();
        self.buffer.as_mut()[r].copy_from_slice(a)
    }
}

/// An Ethernet/IPv4 ARP or RARP packet. Other hardware or protocol types are
/// [`WireError::Malformed`]: this fabric carries nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub operation: Operation,
    pub source_hardware_addr: MacAddr,
    pub source_protocol_addr: Ipv4Addr,
    pub target_hardware_addr: MacAddr,
    pub target_protocol_addr: Ipv4Addr,
}

fn ipv4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr, WireError> {
        if packet.hardware_type() != HTYPE_ETHERNET
            || packet.protocol_type() != PTYPE_IPV4
            || packet.hardware_len() != 6
            || packet.protocol_len() != 4
        {
            return Err(WireError::Malformed);
        }
        Ok(Repr {
            operation: packet.operation(),
            source_hardware_addr: MacAddr::from_bytes(packet.source_hardware_addr()),
            source_protocol_addr: ipv4(packet.source_protocol_addr()),
            target_hardware_addr: MacAddr::from_bytes(packet.target_hardware_addr()),
            target_protocol_addr: ipv4(packet.target_protocol_addr()),
        })
    }

    pub const fn buffer_len(&self) -> usize {
        PACKET_LEN
    }

    /// Writes the packet into `packet`, whose buffer holds at least
    /// [`buffer_len`](Repr::buffer_len) bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_hardware_type(HTYPE_ETHERNET);
        packet.set_protocol_type(PTYPE_IPV4);
        packet.set_hardware_len(6);
        packet.set_protocol_len(4);
        packet.set_operation(self.operation);
        packet.set_source_hardware_addr(&self.source_hardware_addr.0);
        packet.set_source_protocol_addr(&self.source_protocol_addr.octets());
        packet.set_target_hardware_addr(&self.target_hardware_addr.0);
        packet.set_target_protocol_addr(&self.target_protocol_addr.octets());
    }

    /// Emits into a fresh buffer of exactly [`buffer_len`](Repr::buffer_len) bytes.
    pub fn to_bytes(&self) -> [u8; PACKET_LEN] {
        let mut buf = [0u8; PACKET_LEN];
        // The buffer is PACKET_LEN long, so the checked view and emit cannot fail.
        buf[field::HLEN] = 6;
        buf[field::PLEN] = 4;
        if let Ok(mut p) = Packet::new_checked(&mut buf[..]) {
            self.emit(&mut p);
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Who has 10.10.0.100? Tell 10.10.0.1 (52:54:00:12:34:56).
    const REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // htype, ptype, hlen, plen, op
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 10, 0, 1, // sender
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 10, 10, 0, 100, // target
    ];

    fn request_repr() -> Repr {
        Repr {
            operation: Operation::Request,
            source_hardware_addr: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            source_protocol_addr: Ipv4Addr::new(10, 10, 0, 1),
            target_hardware_addr: MacAddr::ZERO,
            target_protocol_addr: Ipv4Addr::new(10, 10, 0, 100),
        }
    }

    #[test]
    fn deconstruct() {
        let p = Packet::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(p.hardware_type(), 1);
        assert_eq!(p.protocol_type(), 0x0800);
        assert_eq!(p.hardware_len(), 6);
        assert_eq!(p.protocol_len(), 4);
        assert_eq!(p.operation(), Operation::Request);
        assert_eq!(p.source_hardware_addr(), &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(p.source_protocol_addr(), &[10, 10, 0, 1]);
        assert_eq!(p.target_hardware_addr(), &[0; 6]);
        assert_eq!(p.target_protocol_addr(), &[10, 10, 0, 100]);
    }

    #[test]
    fn construct() {
        let mut buf = [0u8; 28];
        buf[field::HLEN] = 6;
        buf[field::PLEN] = 4;
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        p.set_hardware_type(1);
        p.set_protocol_type(0x0800);
        p.set_operation(Operation::Request);
        p.set_source_hardware_addr(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        p.set_source_protocol_addr(&[10, 10, 0, 1]);
        p.set_target_hardware_addr(&[0; 6]);
        p.set_target_protocol_addr(&[10, 10, 0, 100]);
        assert_eq!(buf, REQUEST);
    }

    #[test]
    fn parse() {
        let p = Packet::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(Repr::parse(&p).unwrap(), request_repr());
    }

    #[test]
    fn emit() {
        let repr = request_repr();
        assert_eq!(repr.buffer_len(), 28);
        assert_eq!(repr.to_bytes(), REQUEST);
    }

    #[test]
    fn operations_round_trip_and_unknown_is_a_value() {
        for v in 0u16..8 {
            assert_eq!(u16::from(Operation::from(v)), v);
        }
        assert_eq!(Operation::from(3), Operation::ReverseRequest);
        assert_eq!(Operation::from(9), Operation::Unknown(9));
        let mut b = REQUEST;
        b[7] = 9;
        let r = Repr::parse(&Packet::new_checked(&b[..]).unwrap()).unwrap();
        assert_eq!(r.operation, Operation::Unknown(9));
    }

    #[test]
    fn other_types_are_malformed_and_short_is_truncated() {
        let mut b = REQUEST;
        b[1] = 6; // IEEE 802 hardware
        assert_eq!(
            Repr::parse(&Packet::new_checked(&b[..]).unwrap()),
            Err(WireError::Malformed)
        );
        for n in 0..REQUEST.len() {
            assert_eq!(
                Packet::new_checked(&REQUEST[..n]).unwrap_err(),
                WireError::Truncated
            );
        }
        // Declared lengths larger than the buffer are caught at construction.
        let mut b = REQUEST;
        b[field::HLEN] = 255;
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            WireError::Truncated
        );
    }
}
