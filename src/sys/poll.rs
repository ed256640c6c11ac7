//! poll(2): the one wrapper every port adapter and the data path wait through, so the
//! crate has a single `unsafe` call to it. EINTR counts as "nothing ready yet".

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// What poll saw on a file descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Readable,
    /// Timed out or interrupted by a signal: nothing to read yet.
    Idle,
    /// POLLERR / POLLHUP / POLLNVAL without POLLIN: the device went away.
    Broken,
}

impl Readiness {
    /// Readable wins over an error flag: what is queued is read first, and the read
    /// then reports the error.
    pub fn from_revents(revents: i16) -> Readiness {
        if revents & libc::POLLIN != 0 {
            Readiness::Readable
        } else if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            Readiness::Broken
        } else {
            Readiness::Idle
        }
    }
}

fn millis(timeout: Duration) -> libc::c_int {
    timeout.as_millis().min(i32::MAX as u128) as libc::c_int
}

/// The one call to poll(2). Clears every `revents` first, so an interrupted or timed-out
/// wait reads as nothing ready. Returns how many entries have events.
fn poll_raw(pfds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    for p in pfds.iter_mut() {
        p.revents = 0;
    }
    // SAFETY: `pfds` is a valid, exclusively borrowed array of `pfds.len()` pollfds that
    // lives across the call; poll(2) only writes their `revents`. A descriptor closed
    // meanwhile is reported as POLLNVAL, not undefined behaviour.
    let n = unsafe {
        libc::poll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            millis(timeout),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

fn pollfd(fd: Option<BorrowedFd<'_>>) -> libc::pollfd {
    libc::pollfd {
        // poll(2) skips negative descriptors.
        fd: fd.map_or(-1, |f| f.as_raw_fd()),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits up to `timeout` for `fd` to become readable.
pub fn poll_one(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<Readiness> {
    let mut p = [pollfd(Some(fd))];
    poll_raw(&mut p, timeout)?;
    Ok(Readiness::from_revents(p[0].revents))
}

/// Waits up to `timeout` until one of `fds` (None entries are ignored) has an event;
/// returns each one's `revents` (POLLIN, POLLERR, ...), all zero on a timeout or EINTR.
pub fn poll_fds<const N: usize>(
    fds: [Option<BorrowedFd<'_>>; N],
    timeout: Duration,
) -> io::Result<[i16; N]> {
    let mut pfds = fds.map(pollfd);
    poll_raw(&mut pfds, timeout)?;
    Ok(pfds.map(|p| p.revents))
}

/// A reusable set of descriptors to wait on together: the data path fills it each
/// round without allocating once it has grown to the number of ports.
#[derive(Default)]
pub struct PollSet {
    pfds: Vec<libc::pollfd>,
}

impl PollSet {
    pub fn new() -> PollSet {
        PollSet::default()
    }

    pub fn clear(&mut self) {
        self.pfds.clear();
    }

    /// Adds `fd` (None: a slot that never has events) as entry number `len()`.
    pub fn push(&mut self, fd: Option<BorrowedFd<'_>>) {
        self.pfds.push(pollfd(fd));
    }

    pub fn len(&self) -> usize {
        self.pfds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pfds.is_empty()
    }

    /// Waits up to `timeout` for any entry to have an event; returns how many do.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<usize> {
        poll_raw(&mut self.pfds, timeout)
    }

    /// What the last [`PollSet::wait`] saw on entry `i` (Idle past the end).
    pub fn readiness(&self, i: usize) -> Readiness {
        self.pfds
            .get(i)
            .map_or(Readiness::Idle, |p| Readiness::from_revents(p.revents))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn readiness_follows_the_peer() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let short = Duration::from_millis(10);
        assert_eq!(poll_one(b.as_fd(), short).unwrap(), Readiness::Idle);
        a.write_all(b"x").unwrap();
        assert_eq!(poll_one(b.as_fd(), short).unwrap(), Readiness::Readable);
        let (c, d) = UnixStream::pair().unwrap();
        drop(c);
        let mut set = PollSet::new();
        set.push(Some(b.as_fd()));
        set.push(None);
        set.push(Some(d.as_fd()));
        assert_eq!(set.wait(short).unwrap(), 2);
        assert_eq!(set.readiness(0), Readiness::Readable);
        assert_eq!(set.readiness(1), Readiness::Idle);
        // A closed peer reads as end of stream: POLLIN with POLLHUP.
        assert_eq!(set.readiness(2), Readiness::Readable);
        assert_eq!(set.readiness(9), Readiness::Idle);
        let r = poll_fds([None, Some(b.as_fd())], short).unwrap();
        assert_eq!(r[0], 0);
        assert_ne!(r[1] & libc::POLLIN, 0);
    }

    #[test]
    fn error_flags_without_data_are_broken() {
        assert_eq!(Readiness::from_revents(libc::POLLHUP), Readiness::Broken);
        assert_eq!(Readiness::from_revents(libc::POLLNVAL), Readiness::Broken);
        assert_eq!(
            Readiness::from_revents(libc::POLLIN | libc::POLLERR),
            Readiness::Readable
        );
        assert_eq!(Readiness::from_revents(0), Readiness::Idle);
    }
}
