//! QEMU socket port adapters: a QEMU guest's NIC plugged straight into the switch over
//! a Unix socket, with QEMU's own `-netdev stream` or `-netdev dgram` backend (QEMU
//! 7.2+), no TAP and no kernel bridge in between.
//!
//! - [`StreamPort`] (`qemu-stream:PATH`) listens on a Unix stream socket; QEMU connects
//!   with `-netdev stream,server=off,addr.type=unix,addr.path=PATH` and frames travel
//!   length-prefixed ([`crate::wire::qemu`]). One peer at a time: a QEMU that quits, or
//!   is migrated away and exits, leaves the port listening for the next one (a
//!   migration's destination QEMU connects to its own host's port). The listener and
//!   the connection sit in one epoll set whose fd the data path polls like a TAP's.
//! - [`DgramPort`] (`qemu-dgram:local=PATH,remote=PATH`) binds a Unix datagram socket
//!   at `local` and sends to QEMU's socket at `remote`, one frame per datagram, as
//!   QEMU's `-netdev dgram,local.type=unix,local.path=REMOTE,remote.type=unix,
//!   remote.path=LOCAL` expects; datagrams from any other sender are dropped.
//!
//! QEMU's socket backends carry no virtio-net header: frames from QEMU get a zeroed one
//! (their checksums are complete), frames to QEMU lose theirs; the switch completes
//! partial checksums before handing a frame over, and GSO frames are cut into segments
//! here ([`crate::switch::gso`]). A frame for a port with no peer, or for a peer that
//! does not keep up, is dropped and counted, never queued: the only bytes kept are the
//! tail of a frame the stream socket took part of, which must follow before the next.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::{Port, PortError, Recv};
use crate::switch::gso::{self, GsoError};
use crate::switch::DropReason;
use crate::sys::epoll::{self, EpollSet};
use crate::sys::poll::{poll_one, Readiness};
use crate::wire::qemu::{len_prefix, StreamDecoder, LEN_PREFIX};
use crate::wire::vnet::VnetHdr;

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_PATH: usize = 107;

/// A socket path from a port spec that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad QEMU socket path {path:?}: {why}")]
pub struct SocketPathError {
    pub path: String,
    pub why: &'static str,
}

/// Resolves a socket path from a port spec: an absolute path as given, or a plain name
/// (the name rule: a-z, 0-9, '-') as `<run dir>/qemu/NAME.sock`. No `..`, no `,`
/// (the spec separator), and short enough for a Unix socket.
pub fn socket_path(s: &str) -> Result<PathBuf, SocketPathError> {
    let err = |why| SocketPathError {
        path: s.chars().take(120).collect(),
        why,
    };
    let path = if s.contains('/') {
        let p = Path::new(s);
        if !p.is_absolute() {
            return Err(err("give an absolute path or a plain name"));
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(err("'..' is not allowed"));
        }
        if s.ends_with('/') {
            return Err(err("it names a directory"));
        }
        p.to_path_buf()
    } else {
        crate::names::validate("socket", s).map_err(|_| err("a plain name is a-z, 0-9, '-'"))?;
        crate::control::runtime_dir()
            .join("qemu")
            .join(format!("{s}.sock"))
    };
    if s.contains(',') || s.contains('\0') {
        return Err(err("',' and NUL are not allowed"));
    }
    if path.as_os_str().len() > MAX_PATH {
        return Err(err("longer than a Unix socket path may be (107 bytes)"));
    }
    Ok(path)
}

/// Errors of opening a QEMU socket port.
#[derive(Debug, thiserror::Error)]
pub enum QemuPortError {
    #[error("{0} is in use by a live listener")]
    InUse(PathBuf),
    #[error("cannot bind {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up polling")]
    Poll(#[source] io::Error),
}

/// Makes `path`'s directory and clears a stale socket there: one nobody answers on. A
/// live one is refused.
fn prepare(path: &Path, live: impl Fn(&Path) -> bool) -> Result<(), QemuPortError> {
    crate::sys::clear_socket_path(path, live).map_err(|e| match e {
        crate::sys::SocketPathError::InUse => QemuPortError::InUse(path.to_path_buf()),
        crate::sys::SocketPathError::Io(source) => QemuPortError::Bind {
            path: path.to_path_buf(),
            source,
        },
    })
}

fn restrict(path: &Path) -> Result<(), QemuPortError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        QemuPortError::Bind {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// True for errors that mean the peer is gone.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ECONNREFUSED | libc::ENOENT | libc::ENOTCONN)
    )
}

