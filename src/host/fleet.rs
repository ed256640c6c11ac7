//! Fleet operations (adapter): maintenance-mode evacuation and load balancing over every
//! host daemon in the runtime directory.
//!
//! The plans come from the pure planners ([`crate::drs`]); each move is one
//! [`client::migrate`] (the same orchestration as `vfabric migrate`), at most `parallel`
//! at once, each VM in at most one of them. A move that fails leaves its VM where it was
//! (the migration engine's guarantee) and the others carry on. The targets' admission
//! has the last word: it counts the reservations of migrations in flight, so no host is
//! over-committed even if the fabric changed since the plan.

use std::collections::{BTreeSet, VecDeque};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::drs::{self, BalancePlan, HostLoad, Move, PlanError, VmLoad};
use crate::host::api::{self, HostInfo, HostMode, MigrateOptions, VmInfo};
use crate::host::client::{self, ClientError, MigrationPlan};
use crate::migration::Progress;

/// Errors of a fleet operation that stop it before anything moves.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("--parallel must be at least 1")]
    Parallel,
}

/// Every host and every VM, as their daemons report them now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub hosts: Vec<HostInfo>,
    pub vms: Vec<VmInfo>,
}

impl Snapshot {
    /// Asks every host daemon.
    pub fn take() -> Result<Snapshot, ClientError> {
        let hosts = client::some_hosts()?;
        let mut vms = Vec::new();
        for h in &hosts {
            // A host that went away between the two calls has no VMs to plan with.
            if let Ok(v) = client::call(&h.name, api::VmList {}) {
                vms.extend(v);
            }
        }
        Ok(Snapshot { hosts, vms })
    }

    /// The planners' view: every host (those in maintenance admit nothing), and the VMs
    /// that can move (running ones; a migrating or stopped VM stays where it is).
    pub fn loads(&self) -> (Vec<HostLoad>, Vec<VmLoad>) {
        let hosts = self
            .hosts
            .iter()
            .map(|h| HostLoad {
                name: h.name.clone(),
                capacity_mb: h.capacity_mb,
                reserved_mb: h.reserved_mb,
                admits: h.mode == HostMode::Normal,
            })
            .collect();
        let vms = self
            .vms
            .iter()
            .filter(|v| v.state == "running")
            .map(|v| VmLoad {
                name: v.name.clone(),
                host: v.host.clone(),
                memory_mb: v.memory_mb,
                reserved_mb: v.reserved_mb,
            })
            .collect();
        (hosts, vms)
    }

    fn host(&self, name: &str) -> Result<&HostInfo, ClientError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| ClientError::UnknownHost {
                name: name.to_string(),
                known: self.hosts.iter().map(|h| h.name.clone()).collect(),
            })
    }
}

/// How one move ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveReport {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// The VM runs on `to`; false: it stayed on `from` (or, as `error` says, elsewhere).
    pub ok: bool,
    pub rounds: Option<u32>,
    pub downtime_us: Option<u64>,
    /// From the start of the move (not of its wait in the queue) to its end, ms.
    pub total_ms: u64,
    /// The memory digests at quiesce on the source and at resume on the target are
    /// equal; None when the hosts do not compute them (or the move failed).
    pub digests_equal: Option<bool>,
    pub error: Option<String>,
}

/// What a fleet operation reports while its moves run.
#[derive(Debug, Clone)]
pub enum Live {
    /// The move waits for a free slot (or for the move that makes room on its target).
    Queued(Move),
    /// The move began.
    Started(Move),
    /// The source's engine reported progress on this VM.
    Progress { vm: String, progress: Progress },
    /// The move ended.
    Finished(MoveReport),
}

