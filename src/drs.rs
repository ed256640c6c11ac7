//! Placement planners (pure): where the VMs of a host being emptied for maintenance go,
//! and which live migrations even out the hosts' loads, as vSphere DRS does.
//!
//! Both take a snapshot of the fabric (hosts with their capacity and reservations, VMs
//! with theirs) and return moves; they touch no socket. The orchestrator
//! ([`crate::host::fleet`]) carries the moves out, and each target's admission control
//! still has the last word when a VM arrives.
//!
//! A host's **load** is the memory it has reserved (VM memory plus the Table 9.1
//! overhead, arrivals in flight included) ÷ its capacity. vCPUs do not count on their
//! own: their cost in memory is already in the overhead, and every emulated host shares
//! the machine's cores, so moving a VM between emulated hosts changes no CPU contention;
//! a host declares no CPU capacity to divide by. The **imbalance** is the standard
//! deviation of the loads of the hosts that admit VMs (DRS's measure); a host in
//! maintenance neither gives nor takes.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// One host as the planners see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLoad {
    pub name: String,
    pub capacity_mb: u64,
    /// Everything reserved: the VMs here and the arrivals admitted.
    pub reserved_mb: u64,
    /// False for a host in maintenance: it takes no VM.
    pub admits: bool,
}

/// One VM the planners may move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmLoad {
    pub name: String,
    pub host: String,
    /// What crosses the vMotion network.
    pub memory_mb: u64,
    /// What it reserves on a host: memory plus overhead.
    pub reserved_mb: u64,
}

impl VmLoad {
    fn overhead_mb(&self) -> u64 {
        self.reserved_mb.saturating_sub(self.memory_mb)
    }
}

/// One live migration of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub memory_mb: u64,
    pub reserved_mb: u64,
}

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("unknown host {host}: the known hosts are {}", .known.join(", "))]
    UnknownHost { host: String, known: Vec<String> },
    #[error("cannot evacuate {host}: {vm} needs {need_mb} MB ({memory_mb} MB memory + {overhead_mb} MB overhead) and no other host has room ({room}); nothing was moved")]
    NowhereToGo {
        host: String,
        vm: String,
        need_mb: u64,
        memory_mb: u64,
        overhead_mb: u64,
        /// Each other host's free memory after the moves planned before this VM, e.g.
        /// "silo105: 200 MB free of 1024 MB".
        room: String,
    },
}

/// Standard deviation (population) of `loads`; 0 for none.
pub fn imbalance(loads: &[f64]) -> f64 {
    if loads.is_empty() {
        return 0.0;
    }
    let n = loads.len() as f64;
    let mean = loads.iter().sum::<f64>() / n;
    (loads.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / n).sqrt()
}

/// The planners' working copy of the hosts: name → (capacity, reserved, admits).
struct Hosts(BTreeMap<String, (u64, u64, bool)>);

impl Hosts {
    fn new(hosts: &[HostLoad]) -> Hosts {
        Hosts(
            hosts
                .iter()
                .map(|h| (h.name.clone(), (h.capacity_mb, h.reserved_mb, h.admits)))
                .collect(),
        )
    }

    fn free(&self, host: &str) -> u64 {
        self.0
            .get(host)
            .map(|&(c, r, _)| c.saturating_sub(r))
            .unwrap_or(0)
    }

    fn fits(&self, host: &str, need: u64) -> bool {
        self.0
            .get(host)
            .is_some_and(|&(c, r, admits)| admits && r.saturating_add(need) <= c)
    }

    fn apply(&mut self, m: &Move) {
        if let Some(h) = self.0.get_mut(&m.from) {
            h.1 = h.1.saturating_sub(m.reserved_mb);
        }
        if let Some(h) = self.0.get_mut(&m.to) {
            h.1 = h.1.saturating_add(m.reserved_mb);
        }
    }

    fn load(&self, host: &str) -> f64 {
        match self.0.get(host) {
            Some(&(c, r, _)) if c > 0 => r as f64 / c as f64,
            _ => 0.0,
        }
    }

    /// The hosts that count in the imbalance: those that admit VMs and have capacity.
    fn balanced(&self) -> Vec<&String> {
        self.0
            .iter()
            .filter(|(_, &(c, _, admits))| admits && c > 0)
            .map(|(n, _)| n)
            .collect()
    }

