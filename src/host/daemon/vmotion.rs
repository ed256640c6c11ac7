//! The host's vMotion ends: an outgoing migration asked for over the control socket,
//! and incoming connections on the vMotion listener. The engine moves the memory; this
//! keeps the VM's slot, events and disk lock in step with it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::announcer::start_announce;
use super::hooks::{publish_progress, SourceSide, TargetSide};
use super::{chain, rss_kib, Host};
use crate::clock::unix_micros;
use crate::control::Progress;
use crate::events::Event;
use crate::host::api::{HostApiError, MigrateOptions};
use crate::migration::tls::{self, Protection, Rejection};
use crate::migration::{self, Cancel, ErrorKind, MigrationConfig, Step};

impl Host {
    pub(super) fn migration_config(&self, o: &MigrateOptions) -> MigrationConfig {
        let mut cfg = self.cfg.migration.clone();
        if let Some(ms) = o.downtime_ms {
            cfg.downtime_target = Duration::from_millis(ms);
        }
        if let Some(r) = o.max_rounds {
            cfg.max_rounds = r;
        }
        if let Some(p) = o.on_no_convergence {
            cfg.on_no_convergence = p;
        }
        if let Some(b) = o.bandwidth_mbps {
            cfg.bandwidth_limit = Some(b.saturating_mul(1_000_000) / 8);
        }
        if let Some(on) = o.auto_converge {
            cfg.auto_converge = on;
        }
        if let Some(ms) = o.max_downtime_ms {
            // The CLI refuses 0; a raw request asking for it gets the smallest guard.
            cfg.max_downtime = Duration::from_millis(ms.max(1));
        }
        cfg
    }

    pub(super) async fn migrate(
        self: Arc<Self>,
        name: String,
        target: String,
        target_addr: SocketAddr,
        options: MigrateOptions,
        progress: Progress,
    ) -> Result<migration::MigrationSummary, HostApiError> {
        let cfg = self.migration_config(&options);
        let cancel = Cancel::new();
        let shared = self
            .lock_inv()
            .start_migration(&name, &target, cancel.clone())?
            .shared
            .clone();
        self.events.emit_now(Event::MigrationStarted {
            vm: name.clone(),
            from: self.cfg.name.clone(),
            to: target.clone(),
        });
        let mode = options.encryption.unwrap_or(self.cfg.vmotion.encryption);
        let tls = self.cfg.vmotion.tls.as_deref();
        // Nothing of the VM crosses before the target has proven who it is.
        let (stream, protection) =
            match tls::connect(target_addr, &target, mode, tls, cfg.io_timeout).await {
                Ok(s) => s,
                Err(error) => {
                    self.lock_inv().migration_failed(&name);
                    let e = HostApiError::Unreachable {
                        error,
                        vm: name.clone(),
                        host: self.cfg.name.clone(),
                    };
                    self.events.emit_now(Event::MigrationFailed {
                        vm: name,
                        host: self.cfg.name.clone(),
                        step: Some(migration::Step::PreCheck),
                        error: e.to_string(),
                        vm_running: true,
                    });
                    return Err(e);
                }
            };
        tracing::info!(vm = %name, to = %target, vmotion = %protection, "vMotion stream open");
        let mut hooks = SourceSide {
            shared: shared.clone(),
            datastore: self.datastore.clone(),
            host: self.cfg.name.clone(),
            pause: self.pause.clone(),
            events: self.events.clone(),
            lock_error: None,
        };
        let vm = shared.vm.clone();
        let events = self.events.clone();
        let host_name = self.cfg.name.clone();
        let mut report = |p: migration::Progress| {
            publish_progress(&events, &host_name, &name, &p);
            progress.send(&p);
        };
        let result =
            migration::migrate_out_cancellable(vm, stream, &cfg, &mut hooks, &mut report, &cancel)
                .await;
        let lock_error = hooks.lock_error.take();
        drop(hooks);
        let mut inv = self.lock_inv();
        match result {
            Ok(mut summary) => {
                summary.transport = protection.to_string();
                // Step 6: the VM runs on the target; free it here.
                let entry = self.uninstall(&mut inv, &name);
                drop(inv);
                // The target holds the VM's claims now. Give up ours at once: a thread
                // of ours may keep the VM's state alive a little longer, and a claim
                // still held here would refuse a destroy-and-create on the target.
                shared
                    .claims
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                drop(shared);
                drop(entry);
                self.events.emit_now(Event::MigrationDone {
                    vm: name.clone(),
                    from: self.cfg.name.clone(),
                    to: target,
                    rounds: summary.rounds,
                    downtime_us: summary.downtime_us,
                    total_ms: summary.total_ms,
                    pages_pulled: summary.pages_pulled,
                    converged: summary.converged,
                });
                // The migration's buffers went back to the allocator; give them back
                // to the kernel too, so the daemon's size shows what it holds.
                crate::sys::trim_heap();
                self.events.emit_now(Event::VmMemoryFreed {
                    vm: name,
                    host: self.cfg.name.clone(),
                    rss_kib: rss_kib(),
                });
                Ok(summary)
            }
            Err(e) => {
                let running = shared.vm.is_running();
                self.events.emit_now(Event::MigrationFailed {
                    vm: name.clone(),
                    host: self.cfg.name.clone(),
                    step: Some(e.step),
                    error: e.kind.to_string(),
                    vm_running: running,
                });
                if running {
                    let mut reannounce = None;
                    if let Some(entry) = inv.migration_failed(&name) {
                        // Past the quiesce the target may have announced the VM before
                        // it failed: the switch then sends the VM's frames there. Pull
                        // them back at once instead of waiting for a client's ARP.
                        if !matches!(e.step, Step::PreCheck | Step::PreCopy) {
                            reannounce = Some((entry.handles(), entry.announce));
                        }
                    }
                    drop(inv);
                    // A target that resumed it may have written its name into the
                    // VM's claims: they name this host again.
                    if reannounce.is_some() {
                        let mut claims = shared.claims.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(c) = claims.as_mut() {
                            if let Err(err) = self.datastore.move_claims(c, &self.cfg.name) {
                                tracing::warn!(vm = %name, error = %chain(&err),
                                    "claims keep naming the target");
                            }
                        }
                    }
                    if let Some((handles, kind)) = reannounce {
                        // Past the quiesce, the VM stopped here and runs again; its
                        // announces from here are `announce_sent` events of this host.
                        self.events.emit_now(Event::VmResumed {
                            vm: name.clone(),
                            host: self.cfg.name.clone(),
                            after_failure: true,
                        });
                        start_announce(&self, handles, kind);
                    }
                    if matches!(e.kind, ErrorKind::Cancelled) {
                        return Err(HostApiError::Cancelled {
                            vm: name,
                            step: e.step,
                            host: self.cfg.name.clone(),
                        });
                    }
                    Err(HostApiError::FailedKeptHere {
                        error: e,
                        vm: name,
                        host: self.cfg.name.clone(),
                    })
                } else if let Some(lock_err) = lock_error {
                    // Nobody holds the disk, yet it cannot be locked here: the VM stays
                    // stopped (memory kept) rather than run without its lock.
                    let problem = format!(
                        "stopped after a failed migration: its disk lock cannot be retaken \
                         ({lock_err}); fix the datastore, then run `vfabric vm start {name}`"
                    );
                    inv.migration_failed_stopped(&name, problem.clone());
                    tracing::error!(vm = %name, host = %self.cfg.name, error = %e,
                        lock_error = %lock_err, t_us = unix_micros(),
                        "VM STOPPED: migration failed and the disk lock cannot be retaken");
                    Err(HostApiError::Other(format!(
                        "{e}; {name} is {problem} (on {})",
                        self.cfg.name
                    )))
                } else {
                    // The target took the disk lock: the VM lives there now.
                    let entry = self.uninstall(&mut inv, &name);
                    drop(inv);
                    drop(entry);
                    Err(HostApiError::FailedTakenOver {
                        error: e,
                        vm: name,
                        target,
                    })
                }
            }
        }
    }