/// Splits a frame from the switch into its virtio-net header and Ethernet frame.
fn split(frame: &[u8], hdr: usize) -> Result<(&[u8], &[u8]), PortError> {
    frame
        .split_at_checked(hdr)
        .ok_or(PortError::Refused(DropReason::Runt))
}

fn is_gso(vnet: &[u8]) -> bool {
    !vnet.is_empty() && VnetHdr::new_checked(vnet).is_ok_and(|h| h.is_gso())
}

fn gso_refusal(e: GsoError) -> PortError {
    match e {
        GsoError::Unsupported => PortError::Refused(DropReason::GsoUnsupported),
        GsoError::Malformed => PortError::Refused(DropReason::BadVnetHeader),
    }
}

/// Puts a frame of `len` bytes, already at `buf[hdr..]`, behind a zeroed virtio-net
/// header; refuses one that does not fit or has no Ethernet header.
fn received(buf: &mut [u8], hdr: usize, len: usize) -> Recv {
    if len < crate::wire::ethernet::HEADER_LEN {
        return Recv::Dropped(DropReason::Runt);
    }
    buf[..hdr].fill(0);
    Recv::Frame {
        len: hdr + len,
        from: None,
    }
}

/// What a stream port holds under its lock.
struct StreamState {
    conn: Option<UnixStream>,
    decoder: StreamDecoder,
    /// The tail of a frame the socket took only part of; goes out before anything else.
    unsent: Vec<u8>,
    /// Where GSO segments are built.
    scratch: Vec<u8>,
}

/// A Unix stream socket speaking QEMU's `-netdev stream` framing.
pub struct StreamPort {
    path: PathBuf,
    listener: UnixListener,
    epoll: EpollSet,
    vnet_hdr_len: usize,
    ifname: String,
    state: Mutex<StreamState>,
}

impl StreamPort {
    /// Listens at `path` (mode 0600). Frames in and out carry a virtio-net header of
    /// `vnet_hdr_len` bytes, like the switch's other ports; frames of QEMU are at most
    /// `max_frame` bytes.
    pub fn listen(
        path: &Path,
        vnet_hdr_len: usize,
        max_frame: usize,
    ) -> Result<StreamPort, QemuPortError> {
        prepare(path, |p| UnixStream::connect(p).is_ok())?;
        let bind_err = |source| QemuPortError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        restrict(path)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = EpollSet::new().map_err(QemuPortError::Poll)?;
        epoll
            .add(listener.as_fd(), epoll::IN)
            .map_err(QemuPortError::Poll)?;
        Ok(StreamPort {
            path: path.to_path_buf(),
            listener,
            epoll,
            vnet_hdr_len,
            ifname: format!("qemu-stream:{}", path.display()),
            state: Mutex::new(StreamState {
                conn: None,
                decoder: StreamDecoder::new(max_frame),
                unsent: Vec::with_capacity(LEN_PREFIX + max_frame),
                scratch: Vec::with_capacity(2048),
            }),
        })
    }

