//! Framing adapter (I/O layer): the migration codec over an async byte stream.
//!
//! [`Reader`] keeps one receive buffer, grown only as far as the messages the header
//! check let through need, and hands out messages borrowed from it; [`Writer`]
//! coalesces small messages and writes page batches straight from the caller's buffer.
//! Every message must arrive whole within the I/O timeout (a peer dripping a byte at a
//! time gains nothing) and every write finish within it, so a silent or slow peer ends
//! the migration instead of hanging it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{self, Limits, Message, ProtoError, HEADER_LEN, MAX_MESSAGE};

/// Any byte stream a migration can run over: a TCP stream, an encrypted stream
/// wrapped around one, or an in-memory pipe in tests.
pub trait MigrationStream: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> MigrationStream for T {}

/// The receiving half of a split [`MigrationStream`].
pub type BoxRead = Box<dyn AsyncRead + Unpin + Send + Sync>;
/// The sending half of a split [`MigrationStream`].
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send + Sync>;

/// Splits a stream into halves the two drivers can own separately.
pub fn split_stream(stream: impl MigrationStream) -> (BoxRead, BoxWrite) {
    let (rd, wr) = tokio::io::split(stream);
    (Box::new(rd), Box::new(wr))
}

/// Small messages are sent once this many bytes are queued (or on `flush`).
const FLUSH_AT: usize = 256 << 10;
/// First size of a receive buffer: enough for the small messages of the protocol.
const SMALL_BUF: usize = 4 << 10;
/// Read-ahead beyond a large message's need.
const READ_AHEAD: usize = 64 << 10;

/// Errors of the stream.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("no progress for {0:?}")]
    Timeout(Duration),
    #[error("peer closed the stream")]
    Closed,
    #[error("protocol error: {0}")]
    Proto(#[from] ProtoError),
}

/// Receiving half.
pub struct Reader<R> {
    io: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    timeout: Duration,
    limits: Limits,
    /// Largest message accepted now, header included.
    max_message: usize,
    received: u64,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// A reader with no buffer yet: it grows with the first messages.
    pub fn new(io: R, timeout: Duration) -> Reader<R> {
        Reader {
            io,
            buf: Vec::new(),
            start: 0,
            end: 0,
            timeout,
            limits: Limits::default(),
            max_message: usize::MAX,
            received: 0,
        }
    }

    /// Caps the next messages at `max` bytes (header included), whatever their kind
    /// allows: e.g. a target accepts nothing larger than a `Hello` before admission.
    pub fn set_max_message(&mut self, max: usize) {
        self.max_message = max;
    }

    /// Tightens the decoder's limits once the guest's size is known.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Changes the per-read timeout (e.g. for a wait the peer is known to take long).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The next message, whole within the timeout. The header is checked before its
    /// payload is awaited, so the buffer grows at most to the largest legal message.
    pub async fn recv(&mut self) -> Result<Message<'_>, ConnError> {
        let timeout = self.timeout;
        let total = tokio::time::timeout(timeout, self.next_total())
            .await
            .map_err(|_| ConnError::Timeout(timeout))??;
        let at = self.start;
        self.start += total;
        match proto::decode(&self.buf[at..at + total], &self.limits)? {
            Some((msg, _)) => Ok(msg),
            // peek said the message is complete; decode agrees by construction.
            None => Err(ConnError::Closed),
        }
    }

    /// Reads until a whole message is buffered; returns its length.
    async fn next_total(&mut self) -> Result<usize, ConnError> {
        loop {
            let need = match proto::peek(&self.buf[self.start..self.end], &self.limits)? {
                Some((kind, total)) if total > self.max_message => {
                    return Err(ConnError::Proto(ProtoError::TooLong {
                        kind,
                        len: total - HEADER_LEN,
                        max: self.max_message.saturating_sub(HEADER_LEN),
                    }))
                }
                Some((_, total)) if self.end - self.start >= total => return Ok(total),
                Some((_, total)) => total,
                None => HEADER_LEN,
            };
            self.fill(need).await?;
        }
    }

    /// Reads until `need` bytes are buffered from `start`. The buffer grows to what
    /// `need` asks (a message the header check let through) plus some read-ahead.
    async fn fill(&mut self, need: usize) -> Result<(), ConnError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.start + need > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if need > self.buf.len() {
                let want = if need <= SMALL_BUF {
                    SMALL_BUF
                } else {
                    (need + READ_AHEAD).min(MAX_MESSAGE + READ_AHEAD).max(need)
                };
                self.buf.resize(want, 0);
            }
        }
        while self.end - self.start < need {
            let n = self.io.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(ConnError::Closed);
            }
            self.end += n;
            self.received += n as u64;
        }
        Ok(())
    }
}

