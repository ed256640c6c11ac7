//! AF_PACKET raw sockets and network-namespace entry: the system calls behind
//! `port::packet`, each `unsafe` block with its `// SAFETY:` line.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use crate::port::bpf::Insn;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn if_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(idx)
}

fn set_int_opt(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and we pass its exact size; fd is an open socket.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Opens a raw packet socket receiving every protocol (ETH_P_ALL) on interface
/// `ifindex` only, with the interface in promiscuous mode for as long as the socket is
/// open (PACKET_MR_PROMISC) and the interface's outgoing frames not looped back to it
/// (PACKET_IGNORE_OUTGOING: neither ours nor the kernel's).
///
/// With `filter`, the classic BPF program is attached before the socket is bound, so no
/// frame it would refuse is ever queued.
pub fn open_packet_socket(ifindex: u32, filter: Option<&[Insn]>) -> io::Result<OwnedFd> {
    // Protocol 0 receives nothing until bind names the interface: no frames from other
    // interfaces slip in between socket() and bind().
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw =
        cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    set_int_opt(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)?;
    if let Some(prog) = filter {
        attach_filter(fd.as_fd(), prog)?;
    }
    // Ask for each frame's status, to learn which checksums were offloaded.
    set_int_opt(&fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, 1)?;

    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as libc::c_int;
    // SAFETY: `sll` is a valid sockaddr_ll and we pass its exact size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;

    // SAFETY: packet_mreq is plain old data; all-zero is a valid value.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = ifindex as libc::c_int;
    mreq.mr_type = libc::PACKET_MR_PROMISC as libc::c_ushort;
    // SAFETY: `mreq` is a valid packet_mreq and we pass its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&mreq as *const libc::packet_mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// Makes every frame read from or written to the socket carry a 10-byte virtio-net
/// header in front (PACKET_VNET_HDR): GSO frames then cross whole, with their partial
/// checksum described rather than computed. The header is built at read time, so
/// frames queued before the call get one too.
pub fn enable_vnet_hdr(fd: &OwnedFd) -> io::Result<()> {
    set_int_opt(fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)
}

/// Raises the socket's send buffer to `bytes` beyond the system's cap (SO_SNDBUFFORCE,
/// needs CAP_NET_ADMIN), falling back to SO_SNDBUF within the cap.
pub fn set_send_buffer(fd: &OwnedFd, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, v)
        .or_else(|_| set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v))
}

/// Receives one frame of a PACKET_VNET_HDR socket without blocking: its header into
/// `hdr` (10 bytes), the Ethernet frame into `body`. Returns the full length, header
/// included (MSG_TRUNC: larger than the two buffers if the frame was cut);
/// `WouldBlock` if none is queued.
pub fn recv_vnet(fd: &OwnedFd, hdr: &mut [u8], body: &mut [u8]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: body.as_mut_ptr().cast(),
            iov_len: body.len(),
        },
    ];
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: `msg` points at `iov`, whose entries describe `hdr` and `body`, all of
    // which outlive the call; with MSG_TRUNC the kernel still writes at most their sizes.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends one frame on a PACKET_VNET_HDR socket: `hdr` (10 bytes) then the Ethernet
/// frame `body`, gathered in one call. Returns the bytes sent, header included.
pub fn send_vnet(fd: &OwnedFd, hdr: &[u8], body: &[u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr() as *mut libc::c_void,
            iov_len: body.len(),
        },
    ];
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: `msg` points at `iov`, whose entries describe `hdr` and `body`, which
    // outlive the call; sendmsg only reads them.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Attaches (or replaces) the socket's classic BPF filter (SO_ATTACH_FILTER): frames
/// it refuses are dropped by the kernel before they are queued.
pub fn attach_filter(fd: BorrowedFd<'_>, prog: &[Insn]) -> io::Result<()> {
    let mut insns: Vec<libc::sock_filter> = prog
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: u16::try_from(insns.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        filter: insns.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `insns`, which outlives the call (the kernel copies the
    // program), and we pass the exact size of `fprog`.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Sends one frame on the bound interface; returns the bytes sent.
pub fn send(fd: &OwnedFd, frame: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `frame`, which outlives the call.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Waits up to `timeout` for `fd` to become readable. EINTR counts as not ready; an
/// error flag without data is an error.
pub fn poll_readable(fd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    let [r] = super::poll::poll_fds([Some(fd.as_fd())], timeout)?;
    if r & (libc::POLLERR | libc::POLLNVAL) != 0 && r & libc::POLLIN == 0 {
        return Err(io::Error::other("socket error reported by poll"));
    }
    Ok(r != 0)
}

/// Takes the socket's pending error (SO_ERROR), clearing it: a packet socket reports
/// its interface going down or away once, this way.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and describe a c_int; fd is an open socket.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok((value != 0).then(|| io::Error::from_raw_os_error(value)))
}

/// The `IFF_*` flags of interface `name` (SIOCGIFFLAGS), asked through any socket `fd`
/// of the namespace the interface is in.
pub fn if_flags(fd: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq holding a NUL-terminated name; SIOCGIFFLAGS only
    // writes its flags member.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) })?;
    // SAFETY: the kernel filled the union's flags member for SIOCGIFFLAGS.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(flags as u16 as u32)
}

/// What the kernel says about a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvInfo {
    /// The frame's full length: larger than the buffer if the frame was cut.
    pub len: usize,
    /// The transport checksum was left for hardware to fill (TP_STATUS_CSUMNOTREADY): the
    /// sender offloaded it and the frame never crossed a wire that would compute it.
    pub csum_not_ready: bool,
}

/// Receives one frame without blocking (MSG_TRUNC reports the full length), with its
/// PACKET_AUXDATA status; `WouldBlock` if none is queued.
pub fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<RecvInfo> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one tpacket_auxdata control message, 8-byte aligned as cmsghdr needs.
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (describing `buf`) and `control`, all of which outlive
    // the call; with MSG_TRUNC the kernel still writes at most `buf.len()` bytes.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut csum_not_ready = false;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // msg_controllen, and the auxdata payload is read unaligned as it may not be aligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::SOL_PACKET
                && c.cmsg_type == libc::PACKET_AUXDATA
                && c.cmsg_len as usize
                    >= libc::CMSG_LEN(std::mem::size_of::<libc::tpacket_auxdata>() as u32) as usize
            {
                let aux: libc::tpacket_auxdata =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                csum_not_ready = aux.tp_status & libc::TP_STATUS_CSUMNOTREADY != 0;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(RecvInfo {
        len: n as usize,
        csum_not_ready,
    })
}

/// Moves the calling thread into the network namespace at `path` (e.g.
/// /run/netns/NAME). Sockets it opens afterwards belong to that namespace and keep
/// working from any thread; call it from a dedicated thread.
pub fn enter_netns(path: &Path) -> io::Result<()> {
    let ns = std::fs::File::open(path)?;
    // SAFETY: `ns` is an open namespace file; setns only changes this thread's namespace.
    cvt(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}
