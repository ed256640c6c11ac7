//! Guest NIC responder (sans-IO core): what the emulated VM answers on the network.
//!
//! One received frame in, the frames to send out; no sockets and no clock, so the host
//! daemon can feed it from a packet socket and tests can feed it byte arrays. It answers
//! ARP for the VM's address, ICMP echo (any size that arrives unfragmented), and a small
//! UDP request service whose state lives in guest memory, so that it migrates with the
//! VM: a client sees the same counter and keys before and after the move.
//!
//! Service state layout (pages `0..SERVICE_PAGES` of guest memory, little-endian):
//!
//! | where | what |
//! |---|---|
//! | page 0, bytes 0..8 | magic `VFSVC001` (zero until the first write) |
//! | page 0, bytes 8..16 | request counter (`incr`) |
//! | pages 1..16 | 240 key-value slots of 256 bytes |
//! | slot bytes 0, 1 | key length (0 = free slot), value length |
//! | slot bytes 4..36, 36..256 | key (≤ 32 bytes), value (≤ 220 bytes) |

use std::net::Ipv4Addr;

use crate::guest::SERVICE_PAGES;
use crate::memory::{GuestAddress, GuestMemory, MemoryError, PAGE_SIZE};
use crate::wire::{arp, ethernet, icmp, ipv4, udp, EtherType, MacAddr, WireError};

/// The UDP port of the guest's request service.
pub const UDP_SERVICE_PORT: u16 = 7777;
/// Marks initialised service state in page 0.
pub const SERVICE_MAGIC: u64 = u64::from_le_bytes(*b"VFSVC001");
/// Longest key of the key-value store, in bytes.
pub const MAX_KEY_LEN: usize = 32;
/// Longest value of the key-value store, in bytes.
pub const MAX_VALUE_LEN: usize = 220;
/// Longest request the service reads; longer ones get an error reply.
pub const MAX_REQUEST_LEN: usize = 512;

const MAGIC_ADDR: u64 = 0;
const COUNTER_ADDR: u64 = 8;
const KV_FIRST_PAGE: u64 = 1;
const SLOT_LEN: u64 = 256;
/// Number of key-value slots.
pub const KV_SLOTS: u64 = (SERVICE_PAGES - KV_FIRST_PAGE) * PAGE_SIZE as u64 / SLOT_LEN;

mod slot {
    pub const KEY_LEN: u64 = 0;
    pub const VALUE_LEN: u64 = 1;
    pub const KEY: u64 = 4;
    pub const VALUE: u64 = KEY + super::MAX_KEY_LEN as u64;
}

/// Counters of one NIC. A frame is counted in `rx` and in exactly one of `tx` (answered),
/// `ignored` (not for this VM, or nothing to answer) and `dropped_bad` (malformed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NicStats {
    pub rx: u64,
    pub tx: u64,
    pub dropped_bad: u64,
    pub ignored: u64,
    pub arp_replies: u64,
    pub echo_replies: u64,
    pub udp_replies: u64,
}

/// The network responder of one VM.
#[derive(Debug, Clone)]
pub struct Nic {
    mac: MacAddr,
    ip: Ipv4Addr,
    stats: NicStats,
}

enum Reply {
    Arp(Vec<u8>),
    Echo(Vec<u8>),
    Udp(Vec<u8>),
}

