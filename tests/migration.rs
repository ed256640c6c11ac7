//! Migration end to end over loopback TCP, without root: integrity (sweep check and
//! memory hashes), convergence policy, failure injection (a cutting proxy and fake
//! targets speaking the protocol), admission refusal, and release of source memory.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use vfabric::guest::{check_sweep, Pattern, Vm, VmConfig, WorkloadConfig};
use vfabric::memory::{count_set, hex, GuestAddress, PAGE_SIZE};
use vfabric::migration::conn::{Reader, Writer};
use vfabric::migration::proto::{self, Limits, Message};
use vfabric::migration::{
    migrate_in, migrate_out, migrate_out_cancellable, Cancel, ErrorKind, MigrationConfig,
    MigrationError, MigrationSummary, NoConvergence, Progress, SourceHooks, Step, TargetHooks,
    Tick,
};

fn config(name: &str, memory_mb: u64, vcpus: u8, pattern: Pattern, rate: u64) -> VmConfig {
    VmConfig {
        name: name.into(),
        vcpus,
        memory_mb,
        word_bits: 64,
        mac: "02:00:00:00:00:64".parse().unwrap(),
        ip: Ipv4Addr::new(10, 10, 0, 100),
        workload: WorkloadConfig {
            pattern,
            dirty_rate: rate,
        },
    }
}

fn mcfg() -> MigrationConfig {
    MigrationConfig {
        // Generous: unoptimised test builds on a shared 2-core machine are slow.
        io_timeout: Duration::from_secs(20),
        ..MigrationConfig::default()
    }
}

/// Writes non-zero data into every non-service page (a guest that used its memory).
fn fill(vm: &Vm) {
    let mem = vm.memory();
    let mut page = [0u8; PAGE_SIZE];
    for p in vfabric::guest::SERVICE_PAGES..mem.page_count() {
        page[..8].copy_from_slice(&(p | 1 << 40).to_le_bytes());
        page[PAGE_SIZE - 1] = p as u8 | 1;
        mem.write_page(p, &page).unwrap();
    }
}

/// The shared datastore's lock of one VM's disk: who owns it.
#[derive(Clone)]
struct Disk(Arc<Mutex<Option<String>>>);

impl Disk {
    fn owned_by(host: &str) -> Disk {
        Disk(Arc::new(Mutex::new(Some(host.into()))))
    }
    fn owner(&self) -> Option<String> {
        self.0.lock().unwrap().clone()
    }
    fn set(&self, owner: Option<&str>) {
        *self.0.lock().unwrap() = owner.map(String::from);
    }
}

struct Src {
    host: String,
    disk: Disk,
    quiesced: u32,
    reclaims: u32,
}

impl Src {
    fn new(host: &str, disk: &Disk) -> Src {
        Src {
            host: host.into(),
            disk: disk.clone(),
            quiesced: 0,
            reclaims: 0,
        }
    }
}

impl SourceHooks for Src {
    fn quiesced(&mut self, vm: &Arc<Vm>) -> Result<(), String> {
        assert!(!vm.is_running());
        self.quiesced += 1;
        let mut o = self.disk.0.lock().unwrap();
        if o.as_deref() == Some(&self.host) {
            *o = None;
        }
        Ok(())
    }
    fn reclaim(&mut self, _vm: &Arc<Vm>) -> bool {
        self.reclaims += 1;
        let mut o = self.disk.0.lock().unwrap();
        match o.as_deref() {
            None => {
                *o = Some(self.host.clone());
                true
            }
            Some(h) => h == self.host,
        }
    }
}

#[derive(Default)]
struct TgtLog {
    admitted: u32,
    resumed: u32,
    rolled_back: u32,
    /// `GuestMemory::digest` of the target's memory just before the vCPUs start.
    digest_at_resume: Option<String>,
}

struct Tgt {
    host: String,
    disk: Disk,
    refuse: Option<String>,
    fail_resume: bool,
    log: Arc<Mutex<TgtLog>>,
}

impl Tgt {
    fn new(host: &str, disk: &Disk) -> Tgt {
        Tgt {
            host: host.into(),
            disk: disk.clone(),
            refuse: None,
            fail_resume: false,
            log: Arc::default(),
        }
    }
}

impl TargetHooks for Tgt {
    fn admit(&mut self, cfg: &VmConfig) -> Result<(), String> {
        self.log.lock().unwrap().admitted += 1;
        cfg.validate().map_err(|e| e.to_string())?;
        match &self.refuse {
            Some(r) => Err(r.clone()),
            None => Ok(()),
        }
    }
    fn before_resume(&mut self, vm: &Arc<Vm>) -> Result<(), String> {
        assert!(!vm.is_running());
        if self.fail_resume {
            return Err("disk lock: injected failure".into());
        }
        let mut o = self.disk.0.lock().unwrap();
        match o.as_deref() {
            None => {
                *o = Some(self.host.clone());
                self.log.lock().unwrap().digest_at_resume = Some(hex(&vm.memory().digest()));
                Ok(())
            }
            Some(h) => Err(format!("disk held by {h}")),
        }
    }
    fn resumed(&mut self, vm: &Arc<Vm>) {
        assert!(vm.is_running());
        self.log.lock().unwrap().resumed += 1;
    }
    fn rolled_back(&mut self, vm: &Arc<Vm>) {
        vm.quiesce();
        self.log.lock().unwrap().rolled_back += 1;
        let mut o = self.disk.0.lock().unwrap();
        if o.as_deref() == Some(&self.host) {
            *o = None;
        }
    }
}

