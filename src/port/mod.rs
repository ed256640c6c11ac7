//! Port adapters: where frames enter and leave the switch (TAP devices, in-memory pairs).
//!
//! The [`Port`] trait stands between the switch daemon and I/O, so the daemon's data path
//! runs in tests over [`mem::MemPort`] without root or namespaces, and in production
//! over [`tap::Tap`].

pub mod attach;
pub mod bpf;
pub mod mem;
pub mod packet;
pub mod qemu;
pub mod tap;
pub mod uplink;
pub mod vxlan;

use std::net::SocketAddrV4;
use std::time::Duration;

use crate::switch::DropReason;

/// Errors of a port.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The device is gone (its namespace was deleted, its peer closed): the port is down
    /// for good.
    #[error("port is gone")]
    Gone,
    /// One operation failed; the port may still work.
    #[error("port I/O failed")]
    Io(#[source] std::io::Error),
    /// The port refused this one frame for a reason the switch counts (e.g. a frame
    /// that would not fit the underlay of a tunnel: `oversize`).
    #[error("frame refused: {0}")]
    Refused(DropReason),
}

/// What [`Port::try_recv_from`] took off a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// A frame of `len` bytes is in the buffer; `from` is the remote endpoint it came
    /// from when the port is a tunnel.
    Frame {
        len: usize,
        from: Option<SocketAddrV4>,
    },
    /// Something arrived that was no frame of ours; it was dropped for this reason.
    Dropped(DropReason),
}

/// What the kernel says of a port's interface, looked at about once a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkState {
    /// The MTU (None: unknown, or no limit).
    pub mtu: Option<u32>,
    /// Operationally up (IFF_RUNNING: administratively up with carrier, RFC 2863
    /// operstate UP); None: unknown, taken as up.
    pub running: Option<bool>,
}

/// A place frames come from and go to. Shared by the port's reader thread and every
/// thread that forwards to it, hence `&self` and `Sync`.
///
/// When [`Port::vnet_hdr_len`] is non-zero every frame, in and out, starts with a
/// virtio-net header of that length, followed by the Ethernet frame.
pub trait Port: Send + Sync {
    /// Copies one waiting frame into `buf` without blocking. `Ok(None)`: none waiting.
    /// A returned length equal to `buf.len()` may mean the frame was cut. Any thread may
    /// call it; each call takes one whole frame.
    fn try_recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError>;

    /// Blocks up to `timeout` until a frame may be waiting. `Ok(false)`: timed out.
    fn wait(&self, timeout: Duration) -> Result<bool, PortError>;

    /// Waits up to `timeout` for one frame and copies it into `buf`.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> Result<Option<usize>, PortError> {
        if let Some(n) = self.try_recv(buf)? {
            return Ok(Some(n));
        }
        if self.wait(timeout)? {
            self.try_recv(buf)
        } else {
            Ok(None)
        }
    }

    /// [`Port::try_recv`] that also says where the frame came from, or why what came
    /// was dropped (a tunnel port checks each datagram before it is a frame).
    fn try_recv_from(&self, buf: &mut [u8]) -> Result<Option<Recv>, PortError> {
        Ok(self
            .try_recv(buf)?
            .map(|len| Recv::Frame { len, from: None }))
    }

    /// Sends one frame (with its virtio-net header when the port uses one). A tunnel
    /// port sends it to every remote endpoint.
    fn send(&self, frame: &[u8]) -> Result<(), PortError>;

    /// Sends one frame to one remote endpoint of a tunnel port (`None`: as
    /// [`Port::send`]). Other ports have no endpoints and send as usual.
    fn send_to(&self, frame: &[u8], to: Option<SocketAddrV4>) -> Result<(), PortError> {
        let _ = to;
        self.send(frame)
    }

    /// True if the port takes GSO frames although it has no offloads: it segments them
    /// itself (a tunnel port). Their checksums are then its business too.
    fn segments_gso(&self) -> bool {
        false
    }

    /// Length of the virtio-net header in front of every frame (0: none).
    fn vnet_hdr_len(&self) -> usize;

    /// True if the far side takes GSO frames and partial checksums.
    fn offload(&self) -> bool;

    /// The interface name users know the port by on its side (e.g. `eth0`).
    fn ifname(&self) -> &str;

    /// The MTU of the port's interface as the kernel has it now (None: unknown, or no
    /// limit). Asked about once a second, never per frame.
    fn mtu(&self) -> Option<u32> {
        None
    }

    /// The MTU and operational state of the port's interface, in one look (which may
    /// cost a thread in the interface's namespace: never per frame).
    fn link_state(&self) -> LinkState {
        LinkState {
            mtu: self.mtu(),
            running: None,
        }
    }

    /// What the port is, as `vfabric ports` shows it: `tap`, `attach`, `vxlan`, …
    fn kind(&self) -> &'static str {
        "other"
    }

    /// The tunnel a VXLAN port stands for (None: not a tunnel).
    fn tunnel(&self) -> Option<&vxlan::VxlanSpec> {
        None
    }

    /// The file descriptor to poll, when the port has one: lets one thread wait on
    /// every port at once. In-memory ports have none.
    fn poll_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}