impl Nic {
    pub fn new(mac: MacAddr, ip: Ipv4Addr) -> Nic {
        Nic {
            mac,
            ip,
            stats: NicStats::default(),
        }
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// One received frame in, the frames to send out appended to `out`. Never panics;
    /// bad frames are counted in [`NicStats::dropped_bad`].
    pub fn handle(&mut self, frame: &[u8], mem: &GuestMemory, out: &mut Vec<Vec<u8>>) {
        self.stats.rx += 1;
        match self.respond(frame, mem) {
            Ok(Some(reply)) => {
                let bytes = match reply {
                    Reply::Arp(b) => {
                        self.stats.arp_replies += 1;
                        b
                    }
                    Reply::Echo(b) => {
                        self.stats.echo_replies += 1;
                        b
                    }
                    Reply::Udp(b) => {
                        self.stats.udp_replies += 1;
                        b
                    }
                };
                self.stats.tx += 1;
                out.push(bytes);
            }
            Ok(None) => self.stats.ignored += 1,
            Err(_) => self.stats.dropped_bad += 1,
        }
    }

    pub fn stats(&self) -> &NicStats {
        &self.stats
    }

    fn respond(&self, frame: &[u8], mem: &GuestMemory) -> Result<Option<Reply>, WireError> {
        let eth = ethernet::Frame::new_checked(frame)?;
        let dst = eth.dst_addr();
        if dst != self.mac && !dst.is_broadcast() {
            return Ok(None);
        }
        match eth.ethertype() {
            EtherType::Arp => self.respond_arp(eth.payload()),
            EtherType::Ipv4 if dst == self.mac => {
                self.respond_ipv4(eth.src_addr(), eth.payload(), mem)
            }
            _ => Ok(None),
        }
    }

    fn respond_arp(&self, payload: &[u8]) -> Result<Option<Reply>, WireError> {
        let req = arp::Repr::parse(&arp::Packet::new_checked(payload)?)?;
        if req.operation != arp::Operation::Request || req.target_protocol_addr != self.ip {
            return Ok(None);
        }
        let reply = arp::Repr {
            operation: arp::Operation::Reply,
            source_hardware_addr: self.mac,
            source_protocol_addr: self.ip,
            target_hardware_addr: req.source_hardware_addr,
            target_protocol_addr: req.source_protocol_addr,
        };
        let bytes = reply.to_bytes();
        let mut buf = frame_buffer(bytes.len());
        self.emit_ethernet(&mut buf, req.source_hardware_addr, EtherType::Arp)?;
        buf[ethernet::HEADER_LEN..ethernet::HEADER_LEN + bytes.len()].copy_from_slice(&bytes);
        Ok(Some(Reply::Arp(buf)))
    }

    fn respond_ipv4(
        &self,
        peer: MacAddr,
        payload: &[u8],
        mem: &GuestMemory,
    ) -> Result<Option<Reply>, WireError> {
        let packet = ipv4::Packet::new_checked(payload)?;
        let ip = ipv4::Repr::parse(&packet)?;
        // Nothing here reassembles fragments; a real guest would, this one stays silent.
        if ip.dst_addr != self.ip || packet.is_fragment() {
            return Ok(None);
        }
        match ip.protocol {
            ipv4::Protocol::Icmp => {
                let msg = icmp::Packet::new_checked(packet.payload())?;
                match icmp::Repr::parse(&msg)? {
                    icmp::Repr::EchoRequest {
                        ident,
                        seq_no,
                        data,
                    } => {
                        let reply = icmp::Repr::EchoReply {
                            ident,
                            seq_no,
                            data,
                        };
                        let buf = self.ipv4_frame(
                            peer,
                            ip.src_addr,
                            ipv4::Protocol::Icmp,
                            reply.buffer_len(),
                            |b| {
                                reply.emit(&mut icmp::Packet::new_checked(b)?);
                                Ok(())
                            },
                        )?;
                        Ok(Some(Reply::Echo(buf)))
                    }
                    icmp::Repr::EchoReply { .. } => Ok(None),
                }
            }
            ipv4::Protocol::Udp => {
                let dgram = udp::Packet::new_checked(packet.payload())?;
                let req = udp::Repr::parse(&dgram, ip.src_addr, ip.dst_addr)?;
                if req.dst_port != UDP_SERVICE_PORT {
                    return Ok(None);
                }
                let text = serve(mem, req.payload);
                let reply = udp::Repr {
                    src_port: UDP_SERVICE_PORT,
                    dst_port: req.src_port,
                    payload: text.as_bytes(),
                };
                let (src, dst) = (self.ip, ip.src_addr);
                let buf =
                    self.ipv4_frame(peer, dst, ipv4::Protocol::Udp, reply.buffer_len(), |b| {
                        reply.emit_into(b, src, dst)
                    })?;
                Ok(Some(Reply::Udp(buf)))
            }
            _ => Ok(None),
        }
    }

    fn emit_ethernet(
        &self,
        buf: &mut [u8],
        dst: MacAddr,
        ethertype: EtherType,
    ) -> Result<(), WireError> {
        let repr = ethernet::Repr {
            src: self.mac,
            dst,
            ethertype,
        };
        repr.emit(&mut ethernet::Frame::new_checked(buf)?);
        Ok(())
    }

    /// An Ethernet frame to `peer` carrying an IPv4 packet to `dst` whose payload of
    /// `len` bytes `fill` writes.
    fn ipv4_frame(
        &self,
        peer: MacAddr,
        dst: Ipv4Addr,
        protocol: ipv4::Protocol,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), WireError>,
    ) -> Result<Vec<u8>, WireError> {
        let ip = ipv4::Repr {
            src_addr: self.ip,
            dst_addr: dst,
            protocol,
            payload_len: len,
            ttl: ipv4::DEFAULT_TTL,
        };
        let total = ip.total_len().ok_or(WireError::Malformed)? as usize;
        let mut buf = frame_buffer(total);
        self.emit_ethernet(&mut buf, peer, EtherType::Ipv4)?;
        let packet = &mut buf[ethernet::HEADER_LEN..ethernet::HEADER_LEN + total];
        fill(&mut packet[ipv4::HEADER_LEN..])?;
        ipv4::emit_header(&ip, packet)?;
        Ok(buf)
    }
}

