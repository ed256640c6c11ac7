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
use super::policy::{self, Decision, History, Round};
use super::proto::{Limits, Message, PageRange, PagesEncoder, MAX_MESSAGE};
use super::{
    at, expect, micros, Cancel, Ending, ErrorKind, Failure, MigrationConfig, MigrationError,
    MigrationSummary, Progress, SourceHooks, Stats, Step, Tick,
};
use crate::clock::unix_micros;
use crate::guest::{DeviceState, Vm};
use crate::memory::{count_set, hex, set_pages, GuestMemory, PAGE_SIZE};

/// How long last words (an abort notice) may take to a peer that may be gone.
const LAST_WORDS: Duration = Duration::from_millis(200);
/// Live figures while a round runs: four a second.
const TICK: Duration = Duration::from_millis(250);

/// The caller's progress callback.
type ProgressFn<'p> = &'p mut (dyn FnMut(Progress) + Send);

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
    /// Bytes on the stream when pre-copy started (the pre-check's are not bandwidth).
    precopy_start_sent: u64,
    /// The pre-copy history the policy decides on.
    rounds: Vec<Round>,
    stats: Stats,
    /// The round being sent: its number, its pages, when it started, the last tick.
    live: Live,
    /// The digest of memory at quiesce, computed beside the pull.
    digest: Option<tokio::sync::oneshot::Receiver<[u8; 32]>>,
    /// Tells the digest's thread that the downtime is over: it may leave idle priority.
    digest_hurry: Arc<AtomicBool>,
    /// Tells the digest's thread that nobody will read its answer (the migration failed
    /// before it): it gives up at the next page.
    digest_abandon: Arc<AtomicBool>,
    /// The digest's thread, joined when abandoned, so that a failed migration returns
    /// with no other reference to guest memory left behind it.
    digest_thread: Option<std::thread::JoinHandle<()>>,
    /// The operator's cancel, honoured until the device state is sent.
    cancel: Cancel,
    /// Pre-copy has begun (a cancel is reported in pre-copy rather than pre-check).
    in_precopy: bool,
}

/// The state of the round being sent, for the live figures.
struct Live {
    round: u32,
    pages: u64,
    started: Instant,
    last_tick: Instant,
}

/// The VM stopped on the source: what the switch-over needs.
struct Quiesced {
    words: Vec<u64>,
    bits: u64,
    state: DeviceState,
    quiesce_t_us: u64,
    converged: bool,
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
/// with its memory intact and its vCPUs unthrottled (`vm_running`), unless it was not
/// running to begin with or `hooks.reclaim` reported that the target owns it.
pub async fn migrate_out(
    vm: Arc<Vm>,
    stream: impl MigrationStream,
    cfg: &MigrationConfig,
    hooks: &mut dyn SourceHooks,
    progress: ProgressFn<'_>,
) -> Result<MigrationSummary, MigrationError> {
    migrate_out_cancellable(vm, stream, cfg, hooks, progress, &Cancel::new()).await
}

/// [`migrate_out`] that stops with [`ErrorKind::Cancelled`] when `cancel` fires before
/// the point of no return (the device state sent); the VM then runs on the source,
/// unthrottled.
pub async fn migrate_out_cancellable(
    vm: Arc<Vm>,
    stream: impl MigrationStream,
    cfg: &MigrationConfig,
    hooks: &mut dyn SourceHooks,
    progress: ProgressFn<'_>,
    cancel: &Cancel,
) -> Result<MigrationSummary, MigrationError> {
    let mut s = Source::new(vm, stream, cfg, cancel);
    // Pre-check and pre-copy: the VM runs throughout. A cancel drops them wherever they
    // are (mid-batch too): the VM never stopped, and reading memory changed nothing.
    let converged = tokio::select! {
        r = s.live_phases(hooks, progress) => r,
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
            s.release_throttle();
            return Err(s.failed(step, ErrorKind::Cancelled, s.vm.is_running()));
        }
        Err((step, kind)) => return Err(s.give_up(step, kind).await),
    };
    // A cancel that came with the last round's answer: the VM has not stopped yet.
    if s.cancel.is_cancelled() {
        return Err(s.give_up(Step::PreCopy, ErrorKind::Cancelled).await);
    }
    // From the quiesce until the target's report the VM runs nowhere.
    let q = match s.quiesce(hooks, converged, progress).await {
        Ok(q) => q,
        Err((step, kind)) => {
            s.abort(&kind).await;
            let running = s.take_back(hooks);
            return Err(s.failed(step, kind, running));
        }
    };
    hooks.at_phase(Step::Bitmap).await;
    let done = match s.switch_over(&q, progress).await {
        Ok(done) => done,
        Err((step, kind)) => {
            s.abort(&kind).await;
            s.vm.memory().dirty().merge(&q.words);
            let running = s.take_back(hooks);
            return Err(s.failed(step, kind, running));
        }
    };
    s.finish(&q, done, hooks).await
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
        // A digest nobody took stops at the next page and lets go of guest memory
        // before this returns; one that was taken has already let go.
        if self.digest.is_some() {
            self.digest_abandon.store(true, Ordering::Relaxed);
        }
        if let Some(t) = self.digest_thread.take() {
            let _ = t.join();
        }
        // And however the migration ends (even dropped half-way), the vCPUs get their
        // full speed back.
        self.release_throttle();
    }
}