    /// Where the port listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True while a peer is connected.
    pub fn connected(&self) -> bool {
        self.lock().conn.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes every waiting connection: the first becomes the peer if there is none;
    /// one more while a peer is connected is closed at once (QEMU's own server takes
    /// one client at a time too).
    fn accept(&self, st: &mut StreamState) {
        loop {
            match self.listener.accept() {
                Ok((conn, _)) => {
                    if st.conn.is_some() {
                        tracing::warn!(path = %self.path.display(),
                            "second peer refused: the port has one already");
                        continue;
                    }
                    if conn.set_nonblocking(true).is_err()
                        || self.epoll.add(conn.as_fd(), epoll::IN).is_err()
                    {
                        continue;
                    }
                    tracing::info!(path = %self.path.display(),
                        t_us = crate::clock::unix_micros(), "qemu peer connected");
                    st.decoder.reset();
                    st.unsent.clear();
                    st.conn = Some(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn disconnect(&self, st: &mut StreamState, why: &str) {
        if let Some(conn) = st.conn.take() {
            let _ = self.epoll.delete(conn.as_fd());
            tracing::info!(path = %self.path.display(), why,
                t_us = crate::clock::unix_micros(), "qemu peer disconnected");
        }
        st.decoder.reset();
        st.unsent.clear();
    }

    /// Sends what is left of a partly written frame. Ok(true): nothing is left.
    fn flush(&self, st: &mut StreamState) -> bool {
        let Some(conn) = &st.conn else {
            return false;
        };
        while !st.unsent.is_empty() {
            match (&*conn).write(&st.unsent) {
                Ok(n) => {
                    st.unsent.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => {
                    self.disconnect(st, "write failed");
                    return false;
                }
            }
        }
        let _ = self.epoll.modify(conn.as_fd(), epoll::IN);
        true
    }
}

/// Writes one length-prefixed frame, or none of it: a socket that takes nothing drops
/// the frame (counted by the switch); one that takes part keeps the rest in `unsent`
/// and has the port polled for writability until it is out.
fn write_frame(
    epoll: &EpollSet,
    conn: &UnixStream,
    unsent: &mut Vec<u8>,
    parts: [&[u8]; 2],
) -> Result<(), PortError> {
    let total = parts[0].len() + parts[1].len();
    loop {
        match (&*conn).write_vectored(&[IoSlice::new(parts[0]), IoSlice::new(parts[1])]) {
            Ok(n) if n >= total => return Ok(()),
            Ok(n) => {
                let mut rest = parts.concat();
                rest.drain(..n);
                unsent.extend_from_slice(&rest);
                let _ = epoll.modify(conn.as_fd(), epoll::IN | epoll::OUT);
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PortError::Io(e)),
        }
    }
}

impl Port for StreamPort {
    fn try_recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        loop {
            match self.try_recv_from(buf)? {
                Some(Recv::Frame { len, .. }) => return Ok(Some(len)),
                Some(Recv::Dropped(_)) => continue,
                None => return Ok(None),
            }
        }
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> Result<Option<Recv>, PortError> {
        let hdr = self.vnet_hdr_len;
        let mut guard = self.lock();
        let st = &mut *guard;
        self.accept(st);
        if !st.unsent.is_empty() {
            self.flush(st);
        }
        loop {
            match st.decoder.next_frame() {
                Ok(Some(frame)) => {
                    let len = frame.len();
                    let Some(dst) = buf.get_mut(hdr..hdr + len) else {
                        return Ok(Some(Recv::Dropped(DropReason::Oversize)));
                    };
                    dst.copy_from_slice(frame);
                    return Ok(Some(received(buf, hdr, len)));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e,
                        "qemu stream out of step: closing it");
                    self.disconnect(st, "oversize length");
                    return Ok(Some(Recv::Dropped(DropReason::Oversize)));
                }
            }
            let Some(conn) = &st.conn else {
                return Ok(None);
            };
            match (&*conn).read(st.decoder.spare()) {
                Ok(0) => {
                    self.disconnect(st, "peer closed");
                    return Ok(None);
                }
                Ok(n) => st.decoder.filled(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(_) => {
                    self.disconnect(st, "read failed");
                    return Ok(None);
                }
            }
        }
    }

    fn wait(&self, timeout: Duration) -> Result<bool, PortError> {
        let ready = poll_one(self.epoll.as_fd(), timeout).map_err(PortError::Io)?;
        Ok(ready == Readiness::Readable)
    }

    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        let (vnet, eth) = split(frame, self.vnet_hdr_len)?;
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.conn.is_none() {
            return Err(PortError::Refused(DropReason::NoPeer));
        }
        if !st.unsent.is_empty() && !self.flush(st) {
            return match st.conn {
                None => Err(PortError::Refused(DropReason::NoPeer)),
                Some(_) => Err(PortError::Io(io::ErrorKind::WouldBlock.into())),
            };
        }
        let StreamState {
            conn,
            unsent,
            scratch,
            ..
        } = &mut *st;
        let Some(c) = conn.as_ref() else {
            return Err(PortError::Refused(DropReason::NoPeer));
        };
        let result = if is_gso(vnet) {
            gso::segment(vnet, eth, scratch, LEN_PREFIX, |seg| {
                if !unsent.is_empty() {
                    return Err(PortError::Io(io::ErrorKind::WouldBlock.into()));
                }
                let Some(prefix) = len_prefix(seg.len() - LEN_PREFIX) else {
                    return Err(PortError::Refused(DropReason::Oversize));
                };
                seg[..LEN_PREFIX].copy_from_slice(&prefix);
                write_frame(&self.epoll, c, unsent, [&seg[..], &[]])
            })
            .map_err(gso_refusal)
            .and_then(|r| r.map(drop))
        } else {
            let Some(prefix) = len_prefix(eth.len()) else {
                return Err(PortError::Refused(DropReason::Oversize));
            };
            write_frame(&self.epoll, c, unsent, [&prefix[..], eth])
        };
        match result {
            Err(PortError::Io(e)) if peer_gone(&e) => {
                self.disconnect(st, "write failed");
                Err(PortError::Refused(DropReason::NoPeer))
            }
            r => r,
        }
    }

    fn vnet_hdr_len(&self) -> usize {
        self.vnet_hdr_len
    }

    /// No: QEMU's socket backends carry no virtio-net header, so frames must be whole
    /// and their checksums complete.
    fn offload(&self) -> bool {
        false
    }

    fn segments_gso(&self) -> bool {
        true
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn kind(&self) -> &'static str {
        "qemu-stream"
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.epoll.as_fd())
    }
}

impl Drop for StreamPort {
    fn drop(&mut self) {
        // The path is ours: we bound it (a live listener there was refused).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `qemu-dgram:local=PATH,remote=PATH`: where the port's socket is bound and where
/// QEMU's is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DgramSpec {
    pub local: PathBuf,
    pub remote: PathBuf,
}

/// A datagram port spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DgramSpecError {
    #[error(
        "bad qemu-dgram port spec {spec:?}: {why} (expected qemu-dgram:local=PATH,remote=PATH)"
    )]
    Syntax { spec: String, why: String },
    #[error(transparent)]
    Path(#[from] SocketPathError),
}

impl std::str::FromStr for DgramSpec {
    type Err = DgramSpecError;

    /// Parses what follows `qemu-dgram:`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| DgramSpecError::Syntax {
            spec: s.chars().take(120).collect(),
            why,
        };
        let (mut local, mut remote) = (None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("local", v)) if local.is_none() => local = Some(socket_path(v)?),
                Some(("remote", v)) if remote.is_none() => remote = Some(socket_path(v)?),
                Some(("local" | "remote", _)) => return Err(err(format!("{kv:?} given twice"))),
                _ => return Err(err(format!("{kv:?} is not local=PATH or remote=PATH"))),
            }
        }
        let local = local.ok_or_else(|| err("no local=".into()))?;
        let remote = remote.ok_or_else(|| err("no remote=".into()))?;
        if local == remote {
            return Err(err("local and remote are the same socket".into()));
        }
        Ok(DgramSpec { local, remote })
    }
}

