//! TAP device system calls (the unsafe layer under `port::tap`): TUNSETIFF,
//! TUNSETVNETHDRSZ, TUNSETOFFLOAD. Waiting goes through [`super::poll`]. Reads and writes go through `std::fs::File`.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// How a TAP is opened.
#[derive(Debug, Clone, Copy)]
pub struct TapOptions {
    /// Length of the virtio-net header (0: no header, plain frames).
    pub vnet_hdr_len: usize,
    /// Ask the kernel for checksum and TSO offloads (needs a header).
    pub offload: bool,
}

/// Opens `/dev/net/tun` and attaches a new TAP device named `name` (empty: the kernel
/// picks `tapN`). Returns the file (non-blocking, close-on-exec) and the device name.
/// The device lives as long as the file: it is not made persistent.
pub fn open_tap(name: &str, opts: TapOptions) -> io::Result<(File, String)> {
    if name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name must be at most 15 bytes, without '/'",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    let fd = file.as_raw_fd();

    // SAFETY: ifreq is plain old data (arrays, integers and a union of those); all-zero
    // is a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if opts.vnet_hdr_len > 0 {
        flags |= libc::IFF_VNET_HDR;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `ifr` is a valid, live,
    // exclusively borrowed ifreq for the duration of the call and `fd` is open.
    if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote a NUL-terminated name of at most IFNAMSIZ-1 bytes into
    // ifr_name, which is IFNAMSIZ bytes long.
    let ifname = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned();

    if opts.vnet_hdr_len > 0 {
        let len: libc::c_int = opts.vnet_hdr_len as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points to a
        // live local.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &len as *const libc::c_int) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let offload: libc::c_uint = if opts.offload && opts.vnet_hdr_len > 0 {
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    } else {
        0
    };
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of TUN_F_*
    // bits), not through a pointer; no memory is accessed.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, offload as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((file, ifname))
}

/// True when this process may create network devices (effective uid 0; the kernel has
/// the last word through CAP_NET_ADMIN, this only gives a clearer message up front).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A datagram socket for interface ioctls (SIOCGIFMTU) in the calling thread's network
/// namespace; the kernel resolves interface names in the namespace of the socket, so a
/// socket made in a port's namespace answers for that port's interface from any thread.
pub fn ctl_socket() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// The MTU of interface `ifname`, asked through `ctl` (see [`ctl_socket`]).
pub fn if_mtu(ctl: &std::os::fd::OwnedFd, ifname: &str) -> io::Result<u32> {
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq with a NUL-terminated name (at most 15 bytes in a
    // zeroed 16-byte array); SIOCGIFMTU writes only its ifru_mtu member.
    if unsafe {
        libc::ioctl(
            ctl.as_raw_fd(),
            libc::SIOCGIFMTU,
            &mut ifr as *mut libc::ifreq,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU succeeded, so the union holds the MTU.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
    Ok(mtu.max(0) as u32)
}
