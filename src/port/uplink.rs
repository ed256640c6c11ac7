//! A hypervisor's uplink (adapter): the packet socket its VMs' NICs share, kept bound to
//! the interface of its name while that interface vanishes and comes back (the switch
//! holding the other end of the TAP restarted).
//!
//! A packet socket is bound to an interface *index*, which dies with the interface; a new
//! interface of the same name gets a new index, so the socket is opened again. The
//! receiving thread learns of such changes at once from the kernel's link notifications
//! (a NETLINK_ROUTE socket subscribed to RTMGRP_LINK, `sys::netlink`), and keeps a cheap
//! once-a-second look at the interface, with a backoff while it is gone, as a safety net
//! for notifications lost to a full queue.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::bpf::{self, Insn};
use super::packet::{PacketError, PacketSocket};
use crate::clock::unix_micros;
use crate::sys::{netlink, packet as sys};
use crate::wire::rtnetlink::{self, LinkChange, LinkMsg, IFF_RUNNING, IFF_UP};
use crate::wire::MacAddr;

/// A hypervisor's uplink. [`Uplink::socket`] is what senders use; one thread receives
/// through an [`UplinkRx`], which also re-binds the socket when the interface changes.
#[derive(Debug)]
pub struct Uplink {
    ifname: String,
    sock: RwLock<Option<Arc<PacketSocket>>>,
    /// Frames the receiving thread has read from the socket.
    frames_read: AtomicU64,
    /// With a filter: the VM MACs it admits, each with its number of holders (a VM
    /// arriving by migration is admitted before it resumes, and again when it is
    /// installed). None: every frame is taken.
    admitted: Option<Mutex<BTreeMap<MacAddr, u32>>>,
}

/// What [`Uplink::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkHealth {
    /// Bound to the interface that has the name now.
    Bound,
    /// No socket: the interface went away and has not been re-bound yet.
    Lost,
    /// The socket's interface is gone (the name is free or names another index): the
    /// socket was dropped, the uplink is [`UplinkHealth::Lost`] from now on.
    JustLost,
}

impl Uplink {
    /// Opens the uplink on `ifname`, taking every frame; it must exist now.
    pub fn open(ifname: &str) -> Result<Uplink, PacketError> {
        Uplink::open_with(ifname, None)
    }

    /// Opens the uplink on `ifname` with a filter that admits broadcast and multicast,
    /// and the MACs [`Uplink::admit`] adds; it must exist now.
    pub fn open_filtered(ifname: &str) -> Result<Uplink, PacketError> {
        Uplink::open_with(ifname, Some(BTreeMap::new()))
    }

    fn open_with(
        ifname: &str,
        admitted: Option<BTreeMap<MacAddr, u32>>,
    ) -> Result<Uplink, PacketError> {
        let prog = admitted.as_ref().map(program);
        let sock = PacketSocket::open_filtered(ifname, prog.as_deref())?;
        Ok(Uplink {
            ifname: ifname.to_string(),
            sock: RwLock::new(Some(Arc::new(sock))),
            frames_read: AtomicU64::new(0),
            admitted: admitted.map(Mutex::new),
        })
    }

    /// Admits frames for `mac` (one more holder). Without a filter, nothing to do.
    pub fn admit(&self, mac: MacAddr) {
        self.change_admitted(mac, true);
    }

    /// Drops one holder of `mac`; its frames are refused when none is left.
    pub fn release(&self, mac: MacAddr) {
        self.change_admitted(mac, false);
    }

    /// The MACs the filter admits now (None: no filter).
    pub fn admitted(&self) -> Option<Vec<MacAddr>> {
        let m = self.admitted.as_ref()?;
        Some(
            m.lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied()
                .collect(),
        )
    }

