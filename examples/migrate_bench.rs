//! Migration benchmark: moves a VM full of non-zero data between two endpoints and
//! compares the total time with the physical limit of the same path (non-zero bytes ÷
//! raw TCP throughput), then measures downtime at several dirty rates.
//!
//! Modes:
//! - default: source and target in this process over loopback; the raw throughput is
//!   a plain tokio copy of the same byte count over the same kind of socket;
//! - `--listen ADDR`: be a target forever (one migration per connection);
//! - `--connect ADDR --raw-gbps X`: be the source against such a target; the raw
//!   throughput of the path is measured by the caller (bench/migration.sh uses iperf3).
//!
//! After those runs it compares encrypted vMotion (TLS 1.3, both ends authenticated by a
//! fabric CA made for the run) with plaintext: alternate migrations at rate 0 over the
//! same path, and the ratio of their throughputs.
//!
//! Run: `cargo run --release --example migrate_bench -- --help`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use vfabric::guest::{Pattern, Vm, VmConfig, WorkloadConfig};
use vfabric::memory::PAGE_SIZE;
use vfabric::migration::tls::{self, Encryption, Tls};
use vfabric::migration::{migrate_in, migrate_out, BareHooks, MigrationConfig, MigrationSummary};

#[derive(Parser, Debug)]
#[command(about = "Benchmark live migration of a VM full of non-zero data")]
struct Args {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mb: u64,
    /// Dirty rates (pages/s, whole VM) at which to measure downtime.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000")]
    rates: Vec<u64>,
    /// vCPUs of the benchmark VM.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Pre-copy downtime target in milliseconds.
    #[arg(long, default_value_t = 30)]
    downtime_target_ms: u64,
    /// Verify memory (digests at both ends) in every run.
    #[arg(long)]
    verify: bool,
    /// After the runs above, one more with memory verification at this dirty rate
    /// (pages/s), against a verifying target; omit to skip.
    #[arg(long, default_value = "1000")]
    verified_rate: Option<u64>,
    /// The verifying target for that run (with --connect; start one with
    /// `--listen ADDR --verify`).
    #[arg(long)]
    verified_connect: Option<SocketAddr>,
    /// Back guest memory with transparent huge pages (both ends).
    #[arg(long)]
    huge_pages: bool,
    /// Idle pause before each run, ms. Inside a VM with free page reporting the
    /// hypervisor takes freed memory back within seconds, so a pause makes every run
    /// start from memory the host must fault in again (a host that receives a VM after
    /// a quiet spell); without it, later runs reuse memory the previous one freed.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// The target faults guest memory in as pages arrive, on the receive path, instead
    /// of on a thread of its own ahead of the stream (to measure what the prefault buys).
    #[arg(long)]
    no_prefault: bool,
    /// Before each headline run the source asks the target to make the VM's memory
    /// ready (mapped and faulted in) and waits for it, as a QEMU started with
    /// `-incoming` and `-mem-prealloc` has it before `migrate` is issued; the total
    /// counts from after that. The target takes these requests on its port + 100
    /// (with --listen, give it --prepared too).
    #[arg(long)]
    prepared: bool,
    /// Be a target on this address, forever.
    #[arg(long, conflicts_with = "connect")]
    listen: Option<SocketAddr>,
    /// Be the source against a target on this address.
    #[arg(long)]
    connect: Option<SocketAddr>,
    /// Raw TCP throughput of the path to the target, Gbit/s (with --connect).
    #[arg(long)]
    raw_gbps: Option<f64>,
    /// Pairs of plaintext/encrypted migrations (rate 0) for the encryption ratio; 0 skips.
    #[arg(long, default_value_t = 3)]
    encryption_pairs: u32,
    /// Only the encryption comparison (with --connect and --tls-connect): no headline
    /// runs, no verified run.
    #[arg(long)]
    encryption_only: bool,
    /// Be a raw TCP receiver on this address, forever: it writes every byte it gets into
    /// memory of the VM's size faulted in beforehand.
    #[arg(long)]
    raw_listen: Option<SocketAddr>,
    /// With --connect: such a receiver, for raw TCP from memory to memory over the path.
    #[arg(long)]
    raw_connect: Option<SocketAddr>,
    /// How the path to the target is named in the encryption comparison.
    #[arg(long, default_value = "loopback")]
    path_name: String,
    /// Fabric PKI of the encrypted runs (default: a temporary one, loopback only).
    #[arg(long)]
    pki_dir: Option<std::path::PathBuf>,
    /// Create a PKI (CA, bench-src, bench-dst) in this directory and exit.
    #[arg(long)]
    make_pki: Option<std::path::PathBuf>,
    /// Be an encrypting target on this address, forever (needs --pki-dir).
    #[arg(long, conflicts_with = "connect")]
    tls_listen: Option<SocketAddr>,
    /// The encrypting target for the comparison (with --connect; needs --pki-dir).
    #[arg(long)]
    tls_connect: Option<SocketAddr>,
}