/// A zeroed frame buffer for `payload_len` bytes after the Ethernet header, at least the
/// Ethernet minimum long (the zeroes are the padding).
fn frame_buffer(payload_len: usize) -> Vec<u8> {
    vec![0u8; (ethernet::HEADER_LEN + payload_len).max(ethernet::MIN_FRAME_LEN)]
}

/// A request of the guest's UDP service, checked. Parsing is pure, so a client can
/// refuse a request the service would refuse before sending it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// Add one to the counter and answer it.
    Incr,
    /// Answer the counter.
    Get,
    /// Answer the value stored under a key.
    GetKey(&'a str),
    /// Store a value under a key.
    Put { key: &'a str, value: &'a str },
}

/// Why a request is refused without looking at guest memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request longer than {MAX_REQUEST_LEN} bytes")]
    TooLong,
    #[error("request is not UTF-8 text")]
    NotText,
    #[error("unknown request {0:?} (expected incr, get, get KEY or put KEY VALUE)")]
    Unknown(String),
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("key must be 1 to {MAX_KEY_LEN} printable characters without spaces")]
    BadKey,
    #[error("value must be 1 to {MAX_VALUE_LEN} printable characters")]
    BadValue,
}

/// Parses one request: `incr`, `get`, `get KEY` or `put KEY VALUE`.
pub fn parse_request(request: &[u8]) -> Result<Request<'_>, RequestError> {
    if request.len() > MAX_REQUEST_LEN {
        return Err(RequestError::TooLong);
    }
    let text = std::str::from_utf8(request).map_err(|_| RequestError::NotText)?;
    let (cmd, rest) = split_word(text.trim());
    match cmd {
        "incr" if rest.is_empty() => Ok(Request::Incr),
        "incr" => Err(RequestError::Usage("incr")),
        "get" if rest.is_empty() => Ok(Request::Get),
        "get" => {
            let (key, extra) = split_word(rest);
            if !extra.is_empty() {
                return Err(RequestError::Usage("get KEY"));
            }
            check_key(key)?;
            Ok(Request::GetKey(key))
        }
        "put" => {
            let (key, value) = split_word(rest);
            if key.is_empty() || value.is_empty() {
                return Err(RequestError::Usage("put KEY VALUE"));
            }
            check_key(key)?;
            if value.len() > MAX_VALUE_LEN
                || !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
            {
                return Err(RequestError::BadValue);
            }
            Ok(Request::Put { key, value })
        }
        other => Err(RequestError::Unknown(other.chars().take(32).collect())),
    }
}

/// Errors of the UDP service; their text is the reply, after `error: `.
#[derive(Debug, thiserror::Error)]
enum ServiceError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("store full ({KV_SLOTS} keys)")]
    Full,
    #[error("service state is corrupt (bad magic in page 0)")]
    Corrupt,
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
}

/// Answers one request of the UDP service.
fn serve(mem: &GuestMemory, request: &[u8]) -> String {
    match serve_inner(mem, request) {
        Ok(s) => s,
        Err(e) => format!("error: {e}"),
    }
}

