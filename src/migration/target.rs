//! Target end of a migration (adapter): admits the VM, fills fresh guest memory from
//! the pre-copy rounds, pulls the pages of the final bitmap, and resumes the VM.
//!
//! The target owns nothing until it resumes: any failure before that drops the memory
//! and the half-built VM, and the source takes the VM back. The pull runs its two
//! directions at once (requests out, pages in), so neither side can block the other
//! however large the bitmap.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{split_stream, BoxRead, BoxWrite, ConnError, MigrationStream, Reader, Writer};
use super::proto::{self, Limits, Message, PagesView, ProtoError};
use super::{
    at, expect, Ending, ErrorKind, Failure, MigrationConfig, MigrationError, MigrationSummary,
    Stats, Step, TargetHooks,
};
use crate::clock::unix_micros;
use crate::guest::{DeviceState, Vm, VmConfig};
use crate::memory::{count_set, GuestMemory, PageDigests};

/// Writes a batch into guest memory, and each page's digest into `digests` when memory
/// is verified. With `expect`, each page must be set there (a pull answer) and is
/// cleared, so no page is accepted twice.
fn apply(
    mem: &GuestMemory,
    v: &PagesView<'_>,
    mut expect: Option<&mut [u64]>,
    mut digests: Option<&mut PageDigests>,
) -> Result<u64, String> {
    let mut zero = 0;
    for (page, data) in v.iter() {
        if let Some(bits) = expect.as_deref_mut() {
            let (w, b) = ((page / 64) as usize, 1u64 << (page % 64));
            match bits.get_mut(w) {
                Some(x) if *x & b != 0 => *x &= !b,
                _ => return Err(format!("page {page} was not requested, or came twice")),
            }
        }
        // The decoder checked page < page count.
        if let Some(digests) = digests.as_deref_mut() {
            // Hashed from the bytes being written, while they are in the cache.
            digests.record(page, data);
        }
        match data {
            Some(d) => mem.write_page(page, d).map_err(|e| e.to_string())?,
            None => {
                zero += 1;
                // Fresh memory is zero already; touching it would make it resident.
                if !mem.is_zero_page(page).unwrap_or(true) {
                    mem.zero_page(page).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    Ok(zero)
}

struct Target<'c> {
    cfg: &'c MigrationConfig,
    name: String,
    rd: Reader<BoxRead>,
    wr: Writer<BoxWrite>,
    started: Instant,
    stats: Stats,
    /// One digest per page as the pages arrive (when memory is verified).
    digests: Option<PageDigests>,
    /// The hooks gave memory made ready before the stream: no prefault thread.
    prepared: bool,
}

/// What the pre-copy and bitmap phases leave for the switch-over.
struct Quiesced {
    words: Vec<u64>,
    quiesce_t_us: u64,
    converged: bool,
}

/// Faults fresh guest memory in on a thread of its own, ahead of the stream, so the
/// receive path only copies. Stops when dropped (a failed migration frees the memory
/// without waiting for it).
struct Prefault {
    stop: Arc<AtomicBool>,
}

impl Prefault {
    fn start(name: &str, mem: &Arc<GuestMemory>) -> Option<Prefault> {
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s, vm) = (Arc::clone(mem), Arc::clone(&stop), name.to_string());
        let spawned = std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || {
                let t = Instant::now();
                match m.prefault(&s) {
                    Ok(bytes) => tracing::debug!(
                        vm = %vm,
                        bytes,
                        ms = t.elapsed().as_millis() as u64,
                        "guest memory faulted in"
                    ),
                    // An old kernel without MADV_POPULATE_WRITE: pages fault on arrival.
                    Err(e) => tracing::debug!(vm = %vm, error = %e, "no prefault"),
                }
            });
        match spawned {
            Ok(_) => Some(Prefault { stop }),
            Err(e) => {
                tracing::warn!(vm = %name, error = %e, "no prefault thread");
                None
            }
        }
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Receives a VM from the source at the other end of `stream`. On `Ok` the VM runs
/// here. On `Err` nothing is kept, and the source is told why when possible.
pub async fn migrate_in(
    stream: impl MigrationStream,
    cfg: &MigrationConfig,
    hooks: &mut dyn TargetHooks,
) -> Result<(Arc<Vm>, MigrationSummary), MigrationError> {
    let (rd, wr) = split_stream(stream);
    let mut rd = Reader::new(rd, cfg.io_timeout);
    // Nothing larger than a Hello before admission.
    rd.set_max_message(proto::HEADER_LEN + proto::MAX_CONFIG_LEN);
    let mut t = Target {
        cfg,
        name: String::new(),
        rd,
        wr: Writer::new(wr, cfg.io_timeout),
        started: Instant::now(),
        stats: Stats::default(),
        digests: None,
        prepared: false,
    };
    match t.run(hooks).await {
        Ok(r) => Ok(r),
        Err((step, kind)) => Err(t.failed(step, kind).await),
    }
}

impl Target<'_> {
    /// Tells the source why (unless it is the one that gave up) and keeps nothing.
    async fn failed(&mut self, step: Step, kind: ErrorKind) -> MigrationError {
        if !matches!(kind, ErrorKind::Refused(_) | ErrorKind::PeerAborted(_)) {
            let reason = format!("target failed in {step}: {kind}");
            self.wr
                .send_now(
                    &Message::Abort {
                        reason: reason.into(),
                    },
                    Duration::from_millis(200),
                )
                .await;
        }
        if self.name.is_empty() {
            // No Hello got through: an anonymous peer, worth no more than DEBUG.
            tracing::debug!(step = %step, error = %kind, "incoming connection dropped");
        } else {
            tracing::warn!(
                t_us = unix_micros(),
                vm = %self.name,
                step = %step,
                error = %kind,
                "incoming migration failed; nothing kept"
            );
        }
        MigrationError {
            step,
            kind,
            vm_running: false,
        }
    }

    async fn run(
        &mut self,
        hooks: &mut dyn TargetHooks,
    ) -> Result<(Arc<Vm>, MigrationSummary), Failure> {
        let (config, mem) = self.precheck(hooks).await?;
        if self.cfg.verify_memory {
            self.digests = Some(PageDigests::new(mem.page_count()));
        }
        let prefault = if self.cfg.prefault && !self.prepared {
            Prefault::start(&self.name, &mem)
        } else {
            None
        };
        let q = self.precopy(&mem).await?;
        let bits = count_set(&q.words);
        hooks.at_phase(Step::Pull).await;
        let (pulled, bytes_pulled) = self.pull(&mem, &q.words).await?;
        drop(prefault);
        let state = self.receive_device_state(&config).await?;
        let memory_bytes = mem.size();
        let vm = self.resume(config, mem, state, hooks)?;
        let resume_t_us = unix_micros();
        let total = self.started.elapsed();
        hooks.resumed(&vm);
        hooks.at_phase(Step::Resume).await;
        tracing::info!(
            t_us = resume_t_us,
            vm = %self.name,
            phase = "resume",
            downtime_us = resume_t_us.saturating_sub(q.quiesce_t_us),
            "migration phase"
        );
        let sha = self.digest_at_resume().await;
        self.report_resume(resume_t_us, sha).await;
        let (vm, source_sha) = self.await_complete(memory_bytes, vm, hooks).await?;
        self.wr.shutdown().await;
        let summary = self.stats.summary(Ending {
            bitmap_bits: bits,
            pages_pulled: pulled,
            bytes_pulled,
            quiesce_t_us: q.quiesce_t_us,
            resume_t_us,
            total,
            bytes_total: self.rd.received(),
            converged: q.converged,
            sha_source: source_sha,
            sha_target: sha,
        });
        Ok((vm, summary))
    }

    async fn precheck(
        &mut self,
        hooks: &mut dyn TargetHooks,
    ) -> Result<(VmConfig, Arc<GuestMemory>), Failure> {
        let step = Step::PreCheck;
        let refuse = |reason: String| (step, ErrorKind::Refused(reason));
        let config: Result<VmConfig, String> = match self.rd.recv().await {
            Ok(Message::Hello { config_json }) => serde_json::from_slice::<VmConfig>(config_json)
                .map_err(|e| format!("bad VM configuration: {e}"))
                .and_then(|c| c.validate().map(|()| c).map_err(|e| e.to_string())),
            Ok(m) => return Err((step, ErrorKind::Unexpected(m.kind()))),
            Err(ConnError::Proto(e @ ProtoError::BadVersion(_))) => Err(e.to_string()),
            Err(e) => return Err((step, ErrorKind::Conn(e))),
        };
        let admitted = config.and_then(|c| {
            self.name = c.name.clone();
            self.stats.vm = c.name.clone();
            tracing::info!(
                t_us = unix_micros(),
                vm = %c.name,
                phase = "precheck",
                memory_mb = c.memory_mb,
                vcpus = c.vcpus,
                "migration phase"
            );
            hooks.admit(&c)?;
            let mem = match hooks.prepared_memory(&c) {
                Some(m) if m.size() == c.memory_bytes() => {
                    self.prepared = true;
                    m
                }
                _ => Arc::new(GuestMemory::new(c.memory_bytes()).map_err(|e| e.to_string())?),
            };
            Ok((c, mem))
        });
        match admitted {
            Ok((c, mem)) => {
                self.rd.set_limits(Limits {
                    pages: mem.page_count(),
                });
                self.rd.set_max_message(usize::MAX);
                self.wr
                    .send_flush(&Message::Accept)
                    .await
                    .map_err(at(step))?;
                Ok((c, mem))
            }
            Err(reason) => {
                self.wr
                    .send_now(
                        &Message::Refuse {
                            reason: reason.as_str().into(),
                        },
                        Duration::from_millis(500),
                    )
                    .await;
                Err(refuse(reason))
            }
        }
    }

    /// Applies pre-copy rounds until the bitmap arrives.
    async fn precopy(&mut self, mem: &GuestMemory) -> Result<Quiesced, Failure> {
        let step = Step::PreCopy;
        loop {
            let before = self.rd.received();
            let msg = self.rd.recv().await.map_err(at(step))?;
            let stats = &mut self.stats;
            let digests = self.digests.as_mut();
            match msg {
                Message::Pages(v) => {
                    let round = v.round() as usize;
                    let current = stats.pages_per_round.len();
                    // Rounds count up from 1, one at a time.
                    if round == 0 || round > current + 1 || round < current {
                        return Err((step, ErrorKind::Unexpected(proto::Kind::Pages)));
                    }
                    let zero =
                        apply(mem, &v, None, digests).map_err(|e| (step, ErrorKind::Pages(e)))?;
                    let count = v.count() as u64;
                    if round > current {
                        stats.pages_per_round.push(0);
                        stats.bytes_per_round.push(0);
                    }
                    stats.zero_pages += zero;
                    stats.pages_per_round[round - 1] += count;
                    stats.bytes_per_round[round - 1] += self.rd.received() - before;
                }
                Message::RoundEnd { round } => {
                    // A round without pages (nothing was dirty) still counts.
                    if round as usize == stats.pages_per_round.len() + 1 {
                        stats.pages_per_round.push(0);
                        stats.bytes_per_round.push(0);
                    }
                    if round as usize != stats.pages_per_round.len() {
                        return Err((step, ErrorKind::Unexpected(proto::Kind::RoundEnd)));
                    }
                    self.wr
                        .send_flush(&Message::RoundAck { round })
                        .await
                        .map_err(at(step))?;
                }
                Message::Bitmap {
                    quiesce_t_us,
                    pages,
                    converged,
                    words,
                } => {
                    if pages != mem.page_count() {
                        return Err((
                            Step::Bitmap,
                            ErrorKind::Bitmap(format!(
                                "{pages} pages for a guest of {}",
                                mem.page_count()
                            )),
                        ));
                    }
                    let words = words.into_owned();
                    tracing::info!(
                        t_us = unix_micros(),
                        vm = %self.name,
                        phase = "bitmap",
                        bits = count_set(&words),
                        source_quiesce_t_us = quiesce_t_us,
                        "migration phase"
                    );
                    return Ok(Quiesced {
                        words,
                        quiesce_t_us,
                        converged,
                    });
                }
                m => return expect(step, m, Err),
            }
        }
    }

    /// Requests every page of the bitmap and applies the answers. Returns the pages
    /// and bytes pulled.
    async fn pull(&mut self, mem: &GuestMemory, words: &[u64]) -> Result<(u64, u64), Failure> {
        let step = Step::Pull;
        let bits = count_set(words);
        let requests = proto::pull_requests(words);
        let before = self.rd.received();
        let wr = &mut self.wr;
        let send = async move {
            for ranges in &requests {
                wr.send_flush(&Message::PullRequest {
                    ranges: ranges.as_slice().into(),
                })
                .await?;
            }
            wr.send_flush(&Message::PullEnd).await
        };
        let rd = &mut self.rd;
        let mut digests = self.digests.as_mut();
        let mut zero_pages = 0u64;
        let receive = async {
            let mut remaining = words.to_vec();
            let mut pulled = 0u64;
            while pulled < bits {
                let msg = rd.recv().await.map_err(at(step))?;
                let v = expect(step, msg, |m| match m {
                    Message::Pages(v) if v.round() == 0 => Ok(v),
                    m => Err(m),
                })?;
                zero_pages += apply(mem, &v, Some(&mut remaining), digests.as_deref_mut())
                    .map_err(|e| (step, ErrorKind::Pull(e)))?;
                pulled += v.count() as u64;
            }
            Ok(pulled)
        };
        let (_, pulled) = tokio::try_join!(async { send.await.map_err(at(step)) }, receive)?;
        self.stats.zero_pages += zero_pages;
        let bytes = self.rd.received() - before;
        tracing::info!(
            t_us = unix_micros(),
            vm = %self.name,
            phase = "pull",
            pages = pulled,
            bytes,
            "migration phase"
        );
        Ok((pulled, bytes))
    }

    /// The device state, checked against the VM's configuration.
    async fn receive_device_state(&mut self, config: &VmConfig) -> Result<DeviceState, Failure> {
        let step = Step::DeviceState;
        let bad = |why: String| (step, ErrorKind::State(why));
        let msg = self.rd.recv().await.map_err(at(step))?;
        let json = expect(step, msg, |m| match m {
            Message::DeviceState { json } => Ok(json),
            m => Err(m),
        })?;
        let state: DeviceState = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        if state.mac != config.mac || state.ip != config.ip {
            return Err(bad(format!(
                "device state names {} {}, the VM is configured as {} {}",
                state.mac, state.ip, config.mac, config.ip
            )));
        }
        let mut seen = vec![false; config.vcpus as usize];
        for v in &state.vcpus {
            match seen.get_mut(v.index as usize) {
                Some(s) if !*s => *s = true,
                _ => return Err(bad(format!("vCPU {} repeated or out of range", v.index))),
            }
        }
        if state.vcpus.len() != config.vcpus as usize {
            return Err(bad(format!(
                "{} vCPUs in the state, {} configured",
                state.vcpus.len(),
                config.vcpus
            )));
        }
        Ok(state)
    }

    /// Takes the disk and starts the VM.
    fn resume(
        &mut self,
        config: VmConfig,
        mem: Arc<GuestMemory>,
        state: DeviceState,
        hooks: &mut dyn TargetHooks,
    ) -> Result<Arc<Vm>, Failure> {
        let vm = Vm::restore(config, mem, state);
        hooks
            .before_resume(&vm)
            .map_err(|e| (Step::Resume, ErrorKind::Hook(e)))?;
        vm.start();
        Ok(vm)
    }

    /// The digest of memory at resume. The page digests are final once the pull is in,
    /// and the running vCPUs do not touch them, so hashing the list (1/128 of memory)
    /// waits until the VM runs: it costs the downtime nothing.
    async fn digest_at_resume(&mut self) -> Option<[u8; 32]> {
        let d = self.digests.take()?;
        match tokio::task::spawn_blocking(move || d.digest()).await {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(vm = %self.name, error = %e, "memory digest failed");
                None
            }
        }
    }

    async fn report_resume(&mut self, resume_t_us: u64, sha: Option<[u8; 32]>) {
        // The VM runs here now, whatever happens to the stream.
        if let Err(e) = self
            .wr
            .send_flush(&Message::Resumed {
                t_us: resume_t_us,
                sha256: sha,
            })
            .await
        {
            tracing::warn!(vm = %self.name, error = %e, "cannot report the resume to the source");
        }
    }

    /// The source's verdict: its digest at quiesce (if it sends one), or a rollback
    /// when it did not find its memory here. Returns the VM for the former.
    async fn await_complete(
        &mut self,
        memory_bytes: u64,
        vm: Arc<Vm>,
        hooks: &mut dyn TargetHooks,
    ) -> Result<(Arc<Vm>, Option<[u8; 32]>), Failure> {
        // The source digests all of its memory from the bitmap on: allow for that.
        self.rd
            .set_timeout(self.cfg.io_timeout + super::hash_allowance(memory_bytes));
        let sha = match self.rd.recv().await {
            Ok(Message::Complete { sha256 }) => sha256,
            Ok(Message::Rollback { reason }) => {
                // The source did not find its memory here: stop, give the disk back,
                // then let the source resume its copy.
                let reason = reason.into_owned();
                hooks.rolled_back(&vm);
                drop(vm);
                let _ = self.wr.send_flush(&Message::RolledBack).await;
                self.wr.shutdown().await;
                return Err((Step::Verify, ErrorKind::PeerAborted(reason)));
            }
            Ok(m) => {
                tracing::warn!(vm = %self.name, kind = %m.kind(), "unexpected message after resume");
                None
            }
            Err(e) => {
                tracing::warn!(vm = %self.name, error = %e, "no completion from the source");
                None
            }
        };
        Ok((vm, sha))
    }
}