/// A Unix datagram socket speaking QEMU's `-netdev dgram`: one frame per datagram.
pub struct DgramPort {
    sock: UnixDatagram,
    spec: DgramSpec,
    vnet_hdr_len: usize,
    ifname: String,
    scratch: Mutex<Vec<u8>>,
}

impl DgramPort {
    /// Binds `spec.local` (mode 0600); frames go to `spec.remote`.
    pub fn bind(spec: &DgramSpec, vnet_hdr_len: usize) -> Result<DgramPort, QemuPortError> {
        let path = &spec.local;
        // A datagram socket cannot be asked whether someone holds it: a bound file is
        // taken over, as QEMU does with its own (it unlinks before it binds).
        prepare(path, |_| false)?;
        let bind_err = |source| QemuPortError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let sock = UnixDatagram::bind(path).map_err(bind_err)?;
        restrict(path)?;
        sock.set_nonblocking(true).map_err(bind_err)?;
        Ok(DgramPort {
            sock,
            ifname: format!("qemu-dgram:{}", spec.local.display()),
            spec: spec.clone(),
            vnet_hdr_len,
            scratch: Mutex::new(Vec::with_capacity(2048)),
        })
    }

    fn send_datagram(&self, d: &[u8]) -> Result<(), PortError> {
        loop {
            return match self.sock.send_to(d, &self.spec.remote) {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if peer_gone(&e) => Err(PortError::Refused(DropReason::NoPeer)),
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    Err(PortError::Refused(DropReason::Oversize))
                }
                Err(e) => Err(PortError::Io(e)),
            };
        }
    }
}

