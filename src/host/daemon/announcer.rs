//! Step 5's announce: RARP (or GARP) frames for a VM that now runs here, on the
//! schedule, from a thread of their own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Host, VmShared};
use crate::clock::unix_micros;
use crate::events::Event;
use crate::migration::announce::{self, Announce};

/// Handles returned by [`Host::install`], for the announcer.
pub(super) struct VmEntryHandles {
    pub(super) shared: Arc<VmShared>,
    pub(super) first_announce: Arc<AtomicU64>,
}

/// Step 5's announce: the first frame goes out now, the rest on the schedule.
pub(super) fn start_announce(host: &Arc<Host>, handles: Arc<VmEntryHandles>, kind: Announce) {
    let (name, mac, ip) = {
        let c = handles.shared.vm.config();
        (c.name.clone(), c.mac, c.ip)
    };
    let Some(frame) = announce::frame(&kind, mac, ip) else {
        tracing::info!(vm = %name, "announce disabled");
        return;
    };
    let Some(uplink) = host.uplink.clone() else {
        tracing::info!(vm = %name, "no uplink: announce skipped");
        return;
    };
    let schedule = host.cfg.schedule.0.clone();
    let host_name = host.cfg.name.clone();
    let events = host.events.clone();
    let start = Instant::now();
    // The schedule holds the VM only weakly: a VM that leaves within it (its frames
    // stop then anyway) takes its memory with it at once, not at the schedule's end.
    let vm = Arc::downgrade(&handles.shared);
    let first_announce = handles.first_announce.clone();
    drop(handles);
    // False once the VM is gone from this host for good.
    let send = move |seq: usize| -> bool {
        let Some(shared) = vm.upgrade() else {
            return false;
        };
        // A VM that left (or is leaving) this host must not be announced from here: a
        // late frame would pull the switch back to this port, away from the VM.
        if !shared.vm.is_running() {
            return true;
        }
        drop(shared);
        // The timestamp is taken before the write: once written, the switch may have
        // moved the MAC before this thread runs again.
        let t = unix_micros();
        match uplink.send(&frame) {
            Ok(()) => {
                let _ = first_announce.compare_exchange(0, t, Ordering::AcqRel, Ordering::Relaxed);
                events.emit(
                    t,
                    Event::AnnounceSent {
                        vm: name.clone(),
                        host: host_name.clone(),
                        mac,
                        kind,
                        seq,
                    },
                );
            }
            Err(e) => tracing::warn!(vm = %name, error = %e, "announce send failed"),
        }
        true
    };
    let mut offsets: Vec<(usize, Duration)> = schedule.into_iter().enumerate().collect();
    // A frame due at once leaves on this thread, right after resume.
    if offsets.first().is_some_and(|(_, at)| at.is_zero()) {
        let _ = send(0);
        offsets.remove(0);
    }
    if offsets.is_empty() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            for (seq, at) in offsets {
                if let Some(wait) = at.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                if !send(seq) {
                    break;
                }
            }
        });
}