const SRC: &str = "bench-src";
const DST: &str = "bench-dst";

fn make_pki(dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    vfabric::pki::init(dir)?;
    vfabric::pki::issue(dir, SRC)?;
    vfabric::pki::issue(dir, DST)?;
    Ok(())
}

fn load_tls(dir: &std::path::Path, name: &str) -> Result<Arc<Tls>, Box<dyn std::error::Error>> {
    Ok(Arc::new(Tls::new(&vfabric::pki::load(dir, name)?)?))
}

fn vm_config(args: &Args, rate: u64) -> VmConfig {
    VmConfig {
        name: "bench".into(),
        vcpus: args.vcpus,
        memory_mb: args.memory_mb,
        word_bits: 64,
        mac: "02:00:00:00:00:64".parse().expect("constant MAC"),
        ip: Ipv4Addr::new(10, 10, 0, 100),
        workload: WorkloadConfig {
            pattern: if rate == 0 {
                Pattern::Idle
            } else {
                Pattern::Uniform
            },
            dirty_rate: rate,
        },
    }
}

/// A VM whose every page holds non-zero data (no page can travel as a zero flag).
fn filled_vm(args: &Args, rate: u64) -> Result<Arc<Vm>, Box<dyn std::error::Error>> {
    let vm = Vm::create(vm_config(args, rate))?;
    let mem = vm.memory();
    let mut page = [0u8; PAGE_SIZE];
    for p in 0..mem.page_count() {
        for (i, w) in page.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(
                &(p.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64 | 1).to_le_bytes(),
            );
        }
        mem.write_page(p, &page)?;
    }
    Ok(vm)
}

fn migration_config(args: &Args, verify: bool) -> MigrationConfig {
    MigrationConfig {
        downtime_target: Duration::from_millis(args.downtime_target_ms),
        verify_memory: verify,
        io_timeout: Duration::from_secs(60),
        prefault: !args.no_prefault,
        ..MigrationConfig::default()
    }
}

async fn run_source(
    args: &Args,
    rate: u64,
    to: SocketAddr,
    verify: bool,
) -> Result<MigrationSummary, Box<dyn std::error::Error>> {
    run_source_over(args, rate, to, verify, None).await
}

/// One migration to `to`, encrypted with `tls` if given.
async fn run_source_over(
    args: &Args,
    rate: u64,
    to: SocketAddr,
    verify: bool,
    tls: Option<&Tls>,
) -> Result<MigrationSummary, Box<dyn std::error::Error>> {
    tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
    if args.prepared && !verify {
        let took = request_prepared(to, args.memory_mb << 20).await?;
        eprintln!("target memory prepared in {took} ms (not counted in the total)");
    }
    let vm = filled_vm(args, rate)?;
    vm.start();
    // Let the workload reach its pace before the migration starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mode = if tls.is_some() {
        Encryption::Required
    } else {
        Encryption::Disabled
    };
    let (stream, _) = tls::connect(to, DST, mode, tls, Duration::from_secs(10)).await?;
    let cfg = migration_config(args, verify);
    let (c0, m0, t0) = (cpu_ms(), machine_busy_ms(), Instant::now());
    let s = migrate_out(Arc::clone(&vm), stream, &cfg, &mut BareHooks, &mut |_| {}).await?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    *LAST_CORES.lock().unwrap_or_else(|e| e.into_inner()) = Cores {
        process: (cpu_ms() - c0) / wall_ms,
        machine: (machine_busy_ms() - m0) / wall_ms,
    };
    drop(vm);
    Ok(s)
}

