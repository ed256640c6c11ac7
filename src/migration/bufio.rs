//! A read buffer under TLS, switched on once the peer is authenticated.
//!
//! rustls reads the socket a few KiB at a time, so an encrypted stream costs several
//! system calls per page batch where a plaintext one costs one. [`LateBuffer`] passes
//! reads straight through until [`LateBuffer::enable`] is called (after the handshake:
//! nothing is buffered for a peer that has not proven who it is), then reads the socket
//! in large chunks and serves rustls from memory. Writes pass through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of the read buffer once enabled.
pub const BUFFER: usize = 256 << 10;

pub struct LateBuffer<T> {
    io: T,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<T> LateBuffer<T> {
    pub fn new(io: T) -> LateBuffer<T> {
        LateBuffer {
            io,
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// From now on, read the socket `BUFFER` bytes at a time.
    pub fn enable(&mut self) {
        if self.buf.is_empty() {
            self.buf = vec![0; BUFFER];
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for LateBuffer<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, out);
        }
        if this.start == this.end {
            // A large read asks for no copy through the buffer.
            if out.remaining() >= this.buf.len() {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    this.start = 0;
                    this.end = rb.filled().len();
                }
                other => return other,
            }
        }
        let n = out.remaining().min(this.end - this.start);
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for LateBuffer<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, b)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, b)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_come_through_in_order_before_and_after_enable() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut r = LateBuffer::new(a);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let w = data.clone();
        let writer = tokio::spawn(async move {
            b.write_all(&w).await.unwrap();
            b.shutdown().await.unwrap();
        });
        let mut got = vec![0u8; 1000];
        r.read_exact(&mut got).await.unwrap();
        assert!(r.buf.is_empty(), "nothing buffered before enable");
        r.enable();
        let mut small = [0u8; 4096];
        let mut rest = Vec::new();
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&small[..n]);
        }
        got.extend_from_slice(&rest);
        writer.await.unwrap();
        assert_eq!(got, data);
    }
}
