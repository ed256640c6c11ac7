//! In-memory port (test adapter): a pair of channels standing in for a TAP, so the
//! switch daemon's data path is tested without root.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Port, PortError};

/// The switch's end of an in-memory link.
pub struct MemPort {
    name: String,
    vnet_hdr_len: usize,
    offload: bool,
    rx: Mutex<Receiver<Vec<u8>>>,
    /// A frame taken off the channel by `wait`, handed out by the next `try_recv`.
    pending: Mutex<Option<Vec<u8>>>,
    tx: Sender<Vec<u8>>,
    /// The "interface" MTU the peer set (0: none).
    mtu: Arc<AtomicU32>,
    /// The "interface" is operationally up (the peer's `set_link`).
    running: Arc<AtomicBool>,
}

/// The far end: what a test uses to inject frames and see what the switch sent.
/// Dropping it makes the port fail like a TAP whose namespace was deleted.
pub struct MemPeer {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    mtu: Arc<AtomicU32>,
    running: Arc<AtomicBool>,
}

/// A new link: the port for the switch and its peer for the test.
pub fn pair(name: &str, vnet_hdr_len: usize, offload: bool) -> (MemPort, MemPeer) {
    let (to_switch, from_peer) = mpsc::channel();
    let (to_peer, from_switch) = mpsc::channel();
    let mtu = Arc::new(AtomicU32::new(0));
    let running = Arc::new(AtomicBool::new(true));
    (
        MemPort {
            name: name.to_string(),
            vnet_hdr_len,
            offload,
            rx: Mutex::new(from_peer),
            pending: Mutex::new(None),
            tx: to_peer,
            mtu: mtu.clone(),
            running: running.clone(),
        },
        MemPeer {
            tx: to_switch,
            rx: from_switch,
            mtu,
            running,
        },
    )
}

impl MemPeer {
    /// Hands a frame to the switch as if the kernel had sent it.
    pub fn inject(&self, frame: &[u8]) {
        let _ = self.tx.send(frame.to_vec());
    }

    /// The next frame the switch sent to this port, if one comes within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Sets the MTU the port reports, as `ip link set … mtu` would (0: none).
    pub fn set_mtu(&self, mtu: u32) {
        self.mtu.store(mtu, Ordering::Relaxed);
    }

    /// Sets the link up or down, as `ip link set … up|down` would.
    pub fn set_link(&self, up: bool) {
        self.running.store(up, Ordering::Relaxed);
    }

    /// Every frame already sent to this port.
    pub fn drain(&self) -> Vec<Vec<u8>> {
        self.rx.try_iter().collect()
    }
}

impl Port for MemPort {
    fn link_state(&self) -> super::LinkState {
        super::LinkState {
            mtu: self.mtu(),
            running: Some(self.running.load(Ordering::Relaxed)),
        }
    }

    fn kind(&self) -> &'static str {
        "mem"
    }

    fn mtu(&self) -> Option<u32> {
        Some(self.mtu.load(Ordering::Relaxed)).filter(|&m| m > 0)
    }

    fn try_recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        // A thread blocked in `wait` holds `pending`: nothing is ready for us then.
        let pending = match self.pending.try_lock() {
            Ok(mut p) => p.take(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
            Err(std::sync::TryLockError::Poisoned(_)) => return Err(PortError::Gone),
        };
        let frame = match pending {
            Some(f) => f,
            None => match self.rx.lock().map_err(|_| PortError::Gone)?.try_recv() {
                Ok(f) => f,
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Disconnected) => return Err(PortError::Gone),
            },
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(Some(n))
    }

    fn wait(&self, timeout: Duration) -> Result<bool, PortError> {
        let mut pending = self.pending.lock().map_err(|_| PortError::Gone)?;
        if pending.is_some() {
            return Ok(true);
        }
        match self
            .rx
            .lock()
            .map_err(|_| PortError::Gone)?
            .recv_timeout(timeout)
        {
            Ok(f) => {
                *pending = Some(f);
                Ok(true)
            }
            Err(RecvTimeoutError::Timeout) => Ok(false),
            Err(RecvTimeoutError::Disconnected) => Err(PortError::Gone),
        }
    }

    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        self.tx.send(frame.to_vec()).map_err(|_| PortError::Gone)
    }

    fn vnet_hdr_len(&self) -> usize {
        self.vnet_hdr_len
    }

    fn offload(&self) -> bool {
        self.offload
    }

    fn ifname(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_both_ways_and_a_dropped_peer_is_gone() {
        let (port, peer) = pair("p", 0, false);
        peer.inject(&[1, 2, 3]);
        let mut buf = [0u8; 2];
        assert_eq!(port.recv(&mut buf, Duration::ZERO).unwrap(), Some(2));
        assert_eq!(buf, [1, 2]);
        assert!(port
            .recv(&mut buf, Duration::from_millis(1))
            .unwrap()
            .is_none());
        port.send(&[9]).unwrap();
        assert_eq!(peer.drain(), vec![vec![9]]);
        drop(peer);
        assert!(matches!(
            port.recv(&mut buf, Duration::ZERO),
            Err(PortError::Gone)
        ));
        assert!(matches!(port.send(&[1]), Err(PortError::Gone)));
    }
}
