//! TLS 1.3 record protection (RFC 8446 §5): sealing and opening application-data
//! records with the traffic keys of an established connection. Pure: no I/O.
//!
//! The handshake stays rustls's. Once it is done, the keys are taken from the
//! connection and records are protected here instead, so a receiver can read many
//! records with one system call and open each in place in its own buffer, and a sender
//! can seal many into one write: no allocation and no copy per record. The bytes on
//! the wire are those of any TLS 1.3 stack, so captures read as TLS and the kernel's
//! TLS offload could take these keys as they are.
//!
//! Per record: `type(23) | 0x0303 | length(2) | AEAD(plaintext | inner type | padding)`.
//! The nonce is the traffic IV XOR the record's 64-bit sequence number; the additional
//! data is the five-byte header.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};

/// Length of a record header.
pub const HEADER_LEN: usize = 5;
/// Length of the AEAD tag of every suite used here.
pub const TAG_LEN: usize = 16;
/// Largest plaintext of one record (2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest ciphertext length a peer may announce (RFC 8446 §5.2: 2^14 + 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Largest whole record, header included.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;
/// Bytes a record adds to `n` bytes of plaintext (header, inner type, tag).
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

/// Outer type of every protected record, and inner type of application data.
pub const APPLICATION_DATA: u8 = 23;
/// Inner type of an alert.
pub const ALERT: u8 = 21;
/// Inner type of a post-handshake handshake message.
pub const HANDSHAKE: u8 = 22;
/// The alert description of an orderly close.
pub const CLOSE_NOTIFY: u8 = 0;

/// Records one key may protect. AES-GCM's limit in RFC 8446 §5.5 is 2^24.5 full
/// records; this is a little under it, and applies to every suite (~380 GB of data,
/// far beyond any migration).
pub const MAX_RECORDS_PER_KEY: u64 = 23_000_000;

/// The AEADs TLS 1.3 defines (and rustls negotiates here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// Errors of record protection. Any of them ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("bad traffic key length")]
    Key,
    #[error("record header is not TLS 1.3 application data (type {0}, version {1:#06x})")]
    Header(u8, u16),
    #[error("record length {0} out of bounds")]
    Length(usize),
    #[error("record failed authentication")]
    Auth,
    #[error("record holds no content type")]
    NoContentType,
    #[error("unexpected record content type {0}")]
    ContentType(u8),
    #[error("peer sent alert {0}")]
    Alert(u8),
    #[error("too many records under one key")]
    KeyExhausted,
    #[error("plaintext of {0} bytes does not fit one record")]
    TooLong(usize),
}

/// One direction of a connection: its key, IV and next sequence number.
pub struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or the IV.
        f.debug_struct("Direction").field("seq", &self.seq).finish()
    }
}

/// What opening one record gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Application data at `start..end` of the buffer given to [`Direction::open`].
    Data { start: usize, end: usize },
    /// The peer closed its direction in order.
    CloseNotify,
}

impl Direction {
    /// A direction from traffic secrets as the handshake left them: `seq` is the next
    /// record's sequence number.
    pub fn new(suite: Suite, key: &[u8], iv: &[u8], seq: u64) -> Result<Direction, RecordError> {
        let key = UnboundKey::new(suite.algorithm(), key).map_err(|_| RecordError::Key)?;
        let iv: [u8; NONCE_LEN] = iv.try_into().map_err(|_| RecordError::Key)?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// Sequence number of the next record.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.seq >= MAX_RECORDS_PER_KEY {
            return Err(RecordError::KeyExhausted);
        }
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Appends one record carrying `plaintext` (at most [`MAX_PLAINTEXT`] bytes) of
    /// inner type `content_type` to `out`.
    pub fn seal(
        &mut self,
        content_type: u8,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(RecordError::TooLong(plaintext.len()));
        }
        let nonce = self.next_nonce()?;
        let len = plaintext.len() + 1 + TAG_LEN;
        let header = [APPLICATION_DATA, 0x03, 0x03, (len >> 8) as u8, len as u8];
        let at = out.len();
        out.reserve(HEADER_LEN + len);
        out.extend_from_slice(&header);
        out.extend_from_slice(plaintext);
        out.push(content_type);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[at + HEADER_LEN..])
            .map_err(|_| RecordError::Auth)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Appends as many records as `plaintext` needs, each at most [`MAX_PLAINTEXT`].
    pub fn seal_all(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            self.seal(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Length of the whole record at the start of `buf`, once its header is there.
    /// The announced length is checked here, before anything waits for its bytes.
    pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
        let Some(h) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let version = u16::from_be_bytes([h[1], h[2]]);
        if h[0] != APPLICATION_DATA || version != 0x0303 {
            return Err(RecordError::Header(h[0], version));
        }
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if !(TAG_LEN + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(RecordError::Length(len));
        }
        Ok(Some(HEADER_LEN + len))
    }

    /// Opens the record at the start of `buf` in place. `Ok(None)` while it is not
    /// whole; otherwise what it held and its length on the wire.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<(Opened, usize)>, RecordError> {
        let Some(total) = Self::record_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            return Ok(None);
        }
        let nonce = self.next_nonce()?;
        let (header, body) = buf[..total].split_at_mut(HEADER_LEN);
        let header: [u8; HEADER_LEN] = (&*header).try_into().map_err(|_| RecordError::Auth)?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| RecordError::Auth)?;
        // The inner type is the last non-zero byte; zeros after it are padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::NoContentType);
        };
        let opened = match plain[end] {
            APPLICATION_DATA => Opened::Data {
                start: HEADER_LEN,
                end: HEADER_LEN + end,
            },
            ALERT => match plain[..end] {
                [_, CLOSE_NOTIFY] => Opened::CloseNotify,
                [_, d] => return Err(RecordError::Alert(d)),
                _ => return Err(RecordError::ContentType(ALERT)),
            },
            t => return Err(RecordError::ContentType(t)),
        };
        Ok(Some((opened, total)))
    }
}

