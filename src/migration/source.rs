//! Source end of a migration (adapter): drives the phases over the stream, reads guest
//! memory, asks the policy when to stop, and takes the VM back on any failure.
//!
//! Until quiesce the VM runs all along, so a failure only has to put back the dirty
//! bits it harvested and not yet sent. After quiesce, a failure puts back the final
//! bitmap and resumes the VM only if `SourceHooks::reclaim` retakes its disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{split_stream, BoxRead, BoxWrite, ConnError, MigrationStream, Reader, Writer};
use super::policy::{self, Decision, Figures};
use super::proto::{Limits, Message, PageRange, PagesEncoder, MAX_MESSAGE};
use super::{
    mbps, Cancel, ErrorKind, MigrationConfig, MigrationError, MigrationSummary, NoConvergence,
    Progress, SourceHooks, Step,
};
use crate::clock::unix_micros;
use crate::guest::{DeviceState, Vm};
use crate::memory::{count_set, hex, set_pages, GuestMemory, PAGE_SIZE};

/// How long last words (an abort notice) may take to a peer that may be gone.
const LAST_WORDS: Duration = Duration::from_millis(200);

type Failure = (Step, ErrorKind);

fn at(step: Step) -> impl Fn(ConnError) -> Failure {
    move |e| (step, ErrorKind::Conn(e))
}

struct Source<'c> {
    vm: Arc<Vm>,
    name: String,
    cfg: &'c MigrationConfig,
    rd: Reader<BoxRead>,
    wr: Writer<BoxWrite>,
    batch: Vec<u8>,
    was_running: bool,
    started: Instant,
    precopy_started: Instant,
    pages_per_round: Vec<u64>,
    bytes_per_round: Vec<u64>,
    zero_pages: u64,
    /// The digest of memory at quiesce, computed beside the pull.
    digest: Option<tokio::sync::oneshot::Receiver<[u8; 32]>>,
    /// Tells the digest's thread that the downtime is over: it may leave idle priority.
    digest_hurry: Arc<AtomicBool>,
    /// The operator's cancel, honoured until the device state is sent.
    cancel: Cancel,
    /// Pre-copy has begun (a cancel is reported in pre-copy rather than pre-check).
    in_precopy: bool,
}

/// Result of the switch-over phases (bitmap to resume).
struct SwitchOver {
    resume_t_us: u64,
    resumed_at: Instant,
    target_sha: Option<[u8; 32]>,
    pulled: u64,
    bytes_pulled: u64,
}

