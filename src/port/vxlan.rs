//! VXLAN tunnel port adapter: the switch's frames in UDP datagrams to and from remote
//! VXLAN endpoints (RFC 7348), over a real UDP socket in the namespace the user names.
//!
//! The socket is opened inside that namespace by a short-lived thread (`setns`), then
//! used from the data path like any fd: non-blocking, in the same poll as the TAPs.
//! Received datagrams are checked by the sans-IO codec ([`crate::wire::vxlan`]) and
//! only accepted from a configured remote (by source IP: the kernel sends from a
//! per-flow source port); each refusal is a counted [`DropReason`]. The frame a
//! datagram carries lands in the caller's buffer behind a zeroed virtio-net header, so
//! the data path sees it like a TAP frame, with no copy when the header is at least 8
//! bytes (the VXLAN header is read into its place and then overwritten).
//!
//! A sender on this machine (the kernel's vxlan device over a veth) may leave the
//! inner TCP/UDP checksum partial, as it would for a NIC to finish; the port finishes
//! it ([`gso::finish_partial_checksum`]) so the frame is valid wherever it goes next.
//!
//! Sending: to one remote when the switch learned the destination behind it, otherwise
//! to every remote (head-end replication). GSO frames from TAPs are cut into segments
//! first ([`crate::switch::gso`]); every datagram leaves with DF set, so one that would
//! not fit the underlay fails with EMSGSIZE and is counted `oversize`, never cut.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Port, PortError, Recv};
use crate::switch::gso::{self, GsoError};
use crate::switch::DropReason;
use crate::wire::vnet::VnetHdr;
use crate::wire::vxlan::{self, DecapError, Vni, DEFAULT_PORT, HEADER_LEN};

/// Most remote endpoints of one port: each flooded frame is sent once per remote.
pub const MAX_REMOTES: usize = 64;

/// `vxlan:vni=VNI,local=[NETNS:]IP[:PORT],remote=IP[:PORT][,remote=…]`: a VXLAN port's
/// segment, where its socket lives, and its remote endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanSpec {
    pub vni: Vni,
    /// Namespace the underlay socket is opened in (None: the switch's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Address and UDP port the socket is bound to.
    pub local: SocketAddrV4,
    /// Where frames go; datagrams are accepted only from these addresses.
    pub remotes: Vec<SocketAddrV4>,
}

/// A VXLAN port spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad VXLAN port spec {spec:?}: {why} (expected \
     vxlan:vni=VNI,local=[NETNS:]IP[:PORT],remote=IP[:PORT][,remote=...])"
)]
pub struct VxlanSpecError {
    pub spec: String,
    pub why: String,
}

/// A kernel name that becomes a path (/run/netns/NAME): no separator, no `.`/`..`.
fn valid_netns(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn addr(s: &str, what: &str) -> Result<SocketAddrV4, String> {
    let (ip, port) = match s.split_once(':') {
        Some((ip, port)) => (
            ip,
            port.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("{what} port {port:?} is not 1 to 65535"))?,
        ),
        None => (s, DEFAULT_PORT),
    };
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("{what} address {ip:?} is not an IPv4 address"))?;
    Ok(SocketAddrV4::new(ip, port))
}

impl FromStr for VxlanSpec {
    type Err = VxlanSpecError;

