//! rtnetlink link notifications (RTM_NEWLINK / RTM_DELLINK), decoded from the bytes a
//! NETLINK_ROUTE socket subscribed to RTMGRP_LINK receives. Pure: no socket here.
//!
//! Netlink is a local, host-endian protocol: every integer is in the machine's own byte
//! order. Only what an uplink needs is decoded: which interface (index and name), whether
//! it was added/changed or deleted, and its flags. Every length is checked against the
//! buffer before it is used; a malformed datagram is an error value, never a panic.

use super::WireError;

/// `struct nlmsghdr`: length, type, flags, sequence, port id.
const NLMSG_HDR_LEN: usize = 16;
/// `struct ifinfomsg`: family, pad, type, index, flags, change.
const IFINFO_LEN: usize = 16;
/// `struct rtattr`: length, type.
const RTA_HDR_LEN: usize = 4;

mod msg_type {
    pub const NOOP: u16 = 1;
    pub const ERROR: u16 = 2;
    pub const DONE: u16 = 3;
    pub const OVERRUN: u16 = 4;
    pub const NEWLINK: u16 = 16;
    pub const DELLINK: u16 = 17;
}
const IFLA_IFNAME: u16 = 3;

/// Interface flags of `ifinfomsg.ifi_flags` (linux/if.h).
pub const IFF_UP: u32 = 0x1;
pub const IFF_RUNNING: u32 = 0x40;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// What happened to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkChange {
    /// Added, or changed (flags, name, state): RTM_NEWLINK.
    New,
    /// Removed: RTM_DELLINK.
    Del,
}

/// One link notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkMsg {
    pub change: LinkChange,
    pub ifindex: u32,
    /// `IFF_*` flags as the kernel has them now.
    pub flags: u32,
    /// IFLA_IFNAME, when present (the kernel always sends it).
    pub name: Option<String>,
}

impl LinkMsg {
    /// Administratively up and with carrier: frames flow.
    pub fn is_running(&self) -> bool {
        self.flags & (IFF_UP | IFF_RUNNING) == (IFF_UP | IFF_RUNNING)
    }
}

/// Decodes every link notification of one datagram, in order; other message types are
/// skipped. `Err` if a length does not fit the datagram, or the kernel reports an
/// overrun: the caller lost track and must look at the interface itself.
pub fn parse(buf: &[u8]) -> Result<Vec<LinkMsg>, WireError> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= NLMSG_HDR_LEN {
        let len = u32_at(buf, at).ok_or(WireError::Truncated)? as usize;
        let kind = u16_at(buf, at + 4).ok_or(WireError::Truncated)?;
        if len < NLMSG_HDR_LEN || len > buf.len() - at {
            return Err(WireError::Truncated);
        }
        let body = &buf[at + NLMSG_HDR_LEN..at + len];
        match kind {
            msg_type::NEWLINK | msg_type::DELLINK => {
                let change = if kind == msg_type::NEWLINK {
                    LinkChange::New
                } else {
                    LinkChange::Del
                };
                out.push(parse_link(change, body)?);
            }
            msg_type::OVERRUN => return Err(WireError::Malformed),
            msg_type::DONE => break,
            msg_type::NOOP | msg_type::ERROR => {}
            _ => {}
        }
        at += align4(len).min(buf.len() - at);
    }
    Ok(out)
}