/// Runs `moves`, at most `parallel` at once, in plan order except that a move into a
/// host waits for the earlier moves out of that host (the plan counted on their room).
/// Each VM is taken by exactly one worker. `on` hears everything, on this thread.
pub fn run_moves(
    moves: &[Move],
    parallel: usize,
    options: &MigrateOptions,
    mut on: impl FnMut(Live),
) -> Vec<MoveReport> {
    for m in moves {
        on(Live::Queued(m.clone()));
    }
    if moves.is_empty() {
        return Vec::new();
    }
    let queue = Arc::new(Queue::new(moves));
    let (tx, rx) = mpsc::channel::<Live>();
    let workers: Vec<_> = (0..parallel.clamp(1, moves.len()))
        .map(|_| {
            let queue = queue.clone();
            let tx = tx.clone();
            let options = options.clone();
            std::thread::spawn(move || {
                while let Some((i, m)) = queue.next() {
                    let _ = tx.send(Live::Started(m.clone()));
                    let report = migrate_one(&m, &options, &tx);
                    queue.done(i);
                    let _ = tx.send(Live::Finished(report));
                }
            })
        })
        .collect();
    drop(tx);
    let mut reports = Vec::new();
    for live in rx {
        if let Live::Finished(r) = &live {
            reports.push(r.clone());
        }
        on(live);
    }
    for w in workers {
        let _ = w.join();
    }
    // In plan order, whatever order they finished in.
    reports.sort_by_key(|r| moves.iter().position(|m| m.vm == r.vm));
    reports
}

fn migrate_one(m: &Move, options: &MigrateOptions, tx: &mpsc::Sender<Live>) -> MoveReport {
    let t0 = Instant::now();
    let plan = MigrationPlan {
        vm: m.vm.clone(),
        to: m.to.clone(),
        announce: None,
        options: options.clone(),
    };
    let result = client::migrate(&plan, |step| {
        if let client::Step::Progress(p) = step {
            let _ = tx.send(Live::Progress {
                vm: m.vm.clone(),
                progress: p,
            });
        }
    });
    let total_ms = t0.elapsed().as_millis() as u64;
    match result {
        Ok(done) => {
            let s = done.summary;
            let digests_equal = (!s.memory_sha256_source.is_empty())
                .then(|| s.memory_sha256_source == s.memory_sha256_target);
            MoveReport {
                vm: m.vm.clone(),
                from: done.from,
                to: done.to,
                ok: true,
                rounds: Some(s.rounds),
                downtime_us: Some(s.downtime_us),
                total_ms,
                digests_equal,
                error: None,
            }
        }
        Err(e) => MoveReport {
            vm: m.vm.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            ok: false,
            rounds: None,
            downtime_us: None,
            total_ms,
            digests_equal: None,
            error: Some(crate::errors::chain(&e)),
        },
    }
}

/// The moves not yet taken, and which are running: a worker takes the first move whose
/// target no earlier unfinished move is leaving.
struct Queue {
    moves: Vec<Move>,
    state: Mutex<(VecDeque<usize>, BTreeSet<usize>)>,
    changed: Condvar,
}

impl Queue {
    fn new(moves: &[Move]) -> Queue {
        Queue {
            moves: moves.to_vec(),
            state: Mutex::new(((0..moves.len()).collect(), BTreeSet::new())),
            changed: Condvar::new(),
        }
    }

    /// The next move to run, or None when every move has been taken.
    fn next(&self) -> Option<(usize, Move)> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (pending, running) = &mut *st;
            if pending.is_empty() {
                return None;
            }
            if let Some(k) = ready(&self.moves, pending, running) {
                let i = pending.remove(k).expect("position is in range");
                running.insert(i);
                return Some((i, self.moves[i].clone()));
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn done(&self, i: usize) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .remove(&i);
        self.changed.notify_all();
    }
}

/// Which of the `pending` moves (by position in it) may start: the first whose target
/// no earlier move, pending or running, is still leaving.
fn ready(moves: &[Move], pending: &VecDeque<usize>, running: &BTreeSet<usize>) -> Option<usize> {
    pending.iter().position(|&i| {
        let to = &moves[i].to;
        let waits_on = |j: usize| j < i && moves[j].from == *to;
        !pending.iter().any(|&j| waits_on(j)) && !running.iter().any(|&j| waits_on(j))
    })
}

/// What `maintenance enter` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evacuation {
    pub host: String,
    /// The host was in maintenance mode already.
    pub was_in_maintenance: bool,
    pub moves: Vec<MoveReport>,
    /// VMs still on the host at the end (failed moves, VMs that could not move).
    pub left: Vec<String>,
}

/// How many times evacuation looks again for VMs that arrived on the host while it was
/// entering maintenance (migrations admitted just before the door closed).
const EVACUATION_PASSES: usize = 3;

