//! A NETLINK_ROUTE socket subscribed to link notifications (RTMGRP_LINK): the kernel
//! tells it at once when an interface of the namespace is added, changed or removed.
//! The system calls behind `port::uplink`; the bytes are decoded by `wire::rtnetlink`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a link-notification socket in the calling thread's network namespace. Needs
/// no privilege.
pub fn open_link_monitor() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = cvt(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        )
    })?;
    // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = libc::RTMGRP_LINK as u32;
    // SAFETY: `sa` is a valid sockaddr_nl and we pass its exact size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// One datagram from a link monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    /// `len` bytes from the kernel are in the buffer.
    Kernel(usize),
    /// From another socket, not the kernel: ignore it.
    Foreign,
    /// Larger than the buffer: its messages are lost.
    Truncated,
}

/// Receives one datagram without blocking; `WouldBlock` when none is queued, ENOBUFS
/// when the kernel dropped notifications because the queue was full.
pub fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Datagram> {
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
    let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: `buf`, `from` and `from_len` are live and describe their own sizes; with
    // MSG_TRUNC the kernel still writes at most `buf.len()` bytes.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            (&mut from as *mut libc::sockaddr_nl).cast(),
            &mut from_len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if from.nl_pid != 0 {
        return Ok(Datagram::Foreign);
    }
    if n > buf.len() {
        return Ok(Datagram::Truncated);
    }
    Ok(Datagram::Kernel(n))
}
