//! QEMU socket netdev framing (pure codec, no I/O): how `-netdev stream` cuts its byte
//! stream into frames, and the limits both `stream` and `dgram` put on a frame.
//!
//! `-netdev stream` (QEMU 7.2+) writes each frame as its length in a 4-byte big-endian
//! integer followed by the frame itself (`htonl(size)` in net/stream_data.c) and reads
//! it back the same way (`net_fill_rstate` in net/net.c); there is no other header and
//! no virtio-net header. A length over QEMU's own buffer (`NET_BUFSIZE`, 4096 + 65536)
//! makes QEMU drop the connection, since the stream cannot be resynchronised; a length
//! of 0 is a frame of no bytes. `-netdev dgram` sends one frame per datagram, unframed.
//!
//! [`StreamDecoder`] reassembles frames from reads of any size into a buffer allocated
//! once, at its full size: a length from the peer is checked against the cap before it
//! is used, never to size an allocation. It also says how much to read next
//! ([`StreamDecoder::want`]) so that it never holds a whole frame the reader's poll
//! cannot see: at most the frame being returned plus the next length.

/// Bytes of the length prefix in front of every frame on a stream.
pub const LEN_PREFIX: usize = 4;

/// QEMU's per-frame buffer (`NET_BUFSIZE` in include/net/net.h): the largest frame a
/// QEMU peer sends or accepts.
pub const QEMU_MAX_FRAME: usize = 4096 + 65536;

/// A stream that cannot go on: the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The peer announced a frame longer than the decoder's cap.
    #[error("peer announced a {len}-byte frame (at most {max})")]
    Oversize { len: u32, max: usize },
}

/// The length prefix of a frame of `len` bytes (None: too long for the format).
pub fn len_prefix(len: usize) -> Option<[u8; LEN_PREFIX]> {
    u32::try_from(len).ok().map(u32::to_be_bytes)
}

/// Reassembles length-prefixed frames from a byte stream.
#[derive(Debug)]
pub struct StreamDecoder {
    /// `LEN_PREFIX + max + LEN_PREFIX` bytes, allocated once.
    buf: Box<[u8]>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    max: usize,
}

impl StreamDecoder {
    /// A decoder that accepts frames of at most `max` bytes.
    pub fn new(max: usize) -> StreamDecoder {
        StreamDecoder {
            buf: vec![0u8; 2 * LEN_PREFIX + max].into_boxed_slice(),
            start: 0,
            end: 0,
            max,
        }
    }

