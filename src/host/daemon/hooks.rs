//! The daemon's side of the migration engine's hooks: the disk-lock hand-over on the
//! source, admission, the disk lock, the inventory and the announce on the target.

use std::sync::Arc;

use super::announcer::start_announce;
use super::{chain, Host, VmShared};
use crate::clock::unix_micros;
use crate::control;
use crate::events::{Event, EventBus};
use crate::guest::{Vm, VmConfig};
use crate::host::datastore::{ClaimKey, ClaimMode, Claims, Datastore, DatastoreError, DiskLock};
use crate::host::pause::PausePoints;
use crate::memory::GuestMemory;
use crate::migration::{self, PhaseWait, SourceHooks, Step, TargetHooks};
use crate::port::uplink::Uplink;
use crate::wire::MacAddr;

/// Publishes the engine's progress reports as events, stamped where they were made.
pub(super) fn publish_progress(events: &EventBus, host: &str, vm: &str, p: &migration::Progress) {
    use migration::Progress as P;
    let vm = vm.to_string();
    let (t_us, ev) = match *p {
        P::Round {
            round,
            pages_sent,
            dirty_pages,
            throughput_mbps,
            ..
        } => (
            unix_micros(),
            Event::MigrationRound {
                vm,
                round,
                pages_sent,
                dirty_pages,
                throughput_mbps,
            },
        ),
        P::Quiesced { t_us, dirty_pages } => (
            t_us,
            Event::VmQuiesced {
                vm,
                host: host.to_string(),
                dirty_pages,
            },
        ),
        P::Bitmap { bits } => (unix_micros(), Event::MigrationBitmap { vm, bits }),
        P::Pulled { pages } => (unix_micros(), Event::MigrationPulled { vm, pages }),
        // The target publishes its own resume, stamped by its clock.
        P::Resumed { .. } => return,
        // Live figures are for the CLI's progress line, four a second: not events. The
        // throttle and a forced stop-and-copy are (as `MigrationProgress`).
        P::Tick(_) => return,
        #[allow(unreachable_patterns)]
        ref other => (
            unix_micros(),
            Event::MigrationProgress {
                vm,
                progress: other.clone(),
            },
        ),
    };
    events.emit(t_us, ev);
}

/// The source's side of the disk-lock hand-over.
pub(super) struct SourceSide {
    pub(super) shared: Arc<VmShared>,
    pub(super) datastore: Arc<Datastore>,
    pub(super) host: String,
    pub(super) pause: PausePoints,
    pub(super) events: EventBus,
    /// Set when the disk lock could be neither retaken nor found held by another host.
    pub(super) lock_error: Option<String>,
}

impl SourceHooks for SourceSide {
    fn at_phase(&mut self, step: Step) -> PhaseWait {
        self.pause.at(step, &self.shared.vm.config().name)
    }

    fn quiesced(&mut self, vm: &Arc<Vm>) -> Result<(), String> {
        // A NIC reply that passed its running check before the quiesce may still be
        // writing guest memory: wait for it, so its write is in the final bitmap.
        drop(self.shared.nic.lock().unwrap_or_else(|p| p.into_inner()));
        // Step 3: the source gives up the disk so that the target can take it.
        self.shared.release_disk();
        self.events.emit_now(Event::DiskLockReleased {
            vm: vm.config().name.clone(),
            host: self.host.clone(),
        });
        Ok(())
    }

    fn reclaim(&mut self, vm: &Arc<Vm>) -> bool {
        let name = &vm.config().name;
        match self.datastore.lock(name, &self.host) {
            Ok(lock) => {
                *self.shared.disk.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
                self.events.emit_now(Event::DiskLockTaken {
                    vm: name.clone(),
                    host: self.host.clone(),
                });
                true
            }
            Err(e @ DatastoreError::Held { .. }) => {
                tracing::warn!(vm = %name, host = %self.host, error = %e,
                    "disk lock not retaken: the target owns the VM");
                false
            }
            Err(e) => {
                // Nobody holds the disk, so the target never took over; but a VM never
                // runs without its lock: it stays stopped here, memory kept.
                let e = chain(&e);
                tracing::error!(vm = %name, host = %self.host, error = %e,
                    "disk lock cannot be retaken: the VM stays stopped");
                self.lock_error = Some(e);
                false
            }
        }
    }
}

/// The target's side: admission, disk lock, inventory and announce.
pub(super) struct TargetSide {
    pub(super) host: Arc<Host>,
    pub(super) name: Option<String>,
    pub(super) disk: Option<DiskLock>,
    /// The incoming VM's claims, shared with the source until the move ends.
    pub(super) claims: Option<Claims>,
    pub(super) resumed: bool,
    /// The incoming VM's MAC, admitted by the uplink's filter from admission on, so
    /// that its frames reach it the moment it resumes.
    pub(super) admitted: Option<MacAdmitted>,
}

