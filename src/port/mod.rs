//! Port adapters: where frames enter and leave the switch (TAP devices, in-memory pairs).
//!
//! The [`Port`] trait stands between the switch daemon and I/O, so the daemon's data path
//! runs in tests over [`mem::MemPort`] without root or namespaces, and in production
//! over [`tap::Tap`].

pub mod bpf;
pub mod mem;
pub mod packet;
pub mod tap;
pub mod uplink;

use std::time::Duration;

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

    /// Sends one frame (with its virtio-net header when the port uses one).
    fn send(&self, frame: &[u8]) -> Result<(), PortError>;

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

    /// The file descriptor to poll, when the port has one: lets one thread wait on
    /// every port at once. In-memory ports have none.
    fn poll_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}