    fn change_admitted(&self, mac: MacAddr, add: bool) {
        let Some(m) = &self.admitted else {
            return;
        };
        // Held while the program is attached, so that updates (and a re-bind, which
        // takes it too) apply in order.
        let mut map = m.lock().unwrap_or_else(|p| p.into_inner());
        let changed = if add {
            let n = map.entry(mac).or_insert(0);
            *n += 1;
            *n == 1
        } else {
            match map.get_mut(&mac) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => map.remove(&mac).is_some(),
                None => false,
            }
        };
        if !changed {
            return;
        }
        if let Some(s) = self.socket() {
            if let Err(e) = s.set_filter(&program(&map)) {
                tracing::warn!(uplink = %self.ifname, %mac, error = %e,
                    "uplink filter not updated");
            }
        }
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The socket, unless the interface is gone.
    pub fn socket(&self) -> Option<Arc<PacketSocket>> {
        self.sock.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Frames read from the interface so far (every socket the uplink had).
    pub fn frames_read(&self) -> u64 {
        self.frames_read.load(Ordering::Relaxed)
    }

    /// Sends one frame on the current socket.
    pub fn send(&self, frame: &[u8]) -> Result<(), PacketError> {
        match self.socket() {
            Some(s) => s.send(frame),
            None => Err(PacketError::Send {
                ifname: self.ifname.clone(),
                source: io::Error::from_raw_os_error(libc::ENODEV),
            }),
        }
    }

    /// Is the socket still bound to the interface named `ifname`? One ioctl, in the
    /// calling thread's namespace.
    pub fn check(&self) -> UplinkHealth {
        let Some(s) = self.socket() else {
            return UplinkHealth::Lost;
        };
        if sys::if_index(&self.ifname).ok() == Some(s.ifindex()) {
            return UplinkHealth::Bound;
        }
        self.drop_socket(s.ifindex());
        UplinkHealth::JustLost
    }

    /// Drops the socket if it is still the one bound to `ifindex`.
    fn drop_socket(&self, ifindex: u32) {
        let mut g = self.sock.write().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_some_and(|cur| cur.ifindex() == ifindex) {
            *g = None;
        }
    }

    /// Opens a socket on the interface named `ifname` again, if it exists now. True if
    /// the uplink is bound afterwards.
    pub fn rebind(&self) -> Result<bool, PacketError> {
        if self.check() == UplinkHealth::Bound {
            return Ok(true);
        }
        let admitted = self
            .admitted
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        let prog = admitted.as_deref().map(program);
        let sock = match PacketSocket::open_filtered(&self.ifname, prog.as_deref()) {
            Ok(s) => s,
            Err(PacketError::NoInterface { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        *self.sock.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(sock));
        Ok(true)
    }

    /// Whether the bound interface is up with carrier (frames flow). False when unbound.
    fn running(&self) -> bool {
        self.socket()
            .and_then(|s| s.if_flags(&self.ifname).ok())
            .is_some_and(|f| f & (IFF_UP | IFF_RUNNING) == (IFF_UP | IFF_RUNNING))
    }
}

/// The filter program for the admitted MACs.
fn program(admitted: &BTreeMap<MacAddr, u32>) -> Vec<Insn> {
    let macs: Vec<MacAddr> = admitted.keys().copied().collect();
    bpf::mac_filter(&macs)
}

/// Retry delays that double from `min` up to `max` (sans-IO: the caller sleeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay before the next attempt; each call doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// What [`UplinkRx::next`] has for its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkEvent {
    /// A frame of this many bytes is in the buffer.
    Frame(usize),
    /// Nothing within the wait (or something the uplink handled itself).
    Idle,
    /// The interface went away (said once per loss): the VMs are unreachable.
    Lost { error: Option<String> },
    /// Bound to an interface of the name that is up and has carrier, after it was gone
    /// or down: frames flow again, and the VMs should announce themselves.
    Back {
        /// How long frames could not flow.
        down: Duration,
        /// When they stopped (µs since the epoch).
        since_t_us: u64,
    },
}

/// How often the receiver looks at the interface itself, notifications or not (one
/// ioctl): the safety net behind the link notifications.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Re-bind attempts while the interface is gone, when no notification says it is back:
/// 50 ms doubling up to 500 ms (one ioctl each).
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_millis(500);
/// At most one WARN about receive errors on a still-bound uplink per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Frames read back to back before the receiver polls again (and so looks at link
/// notifications): one system call a frame in a burst, a bounded delay for the rest.
const BURST: u32 = 32;

/// The receiving side of an [`Uplink`]: one thread calls [`UplinkRx::next`] in a loop.
pub struct UplinkRx {
    up: Arc<Uplink>,
    /// Link notifications; None if the socket could not be opened (the periodic check
    /// then does all the work, as slowly as it does).
    monitor: Option<OwnedFd>,
    nlbuf: Vec<u8>,
    backoff: Backoff,
    retry_at: Instant,
    check_every: Duration,
    next_check: Instant,
    /// Frames flow: the interface is bound, up and has carrier.
    running: bool,
    /// Since when frames have not flowed, unless they do.
    since: Option<(Instant, u64)>,
    last_warn: Option<Instant>,
    errors_unlogged: u64,
    burst: u32,
    pending: VecDeque<UplinkEvent>,
}

impl UplinkRx {
    /// The receiver of `up`, with link notifications from the calling thread's network
    /// namespace (the uplink's).
    pub fn new(up: Arc<Uplink>) -> UplinkRx {
        UplinkRx::with_schedule(up, CHECK_EVERY, Backoff::new(RETRY_MIN, RETRY_MAX))
    }

    /// [`UplinkRx::new`] with its own look-and-retry schedule (tests make it slow, to
    /// show that the notifications alone do the work).
    fn with_schedule(up: Arc<Uplink>, check_every: Duration, backoff: Backoff) -> UplinkRx {
        let monitor = match netlink::open_link_monitor() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(uplink = %up.ifname(), error = %e,
                    "no link notifications: a restarted switch is noticed within a second");
                None
            }
        };
        let running = up.running();
        let now = Instant::now();
        UplinkRx {
            monitor,
            nlbuf: vec![0u8; 16384],
            backoff,
            retry_at: now,
            check_every,
            next_check: now + check_every,
            running,
            since: (!running).then(|| (now, unix_micros())),
            last_warn: None,
            errors_unlogged: 0,
            burst: 0,
            pending: VecDeque::new(),
            up,
        }
    }

