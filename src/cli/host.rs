//! `vfabric host`, `vfabric vm …` and `vfabric migrate`: the hypervisor daemon and the
//! verbs that talk to it over its control socket.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use vfabric::control;
use vfabric::guest::{Pattern, VmConfig, WorkloadConfig};
use vfabric::host::api::{self, HostMode, MigrateOptions, VmInfo};
use vfabric::host::client::{self, Migrated, MigrationPlan};
use vfabric::host::daemon::{self, HostConfig, VmotionSecurity};
use vfabric::migration::announce::{Announce, Schedule};
use vfabric::migration::tls::{Encryption, Tls};
use vfabric::migration::{
    human_us, MigrationConfig, MigrationSummary, NoConvergence, Progress, Tick,
    DEFAULT_MAX_DOWNTIME,
};
use vfabric::names;
use vfabric::pki;
use vfabric::wire::MacAddr;

use super::CliError;

/// Run the hypervisor daemon of one emulated host.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Example (in the host's namespace):\n  \
    ip netns exec vf-silo104 vfabric host --name silo104 --vmotion-addr 10.20.0.104:8000 \\\n    \
    --uplink vmnic0 --capacity-mb 4096 --datastore /var/lib/vfabric/datastore"
)]
pub struct HostArgs {
    #[command(subcommand)]
    cmd: Option<HostCmd>,
    /// Host name; also names the control socket (<run dir>/<name>.sock): 1 to 31 of
    /// a-z, 0-9 and '-', starting with a letter or digit.
    #[arg(long, required = true)]
    name: Option<String>,
    /// Address of the vMotion listener (TCP).
    #[arg(long, default_value = "0.0.0.0:8000")]
    vmotion_addr: SocketAddr,
    /// Interface the VMs' NICs use (a packet socket on it); omit to run VMs without network.
    #[arg(long)]
    uplink: Option<String>,
    /// Memory the host offers to VMs, MB (memory plus overhead per VM, from table 9.1).
    #[arg(long, default_value_t = 4096)]
    capacity_mb: u64,
    /// Shared datastore directory holding the VMs' disk files and locks.
    #[arg(long, default_value = "/var/lib/vfabric/datastore")]
    datastore: PathBuf,
    /// How an incoming VM is announced after it resumes: rarp, garp or none.
    #[arg(long, default_value_t = Announce::default())]
    announce: Announce,
    /// Announce schedule: offsets in ms after resume (QEMU's default).
    #[arg(long, default_value_t = Schedule::default())]
    announce_schedule: Schedule,
    /// Downtime target of outgoing migrations, ms.
    #[arg(long, default_value_t = MigrationConfig::default().downtime_target.as_millis() as u64,
        value_parser = positive::<u64>)]
    downtime_ms: u64,
    /// Pre-copy round limit of outgoing migrations.
    #[arg(long, default_value_t = MigrationConfig::default().max_rounds,
        value_parser = positive::<u32>)]
    max_rounds: u32,
    /// What an outgoing migration does when pre-copy does not converge: force-stop
    /// (or force) or abort.
    #[arg(long, default_value_t = MigrationConfig::default().on_no_convergence)]
    on_no_convergence: NoConvergence,
    /// Migration I/O timeout, ms: a peer silent for this long fails the migration.
    #[arg(long, default_value_t = MigrationConfig::default().io_timeout.as_millis() as u64,
        value_parser = positive::<u64>)]
    io_timeout_ms: u64,
    /// Back guest memory with transparent huge pages (fewer faults on bare metal; slower
    /// inside a VM whose hypervisor reclaims free memory).
    #[arg(long)]
    huge_pages: bool,
    /// Skip the memory digests (SHA-256 hash list at quiesce and at resume): they halve
    /// pre-copy throughput, though they do not lengthen the downtime. With them on, a
    /// migration succeeds only if the target's digest equals the source's.
    #[arg(long)]
    no_verify_memory: bool,
    /// Throttle a VM's vCPUs when pre-copy cannot otherwise converge (SDPS, QEMU's
    /// auto-converge): on or off. On by default: without it, a VM that dirties memory
    /// faster than the link carries can only be stunned for long or not moved at all.
    #[arg(long, default_value = "on", value_parser = parse_on_off)]
    auto_converge: bool,
    /// Stun guard, ms: a migration whose pre-copy ends without converging stops the VM
    /// only if the estimated downtime is within this (after throttling, with
    /// auto-converge); otherwise it aborts and the VM keeps running here.
    #[arg(long, default_value_t = DEFAULT_MAX_DOWNTIME.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_downtime_ms: u64,
    /// vMotion encryption: required (TLS 1.3, both hosts authenticated by the fabric CA),
    /// opportunistic (TLS when both ends can, plaintext with a host that has it
    /// disabled; never after a failed certificate check) or disabled (plaintext).
    #[arg(long, default_value = "required")]
    vmotion_encryption: Encryption,
    /// Directory of the fabric CA and host certificates (`vfabric pki init|issue`);
    /// default <run dir>/pki. This host uses ca.pem, <name>.pem and <name>.key.
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// An incoming vMotion connection must complete its TLS handshake (or, in plaintext,
    /// send its first byte) within this many ms.
    #[arg(long, default_value_t = 5000)]
    vmotion_handshake_ms: u64,
    /// Most incoming vMotion connections at once (handshaking or migrating); more are
    /// closed at once and counted in a periodic warning.
    #[arg(long, default_value_t = 16)]
    vmotion_max_incoming: usize,
    /// Serve the control API over TCP too, at [NETNS:]IP:PORT (off by default), for a CLI
    /// on another machine: TLS 1.3, this host's certificate, and only clients holding an
    /// operator certificate of the fabric CA (`vfabric pki issue-operator`). With NETNS
    /// the socket is opened in that namespace (the machine's management network).
    #[arg(long, value_name = "[NETNS:]IP:PORT")]
    control_listen: Option<vfabric::control::tls::ListenAddr>,
    /// A TCP control connection must complete its TLS handshake within this many ms.
    #[arg(long, default_value_t = vfabric::control::tls::DEFAULT_HANDSHAKE.as_millis() as u64,
        value_parser = positive::<u64>)]
    control_handshake_ms: u64,
    /// Most TCP control connections at once (handshaking or served); more are closed at
    /// once.
    #[arg(long, default_value_t = vfabric::control::tls::DEFAULT_MAX_CONNECTIONS,
        value_parser = positive::<usize>)]
    control_max_connections: usize,
    /// Testing only: exit this daemon right after an incoming VM's first announce, before
    /// the resume is reported to the source. Lands a failed switch-over (the target gone
    /// after announcing) deterministically; never use it on a real fabric.
    #[arg(long)]
    test_exit_after_announce: bool,
    /// For the fault tests: migrations stop at the phase boundaries a test arms with
    /// files in DIR, until it removes them (see the README's Tests section).
    #[arg(long, hide = true, value_name = "DIR")]
    test_pause_dir: Option<PathBuf>,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?} is not on or off")),
    }
}