async fn serve_target_tls(
    l: TcpListener,
    cfg: MigrationConfig,
    tls: Arc<Tls>,
    ready: Option<Ready>,
) {
    loop {
        let Ok((s, peer)) = l.accept().await else {
            continue;
        };
        let mut hooks = Prepared(ready.as_ref().and_then(|r| r.lock().unwrap().take()));
        let s = match tls::accept(s, Encryption::Required, Some(&tls)).await {
            Ok((s, _)) => s,
            Err((why, detail)) => {
                eprintln!("target: {peer} refused ({}: {detail})", why.as_str());
                continue;
            }
        };
        match migrate_in(s, &cfg, &mut hooks).await {
            Ok((vm, _)) => drop(vm),
            Err(e) => eprintln!("target: {e}"),
        }
    }
}

/// Alternates plaintext and encrypted migrations at rate 0 and prints the ratio of the
/// best throughputs (bytes on the wire ÷ total time), with the CPU each took.
async fn compare_encryption(
    args: &Args,
    plain: SocketAddr,
    encrypted: SocketAddr,
    tls: &Tls,
) -> Result<(), Box<dyn std::error::Error>> {
    /// One migration of the comparison.
    #[derive(Clone, Copy)]
    struct Run {
        gbps: f64,
        /// Machine CPU-seconds per GiB carried.
        cpu_per_gib: f64,
        /// CPUs busy on average.
        busy: f64,
    }
    fn figures(s: &MigrationSummary, c: Cores) -> Run {
        let secs = s.total_ms.max(1) as f64 / 1e3;
        let gib = s.bytes_total as f64 / (1u64 << 30) as f64;
        Run {
            gbps: s.bytes_total as f64 * 8.0 / (secs * 1e9),
            cpu_per_gib: c.machine * secs / gib.max(1e-9),
            busy: c.machine,
        }
    }
    let (mut p, mut e) = (Vec::new(), Vec::new());
    for _ in 0..args.encryption_pairs {
        let s = run_source_over(args, 0, plain, args.verify, None).await?;
        p.push(figures(&s, last_cores()));
        let s = run_source_over(args, 0, encrypted, args.verify, Some(tls)).await?;
        e.push(figures(&s, last_cores()));
    }
    let none = Run {
        gbps: 0.0,
        cpu_per_gib: f64::NAN,
        busy: f64::NAN,
    };
    let fastest = |v: &[Run]| {
        v.iter()
            .copied()
            .fold(none, |a, r| if r.gbps > a.gbps { r } else { a })
    };
    let show = |v: &[Run], f: fn(&Run) -> f64| {
        v.iter()
            .map(|r| format!("{:.2}", f(r)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let (fp, fe) = (fastest(&p), fastest(&e));
    println!();
    println!(
        "encrypted vMotion (TLS 1.3, ring provider) vs plaintext, rate 0, same path ({}):",
        args.path_name
    );
    println!(
        "  plaintext Gbit/s: {}   (best {:.2})",
        show(&p, |r| r.gbps),
        fp.gbps
    );
    println!(
        "  encrypted Gbit/s: {}   (best {:.2})",
        show(&e, |r| r.gbps),
        fe.gbps
    );
    println!(
        "  machine CPU s per GiB: plaintext {}; encrypted {}",
        show(&p, |r| r.cpu_per_gib),
        show(&e, |r| r.cpu_per_gib)
    );
    println!(
        "  CPUs busy (this machine has {cpus}): plaintext {}; encrypted {}",
        show(&p, |r| r.busy),
        show(&e, |r| r.busy)
    );
    let aes = aes_gcm_secs_per_gib();
    println!(
        "  AES-128-GCM on one CPU here (ring, 16 KiB records in cache): {:.2} GB/s, so \
         sealing at one end and opening at the other cost at least {:.2} s per GiB",
        (1u64 << 30) as f64 / aes / 1e9,
        2.0 * aes
    );
    let ratio = fe.gbps / fp.gbps.max(1e-9);
    let cpu_bound = fp.busy >= 0.85 * cpus as f64;
    if cpu_bound {
        // An encrypted run does at least the plaintext run's work plus the cipher at
        // both ends. With the CPUs no busier than in the plaintext run, its throughput
        // is at most c / (c + 2 aes) of the plaintext's.
        println!(
            "  the fastest plaintext run kept {:.2} of {cpus} CPUs busy: the CPUs, not the \
             link, set the pace; with them as busy and no cost but the cipher's, encrypted \
             runs reach at most {:.2} / ({:.2} + {:.2}) = {:.2} x plaintext",
            fp.busy,
            fp.cpu_per_gib,
            fp.cpu_per_gib,
            2.0 * aes,
            fp.cpu_per_gib / (fp.cpu_per_gib + 2.0 * aes)
        );
    } else {
        println!(
            "  the fastest plaintext run kept {:.2} of {cpus} CPUs busy: not saturated, so \
             no CPU ceiling is derived",
            fp.busy
        );
    }
    println!(
        "  encrypted / plaintext = {ratio:.2} (target >= 0.8): {}",
        match (ratio >= 0.8, cpu_bound) {
            (true, _) => "met",
            (false, true) => "MISSED, CPU-bound path",
            (false, false) => "MISSED",
        }
    );
    Ok(())
}

/// CPU-seconds to seal 1 GiB in 16 KiB records with AES-128-GCM on this machine (ring,
/// as the migration stream does; opening costs the same): the best of three passes
/// over 64 MiB.
fn aes_gcm_secs_per_gib() -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    let Ok(key) = UnboundKey::new(&AES_128_GCM, &[7u8; 16]) else {
        return f64::NAN;
    };
    let key = LessSafeKey::new(key);
    let mut record = vec![0x5au8; 16 << 10];
    let records = 4096u64; // 64 MiB
    let mut best = f64::INFINITY;
    for pass in 0..3u64 {
        let t = Instant::now();
        for i in 0..records {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&(pass * records + i).to_be_bytes());
            let _ = key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from([23u8, 3, 3, 0x40, 0x11]),
                &mut record,
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    best * (1u64 << 30) as f64 / (records * (16 << 10)) as f64
}

/// Target hooks with memory made ready before the stream.
struct Prepared(Option<Arc<vfabric::memory::GuestMemory>>);

impl vfabric::migration::TargetHooks for Prepared {
    fn admit(&mut self, cfg: &vfabric::guest::VmConfig) -> Result<(), String> {
        BareHooks.admit(cfg)
    }
    fn prepared_memory(
        &mut self,
        _: &vfabric::guest::VmConfig,
    ) -> Option<Arc<vfabric::memory::GuestMemory>> {
        self.0.take()
    }
    fn before_resume(&mut self, vm: &Arc<vfabric::guest::Vm>) -> Result<(), String> {
        BareHooks.before_resume(vm)
    }
    fn resumed(&mut self, vm: &Arc<vfabric::guest::Vm>) {
        BareHooks.resumed(vm)
    }
}

/// The port on which a target takes prepare requests: its migration port + 100.
/// In one process the prepare port is any free one, recorded here by target address.
static PREPARE_PORTS: std::sync::Mutex<Vec<(SocketAddr, SocketAddr)>> =
    std::sync::Mutex::new(Vec::new());

fn prepare_addr(mut to: SocketAddr) -> SocketAddr {
    if let Some((_, p)) = PREPARE_PORTS.lock().unwrap().iter().find(|(t, _)| *t == to) {
        return *p;
    }
    to.set_port(to.port().saturating_add(100));
    to
}

/// Asks the target at `to` to make `bytes` of memory ready for the next migration;
/// returns the milliseconds it took, once it is ready.
async fn request_prepared(to: SocketAddr, bytes: u64) -> Result<u64, Box<dyn std::error::Error>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(prepare_addr(to)).await?;
    s.write_all(&bytes.to_be_bytes()).await?;
    Ok(s.read_u64().await?)
}

/// Maps and faults in `bytes` of guest memory; the time it took.
fn prepare_memory(bytes: u64) -> Result<(Arc<vfabric::memory::GuestMemory>, Duration), String> {
    let t = Instant::now();
    let m = vfabric::memory::GuestMemory::new(bytes).map_err(|e| e.to_string())?;
    m.prefault(&std::sync::atomic::AtomicBool::new(false))
        .map_err(|e| e.to_string())?;
    Ok((Arc::new(m), t.elapsed()))
}

/// With --prepared, takes prepare requests for the target at `to`.
async fn prepared_for(args: &Args, to: SocketAddr) -> std::io::Result<Option<Ready>> {
    if !args.prepared {
        return Ok(None);
    }
    let r = Ready::default();
    // A target of its own process takes any free port; one in its own process (a
    // --listen target) its port + 100, which the source computes alike.
    let bind = if args.listen.is_some() || args.tls_listen.is_some() {
        prepare_addr(to)
    } else {
        SocketAddr::new(to.ip(), 0)
    };
    let at = serve_prepare(bind, r.clone()).await?;
    PREPARE_PORTS.lock().unwrap().push((to, at));
    Ok(Some(r))
}

/// Memory made ready for the next migration into a target.
type Ready = Arc<std::sync::Mutex<Option<Arc<vfabric::memory::GuestMemory>>>>;

/// Takes prepare requests for the target at `to`: each maps and faults in the memory
/// asked for, keeps it for the next migration, then answers with the time it took.
async fn serve_prepare(bind: SocketAddr, ready: Ready) -> std::io::Result<SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind(bind).await?;
    let at = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let Ok(bytes) = s.read_u64().await else {
                continue;
            };
            match tokio::task::spawn_blocking(move || prepare_memory(bytes)).await {
                Ok(Ok((m, took))) => {
                    *ready.lock().unwrap() = Some(m);
                    let _ = s.write_all(&(took.as_millis() as u64).to_be_bytes()).await;
                }
                Ok(Err(e)) => eprintln!("target: no memory prepared: {e}"),
                Err(e) => eprintln!("target: no memory prepared: {e}"),
            }
        }
    });
    Ok(at)
}

