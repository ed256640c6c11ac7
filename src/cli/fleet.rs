//! `vfabric hosts`, `vfabric host maintenance …` and `vfabric balance`: the verbs that
//! act on the whole fleet of host daemons (see `vfabric::host::fleet`).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use vfabric::drs::Move;
use vfabric::host::api::MigrateOptions;
use vfabric::host::api::{self, HostInfo};
use vfabric::host::client;
use vfabric::host::fleet::{self, Live, MoveReport, Snapshot};
use vfabric::migration::{human_us, Progress};

use super::CliError;

/// List the hosts: mode, capacity, reservations, load and VMs.
#[derive(Debug, Args)]
pub struct HostsArgs {
    /// Print a JSON array, one object per host.
    #[arg(long)]
    json: bool,
}

/// Enter or leave maintenance mode.
#[derive(Debug, Args)]
pub struct MaintenanceArgs {
    #[command(subcommand)]
    cmd: MaintenanceCmd,
}

#[derive(Debug, Subcommand)]
enum MaintenanceCmd {
    /// Stop admitting VMs and incoming migrations on HOST, then live-migrate every VM on
    /// it to the other hosts (placed by admission, memory overhead included). Refused
    /// before anything moves if some VM fits nowhere.
    Enter {
        /// The host to empty.
        host: String,
        /// Most migrations at once.
        #[arg(long, default_value_t = 2, value_parser = parse_parallel)]
        parallel: usize,
        /// Print the summary as one JSON object (no live progress).
        #[arg(long)]
        json: bool,
    },
    /// Admit VMs and incoming migrations on HOST again.
    Exit {
        host: String,
        #[arg(long)]
        json: bool,
    },
}

/// Even out the hosts' memory loads by live migration, as DRS does.
///
/// A host's load is its reserved memory (VM memory plus overhead) ÷ its capacity; the
/// imbalance is the standard deviation of the loads of the hosts not in maintenance.
/// The plan takes, step by step, the move that cuts the imbalance most per MB moved,
/// until the imbalance is within the threshold or no move helps.
#[derive(Debug, Args)]
pub struct BalanceArgs {
    /// Print the plan and stop.
    #[arg(long)]
    dry_run: bool,
    /// Imbalance (standard deviation of loads, 0 to 1) at or below which the fabric
    /// counts as balanced.
    #[arg(long, default_value_t = 0.1, value_parser = parse_threshold)]
    threshold: f64,
    /// Most migrations at once.
    #[arg(long, default_value_t = 2, value_parser = parse_parallel)]
    parallel: usize,
    /// Print the plan and the outcome as one JSON object (no live progress).
    #[arg(long)]
    json: bool,
}

fn parse_parallel(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=16).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of migrations from 1 to 16")),
    }
}

fn parse_threshold(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("{s:?} is not a number from 0 to 1")),
    }
}

fn load(h: &HostInfo) -> f64 {
    if h.capacity_mb == 0 {
        0.0
    } else {
        h.reserved_mb as f64 / h.capacity_mb as f64
    }
}

pub fn run_hosts(a: HostsArgs) -> Result<(), CliError> {
    let hosts = client::some_hosts()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&hosts)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<12} {:>8} {:>9} {:>9} {:>5} {:>7}  VMS",
        "NAME", "MODE", "CAP_MB", "RESV_MB", "INCOM_MB", "LOAD", "RSS_MB"
    );
    for h in &hosts {
        println!(
            "{:<10} {:<12} {:>8} {:>9} {:>9} {:>5.2} {:>7}  {}",
            h.name,
            h.mode.to_string(),
            h.capacity_mb,
            h.reserved_mb,
            h.incoming_mb,
            load(h),
            h.rss_kib / 1024,
            h.vms.join(",")
        );
    }
    let loads: Vec<f64> = hosts
        .iter()
        .filter(|h| h.mode == api::HostMode::Normal)
        .map(load)
        .collect();
    println!(
        "imbalance {:.3} (standard deviation of the loads of hosts not in maintenance)",
        vfabric::drs::imbalance(&loads)
    );
    Ok(())
}