/// A whole number of at least 1.
fn positive<T: std::str::FromStr + PartialEq + From<u8>>(s: &str) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(v) if v != T::from(0) => Ok(v),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

#[derive(Debug, Subcommand)]
enum HostCmd {
    /// Enter or leave maintenance mode: entering empties the host by live migration.
    Maintenance(super::fleet::MaintenanceArgs),
}

pub fn run_host(mut a: HostArgs) -> Result<(), CliError> {
    if let Some(HostCmd::Maintenance(m)) = a.cmd.take() {
        return super::fleet::run_maintenance(m);
    }
    let Some(name) = a.name.take() else {
        return Err("vfabric host needs --name (or a subcommand: maintenance)".into());
    };
    // The name becomes the control socket's file name: check it before anything else.
    names::validate("host", &name)?;
    vfabric::logging::init();
    vfabric::memory::set_huge_pages(a.huge_pages);
    let migration = MigrationConfig {
        downtime_target: Duration::from_millis(a.downtime_ms),
        max_rounds: a.max_rounds,
        on_no_convergence: a.on_no_convergence,
        io_timeout: Duration::from_millis(a.io_timeout_ms),
        verify_memory: !a.no_verify_memory,
        auto_converge: a.auto_converge,
        max_downtime: Duration::from_millis(a.max_downtime_ms),
        ..MigrationConfig::default()
    };
    let pki_dir = a.pki_dir.clone().unwrap_or_else(pki::default_dir);
    let control_tcp = match &a.control_listen {
        Some(at) => {
            let creds = pki::load(&pki_dir, &name)
                .map_err(|e| format!("--control-listen needs this host's certificate: {e}"))?;
            Some(daemon::ControlTcp {
                at: at.clone(),
                tls: Arc::new(vfabric::control::tls::ServerTls::new(&creds)?),
                limits: vfabric::control::tls::Limits {
                    handshake: Duration::from_millis(a.control_handshake_ms),
                    max_connections: a.control_max_connections,
                },
            })
        }
        None => None,
    };
    let tls = match pki::load(&pki_dir, &name) {
        Ok(creds) => Some(Arc::new(Tls::new(&creds)?)),
        Err(e) if a.vmotion_encryption == Encryption::Required => {
            return Err(format!("--vmotion-encryption required: {e}").into())
        }
        Err(e) => {
            if a.vmotion_encryption == Encryption::Opportunistic {
                eprintln!("vfabric: warning: {e}: vMotion runs in plaintext only");
            }
            None
        }
    };
    let vmotion = VmotionSecurity {
        encryption: a.vmotion_encryption,
        tls,
        handshake_timeout: Duration::from_millis(a.vmotion_handshake_ms.max(1)),
        max_incoming: a.vmotion_max_incoming.max(1),
    };
    let cfg = HostConfig {
        vmotion,
        socket: control::socket_path(&name),
        name,
        vmotion_addr: a.vmotion_addr,
        uplink: a.uplink,
        capacity_mb: a.capacity_mb,
        datastore: a.datastore,
        announce: a.announce,
        schedule: a.announce_schedule,
        migration,
        test_exit_after_announce: a.test_exit_after_announce,
        test_pause_dir: a.test_pause_dir,
        control_tcp,
    };
    vfabric::sys::tune_allocator();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(daemon::run(cfg, shutdown_signal()))?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Create, list, show and destroy VMs.
#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(subcommand)]
    cmd: VmCmd,
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Create a VM on a host and start it.
    Create(CreateArgs),
    /// List the VMs of every host (or of one).
    List {
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Print a JSON array, one object per VM.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM, wherever it runs: its host, state, memory, MAC, IP and counters.
    Show {
        /// The VM's name.
        name: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the SHA-256 digest of a VM's memory as it is now (the figure a verified
    /// migration compares; stable only while nothing writes the VM's memory, e.g. with
    /// the idle workload).
    Digest {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM, free its memory and delete its disk.
    Destroy {
        /// The VM's name.
        name: String,
    },
    /// Start a VM left stopped because its disk lock could not be retaken (state
    /// no-disk-lock): take the lock, resume it where it is and announce it.
    Start { name: String },
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// VM name: 1 to 31 of a-z, 0-9 and '-', starting with a letter or digit (it names
    /// the VM's disk and lock files on the datastore).
    name: String,
    /// Host to create it on.
    #[arg(long, value_name = "HOST")]
    host: String,
    /// Guest memory, MB (4 to 65536).
    #[arg(long, value_name = "MB", default_value_t = 256)]
    memory_mb: u64,
    /// Virtual CPUs: 1, 2 or 4.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest word size: 32 or 64 (sets the memory overhead).
    #[arg(long, default_value_t = 64)]
    word_bits: u8,
    /// The VM's MAC (default: a locally administered address derived from the name).
    #[arg(long)]
    mac: Option<MacAddr>,
    /// The VM's IPv4 address (it answers ARP, ping and UDP 7777 on it).
    #[arg(long)]
    ip: Ipv4Addr,
    /// What the vCPUs write: idle, uniform, hot:PAGES or sweep.
    #[arg(long, value_name = "PATTERN", default_value = "sweep")]
    workload: Pattern,
    /// Pages the vCPUs dirty per second ("max" for unthrottled).
    #[arg(long, value_name = "PAGES_PER_S", default_value = "1000", value_parser = parse_rate)]
    dirty_rate: u64,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    if s == "max" {
        return Ok(u64::MAX);
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not a number of pages per second or \"max\""))
}

/// A locally administered unicast MAC derived from the VM name (FNV-1a).
fn mac_for(name: &str) -> MacAddr {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    MacAddr([0x02, 0x00, b[0], b[1], b[2], b[3]])
}

fn print_vm_header() {
    println!(
        "{:<10} {:<9} {:<12} {:>5} {:>7} {:<17} {:<15} {:<10} {:>8}",
        "NAME", "HOST", "STATE", "VCPUS", "MEM_MB", "MAC", "IP", "WORKLOAD", "UDP_CTR"
    );
}

fn print_vm(v: &VmInfo) {
    println!(
        "{:<10} {:<9} {:<12} {:>5} {:>7} {:<17} {:<15} {:<10} {:>8}",
        v.name,
        v.host,
        v.state,
        v.vcpus,
        v.memory_mb,
        v.mac.to_string(),
        v.ip.to_string(),
        v.workload,
        v.udp_counter
    );
}

pub fn run_vm(a: VmArgs) -> Result<(), CliError> {
    match a.cmd {
        VmCmd::Create(c) => {
            // Refused here, before any daemon or file is touched.
            names::validate("VM", &c.name)?;
            names::validate("host", &c.host)?;
            let config = VmConfig {
                mac: c.mac.unwrap_or_else(|| mac_for(&c.name)),
                name: c.name,
                vcpus: c.vcpus,
                memory_mb: c.memory_mb,
                word_bits: c.word_bits,
                ip: c.ip,
                workload: WorkloadConfig {
                    pattern: c.workload,
                    dirty_rate: c.dirty_rate,
                },
            };
            config.validate()?;
            let info = client::call(&c.host, api::VmCreate { config })?;
            println!(
                "created {} on {}: {} MB + {} MB overhead reserved, MAC {}, IP {}",
                info.name, info.host, info.memory_mb, info.overhead_mb, info.mac, info.ip
            );
        }
        VmCmd::List { host, json } => {
            let hosts = match host {
                Some(h) => vec![client::host_info(&h)?],
                None => client::some_hosts()?,
            };
            let mut vms = Vec::new();
            for h in &hosts {
                vms.extend(client::call(&h.name, api::VmList {})?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                print_vm_header();
                for v in &vms {
                    print_vm(v);
                }
                for h in hosts.iter().filter(|h| h.mode == HostMode::Maintenance) {
                    println!(
                        "host {} is in maintenance mode: it admits no VM ({} left on it)",
                        h.name,
                        h.vms.len()
                    );
                }
                for v in vms.iter().filter(|v| v.problem.is_some()) {
                    eprintln!(
                        "WARNING: {} on {} is {}",
                        v.name,
                        v.host,
                        v.problem.as_deref().unwrap_or_default()
                    );
                }
            }
        }
        VmCmd::Digest { name, json } => {
            let h = client::locate(&name)?;
            let d = client::call(&h.name, api::VmDigest { name })?;
            if json {
                println!("{}", serde_json::to_string(&d)?);
            } else {
                println!(
                    "{} on {}: memory sha256 {}",
                    d.name, d.host, d.memory_sha256
                );
            }
        }
        VmCmd::Show { name, json } => {
            let v = client::vm_show(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_vm_header();
                print_vm(&v);
                println!(
                    "reserved {} MB ({} MB overhead, {}-bit, {} vCPU), disk owner {}, dirty rate {} pages/s, nic rx {} tx {}",
                    v.reserved_mb,
                    v.overhead_mb,
                    v.word_bits,
                    v.vcpus,
                    v.disk_owner.as_deref().unwrap_or("none"),
                    v.dirty_rate,
                    v.nic_rx,
                    v.nic_tx
                );
                if let Some(p) = &v.problem {
                    println!("WARNING: {} is {p}", v.name);
                }
            }
        }
        VmCmd::Start { name } => {
            let h = client::locate(&name)?;
            let v = client::call(&h.name, api::VmStart { name })?;
            println!(
                "started {} on {}: disk lock taken, announced",
                v.name, v.host
            );
        }
        VmCmd::Destroy { name } => {
            let h = client::locate(&name)?;
            client::call(&h.name, api::VmDestroy { name: name.clone() })?;
            println!("destroyed {name} on {}", h.name);
        }
    }
    Ok(())
}

/// Live-migrate a running VM to another host (Ctrl-C cancels; see `vfabric migrate --help`).
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MigrateArgs {
    #[command(subcommand)]
    cmd: Option<MigrateCmd>,
    /// The VM to move.
    #[arg(required = true)]
    name: Option<String>,
    /// Target host name.
    #[arg(long, required = true)]
    to: Option<String>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Downtime target, ms (default: the source host's).
    #[arg(long, value_parser = positive::<u64>)]
    downtime_ms: Option<u64>,
    /// Pre-copy round limit, at least 1 (default: the source host's).
    #[arg(long, value_parser = positive::<u32>)]
    max_rounds: Option<u32>,
    /// When pre-copy does not converge: force-stop (or force) or abort (default: the
    /// source host's).
    #[arg(long)]
    on_no_convergence: Option<NoConvergence>,
    /// Cap the pre-copy stream, Mbit/s, at least 1 (default: no cap).
    #[arg(long, value_parser = positive::<u64>)]
    bandwidth_mbps: Option<u64>,
    /// How the target announces the VM after resume: rarp, garp or none
    /// (default: the target host's setting).
    #[arg(long)]
    announce: Option<Announce>,
    /// Throttle the VM's vCPUs if pre-copy cannot otherwise converge: on or off
    /// (default: the source host's, which is on).
    #[arg(long, value_parser = parse_on_off)]
    auto_converge: Option<bool>,
    /// Stun guard, ms: abort rather than stop the VM for longer than this when pre-copy
    /// does not converge (default: the source host's, 1000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_downtime_ms: Option<u64>,
    /// vMotion encryption of this migration: required, opportunistic or disabled
    /// (default: the source host's --vmotion-encryption).
    #[arg(long)]
    encryption: Option<Encryption>,
    /// Print no progress (a warning before a forced stop-and-copy still goes to stderr).
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum MigrateCmd {
    /// Cancel the migration of a VM under way: it keeps running on its source host.
    Cancel {
        /// The VM being migrated.
        name: String,
    },
}

fn mib(pages: u64) -> f64 {
    pages as f64 * 4096.0 / (1024.0 * 1024.0)
}

/// Runs one migration, with progress on stderr when `progress` is set (the live line
/// on stdout when it is a terminal). A warning before a forced stop-and-copy goes to
/// stderr in every mode.
pub fn migrate(plan: &MigrationPlan, progress: bool) -> Result<Migrated, CliError> {
    let mut live = LiveLine::new(progress);
    let r = client::migrate(plan, |step| match step {
        client::Step::Starting { from, to, vmotion } if progress => {
            eprintln!(
                "migrating {} from {from} to {to} (vMotion {vmotion})",
                plan.vm
            )
        }
        client::Step::Progress(Progress::Tick(t)) => live.draw(&t),
        client::Step::Progress(p @ Progress::ForcedStop { .. }) => {
            live.clear();
            eprintln!("vfabric: warning: {}", describe(&p));
        }
        client::Step::Progress(p) if progress => {
            live.clear();
            eprintln!("  {}", describe(&p));
        }
        _ => {}
    });
    live.clear();
    Ok(r?)
}

/// Asks the daemon running `name` to cancel its outgoing migration.
fn cancel_call(name: &str) -> Result<VmInfo, CliError> {
    let h = client::locate(name)?;
    Ok(client::call(
        &h.name,
        api::MigrateCancel {
            name: name.to_string(),
        },
    )?)
}

/// From now on, Ctrl-C cancels the migration of `name` instead of killing the CLI; the
/// migration's own reply then says how it ended. A second Ctrl-C stops waiting.
fn cancel_on_ctrl_c(name: &str) -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered here, before the migration starts: no Ctrl-C can slip past it.
    let mut sigint = {
        let _guard = rt.enter();
        signal(SignalKind::interrupt())?
    };
    let name = name.to_string();
    std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            rt.block_on(async {
                sigint.recv().await;
                eprintln!("cancelling the migration of {name} (Ctrl-C again to stop waiting)");
                let n = name.clone();
                // A Ctrl-C that comes before the daemon has begun the migration finds
                // nothing to cancel yet: try again for a moment. Once the migration
                // ends, its reply ends this process anyway.
                let cancel = tokio::task::spawn_blocking(move || {
                    let mut tries = 0;
                    loop {
                        match cancel_call(&n) {
                            Ok(v) => return Ok(v),
                            Err(e) if tries >= 20 => return Err(e),
                            Err(_) => {
                                tries += 1;
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                });
                tokio::select! {
                    r = cancel => {
                        if let Ok(Err(e)) = r {
                            eprintln!("cancel: {e}");
                        }
                    }
                    _ = sigint.recv() => std::process::exit(130),
                }
                sigint.recv().await;
                std::process::exit(130);
            })
        })?;
    Ok(())
}

pub fn run_migrate(a: MigrateArgs) -> Result<(), CliError> {
    if let Some(MigrateCmd::Cancel { name }) = a.cmd {
        let v = cancel_call(&name)?;
        println!(
            "cancelled the migration of {}: it keeps running on {}",
            v.name, v.host
        );
        return Ok(());
    }
    let (Some(name), Some(to)) = (a.name, a.to) else {
        return Err("migrate needs a VM name and --to HOST".into());
    };
    cancel_on_ctrl_c(&name)?;
    let plan = MigrationPlan {
        vm: name,
        to,
        announce: a.announce,
        options: MigrateOptions {
            downtime_ms: a.downtime_ms,
            max_rounds: a.max_rounds,
            on_no_convergence: a.on_no_convergence,
            bandwidth_mbps: a.bandwidth_mbps,
            auto_converge: a.auto_converge,
            max_downtime_ms: a.max_downtime_ms,
            encryption: a.encryption,
        },
    };
    let m = migrate(&plan, !(a.quiet || a.json))?;
    if a.json {
        println!("{}", serde_json::to_string(&m.summary)?);
    } else {
        print_summary(&m.summary, &m.from, &m.to);
    }
    Ok(())
}

/// The live figures of a running round, on one line redrawn in place on the terminal
/// (only when stdout is one, and progress is wanted).
struct LiveLine {
    on: bool,
    drawn: bool,
}

impl LiveLine {
    fn new(progress: bool) -> LiveLine {
        use std::io::IsTerminal;
        LiveLine {
            on: progress && std::io::stdout().is_terminal(),
            drawn: false,
        }
    }

    fn draw(&mut self, t: &Tick) {
        use std::io::Write;
        if !self.on {
            return;
        }
        let eta = if t.eta_ms == u64::MAX {
            "?".to_string()
        } else {
            human_us(t.eta_ms.saturating_mul(1000))
        };
        let mut out = std::io::stdout().lock();
        let _ = write!(
            out,
            "\r\x1b[2K  round {}: transferred {:.1} MiB, remaining {:.1} MiB of {:.0} MiB, \
             dirty {} pages/s, expected downtime {}, throttle {} %, {:.0} Mbit/s, ETA {}",
            t.round,
            t.transferred_bytes as f64 / (1024.0 * 1024.0),
            mib(t.remaining_pages),
            t.total_bytes as f64 / (1024.0 * 1024.0),
            t.dirty_rate_pages_per_s,
            human_us(t.expected_downtime_us),
            t.throttle_pct,
            t.bandwidth_mbps,
            eta
        );
        let _ = out.flush();
        self.drawn = true;
    }

    fn clear(&mut self) {
        use std::io::Write;
        if self.drawn {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[2K");
            let _ = out.flush();
            self.drawn = false;
        }
    }
}

fn describe(p: &Progress) -> String {
    match p {
        Progress::Round {
            round,
            pages_sent,
            dirty_pages,
            throughput_mbps,
            throttle_pct,
            dirty_rate_pages_per_s,
            expected_downtime_us,
        } => format!(
            "pre-copy round {round}: sent {pages_sent} pages ({:.1} MiB), {dirty_pages} dirtied \
             meanwhile ({dirty_rate_pages_per_s} pages/s), {throughput_mbps:.0} Mbit/s, \
             throttle {throttle_pct} %, expected downtime {}",
            mib(*pages_sent),
            human_us(*expected_downtime_us)
        ),
        Progress::Tick(t) => format!("round {} running", t.round),
        Progress::Throttle { pct, .. } => format!("vCPUs throttled by {pct} % from the next round"),
        Progress::ForcedStop {
            reason,
            expected_downtime_us,
            dirty_pages,
            dirty_rate_pages_per_s,
            bandwidth_mbps,
        } => format!(
            "pre-copy did not converge ({reason}): stopping the VM anyway for an estimated {} \
             ({dirty_pages} dirty pages, {dirty_rate_pages_per_s} pages/s dirtied, \
             {bandwidth_mbps:.0} Mbit/s)",
            human_us(*expected_downtime_us)
        ),
        Progress::Quiesced { dirty_pages, .. } => {
            format!("quiesced on the source; {dirty_pages} pages still dirty")
        }
        Progress::Bitmap { bits } => format!("memory bitmap sent: {bits} dirty pages"),
        Progress::Pulled { pages } => format!("target pulled {pages} pages"),
        Progress::Resumed { .. } => "resumed on the target".to_string(),
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    }
}

fn print_summary(s: &MigrationSummary, from: &str, to: &str) {
    println!("migrated {} from {from} to {to}", s.vm);
    for (i, (p, b)) in s
        .pages_sent_per_round
        .iter()
        .zip(&s.bytes_per_round)
        .enumerate()
    {
        println!(
            "  round {:>2}: {:>9} pages  {:>10.1} MiB on the wire",
            i + 1,
            p,
            *b as f64 / (1024.0 * 1024.0)
        );
    }
    println!(
        "  pre-copy rounds     {}{}",
        s.rounds,
        match (&s.converged, &s.stop_reason) {
            (true, _) => String::new(),
            (false, Some(r)) => format!(" (did not converge: {r}; stopped anyway)"),
            (false, None) => " (did not converge: stopped by policy)".to_string(),
        }
    );
    if let Some(t) = s.throttle_pct_per_round.iter().max().filter(|&&t| t > 0) {
        println!(
            "  vCPU throttle       up to {t} % (per round: {:?}), released",
            s.throttle_pct_per_round
        );
    }
    println!("  zero pages skipped  {}", s.zero_pages);
    println!(
        "  bitmap              {} dirty pages at quiesce",
        s.bitmap_bits
    );
    println!("  pages pulled        {}", s.pages_pulled);
    println!(
        "  downtime            {} (quiesce -> resume on target)",
        human_us(s.downtime_us)
    );
    println!(
        "  total time          {}",
        human_us(s.total_ms.saturating_mul(1000))
    );
    println!("  throughput          {:.0} Mbit/s", s.throughput_mbps);
    println!("  vMotion stream      {}", s.transport);
    println!("  memory sha256       source {}", s.memory_sha256_source);
    println!("                      target {}", s.memory_sha256_target);
}

/// Create the fabric's certificate authority and the hosts' certificates.
#[derive(Debug, Args)]
#[command(after_help = "Example (what netns-scripts/up.sh does):\n  \
    vfabric pki init && vfabric pki issue silo104 silo105 && vfabric pki issue-operator admin")]
pub struct PkiArgs {
    /// Directory of the PKI (default <run dir>/pki, created 0700; every file 0600).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: PkiCmd,
}

#[derive(Debug, Subcommand)]
enum PkiCmd {
    /// Create the fabric CA (ca.pem, ca.key) unless one exists; an existing one is kept.
    Init,
    /// Issue (or renew) the certificate of each named host (<name>.pem, <name>.key),
    /// signed by the fabric CA; the certificate names the host.
    Issue {
        #[arg(required = true)]
        hosts: Vec<String>,
    },
    /// Issue (or renew) an operator's client certificate (<name>.operator.pem, .key),
    /// which the CLI presents to daemons it reaches over TCP ($VFABRIC_REMOTE). It is
    /// good for nothing else: no host accepts it on the vMotion network. The CLI uses
    /// the one named by $VFABRIC_OPERATOR (default admin) in <run dir>/pki.
    IssueOperator {
        #[arg(default_value = vfabric::control::DEFAULT_OPERATOR)]
        name: String,
    },
}

pub fn run_pki(a: PkiArgs) -> Result<(), CliError> {
    let dir = a.dir.unwrap_or_else(pki::default_dir);
    match a.cmd {
        PkiCmd::Init => match pki::init(&dir)? {
            pki::Init::Created => println!("fabric CA created in {}", dir.display()),
            pki::Init::Kept => println!("fabric CA kept in {}", dir.display()),
        },
        PkiCmd::Issue { hosts } => {
            for h in &hosts {
                pki::issue(&dir, h)?;
                println!("certificate of host {h} issued in {}", dir.display());
            }
        }
        PkiCmd::IssueOperator { name } => {
            pki::issue_operator(&dir, &name)?;
            println!("certificate of operator {name} issued in {}", dir.display());
        }
    }
    Ok(())
}