fn serve_inner(mem: &GuestMemory, request: &[u8]) -> Result<String, ServiceError> {
    match parse_request(request)? {
        Request::Incr => {
            init(mem)?;
            let n = mem.read_u64(GuestAddress(COUNTER_ADDR))?.wrapping_add(1);
            mem.write_u64(GuestAddress(COUNTER_ADDR), n)?;
            Ok(format!("counter {n}"))
        }
        Request::Get => Ok(format!("counter {}", counter(mem)?)),
        Request::GetKey(key) => match lookup(mem, key.as_bytes())? {
            Some(v) => Ok(format!("value {v}")),
            None => Ok("missing".to_string()),
        },
        Request::Put { key, value } => {
            store(mem, key.as_bytes(), value.as_bytes())?;
            Ok("ok".to_string())
        }
    }
}

/// The first whitespace-separated word of `s` and the rest, trimmed.
fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, ""),
    }
}

fn check_key(key: &str) -> Result<(), RequestError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RequestError::BadKey);
    }
    Ok(())
}

/// True once the service has written its state; zero memory is a fresh, empty state.
fn initialised(mem: &GuestMemory) -> Result<bool, ServiceError> {
    match mem.read_u64(GuestAddress(MAGIC_ADDR))? {
        SERVICE_MAGIC => Ok(true),
        0 => Ok(false),
        _ => Err(ServiceError::Corrupt),
    }
}

fn init(mem: &GuestMemory) -> Result<(), ServiceError> {
    if !initialised(mem)? {
        // Check the whole service area exists before claiming it.
        let end = SERVICE_PAGES * PAGE_SIZE as u64;
        if mem.size() < end {
            return Err(MemoryError::OutOfRange {
                addr: 0,
                len: end,
                size: mem.size(),
            }
            .into());
        }
        mem.write_u64(GuestAddress(MAGIC_ADDR), SERVICE_MAGIC)?;
    }
    Ok(())
}

fn counter(mem: &GuestMemory) -> Result<u64, ServiceError> {
    if !initialised(mem)? {
        return Ok(0);
    }
    Ok(mem.read_u64(GuestAddress(COUNTER_ADDR))?)
}

fn slot_addr(i: u64) -> u64 {
    KV_FIRST_PAGE * PAGE_SIZE as u64 + i * SLOT_LEN
}

/// Reads slot `i`: its key (empty if free) and value.
fn read_slot(mem: &GuestMemory, i: u64) -> Result<(Vec<u8>, Vec<u8>), ServiceError> {
    let base = slot_addr(i);
    let mut lens = [0u8; 2];
    mem.read(GuestAddress(base + slot::KEY_LEN), &mut lens)?;
    // Lengths come from memory that a corrupt state could fill with anything: cap them.
    let key_len = (lens[0] as usize).min(MAX_KEY_LEN);
    let value_len = (lens[1] as usize).min(MAX_VALUE_LEN);
    let mut key = vec![0u8; key_len];
    mem.read(GuestAddress(base + slot::KEY), &mut key)?;
    let mut value = vec![0u8; value_len];
    mem.read(GuestAddress(base + slot::VALUE), &mut value)?;
    Ok((key, value))
}

fn lookup(mem: &GuestMemory, key: &[u8]) -> Result<Option<String>, ServiceError> {
    if !initialised(mem)? {
        return Ok(None);
    }
    for i in 0..KV_SLOTS {
        let (k, v) = read_slot(mem, i)?;
        if k == key {
            return Ok(Some(String::from_utf8_lossy(&v).into_owned()));
        }
    }
    Ok(None)
}

fn store(mem: &GuestMemory, key: &[u8], value: &[u8]) -> Result<(), ServiceError> {
    init(mem)?;
    let mut free = None;
    let mut found = None;
    for i in 0..KV_SLOTS {
        let (k, _) = read_slot(mem, i)?;
        if k == key {
            found = Some(i);
            break;
        }
        if k.is_empty() && free.is_none() {
            free = Some(i);
        }
    }
    let i = found.or(free).ok_or(ServiceError::Full)?;
    let base = slot_addr(i);
    // Value first, key length last: the slot becomes visible only when complete.
    mem.write(GuestAddress(base + slot::VALUE), value)?;
    mem.write(GuestAddress(base + slot::VALUE_LEN), &[value.len() as u8])?;
    mem.write(GuestAddress(base + slot::KEY), key)?;
    mem.write(GuestAddress(base + slot::KEY_LEN), &[key.len() as u8])?;
    Ok(())
}

