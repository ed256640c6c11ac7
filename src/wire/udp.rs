//! UDP (RFC 768): a checked view and a `Repr` with the pseudo-header checksum. The guest's
//! request service speaks it; a zero checksum (none computed) is accepted on receive.

use std::net::Ipv4Addr;

use super::ipv4::{checksum, Protocol};
use super::WireError;

mod field {
    use std::ops::Range;
    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const LENGTH: Range<usize> = 4..6;
    pub const CHECKSUM: Range<usize> = 6..8;
    pub const PAYLOAD: usize = 8;
}

/// Length of the UDP header.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// A read/write view of a UDP datagram. Construction checks the header and that the
/// length field lies between the header length and the buffer length; the payload ends
/// at the length field.
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
        let len = u16::from_be_bytes([b[4], b[5]]) as usize;
        if len < HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if len > b.len() {
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

    pub fn src_port(&self) -> u16 {
        self.u16_at(field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        self.u16_at(field::DST_PORT)
    }

    pub fn len(&self) -> usize {
        self.u16_at(field::LENGTH) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == HEADER_LEN
    }

    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..self.len()]
    }

    /// True when the checksum is valid for the given addresses, or absent (zero).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let len = self.len();
        checksum::combine(&[
            checksum::pseudo_header(src, dst, Protocol::Udp.into(), len as u16),
            checksum::data(&self.buffer.as_ref()[..len]),
        ]) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_u16_at(&mut self, r: std::ops::Range<usize>, v: u16) {
        self.buffer.as_mut()[r].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_src_port(&mut self, v: u16) {
        self.set_u16_at(field::SRC_PORT, v)
    }

    pub fn set_dst_port(&mut self, v: u16) {
        self.set_u16_at(field::DST_PORT, v)
    }

    /// Sets the length field; it must not exceed the buffer (callers size the buffer
    /// from [`Repr::buffer_len`]).
    pub fn set_len(&mut self, v: u16) {
        self.set_u16_at(field::LENGTH, v)
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.len().min(self.buffer.as_ref().len());
        &mut self.buffer.as_mut()[field::PAYLOAD..len]
    }

    /// Computes and stores the checksum; a computed zero is sent as 0xffff (RFC 768).
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_u16_at(field::CHECKSUM, 0);
        let len = self.len().min(self.buffer.as_ref().len());
        let sum = !checksum::combine(&[
            checksum::pseudo_header(src, dst, Protocol::Udp.into(), len as u16),
            checksum::data(&self.buffer.as_ref()[..len]),
        ]);
        self.set_u16_at(field::CHECKSUM, if sum == 0 { 0xffff } else { sum });
    }
}

/// A UDP datagram borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

impl<'a> Repr<'a> {
    /// Parses a datagram carried from `src` to `dst`, checking its checksum unless zero.
    /// Destination port 0 is [`WireError::Malformed`].
    pub fn parse<T: AsRef<[u8]> + ?Sized>(
        packet: &Packet<&'a T>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> Result<Repr<'a>, WireError> {
        if packet.dst_port() == 0 {
            return Err(WireError::Malformed);
        }
        if !packet.verify_checksum(src, dst) {
            return Err(WireError::Checksum);
        }
        let buffer: &'a T = packet.buffer;
        Ok(Repr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            payload: &buffer.as_ref()[field::PAYLOAD..packet.len()],
        })
    }

    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Writes the datagram into `packet` (a buffer of [`buffer_len`](Repr::buffer_len)
    /// bytes, at most 65535) with its checksum for `src` → `dst`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut Packet<T>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) {
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_len(u16::try_from(self.buffer_len()).unwrap_or(u16::MAX));
        let out = packet.payload_mut();
        let n = self.payload.len().min(out.len());
        out[..n].copy_from_slice(&self.payload[..n]);
        packet.fill_checksum(src, dst);
    }

    /// Emits into `buf` (exactly [`buffer_len`](Repr::buffer_len) bytes).
    pub fn emit_into(&self, buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) -> Result<(), WireError> {
        let len = u16::try_from(self.buffer_len()).map_err(|_| WireError::Malformed)?;
        if buf.len() < len as usize {
            return Err(WireError::Truncated);
        }
        buf[field::LENGTH].copy_from_slice(&len.to_be_bytes());
        let mut p = Packet::new_checked(&mut buf[..len as usize])?;
        self.emit(&mut p, src, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 100);

    // 40000 -> 7777, "incr".
    const DATAGRAM: [u8; 12] = [
        0x9c, 0x40, 0x1e, 0x61, 0x00, 0x0c, 0x63, 0xdb, b'i', b'n', b'c', b'r',
    ];

    const REPR: Repr<'static> = Repr {
        src_port: 40000,
        dst_port: 7777,
        payload: b"incr",
    };

    #[test]
    fn deconstruct() {
        let p = Packet::new_checked(&DATAGRAM[..]).unwrap();
        assert_eq!(p.src_port(), 40000);
        assert_eq!(p.dst_port(), 7777);
        assert_eq!(p.len(), 12);
        assert_eq!(p.checksum(), 0x63db);
        assert_eq!(p.payload(), b"incr");
        assert!(p.verify_checksum(SRC, DST));
    }

    #[test]
    fn construct() {
        let mut buf = [0u8; 12];
        buf[5] = 12;
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        p.set_src_port(40000);
        p.set_dst_port(7777);
        p.set_len(12);
        p.payload_mut().copy_from_slice(b"incr");
        p.fill_checksum(SRC, DST);
        assert_eq!(buf, DATAGRAM);
    }

    #[test]
    fn parse() {
        let p = Packet::new_checked(&DATAGRAM[..]).unwrap();
        assert_eq!(Repr::parse(&p, SRC, DST).unwrap(), REPR);
    }

    #[test]
    fn emit() {
        let mut buf = [0u8; 12];
        REPR.emit_into(&mut buf, SRC, DST).unwrap();
        assert_eq!(buf, DATAGRAM);
    }

    #[test]
    fn zero_checksum_is_accepted_and_wrong_one_is_not() {
        let mut b = DATAGRAM;
        b[6] = 0;
        b[7] = 0;
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&p, SRC, DST).unwrap(), REPR);
        let p = Packet::new_checked(&DATAGRAM[..]).unwrap();
        // The pseudo-header covers the addresses.
        assert_eq!(
            Repr::parse(&p, SRC, Ipv4Addr::new(10, 10, 0, 101)),
            Err(WireError::Checksum)
        );
    }

    #[test]
    fn lengths_are_checked() {
        for n in 0..DATAGRAM.len() {
            assert!(Packet::new_checked(&DATAGRAM[..n]).is_err());
        }
        let mut b = DATAGRAM;
        b[5] = 7;
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            WireError::Malformed
        );
        // Trailing bytes beyond the length field are not payload.
        let mut padded = DATAGRAM.to_vec();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(Packet::new_checked(&padded[..]).unwrap().payload(), b"incr");
    }
}