async fn serve_target_prepared(l: TcpListener, cfg: MigrationConfig, ready: Option<Ready>) {
    loop {
        let Ok((s, peer)) = l.accept().await else {
            continue;
        };
        let mut hooks = Prepared(ready.as_ref().and_then(|r| r.lock().unwrap().take()));
        match migrate_in(s, &cfg, &mut hooks).await {
            Ok((vm, s)) => {
                eprintln!(
                    "target: VM from {peer} resumed, downtime {:.2} ms",
                    s.downtime_us as f64 / 1e3
                );
                drop(vm);
            }
            Err(e) => eprintln!("target: {e}"),
        }
    }
}

/// Raw TCP throughput over loopback: `bytes` in 1 MiB writes. The reader reads into a
/// reused 1 MiB buffer, or with `fresh` stores every byte once in a new buffer of
/// `bytes` (the kernel zeroes each new page on first touch), as a target must: the
/// ceiling of a copy into a new guest.
async fn raw_loopback(bytes: u64, fresh: bool) -> Result<f64, Box<dyn std::error::Error>> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        let mut buf = vec![0u8; if fresh { bytes as usize } else { 1 << 20 }];
        read_into(&mut s, &mut buf).await
    });
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let got = reader.await??;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, bytes);
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}

/// Reads `s` to its end into `mem`, up to 1 MiB a read, wrapping around at the end of
/// `mem`; returns the bytes read.
async fn read_into(s: &mut TcpStream, mem: &mut [u8]) -> std::io::Result<u64> {
    let (mut at, mut n) = (0, 0u64);
    loop {
        if at == mem.len() {
            at = 0;
        }
        let end = (at + (1 << 20)).min(mem.len());
        let r = s.read(&mut mem[at..end]).await?;
        if r == 0 {
            return Ok(n);
        }
        at += r;
        n += r as u64;
    }
}

