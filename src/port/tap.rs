//! TAP port adapter: one TAP device per switch port, its fd held by the switch.
//!
//! Opened with IFF_VNET_HDR, a 12-byte virtio-net header and TUNSETOFFLOAD (CSUM, TSO4,
//! TSO6), the kernel hands us whole 64 KiB GSO frames with partial checksums, one per
//! read, and takes them whole on write: the switch moves 40 times fewer frames than at
//! MTU size and never computes a checksum. The kernel side of the TAP is moved into its
//! namespace and renamed there with `ip link`; the fd stays here, so the device
//! disappears when the switch closes it, wherever it lives.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{Port, PortError};
use crate::sys::poll::{poll_one, Readiness};
use crate::sys::tap::{self as sys, TapOptions};
use crate::wire::vnet::VNET_HDR_LEN;

/// Errors of creating and placing a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("creating TAP devices needs root (CAP_NET_ADMIN); run as root")]
    NotRoot,
    #[error("cannot create TAP device {name:?}")]
    Open {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("network namespace {0:?} not found (create it with: ip netns add {0})")]
    NoNetns(String),
    #[error("`{cmd}` failed: {stderr}")]
    Ip { cmd: String, stderr: String },
}

/// A TAP device and the switch's fd on it.
#[derive(Debug)]
pub struct Tap {
    file: File,
    /// A socket in the interface's namespace, to ask for its MTU.
    ctl: Option<std::os::fd::OwnedFd>,
    ifname: String,
    netns: Option<String>,
    vnet_hdr_len: usize,
    offload: bool,
}

impl Tap {
    /// Creates a TAP named `name` (empty: the kernel picks `tapN`, which avoids clashes
    /// between switches in the same namespace). With `offload`, the port exchanges
    /// GSO frames and partial checksums; without, the kernel sends only finished frames
    /// of at most the MTU. Either way frames carry the virtio-net header.
    pub fn create(name: &str, offload: bool) -> Result<Tap, TapError> {
        let opts = TapOptions {
            vnet_hdr_len: VNET_HDR_LEN,
            offload,
        };
        match sys::open_tap(name, opts) {
            Ok((file, ifname)) => Ok(Tap {
                file,
                ctl: sys::ctl_socket().ok(),
                ifname,
                netns: None,
                vnet_hdr_len: VNET_HDR_LEN,
                offload,
            }),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && !sys::is_root() => {
                Err(TapError::NotRoot)
            }
            Err(source) => Err(TapError::Open {
                name: name.to_string(),
                source,
            }),
        }
    }

    /// Moves the kernel side into network namespace `netns` (as named by `ip netns`) and
    /// renames it `ifname` there.
    pub fn move_to_netns(&mut self, netns: &str, ifname: &str) -> Result<(), TapError> {
        if !Path::new("/run/netns").join(netns).exists() {
            return Err(TapError::NoNetns(netns.to_string()));
        }
        ip(&[
            "link",
            "set",
            "dev",
            &self.ifname,
            "netns",
            netns,
            "name",
            ifname,
        ])?;
        self.ifname = ifname.to_string();
        self.netns = Some(netns.to_string());
        // No socket is kept in that namespace: it would keep the namespace alive after
        // `ip netns del`, and the port would never be seen gone. `mtu` opens one per look.
        self.ctl = None;
        Ok(())
    }

    /// Renames the device in place (it stays in the switch's namespace).
    pub fn rename(&mut self, ifname: &str) -> Result<(), TapError> {
        if ifname != self.ifname {
            ip(&["link", "set", "dev", &self.ifname, "name", ifname])?;
            self.ifname = ifname.to_string();
        }
        Ok(())
    }

    /// Brings the device up where it lives.
    pub fn set_up(&self) -> Result<(), TapError> {
        match &self.netns {
            Some(ns) => ip(&["-n", ns, "link", "set", "dev", &self.ifname, "up"]),
            None => ip(&["link", "set", "dev", &self.ifname, "up"]),
        }
    }

    /// The namespace the device was moved to (None: the switch's own).
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }
}

fn ip(args: &[&str]) -> Result<(), TapError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| TapError::Ip {
            cmd: cmd.clone(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TapError::Ip {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Errors that mean the device is gone for good: EBADFD once its netdev was
/// unregistered (namespace deleted), ENODEV/ENXIO for a vanished device.
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::ENODEV) | Some(libc::ENXIO)
    )
}

/// The MTU and operational state of `ifname`, through a socket of its namespace.
pub(crate) fn look(ctl: &std::os::fd::OwnedFd, ifname: &str) -> crate::port::LinkState {
    use std::os::fd::AsFd;
    crate::port::LinkState {
        mtu: sys::if_mtu(ctl, ifname).ok(),
        running: crate::sys::packet::if_flags(ctl.as_fd(), ifname)
            .ok()
            .map(|f| f & libc::IFF_RUNNING as u32 != 0),
    }
}

impl Port for Tap {
    fn try_recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) if is_gone(&e) => Err(PortError::Gone),
            Err(e) => Err(PortError::Io(e)),
        }
    }

    fn wait(&self, timeout: Duration) -> Result<bool, PortError> {
        match poll_one(std::os::fd::AsFd::as_fd(&self.file), timeout).map_err(PortError::Io)? {
            Readiness::Idle => Ok(false),
            Readiness::Broken => Err(PortError::Gone),
            Readiness::Readable => Ok(true),
        }
    }

    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        match (&self.file).write(frame) {
            Ok(_) => Ok(()),
            Err(e) if is_gone(&e) => Err(PortError::Gone),
            Err(e) => Err(PortError::Io(e)),
        }
    }

    fn vnet_hdr_len(&self) -> usize {
        self.vnet_hdr_len
    }

    fn offload(&self) -> bool {
        self.offload
    }

    fn poll_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.file))
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn mtu(&self) -> Option<u32> {
        self.link_state().mtu
    }

    fn link_state(&self) -> crate::port::LinkState {
        match &self.netns {
            // Best effort, from a short-lived thread in the port's namespace; without it
            // the port's MTU is unknown and not enforced, and its link taken as up.
            Some(ns) => {
                let path = Path::new("/run/netns").join(ns);
                let ifname = self.ifname.clone();
                std::thread::spawn(move || {
                    if crate::sys::packet::enter_netns(&path).is_err() {
                        return crate::port::LinkState::default();
                    }
                    match sys::ctl_socket() {
                        Ok(ctl) => look(&ctl, &ifname),
                        Err(_) => crate::port::LinkState::default(),
                    }
                })
                .join()
                .unwrap_or_default()
            }
            None => match self.ctl.as_ref() {
                Some(ctl) => look(ctl, &self.ifname),
                None => crate::port::LinkState::default(),
            },
        }
    }

    fn kind(&self) -> &'static str {
        "tap"
    }
}
