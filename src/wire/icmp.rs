//! ICMPv4 (RFC 792), echo request and reply only: what `ping` needs from the guest.
//! Other message types are readable through the view; the `Repr` refuses them.

use super::ipv4::checksum;
use super::WireError;

mod field {
    use std::ops::Range;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Range<usize> = 2..4;
    pub const ECHO_IDENT: Range<usize> = 4..6;
    pub const ECHO_SEQNO: Range<usize> = 6..8;
    pub const ECHO_DATA: usize = 8;
}

/// Length of the ICMP header, echo identifier and sequence number included.
pub const HEADER_LEN: usize = field::ECHO_DATA;

/// ICMP message type. Unknown types are kept as values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    EchoReply,
    DstUnreachable,
    EchoRequest,
    TimeExceeded,
    Unknown(u8),
}

impl From<u8> for Message {
    fn from(v: u8) -> Self {
        match v {
            0 => Message::EchoReply,
            3 => Message::DstUnreachable,
            8 => Message::EchoRequest,
            11 => Message::TimeExceeded,
            other => Message::Unknown(other),
        }
    }
}

impl From<Message> for u8 {
    fn from(m: Message) -> u8 {
        match m {
            Message::EchoReply => 0,
            Message::DstUnreachable => 3,
            Message::EchoRequest => 8,
            Message::TimeExceeded => 11,
            Message::Unknown(v) => v,
        }
    }
}

/// A read/write view of an ICMP message of at least [`HEADER_LEN`] bytes. The whole
/// buffer is the message: callers pass the IPv4 payload, not the Ethernet frame.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
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

    pub fn msg_type(&self) -> Message {
        Message::from(self.buffer.as_ref()[field::TYPE])
    }

    pub fn msg_code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    pub fn echo_ident(&self) -> u16 {
        self.u16_at(field::ECHO_IDENT)
    }

    pub fn echo_seq_no(&self) -> u16 {
        self.u16_at(field::ECHO_SEQNO)
    }

    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[field::ECHO_DATA..]
    }

    /// True when the checksum over the whole message is valid.
    pub fn verify_checksum(&self) -> bool {
        checksum::data(self.buffer.as_ref()) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_u16_at(&mut self, r: std::ops::Range<usize>, v: u16) {
        self.buffer.as_mut()[r].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_msg_type(&mut self, m: Message) {
        self.buffer.as_mut()[field::TYPE] = m.into();
    }

    pub fn set_msg_code(&mut self, v: u8) {
        self.buffer.as_mut()[field::CODE] = v;
    }

    pub fn set_echo_ident(&mut self, v: u16) {
        self.set_u16_at(field::ECHO_IDENT, v)
    }

    pub fn set_echo_seq_no(&mut self, v: u16) {
        self.set_u16_at(field::ECHO_SEQNO, v)
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::ECHO_DATA..]
    }

    /// Computes and stores the checksum over the whole message.
    pub fn fill_checksum(&mut self) {
        self.set_u16_at(field::CHECKSUM, 0);
        let sum = !checksum::data(self.buffer.as_ref());
        self.set_u16_at(field::CHECKSUM, sum);
    }
}

/// An echo request or reply, borrowing its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr<'a> {
    EchoRequest {
        ident: u16,
        seq_no: u16,
        data: &'a [u8],
    },
    EchoReply {
        ident: u16,
        seq_no: u16,
        data: &'a [u8],
    },
}

impl<'a> Repr<'a> {
    /// Parses an echo message with a valid checksum and code 0; any other type is
    /// [`WireError::Malformed`].
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<Repr<'a>, WireError> {
        if !packet.verify_checksum() {
            return Err(WireError::Checksum);
        }
        if packet.msg_code() != 0 {
            return Err(WireError::Malformed);
        }
        let (ident, seq_no) = (packet.echo_ident(), packet.echo_seq_no());
        let buffer: &'a T = packet.buffer;
        let data = &buffer.as_ref()[field::ECHO_DATA..];
        match packet.msg_type() {
            Message::EchoRequest => Ok(Repr::EchoRequest {
                ident,
                seq_no,
                data,
            }),
            Message::EchoReply => Ok(Repr::EchoReply {
                ident,
                seq_no,
                data,
            }),
            _ => Err(WireError::Malformed),
        }
    }

    pub fn buffer_len(&self) -> usize {
        match self {
            Repr::EchoRequest { data, .. } | Repr::EchoReply { data, .. } => {
                HEADER_LEN + data.len()
            }
        }
    }

    /// Writes the message and its checksum into `packet`, whose buffer is exactly
    /// [`buffer_len`](Repr::buffer_len) bytes long.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        let (m, ident, seq_no, data) = match *self {
            Repr::EchoRequest {
                ident,
                seq_no,
                data,
            } => (Message::EchoRequest, ident, seq_no, data),
            Repr::EchoReply {
                ident,
                seq_no,
                data,
            } => (Message::EchoReply, ident, seq_no, data),
        };
        packet.set_msg_type(m);
        packet.set_msg_code(0);
        packet.set_echo_ident(ident);
        packet.set_echo_seq_no(seq_no);
        let out = packet.data_mut();
        let n = data.len().min(out.len());
        out[..n].copy_from_slice(&data[..n]);
        packet.fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Echo request, ident 0x1234, seq 1, data "abcd".
    const REQUEST: [u8; 12] = [
        0x08, 0x00, 0x21, 0x04, 0x12, 0x34, 0x00, 0x01, b'a', b'b', b'c', b'd',
    ];

    const REPR: Repr<'static> = Repr::EchoRequest {
        ident: 0x1234,
        seq_no: 1,
        data: b"abcd",
    };

    #[test]
    fn deconstruct() {
        let p = Packet::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(p.msg_type(), Message::EchoRequest);
        assert_eq!(p.msg_code(), 0);
        assert_eq!(p.checksum(), 0x2104);
        assert_eq!(p.echo_ident(), 0x1234);
        assert_eq!(p.echo_seq_no(), 1);
        assert_eq!(p.data(), b"abcd");
        assert!(p.verify_checksum());
    }

    #[test]
    fn construct() {
        let mut buf = [0u8; 12];
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        p.set_msg_type(Message::EchoRequest);
        p.set_msg_code(0);
        p.set_echo_ident(0x1234);
        p.set_echo_seq_no(1);
        p.data_mut().copy_from_slice(b"abcd");
        p.fill_checksum();
        assert_eq!(buf, REQUEST);
    }

    #[test]
    fn parse() {
        let p = Packet::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(Repr::parse(&p).unwrap(), REPR);
    }

    #[test]
    fn emit() {
        let mut buf = vec![0u8; REPR.buffer_len()];
        REPR.emit(&mut Packet::new_checked(&mut buf[..]).unwrap());
        assert_eq!(buf, REQUEST);
    }

    #[test]
    fn bad_messages_are_errors() {
        for n in 0..HEADER_LEN {
            assert!(Packet::new_checked(&REQUEST[..n]).is_err());
        }
        let mut b = REQUEST;
        b[11] ^= 0x40;
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&p), Err(WireError::Checksum));
        // Type 13 (timestamp) with a valid checksum: a value in the view, refused by Repr.
        let mut b = REQUEST;
        b[0] = 13;
        Packet::new_checked(&mut b[..]).unwrap().fill_checksum();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.msg_type(), Message::Unknown(13));
        assert_eq!(Repr::parse(&p), Err(WireError::Malformed));
    }
}