impl Port for DgramPort {
    fn try_recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        loop {
            match self.try_recv_from(buf)? {
                Some(Recv::Frame { len, .. }) => return Ok(Some(len)),
                Some(Recv::Dropped(_)) => continue,
                None => return Ok(None),
            }
        }
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> Result<Option<Recv>, PortError> {
        let hdr = self.vnet_hdr_len;
        let Some(room) = buf.get_mut(hdr..).filter(|r| !r.is_empty()) else {
            return Err(PortError::Io(io::ErrorKind::InvalidInput.into()));
        };
        let cap = room.len();
        let (n, from) = loop {
            match self.sock.recv_from(room) {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(PortError::Io(e)),
            }
        };
        if from.as_pathname() != Some(self.spec.remote.as_path()) {
            return Ok(Some(Recv::Dropped(DropReason::UnknownPeer)));
        }
        if n >= cap {
            // It filled the buffer: it may have been cut.
            return Ok(Some(Recv::Dropped(DropReason::Oversize)));
        }
        Ok(Some(received(buf, hdr, n)))
    }

    fn wait(&self, timeout: Duration) -> Result<bool, PortError> {
        let ready = poll_one(self.sock.as_fd(), timeout).map_err(PortError::Io)?;
        Ok(ready == Readiness::Readable)
    }

    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        let (vnet, eth) = split(frame, self.vnet_hdr_len)?;
        if is_gso(vnet) {
            let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            return gso::segment(vnet, eth, &mut scratch, 0, |seg| self.send_datagram(seg))
                .map_err(gso_refusal)
                .and_then(|r| r.map(drop));
        }
        self.send_datagram(eth)
    }

    fn vnet_hdr_len(&self) -> usize {
        self.vnet_hdr_len
    }

    fn offload(&self) -> bool {
        false
    }

    fn segments_gso(&self) -> bool {
        true
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn kind(&self) -> &'static str {
        "qemu-dgram"
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.sock.as_fd())
    }
}