pub fn run_maintenance(a: MaintenanceArgs) -> Result<(), CliError> {
    match a.cmd {
        MaintenanceCmd::Exit { host, json } => {
            let h = client::call(&host, api::MaintenanceExit {})?;
            if json {
                println!("{}", serde_json::to_string(&h)?);
            } else {
                println!(
                    "{} left maintenance mode: it admits VMs ({} VMs on it)",
                    h.name,
                    h.vms.len()
                );
            }
            Ok(())
        }
        MaintenanceCmd::Enter {
            host,
            parallel,
            json,
        } => {
            let mut board = Board::new(!json);
            let quiet = json;
            let ev = fleet::evacuate(
                &host,
                parallel,
                &MigrateOptions::default(),
                |plan| {
                    if !quiet {
                        println!(
                            "{host} is in maintenance mode: it admits no VM; moving {} VMs, \
                             at most {parallel} at once",
                            plan.len()
                        );
                    }
                },
                |live| board.update(live),
            )?;
            board.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&ev)?);
            } else {
                print_reports(&ev.moves);
                if ev.left.is_empty() {
                    println!("{host} is empty and in maintenance mode");
                }
            }
            check_reports(&ev.moves)?;
            if !ev.left.is_empty() {
                return Err(format!(
                    "{host} is in maintenance mode but still holds {}",
                    ev.left.join(", ")
                )
                .into());
            }
            Ok(())
        }
    }
}

pub fn run_balance(a: BalanceArgs) -> Result<(), CliError> {
    let plan = fleet::plan_balance(a.threshold)?;
    if !a.json {
        println!(
            "imbalance {:.3} -> {:.3} (threshold {:.3}): {} moves",
            plan.imbalance_before,
            plan.imbalance_after,
            plan.threshold,
            plan.moves.len()
        );
        for m in &plan.moves {
            println!(
                "  {:<10} {} -> {} ({} MB memory, {} MB reserved)",
                m.vm, m.from, m.to, m.memory_mb, m.reserved_mb
            );
        }
        for (h, before) in &plan.loads_before {
            let after = plan.loads_after.get(h).copied().unwrap_or(*before);
            println!("  load {h:<10} {before:.2} -> {after:.2}");
        }
    }
    let mut reports = Vec::new();
    if !a.dry_run && !plan.moves.is_empty() {
        let mut board = Board::new(!a.json);
        reports = fleet::run_moves(&plan.moves, a.parallel, &MigrateOptions::default(), |l| {
            board.update(l)
        });
        board.finish();
    }
    let now = Snapshot::take()?;
    let (hosts, _) = now.loads();
    let loads: Vec<f64> = hosts
        .iter()
        .filter(|h| h.admits && h.capacity_mb > 0)
        .map(|h| h.reserved_mb as f64 / h.capacity_mb as f64)
        .collect();
    let imbalance_now = vfabric::drs::imbalance(&loads);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "plan": plan,
                "dry_run": a.dry_run,
                "moves": reports,
                "imbalance_now": imbalance_now,
            }))?
        );
    } else {
        if !reports.is_empty() {
            print_reports(&reports);
        }
        println!("imbalance now {imbalance_now:.3}");
    }
    check_reports(&reports)
}

/// One error line if any move failed (after the table has said which and why).
fn check_reports(reports: &[MoveReport]) -> Result<(), CliError> {
    let failed: Vec<&MoveReport> = reports.iter().filter(|r| !r.ok).collect();
    if failed.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = failed
        .iter()
        .map(|r| format!("{} ({})", r.vm, r.error.as_deref().unwrap_or("failed")))
        .collect();
    Err(format!(
        "{} of {} migrations failed: {}",
        failed.len(),
        reports.len(),
        names.join("; ")
    )
    .into())
}

fn print_reports(reports: &[MoveReport]) {
    println!(
        "{:<10} {:<10} {:<10} {:>6} {:>10} {:>9}  DIGESTS",
        "VM", "FROM", "TO", "ROUNDS", "DOWNTIME", "TOTAL"
    );
    for r in reports {
        let digests = match (r.ok, r.digests_equal) {
            (false, _) => format!("FAILED: {}", r.error.as_deref().unwrap_or("")),
            (true, Some(true)) => "equal".to_string(),
            (true, Some(false)) => "DIFFER".to_string(),
            (true, None) => "not computed".to_string(),
        };
        println!(
            "{:<10} {:<10} {:<10} {:>6} {:>10} {:>9}  {}",
            r.vm,
            r.from,
            r.to,
            r.rounds.map(|n| n.to_string()).unwrap_or("-".into()),
            r.downtime_us.map(human_us).unwrap_or("-".into()),
            human_us(r.total_ms.saturating_mul(1000)),
            digests
        );
    }
}