    /// Parses what follows `vxlan:`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| VxlanSpecError {
            spec: s.chars().take(120).collect(),
            why,
        };
        let (mut vni, mut local, mut netns, mut remotes) = (None, None, None, vec![]);
        for kv in s.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| err(format!("{kv:?} is not KEY=VALUE")))?;
            match k {
                "vni" if vni.is_none() => vni = Some(v.parse::<Vni>().map_err(err)?),
                "local" if local.is_none() => {
                    // [NETNS:]IP[:PORT]: the namespace is whatever precedes an IP.
                    let mut parts = v.splitn(2, ':');
                    let first = parts.next().unwrap_or_default();
                    let rest = parts.next();
                    let (ns, a) = match rest {
                        Some(rest) if first.parse::<Ipv4Addr>().is_err() => (Some(first), rest),
                        _ => (None, v),
                    };
                    if let Some(ns) = ns.filter(|ns| !ns.is_empty()) {
                        if !valid_netns(ns) {
                            return Err(err(format!("namespace name {ns:?} has bad characters")));
                        }
                        netns = Some(ns.to_string());
                    }
                    local = Some(addr(a, "local").map_err(err)?);
                }
                "remote" => {
                    let r = addr(v, "remote").map_err(err)?;
                    let ip = r.ip();
                    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
                        return Err(err(format!("remote {ip} is not a unicast address")));
                    }
                    if remotes.iter().any(|q: &SocketAddrV4| q.ip() == ip) {
                        return Err(err(format!("remote {ip} given twice")));
                    }
                    remotes.push(r);
                }
                "vni" | "local" => return Err(err(format!("{k} given twice"))),
                other => return Err(err(format!("unknown key {other:?}"))),
            }
        }
        let vni = vni.ok_or_else(|| err("no vni=".into()))?;
        let local = local.ok_or_else(|| err("no local=".into()))?;
        if remotes.is_empty() {
            return Err(err("no remote=".into()));
        }
        if remotes.len() > MAX_REMOTES {
            return Err(err(format!("more than {MAX_REMOTES} remotes")));
        }
        Ok(VxlanSpec {
            vni,
            netns,
            local,
            remotes,
        })
    }
}

impl fmt::Display for VxlanSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vxlan:vni={},local=", self.vni)?;
        if let Some(ns) = &self.netns {
            write!(f, "{ns}:")?;
        }
        write!(f, "{}", self.local)?;
        for r in &self.remotes {
            write!(f, ",remote={r}")?;
        }
        Ok(())
    }
}

/// Errors of opening a VXLAN port.
#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("network namespace {0:?} not found (create it with: ip netns add {0})")]
    NoNetns(String),
    #[error("cannot enter network namespace {netns:?}")]
    Netns {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind UDP {addr}")]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
}

/// A VXLAN port: one UDP socket, one segment, its remotes.
#[derive(Debug)]
pub struct VxlanPort {
    sock: UdpSocket,
    spec: VxlanSpec,
    /// The header every datagram starts with.
    header: [u8; HEADER_LEN],
    vnet_hdr_len: usize,
    ifname: String,
    /// Where outgoing datagrams are built (header + frame, or one GSO segment).
    scratch: Mutex<Vec<u8>>,
    /// The datagrams of one GSO frame, end to end, for one UDP_SEGMENT send.
    batch: Mutex<Vec<u8>>,
    /// System calls that sent a batch of datagrams (UDP_SEGMENT), and the datagrams
    /// they carried.
    segmented_sends: AtomicU64,
    segmented_datagrams: AtomicU64,
}

fn bind(local: SocketAddrV4) -> Result<UdpSocket, VxlanError> {
    let e = |source| VxlanError::Bind {
        addr: local,
        source,
    };
    let sock = UdpSocket::bind(local).map_err(e)?;
    sock.set_nonblocking(true).map_err(e)?;
    crate::sys::udp::set_dont_fragment(&sock).map_err(e)?;
    Ok(sock)
}

impl VxlanPort {
    /// Opens the port's socket, in `spec.netns` if given. Frames in and out carry a
    /// virtio-net header of `vnet_hdr_len` bytes, like the switch's other ports.
    pub fn open(spec: &VxlanSpec, vnet_hdr_len: usize) -> Result<VxlanPort, VxlanError> {
        let sock = match &spec.netns {
            None => bind(spec.local)?,
            Some(ns) => {
                let path = Path::new("/run/netns").join(ns);
                if !path.exists() {
                    return Err(VxlanError::NoNetns(ns.clone()));
                }
                let local = spec.local;
                let netns_err = |source| VxlanError::Netns {
                    netns: ns.clone(),
                    source,
                };
                std::thread::spawn(move || {
                    crate::sys::packet::enter_netns(&path).map_err(Err)?;
                    bind(local).map_err(Ok)
                })
                .join()
                .map_err(|_| netns_err(io::Error::other("namespace thread panicked")))?
                .map_err(|e| match e {
                    Ok(bind_err) => bind_err,
                    Err(io) => netns_err(io),
                })?
            }
        };
        // With port 0 the kernel picked one: report the real one.
        let mut spec = spec.clone();
        if let Ok(SocketAddr::V4(a)) = sock.local_addr() {
            spec.local = a;
        }
        Ok(VxlanPort {
            sock,
            header: vxlan::Repr { vni: spec.vni }.to_bytes(),
            ifname: format!("vxlan:{}", spec.vni),
            spec,
            vnet_hdr_len,
            scratch: Mutex::new(Vec::with_capacity(2048)),
            batch: Mutex::new(Vec::with_capacity(crate::sys::udp::MAX_SEGMENTED_BYTES)),
            segmented_sends: AtomicU64::new(0),
            segmented_datagrams: AtomicU64::new(0),
        })
    }