impl Drop for DgramPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.spec.local);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const HDR: usize = 12;
    const T: Duration = Duration::from_secs(2);

    fn frame(src: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, src]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        for (i, b) in f[14..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    fn prefixed(f: &[u8]) -> Vec<u8> {
        let mut v = (f.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(f);
        v
    }

    /// Waits for the next thing the port takes in.
    fn next(p: &dyn Port) -> Option<Recv> {
        let mut buf = vec![0u8; HDR + 65_600];
        let deadline = std::time::Instant::now() + T;
        while std::time::Instant::now() < deadline {
            if let Some(r) = p.try_recv_from(&mut buf).unwrap() {
                if let Recv::Frame { len, .. } = r {
                    assert_eq!(&buf[..HDR], &[0u8; HDR], "a zeroed virtio-net header");
                    LAST.with(|l| *l.borrow_mut() = buf[HDR..len].to_vec());
                }
                return Some(r);
            }
            p.wait(Duration::from_millis(50)).unwrap();
        }
        None
    }

    thread_local! {
        static LAST: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn last() -> Vec<u8> {
        LAST.with(|l| l.borrow().clone())
    }

    fn with_hdr(f: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; HDR];
        v.extend_from_slice(f);
        v
    }

    /// Waits until the port has (or has no) peer; the port only sees a connection or
    /// its end when the data path reads it.
    fn settle(p: &StreamPort, connected: bool) {
        let deadline = std::time::Instant::now() + T;
        let mut buf = vec![0u8; HDR + 2048];
        while p.connected() != connected && std::time::Instant::now() < deadline {
            let _ = p.try_recv_from(&mut buf);
            p.wait(Duration::from_millis(20)).unwrap();
        }
        assert_eq!(p.connected(), connected);
    }

    #[test]
    fn socket_paths_are_absolute_or_names_in_the_run_dir() {
        assert_eq!(
            socket_path("/run/x/vm1.sock").unwrap(),
            PathBuf::from("/run/x/vm1.sock")
        );
        let p = socket_path("vm1").unwrap();
        assert!(p.ends_with("qemu/vm1.sock"), "{}", p.display());
        for bad in [
            "rel/x.sock",
            "/run/../etc/x",
            "/run/x/",
            "/run/a,b",
            "Vm1",
            "",
            &format!("/{}", "a".repeat(120)),
        ] {
            assert!(socket_path(bad).is_err(), "{bad}");
        }
        let d: DgramSpec = "local=/tmp/a.sock,remote=/tmp/b.sock".parse().unwrap();
        assert_eq!(d.remote, PathBuf::from("/tmp/b.sock"));
        for bad in [
            "local=/tmp/a.sock",
            "remote=/tmp/a.sock",
            "local=/tmp/a.sock,remote=/tmp/a.sock",
            "local=/tmp/a.sock,local=/tmp/b.sock,remote=/tmp/c.sock",
            "/tmp/a.sock",
        ] {
            assert!(bad.parse::<DgramSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_stream_port_reassembles_frames_written_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let p = StreamPort::listen(&path, HDR, 65_554).unwrap();
        let mut qemu = UnixStream::connect(&path).unwrap();
        let a = frame(1, 60);
        let b = frame(1, 1514);
        let mut bytes = prefixed(&a);
        bytes.extend(prefixed(&b));
        // One byte, then the rest of the length and part of the frame, then the rest.
        for piece in [&bytes[..1], &bytes[1..30], &bytes[30..]] {
            qemu.write_all(piece).unwrap();
            qemu.flush().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(next(&p), Some(Recv::Frame { len, .. }) if len == HDR + 60));
        assert_eq!(last(), a);
        assert!(matches!(next(&p), Some(Recv::Frame { .. })));
        assert_eq!(last(), b);
        // A frame with no Ethernet header is counted, not forwarded.
        qemu.write_all(&prefixed(&[1, 2, 3])).unwrap();
        assert_eq!(next(&p), Some(Recv::Dropped(DropReason::Runt)));
        // The switch's frame reaches QEMU length-prefixed, without its virtio-net header.
        p.send(&with_hdr(&a)).unwrap();
        let mut got = vec![0u8; 4 + 60];
        qemu.set_read_timeout(Some(T)).unwrap();
        qemu.read_exact(&mut got).unwrap();
        assert_eq!(got, prefixed(&a));
    }

    #[test]
    fn a_peer_that_goes_leaves_the_port_waiting_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let p = StreamPort::listen(&path, HDR, 65_554).unwrap();
        let a = frame(1, 60);
        assert!(matches!(
            p.send(&with_hdr(&a)),
            Err(PortError::Refused(DropReason::NoPeer))
        ));
        let mut first = UnixStream::connect(&path).unwrap();
        settle(&p, true);
        // A second peer while the first is on is closed at once.
        let mut second = UnixStream::connect(&path).unwrap();
        second.set_read_timeout(Some(T)).unwrap();
        settle(&p, true);
        let mut one = [0u8; 1];
        assert_eq!(second.read(&mut one).unwrap_or(0), 0, "refused");
        // The first leaves mid-frame: the port forgets the half frame and listens.
        first.write_all(&prefixed(&a)[..20]).unwrap();
        drop(first);
        settle(&p, false);
        assert!(matches!(
            p.send(&with_hdr(&a)),
            Err(PortError::Refused(DropReason::NoPeer))
        ));
        // The next one (a migration's destination QEMU, a restarted one) is served
        // from its first byte.
        let mut third = UnixStream::connect(&path).unwrap();
        third.write_all(&prefixed(&a)).unwrap();
        assert!(matches!(next(&p), Some(Recv::Frame { .. })));
        assert_eq!(last(), a);
        p.send(&with_hdr(&a)).unwrap();
        let mut got = vec![0u8; 64];
        third.set_read_timeout(Some(T)).unwrap();
        third.read_exact(&mut got).unwrap();
        assert_eq!(got, prefixed(&a));
    }

    #[test]
    fn an_oversize_length_closes_the_connection_and_nothing_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let p = StreamPort::listen(&path, HDR, 1514).unwrap();
        let mut qemu = UnixStream::connect(&path).unwrap();
        qemu.write_all(&[0x7f, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
        assert_eq!(next(&p), Some(Recv::Dropped(DropReason::Oversize)));
        assert!(!p.connected());
        qemu.set_read_timeout(Some(T)).unwrap();
        let mut one = [0u8; 1];
        assert_eq!(qemu.read(&mut one).unwrap_or(0), 0, "closed");
        let mut again = UnixStream::connect(&path).unwrap();
        let a = frame(2, 100);
        again.write_all(&prefixed(&a)).unwrap();
        assert!(matches!(next(&p), Some(Recv::Frame { .. })));
        assert_eq!(last(), a);
    }

    #[test]
    fn a_peer_that_stops_reading_costs_drops_not_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let p = StreamPort::listen(&path, HDR, 65_554).unwrap();
        let mut qemu = UnixStream::connect(&path).unwrap();
        settle(&p, true);
        let f = with_hdr(&frame(3, 1514));
        let (mut sent, mut dropped) = (0usize, 0usize);
        for _ in 0..5000 {
            match p.send(&f) {
                Ok(()) => sent += 1,
                Err(PortError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => dropped += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(dropped > 0, "the socket filled up");
        assert!(
            p.lock().unsent.len() <= 4 + 65_554,
            "at most one frame's tail kept"
        );
        // Whatever was sent arrives whole and in step: every frame, then nothing.
        qemu.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut got = 0;
        let mut rec = vec![0u8; 4 + 1514];
        loop {
            if qemu.read_exact(&mut rec).is_err() {
                break;
            }
            assert_eq!(&rec[..4], &1514u32.to_be_bytes());
            got += 1;
            // Reading frees room: the kept tail goes out when the port is next served.
            let _ = p.try_recv_from(&mut vec![0u8; HDR + 2048]);
        }
        assert_eq!(got, sent);
    }

    #[test]
    fn a_dgram_port_takes_its_peer_s_datagrams_only() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DgramSpec {
            local: dir.path().join("sw.sock"),
            remote: dir.path().join("qemu.sock"),
        };
        let p = DgramPort::bind(&spec, HDR).unwrap();
        let a = frame(4, 60);
        // QEMU is not there yet: dropped and counted.
        assert!(matches!(
            p.send(&with_hdr(&a)),
            Err(PortError::Refused(DropReason::NoPeer))
        ));
        let qemu = UnixDatagram::bind(&spec.remote).unwrap();
        qemu.set_read_timeout(Some(T)).unwrap();
        p.send(&with_hdr(&a)).unwrap();
        let mut buf = [0u8; 2048];
        let n = qemu.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &a[..]);
        qemu.send_to(&a, &spec.local).unwrap();
        assert!(matches!(next(&p), Some(Recv::Frame { len, .. }) if len == HDR + 60));
        assert_eq!(last(), a);
        let stranger = UnixDatagram::bind(dir.path().join("other.sock")).unwrap();
        stranger.send_to(&a, &spec.local).unwrap();
        assert_eq!(next(&p), Some(Recv::Dropped(DropReason::UnknownPeer)));
        qemu.send_to(&[0u8; 5], &spec.local).unwrap();
        assert_eq!(next(&p), Some(Recv::Dropped(DropReason::Runt)));
        drop(qemu);
        // The socket dies when its last descriptor closes; a process that another test
        // is spawning at this instant holds a copy until its exec, so allow a moment.
        let deadline = std::time::Instant::now() + T;
        let gone = loop {
            match p.send(&with_hdr(&a)) {
                Err(PortError::Refused(DropReason::NoPeer)) => break true,
                Ok(()) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => break false,
            }
        };
        assert!(
            gone,
            "frames to a peer that has quit must be refused as NoPeer"
        );
    }
}