fn parse_link(change: LinkChange, body: &[u8]) -> Result<LinkMsg, WireError> {
    if body.len() < IFINFO_LEN {
        return Err(WireError::Truncated);
    }
    let ifindex = u32_at(body, 4).ok_or(WireError::Truncated)?;
    let flags = u32_at(body, 8).ok_or(WireError::Truncated)?;
    let mut name = None;
    let mut at = IFINFO_LEN;
    while body.len() - at >= RTA_HDR_LEN {
        let len = u16_at(body, at).ok_or(WireError::Truncated)? as usize;
        let kind = u16_at(body, at + 2).ok_or(WireError::Truncated)?;
        if len < RTA_HDR_LEN || len > body.len() - at {
            return Err(WireError::Truncated);
        }
        // The high bits are NLA_F_NESTED / NLA_F_NET_BYTEORDER.
        if kind & 0x3fff == IFLA_IFNAME {
            let raw = &body[at + RTA_HDR_LEN..at + len];
            let raw = raw.split(|&b| b == 0).next().unwrap_or(raw);
            name = Some(String::from_utf8_lossy(raw).into_owned());
        }
        at += align4(len).min(body.len() - at);
    }
    Ok(LinkMsg {
        change,
        ifindex,
        flags,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink message as the kernel lays it out.
    fn message(kind: u16, ifindex: u32, flags: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&[0, 0]); // family, pad
        body.extend_from_slice(&1u16.to_ne_bytes()); // ARPHRD_ETHER
        body.extend_from_slice(&ifindex.to_ne_bytes());
        body.extend_from_slice(&flags.to_ne_bytes());
        body.extend_from_slice(&0xffff_ffffu32.to_ne_bytes()); // change
        for (t, v) in attrs {
            body.extend_from_slice(&((RTA_HDR_LEN + v.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(v);
            body.resize(align4(body.len()), 0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn new_and_del_link_messages_decode() {
        let mtu = 1500u32.to_ne_bytes();
        let mut dgram = message(
            msg_type::NEWLINK,
            7,
            IFF_UP | IFF_RUNNING | 0x1000,
            &[(4, &mtu), (IFLA_IFNAME, b"vmnic0\0")],
        );
        dgram.extend(message(
            msg_type::DELLINK,
            5,
            0,
            &[(IFLA_IFNAME, b"eth1\0")],
        ));
        let got = parse(&dgram).unwrap();
        assert_eq!(
            got,
            vec![
                LinkMsg {
                    change: LinkChange::New,
                    ifindex: 7,
                    flags: IFF_UP | IFF_RUNNING | 0x1000,
                    name: Some("vmnic0".into()),
                },
                LinkMsg {
                    change: LinkChange::Del,
                    ifindex: 5,
                    flags: 0,
                    name: Some("eth1".into()),
                },
            ]
        );
        assert!(got[0].is_running());
        assert!(!got[1].is_running());
    }

    #[test]
    fn other_messages_are_skipped_and_bad_lengths_are_errors() {
        // An address message (RTM_NEWADDR = 20) in between is not a link.
        let mut dgram = message(20, 3, 0, &[]);
        dgram.extend(message(msg_type::NEWLINK, 3, IFF_UP, &[]));
        let got = parse(&dgram).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].ifindex, got[0].name.as_deref()), (3, None));
        assert!(!got[0].is_running());

        // A header that claims more than the datagram holds.
        let mut m = message(msg_type::NEWLINK, 3, 0, &[(IFLA_IFNAME, b"x\0")]);
        m.truncate(m.len() - 4);
        assert_eq!(parse(&m), Err(WireError::Truncated));
        // An attribute that claims more than its message holds.
        let mut m = message(msg_type::NEWLINK, 3, 0, &[(IFLA_IFNAME, b"abc\0")]);
        let attr_len_at = NLMSG_HDR_LEN + IFINFO_LEN;
        m[attr_len_at..attr_len_at + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(parse(&m), Err(WireError::Truncated));
        // A length below the header's own size.
        let mut m = message(msg_type::NEWLINK, 3, 0, &[]);
        m[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(parse(&m), Err(WireError::Truncated));
        // The kernel's overrun notice.
        assert_eq!(
            parse(&message(msg_type::OVERRUN, 0, 0, &[])),
            Err(WireError::Malformed)
        );
        // Nothing, and a runt shorter than a header, are empty.
        assert_eq!(parse(&[]), Ok(vec![]));
        assert_eq!(parse(&[1, 2, 3]), Ok(vec![]));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let base = message(msg_type::NEWLINK, 9, IFF_UP, &[(IFLA_IFNAME, b"vmnic0\0")]);
        for cut in 0..base.len() {
            let _ = parse(&base[..cut]);
        }
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut b = base.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % b.len();
                b[i] = (x >> 8) as u8;
            }
            let _ = parse(&b);
        }
    }
}