/// A raw TCP receiver that stores every byte it gets in memory of `bytes` faulted in
/// beforehand (as a prepared target's guest memory is), wrapping around; one byte back
/// once a sender has finished.
async fn serve_raw(l: TcpListener, bytes: u64) {
    let mut mem = vec![0u8; bytes as usize];
    for page in mem.chunks_mut(PAGE_SIZE) {
        page[0] = 1;
    }
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let _ = read_into(&mut s, &mut mem).await;
        let _ = s.write_all(&[1]).await;
    }
}

/// Raw TCP from memory to memory: sends all of `src` (far larger than any cache, so read
/// from memory, as a migration source reads the guest's) in 256 KiB writes to a
/// [`serve_raw`] receiver; Gbit/s until it has stored the last byte. Best of three.
async fn raw_memory_gbps(to: SocketAddr, src: &[u8]) -> Result<f64, Box<dyn std::error::Error>> {
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let t = Instant::now();
        let mut s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        for chunk in src.chunks(256 << 10) {
            s.write_all(chunk).await?;
        }
        s.shutdown().await?;
        let mut done = [0u8; 1];
        s.read_exact(&mut done).await?;
        best = best.max(src.len() as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9);
    }
    Ok(best)
}

/// CPU time over wall time of one migration: 2.0 means two cores were busy throughout.
#[derive(Debug, Clone, Copy)]
struct Cores {
    /// This process (both ends when the target runs in-process).
    process: f64,
    /// The whole machine: both ends, the kernel's network stack, anything else running.
    machine: f64,
}