type TargetResult = Result<(Arc<Vm>, MigrationSummary), MigrationError>;

/// A target listening on 127.0.0.1, port 0; returns its address and its outcome.
async fn spawn_target(
    cfg: MigrationConfig,
    hooks: Tgt,
) -> (SocketAddr, tokio::task::JoinHandle<TargetResult>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let mut hooks = hooks;
        let (s, _) = l.accept().await.unwrap();
        migrate_in(s, &cfg, &mut hooks).await
    });
    (addr, h)
}

struct Outcome {
    source: Result<MigrationSummary, MigrationError>,
    target: TargetResult,
    progress: Vec<Progress>,
    /// The target memory's digest computed from memory itself at resume.
    digest_at_resume: Option<String>,
}

async fn migrate_via(
    vm: &Arc<Vm>,
    cfg: &MigrationConfig,
    src: &mut Src,
    addr: SocketAddr,
    target: tokio::task::JoinHandle<TargetResult>,
) -> Outcome {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut progress = Vec::new();
    let source = migrate_out(Arc::clone(vm), stream, cfg, src, &mut |p| progress.push(p)).await;
    let target = target.await.unwrap();
    Outcome {
        source,
        target,
        progress,
        digest_at_resume: None,
    }
}

async fn migrate(vm: &Arc<Vm>, cfg: &MigrationConfig, src: &mut Src, tgt: Tgt) -> Outcome {
    let log = Arc::clone(&tgt.log);
    let (addr, h) = spawn_target(cfg.clone(), tgt).await;
    let mut o = migrate_via(vm, cfg, src, addr, h).await;
    o.digest_at_resume = log.lock().unwrap().digest_at_resume.take();
    o
}

