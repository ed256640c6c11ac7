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

/// Most datagrams one UDP_SEGMENT send may carry (the kernel's UDP_MAX_SEGMENTS).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes of UDP payload one UDP_SEGMENT send may carry: the whole must fit one
/// IPv4 packet's length field with the IP and UDP headers.
pub const MAX_SEGMENTED_BYTES: usize = 65535 - 20 - 8;

/// Sends `buf` to `to` as consecutive datagrams of `segment` bytes each (the last may be
/// shorter) in one system call: UDP generic segmentation offload (UDP_SEGMENT, Linux
/// 4.18). The kernel cuts the datagrams as late as it can (in the NIC, or on the way
/// out of a veth), so one call and one trip through the stack carry up to 64 datagrams.
/// Fails with EINVAL if a datagram would not fit the route's MTU (with DF set) or the
/// device cannot take it; the caller then sends them one by one.
pub fn send_segments(
    sock: &impl AsFd,
    buf: &[u8],
    segment: u16,
    to: std::net::SocketAddrV4,
) -> io::Result<usize> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // Room for one cmsg holding a u16, 8-byte aligned.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&addr as *const libc::sockaddr_in).cast_mut().cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
    // SAFETY: `msg` points at `control`, which is large enough for one cmsg of a u16
    // (checked by CMSG_SPACE above and the array's 32 bytes); CMSG_FIRSTHDR returns a
    // pointer inside it, and the u16 is written unaligned-safe. `addr`, `iov`, `buf`
    // and `control` outlive the sendmsg call, which only reads them.
    let r = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        libc::sendmsg(sock.as_fd().as_raw_fd(), &msg, 0)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}