/// `maintenance enter`: checks that every VM of `host` has somewhere to go, puts `host`
/// in maintenance mode (it admits nothing from then on), then moves its VMs away, at most
/// `parallel` at once. `on_plan` hears the plan before anything moves.
pub fn evacuate(
    host: &str,
    parallel: usize,
    options: &MigrateOptions,
    on_plan: impl FnOnce(&[Move]),
    mut on: impl FnMut(Live),
) -> Result<Evacuation, FleetError> {
    if parallel == 0 {
        return Err(FleetError::Parallel);
    }
    let snap = Snapshot::take()?;
    let was_in_maintenance = snap.host(host)?.mode == HostMode::Maintenance;
    // Refused here, before the host's mode changes: nowhere to go moves nothing.
    let (hosts, vms) = snap.loads();
    drs::evacuate(&hosts, &vms, host)?;
    client::call(host, api::MaintenanceEnter {})?;
    // The door is shut: plan again on the fabric as it is now.
    let snap = Snapshot::take()?;
    let (hosts, vms) = snap.loads();
    let plan = match drs::evacuate(&hosts, &vms, host) {
        Ok(p) => p,
        Err(e) => {
            if !was_in_maintenance {
                let _ = client::call(host, api::MaintenanceExit {});
            }
            return Err(e.into());
        }
    };
    on_plan(&plan);
    let mut tried: BTreeSet<String> = plan.iter().map(|m| m.vm.clone()).collect();
    let mut reports = run_moves(&plan, parallel, options, &mut on);
    for _ in 1..EVACUATION_PASSES {
        let snap = Snapshot::take()?;
        let (hosts, vms) = snap.loads();
        let late: Vec<VmLoad> = vms
            .into_iter()
            .filter(|v| v.host == host && !tried.contains(&v.name))
            .collect();
        if late.is_empty() {
            break;
        }
        let Ok(more) = drs::evacuate(&hosts, &late, host) else {
            break;
        };
        tried.extend(more.iter().map(|m| m.vm.clone()));
        reports.extend(run_moves(&more, parallel, options, &mut on));
    }
    let left = client::call(host, api::VmList {})?
        .into_iter()
        .map(|v| v.name)
        .collect();
    Ok(Evacuation {
        host: host.to_string(),
        was_in_maintenance,
        moves: reports,
        left,
    })
}

/// The balancing plan for the fabric as it is now.
pub fn plan_balance(threshold: f64) -> Result<BalancePlan, FleetError> {
    let snap = Snapshot::take()?;
    let (hosts, vms) = snap.loads();
    Ok(drs::balance(&hosts, &vms, threshold))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(vm: &str, from: &str, to: &str) -> Move {
        Move {
            vm: vm.into(),
            from: from.into(),
            to: to.into(),
            memory_mb: 64,
            reserved_mb: 100,
        }
    }

    #[test]
    fn a_move_into_a_host_waits_for_the_earlier_moves_out_of_it() {
        let moves = [
            mv("a", "h1", "h2"),
            mv("b", "h2", "h3"),
            mv("c", "h3", "h1"),
        ];
        let q = Queue::new(&moves);
        assert_eq!(q.next().unwrap().1.vm, "a");
        // b goes to h3, which nobody earlier leaves; c goes to h1, which a is leaving.
        assert_eq!(q.next().unwrap().1.vm, "b");
        {
            let st = q.state.lock().unwrap();
            assert_eq!(ready(&moves, &st.0, &st.1), None, "c waits for a");
        }
        q.done(0);
        assert_eq!(q.next().unwrap().1.vm, "c");
        assert!(q.next().is_none());
    }

    #[test]
    fn every_move_is_taken_once_by_concurrent_workers() {
        let moves: Vec<Move> = (0..50)
            .map(|i| {
                mv(
                    &format!("v{i}"),
                    &format!("h{}", i % 3),
                    &format!("h{}", (i + 1) % 3),
                )
            })
            .collect();
        let q = Arc::new(Queue::new(&moves));
        let taken = Arc::new(Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (q, taken) = (q.clone(), taken.clone());
                std::thread::spawn(move || {
                    while let Some((i, m)) = q.next() {
                        taken.lock().unwrap().push(m.vm);
                        q.done(i);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let mut t = taken.lock().unwrap().clone();
        assert_eq!(t.len(), 50);
        t.sort();
        t.dedup();
        assert_eq!(t.len(), 50, "a move was taken twice");
    }
}
