//! The virtio-net header that TAP ports put in front of every frame (sans-IO codec).
//!
//! With IFF_VNET_HDR the kernel hands the switch whole GSO frames (up to 64 KiB) with a
//! header saying how to segment them and where a checksum is still to be filled in; the
//! switch passes the header through unchanged so the receiving kernel finishes the job.
//! We use the 12-byte header (`virtio_net_hdr_mrg_rxbuf`, the only one virtio 1.0
//! knows, and the one QEMU and cloud-hypervisor configure on their TAPs); its last
//! field, `num_buffers`, means nothing to a TAP and is left as is.
//!
//! Fields are little-endian: the kernel uses native order for TAPs unless told
//! otherwise, and the machines we run on are little-endian.

use crate::wire::WireError;

/// Length of the header on our TAP ports.
pub const VNET_HDR_LEN: usize = 12;

mod field {
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: std::ops::Range<usize> = 2..4;
    pub const GSO_SIZE: std::ops::Range<usize> = 4..6;
    pub const CSUM_START: std::ops::Range<usize> = 6..8;
    pub const CSUM_OFFSET: std::ops::Range<usize> = 8..10;
}

/// `flags`: the checksum at `csum_start + csum_offset` still has to be computed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
/// Flag bit of `gso_type`: the TCP stream uses ECN.
pub const GSO_ECN: u8 = 0x80;

/// A checked view of a virtio-net header (at least 10 bytes).
#[derive(Debug, Clone)]
pub struct VnetHdr<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VnetHdr<T> {
    pub fn new_checked(buffer: T) -> Result<VnetHdr<T>, WireError> {
        if buffer.as_ref().len() < field::CSUM_OFFSET.end {
            return Err(WireError::Truncated);
        }
        Ok(VnetHdr { buffer })
    }

    fn u16_at(&self, r: std::ops::Range<usize>) -> u16 {
        let b = &self.buffer.as_ref()[r];
        u16::from_le_bytes([b[0], b[1]])
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    pub fn gso_type(&self) -> u8 {
        self.buffer.as_ref()[field::GSO_TYPE]
    }

    /// True when the frame is a GSO super-frame the receiver must segment.
    pub fn is_gso(&self) -> bool {
        self.gso_type() & !GSO_ECN != GSO_NONE
    }

    pub fn hdr_len(&self) -> u16 {
        self.u16_at(field::HDR_LEN)
    }

    pub fn gso_size(&self) -> u16 {
        self.u16_at(field::GSO_SIZE)
    }

    pub fn csum_start(&self) -> u16 {
        self.u16_at(field::CSUM_START)
    }

    pub fn csum_offset(&self) -> u16 {
        self.u16_at(field::CSUM_OFFSET)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VnetHdr<T> {
    pub fn set_flags(&mut self, v: u8) {
        self.buffer.as_mut()[field::FLAGS] = v;
    }
}

/// Fills in a checksum the sender left partial (`F_NEEDS_CSUM`) and clears the flag,
/// so the frame can go to a port that does not take offloads. `hdr` is the virtio-net
/// header, `frame` the Ethernet frame after it. A header pointing outside the frame is
/// an error and nothing is written.
pub fn complete_checksum(hdr: &mut [u8], frame: &mut [u8]) -> Result<(), WireError> {
    let mut h = VnetHdr::new_checked(hdr)?;
    if h.flags() & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(h.csum_start());
    let at = start + usize::from(h.csum_offset());
    if at + 2 > frame.len() || start > frame.len() {
        return Err(WireError::Malformed);
    }
    // The field already holds the pseudo-header sum; summing over it and inverting
    // gives the final checksum. A zero result is sent as 0xffff (required for UDP,
    // equivalent for TCP).
    let sum = !fold(ones_sum(&frame[start..]));
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    h.set_flags(h.flags() & !F_NEEDS_CSUM);
    Ok(())
}

fn ones_sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut sum: u64 = chunks
        .by_ref()
        .map(|c| u64::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deconstruct() {
        // A TCPv4 GSO frame: needs csum, hdr_len 66, gso_size 1448, csum at 34+16.
        let hdr = [1u8, 1, 66, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0];
        let h = VnetHdr::new_checked(&hdr[..]).unwrap();
        assert_eq!(h.flags(), F_NEEDS_CSUM);
        assert!(h.is_gso());
        assert_eq!(h.gso_type(), GSO_TCPV4);
        assert_eq!(h.hdr_len(), 66);
        assert_eq!(h.gso_size(), 1448);
        assert_eq!(h.csum_start(), 34);
        assert_eq!(h.csum_offset(), 16);
        assert!(VnetHdr::new_checked(&[GSO_NONE, GSO_ECN][..]).is_err());
        let plain = [0u8; 12];
        assert!(!VnetHdr::new_checked(&plain[..]).unwrap().is_gso());
    }

    #[test]
    fn completes_a_udp_checksum() {
        // Ethernet + IPv4 + UDP 10.0.0.1:1 -> 10.0.0.2:2, payload "hi".
        let mut frame = vec![0u8; 14];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = [
            0x45, 0, 0, 30, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        frame.extend_from_slice(&ip);
        let udp = [0, 1, 0, 2, 0, 10, 0, 0, b'h', b'i'];
        frame.extend_from_slice(&udp);
        // Pseudo-header sum: src + dst + proto + udp length, folded, not inverted.
        let pseudo = fold(0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 17 + 10);
        frame[40..42].copy_from_slice(&pseudo.to_be_bytes());
        let mut hdr = [F_NEEDS_CSUM, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0];
        complete_checksum(&mut hdr, &mut frame).unwrap();
        assert_eq!(hdr[0], 0);
        // Verifying: the sum over pseudo-header + UDP segment folds to 0xffff.
        let verify = fold(ones_sum(&frame[34..]) + 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 17 + 10);
        assert_eq!(verify, 0xffff);
    }

    #[test]
    fn checksum_offsets_outside_the_frame_are_refused() {
        let mut frame = vec![0u8; 40];
        let mut hdr = [F_NEEDS_CSUM, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0];
        assert_eq!(
            complete_checksum(&mut hdr, &mut frame),
            Err(WireError::Malformed)
        );
        assert_eq!(hdr[0], F_NEEDS_CSUM);
        let mut hdr = [F_NEEDS_CSUM, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0];
        assert!(complete_checksum(&mut hdr, &mut frame).is_err());
    }
}