/// Live progress: one line per VM, redrawn in place on a terminal (never into a pipe).
struct Board {
    on: bool,
    rows: Vec<(String, String)>,
    drawn: usize,
    last: Instant,
}

/// A running round's figures are redrawn at most this often.
const REDRAW_EVERY: Duration = Duration::from_millis(250);

impl Board {
    fn new(wanted: bool) -> Board {
        Board {
            on: wanted && std::io::stdout().is_terminal(),
            rows: Vec::new(),
            drawn: 0,
            last: Instant::now(),
        }
    }

    fn route(m: &Move) -> String {
        format!("{:<10} {} -> {}", m.vm, m.from, m.to)
    }

    fn set(&mut self, vm: &str, line: String, now: bool) {
        match self.rows.iter_mut().find(|(v, _)| v == vm) {
            Some(row) => row.1 = line,
            None => self.rows.push((vm.to_string(), line)),
        }
        if self.on && (now || self.last.elapsed() >= REDRAW_EVERY) {
            self.redraw();
        }
    }

    fn update(&mut self, live: Live) {
        match live {
            Live::Queued(m) => {
                let line = format!("{}  queued", Self::route(&m));
                self.set(&m.vm, line, true)
            }
            Live::Started(m) => {
                let line = format!("{}  pre-copy starting", Self::route(&m));
                self.set(&m.vm, line, true)
            }
            Live::Progress { vm, progress } => {
                let route = self
                    .rows
                    .iter()
                    .find(|(v, _)| *v == vm)
                    .and_then(|(_, l)| l.split("  ").next())
                    .unwrap_or(&vm)
                    .to_string();
                let (what, now) = match &progress {
                    Progress::Tick(t) => (
                        format!(
                            "round {}: {:.0} of {:.0} MiB sent, expected downtime {}",
                            t.round,
                            t.transferred_bytes as f64 / 1048576.0,
                            t.total_bytes as f64 / 1048576.0,
                            human_us(t.expected_downtime_us)
                        ),
                        false,
                    ),
                    Progress::Round { round, .. } => (format!("round {round} done"), true),
                    Progress::Quiesced { .. } => ("switch-over: quiesced".to_string(), true),
                    Progress::Bitmap { bits } => (format!("switch-over: {bits} dirty pages"), true),
                    Progress::Pulled { .. } => ("switch-over: pulled".to_string(), true),
                    Progress::Resumed { .. } => ("resumed on the target".to_string(), true),
                    _ => return,
                };
                self.set(&vm, format!("{route}  {what}"), now);
            }
            Live::Finished(r) => {
                let route = format!("{:<10} {} -> {}", r.vm, r.from, r.to);
                let line = if r.ok {
                    format!(
                        "{route}  done: {} rounds, downtime {}, {}",
                        r.rounds.unwrap_or(0),
                        r.downtime_us.map(human_us).unwrap_or_default(),
                        human_us(r.total_ms.saturating_mul(1000))
                    )
                } else {
                    format!(
                        "{route}  FAILED: {}",
                        r.error.as_deref().unwrap_or_default()
                    )
                };
                self.set(&r.vm, line, true);
            }
        }
    }

    fn redraw(&mut self) {
        let mut out = std::io::stdout().lock();
        if self.drawn > 0 {
            let _ = write!(out, "\x1b[{}A", self.drawn);
        }
        for (_, line) in &self.rows {
            let _ = writeln!(out, "\r\x1b[2K  {line}");
        }
        let _ = out.flush();
        self.drawn = self.rows.len();
        self.last = Instant::now();
    }

    /// The last state stays on screen above the summary.
    fn finish(&mut self) {
        if self.on && !self.rows.is_empty() {
            self.redraw();
        }
    }
}
