//! An epoll set used only as one pollable fd standing for several: a port with a
//! listening socket and a connection (a QEMU stream port) hands the data path the epoll
//! fd, which polls readable whenever either is. Nothing here calls `epoll_wait`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Readable (or hung up: a read then sees the end).
pub const IN: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
/// Writable.
pub const OUT: u32 = libc::EPOLLOUT as u32;

/// An epoll instance (level-triggered).
#[derive(Debug)]
pub struct EpollSet {
    fd: OwnedFd,
}

impl EpollSet {
    pub fn new() -> io::Result<EpollSet> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we
        // own from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by no one else.
        Ok(EpollSet {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: libc::c_int, fd: BorrowedFd<'_>, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events,
            u64: fd.as_raw_fd() as u64,
        };
        // SAFETY: both fds are open for the duration of the call (borrowed), and `ev`
        // is a valid epoll_event that outlives it.
        let r = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for `events` ([`IN`], [`OUT`]).
    pub fn add(&self, fd: BorrowedFd<'_>, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events)
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: BorrowedFd<'_>, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events)
    }

    /// Stops watching `fd` (closing it does too).
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0)
    }
}

impl AsFd for EpollSet {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
