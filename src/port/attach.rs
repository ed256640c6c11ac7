//! Attach port (adapter): a packet socket on an existing interface that vfabric did
//! not create — a libvirt/QEMU TAP, or one end of a veth pair — as `ip link set …
//! master br0` enslaves it to a kernel bridge.
//!
//! The socket carries a virtio-net header (PACKET_VNET_HDR), so GSO frames and partial
//! checksums cross whole, as on the switch's own TAPs: the kernel's 10-byte header is
//! read and written in place of the first 10 bytes of the switch's 12-byte one (the
//! last field, `num_buffers`, means nothing here and reads as zero). The interface's
//! own transmissions, the switch's writes included, are never read back
//! (PACKET_IGNORE_OUTGOING). A frame the kernel will not take because the link is down
//! is refused as `link_down`. All system calls live in `crate::sys::packet`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use super::{LinkState, Port, PortError};
use crate::switch::DropReason;
use crate::sys::packet as sys;
use crate::sys::poll::{poll_one, Readiness};
use crate::wire::vnet::VNET_HDR_LEN;

/// The kernel's virtio-net header on a packet socket (no `num_buffers`).
const KERNEL_HDR_LEN: usize = 10;
/// Send buffer: room for a few dozen 64 KiB GSO frames in flight into the interface.
const SEND_BUFFER: usize = 4 << 20;

/// Errors of attaching to an interface.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("network namespace {0:?} not found")]
    NoNetns(String),
    #[error("cannot enter network namespace {netns:?}")]
    Netns {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("interface {ifname:?} not found")]
    NoInterface {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a packet socket on {ifname:?}")]
    Open {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the thread that enters the namespace")]
    Thread,
}

/// A packet socket on an existing interface, speaking the switch's 12-byte header.
#[derive(Debug)]
pub struct AttachPort {
    fd: OwnedFd,
    ifname: String,
}

impl AttachPort {
    /// Opens the port on `ifname` in network namespace `netns` (as named by `ip netns`;
    /// empty: the switch's own). Needs CAP_NET_RAW.
    pub fn open(netns: &str, ifname: &str) -> Result<AttachPort, AttachError> {
        if netns.is_empty() {
            return Self::open_here(ifname);
        }
        let path = Path::new("/run/netns").join(netns);
        if !path.exists() {
            return Err(AttachError::NoNetns(netns.to_string()));
        }
        let (ns, ifn) = (netns.to_string(), ifname.to_string());
        // A thread of its own enters the namespace; the socket stays in it afterwards.
        std::thread::spawn(move || {
            sys::enter_netns(&path).map_err(|source| AttachError::Netns { netns: ns, source })?;
            Self::open_here(&ifn)
        })
        .join()
        .map_err(|_| AttachError::Thread)?
    }

    fn open_here(ifname: &str) -> Result<AttachPort, AttachError> {
        let ifindex = sys::if_index(ifname).map_err(|source| AttachError::NoInterface {
            ifname: ifname.to_string(),
            source,
        })?;
        let open = || -> io::Result<OwnedFd> {
            let fd = sys::open_packet_socket(ifindex, None)?;
            sys::enable_vnet_hdr(&fd)?;
            // Best effort: within the system's cap is fine too.
            let _ = sys::set_send_buffer(&fd, SEND_BUFFER);
            Ok(fd)
        };
        let fd = open().map_err(|source| AttachError::Open {
            ifname: ifname.to_string(),
            source,
        })?;
        Ok(AttachPort {
            fd,
            ifname: ifname.to_string(),
        })
    }
}

/// The interface was deleted (or moved away) under the socket.
fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV))
}

impl Port for AttachPort {
    fn try_recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        if buf.len() < VNET_HDR_LEN {
            return Err(PortError::Io(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        let (hdr, body) = buf.split_at_mut(VNET_HDR_LEN);
        match sys::recv_vnet(&self.fd, &mut hdr[..KERNEL_HDR_LEN], body) {
            Ok(n) => {
                hdr[KERNEL_HDR_LEN..].fill(0);
                // Our layout is two bytes longer than the kernel's. A length that
                // reaches `buf.len()` tells the data path the frame was cut.
                let len = n.saturating_add(VNET_HDR_LEN - KERNEL_HDR_LEN);
                Ok(Some(len.min(buf.len())))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) if is_gone(&e) => Err(PortError::Gone),
            Err(e) => Err(PortError::Io(e)),
        }
    }

    fn wait(&self, timeout: Duration) -> Result<bool, PortError> {
        match poll_one(self.fd.as_fd(), timeout).map_err(PortError::Io)? {
            Readiness::Readable => Ok(true),
            Readiness::Idle => Ok(false),
            // A socket error (the link went down) is taken by the next read.
            Readiness::Broken => Ok(true),
        }
    }

    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        if frame.len() < VNET_HDR_LEN {
            return Err(PortError::Refused(DropReason::Runt));
        }
        let (hdr, body) = frame.split_at(VNET_HDR_LEN);
        loop {
            return match sys::send_vnet(&self.fd, &hdr[..KERNEL_HDR_LEN], body) {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                    Err(PortError::Refused(DropReason::LinkDown))
                }
                Err(e) if is_gone(&e) => Err(PortError::Gone),
                Err(e) => Err(PortError::Io(e)),
            };
        }
    }

    fn vnet_hdr_len(&self) -> usize {
        VNET_HDR_LEN
    }

    /// The kernel takes GSO frames and partial checksums from a packet socket with a
    /// virtio-net header, and segments or completes them if the interface cannot.
    fn offload(&self) -> bool {
        true
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn mtu(&self) -> Option<u32> {
        self.link_state().mtu
    }

    /// The socket lives in the interface's namespace, so it answers the ioctls itself.
    fn link_state(&self) -> LinkState {
        super::tap::look(&self.fd, &self.ifname)
    }

    fn kind(&self) -> &'static str {
        "attach"
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }
}