    /// The largest frame accepted.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// Forgets everything buffered (a new connection starts a new stream).
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The length the buffered prefix announces, once all four bytes are in.
    fn announced(&self) -> Option<u32> {
        let b = self.buf.get(self.start..self.start + LEN_PREFIX)?;
        (self.buffered() >= LEN_PREFIX).then(|| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// How many bytes the next read should take: the rest of the current frame and the
    /// next frame's length, no more, so that a complete frame never waits in here while
    /// the socket looks idle. 0: a frame is ready ([`StreamDecoder::next_frame`]) or
    /// the stream is broken. It always fits the buffer (after compaction).
    pub fn want(&self) -> usize {
        match self.announced() {
            None => LEN_PREFIX - self.buffered(),
            Some(len) if len as usize > self.max => 0,
            Some(len) => (2 * LEN_PREFIX + len as usize).saturating_sub(self.buffered()),
        }
    }

    /// Where the next read goes: [`StreamDecoder::want`] bytes; then call
    /// [`StreamDecoder::filled`] with what was read.
    pub fn spare(&mut self) -> &mut [u8] {
        let want = self.want();
        if self.end + want > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..self.end + want]
    }

    /// Records that `n` bytes were read into [`StreamDecoder::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next complete frame (possibly empty), if one is buffered. An announced length
    /// over the cap is an error and stays one until [`StreamDecoder::reset`].
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, StreamError> {
        let Some(len) = self.announced() else {
            return Ok(None);
        };
        if len as usize > self.max {
            return Err(StreamError::Oversize { len, max: self.max });
        }
        let total = LEN_PREFIX + len as usize;
        if self.buffered() < total {
            return Ok(None);
        }
        let frame = self.start + LEN_PREFIX..self.start + total;
        self.start += total;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // The bytes are still in place: the range below stays valid.
        }
        Ok(Some(&self.buf[frame]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames as QEMU's net_stream_data_receive writes them.
    fn stream(frames: &[&[u8]]) -> Vec<u8> {
        let mut s = vec![];
        for f in frames {
            s.extend_from_slice(&(f.len() as u32).to_be_bytes());
            s.extend_from_slice(f);
        }
        s
    }

    /// Feeds `bytes` in reads of at most `chunk` bytes, as the decoder asks; returns
    /// the frames in order.
    fn decode(d: &mut StreamDecoder, bytes: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let mut out = vec![];
        let mut at = 0;
        loop {
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f.to_vec());
            }
            if at == bytes.len() {
                return out;
            }
            let spare = d.spare();
            assert!(!spare.is_empty(), "the decoder wants nothing mid-stream");
            let n = spare.len().min(chunk).min(bytes.len() - at);
            spare[..n].copy_from_slice(&bytes[at..at + n]);
            d.filled(n);
            at += n;
        }
    }

    #[test]
    fn the_length_prefix_is_big_endian() {
        assert_eq!(len_prefix(60), Some([0, 0, 0, 60]));
        assert_eq!(len_prefix(0x0102_0304), Some([1, 2, 3, 4]));
        assert_eq!(stream(&[&[0xaa; 3]]), vec![0, 0, 0, 3, 0xaa, 0xaa, 0xaa]);
    }

    #[test]
    fn frames_come_out_whole_whatever_the_reads() {
        let a = vec![0x11u8; 60];
        let b: Vec<u8> = (0..1514u32).map(|i| i as u8).collect();
        let c = vec![0x33u8; 9000];
        let bytes = stream(&[&a, &b, &[], &c]);
        for chunk in [1, 2, 3, 5, 64, 1000, 70_000] {
            let mut d = StreamDecoder::new(9000);
            let got = decode(&mut d, &bytes, chunk);
            assert_eq!(
                got,
                vec![a.clone(), b.clone(), vec![], c.clone()],
                "{chunk}"
            );
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn it_never_reads_past_the_next_length() {
        // Two frames waiting on the socket: after one read the first is complete and
        // only the second's length is in; the second frame is still on the socket.
        let bytes = stream(&[&[1u8; 100], &[2u8; 100]]);
        let mut d = StreamDecoder::new(1500);
        assert_eq!(d.want(), 4);
        d.spare().copy_from_slice(&bytes[..4]);
        d.filled(4);
        assert_eq!(d.want(), 104, "the frame and the next length");
        d.spare().copy_from_slice(&bytes[4..108]);
        d.filled(104);
        assert_eq!(d.want(), 0, "a frame is ready: read nothing more");
        assert_eq!(d.next_frame().unwrap(), Some(&[1u8; 100][..]));
        assert_eq!(d.want(), 104);
        assert_eq!(d.spare().len(), 104);
    }

    #[test]
    fn an_oversize_length_is_refused_before_anything_is_read() {
        let mut d = StreamDecoder::new(1514);
        let cap = d.buf.len();
        // 4 GiB - 1 announced: no allocation, an error, and the decoder asks for no
        // more bytes until it is reset.
        d.spare().copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        d.filled(4);
        assert_eq!(
            d.next_frame(),
            Err(StreamError::Oversize {
                len: u32::MAX,
                max: 1514
            })
        );
        assert_eq!(d.want(), 0);
        assert_eq!(d.buf.len(), cap, "the buffer never grows");
        // One byte over the cap is refused too; exactly the cap is fine.
        d.reset();
        let over = stream(&[&vec![0u8; 1515]]);
        d.spare().copy_from_slice(&over[..4]);
        d.filled(4);
        assert!(d.next_frame().is_err());
        d.reset();
        let ok = vec![7u8; 1514];
        assert_eq!(decode(&mut d, &stream(&[&ok]), 500), vec![ok]);
    }

    #[test]
    fn a_partial_frame_then_a_reset_starts_clean() {
        // The peer went away mid-frame: what it left is forgotten, the next peer's
        // stream decodes from its first byte.
        let mut d = StreamDecoder::new(1500);
        let first = stream(&[&[9u8; 200]]);
        assert!(decode(&mut d, &first[..150], 7).is_empty());
        assert_eq!(d.buffered(), 150);
        d.reset();
        let f = vec![5u8; 64];
        assert_eq!(decode(&mut d, &stream(&[&f]), 13), vec![f]);
    }

    #[test]
    fn reading_what_it_wants_keeps_frames_in_a_buffer_allocated_once() {
        // Many frames of every size back to back through reads of odd sizes: the
        // buffer is compacted as it goes and never runs out of room.
        let frames: Vec<Vec<u8>> = (0..300usize)
            .map(|i| vec![i as u8; (i * 37) % 1515])
            .collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        let bytes = stream(&refs);
        let mut d = StreamDecoder::new(1514);
        assert_eq!(decode(&mut d, &bytes, 997), frames);
    }
}
