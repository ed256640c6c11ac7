//! VXLAN (RFC 7348): the 8-byte header in front of a tunnelled Ethernet frame in a UDP
//! datagram (sans-IO codec: encapsulation header out, checked decapsulation in).
//!
//! ```text
//!  0               1               2               3
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```
//!
//! On receive we follow the Linux kernel (`vxlan_rcv`), which is stricter than the RFC's
//! "reserved bits ignored on receipt": a header without the I flag, or with any reserved
//! bit set, is malformed and dropped, so that a future extension is never misread as
//! plain VXLAN.

use std::fmt;
use std::str::FromStr;

use super::ethernet;

mod field {
    use std::ops::Range;
    pub const FLAGS: usize = 0;
    pub const RESERVED1: Range<usize> = 1..4;
    pub const VNI: Range<usize> = 4..7;
    pub const RESERVED2: usize = 7;
}

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The IANA port (the kernel's default without `dstport` is the legacy 8472).
pub const DEFAULT_PORT: u16 = 4789;
/// The I flag: the VNI is valid. The only flag a plain VXLAN header carries.
pub const FLAG_I: u8 = 0x08;
/// What encapsulation adds to an inner IP packet over an IPv4 underlay: outer IPv4
/// (20) + UDP (8) + VXLAN (8) + the inner Ethernet header (14). An underlay MTU of 1500
/// carries an inner MTU of 1450, as the kernel's vxlan device defaults to.
pub const OVERHEAD: usize = 20 + 8 + HEADER_LEN + ethernet::HEADER_LEN;

/// A 24-bit VXLAN network identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vni(u32);

impl Vni {
    pub const MAX: u32 = 0x00ff_ffff;

    /// `None` if `v` does not fit in 24 bits.
    pub fn new(v: u32) -> Option<Vni> {
        (v <= Self::MAX).then_some(Vni(v))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Vni {
    type Err = String;
    fn from_str(s: &str) -> Result<Vni, String> {
        s.parse::<u32>()
            .ok()
            .and_then(Vni::new)
            .ok_or_else(|| format!("VNI {s:?} is not a number from 0 to {}", Vni::MAX))
    }
}

impl serde::Serialize for Vni {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Vni {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        Vni::new(v).ok_or_else(|| serde::de::Error::custom("VNI wider than 24 bits"))
    }
}

/// Why a received datagram is not a frame of our segment. Each is counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecapError {
    /// Shorter than the VXLAN header plus an Ethernet header.
    #[error("truncated")]
    Truncated,
    /// The I flag is missing or a reserved bit is set.
    #[error("bad flags")]
    BadFlags,
    /// A well-formed header for another segment.
    #[error("VNI {0} is not ours")]
    WrongVni(Vni),
    /// The inner frame is longer than the receiver takes.
    #[error("oversize")]
    Oversize,
}

/// A checked view of a VXLAN header (at least [`HEADER_LEN`] bytes).
#[derive(Debug, Clone)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    pub fn new_checked(buffer: T) -> Result<Header<T>, DecapError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(DecapError::Truncated);
        }
        Ok(Header { buffer })
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// True if exactly the I flag is set and every reserved bit is zero.
    pub fn is_plain(&self) -> bool {
        let b = self.buffer.as_ref();
        self.flags() == FLAG_I
            && b[field::RESERVED1].iter().all(|&x| x == 0)
            && b[field::RESERVED2] == 0
    }

    pub fn vni(&self) -> Vni {
        let b = &self.buffer.as_ref()[field::VNI];
        Vni(u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }

    /// What follows the header: the inner Ethernet frame.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

/// A parsed, valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub vni: Vni,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(h: &Header<T>) -> Result<Repr, DecapError> {
        if !h.is_plain() {
            return Err(DecapError::BadFlags);
        }
        Ok(Repr { vni: h.vni() })
    }

    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// The header bytes: I flag, zero reserved fields, the VNI.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let v = self.vni.0.to_be_bytes();
        [FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]
    }

    pub fn emit(&self, buf: &mut [u8; HEADER_LEN]) {
        *buf = self.to_bytes();
    }
}

/// Checks a received UDP payload against our segment `vni` and returns the inner
/// Ethernet frame. `max_inner` caps the inner frame (the receiver's buffer); lengths
/// are checked before anything is copied, and nothing here can panic.
pub fn decapsulate(datagram: &[u8], vni: Vni, max_inner: usize) -> Result<&[u8], DecapError> {
    let h = Header::new_checked(datagram)?;
    if h.payload().len() < ethernet::HEADER_LEN {
        return Err(DecapError::Truncated);
    }
    let repr = Repr::parse(&h)?;
    if repr.vni != vni {
        return Err(DecapError::WrongVni(repr.vni));
    }
    if h.payload().len() > max_inner {
        return Err(DecapError::Oversize);
    }
    Ok(&datagram[HEADER_LEN..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// VNI 42 in front of a broadcast ARP frame's first bytes.
    const DATAGRAM: [u8; 22] = [
        0x08, 0, 0, 0, 0x00, 0x00, 0x2a, 0, // VXLAN: I flag, VNI 42
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // inner dst
        0x02, 0, 0, 0, 0, 1, // inner src
        0x08, 0x06, // ARP
    ];

    fn vni(v: u32) -> Vni {
        Vni::new(v).unwrap()
    }

    #[test]
    fn deconstruct() {
        let h = Header::new_checked(&DATAGRAM[..]).unwrap();
        assert_eq!(h.flags(), FLAG_I);
        assert!(h.is_plain());
        assert_eq!(h.vni(), vni(42));
        assert_eq!(h.payload(), &DATAGRAM[8..]);
    }

    #[test]
    fn construct() {
        let mut b = [0u8; HEADER_LEN];
        Repr { vni: vni(42) }.emit(&mut b);
        assert_eq!(b, DATAGRAM[..8]);
        // All 24 bits, and nothing spills into the reserved bytes.
        assert_eq!(
            Repr { vni: vni(0xabcdef) }.to_bytes(),
            [0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]
        );
    }

    #[test]
    fn parse_and_emit_round_trip() {
        for v in [0, 1, 42, 4096, Vni::MAX] {
            let b = Repr { vni: vni(v) }.to_bytes();
            let h = Header::new_checked(&b[..]).unwrap();
            assert_eq!(Repr::parse(&h).unwrap().vni.get(), v);
        }
    }

    #[test]
    fn vni_is_24_bits() {
        assert!(Vni::new(Vni::MAX + 1).is_none());
        assert_eq!("42".parse::<Vni>().unwrap(), vni(42));
        assert!("16777216".parse::<Vni>().is_err());
        assert!("-1".parse::<Vni>().is_err());
        assert!("x".parse::<Vni>().is_err());
    }

    #[test]
    fn decapsulation_checks_in_order() {
        assert_eq!(
            decapsulate(&DATAGRAM, vni(42), 1500).unwrap(),
            &DATAGRAM[8..]
        );
        for n in 0..DATAGRAM.len() {
            assert_eq!(
                decapsulate(&DATAGRAM[..n], vni(42), 1500),
                Err(DecapError::Truncated),
                "{n} bytes"
            );
        }
        let mut no_i = DATAGRAM;
        no_i[0] = 0;
        assert_eq!(decapsulate(&no_i, vni(42), 1500), Err(DecapError::BadFlags));
        for at in [0usize, 1, 2, 3, 7] {
            let mut reserved = DATAGRAM;
            reserved[at] |= 0x40;
            assert_eq!(
                decapsulate(&reserved, vni(42), 1500),
                Err(DecapError::BadFlags),
                "reserved bit in byte {at}"
            );
        }
        assert_eq!(
            decapsulate(&DATAGRAM, vni(43), 1500),
            Err(DecapError::WrongVni(vni(42)))
        );
        assert_eq!(
            decapsulate(&DATAGRAM, vni(42), 13),
            Err(DecapError::Oversize)
        );
        assert!(decapsulate(&DATAGRAM, vni(42), 14).is_ok());
    }
}