    /// Counts a connection refused before authentication; the log hears of it at DEBUG
    /// only, and the event stream in the periodic summary.
    pub(super) fn refused(&self, peer: SocketAddr, why: Rejection, detail: &str) {
        self.rejections.record(why);
        tracing::debug!(peer = %peer, reason = why.as_str(), detail, "vMotion connection refused");
    }

    /// One incoming vMotion connection: authenticate it within the handshake deadline,
    /// then run the migration. `_slot` holds one of the incoming-connection slots.
    pub(super) async fn incoming(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        _slot: OwnedSemaphorePermit,
    ) {
        let sec = &self.cfg.vmotion;
        let accepted = tokio::time::timeout(
            sec.handshake_timeout,
            tls::accept(stream, sec.encryption, sec.tls.as_deref()),
        )
        .await;
        let (stream, protection) = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err((why, detail))) => return self.refused(peer, why, &detail),
            Err(_) => return self.refused(peer, Rejection::Deadline, "handshake deadline"),
        };
        let mut hooks = TargetSide {
            host: self.clone(),
            name: None,
            disk: None,
            claims: None,
            resumed: false,
            admitted: None,
        };
        let cfg = self.cfg.migration.clone();
        match migration::migrate_in(stream, &cfg, &mut hooks).await {
            Ok((vm, summary)) => {
                tracing::debug!(peer = %peer, "incoming migration from this peer complete");
                self.events.emit_now(Event::MigrationIncomingDone {
                    vm: vm.config().name.clone(),
                    host: self.cfg.name.clone(),
                    downtime_us: summary.downtime_us,
                    transport: protection.to_string(),
                });
            }
            // A plaintext peer that never got through the pre-check is as anonymous as
            // one refused at the handshake.
            Err(e)
                if protection == Protection::Plaintext
                    && e.step == migration::Step::PreCheck
                    && hooks.name.is_none() =>
            {
                self.refused(peer, Rejection::Garbage, &e.to_string())
            }
            Err(e) => {
                tracing::debug!(peer = %peer, "incoming migration from this peer failed");
                self.events.emit_now(Event::MigrationIncomingFailed {
                    host: self.cfg.name.clone(),
                    error: e.to_string(),
                    transport: protection.to_string(),
                });
            }
        }
    }
}
