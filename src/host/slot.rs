//! A host's inventory (pure): one [`Slot`] per VM name, moved through its lifecycle by
//! value, and the host's admission mode.
//!
//! Everything the host reserves is here: the VMs that run (or are leaving, or are stopped)
//! and the reservations of VMs still arriving, by creation or by an incoming migration.
//! Admission counts all of them under one lock, so two migrations into one host at once
//! cannot both take the last free megabytes. The daemon keeps its sockets, threads and
//! guest memory in the payload `V`; this module never touches them, so its rules are
//! tested without any.

use std::collections::BTreeMap;

use crate::host::admission::{self, Reservation};
use crate::host::api::{HostApiError, HostMode};
use crate::migration::announce::Announce;
use crate::migration::Cancel;

/// Where one VM is in its life on this host.
#[derive(Debug)]
pub enum Slot<V> {
    /// A coming migration of this VM is to be announced with `announce` (its
    /// orchestrator said so ahead of time); nothing is reserved yet.
    Expected { announce: Announce },
    /// Admitted, not running yet: a VM being created, or migrating in. Its reservation
    /// counts against the host from admission on.
    Incoming {
        reservation: Reservation,
        announce: Option<Announce>,
    },
    /// Runs here.
    Running { vm: V, reservation: Reservation },
    /// Runs here while it migrates to `to`; `cancel` stops that migration.
    MigratingOut {
        vm: V,
        reservation: Reservation,
        cancel: Cancel,
        to: String,
    },
    /// Stopped with its memory kept: its disk lock could not be retaken after a failed
    /// migration, and a VM never runs without its lock. `problem` says what to do.
    Stopped {
        vm: V,
        reservation: Reservation,
        problem: String,
    },
}