/// The figures of the last migration run by this process.
static LAST_CORES: std::sync::Mutex<Cores> = std::sync::Mutex::new(Cores {
    process: f64::NAN,
    machine: f64::NAN,
});

fn last_cores() -> Cores {
    *LAST_CORES.lock().unwrap_or_else(|e| e.into_inner())
}

/// CPU time every CPU of the machine has spent busy so far (not idle, not waiting for
/// I/O, not stolen by a hypervisor), ms, from the first line of /proc/stat (USER_HZ,
/// 100 on Linux).
fn machine_busy_ms() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return f64::NAN;
    };
    let line = stat.lines().next().unwrap_or("");
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(f64::NAN))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let at = |i: usize| f.get(i).copied().unwrap_or(f64::NAN);
    (at(0) + at(1) + at(2) + at(5) + at(6)) * 10.0
}

/// CPU time this process has used so far (user + system, every thread), ms, from
/// /proc/self/stat (clock ticks of 10 ms: runs here last hundreds of ms).
fn cpu_ms() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; after the name, field 3 is
    // index 0. /proc counts in USER_HZ, 100 on Linux.
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) * 10.0
}

/// Milliseconds for three passes over guest memory of `bytes`, page by page: writing
/// fresh memory (the kernel faults in and zeroes every page first), writing it again
/// (memory made ready, as a prepared target writes it) and reading it (as a source
/// reads the guest's pages).
struct MemoryPasses {
    fault_in: f64,
    write: f64,
    read: f64,
}

fn memory_passes(bytes: u64) -> Result<MemoryPasses, Box<dyn std::error::Error>> {
    let mem = vfabric::memory::GuestMemory::new(bytes)?;
    let page = [0x5au8; PAGE_SIZE];
    let mut out = [0u8; PAGE_SIZE];
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for p in 0..mem.page_count() {
        mem.write_page(p, &page)?;
    }
    let fault_in = ms(t);
    let t = Instant::now();
    for p in 0..mem.page_count() {
        mem.write_page(p, &page)?;
    }
    let write = ms(t);
    let t = Instant::now();
    let mut sum = 0u64;
    for p in 0..mem.page_count() {
        mem.read_page(p, &mut out)?;
        sum = sum.wrapping_add(u64::from(out[p as usize % PAGE_SIZE]));
    }
    let read = ms(t);
    std::hint::black_box(sum);
    Ok(MemoryPasses {
        fault_in,
        write,
        read,
    })
}