/// Frames for a MAC pass the host's uplink filter while this lives.
pub(super) struct MacAdmitted(Arc<Uplink>, MacAddr);

impl MacAdmitted {
    fn new(host: &Host, mac: MacAddr) -> Option<MacAdmitted> {
        let u = host.uplink.clone()?;
        u.admit(mac);
        Some(MacAdmitted(u, mac))
    }
}

impl Drop for MacAdmitted {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

impl Drop for TargetSide {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            if !self.resumed {
                // The reservation goes, and with it an announce chosen for this
                // migration: it must not outlive it.
                self.host.lock_inv().abandon(name);
            }
        }
    }
}

impl TargetHooks for TargetSide {
    fn at_phase(&mut self, step: Step) -> PhaseWait {
        self.host
            .pause
            .at(step, self.name.as_deref().unwrap_or_default())
    }

    fn admit(&mut self, cfg: &VmConfig) -> Result<(), String> {
        let mut inv = self.host.lock_inv();
        self.host
            .admit(&mut inv, cfg)
            .map_err(|e| control::error_line(&e))?;
        // Fabric-wide: no other VM may hold this VM's name, MAC or IP. Its own claims,
        // held by the source, are shared until the move ends.
        let claims = self
            .host
            .datastore
            .claim(
                &cfg.name,
                &self.host.cfg.name,
                &ClaimKey::of_vm(&cfg.name, cfg.mac, cfg.ip),
                ClaimMode::Migrate,
            )
            .map_err(|e| {
                inv.abandon(&cfg.name);
                chain(&e)
            })?;
        self.claims = Some(claims);
        self.name = Some(cfg.name.clone());
        self.admitted = MacAdmitted::new(&self.host, cfg.mac);
        Ok(())
    }

    fn prepared_memory(&mut self, cfg: &VmConfig) -> Option<Arc<GuestMemory>> {
        self.host
            .lock_prepared()
            .take(&cfg.name, cfg.memory_bytes(), std::time::Instant::now())
    }

    fn before_resume(&mut self, vm: &Arc<Vm>) -> Result<(), String> {
        let name = &vm.config().name;
        let lock = self
            .host
            .datastore
            .lock(name, &self.host.cfg.name)
            .map_err(|e| chain(&e))?;
        self.host.events.emit_now(Event::DiskLockTaken {
            vm: name.clone(),
            host: self.host.cfg.name.clone(),
        });
        self.disk = Some(lock);
        Ok(())
    }

    fn resumed(&mut self, vm: &Arc<Vm>) {
        let resumed_t_us = unix_micros();
        let cfg = vm.config().clone();
        let host = &self.host;
        let mut inv = host.lock_inv();
        let Some(disk) = self.disk.take() else {
            return;
        };
        let mut claims = self.claims.take();
        if let Some(c) = claims.as_mut() {
            if let Err(e) = host.datastore.move_claims(c, &host.cfg.name) {
                tracing::warn!(vm = %cfg.name, error = %chain(&e),
                    "claims keep naming the previous host");
            }
        }
        let (handles, announce) = match host.install(&mut inv, vm.clone(), (disk, claims)) {
            Ok(h) => h,
            Err(e) => {
                // Not admitted here: cannot happen after `admit`; say so rather than run
                // a VM the inventory does not know.
                tracing::error!(vm = %cfg.name, error = %e, "resumed VM not installed");
                return;
            }
        };
        if let Some(e) = inv.vm_mut(&cfg.name) {
            e.resumed_t_us = Some(resumed_t_us);
        }
        drop(inv);
        self.resumed = true;
        host.events.emit(
            resumed_t_us,
            Event::VmResumed {
                vm: cfg.name.clone(),
                host: host.cfg.name.clone(),
                after_failure: false,
            },
        );
        start_announce(host, handles, announce);
        if host.cfg.test_exit_after_announce {
            tracing::error!(vm = %cfg.name, host = %host.cfg.name, t_us = unix_micros(),
                "--test-exit-after-announce: exiting before reporting the resume");
            std::process::exit(75);
        }
    }

    fn rolled_back(&mut self, vm: &Arc<Vm>) {
        let name = vm.config().name.clone();
        // Quiesced before it leaves the NIC: no reply from this copy after that.
        vm.quiesce();
        let mut inv = self.host.lock_inv();
        let entry = self.host.uninstall(&mut inv, &name);
        drop(inv);
        // Stopping releases the disk lock, for the source to retake; the claims go
        // back to the source alone.
        if let Some(e) = entry {
            e.shared.stop();
            e.shared
                .claims
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
        self.disk.take();
        self.host.events.emit_now(Event::MigrationRolledBack {
            vm: name.clone(),
            host: self.host.cfg.name.clone(),
        });
        self.host.events.emit_now(Event::DiskLockReleased {
            vm: name,
            host: self.host.cfg.name.clone(),
        });
    }
}