    fn imbalance(&self) -> f64 {
        let loads: Vec<f64> = self.balanced().iter().map(|h| self.load(h)).collect();
        imbalance(&loads)
    }

    fn loads(&self) -> BTreeMap<String, f64> {
        self.0.keys().map(|h| (h.clone(), self.load(h))).collect()
    }
}

fn unknown_host(hosts: &[HostLoad], host: &str) -> PlanError {
    let mut known: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    known.sort();
    PlanError::UnknownHost {
        host: host.to_string(),
        known,
    }
}

/// Where every VM of `from` goes so that `from` is empty, counting the moves already
/// planned against each target's room. Targets are the other hosts that admit VMs;
/// `from` itself is never one, whether it is in maintenance yet or not.
///
/// Biggest VMs first, each to the target left least loaded by it (which also spreads
/// the VMs, so that migrations into one target do not queue behind each other). If that
/// leaves a VM without room, an exhaustive search looks for any placement that fits
/// (there are few VMs on a host); if none exists, the error names the first VM that
/// found no room and every target's figures.
pub fn evacuate(hosts: &[HostLoad], vms: &[VmLoad], from: &str) -> Result<Vec<Move>, PlanError> {
    if !hosts.iter().any(|h| h.name == from) {
        return Err(unknown_host(hosts, from));
    }
    let mut leaving: Vec<&VmLoad> = vms.iter().filter(|v| v.host == from).collect();
    leaving.sort_by(|a, b| {
        b.reserved_mb
            .cmp(&a.reserved_mb)
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut work = Hosts::new(hosts);
    if let Some(h) = work.0.get_mut(from) {
        h.2 = false;
    }
    let targets: Vec<String> = work
        .0
        .iter()
        .filter(|(_, &(_, _, admits))| admits)
        .map(|(n, _)| n.clone())
        .collect();
    let mut moves = Vec::new();
    for vm in &leaving {
        let best = targets
            .iter()
            .filter(|t| work.fits(t, vm.reserved_mb))
            .min_by(|a, b| {
                let la = load_after(&work, a, vm.reserved_mb);
                let lb = load_after(&work, b, vm.reserved_mb);
                la.total_cmp(&lb).then_with(|| a.cmp(b))
            });
        let Some(to) = best else {
            // The greedy order failed; a placement may still exist.
            if let Some(found) = search(&Hosts::new(hosts), &targets, &leaving) {
                return Ok(found
                    .into_iter()
                    .zip(&leaving)
                    .map(|(to, vm)| move_of(vm, &to))
                    .collect());
            }
            let room = if targets.is_empty() {
                "no other host admits VMs".to_string()
            } else {
                targets
                    .iter()
                    .map(|t| {
                        let (c, _, _) = work.0[t];
                        format!("{t}: {} MB free of {c} MB", work.free(t))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(PlanError::NowhereToGo {
                host: from.to_string(),
                vm: vm.name.clone(),
                need_mb: vm.reserved_mb,
                memory_mb: vm.memory_mb,
                overhead_mb: vm.overhead_mb(),
                room,
            });
        };
        let m = move_of(vm, to);
        work.apply(&m);
        moves.push(m);
    }
    Ok(moves)
}

fn load_after(work: &Hosts, host: &str, need: u64) -> f64 {
    let (c, r, _) = work.0[host];
    (r + need) as f64 / c.max(1) as f64
}

fn move_of(vm: &VmLoad, to: &str) -> Move {
    Move {
        vm: vm.name.clone(),
        from: vm.host.clone(),
        to: to.to_string(),
        memory_mb: vm.memory_mb,
        reserved_mb: vm.reserved_mb,
    }
}

/// Most placements [`search`] tries before giving up (a host holds few VMs; this
/// bounds the time on a pathological one).
const SEARCH_BUDGET: u32 = 200_000;

/// Any assignment of `vms` (in order) to `targets` that fits every target's room.
fn search(hosts: &Hosts, targets: &[String], vms: &[&VmLoad]) -> Option<Vec<String>> {
    fn go<'a>(
        free: &mut BTreeMap<&'a str, u64>,
        targets: &'a [String],
        vms: &[&VmLoad],
        chosen: &mut Vec<String>,
        budget: &mut u32,
    ) -> bool {
        let Some(vm) = vms.get(chosen.len()) else {
            return true;
        };
        for t in targets {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            let f = free[t.as_str()];
            if f < vm.reserved_mb {
                continue;
            }
            free.insert(t, f - vm.reserved_mb);
            chosen.push(t.clone());
            if go(free, targets, vms, chosen, budget) {
                return true;
            }
            chosen.pop();
            free.insert(t, f);
        }
        false
    }
    let mut free: BTreeMap<&str, u64> = targets
        .iter()
        .map(|t| (t.as_str(), hosts.free(t)))
        .collect();
    let mut chosen = Vec::new();
    let mut budget = SEARCH_BUDGET;
    go(&mut free, targets, vms, &mut chosen, &mut budget).then_some(chosen)
}

/// A balancing plan: the moves in order, and the imbalance before and after them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalancePlan {
    pub moves: Vec<Move>,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    pub threshold: f64,
    /// Each host's load before and after the plan.
    pub loads_before: BTreeMap<String, f64>,
    pub loads_after: BTreeMap<String, f64>,
}

/// Gains smaller than this are rounding, not improvement.
const EPSILON: f64 = 1e-9;

/// Plans moves that bring the imbalance to `threshold` or below, greedily: at each step
/// the move that cuts the imbalance most per MB of memory moved, until the imbalance is
/// within the threshold or no move cuts it.
///
/// Properties (tested): a move is planned only where the target has room for the VM's
/// reservation after the moves before it; each VM moves at most once, so the plan ends
/// after at most one move per VM; each move strictly cuts the imbalance; the same
/// snapshot gives the same plan whatever its order (ties go to the first VM, then the
/// first target, by name).
pub fn balance(hosts: &[HostLoad], vms: &[VmLoad], threshold: f64) -> BalancePlan {
    let mut work = Hosts::new(hosts);
    let loads_before = work.loads();
    let imbalance_before = work.imbalance();
    let mut vms: Vec<&VmLoad> = vms
        .iter()
        .filter(|v| work.0.get(&v.host).is_some_and(|&(c, _, a)| a && c > 0))
        .collect();
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    let mut moved: BTreeSet<&str> = BTreeSet::new();
    let mut moves = Vec::new();
    let targets: Vec<String> = work.balanced().into_iter().cloned().collect();
    loop {
        let now = work.imbalance();
        if now <= threshold {
            break;
        }
        let mut best: Option<(f64, Move)> = None;
        for vm in vms.iter().filter(|v| !moved.contains(v.name.as_str())) {
            for to in targets.iter().filter(|t| **t != vm.host) {
                if !work.fits(to, vm.reserved_mb) {
                    continue;
                }
                let m = move_of(vm, to);
                work.apply(&m);
                let after = work.imbalance();
                work.apply(&Move {
                    from: m.to.clone(),
                    to: m.from.clone(),
                    ..m.clone()
                });
                let gain = now - after;
                if gain <= EPSILON {
                    continue;
                }
                let score = gain / vm.memory_mb.max(1) as f64;
                if best.as_ref().is_none_or(|(s, _)| score > *s) {
                    best = Some((score, m));
                }
            }
        }
        let Some((_, m)) = best else { break };
        work.apply(&m);
        if let Some(v) = vms.iter().find(|v| v.name == m.vm) {
            moved.insert(v.name.as_str());
        }
        moves.push(m);
    }
    BalancePlan {
        imbalance_after: work.imbalance(),
        loads_after: work.loads(),
        moves,
        imbalance_before,
        threshold,
        loads_before,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, cap: u64, reserved: u64) -> HostLoad {
        HostLoad {
            name: name.into(),
            capacity_mb: cap,
            reserved_mb: reserved,
            admits: true,
        }
    }

    fn vm(name: &str, host: &str, mem: u64, reserved: u64) -> VmLoad {
        VmLoad {
            name: name.into(),
            host: host.into(),
            memory_mb: mem,
            reserved_mb: reserved,
        }
    }

    /// Hosts with their reservations made of `vms`.
    fn fabric(caps: &[(&str, u64)], vms: &[VmLoad]) -> Vec<HostLoad> {
        caps.iter()
            .map(|&(n, c)| {
                let r = vms
                    .iter()
                    .filter(|v| v.host == n)
                    .map(|v| v.reserved_mb)
                    .sum();
                host(n, c, r)
            })
            .collect()
    }

    /// A small deterministic generator for the property tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A random small fabric: 2–4 hosts, 0–7 VMs placed where they fit.
    fn random_case(rng: &mut Rng) -> (Vec<HostLoad>, Vec<VmLoad>) {
        let n_hosts = 2 + rng.next(3) as usize;
        let names = ["h0", "h1", "h2", "h3"];
        let caps: Vec<(&str, u64)> = (0..n_hosts)
            .map(|i| (names[i], 400 + 100 * rng.next(8)))
            .collect();
        let mut used: BTreeMap<&str, u64> = caps.iter().map(|&(n, _)| (n, 0)).collect();
        let mut vms = Vec::new();
        for i in 0..rng.next(8) {
            let mem = [64, 128, 256][rng.next(3) as usize];
            let reserved = mem + 20 + rng.next(3) * 10;
            let (h, cap) = caps[rng.next(n_hosts as u64) as usize];
            if used[h] + reserved <= cap {
                *used.get_mut(h).unwrap() += reserved;
                vms.push(vm(&format!("v{i}"), h, mem, reserved));
            }
        }
        (fabric(&caps, &vms), vms)
    }

    /// Replays `moves` on `hosts`, checking every step fits and every VM moves once.
    fn replay(hosts: &[HostLoad], vms: &[VmLoad], moves: &[Move]) -> Hosts {
        let mut work = Hosts::new(hosts);
        let mut seen = BTreeSet::new();
        let mut at: BTreeMap<&str, &str> = vms
            .iter()
            .map(|v| (v.name.as_str(), v.host.as_str()))
            .collect();
        for m in moves {
            assert!(
                seen.insert(m.vm.clone()),
                "{} picked twice: {moves:?}",
                m.vm
            );
            assert_eq!(at[m.vm.as_str()], m.from, "{m:?}");
            assert_ne!(m.from, m.to);
            assert!(
                work.fits(&m.to, m.reserved_mb),
                "over-commits {}: {m:?} in {moves:?}",
                m.to
            );
            work.apply(m);
            at.insert(&m.vm, &m.to);
        }
        for (n, &(c, r, _)) in &work.0 {
            let before = hosts.iter().find(|h| &h.name == n).unwrap();
            assert!(r <= c.max(before.reserved_mb), "{n} over capacity");
        }
        work
    }

    #[test]
    fn evacuation_spreads_biggest_first_and_counts_planned_moves() {
        let vms = [
            vm("a", "h1", 256, 300),
            vm("b", "h1", 256, 300),
            vm("c", "h1", 64, 100),
            vm("x", "h2", 64, 100),
        ];
        let hosts = fabric(&[("h1", 1000), ("h2", 600), ("h3", 500)], &vms);
        let plan = evacuate(&hosts, &vms, "h1").unwrap();
        let to: Vec<(&str, &str)> = plan
            .iter()
            .map(|m| (m.vm.as_str(), m.to.as_str()))
            .collect();
        // a → h3 (0 → 0.6 beats h2's 0.17 → 0.67), b → h2 (0.67 beats h3's 1.2: no room
        // there anyway), c → h2 or h3: h2 is at 0.67 → 0.83, h3 at 0.6 → 0.8.
        assert_eq!(to, vec![("a", "h3"), ("b", "h2"), ("c", "h3")]);
        replay(&hosts, &vms, &plan);
    }

    #[test]
    fn evacuation_with_nowhere_to_go_names_the_vm_and_the_figures() {
        let vms = [
            vm("big", "h1", 512, 600),
            vm("small", "h1", 64, 100),
            vm("x", "h2", 64, 500),
        ];
        let hosts = fabric(&[("h1", 1000), ("h2", 1000)], &vms);
        let e = evacuate(&hosts, &vms, "h1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot evacuate h1: big needs 600 MB (512 MB memory + 88 MB overhead) and no other \
             host has room (h2: 500 MB free of 1000 MB); nothing was moved"
        );
        // A host in maintenance takes nothing.
        let mut hosts = fabric(&[("h1", 1000), ("h2", 1000), ("h3", 4000)], &vms);
        hosts[2].admits = false;
        assert!(evacuate(&hosts, &vms, "h1").is_err());
        hosts[2].admits = true;
        assert_eq!(evacuate(&hosts, &vms, "h1").unwrap().len(), 2);
        // Alone, nowhere at all.
        let one = fabric(&[("h1", 1000)], &vms[..1]);
        let e = evacuate(&one, &vms[..1], "h1").unwrap_err();
        assert!(e.to_string().contains("no other host admits VMs"), "{e}");
        let e = evacuate(&one, &vms[..1], "nope").unwrap_err();
        assert_eq!(e.to_string(), "unknown host nope: the known hosts are h1");
    }

    #[test]
    fn evacuation_finds_a_packing_the_greedy_order_misses() {
        // Worst-fit puts 300 on h2 (600 free) then 300 on h3 (500 free)... and the two
        // 250s no longer fit together anywhere; 300+300 on h2 and 250+250 on h3 does.
        let vms = [
            vm("a", "h1", 290, 300),
            vm("b", "h1", 290, 300),
            vm("c", "h1", 240, 250),
            vm("d", "h1", 240, 250),
        ];
        let hosts = fabric(&[("h1", 2000), ("h2", 600), ("h3", 500)], &vms);
        let plan = evacuate(&hosts, &vms, "h1").unwrap();
        assert_eq!(plan.len(), 4);
        replay(&hosts, &vms, &plan);
    }

    /// Whether some assignment of `from`'s VMs fits, by brute force.
    fn feasible(hosts: &[HostLoad], vms: &[VmLoad], from: &str) -> bool {
        let targets: Vec<&HostLoad> = hosts
            .iter()
            .filter(|h| h.name != from && h.admits)
            .collect();
        let leaving: Vec<&VmLoad> = vms.iter().filter(|v| v.host == from).collect();
        let n = targets.len();
        if n == 0 {
            return leaving.is_empty();
        }
        let total = n.pow(leaving.len() as u32);
        (0..total).any(|mut code| {
            let mut add = vec![0u64; n];
            for v in &leaving {
                add[code % n] += v.reserved_mb;
                code /= n;
            }
            targets
                .iter()
                .zip(&add)
                .all(|(t, a)| t.reserved_mb + a <= t.capacity_mb)
        })
    }

    #[test]
    fn evacuation_property_plans_iff_a_placement_exists_and_never_overcommits() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut planned = 0;
        for _ in 0..3000 {
            let (hosts, vms) = random_case(&mut rng);
            let from = hosts[rng.next(hosts.len() as u64) as usize].name.clone();
            match evacuate(&hosts, &vms, &from) {
                Ok(plan) => {
                    planned += 1;
                    let work = replay(&hosts, &vms, &plan);
                    let left = vms.iter().filter(|v| v.host == from).count();
                    assert_eq!(plan.len(), left, "every VM leaves");
                    assert_eq!(work.0[&from].1, 0, "{from} empty");
                    assert_eq!(
                        plan,
                        evacuate(&hosts, &vms, &from).unwrap(),
                        "deterministic"
                    );
                }
                Err(e) => {
                    assert!(matches!(e, PlanError::NowhereToGo { .. }));
                    assert!(
                        !feasible(&hosts, &vms, &from),
                        "refused a feasible case: {hosts:?} {vms:?}"
                    );
                }
            }
        }
        assert!(planned > 1000, "the cases exercise plans: {planned}");
    }

    #[test]
    fn six_vms_on_one_of_four_hosts_are_spread_under_the_threshold() {
        let vms: Vec<VmLoad> = (0..6)
            .map(|i| vm(&format!("vm{i}"), "h1", 128, 300))
            .collect();
        let hosts = fabric(
            &[("h1", 2048), ("h2", 2048), ("h3", 2048), ("h4", 2048)],
            &vms,
        );
        let plan = balance(&hosts, &vms, 0.1);
        assert!(plan.imbalance_before > 0.38, "{plan:?}");
        // 2-2-1-1 is as even as six equal VMs get on four hosts: four moves, loads
        // 0.29, 0.29, 0.15, 0.15, a standard deviation of 0.073.
        assert!((plan.imbalance_after - 0.0732).abs() < 1e-3, "{plan:?}");
        assert_eq!(plan.moves.len(), 4, "{plan:?}");
        // A stricter threshold cannot be met: the same four moves, then no move helps.
        assert_eq!(balance(&hosts, &vms, 0.05).moves, plan.moves);
        // Ties go to the first VM and the first target by name.
        assert_eq!(
            (plan.moves[0].vm.as_str(), plan.moves[0].to.as_str()),
            ("vm0", "h2")
        );
        replay(&hosts, &vms, &plan.moves);
    }

    #[test]
    fn balance_prefers_the_cut_per_mb_moved() {
        // h1 is overloaded with one big and one small VM: moving the small one cuts
        // less but per MB far more.
        let vms = [vm("big", "h1", 512, 600), vm("small", "h1", 64, 100)];
        let hosts = fabric(&[("h1", 1000), ("h2", 1000)], &vms);
        let plan = balance(&hosts, &vms, 0.0);
        assert_eq!(plan.moves[0].vm, "small");
        assert!(plan.imbalance_after < plan.imbalance_before);
    }

    #[test]
    fn balance_within_the_threshold_moves_nothing_and_maintenance_hosts_are_left_out() {
        let vms = [vm("a", "h1", 64, 100), vm("b", "h2", 64, 100)];
        let hosts = fabric(&[("h1", 1000), ("h2", 1000)], &vms);
        let plan = balance(&hosts, &vms, 0.1);
        assert!(plan.moves.is_empty());
        assert_eq!(plan.imbalance_before, 0.0);
        let vms = [vm("a", "h1", 64, 500), vm("b", "h1", 64, 400)];
        let mut hosts = fabric(&[("h1", 1000), ("h2", 1000), ("h3", 1000)], &vms);
        hosts[1].admits = false;
        let plan = balance(&hosts, &vms, 0.0);
        assert!(plan.moves.iter().all(|m| m.to == "h3"), "{plan:?}");
    }

    #[test]
    fn balance_property_fits_terminates_cuts_each_step_and_is_deterministic() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for case in 0..3000 {
            let (hosts, vms) = random_case(&mut rng);
            let threshold = [0.0, 0.05, 0.2][case % 3];
            let plan = balance(&hosts, &vms, threshold);
            // Terminates: at most one move per VM.
            assert!(plan.moves.len() <= vms.len());
            replay(&hosts, &vms, &plan.moves);
            // Each step cuts the imbalance.
            let mut work = Hosts::new(&hosts);
            let mut last = work.imbalance();
            assert!((last - plan.imbalance_before).abs() < 1e-12);
            for m in &plan.moves {
                work.apply(m);
                let now = work.imbalance();
                assert!(now < last, "a move that does not help: {m:?}");
                last = now;
            }
            assert!((last - plan.imbalance_after).abs() < 1e-12);
            // Stops only within the threshold, or when no unmoved VM's move helps.
            if plan.imbalance_after > threshold {
                let moved: BTreeSet<&str> = plan.moves.iter().map(|m| m.vm.as_str()).collect();
                for v in vms.iter().filter(|v| !moved.contains(v.name.as_str())) {
                    for t in hosts.iter().filter(|t| t.name != v.host) {
                        if !work.fits(&t.name, v.reserved_mb) {
                            continue;
                        }
                        let mut w = Hosts::new(&hosts);
                        for m in &plan.moves {
                            w.apply(m);
                        }
                        w.apply(&move_of(v, &t.name));
                        assert!(
                            w.imbalance() >= last - EPSILON,
                            "a helpful move was left: {v:?} -> {}",
                            t.name
                        );
                    }
                }
            }
            // Deterministic, whatever order the snapshot lists things in.
            let mut rh = hosts.clone();
            rh.reverse();
            let mut rv = vms.clone();
            rv.reverse();
            assert_eq!(balance(&rh, &rv, threshold).moves, plan.moves);
        }
    }

    #[test]
    fn imbalance_is_the_standard_deviation() {
        assert_eq!(imbalance(&[]), 0.0);
        assert_eq!(imbalance(&[0.5, 0.5]), 0.0);
        assert!((imbalance(&[0.0, 1.0]) - 0.5).abs() < 1e-12);
        assert!((imbalance(&[0.2, 0.4, 0.6]) - (0.08f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