fn report(
    args: &Args,
    raw_gbps: f64,
    passes: &MemoryPasses,
    runs: &[(u64, MigrationSummary)],
    cores: &[Cores],
    how: &str,
) {
    let bytes = args.memory_mb << 20;
    println!();
    println!(
        "VM: {} MiB, every page non-zero, {} vCPU(s), verify_memory={}, huge_pages={}, \
         prefault={}",
        args.memory_mb, args.vcpus, args.verify, args.huge_pages, !args.no_prefault
    );
    println!("raw TCP throughput ({how}): {raw_gbps:.2} Gbit/s");
    let limit_ms = bytes as f64 * 8.0 / (raw_gbps * 1e9) * 1e3;
    println!("physical limit (non-zero bytes / raw throughput): {limit_ms:.0} ms");
    println!(
        "fresh memory fault-in of the same size (page writes, same process): {:.0} ms",
        passes.fault_in
    );
    println!(
        "one pass over that memory once faulted in, page by page on one CPU: writing {:.0} \
         ms, reading {:.0} ms",
        passes.write, passes.read
    );
    println!();
    println!(
        "{:>12} {:>9} {:>7} {:>8} {:>7} {:>10} {:>10} {:>9} {:>10} {:>6} {:>8}",
        "rate pg/s",
        "total ms",
        "ratio",
        "rounds",
        "conv",
        "bitmap",
        "pulled",
        "MB sent",
        "downtime",
        "cores",
        "machine"
    );
    for ((rate, s), cores) in runs.iter().zip(cores) {
        println!(
            "{:>12} {:>9} {:>7.2} {:>8} {:>7} {:>10} {:>10} {:>9.0} {:>8.2}ms {:>6.2} {:>8.2}",
            rate,
            s.total_ms,
            s.total_ms as f64 / limit_ms,
            s.rounds,
            s.converged,
            s.bitmap_bits,
            s.pages_pulled,
            s.bytes_total as f64 / 1e6,
            s.downtime_us as f64 / 1e3,
            cores.process,
            cores.machine
        );
    }
    println!(
        "cores: CPU time / wall time of the migration in this process ({}); this \
         machine has {}; machine: busy CPU time of the whole machine / wall time",
        if args.connect.is_some() {
            "the source only"
        } else {
            "source, target and its prefault thread"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    if let Some((_, s)) = runs.iter().find(|(r, _)| *r == 0) {
        let ratio = s.total_ms as f64 / limit_ms;
        println!(
            "total at rate 0: {} ms = {ratio:.2} x physical limit (target <= 1.25): {}",
            s.total_ms,
            if ratio <= 1.25 { "met" } else { "MISSED" }
        );
    }
    if let Some((_, s)) = runs.iter().find(|(r, _)| *r == 1000) {
        let d = s.downtime_us as f64 / 1e3;
        println!(
            "downtime at 1000 pages/s: {d:.2} ms (target <= 10 ms): {}",
            if d <= 10.0 { "met" } else { "MISSED" }
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    vfabric::memory::set_huge_pages(args.huge_pages);
    if let Some(dir) = &args.make_pki {
        return make_pki(dir);
    }
    if let Some(addr) = args.tls_listen {
        let dir = args
            .pki_dir
            .as_ref()
            .ok_or("--tls-listen needs --pki-dir")?;
        let l = TcpListener::bind(addr).await?;
        eprintln!("target: listening on {addr}, encrypted");
        let ready = prepared_for(&args, addr).await?;
        serve_target_tls(
            l,
            migration_config(&args, args.verify),
            load_tls(dir, DST)?,
            ready,
        )
        .await;
        return Ok(());
    }
    if let Some(addr) = args.raw_listen {
        let l = TcpListener::bind(addr).await?;
        eprintln!("raw receiver: listening on {addr}");
        serve_raw(l, args.memory_mb << 20).await;
        return Ok(());
    }
    if let Some(addr) = args.listen {
        let l = TcpListener::bind(addr).await?;
        eprintln!("target: listening on {addr}");
        let ready = prepared_for(&args, addr).await?;
        serve_target_prepared(l, migration_config(&args, args.verify), ready).await;
        return Ok(());
    }
    let bytes = args.memory_mb << 20;
    let mut pki_tmp = None;
    let pki_dir = match &args.pki_dir {
        Some(d) => d.clone(),
        None => {
            let d = std::env::temp_dir().join(format!("vfabric-bench-pki-{}", std::process::id()));
            make_pki(&d)?;
            pki_tmp = Some(d.clone());
            d
        }
    };
    let mut tls_to = args.tls_connect;
    let mut raw_fresh = None;
    let mut raw_to = args.raw_connect;
    let (to, verified_to, raw, how) = match args.connect {
        Some(to) => {
            let raw = args
                .raw_gbps
                .ok_or("--connect needs --raw-gbps (the raw throughput of the path)")?;
            (to, args.verified_connect, raw, "measured by the caller")
        }
        None => {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            let to = l.local_addr()?;
            let ready = prepared_for(&args, to).await?;
            tokio::spawn(serve_target_prepared(
                l,
                migration_config(&args, args.verify),
                ready,
            ));
            let lv = TcpListener::bind("127.0.0.1:0").await?;
            let verified_to = lv.local_addr()?;
            tokio::spawn(serve_target_prepared(
                lv,
                migration_config(&args, true),
                None,
            ));
            let lt = TcpListener::bind("127.0.0.1:0").await?;
            tls_to = Some(lt.local_addr()?);
            let dst = load_tls(&pki_dir, DST)?;
            let ready = prepared_for(&args, lt.local_addr()?).await?;
            tokio::spawn(serve_target_tls(
                lt,
                migration_config(&args, args.verify),
                dst,
                ready,
            ));
            // Best of three: the figure is a ceiling for the migration.
            let mut best: f64 = 0.0;
            for _ in 0..3 {
                best = best.max(raw_loopback(bytes, false).await?);
            }
            let mut fresh: f64 = 0.0;
            for _ in 0..3 {
                fresh = fresh.max(raw_loopback(bytes, true).await?);
            }
            raw_fresh = Some(fresh);
            let lr = TcpListener::bind("127.0.0.1:0").await?;
            raw_to = Some(lr.local_addr()?);
            tokio::spawn(serve_raw(lr, bytes));
            (
                to,
                Some(verified_to),
                best,
                "in-process tokio copy over loopback, best of 3",
            )
        }
    };
    if args.encryption_only {
        let tls_to = tls_to.ok_or("--encryption-only needs --tls-connect")?;
        let src = load_tls(&pki_dir, SRC)?;
        return compare_encryption(&args, to, tls_to, &src).await;
    }
    // The invocation's first migration pays for fresh memory the host (and, inside a
    // VM, the hypervisor) must find first: reported apart from the steady state.
    let first = run_source(&args, 0, to, args.verify).await?;
    eprintln!("first run, rate 0: total {} ms", first.total_ms);
    let mut runs = Vec::new();
    let mut cores = Vec::new();
    for &rate in &args.rates {
        let s = run_source(&args, rate, to, args.verify).await?;
        cores.push(last_cores());
        eprintln!(
            "rate {rate}: total {} ms, downtime {:.2} ms, rounds {:?}",
            s.total_ms,
            s.downtime_us as f64 / 1e3,
            s.pages_sent_per_round
        );
        runs.push((rate, s));
    }
    let verified = match (args.verified_rate, verified_to) {
        (Some(rate), Some(vto)) => {
            let s = run_source(&args, rate, vto, true).await?;
            if s.memory_sha256_source != s.memory_sha256_target {
                return Err(format!(
                    "memory digests differ: source {} target {}",
                    s.memory_sha256_source, s.memory_sha256_target
                )
                .into());
            }
            Some((rate, s))
        }
        _ => None,
    };
    let passes = memory_passes(bytes)?;
    let raw_memory = match raw_to {
        Some(to) => Some(raw_memory_gbps(to, &vec![0x5au8; bytes as usize]).await?),
        None => None,
    };
    report(&args, raw, &passes, &runs, &cores, how);
    let limit_ms = bytes as f64 * 8.0 / (raw * 1e9) * 1e3;
    println!(
        "first run of this invocation (rate 0, not in the table): total {} ms = {:.2} x \
         physical limit",
        first.total_ms,
        first.total_ms as f64 / limit_ms
    );
    if let (Some(fresh), Some((_, s))) = (raw_fresh, runs.iter().find(|(r, _)| *r == 0)) {
        let fresh_ms = bytes as f64 * 8.0 / (fresh * 1e9) * 1e3;
        println!(
            "raw TCP into fresh memory (the reader stores every byte in a new buffer, as a \
             target must): {fresh:.2} Gbit/s, {fresh_ms:.0} ms; total at rate 0 = {:.2} x that",
            s.total_ms as f64 / fresh_ms
        );
    }
    if let (Some(gbps), Some((_, s))) = (raw_memory, runs.iter().find(|(r, _)| *r == 0)) {
        let ms = bytes as f64 * 8.0 / (gbps * 1e9) * 1e3;
        println!(
            "raw TCP from memory to memory over the same path (the sender reads {} MiB of \
             memory, the receiver stores it in memory made ready, as a migration must; the \
             physical limit's sender and receiver reuse buffers that stay in cache): \
             {gbps:.2} Gbit/s, {ms:.0} ms; total at rate 0 = {:.2} x that",
            args.memory_mb,
            s.total_ms as f64 / ms
        );
    }
    if let Some((rate, s)) = verified {
        let limit_ms = bytes as f64 * 8.0 / (raw * 1e9) * 1e3;
        println!(
            "verified run (verify_memory=true) at {rate} pages/s: total {} ms = {:.2} x physical \
             limit, downtime {:.2} ms, rounds {}, bitmap {} pages, digests equal ({}…)",
            s.total_ms,
            s.total_ms as f64 / limit_ms,
            s.downtime_us as f64 / 1e3,
            s.rounds,
            s.bitmap_bits,
            &s.memory_sha256_source[..16.min(s.memory_sha256_source.len())]
        );
    }
    if let (Some(tls_to), true) = (tls_to, args.encryption_pairs > 0) {
        let src = load_tls(&pki_dir, SRC)?;
        compare_encryption(&args, to, tls_to, &src).await?;
    }
    if let Some(d) = pki_tmp {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}