/// The close_notify alert's plaintext (level warning, description 0).
pub const CLOSE_NOTIFY_ALERT: [u8; 2] = [1, CLOSE_NOTIFY];

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(suite: Suite) -> (Direction, Direction) {
        let key = vec![7u8; if suite == Suite::Aes128Gcm { 16 } else { 32 }];
        let iv = [9u8; NONCE_LEN];
        (
            Direction::new(suite, &key, &iv, 0).unwrap(),
            Direction::new(suite, &key, &iv, 0).unwrap(),
        )
    }

    #[test]
    fn records_round_trip_in_every_suite_and_split_at_2_14() {
        for suite in [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305] {
            let (mut tx, mut rx) = pair(suite);
            let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8 + 1).collect();
            let mut wire = Vec::new();
            tx.seal_all(&data, &mut wire).unwrap();
            assert_eq!(wire.len(), data.len() + 3 * OVERHEAD, "three records");
            let mut got = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                let (o, n) = rx.open(&mut wire[at..]).unwrap().unwrap();
                let Opened::Data { start, end } = o else {
                    panic!("{o:?}")
                };
                assert!(end - start <= MAX_PLAINTEXT);
                got.extend_from_slice(&wire[at + start..at + end]);
                at += n;
            }
            assert_eq!(got, data);
            assert_eq!((tx.seq(), rx.seq()), (3, 3));
        }
    }

    #[test]
    fn partial_records_wait_and_bad_ones_fail() {
        let (mut tx, mut rx) = pair(Suite::Aes128Gcm);
        let mut wire = Vec::new();
        tx.seal(APPLICATION_DATA, b"page", &mut wire).unwrap();
        for cut in 0..wire.len() {
            assert_eq!(rx.open(&mut wire.clone()[..cut]).unwrap(), None, "{cut}");
        }
        assert_eq!(rx.seq(), 0, "a partial record uses no sequence number");
        // A flipped bit anywhere fails authentication (the header is the AAD).
        for i in [3, HEADER_LEN, wire.len() - 1] {
            let (_, mut rx) = pair(Suite::Aes128Gcm);
            let mut bad = wire.clone();
            bad[i] ^= if i == 3 { 0 } else { 1 };
            if i == 3 {
                // A length change is caught by the AEAD too (shorter body).
                bad[4] -= 1;
                bad.pop();
            }
            assert_eq!(rx.open(&mut bad), Err(RecordError::Auth), "{i}");
        }
        // Replayed or reordered: the sequence number differs, so does the nonce.
        let mut again = wire.clone();
        rx.open(&mut wire).unwrap().unwrap();
        assert_eq!(rx.open(&mut again), Err(RecordError::Auth));
    }

    #[test]
    fn announced_lengths_are_checked_before_waiting_for_them() {
        let mut h = [APPLICATION_DATA, 3, 3, 0xff, 0xff];
        assert_eq!(Direction::record_len(&h), Err(RecordError::Length(0xffff)));
        h[3..].copy_from_slice(&[0, 5]);
        assert_eq!(Direction::record_len(&h), Err(RecordError::Length(5)));
        assert_eq!(
            Direction::record_len(&[22, 3, 3, 0, 40]),
            Err(RecordError::Header(22, 0x0303))
        );
        assert_eq!(
            Direction::record_len(&[23, 3, 1, 0, 40]),
            Err(RecordError::Header(23, 0x0301))
        );
        assert_eq!(Direction::record_len(&[23, 3, 3]), Ok(None));
        let max = (MAX_CIPHERTEXT as u16).to_be_bytes();
        assert_eq!(
            Direction::record_len(&[23, 3, 3, max[0], max[1]]),
            Ok(Some(MAX_RECORD))
        );
    }

    #[test]
    fn alerts_and_other_inner_types() {
        let (mut tx, mut rx) = pair(Suite::Aes128Gcm);
        let mut wire = Vec::new();
        tx.seal(ALERT, &CLOSE_NOTIFY_ALERT, &mut wire).unwrap();
        assert_eq!(
            rx.open(&mut wire).unwrap(),
            Some((Opened::CloseNotify, wire.len()))
        );
        for (ty, body, err) in [
            (ALERT, &[2u8, 40][..], RecordError::Alert(40)),
            (
                HANDSHAKE,
                &[24, 0, 0, 1, 0][..],
                RecordError::ContentType(HANDSHAKE),
            ),
            (0, &[][..], RecordError::NoContentType),
        ] {
            let mut wire = Vec::new();
            tx.seal(ty, body, &mut wire).unwrap();
            assert_eq!(rx.open(&mut wire), Err(err));
        }
        // Zero padding after the inner type is allowed.
        let mut wire = Vec::new();
        tx.seal(0, &[b'x', APPLICATION_DATA, 0, 0, 0], &mut wire)
            .unwrap();
        let (o, _) = rx.open(&mut wire).unwrap().unwrap();
        assert_eq!(o, Opened::Data { start: 5, end: 6 });
    }

    #[test]
    fn a_key_is_retired_before_its_limit() {
        let (mut tx, _) = pair(Suite::Aes128Gcm);
        tx.seq = MAX_RECORDS_PER_KEY;
        assert_eq!(
            tx.seal(APPLICATION_DATA, b"x", &mut Vec::new()),
            Err(RecordError::KeyExhausted)
        );
        assert_eq!(
            tx.seal(APPLICATION_DATA, &[0; MAX_PLAINTEXT + 1], &mut Vec::new()),
            Err(RecordError::TooLong(MAX_PLAINTEXT + 1))
        );
    }
}