/// Migrates `vm` to the target at the other end of `stream`.
///
/// On `Ok` the VM runs on the target; the caller drops its `Arc<Vm>`, which frees the
/// memory (no vCPU thread holds it any more). On `Err` the VM runs on the source again
/// with its memory intact (`vm_running`), unless it was not running to begin with or
/// `hooks.reclaim` reported that the target owns it.
pub async fn migrate_out(
    vm: Arc<Vm>,
    stream: impl MigrationStream,
    cfg: &MigrationConfig,
    hooks: &mut dyn SourceHooks,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<MigrationSummary, MigrationError> {
    migrate_out_cancellable(vm, stream, cfg, hooks, progress, &Cancel::new()).await
}

/// [`migrate_out`] that stops with [`ErrorKind::Cancelled`] when `cancel` fires before
/// the point of no return (the device state sent); the VM then runs on the source.
pub async fn migrate_out_cancellable(
    vm: Arc<Vm>,
    stream: impl MigrationStream,
    cfg: &MigrationConfig,
    hooks: &mut dyn SourceHooks,
    progress: &mut (dyn FnMut(Progress) + Send),
    cancel: &Cancel,
) -> Result<MigrationSummary, MigrationError> {
    let (rd, wr) = split_stream(stream);
    let now = Instant::now();
    let mut s = Source {
        name: vm.config().name.clone(),
        was_running: vm.is_running(),
        vm,
        cfg,
        rd: Reader::new(rd, cfg.io_timeout),
        wr: Writer::new(wr, cfg.io_timeout),
        batch: vec![0; MAX_MESSAGE],
        started: now,
        precopy_started: now,
        pages_per_round: Vec::new(),
        bytes_per_round: Vec::new(),
        zero_pages: 0,
        digest: None,
        digest_hurry: Arc::new(AtomicBool::new(false)),
        cancel: cancel.clone(),
        in_precopy: false,
    };
    s.rd.set_limits(Limits {
        pages: s.vm.memory().page_count(),
    });

    // Pre-check and pre-copy: the VM runs throughout. A cancel drops them wherever they
    // are (mid-batch too): the VM never stopped, and reading memory changed nothing.
    let run = async {
        match s.precheck().await {
            Ok(()) => {
                hooks.at_phase(Step::PreCopy).await;
                s.precopy(progress).await
            }
            Err(f) => Err(f),
        }
    };
    let converged = tokio::select! {
        r = run => r,
        () = cancel.cancelled() => Err((Step::PreCheck, ErrorKind::Cancelled)),
    };
    let converged = match converged {
        Ok(c) => c,
        Err((_, ErrorKind::Cancelled)) => {
            // The stream may end mid-message: the target sees it close and discards.
            let step = if s.in_precopy {
                Step::PreCopy
            } else {
                Step::PreCheck
            };
            return Err(s.failed(step, ErrorKind::Cancelled, s.vm.is_running()));
        }
        Err((step, kind)) => {
            s.abort(&kind).await;
            return Err(s.failed(step, kind, s.vm.is_running()));
        }
    };

    // A cancel that came with the last round's answer: the VM has not stopped yet.
    if s.cancel.is_cancelled() {
        s.abort(&ErrorKind::Cancelled).await;
        return Err(s.failed(Step::PreCopy, ErrorKind::Cancelled, s.vm.is_running()));
    }
    // Quiesce: from here until the target's report the VM runs nowhere.
    let state = s.vm.quiesce();
    let quiesce_t_us = unix_micros();
    hooks.at_phase(Step::Quiesce).await;
    if let Err(e) = hooks.quiesced(&s.vm) {
        let kind = ErrorKind::Hook(e);
        s.abort(&kind).await;
        let running = s.take_back(hooks);
        return Err(s.failed(Step::Quiesce, kind, running));
    }
    // Nothing writes memory any more: the dirty set is final.
    let words = s.vm.memory().dirty().harvest();
    let bits = count_set(&words);
    progress(Progress::Quiesced {
        t_us: quiesce_t_us,
        dirty_pages: bits,
    });
    tracing::info!(
        t_us = quiesce_t_us,
        vm = %s.name,
        phase = "quiesce",
        dirty_pages = bits,
        converged,
        "migration phase"
    );
    hooks.at_phase(Step::Bitmap).await;
    let done = match s
        .switch_over(&words, converged, quiesce_t_us, &state, progress)
        .await
    {
        Ok(done) => done,
        Err((step, kind)) => {
            s.abort(&kind).await;
            s.vm.memory().dirty().merge(&words);
            let running = s.take_back(hooks);
            return Err(s.failed(step, kind, running));
        }
    };
    let total = done.resumed_at - s.started;

    s.digest_hurry.store(true, Ordering::Relaxed);
    let source_sha = match s.digest.take() {
        Some(h) => h.await.ok(),
        None => None,
    };
    // Success means verified: the VM is freed here only once the target's memory is
    // known to be ours; otherwise the target stops its copy and the VM resumes here.
    if cfg.verify_memory {
        if let Err(reason) = check_digests(source_sha, done.target_sha) {
            s.roll_back(&reason).await;
            let running = s.take_back(hooks);
            return Err(s.failed(Step::Verify, ErrorKind::Verify(reason), running));
        }
    }
    // The target runs the VM; telling it our hash is a courtesy it can live without.
    s.wr.send_now(&Message::Complete { sha256: source_sha }, s.cfg.io_timeout)
        .await;
    s.wr.shutdown().await;

    let summary = MigrationSummary {
        vm: s.name.clone(),
        rounds: s.pages_per_round.len() as u32,
        pages_sent_per_round: std::mem::take(&mut s.pages_per_round),
        bytes_per_round: std::mem::take(&mut s.bytes_per_round),
        zero_pages: s.zero_pages,
        bitmap_bits: bits,
        pages_pulled: done.pulled,
        downtime_us: done.resume_t_us.saturating_sub(quiesce_t_us),
        total_ms: total.as_millis() as u64,
        throughput_mbps: mbps(s.wr.sent(), total),
        converged,
        memory_sha256_source: source_sha.map(|h| hex(&h)).unwrap_or_default(),
        memory_sha256_target: done.target_sha.map(|h| hex(&h)).unwrap_or_default(),
        quiesce_t_us,
        resume_t_us: done.resume_t_us,
        bytes_pulled: done.bytes_pulled,
        bytes_total: s.wr.sent(),
        transport: String::new(),
    };
    tracing::info!(
        t_us = unix_micros(),
        vm = %summary.vm,
        phase = "done",
        rounds = summary.rounds,
        downtime_us = summary.downtime_us,
        total_ms = summary.total_ms,
        throughput_mbps = summary.throughput_mbps,
        bitmap_bits = summary.bitmap_bits,
        pages_pulled = summary.pages_pulled,
        converged,
        "migration phase"
    );
    Ok(summary)
}

/// The verdict on the two memory digests: equal, or why not.
fn check_digests(source: Option<[u8; 32]>, target: Option<[u8; 32]>) -> Result<(), String> {
    match (source, target) {
        (Some(s), Some(t)) if s == t => Ok(()),
        (None, _) => Err("the source could not digest its memory".into()),
        (_, None) => Err("the target reported no memory digest".into()),
        (Some(s), Some(t)) => Err(format!(
            "the target's memory digest {} differs from the source's {}",
            hex(&t),
            hex(&s)
        )),
    }
}

impl Drop for Source<'_> {
    fn drop(&mut self) {
        // Whatever the outcome, a digest still running no longer holds up the downtime.
        self.digest_hurry.store(true, Ordering::Relaxed);
    }
}