    /// What the port was opened with (the local port as bound).
    pub fn spec(&self) -> &VxlanSpec {
        &self.spec
    }

    /// The configured endpoint whose address sent a datagram from `src`.
    fn remote_of(&self, src: SocketAddr) -> Option<SocketAddrV4> {
        let SocketAddr::V4(src) = src else {
            return None;
        };
        self.spec
            .remotes
            .iter()
            .find(|r| r.ip() == src.ip())
            .copied()
    }

    fn send_datagram(&self, datagram: &[u8], to: SocketAddrV4) -> Result<(), PortError> {
        match self.sock.send_to(datagram, to) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                Err(PortError::Refused(DropReason::Oversize))
            }
            Err(e) => Err(PortError::Io(e)),
        }
    }

    /// Sends the `count` datagrams of `segment` bytes each (the last may be shorter)
    /// that lie end to end in `batch` to every target: in one system call each with UDP
    /// segmentation offload, else one by one (a route or device that refuses the batch,
    /// e.g. a datagram over the underlay's MTU, which the one-by-one send then counts).
    fn send_batch(
        &self,
        batch: &[u8],
        segment: usize,
        count: usize,
        targets: &[SocketAddrV4],
    ) -> Result<(), PortError> {
        if count <= 1 {
            return self.send_all(batch, targets);
        }
        let mut result = Ok(());
        for &t in targets {
            let sent = u16::try_from(segment)
                .ok()
                .map(|seg| crate::sys::udp::send_segments(&self.sock, batch, seg, t));
            let r = match sent {
                Some(Ok(_)) => {
                    self.segmented_sends.fetch_add(1, Ordering::Relaxed);
                    self.segmented_datagrams
                        .fetch_add(count as u64, Ordering::Relaxed);
                    Ok(())
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Err(PortError::Io(e)),
                _ => batch
                    .chunks(segment)
                    .try_for_each(|d| self.send_datagram(d, t)),
            };
            if let Err(e) = r {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// How many system calls sent a batch of datagrams, and how many datagrams they
    /// carried (UDP segmentation offload at work).
    pub fn segmented(&self) -> (u64, u64) {
        (
            self.segmented_sends.load(Ordering::Relaxed),
            self.segmented_datagrams.load(Ordering::Relaxed),
        )
    }

    /// Sends `datagram` to every target; the first error, after trying them all.
    fn send_all(&self, datagram: &[u8], targets: &[SocketAddrV4]) -> Result<(), PortError> {
        let mut result = Ok(());
        for &t in targets {
            if let Err(e) = self.send_datagram(datagram, t) {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}

fn decap_reason(e: DecapError) -> DropReason {
    match e {
        DecapError::Truncated => DropReason::VxlanTruncated,
        DecapError::BadFlags => DropReason::VxlanBadFlags,
        DecapError::WrongVni(_) => DropReason::VxlanWrongVni,
        DecapError::Oversize => DropReason::Oversize,
    }
}

impl Port for VxlanPort {
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
        // The datagram goes where its VXLAN header ends at the virtio-net header's end.
        let off = hdr.saturating_sub(HEADER_LEN);
        if buf.len() <= hdr + HEADER_LEN {
            return Err(PortError::Io(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        let room = buf.len() - off;
        let (n, src) = match self.sock.recv_from(&mut buf[off..]) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
            Err(e) => return Err(PortError::Io(e)),
        };
        let Some(from) = self.remote_of(src) else {
            return Ok(Some(Recv::Dropped(DropReason::VxlanUnknownRemote)));
        };
        // A datagram that filled the buffer may have been cut.
        let max_inner = room - HEADER_LEN - 1;
        let inner = match vxlan::decapsulate(&buf[off..off + n], self.spec.vni, max_inner) {
            Ok(inner) => inner.len(),
            Err(e) => return Ok(Some(Recv::Dropped(decap_reason(e)))),
        };
        if off + HEADER_LEN != hdr {
            buf.copy_within(off + HEADER_LEN..off + n, hdr);
        }
        gso::finish_partial_checksum(&mut buf[hdr..hdr + inner]);
        // No offload flags: the frame's checksums are complete, as on any wire.
        buf[..hdr].fill(0);
        Ok(Some(Recv::Frame {
            len: hdr + inner,
            from: Some(from),
        }))
    }

    fn wait(&self, timeout: Duration) -> Result<bool, PortError> {
        let fd = std::os::fd::AsFd::as_fd(&self.sock);
        let ready = crate::sys::poll::poll_one(fd, timeout).map_err(PortError::Io)?;
        Ok(ready == crate::sys::poll::Readiness::Readable)
    }

    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        self.send_to(frame, None)
    }

    fn send_to(&self, frame: &[u8], to: Option<SocketAddrV4>) -> Result<(), PortError> {
        let targets = match &to {
            Some(r) => std::slice::from_ref(r),
            None => &self.spec.remotes[..],
        };
        let hdr = self.vnet_hdr_len;
        let Some((vnet, eth)) = frame.split_at_checked(hdr) else {
            return Err(PortError::Refused(DropReason::Runt));
        };
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if hdr > 0 && VnetHdr::new_checked(vnet).is_ok_and(|h| h.is_gso()) {
            // The segments of one GSO frame are all gso_size long but the last: they go
            // end to end into one batch, sent with one system call per target
            // (UDP_SEGMENT), up to the kernel's limits on one such send.
            let header = self.header;
            let mut batch = self.batch.lock().unwrap_or_else(|e| e.into_inner());
            batch.clear();
            let (mut size, mut count) = (0usize, 0usize);
            let sent = gso::segment(vnet, eth, &mut scratch, HEADER_LEN, |datagram| {
                datagram[..HEADER_LEN].copy_from_slice(&header);
                let full = count == crate::sys::udp::MAX_SEGMENTS
                    || batch.len() + datagram.len() > crate::sys::udp::MAX_SEGMENTED_BYTES
                    || (count > 0 && datagram.len() > size);
                if full {
                    self.send_batch(&batch, size, count, targets)?;
                    batch.clear();
                    count = 0;
                }
                if count == 0 {
                    size = datagram.len();
                }
                batch.extend_from_slice(datagram);
                count += 1;
                // A shorter datagram can only end a batch.
                if datagram.len() < size {
                    self.send_batch(&batch, size, count, targets)?;
                    batch.clear();
                    count = 0;
                }
                Ok(())
            });
            let sent = sent.map(|r| {
                r.and_then(|_| match count {
                    0 => Ok(()),
                    n => self.send_batch(&batch, size, n, targets),
                })
            });
            return match sent {
                Ok(r) => r,
                Err(GsoError::Unsupported) => Err(PortError::Refused(DropReason::GsoUnsupported)),
                Err(GsoError::Malformed) => Err(PortError::Refused(DropReason::BadVnetHeader)),
            };
        }
        scratch.clear();
        scratch.extend_from_slice(&self.header);
        scratch.extend_from_slice(eth);
        self.send_all(&scratch, targets)
    }

    fn vnet_hdr_len(&self) -> usize {
        self.vnet_hdr_len
    }

    /// No: the remote end gets finished frames (the switch completes partial
    /// checksums before handing a frame over; GSO frames are segmented here).
    fn offload(&self) -> bool {
        false
    }

    fn segments_gso(&self) -> bool {
        true
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn poll_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.sock))
    }

    fn kind(&self) -> &'static str {
        "vxlan"
    }

    fn tunnel(&self) -> Option<&VxlanSpec> {
        Some(&self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Result<VxlanSpec, String> {
        s.parse::<VxlanSpec>().map_err(|e| e.to_string())
    }

    #[test]
    fn specs_parse_with_defaults_and_round_trip() {
        let s =
            spec("vni=42,local=vf-wan:10.99.0.1,remote=10.99.0.2,remote=10.99.0.3:8472").unwrap();
        assert_eq!(s.vni.get(), 42);
        assert_eq!(s.netns.as_deref(), Some("vf-wan"));
        assert_eq!(s.local, "10.99.0.1:4789".parse().unwrap());
        assert_eq!(
            s.remotes,
            vec![
                "10.99.0.2:4789".parse().unwrap(),
                "10.99.0.3:8472".parse().unwrap()
            ]
        );
        assert_eq!(
            s.to_string(),
            "vxlan:vni=42,local=vf-wan:10.99.0.1:4789,remote=10.99.0.2:4789,remote=10.99.0.3:8472"
        );
        let again: VxlanSpec = s.to_string()["vxlan:".len()..].parse().unwrap();
        assert_eq!(again, s);
        // No namespace: an IP first; an empty namespace means the same.
        for l in ["10.0.0.1:5000", ":10.0.0.1:5000"] {
            let s = spec(&format!("vni=1,local={l},remote=10.0.0.2")).unwrap();
            assert_eq!(s.netns, None, "{l}");
            assert_eq!(s.local, "10.0.0.1:5000".parse().unwrap());
        }
        let s = spec("remote=10.0.0.2,local=ns:10.0.0.1:5000,vni=7").unwrap();
        assert_eq!((s.netns.as_deref(), s.local.port()), (Some("ns"), 5000));
    }

    #[test]
    fn bad_specs_say_why() {
        for (bad, why) in [
            ("", "is not KEY=VALUE"),
            ("vni=42", "no local="),
            ("vni=42,local=10.0.0.1", "no remote="),
            ("local=10.0.0.1,remote=10.0.0.2", "no vni="),
            ("vni=16777216,local=10.0.0.1,remote=10.0.0.2", "VNI"),
            (
                "vni=1,vni=2,local=10.0.0.1,remote=10.0.0.2",
                "vni given twice",
            ),
            (
                "vni=1,local=10.0.0.1,remote=10.0.0.2,remote=10.0.0.2:9",
                "given twice",
            ),
            ("vni=1,local=10.0.0.1,remote=224.0.0.1", "not a unicast"),
            ("vni=1,local=10.0.0.1,remote=0.0.0.0", "not a unicast"),
            ("vni=1,local=10.0.0.1,remote=10.0.0.2:0", "port"),
            ("vni=1,local=10.0.0.1,remote=10.0.0.2:70000", "port"),
            (
                "vni=1,local=../x:10.0.0.1,remote=10.0.0.2",
                "bad characters",
            ),
            ("vni=1,local=a/b:10.0.0.1,remote=10.0.0.2", "bad characters"),
            ("vni=1,local=ns:fe80::1,remote=10.0.0.2", "local"),
            ("vni=1,local=10.0.0.1,remote=host.example", "not an IPv4"),
            ("vni=1,local=10.0.0.1,remote=10.0.0.2,ttl=3", "unknown key"),
        ] {
            let e = spec(bad).unwrap_err();
            assert!(e.starts_with("bad VXLAN port spec"), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
        let many: Vec<String> = (1..=MAX_REMOTES + 1)
            .map(|i| format!("remote=10.1.{}.{}", i / 200, i % 200 + 1))
            .collect();
        let e = spec(&format!("vni=1,local=10.0.0.1,{}", many.join(","))).unwrap_err();
        assert!(e.contains("more than"), "{e}");
    }

    /// A port on loopback (no root needed) and a peer socket standing for a remote.
    fn loopback(vnet: usize) -> (VxlanPort, UdpSocket, UdpSocket) {
        let peer = UdpSocket::bind("127.0.0.2:0").unwrap();
        let stranger = UdpSocket::bind("127.0.0.3:0").unwrap();
        let SocketAddr::V4(peer_addr) = peer.local_addr().unwrap() else {
            unreachable!()
        };
        let spec = VxlanSpec {
            vni: Vni::new(42).unwrap(),
            netns: None,
            local: "127.0.0.1:0".parse().unwrap(),
            remotes: vec![peer_addr],
        };
        let port = VxlanPort::open(&spec, vnet).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (port, peer, stranger)
    }

    fn recv(port: &VxlanPort, buf: &mut [u8]) -> Recv {
        assert!(port.wait(Duration::from_secs(2)).unwrap(), "nothing came");
        port.try_recv_from(buf).unwrap().expect("a datagram")
    }

    #[test]
    fn datagrams_decapsulate_behind_a_zero_vnet_header_and_bad_ones_are_counted() {
        for vnet in [12usize, 0] {
            let (port, peer, stranger) = loopback(vnet);
            let to = port.spec().local;
            let mut good = vxlan::Repr {
                vni: Vni::new(42).unwrap(),
            }
            .to_bytes()
            .to_vec();
            good.extend((0..60u8).map(|i| i + 1));
            let mut buf = vec![0xeeu8; 4096];
            peer.send_to(&good, to).unwrap();
            let Recv::Frame { len, from } = recv(&port, &mut buf) else {
                panic!("dropped")
            };
            assert_eq!(len, vnet + 60);
            assert_eq!(from, Some(port.spec().remotes[0]));
            assert!(buf[..vnet].iter().all(|&b| b == 0));
            assert_eq!(&buf[vnet..len], &good[8..]);

            let mut wrong_vni = good.clone();
            wrong_vni[6] = 43;
            let mut bad_flags = good.clone();
            bad_flags[0] = 0x0c;
            for (d, reason) in [
                (&wrong_vni[..], DropReason::VxlanWrongVni),
                (&bad_flags[..], DropReason::VxlanBadFlags),
                (&good[..21], DropReason::VxlanTruncated),
                (&good[..3], DropReason::VxlanTruncated),
            ] {
                peer.send_to(d, to).unwrap();
                assert_eq!(recv(&port, &mut buf), Recv::Dropped(reason));
            }
            stranger.send_to(&good, to).unwrap();
            assert_eq!(
                recv(&port, &mut buf),
                Recv::Dropped(DropReason::VxlanUnknownRemote)
            );
            // A buffer too small for the datagram: counted, never cut.
            peer.send_to(&good, to).unwrap();
            assert_eq!(
                recv(&port, &mut buf[..vnet.max(8) + 40]),
                Recv::Dropped(DropReason::Oversize)
            );
        }
    }

    #[test]
    fn frames_leave_encapsulated_and_gso_frames_in_segments() {
        let (port, peer, _) = loopback(12);
        let mut frame = vec![0u8; 12];
        frame.extend((0..60u8).map(|i| i + 1));
        port.send(&frame).unwrap();
        let mut buf = [0u8; 70000];
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..8], &[0x08, 0, 0, 0, 0, 0, 42, 0]);
        assert_eq!(&buf[8..n], &frame[12..]);

        // A TCPv4 GSO frame of 3000 bytes of payload, mss 1000: three datagrams.
        let mut eth = vec![0u8; 54];
        eth[12..14].copy_from_slice(&[0x08, 0x00]);
        eth[14] = 0x45;
        eth[14 + 9] = 6;
        eth[34 + 12] = 5 << 4;
        eth[34 + 13] = 0x10;
        eth.extend(std::iter::repeat_n(7u8, 3000));
        let mut gso = vec![1u8, 1, 54, 0];
        gso.extend_from_slice(&1000u16.to_le_bytes());
        gso.extend_from_slice(&[34, 0, 16, 0, 0, 0]);
        gso.extend_from_slice(&eth);
        port.send_to(&gso, Some(port.spec().remotes[0])).unwrap();
        for _ in 0..3 {
            let (n, _) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(n, 8 + 54 + 1000);
            assert_eq!(buf[0], 0x08);
        }
        // One system call carried the three (UDP segmentation offload).
        assert_eq!(port.segmented(), (1, 3));

        // 100 segments and a short one: batches of at most 64 datagrams and 64 KiB,
        // each one call, the short one last; every datagram arrives whole and in order.
        let mut big = gso[..12 + 54].to_vec();
        let payload: Vec<u8> = (0..100 * 1000 + 300).map(|i| (i / 1000) as u8).collect();
        big.extend_from_slice(&payload);
        port.send_to(&big, Some(port.spec().remotes[0])).unwrap();
        for i in 0..101 {
            let (n, _) = peer.recv_from(&mut buf).unwrap();
            let want = if i == 100 { 300 } else { 1000 };
            assert_eq!(n, 8 + 54 + want, "datagram {i}");
            assert!(buf[8 + 54..n].iter().all(|&b| b == i as u8), "datagram {i}");
        }
        let (calls, datagrams) = port.segmented();
        assert_eq!(datagrams, 3 + 101);
        assert!(calls - 1 <= 3, "{calls} calls for 101 datagrams");
    }
}
