//! Adapter: a TLS 1.3 connection whose records are protected by
//! [`crate::wire::tls_record`] after rustls has done the handshake.
//!
//! [`Cork`] stands between rustls and the socket during the handshake and hands it one
//! record at a time, so rustls never reads past its last handshake record: whatever
//! the peer sends next is still in the socket when the keys are taken over.
//! [`RecordStream`] then reads up to [`READ_BUF`] bytes per system call, opens every
//! whole record in place and hands the plaintext out; it seals writes into records
//! queued in one buffer and sends them with one write.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::wire::tls_record::{
    self, Direction, Opened, RecordError, Suite, HEADER_LEN, MAX_PLAINTEXT, MAX_RECORD,
};

/// Bytes read from the socket at most per call (plus room for one partial record).
pub const READ_BUF: usize = 256 << 10;
/// Sealed bytes queued before a write must wait for the socket.
pub const WRITE_BUF: usize = 256 << 10;

/// Reads one TLS record at a time from `S`: the record header, then exactly its body.
#[derive(Debug)]
pub struct Cork<S> {
    io: S,
    header: [u8; HEADER_LEN],
    header_got: usize,
    body_left: usize,
}

impl<S> Cork<S> {
    pub fn new(io: S) -> Cork<S> {
        Cork {
            io,
            header: [0; HEADER_LEN],
            header_got: 0,
            body_left: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The socket, once the handshake is over. Whole records only were read from it.
    pub fn into_inner(self) -> S {
        self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cork<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let limit = if me.body_left > 0 {
            me.body_left
        } else {
            HEADER_LEN - me.header_got
        };
        let limit = limit.min(buf.remaining());
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(limit));
        ready!(Pin::new(&mut me.io).poll_read(cx, &mut part))?;
        let got = part.filled().len();
        if me.body_left > 0 {
            me.body_left -= got;
        } else {
            me.header[me.header_got..me.header_got + got].copy_from_slice(part.filled());
            me.header_got += got;
            if me.header_got == HEADER_LEN {
                me.header_got = 0;
                me.body_left = usize::from(u16::from_be_bytes([me.header[3], me.header[4]]));
            }
        }
        buf.advance(got);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cork<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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

fn direction((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Direction> {
    let (suite, key, iv) = match &secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Suite::Chacha20Poly1305, key, iv)
        }
        _ => return Err(io::Error::other("negotiated cipher suite not supported")),
    };
    Direction::new(suite, key.as_ref(), iv.as_ref(), seq).map_err(io::Error::other)
}

fn record_error(e: RecordError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A TLS 1.3 stream over `S` with the keys of a finished handshake.
#[derive(Debug)]
pub struct RecordStream<S> {
    io: S,
    tx: Direction,
    rx: Direction,
    /// Received bytes: `rbuf[open..filled]` not yet opened; `rbuf[plain.0..plain.1]`
    /// opened plaintext not yet handed out.
    rbuf: Vec<u8>,
    filled: usize,
    open: usize,
    plain: (usize, usize),
    peer_closed: bool,
    /// Sealed records, `wbuf[wpos..]` not yet written.
    wbuf: Vec<u8>,
    wpos: usize,
    closed: bool,
}

impl<S> RecordStream<S> {
    /// Takes over a connection whose handshake is done: its socket (read through a
    /// [`Cork`], so rustls holds no partial record) and rustls's state, whose keys it
    /// extracts and whose already opened plaintext it hands out first.
    pub fn take_over(io: S, conn: impl Into<rustls::Connection>) -> io::Result<RecordStream<S>> {
        use std::io::Read;
        let mut conn = conn.into();
        let mut opened = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match conn.reader().read(&mut chunk) {
                Ok(0) => break,
                Ok(n) if opened.len() + n <= MAX_PLAINTEXT => opened.extend_from_slice(&chunk[..n]),
                Ok(_) => {
                    return Err(io::Error::other(
                        "more than one record read during the handshake",
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let secrets = conn.dangerous_extract_secrets().map_err(io::Error::other)?;
        RecordStream::new(io, secrets, opened)
    }

    /// Takes over a connection whose handshake is done, with the secrets rustls
    /// extracted from it and the plaintext it had already opened (at most one record,
    /// as a [`Cork`] gave it records one at a time).
    pub fn new(io: S, secrets: ExtractedSecrets, opened: Vec<u8>) -> io::Result<RecordStream<S>> {
        let n = opened.len();
        Ok(RecordStream {
            io,
            tx: direction(secrets.tx)?,
            rx: direction(secrets.rx)?,
            rbuf: opened,
            filled: n,
            open: n,
            plain: (0, n),
            peer_closed: false,
            wbuf: Vec::new(),
            wpos: 0,
            closed: false,
        })
    }
}

impl<S: AsyncWrite + Unpin> RecordStream<S> {
    /// Writes queued records until none is left or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            let (start, end) = me.plain;
            if start < end {
                let n = (end - start).min(buf.remaining());
                buf.put_slice(&me.rbuf[start..start + n]);
                me.plain.0 += n;
                return Poll::Ready(Ok(()));
            }
            if me.peer_closed {
                return Poll::Ready(Ok(()));
            }
            // Open the next whole record, if one is buffered.
            let filled = me.filled;
            if let Some((opened, n)) = me
                .rx
                .open(&mut me.rbuf[me.open..filled])
                .map_err(record_error)?
            {
                match opened {
                    Opened::Data { start, end } => me.plain = (me.open + start, me.open + end),
                    Opened::CloseNotify => me.peer_closed = true,
                }
                me.open += n;
                continue;
            }
            // Keep the partial record at the front, then read as much as fits.
            if me.rbuf.len() < READ_BUF + MAX_RECORD {
                me.rbuf.resize(READ_BUF + MAX_RECORD, 0);
            }
            if me.open > 0 {
                me.rbuf.copy_within(me.open..filled, 0);
                me.filled -= me.open;
                me.open = 0;
                me.plain = (0, 0);
            }
            let at = me.filled;
            let mut rb = ReadBuf::new(&mut me.rbuf[at..]);
            ready!(Pin::new(&mut me.io).poll_read(cx, &mut rb))?;
            let got = rb.filled().len();
            if got == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection without a TLS close_notify",
                )));
            }
            me.filled += got;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if me.wbuf.len() - me.wpos >= WRITE_BUF {
            ready!(me.poll_drain(cx))?;
        }
        if me.wpos > 0 && me.wpos == me.wbuf.len() {
            me.wbuf.clear();
            me.wpos = 0;
        }
        let room = WRITE_BUF
            .saturating_sub(me.wbuf.len() - me.wpos)
            .max(MAX_PLAINTEXT);
        let take = buf.len().min(room);
        me.tx
            .seal_all(&buf[..take], &mut me.wbuf)
            .map_err(record_error)?;
        // Start sending now; what the socket does not take waits for the next call.
        if let Poll::Ready(Err(e)) = me.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.closed {
            me.closed = true;
            me.tx
                .seal(
                    tls_record::ALERT,
                    &tls_record::CLOSE_NOTIFY_ALERT,
                    &mut me.wbuf,
                )
                .map_err(record_error)?;
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::tls::{self, Encryption, Protection, Tls};
    use crate::wire::tls_record::APPLICATION_DATA;
    use std::io::{Read, Write};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn creds(dir: &std::path::Path) -> (Tls, Tls) {
        crate::pki::init(dir).unwrap();
        crate::pki::issue(dir, "src").unwrap();
        crate::pki::issue(dir, "dst").unwrap();
        let load = |n| Tls::new(&crate::pki::load(dir, n).unwrap()).unwrap();
        (load("src"), load("dst"))
    }

    /// Moves every pending TLS byte from `from` to `to`.
    fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    #[test]
    fn records_interoperate_with_rustls_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = creds(dir.path());
        let name = pki_types::ServerName::try_from("dst").unwrap();
        let mut client: rustls::Connection =
            rustls::ClientConnection::new(src.client_config(), name)
                .unwrap()
                .into();
        let mut server: rustls::Connection = rustls::ServerConnection::new(dst.server_config())
            .unwrap()
            .into();
        while client.is_handshaking() || server.is_handshaking() {
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
        // rustls seals, we open.
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
        client.writer().write_all(&data).unwrap();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let secrets = match server {
            rustls::Connection::Server(s) => s.dangerous_extract_secrets().unwrap(),
            _ => unreachable!(),
        };
        let mut rx = direction(secrets.rx).unwrap();
        let mut tx = direction(secrets.tx).unwrap();
        let (mut got, mut at) = (Vec::new(), 0);
        while at < wire.len() {
            let (o, n) = rx.open(&mut wire[at..]).unwrap().unwrap();
            let Opened::Data { start, end } = o else {
                panic!("{o:?}")
            };
            got.extend_from_slice(&wire[at + start..at + end]);
            at += n;
        }
        assert_eq!(got, data);
        // We seal, rustls opens.
        let mut wire = Vec::new();
        tx.seal_all(&data, &mut wire).unwrap();
        tx.seal(
            tls_record::ALERT,
            &tls_record::CLOSE_NOTIFY_ALERT,
            &mut wire,
        )
        .unwrap();
        let mut rd = &wire[..];
        let mut back = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            client.read_tls(&mut rd).unwrap();
            let state = client.process_new_packets().unwrap();
            loop {
                match client.reader().read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => back.extend_from_slice(&chunk[..n]),
                    Err(e) => {
                        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                        break;
                    }
                }
            }
            if state.peer_has_closed() {
                break;
            }
        }
        assert!(rd.is_empty());
        assert_eq!(back, data, "rustls read our records and our close_notify");
        assert_eq!(tx.seq(), 5, "four data records and the alert");
        let _ = APPLICATION_DATA;
    }

    #[tokio::test]
    async fn a_migration_stream_carries_every_byte_sent_right_after_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = creds(dir.path());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let expect = data.clone();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (mut s, p) = tls::accept(s, Encryption::Required, Some(&dst))
                .await
                .unwrap();
            assert_eq!(p, Protection::Tls { peer: "src".into() });
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            assert!(
                got == expect,
                "{} of {} bytes, or other bytes",
                got.len(),
                expect.len()
            );
            s.write_all(b"ok").await.unwrap();
            s.shutdown().await.unwrap();
        });
        let (mut s, p) = tls::connect(
            addr,
            "dst",
            Encryption::Required,
            Some(&src),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(p.is_encrypted());
        // The first bytes leave at once, in small and large writes: the target reads the
        // records that arrived with the end of its handshake, too.
        s.write_all(&data[..10]).await.unwrap();
        s.flush().await.unwrap();
        s.write_all(&data[10..]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"ok");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_close_without_close_notify_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = creds(dir.path());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (mut s, _) = tls::accept(s, Encryption::Required, Some(&dst))
                .await
                .unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.map(|_| got)
        });
        let (mut s, _) = tls::connect(
            addr,
            "dst",
            Encryption::Required,
            Some(&src),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        s.write_all(b"half").await.unwrap();
        s.flush().await.unwrap();
        drop(s); // TCP FIN, no alert: a truncation, not an end
        let e = server.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[tokio::test]
    async fn cork_hands_out_one_record_at_a_time() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut wire = vec![22, 3, 3, 0, 3, 1, 2, 3, 23, 3, 3, 0, 1, 9];
        wire.extend_from_slice(&[0xee; 100]); // what follows stays unread
        a.write_all(&wire).await.unwrap();
        let mut c = Cork::new(b);
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        for _ in 0..4 {
            let n = c.read(&mut buf).await.unwrap();
            got.push(buf[..n].to_vec());
        }
        assert_eq!(
            got,
            vec![
                vec![22, 3, 3, 0, 3],
                vec![1, 2, 3],
                vec![23, 3, 3, 0, 1],
                vec![9]
            ]
        );
        let mut rest = Vec::new();
        drop(a);
        c.into_inner().read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, vec![0xee; 100]);
    }
}