impl<V> Slot<V> {
    /// The name `vm list` shows.
    pub fn state_name(&self) -> &'static str {
        match self {
            Slot::Expected { .. } => "expected",
            Slot::Incoming { .. } => "incoming",
            Slot::Running { .. } => "running",
            Slot::MigratingOut { .. } => "migrating",
            Slot::Stopped { .. } => "no-disk-lock",
        }
    }

    /// The VM, if it is here (running, leaving or stopped).
    pub fn vm(&self) -> Option<&V> {
        match self {
            Slot::Running { vm, .. } | Slot::MigratingOut { vm, .. } | Slot::Stopped { vm, .. } => {
                Some(vm)
            }
            Slot::Expected { .. } | Slot::Incoming { .. } => None,
        }
    }

    /// Memory this slot holds on the host (none for `Expected`).
    pub fn reservation(&self) -> Option<Reservation> {
        match self {
            Slot::Expected { .. } => None,
            Slot::Incoming { reservation, .. }
            | Slot::Running { reservation, .. }
            | Slot::MigratingOut { reservation, .. }
            | Slot::Stopped { reservation, .. } => Some(*reservation),
        }
    }

    /// Why the VM is not running, if it is stopped.
    pub fn problem(&self) -> Option<&str> {
        match self {
            Slot::Stopped { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// Every slot of one host, and whether it admits VMs.
#[derive(Debug)]
pub struct Inventory<V> {
    host: String,
    capacity_mb: u64,
    mode: HostMode,
    slots: BTreeMap<String, Slot<V>>,
}

impl<V> Inventory<V> {
    pub fn new(host: &str, capacity_mb: u64) -> Inventory<V> {
        Inventory {
            host: host.to_string(),
            capacity_mb,
            mode: HostMode::Normal,
            slots: BTreeMap::new(),
        }
    }

    pub fn mode(&self) -> HostMode {
        self.mode
    }

    /// Enters or leaves maintenance mode; true if the mode changed. VMs already here or
    /// already admitted stay: entering only closes the door.
    pub fn set_mode(&mut self, mode: HostMode) -> bool {
        std::mem::replace(&mut self.mode, mode) != mode
    }

    /// Memory reserved on the host: every VM here and every admitted arrival.
    pub fn reserved_mb(&self) -> u64 {
        self.slots
            .values()
            .filter_map(Slot::reservation)
            .map(|r| r.total_mb())
            .sum()
    }

    /// The part of [`Self::reserved_mb`] held by arrivals not running yet.
    pub fn incoming_mb(&self) -> u64 {
        self.slots
            .values()
            .filter_map(|s| match s {
                Slot::Incoming { reservation, .. } => Some(reservation.total_mb()),
                _ => None,
            })
            .sum()
    }

    pub fn get(&self, name: &str) -> Option<&Slot<V>> {
        self.slots.get(name)
    }

    /// The VMs here (running, leaving or stopped), by name, with their slots.
    pub fn vms(&self) -> impl Iterator<Item = (&String, &Slot<V>)> {
        self.slots.iter().filter(|(_, s)| s.vm().is_some())
    }

    /// The VM `name` if it is here.
    pub fn vm(&self, name: &str) -> Option<&Slot<V>> {
        self.slots.get(name).filter(|s| s.vm().is_some())
    }

    /// The payload of VM `name` if it is here, to update its figures.
    pub fn vm_mut(&mut self, name: &str) -> Option<&mut V> {
        match self.slots.get_mut(name)? {
            Slot::Running { vm, .. } | Slot::MigratingOut { vm, .. } | Slot::Stopped { vm, .. } => {
                Some(vm)
            }
            Slot::Expected { .. } | Slot::Incoming { .. } => None,
        }
    }

    fn no_such_vm(&self, name: &str) -> HostApiError {
        HostApiError::NoSuchVm {
            vm: name.to_string(),
            host: self.host.clone(),
        }
    }

    /// Remembers how the next incoming migration of `name` is announced (None forgets
    /// it). A VM that is here already is not expected: nothing changes.
    pub fn expect(&mut self, name: &str, announce: Option<Announce>) {
        match (self.slots.get_mut(name), announce) {
            (None, Some(a)) => {
                self.slots
                    .insert(name.to_string(), Slot::Expected { announce: a });
            }
            (Some(Slot::Expected { .. }), None) => {
                self.slots.remove(name);
            }
            (Some(Slot::Expected { announce: old }), Some(a)) => *old = a,
            (Some(Slot::Incoming { announce: old, .. }), a) => *old = a,
            _ => {}
        }
    }

    /// Admits `name` needing `need`: the host is not in maintenance, no slot of that
    /// name holds memory here, and the room left after every reservation (arrivals
    /// included) fits it. On success the slot is `Incoming` and the memory reserved.
    pub fn admit(&mut self, name: &str, need: Reservation) -> Result<(), HostApiError> {
        if self.mode == HostMode::Maintenance {
            return Err(HostApiError::InMaintenance {
                host: self.host.clone(),
                vm: name.to_string(),
            });
        }
        let announce = match self.slots.get(name) {
            None => None,
            Some(Slot::Expected { announce }) => Some(*announce),
            Some(_) => {
                return Err(HostApiError::Exists {
                    vm: name.to_string(),
                    host: self.host.clone(),
                })
            }
        };
        admission::check_room_for(&self.host, self.capacity_mb, self.reserved_mb(), name, need)?;
        self.slots.insert(
            name.to_string(),
            Slot::Incoming {
                reservation: need,
                announce,
            },
        );
        Ok(())
    }

    /// An admitted arrival that will not come (a failed creation or incoming
    /// migration): its reservation and any announce choice go.
    pub fn abandon(&mut self, name: &str) {
        if matches!(self.slots.get(name), Some(Slot::Incoming { .. })) {
            self.slots.remove(name);
        }
    }

    /// An admitted arrival runs: `Incoming` → `Running`. `make` builds the VM's payload
    /// from the announce chosen for this arrival, if any.
    pub fn arrived(
        &mut self,
        name: &str,
        make: impl FnOnce(Option<Announce>) -> V,
    ) -> Result<&V, HostApiError> {
        match self.slots.remove(name) {
            Some(Slot::Incoming {
                reservation,
                announce,
            }) => {
                let vm = make(announce);
                self.slots
                    .insert(name.to_string(), Slot::Running { vm, reservation });
                Ok(self.slots[name].vm().expect("just inserted with a VM"))
            }
            other => {
                let state = other.as_ref().map(Slot::state_name).unwrap_or("absent");
                if let Some(s) = other {
                    self.slots.insert(name.to_string(), s);
                }
                Err(HostApiError::Other(format!(
                    "{name} cannot start on {}: it was not admitted ({state})",
                    self.host
                )))
            }
        }
    }

    /// `Running` → `MigratingOut` to `to`.
    pub fn start_migration(
        &mut self,
        name: &str,
        to: &str,
        cancel: Cancel,
    ) -> Result<&V, HostApiError> {
        let slot = match self.slots.remove(name) {
            Some(Slot::Running { vm, reservation }) => Slot::MigratingOut {
                vm,
                reservation,
                cancel,
                to: to.to_string(),
            },
            Some(s) => {
                let err = match &s {
                    Slot::MigratingOut { .. } => HostApiError::AlreadyMigrating(name.into()),
                    Slot::Stopped { .. } => HostApiError::Other(format!(
                        "VM {name} is stopped without its disk lock; `vfabric vm start {name}` first"
                    )),
                    _ => self.no_such_vm(name),
                };
                self.slots.insert(name.to_string(), s);
                return Err(err);
            }
            None => return Err(self.no_such_vm(name)),
        };
        self.slots.insert(name.to_string(), slot);
        Ok(self.slots[name].vm().expect("just inserted with a VM"))
    }

    /// The outgoing migration failed and the VM runs here again: `MigratingOut` →
    /// `Running`.
    pub fn migration_failed(&mut self, name: &str) -> Option<&V> {
        self.settle(name, None)
    }

    /// The outgoing migration failed and the VM cannot run here (no disk lock):
    /// `MigratingOut` → `Stopped`.
    pub fn migration_failed_stopped(&mut self, name: &str, problem: String) -> Option<&V> {
        self.settle(name, Some(problem))
    }

    fn settle(&mut self, name: &str, problem: Option<String>) -> Option<&V> {
        let Some(Slot::MigratingOut {
            vm, reservation, ..
        }) = self.slots.remove(name)
        else {
            return None;
        };
        let slot = match problem {
            None => Slot::Running { vm, reservation },
            Some(problem) => Slot::Stopped {
                vm,
                reservation,
                problem,
            },
        };
        self.slots.insert(name.to_string(), slot);
        self.slots[name].vm()
    }

    /// `vm start`: `Stopped` → `Running`, once `take_lock` has taken the disk lock.
    pub fn start_stopped<E>(
        &mut self,
        name: &str,
        take_lock: impl FnOnce(&V) -> Result<(), E>,
    ) -> Result<Result<&V, E>, HostApiError> {
        match self.slots.get(name) {
            Some(Slot::Stopped { vm, .. }) => {
                if let Err(e) = take_lock(vm) {
                    return Ok(Err(e));
                }
            }
            Some(Slot::Running { .. }) => {
                return Err(HostApiError::Other(format!(
                    "VM {name} is already running on {}",
                    self.host
                )))
            }
            Some(Slot::MigratingOut { .. }) => {
                return Err(HostApiError::Other(format!("VM {name} is migrating")))
            }
            _ => return Err(self.no_such_vm(name)),
        }
        let Some(Slot::Stopped {
            vm, reservation, ..
        }) = self.slots.remove(name)
        else {
            unreachable!("checked above");
        };
        self.slots
            .insert(name.to_string(), Slot::Running { vm, reservation });
        Ok(Ok(self.slots[name].vm().expect("running")))
    }

    /// The cancel of `name`'s outgoing migration.
    pub fn cancel_of(&self, name: &str) -> Result<Cancel, HostApiError> {
        match self.slots.get(name) {
            Some(Slot::MigratingOut { cancel, .. }) => Ok(cancel.clone()),
            Some(s) if s.vm().is_some() => Err(HostApiError::Other(format!(
                "{name} is not migrating from {} ({}): nothing to cancel",
                self.host,
                s.state_name()
            ))),
            _ => Err(self.no_such_vm(name)),
        }
    }

    /// Takes the VM off the host, whatever it was doing; its memory is free from now.
    pub fn remove(&mut self, name: &str) -> Option<V> {
        match self.slots.get(name)? {
            Slot::Expected { .. } | Slot::Incoming { .. } => None,
            _ => match self.slots.remove(name)? {
                Slot::Running { vm, .. }
                | Slot::MigratingOut { vm, .. }
                | Slot::Stopped { vm, .. } => Some(vm),
                Slot::Expected { .. } | Slot::Incoming { .. } => None,
            },
        }
    }

    /// Takes every VM off the host (shutdown).
    pub fn drain(&mut self) -> Vec<V> {
        let names: Vec<String> = self.vms().map(|(n, _)| n.clone()).collect();
        names.iter().filter_map(|n| self.remove(n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(mb: u64) -> Reservation {
        Reservation {
            memory_mb: mb,
            overhead_mb: 10,
        }
    }

    fn inv() -> Inventory<&'static str> {
        Inventory::new("h1", 1000)
    }

    #[test]
    fn arrivals_count_from_admission_so_two_cannot_share_the_last_room() {
        let mut i = inv();
        i.admit("a", r(590)).unwrap();
        assert_eq!(i.reserved_mb(), 600);
        assert_eq!(i.incoming_mb(), 600);
        // A second arrival, before the first runs: 600 + 410 > 1000.
        let e = i.admit("b", r(400)).unwrap_err();
        assert!(
            e.to_string()
                .contains("needs 410 MB (400 MB memory + 10 MB overhead), 400 MB free"),
            "{e}"
        );
        i.admit("c", r(390)).unwrap();
        assert_eq!(i.reserved_mb(), 1000);
        // Running or leaving, a VM keeps its reservation.
        i.arrived("a", |_| "vm-a").unwrap();
        i.start_migration("a", "h2", Cancel::new()).unwrap();
        assert_eq!(i.reserved_mb(), 1000);
        assert_eq!(i.incoming_mb(), 400);
        // A failed arrival frees its room.
        i.abandon("c");
        assert_eq!(i.reserved_mb(), 600);
        // A VM that left frees its room.
        assert_eq!(i.remove("a"), Some("vm-a"));
        assert_eq!(i.reserved_mb(), 0);
    }

    #[test]
    fn maintenance_refuses_arrivals_and_exit_readmits() {
        let mut i = inv();
        i.admit("a", r(90)).unwrap();
        i.arrived("a", |_| "vm-a").unwrap();
        assert!(i.set_mode(HostMode::Maintenance));
        assert!(!i.set_mode(HostMode::Maintenance));
        let e = i.admit("b", r(90)).unwrap_err();
        assert!(matches!(e, HostApiError::InMaintenance { .. }), "{e:?}");
        assert!(e.to_string().contains("maintenance mode"), "{e}");
        assert_eq!(i.reserved_mb(), 100);
        // VMs on the host may still leave.
        i.start_migration("a", "h2", Cancel::new()).unwrap();
        assert!(i.set_mode(HostMode::Normal));
        i.admit("b", r(90)).unwrap();
    }

    #[test]
    fn a_name_is_admitted_once() {
        let mut i = inv();
        i.admit("a", r(10)).unwrap();
        assert!(matches!(
            i.admit("a", r(10)),
            Err(HostApiError::Exists { .. })
        ));
        i.arrived("a", |_| "vm-a").unwrap();
        assert!(matches!(
            i.admit("a", r(10)),
            Err(HostApiError::Exists { .. })
        ));
        assert!(i.arrived("zz", |_| "x").is_err());
        assert!(i.get("zz").is_none(), "a refused arrival leaves no slot");
    }

    #[test]
    fn an_expected_announce_is_kept_until_arrival_and_dropped_with_a_failure() {
        let mut i = inv();
        i.expect("a", Some(Announce::None));
        assert_eq!(i.reserved_mb(), 0);
        assert!(i.vms().next().is_none());
        i.admit("a", r(10)).unwrap();
        let mut chosen = None;
        i.arrived("a", |a| {
            chosen = a;
            "vm-a"
        })
        .unwrap();
        assert_eq!(chosen, Some(Announce::None));
        // Expecting a VM that is here changes nothing.
        i.expect("a", Some(Announce::Rarp));
        assert_eq!(i.get("a").unwrap().state_name(), "running");

        i.expect("b", Some(Announce::Garp));
        i.admit("b", r(10)).unwrap();
        i.abandon("b");
        assert!(i.get("b").is_none(), "the choice was for one migration");
        i.expect("c", Some(Announce::Garp));
        i.expect("c", None);
        assert!(i.get("c").is_none());
    }

    #[test]
    fn migration_out_transitions() {
        let mut i = inv();
        i.admit("a", r(10)).unwrap();
        i.arrived("a", |_| "vm-a").unwrap();
        assert!(i.cancel_of("a").is_err());
        let c = Cancel::new();
        i.start_migration("a", "h2", c.clone()).unwrap();
        assert!(matches!(
            i.start_migration("a", "h2", Cancel::new()),
            Err(HostApiError::AlreadyMigrating(_))
        ));
        i.cancel_of("a").unwrap().cancel();
        assert!(c.is_cancelled());
        assert_eq!(i.migration_failed("a"), Some(&"vm-a"));
        assert_eq!(i.get("a").unwrap().state_name(), "running");
        i.start_migration("a", "h2", Cancel::new()).unwrap();
        i.migration_failed_stopped("a", "no lock".into());
        let s = i.get("a").unwrap();
        assert_eq!(
            (s.state_name(), s.problem()),
            ("no-disk-lock", Some("no lock"))
        );
        assert!(i.start_migration("a", "h2", Cancel::new()).is_err());
        let failed: Result<Result<&&str, &str>, _> = i.start_stopped("a", |_| Err("still no"));
        assert!(failed.unwrap().is_err());
        assert_eq!(i.get("a").unwrap().state_name(), "no-disk-lock");
        i.start_stopped::<()>("a", |_| Ok(())).unwrap().unwrap();
        assert_eq!(i.get("a").unwrap().state_name(), "running");
        assert_eq!(i.reserved_mb(), 20);
        assert_eq!(i.drain(), vec!["vm-a"]);
        assert_eq!(i.reserved_mb(), 0);
    }
}