impl Source<'_> {
    fn failed(&self, step: Step, kind: ErrorKind, vm_running: bool) -> MigrationError {
        tracing::warn!(
            t_us = unix_micros(),
            vm = %self.name,
            step = %step,
            error = %kind,
            vm_running,
            "migration failed"
        );
        MigrationError {
            step,
            kind,
            vm_running,
        }
    }

    /// Tells the target we give up (if it still listens).
    async fn abort(&mut self, kind: &ErrorKind) {
        let reason = kind.to_string();
        self.wr
            .send_now(
                &Message::Abort {
                    reason: reason.into(),
                },
                LAST_WORDS,
            )
            .await;
    }

    /// Asks the target to stop its unverified copy and give the disk back, and waits
    /// for its answer; the disk lock decides afterwards either way.
    async fn roll_back(&mut self, reason: &str) {
        let msg = Message::Rollback {
            reason: reason.into(),
        };
        self.wr.send_now(&msg, self.cfg.io_timeout).await;
        self.rd.set_timeout(self.cfg.io_timeout);
        match self.rd.recv().await {
            Ok(Message::RolledBack) => {
                tracing::info!(t_us = unix_micros(), vm = %self.name, "target rolled back")
            }
            Ok(m) => tracing::warn!(vm = %self.name, kind = %m.kind(), "no rollback answer"),
            Err(e) => tracing::warn!(vm = %self.name, error = %e, "no rollback answer"),
        }
    }

    /// After a failure past quiesce: retake the disk and resume, if allowed.
    fn take_back(&self, hooks: &mut dyn SourceHooks) -> bool {
        if !hooks.reclaim(&self.vm) {
            tracing::error!(
                t_us = unix_micros(),
                vm = %self.name,
                "disk lock not retaken: not resuming on the source"
            );
            return false;
        }
        if self.was_running {
            self.vm.start();
            tracing::info!(t_us = unix_micros(), vm = %self.name, "VM resumed on the source");
        }
        self.was_running
    }

    async fn precheck(&mut self) -> Result<(), Failure> {
        let step = Step::PreCheck;
        tracing::info!(
            t_us = unix_micros(),
            vm = %self.name,
            phase = "precheck",
            memory_mb = self.vm.config().memory_mb,
            "migration phase"
        );
        let json = serde_json::to_vec(self.vm.config())
            .map_err(|e| (step, ErrorKind::Config(e.to_string())))?;
        self.wr
            .send_flush(&Message::Hello { config_json: &json })
            .await
            .map_err(at(step))?;
        match self.rd.recv().await.map_err(at(step))? {
            Message::Accept => Ok(()),
            Message::Refuse { reason } => Err((step, ErrorKind::Refused(reason.into_owned()))),
            Message::Abort { reason } => Err((step, ErrorKind::PeerAborted(reason.into_owned()))),
            m => Err((step, ErrorKind::Unexpected(m.kind()))),
        }
    }

    /// Sends rounds until the policy says stop. Returns whether it converged.
    async fn precopy(
        &mut self,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<bool, Failure> {
        let step = Step::PreCopy;
        self.in_precopy = true;
        let mem = Arc::clone(self.vm.memory());
        let limits = self.cfg.policy_limits();
        // Dirty logging starts with everything dirty: round 1 sends every page.
        mem.dirty().mark_all();
        self.precopy_started = Instant::now();
        let start_sent = self.wr.sent();
        let mut round = 0u32;
        loop {
            round += 1;
            let words = mem.dirty().harvest();
            let before = self.wr.sent();
            let t = Instant::now();
            let sent = match self.send_round(round, &words).await {
                Ok(sent) => sent,
                Err(e) => {
                    // Nothing harvested may be lost if the VM stays here.
                    mem.dirty().merge(&words);
                    return Err((step, e));
                }
            };
            let bytes = self.wr.sent() - before;
            let dirty = mem.dirty().count();
            let throughput = mbps(bytes, t.elapsed());
            self.pages_per_round.push(sent);
            self.bytes_per_round.push(bytes);
            progress(Progress::Round {
                round,
                pages_sent: sent,
                dirty_pages: dirty,
                throughput_mbps: throughput,
            });
            let total = self.wr.sent() - start_sent;
            let elapsed = self.precopy_started.elapsed().as_secs_f64();
            let figures = Figures {
                round,
                sent_pages: sent,
                dirty_pages: dirty,
                bandwidth_bps: if elapsed > 0.0 {
                    total as f64 / elapsed
                } else {
                    0.0
                },
                bytes_sent: total,
                memory_bytes: mem.size(),
            };
            let decision = policy::decide(&figures, &limits);
            tracing::info!(
                t_us = unix_micros(),
                vm = %self.name,
                phase = "precopy",
                round,
                pages_sent = sent,
                bytes,
                dirty_pages = dirty,
                throughput_mbps = throughput,
                estimated_downtime_us = figures.estimated_downtime().as_micros() as u64,
                decision = ?decision,
                "migration phase"
            );
            match decision {
                Decision::Continue => {}
                Decision::Converged => return Ok(true),
                Decision::NoConvergence(reason) => match self.cfg.on_no_convergence {
                    NoConvergence::ForceStop => return Ok(false),
                    NoConvergence::Abort => return Err((step, ErrorKind::NoConvergence(reason))),
                },
            }
        }
    }

    /// Sends one pre-copy round and waits until the target has applied it.
    async fn send_round(&mut self, round: u32, words: &[u64]) -> Result<u64, ErrorKind> {
        let sent = self.send_pages(round, set_pages(words), true).await?;
        self.wr.send_flush(&Message::RoundEnd { round }).await?;
        match self.rd.recv().await? {
            Message::RoundAck { round: r } if r == round => Ok(sent),
            Message::Abort { reason } => Err(ErrorKind::PeerAborted(reason.into_owned())),
            m => Err(ErrorKind::Unexpected(m.kind())),
        }
    }

    /// Sends `pages` in batches of round `round` (0: pull answers). Returns the number
    /// of pages sent. Pre-copy batches honour the bandwidth cap.
    async fn send_pages(
        &mut self,
        round: u32,
        pages: impl Iterator<Item = u64>,
        capped: bool,
    ) -> Result<u64, ConnError> {
        let mem = Arc::clone(self.vm.memory());
        let mut pages = pages.peekable();
        let mut count = 0u64;
        while pages.peek().is_some() {
            let mut enc = PagesEncoder::new(&mut self.batch, round)?;
            while !enc.is_full() {
                let Some(page) = pages.next() else { break };
                // Pages come from a bitmap of this guest's size: always in range.
                if enc.push_with(page, |buf| {
                    let _ = mem.read_page(page, buf);
                })? {
                    self.zero_pages += 1;
                }
                count += 1;
            }
            let n = enc.finish();
            self.wr.send_encoded(&self.batch[..n]).await?;
            if capped {
                self.pace().await;
            }
        }
        self.wr.flush().await?;
        Ok(count)
    }

    /// Sleeps as long as pre-copy is ahead of the bandwidth cap.
    async fn pace(&self) {
        if let Some(limit) = self.cfg.bandwidth_limit.filter(|&l| l > 0) {
            let due = Duration::from_secs_f64(self.wr.sent() as f64 / limit as f64);
            let elapsed = self.precopy_started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }

    /// Bitmap, pull, device state, resume report.
    async fn switch_over(
        &mut self,
        words: &[u64],
        converged: bool,
        quiesce_t_us: u64,
        state: &DeviceState,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<SwitchOver, Failure> {
        let bits = count_set(words);
        let pages = self.vm.memory().page_count();
        self.wr
            .send_flush(&Message::Bitmap {
                quiesce_t_us,
                pages,
                converged,
                words: words.into(),
            })
            .await
            .map_err(at(Step::Bitmap))?;
        progress(Progress::Bitmap { bits });
        // The digest at quiesce runs beside the pull, off the critical path: the VM is
        // quiesced, so memory stays as it is until the target reports the resume. Its
        // thread takes only idle CPU time, so it cannot lengthen the downtime.
        if self.cfg.verify_memory {
            let mem: Arc<GuestMemory> = Arc::clone(self.vm.memory());
            let hurry = Arc::clone(&self.digest_hurry);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let spawned = std::thread::Builder::new()
                .name("memory-digest".into())
                .spawn(move || {
                    let mut idle = crate::sys::make_current_thread_idle();
                    let d = mem.digest_with(|| {
                        // The VM runs on the target (or the migration failed): finish
                        // at normal priority.
                        if idle && hurry.load(Ordering::Relaxed) {
                            idle = !crate::sys::make_current_thread_normal();
                        }
                    });
                    // Let go of the memory before answering: once the digest is in,
                    // the caller may free the VM and expects its memory gone.
                    drop(mem);
                    let _ = tx.send(d);
                });
            match spawned {
                Ok(_) => self.digest = Some(rx),
                Err(e) => tracing::warn!(vm = %self.name, error = %e, "no memory digest"),
            }
        }
        tracing::info!(
            t_us = unix_micros(),
            vm = %self.name,
            phase = "bitmap",
            bits,
            "migration phase"
        );

        // The target asks for the bitmap's pages; each exactly once.
        let step = Step::Pull;
        let before = self.wr.sent();
        let mut remaining = words.to_vec();
        let mut pulled = 0u64;
        loop {
            let ranges: Vec<PageRange> = match self.rd.recv().await.map_err(at(step))? {
                Message::PullRequest { ranges } => ranges.into_owned(),
                Message::PullEnd => break,
                Message::Abort { reason } => {
                    return Err((step, ErrorKind::PeerAborted(reason.into_owned())))
                }
                m => return Err((step, ErrorKind::Unexpected(m.kind()))),
            };
            let mut list = Vec::new();
            for r in &ranges {
                for page in r.start..r.start + r.count {
                    let (w, b) = ((page / 64) as usize, 1u64 << (page % 64));
                    // The decoder bounded the range by the guest's size.
                    if remaining.get(w).is_none_or(|x| x & b == 0) {
                        return Err((
                            step,
                            ErrorKind::Pull(format!(
                                "page {page} requested but not in the bitmap, or twice"
                            )),
                        ));
                    }
                    remaining[w] &= !b;
                    list.push(page);
                }
            }
            pulled += self
                .send_pages(0, list.into_iter(), false)
                .await
                .map_err(at(step))?;
        }
        let missing = count_set(&remaining);
        if missing != 0 {
            return Err((
                step,
                ErrorKind::Pull(format!("{missing} pages of the bitmap never requested")),
            ));
        }
        let bytes_pulled = self.wr.sent() - before;
        progress(Progress::Pulled { pages: pulled });
        tracing::info!(
            t_us = unix_micros(),
            vm = %self.name,
            phase = "pull",
            pages = pulled,
            bytes = bytes_pulled,
            "migration phase"
        );

        let step = Step::DeviceState;
        // The last moment to cancel: once the device state is out, the target may resume.
        if self.cancel.is_cancelled() {
            return Err((step, ErrorKind::Cancelled));
        }
        let json =
            serde_json::to_vec(state).map_err(|e| (step, ErrorKind::State(e.to_string())))?;
        self.wr
            .send_flush(&Message::DeviceState { json: &json })
            .await
            .map_err(at(step))?;

        // The target hashes its page digests (32 bytes a page) before it answers.
        let step = Step::Resume;
        let mut wait = self.cfg.io_timeout;
        if self.cfg.verify_memory {
            wait += super::hash_allowance(self.vm.memory().size() / PAGE_SIZE as u64 * 32);
        }
        self.rd.set_timeout(wait);
        let (resume_t_us, target_sha) = match self.rd.recv().await.map_err(at(step))? {
            Message::Resumed { t_us, sha256 } => (t_us, sha256),
            Message::Abort { reason } => {
                return Err((step, ErrorKind::PeerAborted(reason.into_owned())))
            }
            m => return Err((step, ErrorKind::Unexpected(m.kind()))),
        };
        let resumed_at = Instant::now();
        progress(Progress::Resumed { t_us: resume_t_us });
        tracing::info!(
            t_us = unix_micros(),
            vm = %self.name,
            phase = "resume",
            target_resume_t_us = resume_t_us,
            downtime_us = resume_t_us.saturating_sub(quiesce_t_us),
            "migration phase"
        );
        Ok(SwitchOver {
            resume_t_us,
            resumed_at,
            target_sha,
            pulled,
            bytes_pulled,
        })
    }
}