/// Sending half.
pub struct Writer<W> {
    io: W,
    buf: Vec<u8>,
    timeout: Duration,
    sent: u64,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(io: W, timeout: Duration) -> Writer<W> {
        Writer {
            io,
            buf: Vec::with_capacity(FLUSH_AT + 4096),
            timeout,
            sent: 0,
        }
    }

    /// Bytes handed to the stream so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Queues a message; writes when enough is queued.
    pub async fn send(&mut self, msg: &Message<'_>) -> Result<(), ConnError> {
        proto::encode(msg, &mut self.buf);
        if self.buf.len() >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends a message and everything queued before it, now.
    pub async fn send_flush(&mut self, msg: &Message<'_>) -> Result<(), ConnError> {
        proto::encode(msg, &mut self.buf);
        self.flush().await
    }

    /// Writes an encoded message (a page batch) after whatever is queued.
    pub async fn send_encoded(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.flush().await?;
        self.write(bytes).await
    }

    /// Writes every queued byte.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let r = self.write(&buf).await;
            self.buf = buf;
            self.buf.clear();
            r?;
        }
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        // An encrypting stream may keep records back until flushed; TCP flushes nothing.
        let io = &mut self.io;
        tokio::time::timeout(self.timeout, async move {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await
        .map_err(|_| ConnError::Timeout(self.timeout))??;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    /// Sends `msg` at once, giving up after `limit`: for last words to a peer that may
    /// be gone.
    pub async fn send_now(&mut self, msg: &Message<'_>, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            self.send(msg).await?;
            self.flush().await
        })
        .await;
    }

    /// Shuts the sending direction down (the peer reads end-of-stream).
    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(self.timeout, self.io.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::proto::{Kind, PagesEncoder};

    #[tokio::test]
    async fn messages_cross_a_pipe_in_small_pieces() {
        let (a, b) = tokio::io::duplex(7); // tiny pipe: every message arrives in pieces
        let t = Duration::from_secs(5);
        let mut w = Writer::new(a, t);
        let mut r = Reader::new(b, t);
        let sender = tokio::spawn(async move {
            w.send(&Message::Accept).await.unwrap();
            let mut batch = vec![0u8; MAX_MESSAGE];
            let mut e = PagesEncoder::new(&mut batch, 1).unwrap();
            for p in 0..300u64.min(proto::MAX_BATCH_PAGES as u64) {
                e.push_with(p, |b| b.fill(p as u8)).unwrap();
            }
            let n = e.finish();
            w.send_encoded(&batch[..n]).await.unwrap();
            w.send(&Message::PullEnd).await.unwrap();
            w.flush().await.unwrap();
            w.sent()
        });
        assert_eq!(r.recv().await.unwrap(), Message::Accept);
        match r.recv().await.unwrap() {
            Message::Pages(v) => {
                assert_eq!(v.count(), 256);
                for (p, d) in v.iter() {
                    match d {
                        Some(d) => assert!(d.iter().all(|&b| b == p as u8)),
                        None => assert_eq!(p, 0),
                    }
                }
            }
            m => panic!("{m:?}"),
        }
        assert_eq!(r.recv().await.unwrap().kind(), Kind::PullEnd);
        let sent = sender.await.unwrap();
        assert_eq!(sent, r.received());
        assert!(matches!(r.recv().await, Err(ConnError::Closed)));
    }

    #[tokio::test]
    async fn garbage_and_silence_are_errors() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut r = Reader::new(b, Duration::from_millis(50));
        a.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        assert!(matches!(
            r.recv().await,
            Err(ConnError::Proto(ProtoError::BadMagic(_)))
        ));
        let (_a, b) = tokio::io::duplex(1024);
        let mut r = Reader::new(b, Duration::from_millis(50));
        assert!(matches!(r.recv().await, Err(ConnError::Timeout(_))));
    }
}