/// The service's request counter as stored in guest memory (0 before the first `incr`,
/// or if the memory does not hold service state).
pub fn read_counter(mem: &GuestMemory) -> u64 {
    counter(mem).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::set_pages;

    const VM_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x01, 0x01]);
    const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 100);
    const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const CLIENT_IP: [u8; 4] = [10, 10, 0, 1];

    fn mem() -> GuestMemory {
        GuestMemory::new(64 * PAGE_SIZE as u64).unwrap()
    }

    /// A 42-byte ARP frame zero-padded to the 60-byte Ethernet minimum, as on the wire.
    const fn padded(head: [u8; 42]) -> [u8; 60] {
        let mut f = [0u8; 60];
        let mut i = 0;
        while i < 42 {
            f[i] = head[i];
            i += 1;
        }
        f
    }

    // ARP request from the client for 10.10.0.100.
    const ARP_REQUEST: [u8; 60] = padded([
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x06, //
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, //
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 10, 0, 1, //
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 10, 10, 0, 100,
    ]);

    const ARP_REPLY: [u8; 60] = padded([
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x02, 0x00, 0x00, 0x00, 0x01, 0x01, 0x08, 0x06, //
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x02, //
        0x02, 0x00, 0x00, 0x00, 0x01, 0x01, 10, 10, 0, 100, //
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 10, 0, 1,
    ]);

    fn echo_request(data: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, VM_MAC.0)
            .ipv4(CLIENT_IP, VM_IP.octets(), 64)
            .icmpv4_echo_request(0x77, 3)
            .write(&mut f, data)
            .unwrap();
        f
    }

    fn udp_request(text: &str) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, VM_MAC.0)
            .ipv4(CLIENT_IP, VM_IP.octets(), 64)
            .udp(40000, UDP_SERVICE_PORT)
            .write(&mut f, text.as_bytes())
            .unwrap();
        f
    }

    fn one(nic: &mut Nic, mem: &GuestMemory, frame: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        nic.handle(frame, mem, &mut out);
        assert!(out.len() <= 1);
        out.pop()
    }

    /// Sends `text` to the service and returns the reply text, checking the headers.
    fn ask(nic: &mut Nic, mem: &GuestMemory, text: &str) -> String {
        let reply = one(nic, mem, &udp_request(text)).expect("a reply");
        assert!(reply.len() >= 60);
        let eth = ethernet::Frame::new_checked(&reply[..]).unwrap();
        assert_eq!(eth.dst_addr(), MacAddr(CLIENT_MAC));
        assert_eq!(eth.src_addr(), VM_MAC);
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        let ip_repr = ipv4::Repr::parse(&ip).unwrap();
        assert_eq!(ip_repr.dst_addr, Ipv4Addr::from(CLIENT_IP));
        let u = udp::Packet::new_checked(ip.payload()).unwrap();
        assert_ne!(u.checksum(), 0);
        let r = udp::Repr::parse(&u, ip_repr.src_addr, ip_repr.dst_addr).unwrap();
        assert_eq!((r.src_port, r.dst_port), (UDP_SERVICE_PORT, 40000));
        String::from_utf8(r.payload.to_vec()).unwrap()
    }

    #[test]
    fn answers_arp_for_its_address() {
        let (m, mut nic) = (mem(), Nic::new(VM_MAC, VM_IP));
        assert_eq!(one(&mut nic, &m, &ARP_REQUEST).unwrap(), ARP_REPLY.to_vec());
        // For another address: silence.
        let mut other = ARP_REQUEST;
        other[41] = 101;
        assert!(one(&mut nic, &m, &other).is_none());
        // A frame to the client's MAC is not ours to answer.
        assert!(one(&mut nic, &m, &ARP_REPLY).is_none());
        assert_eq!(nic.stats().arp_replies, 1);
        assert_eq!(nic.stats().tx, 1);
        assert_eq!(nic.stats().ignored, 2);
        assert_eq!(m.dirty().count(), 0);
    }

    #[test]
    fn echoes_every_size_and_pads_small_replies() {
        let (m, mut nic) = (mem(), Nic::new(VM_MAC, VM_IP));
        for len in [0usize, 1, 18, 56, 1472, 1473, 9000, 65535 - 28] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let reply = one(&mut nic, &m, &echo_request(&data)).expect("echo reply");
            assert_eq!(reply.len(), (14 + 28 + len).max(60), "len {len}");
            let eth = ethernet::Frame::new_checked(&reply[..]).unwrap();
            assert_eq!(eth.dst_addr(), MacAddr(CLIENT_MAC));
            let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
            let ip_repr = ipv4::Repr::parse(&ip).unwrap();
            assert_eq!(ip_repr.src_addr, VM_IP);
            assert_eq!(ip_repr.protocol, ipv4::Protocol::Icmp);
            let msg = icmp::Packet::new_checked(ip.payload()).unwrap();
            assert_eq!(
                icmp::Repr::parse(&msg).unwrap(),
                icmp::Repr::EchoReply {
                    ident: 0x77,
                    seq_no: 3,
                    data: &data
                }
            );
        }
        assert_eq!(nic.stats().echo_replies, 8);
        assert_eq!(m.dirty().count(), 0);
    }

    #[test]
    fn udp_service_counter_and_store() {
        let (m, mut nic) = (mem(), Nic::new(VM_MAC, VM_IP));
        assert_eq!(ask(&mut nic, &m, "get"), "counter 0");
        assert_eq!(m.dirty().count(), 0, "reads write nothing");
        assert_eq!(ask(&mut nic, &m, "incr"), "counter 1");
        assert_eq!(ask(&mut nic, &m, "incr\n"), "counter 2");
        assert_eq!(ask(&mut nic, &m, "get"), "counter 2");
        assert_eq!(read_counter(&m), 2);
        assert_eq!(ask(&mut nic, &m, "get colour"), "missing");
        assert_eq!(ask(&mut nic, &m, "put colour deep blue"), "ok");
        assert_eq!(ask(&mut nic, &m, "get colour"), "value deep blue");
        assert_eq!(ask(&mut nic, &m, "put colour red"), "ok");
        assert_eq!(ask(&mut nic, &m, "get colour"), "value red");
        assert_eq!(ask(&mut nic, &m, "put size 3"), "ok");
        assert_eq!(ask(&mut nic, &m, "get size"), "value 3");
        // Every write landed in the service pages and marked them dirty.
        let dirty: Vec<u64> = set_pages(&m.dirty().harvest()).collect();
        assert_eq!(dirty, vec![0, 1]);
    }

    #[test]
    fn udp_service_errors_are_replies() {
        let (m, mut nic) = (mem(), Nic::new(VM_MAC, VM_IP));
        assert!(ask(&mut nic, &m, "frobnicate").starts_with("error: unknown request"));
        assert_eq!(ask(&mut nic, &m, "put k"), "error: usage: put KEY VALUE");
        assert_eq!(ask(&mut nic, &m, "get a b"), "error: usage: get KEY");
        assert_eq!(ask(&mut nic, &m, "incr 5"), "error: usage: incr");
        let long_key = "k".repeat(MAX_KEY_LEN + 1);
        assert!(ask(&mut nic, &m, &format!("put {long_key} v")).starts_with("error: key must"));
        let long_value = "v".repeat(MAX_VALUE_LEN + 1);
        assert!(ask(&mut nic, &m, &format!("put k {long_value}")).starts_with("error: value must"));
        assert_eq!(
            ask(&mut nic, &m, &format!("put k {}", &long_value[1..])),
            "ok"
        );
        assert!(ask(&mut nic, &m, &"x".repeat(MAX_REQUEST_LEN + 1)).contains("longer than"));
        assert_eq!(
            ask(&mut nic, &m, ""),
            "error: unknown request \"\" (expected incr, get, get KEY or put KEY VALUE)"
        );
    }

    #[test]
    fn store_fills_up_cleanly() {
        let (m, mut nic) = (mem(), Nic::new(VM_MAC, VM_IP));
        for i in 0..KV_SLOTS {
            assert_eq!(ask(&mut nic, &m, &format!("put key{i} {i}")), "ok");
        }
        assert_eq!(
            ask(&mut nic, &m, "put one-more 1"),
            format!("error: store full ({KV_SLOTS} keys)")
        );
        assert_eq!(
            ask(&mut nic, &m, "put key7 seven"),
            "ok",
            "existing keys still update"
        );
        assert_eq!(ask(&mut nic, &m, "get key239"), "value 239");
        let dirty: Vec<u64> = set_pages(&m.dirty().harvest()).collect();
        assert_eq!(dirty, (0..SERVICE_PAGES).collect::<Vec<_>>());
    }

    #[test]
    fn state_travels_with_memory() {
        let (src, mut nic) = (mem(), Nic::new(VM_MAC, VM_IP));
        ask(&mut nic, &src, "incr");
        ask(&mut nic, &src, "incr");
        ask(&mut nic, &src, "put host silo104");
        // What migration does: copy the pages; then a fresh NIC on the target.
        let dst = mem();
        let mut page = [0u8; PAGE_SIZE];
        for p in 0..src.page_count() {
            src.read_page(p, &mut page).unwrap();
            dst.write_page(p, &page).unwrap();
        }
        let mut nic2 = Nic::new(VM_MAC, VM_IP);
        assert_eq!(read_counter(&dst), 2);
        assert_eq!(ask(&mut nic2, &dst, "incr"), "counter 3");
        assert_eq!(ask(&mut nic2, &dst, "get host"), "value silo104");
    }

    #[test]
    fn small_or_corrupt_memory_gives_error_replies() {
        let tiny = GuestMemory::new(PAGE_SIZE as u64).unwrap();
        let mut nic = Nic::new(VM_MAC, VM_IP);
        assert!(ask(&mut nic, &tiny, "incr").starts_with("error: guest memory"));
        assert_eq!(ask(&mut nic, &tiny, "get"), "counter 0");
        let m = mem();
        m.write_u64(GuestAddress(0), 0xdead).unwrap();
        assert!(ask(&mut nic, &m, "incr").contains("corrupt"));
        assert_eq!(read_counter(&m), 0);
    }

    #[test]
    fn foreign_and_bad_frames_are_counted_not_answered() {
        let (m, mut nic) = (mem(), Nic::new(VM_MAC, VM_IP));
        // Unicast to another MAC.
        let mut f = udp_request("incr");
        f[5] = 0x99;
        assert!(one(&mut nic, &m, &f).is_none());
        // To us, other IP.
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, VM_MAC.0)
            .ipv4(CLIENT_IP, [10, 10, 0, 7], 64)
            .udp(1, UDP_SERVICE_PORT)
            .write(&mut f, b"incr")
            .unwrap();
        assert!(one(&mut nic, &m, &f).is_none());
        // Other UDP port.
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, VM_MAC.0)
            .ipv4(CLIENT_IP, VM_IP.octets(), 64)
            .udp(1, 53)
            .write(&mut f, b"x")
            .unwrap();
        assert!(one(&mut nic, &m, &f).is_none());
        // A fragment.
        let mut f = echo_request(b"abc");
        f[14 + 6] |= 0x20;
        f[14 + 10] = 0;
        f[14 + 11] = 0;
        ipv4::Packet::new_checked(&mut f[14..])
            .unwrap()
            .fill_checksum();
        assert!(one(&mut nic, &m, &f).is_none());
        assert_eq!(nic.stats().ignored, 4);

        // Bad IPv4 checksum, bad UDP checksum, runt, truncated IPv4.
        let mut f = udp_request("incr");
        f[14 + 10] ^= 1;
        assert!(one(&mut nic, &m, &f).is_none());
        let mut f = udp_request("incr");
        let n = f.len();
        f[n - 1] ^= 1;
        assert!(one(&mut nic, &m, &f).is_none());
        assert!(one(&mut nic, &m, &[0u8; 10]).is_none());
        let f = echo_request(&[0; 100]);
        assert!(one(&mut nic, &m, &f[..60]).is_none());
        assert_eq!(nic.stats().dropped_bad, 4);
        assert_eq!(read_counter(&m), 0);
        assert_eq!(nic.stats().rx, 8);
        assert_eq!(nic.stats().tx, 0);
    }

    #[test]
    fn random_frames_never_panic() {
        let (m, mut nic) = (mem(), Nic::new(VM_MAC, VM_IP));
        let mut seed = 7u64;
        let mut out = Vec::new();
        for len in 0..200 {
            for _ in 0..50 {
                let mut f: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed as u8
                    })
                    .collect();
                if len >= 14 {
                    // Address most of them to the VM so the deeper parsers run.
                    f[..6].copy_from_slice(&VM_MAC.0);
                    f[12..14].copy_from_slice(&[0x08, (seed as u8) & 0x06]);
                }
                nic.handle(&f, &m, &mut out);
            }
        }
        let s = nic.stats();
        assert_eq!(s.rx, s.tx + s.ignored + s.dropped_bad);
    }
}
