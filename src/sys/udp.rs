//! UDP socket options without a std wrapper: the system call behind `port::vxlan`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Sets IP_MTU_DISCOVER to IP_PMTUDISC_DO: datagrams leave with DF set and one larger
/// than the route's MTU fails with EMSGSIZE instead of being fragmented, so a frame
/// that does not fit the underlay is seen, and counted, by the sender.
pub fn set_dont_fragment(sock: &impl AsFd) -> io::Result<()> {
    let value: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: `value` is a live c_int and we pass its exact size; the fd is an open
    // socket borrowed for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