    /// Whether link notifications are on.
    pub fn notified(&self) -> bool {
        self.monitor.is_some()
    }

    /// Waits up to `wait` for a frame or a change of the uplink.
    pub fn next(&mut self, buf: &mut [u8], wait: Duration) -> UplinkEvent {
        if let Some(e) = self.pending.pop_front() {
            return e;
        }
        let Some(sock) = self.up.socket() else {
            return self.while_lost(wait);
        };
        if self.burst < BURST {
            match sock.try_recv(buf) {
                Ok(Some(n)) => {
                    self.burst += 1;
                    return self.frame(n);
                }
                Ok(None) => {}
                Err(e) => return self.recv_error(e),
            }
        }
        self.burst = 0;
        let now = Instant::now();
        let timeout = wait.min(self.next_check.saturating_duration_since(now));
        let revents = match crate::sys::poll::poll_fds(
            [Some(sock.as_fd()), self.monitor.as_ref().map(|m| m.as_fd())],
            timeout,
        ) {
            Ok(r) => r,
            Err(e) => {
                self.warn(&e);
                std::thread::sleep(self.backoff.next_delay());
                return UplinkEvent::Idle;
            }
        };
        if revents[1] != 0 {
            self.drain_monitor();
        }
        if Instant::now() >= self.next_check {
            self.next_check = Instant::now() + self.check_every;
            self.resync();
        }
        if let Some(e) = self.pending.pop_front() {
            return e;
        }
        // The notifications may have replaced the socket polled.
        if !self.up.socket().is_some_and(|s| Arc::ptr_eq(&s, &sock)) {
            return UplinkEvent::Idle;
        }
        if revents[0] & libc::POLLIN != 0 {
            return match sock.try_recv(buf) {
                Ok(Some(n)) => self.frame(n),
                Ok(None) => UplinkEvent::Idle,
                Err(e) => self.recv_error(e),
            };
        }
        if revents[0] & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            let source = sock
                .take_error()
                .unwrap_or_else(|| io::Error::other("socket error reported by poll"));
            return self.recv_error(PacketError::Recv {
                ifname: self.up.ifname.clone(),
                source,
            });
        }
        UplinkEvent::Idle
    }

    fn frame(&mut self, n: usize) -> UplinkEvent {
        self.up.frames_read.fetch_add(1, Ordering::Relaxed);
        self.backoff.reset();
        UplinkEvent::Frame(n)
    }

    /// No socket: wait for a notification that the interface is back, and try anyway
    /// on the backoff schedule.
    fn while_lost(&mut self, wait: Duration) -> UplinkEvent {
        let now = Instant::now();
        let timeout = wait.min(self.retry_at.saturating_duration_since(now));
        match &self.monitor {
            Some(m) => {
                if let Ok([r]) = crate::sys::poll::poll_fds([Some(m.as_fd())], timeout) {
                    if r != 0 {
                        self.drain_monitor();
                    }
                }
            }
            None => std::thread::sleep(timeout),
        }
        if self.up.socket().is_none() && Instant::now() >= self.retry_at && !self.try_rebind() {
            self.retry_at = Instant::now() + self.backoff.next_delay();
        }
        self.pending.pop_front().unwrap_or(UplinkEvent::Idle)
    }

    fn recv_error(&mut self, e: PacketError) -> UplinkEvent {
        let errno = match &e {
            PacketError::Recv { source, .. } => source.raw_os_error(),
            _ => None,
        };
        match errno {
            // The interface went down, or away: the notification may still be queued,
            // or lost; look for ourselves.
            Some(libc::ENETDOWN | libc::ENXIO | libc::ENODEV) => {
                self.resync();
                if let Some(ev) = self.pending.pop_front() {
                    return ev;
                }
                tracing::debug!(uplink = %self.up.ifname, "uplink is down");
            }
            _ => {
                self.warn(&e);
                std::thread::sleep(self.backoff.next_delay());
            }
        }
        UplinkEvent::Idle
    }

    /// A WARN about a receive error, at most once per [`WARN_EVERY`], with the count of
    /// the errors not logged meanwhile.
    fn warn(&mut self, e: &dyn std::error::Error) {
        self.errors_unlogged += 1;
        if self.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            tracing::warn!(uplink = %self.up.ifname, error = %e,
                errors = self.errors_unlogged, "uplink receive failed");
            self.last_warn = Some(Instant::now());
            self.errors_unlogged = 0;
        }
    }

    /// Reads every queued notification and acts on those about our interface.
    fn drain_monitor(&mut self) {
        let Some(m) = self.monitor.as_ref() else {
            return;
        };
        let mut msgs = Vec::new();
        let mut lost_track = false;
        loop {
            match netlink::recv(m, &mut self.nlbuf) {
                Ok(netlink::Datagram::Kernel(n)) => match rtnetlink::parse(&self.nlbuf[..n]) {
                    Ok(m) => msgs.extend(m),
                    Err(_) => lost_track = true,
                },
                Ok(netlink::Datagram::Foreign) => {}
                Ok(netlink::Datagram::Truncated) => lost_track = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The kernel dropped notifications: the queue was full.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => lost_track = true,
                Err(e) => {
                    tracing::debug!(error = %e, "link notifications: receive failed");
                    lost_track = true;
                    break;
                }
            }
        }
        for m in msgs {
            self.on_link(&m);
        }
        if lost_track {
            self.resync();
        }
    }

    fn on_link(&mut self, m: &LinkMsg) {
        let bound = self.up.socket().map(|s| s.ifindex());
        let named_ours = m.name.as_deref() == Some(self.up.ifname.as_str());
        match m.change {
            LinkChange::Del if bound == Some(m.ifindex) => {
                self.up.drop_socket(m.ifindex);
                self.lost(None);
            }
            LinkChange::Del => {}
            LinkChange::New if bound == Some(m.ifindex) => {
                if m.name.is_some() && !named_ours {
                    // Renamed: the name is free, or another interface's now.
                    self.up.drop_socket(m.ifindex);
                    self.lost(Some("interface renamed".into()));
                } else {
                    self.set_running(m.is_running());
                }
            }
            LinkChange::New if named_ours => {
                if let Some(old) = bound {
                    self.up.drop_socket(old);
                    self.lost(None);
                }
                self.try_rebind();
            }
            LinkChange::New => {}
        }
    }

    /// Looks at the interface itself: is the socket bound to the index the name has now,
    /// and do frames flow? Re-binds at once if the interface is there.
    fn resync(&mut self) {
        match self.up.check() {
            UplinkHealth::Bound => {
                let r = self.up.running();
                self.set_running(r);
            }
            UplinkHealth::JustLost => {
                self.lost(None);
                self.try_rebind();
            }
            UplinkHealth::Lost => {
                self.try_rebind();
            }
        }
    }

    /// Re-binds if the interface exists; true if bound afterwards.
    fn try_rebind(&mut self) -> bool {
        match self.up.rebind() {
            Ok(true) => {
                self.backoff.reset();
                self.retry_at = Instant::now();
                let r = self.up.running();
                self.set_running(r);
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::debug!(uplink = %self.up.ifname, error = %e, "uplink re-bind failed");
                false
            }
        }
    }

    fn lost(&mut self, error: Option<String>) {
        self.mark_stopped();
        self.retry_at = Instant::now();
        self.backoff.reset();
        self.pending.push_back(UplinkEvent::Lost { error });
    }

    fn mark_stopped(&mut self) {
        self.running = false;
        if self.since.is_none() {
            self.since = Some((Instant::now(), unix_micros()));
        }
    }

    fn set_running(&mut self, running: bool) {
        if running && !self.running {
            self.running = true;
            let (t, since_t_us) = self.since.take().unwrap_or((Instant::now(), unix_micros()));
            self.pending.push_back(UplinkEvent::Back {
                down: t.elapsed(),
                since_t_us,
            });
        } else if !running {
            self.mark_stopped();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::packet::tests::{ip, test_frame, wait_for, Netns, MAC_A, MAC_B};
    use std::path::PathBuf;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(50), ms(1000));
        let got: Vec<u128> = (0..7).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![50, 100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), ms(50));
    }

    fn skip_unless_root(name: &str) -> bool {
        if crate::sys::tap::is_root() {
            return false;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "namespace test needs root when CI=true"
        );
        eprintln!("SKIPPED {name}: needs root");
        true
    }

    /// Runs `body(a, b, netns)` on a thread inside a fresh namespace holding nothing
    /// yet, with `a` and `b` the names of a veth pair for it to make; the namespace
    /// goes when the body returns or panics. Skips without root (not under CI).
    fn in_netns(test: &str, body: impl FnOnce(String, String, String) + Send + 'static) {
        if skip_unless_root(test) {
            return;
        }
        let ns = Netns::new();
        let (a, b) = (ns.ifname('a'), ns.ifname('b'));
        let path = PathBuf::from("/run/netns").join(&ns.name);
        let name = ns.name.clone();
        std::thread::spawn(move || {
            // Uplinks resolve names in the calling thread's namespace.
            sys::enter_netns(&path).expect("enter namespace");
            body(a, b, name)
        })
        .join()
        .expect("namespace thread");
    }

    #[test]
    fn an_uplink_rebinds_when_its_interface_comes_back() {
        in_netns(
            "an_uplink_rebinds_when_its_interface_comes_back",
            |a, b, name| {
                let up = Uplink::open(&a).unwrap();
                assert_eq!(up.check(), UplinkHealth::Bound);
                let old_index = up.socket().unwrap().ifindex();
                ip(&["-n", &name, "link", "del", &a]);
                assert_eq!(up.check(), UplinkHealth::JustLost);
                assert_eq!(up.check(), UplinkHealth::Lost);
                assert!(up.socket().is_none());
                assert!(up.send(&test_frame(MAC_B, MAC_A, 1)).is_err());
                assert!(!up.rebind().unwrap(), "nothing to bind to yet");
                ip(&[
                    "-n", &name, "link", "add", &a, "type", "veth", "peer", "name", &b,
                ]);
                ip(&["-n", &name, "link", "set", &a, "up"]);
                ip(&["-n", &name, "link", "set", &b, "up"]);
                assert!(up.rebind().unwrap());
                assert_eq!(up.check(), UplinkHealth::Bound);
                assert_ne!(up.socket().unwrap().ifindex(), old_index);
                // And it carries frames again.
                let peer = PacketSocket::open(&b).unwrap();
                up.send(&test_frame(MAC_B, MAC_A, 7)).unwrap();
                assert!(wait_for(&peer, 7, Duration::from_secs(3)).is_some());
            },
        );
    }

    /// Calls `rx.next` until `want` says yes or `timeout` passes; returns what matched.
    fn next_until(
        rx: &mut UplinkRx,
        timeout: Duration,
        want: impl Fn(&UplinkEvent) -> bool,
    ) -> Option<(UplinkEvent, Instant)> {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < end {
            let e = rx.next(&mut buf, Duration::from_millis(50));
            if want(&e) {
                return Some((e, Instant::now()));
            }
        }
        None
    }

    /// The receiver hears of the interface going, coming back and coming up from the
    /// kernel's notifications alone: its own look at the interface and its retries are
    /// an hour apart here, so nothing else could find the new interface.
    #[test]
    fn the_receiver_follows_the_interface_as_the_kernel_announces_it() {
        in_netns(
            "the_receiver_follows_the_interface_as_the_kernel_announces_it",
            |a, b, name| {
                let up = Arc::new(Uplink::open(&a).unwrap());
                let hour = Duration::from_secs(3600);
                let mut rx = UplinkRx::with_schedule(up.clone(), hour, Backoff::new(hour, hour));
                assert!(rx.notified());
                let within = Duration::from_secs(5);
                // Whatever the setup left queued.
                next_until(&mut rx, Duration::from_millis(100), |_| false);

                ip(&["-n", &name, "link", "del", &a]);
                next_until(&mut rx, within, |e| matches!(e, UplinkEvent::Lost { .. }))
                    .expect("the loss is noticed");
                assert!(up.socket().is_none());
                // The first retry (at once) found nothing; the next is an hour away.
                next_until(&mut rx, Duration::from_millis(100), |_| false);

                // Back, but down: bound at once, no Back yet.
                ip(&[
                    "-n", &name, "link", "add", &a, "type", "veth", "peer", "name", &b,
                ]);
                let bound =
                    next_until(&mut rx, within, |_| up.socket().is_some()).expect("re-bound");
                assert!(!matches!(bound.0, UplinkEvent::Back { .. }));
                // Up (both ends, for carrier): Back.
                ip(&["-n", &name, "link", "set", &b, "up"]);
                ip(&["-n", &name, "link", "set", &a, "up"]);
                let (e, at) =
                    next_until(&mut rx, within, |e| matches!(e, UplinkEvent::Back { .. }))
                        .expect("back");
                let UplinkEvent::Back { down, .. } = e else {
                    unreachable!()
                };
                assert!(down >= at - bound.1, "{down:?}");

                // Frames flow on the new socket, and are counted.
                let peer = PacketSocket::open(&b).unwrap();
                let before = up.frames_read();
                peer.send(&test_frame(MAC_A, MAC_B, 9)).unwrap();
                next_until(&mut rx, within, |e| matches!(e, UplinkEvent::Frame(_)))
                    .expect("a frame");
                assert!(up.frames_read() > before);

                // Down and up again, same interface: Back once more.
                ip(&["-n", &name, "link", "set", &a, "down"]);
                next_until(&mut rx, Duration::from_millis(200), |_| false);
                assert!(!rx.running);
                ip(&["-n", &name, "link", "set", &a, "up"]);
                next_until(&mut rx, within, |e| matches!(e, UplinkEvent::Back { .. }))
                    .expect("back after down and up");
            },
        );
    }

    /// Through a real socket: a filtered uplink takes frames for the MACs admitted,
    /// broadcast and multicast, and nothing else; admitting and releasing take effect
    /// on the live socket and survive a re-bind.
    #[test]
    fn a_filtered_uplink_takes_only_admitted_macs() {
        in_netns(
            "a_filtered_uplink_takes_only_admitted_macs",
            |a, b, name| {
                let up = Uplink::open_filtered(&a).unwrap();
                let peer = PacketSocket::open(&b).unwrap();
                let vm = MacAddr([0x02, 0, 0, 0, 0x01, 0x00]);
                let foreign = MacAddr([0x02, 0, 0, 0, 0x02, 0x00]);
                let group = MacAddr([0x01, 0x00, 0x5e, 0, 0, 1]);
                let mut marker = 0u8;
                let mut gets = |to: MacAddr| -> bool {
                    marker += 1;
                    peer.send(&test_frame(to, MAC_B, marker)).unwrap();
                    let sock = up.socket().unwrap();
                    wait_for(&sock, marker, Duration::from_millis(300)).is_some()
                };
                assert!(gets(MacAddr::BROADCAST));
                assert!(gets(group));
                assert!(!gets(vm), "not admitted yet");
                assert!(!gets(MAC_A), "the interface's own MAC is the kernel's");
                up.admit(vm);
                assert!(gets(vm));
                assert!(!gets(foreign));
                // Two holders: one release keeps it admitted.
                up.admit(vm);
                up.release(vm);
                assert!(gets(vm));
                assert_eq!(up.admitted(), Some(vec![vm]));

                // A new interface of the name: the new socket has the same filter.
                ip(&["-n", &name, "link", "del", &a]);
                assert_eq!(up.check(), UplinkHealth::JustLost);
                ip(&[
                    "-n", &name, "link", "add", &a, "type", "veth", "peer", "name", &b,
                ]);
                ip(&["-n", &name, "link", "set", &a, "up"]);
                ip(&["-n", &name, "link", "set", &b, "up"]);
                assert!(up.rebind().unwrap());
                let peer = PacketSocket::open(&b).unwrap();
                let mut marker = 100u8;
                let mut gets = |to: MacAddr| -> bool {
                    marker += 1;
                    peer.send(&test_frame(to, MAC_B, marker)).unwrap();
                    let sock = up.socket().unwrap();
                    wait_for(&sock, marker, Duration::from_millis(300)).is_some()
                };
                assert!(gets(vm));
                assert!(!gets(foreign));
                up.release(vm);
                assert!(!gets(vm), "released");
                assert!(gets(MacAddr::BROADCAST));
                assert_eq!(up.admitted(), Some(vec![]));
            },
        );
    }
}