impl<'c> Source<'c> {
    fn new(
        vm: Arc<Vm>,
        stream: impl MigrationStream,
        cfg: &'c MigrationConfig,
        cancel: &Cancel,
    ) -> Source<'c> {
        let (rd, wr) = split_stream(stream);
        let now = Instant::now();
        let mut rd = Reader::new(rd, cfg.io_timeout);
        rd.set_limits(Limits {
            pages: vm.memory().page_count(),
        });
        Source {
            name: vm.config().name.clone(),
            was_running: vm.is_running(),
            cfg,
            rd,
            wr: Writer::new(wr, cfg.io_timeout),
            batch: vec![0; MAX_MESSAGE],
            started: now,
            precopy_started: now,
            precopy_start_sent: 0,
            rounds: Vec::new(),
            stats: Stats {
                vm: vm.config().name.clone(),
                ..Stats::default()
            },
            live: Live {
                round: 0,
                pages: 0,
                started: now,
                last_tick: now,
            },
            digest: None,
            digest_hurry: Arc::new(AtomicBool::new(false)),
            digest_abandon: Arc::new(AtomicBool::new(false)),
            digest_thread: None,
            cancel: cancel.clone(),
            in_precopy: false,
            vm,
        }
    }
}

impl Source<'_> {
    /// Pre-check and pre-copy. Returns whether pre-copy converged.
    async fn live_phases(
        &mut self,
        hooks: &mut dyn SourceHooks,
        progress: ProgressFn<'_>,
    ) -> Result<bool, Failure> {
        self.precheck().await?;
        hooks.at_phase(Step::PreCopy).await;
        self.precopy(progress).await
    }

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

    /// A failure while the VM still runs here: release the throttle, tell the target.
    async fn give_up(&mut self, step: Step, kind: ErrorKind) -> MigrationError {
        self.release_throttle();
        self.abort(&kind).await;
        self.failed(step, kind, self.vm.is_running())
    }

    /// Gives the vCPUs their full speed back.
    fn release_throttle(&self) {
        if self.vm.throttle() != 0 {
            self.vm.set_throttle(0);
            tracing::info!(t_us = unix_micros(), vm = %self.name, "vCPU throttle released");
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
        self.release_throttle();
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
        let answer = self.rd.recv().await.map_err(at(step))?;
        expect(step, answer, |m| match m {
            Message::Accept => Ok(Ok(())),
            Message::Refuse { reason } => Ok(Err(reason.into_owned())),
            m => Err(m),
        })?
        .map_err(|reason| (step, ErrorKind::Refused(reason)))
    }

    /// Pre-copy bandwidth so far, bytes per second.
    fn bandwidth(&self) -> f64 {
        let elapsed = self.precopy_started.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            (self.wr.sent() - self.precopy_start_sent) as f64 / elapsed
        } else {
            0.0
        }
    }

    /// Sends rounds until the policy says stop. Returns whether it converged.
    async fn precopy(&mut self, progress: ProgressFn<'_>) -> Result<bool, Failure> {
        let step = Step::PreCopy;
        self.in_precopy = true;
        self.in_precopy = true;
        let mem = Arc::clone(self.vm.memory());
        // Dirty logging starts with everything dirty: round 1 sends every page.
        mem.dirty().mark_all();
        self.precopy_started = Instant::now();
        self.precopy_start_sent = self.wr.sent();
        loop {
            let round = self.rounds.len() as u32 + 1;
            let throttle_pct = self.vm.throttle();
            let words = mem.dirty().harvest();
            let before = self.wr.sent();
            let t = Instant::now();
            let sent = match self.send_round(round, &words, progress).await {
                Ok(sent) => sent,
                Err(e) => {
                    // Nothing harvested may be lost if the VM stays here.
                    mem.dirty().merge(&words);
                    return Err((step, e));
                }
            };
            self.rounds.push(Round {
                sent_pages: sent,
                dirty_pages: mem.dirty().count(),
                secs: t.elapsed().as_secs_f64(),
                throttle_pct,
            });
            let decision = self.end_round(self.wr.sent() - before, progress);
            match decision {
                Decision::Continue { throttle_pct: next } => {
                    if next != throttle_pct {
                        self.vm.set_throttle(next);
                        progress(Progress::Throttle { round, pct: next });
                        tracing::info!(
                            t_us = unix_micros(),
                            vm = %self.name,
                            round,
                            throttle_pct = next,
                            "vCPU throttle"
                        );
                    }
                }
                Decision::Converged => return Ok(true),
                Decision::ForceStop(reason) => {
                    self.stats.stop_reason = Some(reason);
                    self.warn_forced_stop(reason, progress);
                    return Ok(false);
                }
                Decision::Abort(reason) => {
                    self.stats.stop_reason = Some(reason);
                    return Err((step, ErrorKind::NoConvergence(reason)));
                }
                Decision::StunGuard(reason) => {
                    self.stats.stop_reason = Some(reason);
                    let h = self.history();
                    return Err((
                        step,
                        ErrorKind::StunGuard {
                            reason,
                            expected_downtime_us: micros(h.estimated_downtime()),
                            max_downtime_us: micros(self.cfg.max_downtime),
                            dirty_pages: h.dirty_pages(),
                            dirty_rate_pages_per_s: self.last_dirty_rate(),
                            bandwidth_mbps: h.bandwidth_bps * 8.0 / 1e6,
                        },
                    ));
                }
            }
        }
    }

    fn history(&self) -> History<'_> {
        History {
            rounds: &self.rounds,
            bandwidth_bps: self.bandwidth(),
            bytes_sent: self.wr.sent() - self.precopy_start_sent,
            memory_bytes: self.vm.memory().size(),
        }
    }

    fn last_dirty_rate(&self) -> u64 {
        self.rounds.last().map_or(0, |r| r.dirty_rate() as u64)
    }

    /// Records the round just sent, reports it, and asks the policy what next.
    fn end_round(&mut self, bytes: u64, progress: ProgressFn<'_>) -> Decision {
        let limits = self.cfg.policy_limits();
        let h = self.history();
        let decision = policy::decide(&h, &limits);
        let expected = micros(h.estimated_downtime());
        let Some(&r) = self.rounds.last() else {
            return decision;
        };
        let round = self.rounds.len() as u32;
        let throughput = if r.secs > 0.0 {
            bytes as f64 * 8.0 / r.secs / 1e6
        } else {
            0.0
        };
        let rate = r.dirty_rate() as u64;
        self.stats.pages_per_round.push(r.sent_pages);
        self.stats.bytes_per_round.push(bytes);
        self.stats.throttle_pct_per_round.push(r.throttle_pct);
        self.stats.dirty_rate_per_round.push(rate);
        self.stats.expected_downtime_us_per_round.push(expected);
        progress(Progress::Round {
            round,
            pages_sent: r.sent_pages,
            dirty_pages: r.dirty_pages,
            throughput_mbps: throughput,
            throttle_pct: r.throttle_pct,
            dirty_rate_pages_per_s: rate,
            expected_downtime_us: expected,
        });
        tracing::info!(
            t_us = unix_micros(),
            vm = %self.name,
            phase = "precopy",
            round,
            pages_sent = r.sent_pages,
            bytes,
            dirty_pages = r.dirty_pages,
            dirty_rate_pages_per_s = rate,
            throttle_pct = r.throttle_pct,
            throughput_mbps = throughput,
            estimated_downtime_us = expected,
            decision = ?decision,
            "migration phase"
        );
        decision
    }

    /// Says, before it happens, that the VM stops without pre-copy having converged.
    fn warn_forced_stop(&self, reason: policy::Reason, progress: ProgressFn<'_>) {
        let h = self.history();
        let expected = micros(h.estimated_downtime());
        let bandwidth_mbps = h.bandwidth_bps * 8.0 / 1e6;
        tracing::warn!(
            t_us = unix_micros(),
            vm = %self.name,
            reason = %reason,
            expected_downtime_us = expected,
            dirty_pages = h.dirty_pages(),
            bandwidth_mbps,
            "forced stop-and-copy"
        );
        progress(Progress::ForcedStop {
            reason,
            expected_downtime_us: expected,
            dirty_pages: h.dirty_pages(),
            dirty_rate_pages_per_s: self.last_dirty_rate(),
            bandwidth_mbps,
        });
    }

    /// Sends one pre-copy round and waits until the target has applied it.
    async fn send_round(
        &mut self,
        round: u32,
        words: &[u64],
        progress: ProgressFn<'_>,
    ) -> Result<u64, ErrorKind> {
        let now = Instant::now();
        self.live = Live {
            round,
            pages: count_set(words),
            started: now,
            last_tick: now,
        };
        let sent = self
            .send_pages(round, set_pages(words), Some(progress))
            .await?;
        self.wr.send_flush(&Message::RoundEnd { round }).await?;
        let step = Step::PreCopy;
        let answer = self.rd.recv().await?;
        expect(step, answer, |m| match m {
            Message::RoundAck { round: r } if r == round => Ok(sent),
            m => Err(m),
        })
        .map_err(|(_, kind)| kind)
    }

    /// Sends `pages` in batches of round `round` (0: pull answers). Returns the number
    /// of pages sent. Pre-copy batches (those given a progress callback) honour the
    /// bandwidth cap and report live figures.
    async fn send_pages(
        &mut self,
        round: u32,
        pages: impl Iterator<Item = u64>,
        mut progress: Option<ProgressFn<'_>>,
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
                    self.stats.zero_pages += 1;
                }
                count += 1;
            }
            let n = enc.finish();
            self.wr.send_encoded(&self.batch[..n]).await?;
            if let Some(progress) = progress.as_deref_mut() {
                // Pace in slices, so that live figures keep coming at TICK even when
                // one batch takes seconds at the cap.
                loop {
                    if self.live.last_tick.elapsed() >= TICK {
                        self.live.last_tick = Instant::now();
                        progress(Progress::Tick(self.tick(&mem, count)));
                    }
                    let Some(ahead) = self.ahead_of_cap() else {
                        break;
                    };
                    let until_tick = TICK.saturating_sub(self.live.last_tick.elapsed());
                    tokio::time::sleep(ahead.min(until_tick)).await;
                }
            }
        }
        self.wr.flush().await?;
        Ok(count)
    }

    /// The live figures of the round being sent, `done` of its pages out.
    fn tick(&self, mem: &GuestMemory, done: u64) -> Tick {
        let bw = self.bandwidth();
        let dirty = mem.dirty().count();
        let left = self.live.pages.saturating_sub(done);
        let secs = self.live.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { dirty as f64 / secs } else { 0.0 };
        // What remains: the rest of this round, then the dirty set, shrinking by the
        // ratio of dirty rate to link rate each round (a geometric series) if it does.
        let link = bw / PAGE_SIZE as f64;
        let eta = if link > 0.0 && rate < link {
            micros(policy::send_time(left, bw)).saturating_add(micros(policy::send_time(
                (dirty as f64 / (1.0 - rate / link)) as u64,
                bw,
            ))) / 1000
        } else {
            u64::MAX
        };
        Tick {
            round: self.live.round,
            transferred_bytes: self.wr.sent(),
            remaining_pages: left + dirty,
            total_bytes: mem.size(),
            dirty_rate_pages_per_s: rate as u64,
            expected_downtime_us: micros(policy::send_time(dirty, bw)),
            throttle_pct: self.vm.throttle(),
            bandwidth_mbps: bw * 8.0 / 1e6,
            eta_ms: eta,
        }
    }

    /// How far pre-copy is ahead of the bandwidth cap, if it is.
    fn ahead_of_cap(&self) -> Option<Duration> {
        let limit = self.cfg.bandwidth_limit.filter(|&l| l > 0)?;
        let due = Duration::from_secs_f64(
            (self.wr.sent() - self.precopy_start_sent) as f64 / limit as f64,
        );
        due.checked_sub(self.precopy_started.elapsed())
            .filter(|d| !d.is_zero())
    }

    /// Stops the VM, gives up its disk and NIC, and takes the final dirty set.
    async fn quiesce(
        &mut self,
        hooks: &mut dyn SourceHooks,
        converged: bool,
        progress: ProgressFn<'_>,
    ) -> Result<Quiesced, Failure> {
        let state = self.vm.quiesce();
        let quiesce_t_us = unix_micros();
        // The vCPUs are stopped: the throttle has done its work.
        self.release_throttle();
        hooks.at_phase(Step::Quiesce).await;
        hooks
            .quiesced(&self.vm)
            .map_err(|e| (Step::Quiesce, ErrorKind::Hook(e)))?;
        // Nothing writes memory any more: the dirty set is final.
        let words = self.vm.memory().dirty().harvest();
        let bits = count_set(&words);
        progress(Progress::Quiesced {
            t_us: quiesce_t_us,
            dirty_pages: bits,
        });
        tracing::info!(
            t_us = quiesce_t_us,
            vm = %self.name,
            phase = "quiesce",
            dirty_pages = bits,
            converged,
            "migration phase"
        );
        Ok(Quiesced {
            words,
            bits,
            state,
            quiesce_t_us,
            converged,
        })
    }

    /// Bitmap, pull, device state, resume report.
    async fn switch_over(
        &mut self,
        q: &Quiesced,
        progress: ProgressFn<'_>,
    ) -> Result<SwitchOver, Failure> {
        self.send_bitmap(q).await?;
        progress(Progress::Bitmap { bits: q.bits });
        self.start_digest();
        let before = self.wr.sent();
        let pulled = self.serve_pull(&q.words).await?;
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
        self.send_device_state(&q.state).await?;
        let (resume_t_us, target_sha) = self.await_resume().await?;
        let resumed_at = Instant::now();
        progress(Progress::Resumed { t_us: resume_t_us });
        tracing::info!(
            t_us = unix_micros(),
            vm = %self.name,
            phase = "resume",
            target_resume_t_us = resume_t_us,
            downtime_us = resume_t_us.saturating_sub(q.quiesce_t_us),
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

    async fn send_bitmap(&mut self, q: &Quiesced) -> Result<(), Failure> {
        self.wr
            .send_flush(&Message::Bitmap {
                quiesce_t_us: q.quiesce_t_us,
                pages: self.vm.memory().page_count(),
                converged: q.converged,
                words: q.words.as_slice().into(),
            })
            .await
            .map_err(at(Step::Bitmap))?;
        tracing::info!(
            t_us = unix_micros(),
            vm = %self.name,
            phase = "bitmap",
            bits = q.bits,
            "migration phase"
        );
        Ok(())
    }

    /// The digest at quiesce runs beside the pull, off the critical path: the VM is
    /// quiesced, so memory stays as it is until the target reports the resume. Its
    /// thread takes only idle CPU time, so it cannot lengthen the downtime.
    fn start_digest(&mut self) {
        if !self.cfg.verify_memory {
            return;
        }
        let mem: Arc<GuestMemory> = Arc::clone(self.vm.memory());
        let hurry = Arc::clone(&self.digest_hurry);
        let abandon = Arc::clone(&self.digest_abandon);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("memory-digest".into())
            .spawn(move || {
                let mut idle = crate::sys::make_current_thread_idle();
                let d = mem.digest_with(&abandon, || {
                    // The VM runs on the target (or the migration failed): finish at
                    // normal priority.
                    if idle && hurry.load(Ordering::Relaxed) {
                        idle = !crate::sys::make_current_thread_normal();
                    }
                });
                // Let go of the memory before answering: once the digest is in, the
                // caller may free the VM and expects its memory gone.
                drop(mem);
                if let Some(d) = d {
                    let _ = tx.send(d);
                }
            });
        match spawned {
            Ok(t) => {
                self.digest = Some(rx);
                self.digest_thread = Some(t);
            }
            Err(e) => tracing::warn!(vm = %self.name, error = %e, "no memory digest"),
        }
    }

    /// Answers the target's requests for the bitmap's pages; each exactly once.
    async fn serve_pull(&mut self, words: &[u64]) -> Result<u64, Failure> {
        let step = Step::Pull;
        let mut remaining = words.to_vec();
        let mut pulled = 0u64;
        loop {
            let msg = self.rd.recv().await.map_err(at(step))?;
            let ranges: Vec<PageRange> = match expect(step, msg, |m| match m {
                Message::PullRequest { ranges } => Ok(Some(ranges.into_owned())),
                Message::PullEnd => Ok(None),
                m => Err(m),
            })? {
                Some(ranges) => ranges,
                None => break,
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
                .send_pages(0, list.into_iter(), None)
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
        Ok(pulled)
    }

    async fn send_device_state(&mut self, state: &DeviceState) -> Result<(), Failure> {
        let step = Step::DeviceState;
        // The last moment to cancel: once the device state is out, the target may resume.
        if self.cancel.is_cancelled() {
            return Err((step, ErrorKind::Cancelled));
        }
        // The last moment to cancel: once the device state is out, the target may resume.
        if self.cancel.is_cancelled() {
            return Err((step, ErrorKind::Cancelled));
        }
        let json =
            serde_json::to_vec(state).map_err(|e| (step, ErrorKind::State(e.to_string())))?;
        self.wr
            .send_flush(&Message::DeviceState { json: &json })
            .await
            .map_err(at(step))
    }

    /// The target's resume report: its clock at resume and its memory digest.
    async fn await_resume(&mut self) -> Result<(u64, Option<[u8; 32]>), Failure> {
        // The target hashes its page digests (32 bytes a page) before it answers.
        let step = Step::Resume;
        let mut wait = self.cfg.io_timeout;
        if self.cfg.verify_memory {
            wait += super::hash_allowance(self.vm.memory().size() / PAGE_SIZE as u64 * 32);
        }
        self.rd.set_timeout(wait);
        let msg = self.rd.recv().await.map_err(at(step))?;
        expect(step, msg, |m| match m {
            Message::Resumed { t_us, sha256 } => Ok((t_us, sha256)),
            m => Err(m),
        })
    }

    /// The VM runs on the target: check its memory, send our digest, sum it all up.
    async fn finish(
        mut self,
        q: &Quiesced,
        done: SwitchOver,
        hooks: &mut dyn SourceHooks,
    ) -> Result<MigrationSummary, MigrationError> {
        let total = done.resumed_at - self.started;
        self.digest_hurry.store(true, Ordering::Relaxed);
        let source_sha = match self.digest.take() {
            Some(h) => h.await.ok(),
            None => None,
        };
        // Success means verified: the VM is freed here only once the target's memory is
        // known to be ours; otherwise the target stops its copy and the VM resumes here.
        if self.cfg.verify_memory {
            if let Err(reason) = check_digests(source_sha, done.target_sha) {
                self.roll_back(&reason).await;
                let running = self.take_back(hooks);
                return Err(self.failed(Step::Verify, ErrorKind::Verify(reason), running));
            }
        }
        // The target runs the VM; telling it our hash is a courtesy it can live without.
        self.wr
            .send_now(
                &Message::Complete { sha256: source_sha },
                self.cfg.io_timeout,
            )
            .await;
        self.wr.shutdown().await;
        let summary = self.stats.summary(Ending {
            bitmap_bits: q.bits,
            pages_pulled: done.pulled,
            bytes_pulled: done.bytes_pulled,
            quiesce_t_us: q.quiesce_t_us,
            resume_t_us: done.resume_t_us,
            total,
            bytes_total: self.wr.sent(),
            converged: q.converged,
            sha_source: source_sha,
            sha_target: done.target_sha,
        });
        Ok(summary)
    }
}