/// Checks a successful migration and returns the VM on the target.
fn succeeded(o: Outcome, source_vm: Arc<Vm>) -> (Arc<Vm>, MigrationSummary) {
    let s = o.source.expect("source side failed");
    let (vm, t) = o.target.expect("target side failed");
    eprintln!("source: {s:?}");
    assert!(vm.is_running());
    assert!(!source_vm.is_running());
    assert_eq!(s.pages_pulled, s.bitmap_bits);
    assert_eq!(t.pages_pulled, t.bitmap_bits);
    assert_eq!(s.bitmap_bits, t.bitmap_bits);
    assert_eq!(s.pages_sent_per_round, t.pages_sent_per_round);
    // Integrity: the source's digest at quiesce, the target's from its page digests,
    // and the digest of the target's memory itself at resume all agree; so does the
    // source's memory, still frozen.
    assert_eq!(s.memory_sha256_source.len(), 64);
    assert_eq!(s.memory_sha256_source, s.memory_sha256_target);
    assert_eq!(t.memory_sha256_source, t.memory_sha256_target);
    assert_eq!(s.memory_sha256_source, t.memory_sha256_target);
    assert_eq!(
        o.digest_at_resume.as_deref(),
        Some(t.memory_sha256_target.as_str()),
        "target memory at resume"
    );
    assert_eq!(
        hex(&source_vm.memory().digest()),
        s.memory_sha256_source,
        "source memory since quiesce"
    );
    assert_eq!(s.downtime_us, t.downtime_us);
    assert!(s.rounds >= 1 && s.rounds <= 30);
    assert_eq!(s.pages_sent_per_round[0], source_vm.memory().page_count());
    // Live figures come while rounds run; the first round-end report is round 1's.
    assert!(matches!(
        o.progress.iter().find(|p| !matches!(p, Progress::Tick(_))),
        Some(Progress::Round { round: 1, .. })
    ));
    let n = s.rounds as usize;
    assert_eq!(s.throttle_pct_per_round.len(), n);
    assert_eq!(s.dirty_rate_pages_per_s_per_round.len(), n);
    assert_eq!(s.expected_downtime_us_per_round.len(), n);
    assert!(o
        .progress
        .iter()
        .any(|p| matches!(p, Progress::Quiesced { .. })));
    assert!(o
        .progress
        .iter()
        .any(|p| matches!(p, Progress::Pulled { pages } if *pages == s.pages_pulled)));
    assert!(
        matches!(o.progress.last(), Some(Progress::Resumed { t_us }) if *t_us == s.resume_t_us)
    );
    // Step 6: nothing but the caller holds the source VM; dropping it frees the memory.
    assert_eq!(Arc::strong_count(&source_vm), 1);
    let weak = Arc::downgrade(source_vm.memory());
    drop(source_vm);
    assert!(weak.upgrade().is_none(), "source memory still referenced");
    (vm, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_memory_survives_and_continues() {
    let vm = Vm::create(config("sweep", 32, 2, Pattern::Sweep, 200_000)).unwrap();
    vm.start();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let disk = Disk::owned_by("a");
    let mut src = Src::new("a", &disk);
    let o = migrate(&vm, &mcfg(), &mut src, Tgt::new("b", &disk)).await;
    let (vm_b, s) = succeeded(o, vm);
    assert_eq!(disk.owner().as_deref(), Some("b"));
    assert_eq!(src.quiesced, 1);
    assert_eq!(src.reclaims, 0);
    let before = vm_b.device_state();
    // Quiesce on the target: the sweep edge must still be unique.
    let st = vm_b.quiesce();
    check_sweep(vm_b.memory()).unwrap();
    assert!(st.pages_written() >= before.pages_written());
    assert_eq!(st.starts, 2, "continued, not rebooted");
    vm_b.start();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let st2 = vm_b.quiesce();
    assert!(
        st2.pages_written() > st.pages_written(),
        "the sweep continues"
    );
    check_sweep(vm_b.memory()).unwrap();
    assert!(s.bitmap_bits > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uniform_and_hot_set_back_and_forth() {
    for (name, pattern, vcpus) in [
        ("uniform", Pattern::Uniform, 4),
        ("hot", Pattern::HotSet { pages: 300 }, 2),
    ] {
        let vm = Vm::create(config(name, 16, vcpus, pattern, 20_000)).unwrap();
        fill(&vm);
        vm.start();
        let disk = Disk::owned_by("a");
        let mut src_a = Src::new("a", &disk);
        let o = migrate(&vm, &mcfg(), &mut src_a, Tgt::new("b", &disk)).await;
        let (vm_b, _) = succeeded(o, vm);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let mut src_b = Src::new("b", &disk);
        let o = migrate(&vm_b, &mcfg(), &mut src_b, Tgt::new("a", &disk)).await;
        let (vm_a, s) = succeeded(o, vm_b);
        assert_eq!(disk.owner().as_deref(), Some("a"));
        let st = vm_a.quiesce();
        assert_eq!(st.starts, 3);
        assert!(st.pages_written() > 0);
        assert_eq!(st.vcpus.len(), vcpus as usize);
        assert!(s.rounds >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_vm_digest_matches_its_memory_after_the_move() {
    let vm = Vm::create(config("still", 16, 1, Pattern::Idle, 0)).unwrap();
    fill(&vm);
    vm.memory().zero_page(100).unwrap();
    vm.start();
    let before = hex(&vm.memory().digest());
    let disk = Disk::owned_by("a");
    let mut src = Src::new("a", &disk);
    let o = migrate(&vm, &mcfg(), &mut src, Tgt::new("b", &disk)).await;
    let (vm_b, s) = succeeded(o, vm);
    // An idle guest writes nothing: its running memory still has the digest of both ends.
    assert_eq!(s.memory_sha256_target, before);
    assert_eq!(hex(&vm_b.memory().digest()), before);

    // Without verification neither end hashes anything.
    let cfg = MigrationConfig {
        verify_memory: false,
        ..mcfg()
    };
    let disk = Disk::owned_by("b");
    let mut src = Src::new("b", &disk);
    let (addr, h) = spawn_target(cfg.clone(), Tgt::new("a", &disk)).await;
    let o = migrate_via(&vm_b, &cfg, &mut src, addr, h).await;
    let s = o.source.unwrap();
    let (vm_a, t) = o.target.unwrap();
    assert!(s.memory_sha256_source.is_empty() && s.memory_sha256_target.is_empty());
    assert!(t.memory_sha256_source.is_empty() && t.memory_sha256_target.is_empty());
    assert_eq!(hex(&vm_a.memory().digest()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_dirty_rate_converges_cheaply() {
    let vm = Vm::create(config("calm", 32, 1, Pattern::Uniform, 1_000)).unwrap();
    fill(&vm);
    vm.start();
    let nonzero = vm.memory().nonzero_pages() * PAGE_SIZE as u64;
    let disk = Disk::owned_by("a");
    let mut src = Src::new("a", &disk);
    let o = migrate(&vm, &mcfg(), &mut src, Tgt::new("b", &disk)).await;
    let (_vm_b, s) = succeeded(o, vm);
    assert!(s.converged);
    assert!(s.rounds <= 30);
    assert!(
        (s.bytes_total as f64) <= 1.5 * nonzero as f64,
        "{} bytes for {} non-zero bytes",
        s.bytes_total,
        nonzero
    );
    // Zero pages (the service pages here) travel as flags.
    assert!(s.zero_pages >= vfabric::guest::SERVICE_PAGES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_dirtier_over_a_slow_link_ends_by_policy() {
    let cfg = MigrationConfig {
        bandwidth_limit: Some(24 << 20),
        auto_converge: false,
        plateau: None,
        ..mcfg()
    };
    // ForceStop: quiesce anyway, everything still arrives intact.
    let vm = Vm::create(config("busy", 8, 2, Pattern::Uniform, u64::MAX)).unwrap();
    vm.start();
    let disk = Disk::owned_by("a");
    let mut src = Src::new("a", &disk);
    let o = migrate(&vm, &cfg, &mut src, Tgt::new("b", &disk)).await;
    let (vm_b, s) = succeeded(o, vm);
    assert!(!s.converged);
    assert!(s.rounds < 30, "stopped because the set stopped shrinking");
    assert!(s.bitmap_bits > 1000, "most pages were dirty at quiesce");
    drop(vm_b);

    // Abort: the VM stays on the source, the target keeps nothing.
    let cfg = MigrationConfig {
        on_no_convergence: NoConvergence::Abort,
        ..cfg
    };
    let vm = Vm::create(config("busy", 8, 2, Pattern::Uniform, u64::MAX)).unwrap();
    vm.start();
    let disk = Disk::owned_by("a");
    let mut src = Src::new("a", &disk);
    let tgt = Tgt::new("b", &disk);
    let log = Arc::clone(&tgt.log);
    let o = migrate(&vm, &cfg, &mut src, tgt).await;
    let e = o.source.unwrap_err();
    assert_eq!(e.step, Step::PreCopy);
    assert!(matches!(e.kind, ErrorKind::NoConvergence(_)), "{e}");
    assert!(e.to_string().starts_with("migration failed in pre-copy"));
    assert!(e.vm_running && vm.is_running());
    let te = o.target.unwrap_err();
    assert!(matches!(te.kind, ErrorKind::PeerAborted(_)), "{te}");
    assert_eq!(log.lock().unwrap().resumed, 0);
    assert_eq!(src.quiesced, 0);
    assert_eq!(disk.owner().as_deref(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refusal_moves_no_page() {
    let vm = Vm::create(config("big", 16, 1, Pattern::Idle, 0)).unwrap();
    fill(&vm);
    vm.memory().dirty().clear();
    vm.start();
    let disk = Disk::owned_by("a");
    let mut tgt = Tgt::new("b", &disk);
    tgt.refuse = Some("host b: 16 MiB + overhead does not fit in 8 MiB free".into());
    let (taddr, th) = spawn_target(mcfg(), tgt).await;
    let (paddr, ph) = proxy(taddr, None).await;
    let mut src = Src::new("a", &disk);
    let o = migrate_via(&vm, &mcfg(), &mut src, paddr, th).await;
    let forwarded = ph.await.unwrap();
    let e = o.source.unwrap_err();
    assert_eq!(e.step, Step::PreCheck);
    assert!(e.to_string().contains("does not fit"), "{e}");
    assert!(e.vm_running && vm.is_running());
    assert!(o.target.is_err());
    assert!(o.progress.is_empty());
    assert!(forwarded < 4096, "{forwarded} bytes reached the target");
    assert_eq!(
        vm.memory().dirty().count(),
        0,
        "dirty logging never started"
    );
}

/// A proxy that forwards one connection to `to`, cutting both directions once
/// `cut_after` bytes went towards the target. Returns the bytes it forwarded that way.
async fn proxy(
    to: SocketAddr,
    cut_after: Option<u64>,
) -> (SocketAddr, tokio::task::JoinHandle<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (a, _) = l.accept().await.unwrap();
        let b = TcpStream::connect(to).await.unwrap();
        let (mut ar, mut aw) = a.into_split();
        let (mut br, mut bw) = b.into_split();
        let forward = async {
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0u64;
            loop {
                let r = ar.read(&mut buf).await.unwrap_or(0);
                if r == 0 {
                    return n;
                }
                let take = match cut_after {
                    Some(c) => (c - n).min(r as u64) as usize,
                    None => r,
                };
                if bw.write_all(&buf[..take]).await.is_err() {
                    return n;
                }
                n += take as u64;
                if cut_after == Some(n) {
                    return n;
                }
            }
        };
        let back = async {
            let _ = tokio::io::copy(&mut br, &mut aw).await;
            std::future::pending::<()>().await
        };
        tokio::select! {
            n = forward => n,
            _ = back => unreachable!(),
        }
        // Dropping every half resets both connections.
    });
    (addr, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_in_precopy_keeps_the_vm_on_the_source() {
    let vm = Vm::create(config("cut", 16, 1, Pattern::Idle, 0)).unwrap();
    fill(&vm);
    vm.start();
    let hash = vm.memory().digest();
    let disk = Disk::owned_by("a");
    let tgt = Tgt::new("b", &disk);
    let log = Arc::clone(&tgt.log);
    let (taddr, th) = spawn_target(mcfg(), tgt).await;
    let (paddr, ph) = proxy(taddr, Some(3 << 20)).await;
    let mut src = Src::new("a", &disk);
    let o = migrate_via(&vm, &mcfg(), &mut src, paddr, th).await;
    assert_eq!(ph.await.unwrap(), 3 << 20);
    let e = o.source.unwrap_err();
    assert_eq!(e.step, Step::PreCopy, "{e}");
    assert!(e.vm_running && vm.is_running());
    assert!(o.target.is_err());
    assert_eq!(log.lock().unwrap().resumed, 0);
    assert_eq!(src.quiesced, 0);
    vm.quiesce();
    assert_eq!(vm.memory().digest(), hash, "memory intact");
    vm.start();
    // A second attempt over a sound link succeeds.
    let o = migrate(&vm, &mcfg(), &mut src, Tgt::new("b", &disk)).await;
    let (vm_b, _) = succeeded(o, vm);
    vm_b.quiesce();
    assert_eq!(vm_b.memory().digest(), hash);
}

/// How a fake target misbehaves.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Read pre-copy, then drop the stream when the bitmap arrives.
    AtBitmap,
    /// Request the first pages, read half an answer, drop.
    DuringPull,
    /// Pull everything, read the device state, take the disk lock, then vanish
    /// without reporting the resume (the VM must not run on the source).
    AfterTakingDisk,
}

/// A target that speaks the protocol but fails on purpose.
async fn fake_target(fault: Fault, disk: Disk) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (r, w) = s.into_split();
        let t = Duration::from_secs(5);
        let mut rd = Reader::new(r, t);
        let mut wr = Writer::new(w, t);
        let Message::Hello { config_json } = rd.recv().await.unwrap() else {
            panic!("no hello")
        };
        let cfg: VmConfig = serde_json::from_slice(config_json).unwrap();
        rd.set_limits(Limits {
            pages: cfg.page_count(),
        });
        wr.send_flush(&Message::Accept).await.unwrap();
        let words = loop {
            match rd.recv().await.unwrap() {
                Message::Pages(_) => {}
                Message::RoundEnd { round } => {
                    wr.send_flush(&Message::RoundAck { round }).await.unwrap()
                }
                Message::Bitmap { words, .. } => break words.into_owned(),
                m => panic!("unexpected {m:?}"),
            }
        };
        if let Fault::AtBitmap = fault {
            return;
        }
        let reqs = proto::pull_requests(&words);
        if let Fault::DuringPull = fault {
            // Only this fault needs dirty pages; on a loaded machine the workload may
            // not have run since the last round.
            assert!(!reqs.is_empty(), "test VM must dirty pages");
            wr.send_flush(&Message::PullRequest {
                ranges: reqs[0].as_slice().into(),
            })
            .await
            .unwrap();
            // One batch of the answer, then gone while more are on their way.
            let _ = rd.recv().await;
            return;
        }
        let bits = count_set(&words);
        for r in &reqs {
            wr.send_flush(&Message::PullRequest {
                ranges: r.as_slice().into(),
            })
            .await
            .unwrap();
        }
        wr.send_flush(&Message::PullEnd).await.unwrap();
        let mut got = 0u64;
        while got < bits {
            match rd.recv().await.unwrap() {
                Message::Pages(v) => got += v.count() as u64,
                m => panic!("unexpected {m:?}"),
            }
        }
        assert!(matches!(
            rd.recv().await.unwrap(),
            Message::DeviceState { .. }
        ));
        disk.set(Some("b"));
    });
    (addr, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_failures_after_quiesce_resume_the_vm_on_the_source() {
    for fault in [Fault::AtBitmap, Fault::DuringPull] {
        let vm = Vm::create(config("sweeper", 8, 1, Pattern::Sweep, 50_000)).unwrap();
        vm.start();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let disk = Disk::owned_by("a");
        let (addr, fh) = fake_target(fault, disk.clone()).await;
        let mut src = Src::new("a", &disk);
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut progress = Vec::new();
        let e = migrate_out(Arc::clone(&vm), stream, &mcfg(), &mut src, &mut |p| {
            progress.push(p)
        })
        .await
        .unwrap_err();
        fh.await.unwrap();
        match fault {
            Fault::AtBitmap => assert!(matches!(e.step, Step::Bitmap | Step::Pull), "{e}"),
            _ => assert_eq!(e.step, Step::Pull, "{e}"),
        }
        assert!(e.vm_running, "{fault:?}: {e}");
        assert!(vm.is_running());
        assert_eq!((src.quiesced, src.reclaims), (1, 1));
        assert_eq!(disk.owner().as_deref(), Some("a"));
        let before = vm.device_state().pages_written();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let st = vm.quiesce();
        assert!(st.pages_written() > before, "workload continues");
        check_sweep(vm.memory()).unwrap();
        // The dirty bits of the failed attempt were put back.
        assert!(vm.memory().dirty().count() > 0);
        vm.start();
        let o = migrate(&vm, &mcfg(), &mut src, Tgt::new("b", &disk)).await;
        let (vm_b, _) = succeeded(o, vm);
        vm_b.quiesce();
        check_sweep(vm_b.memory()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_lock_decides_when_the_target_vanishes() {
    let vm = Vm::create(config("orphan", 8, 1, Pattern::Uniform, 5_000)).unwrap();
    vm.start();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let disk = Disk::owned_by("a");
    let (addr, fh) = fake_target(Fault::AfterTakingDisk, disk.clone()).await;
    let mut src = Src::new("a", &disk);
    let stream = TcpStream::connect(addr).await.unwrap();
    let e = migrate_out(Arc::clone(&vm), stream, &mcfg(), &mut src, &mut |_| {})
        .await
        .unwrap_err();
    fh.await.unwrap();
    assert_eq!(e.step, Step::Resume, "{e}");
    assert!(!e.vm_running, "the target took the disk: no resume here");
    assert!(!vm.is_running());
    assert_eq!(disk.owner().as_deref(), Some("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_resume_on_the_target_returns_the_vm() {
    let vm = Vm::create(config("back", 8, 1, Pattern::Idle, 0)).unwrap();
    fill(&vm);
    vm.memory()
        .write(GuestAddress(100), b"service state")
        .unwrap();
    vm.start();
    let hash = vm.memory().digest();
    let disk = Disk::owned_by("a");
    let mut tgt = Tgt::new("b", &disk);
    tgt.fail_resume = true;
    let mut src = Src::new("a", &disk);
    let o = migrate(&vm, &mcfg(), &mut src, tgt).await;
    let e = o.source.unwrap_err();
    assert_eq!(e.step, Step::Resume, "{e}");
    assert!(e.to_string().contains("injected"), "{e}");
    assert!(e.vm_running && vm.is_running());
    let te = o.target.unwrap_err();
    assert_eq!(te.step, Step::Resume);
    assert!(!te.vm_running);
    assert_eq!(disk.owner().as_deref(), Some("a"));
    vm.quiesce();
    assert_eq!(vm.memory().digest(), hash);
    assert_eq!(hex(&hash).len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_target_times_out_in_precheck() {
    let vm = Vm::create(config("quiet", 4, 1, Pattern::Idle, 0)).unwrap();
    vm.start();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let keep = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(s);
    });
    let cfg = MigrationConfig {
        io_timeout: Duration::from_millis(200),
        ..mcfg()
    };
    let disk = Disk::owned_by("a");
    let mut src = Src::new("a", &disk);
    let stream = TcpStream::connect(addr).await.unwrap();
    let e = migrate_out(Arc::clone(&vm), stream, &cfg, &mut src, &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.step, Step::PreCheck);
    assert!(e.to_string().contains("no progress"), "{e}");
    assert!(vm.is_running());
    keep.abort();
}

/// Cancels a migration of `vm` once the target has admitted it (pre-copy runs, capped so
/// that it would last seconds); returns the source's error and how long the cancel took.
async fn cancel_in_precopy(vm: &Arc<Vm>) -> (MigrationError, Duration) {
    let disk = Disk::owned_by("a");
    let mut src = Src::new("a", &disk);
    let tgt = Tgt::new("b", &disk);
    let log = Arc::clone(&tgt.log);
    let cfg = MigrationConfig {
        bandwidth_limit: Some(4_000_000),
        ..mcfg()
    };
    let (addr, target) = spawn_target(cfg.clone(), tgt).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let cancel = Cancel::new();
    let c = cancel.clone();
    let canceller = tokio::spawn(async move {
        while log.lock().unwrap().admitted == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.cancel();
        std::time::Instant::now()
    });
    let r =
        migrate_out_cancellable(Arc::clone(vm), stream, &cfg, &mut src, &mut |_| {}, &cancel).await;
    let took = canceller.await.unwrap().elapsed();
    let e = r.expect_err("the migration was cancelled");
    // The target discards its copy and keeps nothing.
    assert!(target.await.unwrap().is_err());
    assert_eq!(src.quiesced, 0);
    assert_eq!(disk.owner().as_deref(), Some("a"));
    (e, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_in_precopy_leaves_the_vm_running_on_the_source_intact() {
    // Idle: memory must be exactly what it was.
    let vm = Vm::create(config("idle", 32, 1, Pattern::Idle, 0)).unwrap();
    fill(&vm);
    vm.start();
    let before = hex(&vm.memory().digest());
    let (e, took) = cancel_in_precopy(&vm).await;
    eprintln!("idle: cancelled in {took:?}: {e}");
    assert!(matches!(e.kind, ErrorKind::Cancelled), "{e}");
    assert_eq!(e.step, Step::PreCopy);
    assert!(e.vm_running && vm.is_running());
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(hex(&vm.memory().digest()), before, "memory changed");

    // Busy: the sweep goes on, and its pattern is whole.
    let vm = Vm::create(config("busy", 32, 2, Pattern::Sweep, 200_000)).unwrap();
    vm.start();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (e, took) = cancel_in_precopy(&vm).await;
    eprintln!("busy: cancelled in {took:?}: {e}");
    assert!(matches!(e.kind, ErrorKind::Cancelled), "{e}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(vm.is_running());
    let st = vm.quiesce();
    check_sweep(vm.memory()).unwrap();
    vm.start();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        vm.quiesce().pages_written() > st.pages_written(),
        "the VM runs on"
    );
}

/// What a lying target reports as its memory digest after the resume.
#[derive(Clone, Copy, Debug)]
enum Claim {
    Wrong,
    Missing,
}

/// A target that receives everything, takes the disk, resumes, and reports a digest
/// that is not the source's; then it expects the rollback and gives the disk back.
async fn lying_target(claim: Claim, disk: Disk) -> (SocketAddr, tokio::task::JoinHandle<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (r, w) = s.into_split();
        let t = Duration::from_secs(20);
        let mut rd = Reader::new(r, t);
        let mut wr = Writer::new(w, t);
        let Message::Hello { config_json } = rd.recv().await.unwrap() else {
            panic!("no hello")
        };
        let cfg: VmConfig = serde_json::from_slice(config_json).unwrap();
        rd.set_limits(Limits {
            pages: cfg.page_count(),
        });
        wr.send_flush(&Message::Accept).await.unwrap();
        let words = loop {
            match rd.recv().await.unwrap() {
                Message::Pages(_) => {}
                Message::RoundEnd { round } => {
                    wr.send_flush(&Message::RoundAck { round }).await.unwrap()
                }
                Message::Bitmap { words, .. } => break words.into_owned(),
                m => panic!("unexpected {m:?}"),
            }
        };
        for r in &proto::pull_requests(&words) {
            wr.send_flush(&Message::PullRequest {
                ranges: r.as_slice().into(),
            })
            .await
            .unwrap();
        }
        wr.send_flush(&Message::PullEnd).await.unwrap();
        let (bits, mut got) = (count_set(&words), 0u64);
        while got < bits {
            match rd.recv().await.unwrap() {
                Message::Pages(v) => got += v.count() as u64,
                m => panic!("unexpected {m:?}"),
            }
        }
        assert!(matches!(
            rd.recv().await.unwrap(),
            Message::DeviceState { .. }
        ));
        disk.set(Some("b"));
        let sha256 = match claim {
            Claim::Wrong => Some([0xab; 32]),
            Claim::Missing => None,
        };
        wr.send_flush(&Message::Resumed { t_us: 1, sha256 })
            .await
            .unwrap();
        match rd.recv().await.unwrap() {
            Message::Rollback { .. } => {
                disk.set(None);
                wr.send_flush(&Message::RolledBack).await.unwrap();
                true
            }
            _ => false,
        }
    });
    (addr, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_target_digest_fails_and_the_vm_stays() {
    for claim in [Claim::Wrong, Claim::Missing] {
        let vm = Vm::create(config("verified", 8, 1, Pattern::Sweep, 20_000)).unwrap();
        vm.start();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let disk = Disk::owned_by("a");
        let (addr, fh) = lying_target(claim, disk.clone()).await;
        let mut src = Src::new("a", &disk);
        let stream = TcpStream::connect(addr).await.unwrap();
        let e = migrate_out(Arc::clone(&vm), stream, &mcfg(), &mut src, &mut |_| {})
            .await
            .unwrap_err();
        assert!(
            fh.await.unwrap(),
            "{claim:?}: the target was not told to roll back"
        );
        assert_eq!(e.step, Step::Verify, "{claim:?}: {e}");
        assert!(matches!(e.kind, ErrorKind::Verify(_)), "{e}");
        assert!(e.vm_running && vm.is_running(), "{claim:?}: {e}");
        assert_eq!(disk.owner().as_deref(), Some("a"));
        vm.quiesce();
        check_sweep(vm.memory()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_does_not_verify_gives_the_vm_back() {
    let vm = Vm::create(config("strict", 8, 1, Pattern::Uniform, 5_000)).unwrap();
    fill(&vm);
    vm.start();
    let disk = Disk::owned_by("a");
    let tgt = Tgt::new("b", &disk);
    let log = Arc::clone(&tgt.log);
    // The target digests nothing, so it can report no digest.
    let tcfg = MigrationConfig {
        verify_memory: false,
        ..mcfg()
    };
    let (addr, h) = spawn_target(tcfg, tgt).await;
    let mut src = Src::new("a", &disk);
    let o = migrate_via(&vm, &mcfg(), &mut src, addr, h).await;
    let e = o.source.unwrap_err();
    assert_eq!(e.step, Step::Verify, "{e}");
    assert!(e.to_string().contains("no memory digest"), "{e}");
    assert!(e.vm_running && vm.is_running());
    let te = o.target.unwrap_err();
    assert_eq!(te.step, Step::Verify);
    let log = log.lock().unwrap();
    assert_eq!((log.resumed, log.rolled_back), (1, 1));
    assert_eq!(disk.owner().as_deref(), Some("a"));
}

/// A sweeping VM that dirties 20 000 pages/s, over a link capped at 24 MiB/s (6 144
/// pages/s): without a throttle its dirty set cannot shrink below most of memory.
fn fast_sweeper(name: &str) -> Arc<Vm> {
    let vm = Vm::create(config(name, 32, 1, Pattern::Sweep, 20_000)).unwrap();
    vm.start();
    vm
}

fn capped() -> MigrationConfig {
    MigrationConfig {
        bandwidth_limit: Some(24 << 20),
        ..mcfg()
    }
}

/// Pages the VM's vCPUs write in `ms` while running.
async fn pages_written_in(vm: &Vm, ms: u64) -> u64 {
    let before = vm.device_state().pages_written();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    vm.device_state().pages_written() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_converge_brings_a_fast_dirtier_over_a_capped_link_home() {
    let vm = fast_sweeper("sdps");
    let cfg = MigrationConfig {
        auto_converge: true,
        ..capped()
    };
    let disk = Disk::owned_by("a");
    let mut src = Src::new("a", &disk);
    let o = migrate(&vm, &cfg, &mut src, Tgt::new("b", &disk)).await;
    let throttles: Vec<u8> = o
        .progress
        .iter()
        .filter_map(|p| match p {
            Progress::Throttle { pct, .. } => Some(*pct),
            _ => None,
        })
        .collect();
    let (vm_b, s) = succeeded(o, vm);
    eprintln!("throttle per round {:?}", s.throttle_pct_per_round);
    assert!(s.converged, "auto-converge reaches the downtime target");
    assert!(!throttles.is_empty(), "the vCPUs were throttled");
    assert!(throttles.windows(2).all(|w| w[0] < w[1]), "{throttles:?}");
    assert!(*s.throttle_pct_per_round.last().unwrap() > 0);
    assert!(s.throttle_pct_per_round.windows(2).all(|w| w[0] <= w[1]));
    // The VM runs on the target at full speed: the throttle stayed behind.
    check_sweep(vm_b.memory()).unwrap();
    let n = pages_written_in(&vm_b, 300).await;
    assert!(n > 3_000, "{n} pages in 300 ms on the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_figures_come_while_a_round_is_sent() {
    // 4 MiB of used memory over a 1 MiB/s cap: the first round alone lasts 4 s,
    // however fast the machine, and each 1 MiB batch takes a second of it: the
    // reports must still come at least twice a second.
    let vm = Vm::create(config("ticks", 4, 1, Pattern::Uniform, 0)).unwrap();
    fill(&vm);
    vm.start();
    let cfg = MigrationConfig {
        bandwidth_limit: Some(1 << 20),
        ..mcfg()
    };
    let disk = Disk::owned_by("a");
    let mut src = Src::new("a", &disk);
    let o = migrate(&vm, &cfg, &mut src, Tgt::new("b", &disk)).await;
    let ticks: Vec<Tick> = o
        .progress
        .iter()
        .filter_map(|p| match p {
            Progress::Tick(t) if t.round == 1 => Some(t.clone()),
            _ => None,
        })
        .collect();
    succeeded(o, vm);
    assert!(
        ticks.len() >= 8,
        "{} live reports in a 4 s round",
        ticks.len()
    );
    // Reports never go back, and the round visibly advances between them (a batch
    // goes out at once, then the cap holds the next one back).
    for w in ticks.windows(2) {
        assert!(w[0].transferred_bytes <= w[1].transferred_bytes, "{w:?}");
        assert!(w[0].remaining_pages >= w[1].remaining_pages, "{w:?}");
    }
    let (first, last) = (&ticks[0], &ticks[ticks.len() - 1]);
    assert!(first.remaining_pages > last.remaining_pages, "{ticks:?}");
    assert_eq!(first.total_bytes, 4 << 20);
    assert!(first.bandwidth_mbps > 0.0, "{first:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stun_guard_aborts_and_the_vm_runs_on_at_full_speed() {
    // Auto-converge off, guard at 50 ms: the first stall aborts; nothing was slowed.
    // Auto-converge on, but only two rounds and a 1 ms guard and target: the throttle
    // cannot get the estimate under the guard in time (a few dirty pages already take
    // longer to send); the abort must release it.
    for (ac, rounds, guard_ms, target_ms) in [(false, 30, 50, 5), (true, 2, 1, 1)] {
        let vm = fast_sweeper("stun");
        let cfg = MigrationConfig {
            auto_converge: ac,
            max_rounds: rounds,
            max_downtime: Duration::from_millis(guard_ms),
            downtime_target: Duration::from_millis(target_ms),
            ..capped()
        };
        let disk = Disk::owned_by("a");
        let mut src = Src::new("a", &disk);
        let tgt = Tgt::new("b", &disk);
        let log = Arc::clone(&tgt.log);
        let o = migrate(&vm, &cfg, &mut src, tgt).await;
        let e = match o.source {
            Ok(s) => panic!("migrated: {s:?}"),
            Err(e) => e,
        };
        eprintln!("{e}");
        let ErrorKind::StunGuard {
            expected_downtime_us,
            max_downtime_us,
            ..
        } = e.kind
        else {
            panic!("not the stun guard: {e}");
        };
        assert!(expected_downtime_us > max_downtime_us);
        let msg = e.to_string();
        for part in ["stun guard", "pages/s", "Mbit/s", "limit ", "ms"] {
            assert!(msg.contains(part), "{part:?} missing from {msg}");
        }
        assert_eq!(e.step, Step::PreCopy);
        assert!(e.vm_running && vm.is_running());
        assert_eq!(src.quiesced, 0, "never stopped");
        assert_eq!(log.lock().unwrap().resumed, 0);
        assert!(o.target.is_err());
        assert_eq!(disk.owner().as_deref(), Some("a"));
        let throttled = o
            .progress
            .iter()
            .any(|p| matches!(p, Progress::Throttle { .. }));
        assert_eq!(throttled, ac);
        // Full speed again: 20 000 pages/s would write 6 000 in 300 ms; at the throttle
        // the migration reached it would be a few hundred at most.
        assert_eq!(vm.throttle(), 0);
        let n = pages_written_in(&vm, 300).await;
        assert!(n > 3_000, "{n} pages in 300 ms after the abort");
        // Memory intact: the sweep's single edge holds, and a frozen VM's memory has the
        // digest it had (no write came from anywhere but the vCPU).
        vm.quiesce();
        check_sweep(vm.memory()).unwrap();
        let d = vm.memory().digest();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(vm.memory().digest(), d);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ends_run_over_an_in_memory_pipe() {
    let vm = Vm::create(config("pipe", 8, 1, Pattern::Sweep, 5_000)).unwrap();
    vm.start();
    let (a, b) = tokio::io::duplex(1 << 20);
    let cfg = mcfg();
    let disk = Disk::owned_by("a");
    let mut tgt = Tgt::new("b", &disk);
    let tcfg = cfg.clone();
    let target = tokio::spawn(async move { migrate_in(b, &tcfg, &mut tgt).await });
    let mut src = Src::new("a", &disk);
    let mut progress = Vec::new();
    let s = migrate_out(Arc::clone(&vm), a, &cfg, &mut src, &mut |p| {
        progress.push(p)
    })
    .await
    .unwrap();
    let (vm_b, t) = target.await.unwrap().unwrap();
    assert_eq!(s.memory_sha256_source, t.memory_sha256_target);
    assert_eq!(s.pages_pulled, t.pages_pulled);
    check_sweep(vm_b.memory()).unwrap();
}
