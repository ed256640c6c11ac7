//! Test pause points of the host daemon (adapter): land a fault in a chosen migration
//! phase without guessing at timing.
//!
//! `vfabric host --test-pause-dir DIR` (hidden; for the fault tests) makes a migration
//! stop at a phase boundary when the test has armed it, until the test lets it go:
//!
//! 1. the test arms phase P on host H by creating the file `DIR/H.P`, where P is one
//!    of `precopy`, `quiesce`, `bitmap` (source points) or `pull`, `resume` (target
//!    points; see [`crate::migration::SourceHooks::at_phase`] and
//!    [`crate::migration::TargetHooks::at_phase`] for where each one is);
//! 2. the migration on H reaches P, renames `DIR/H.P` to `DIR/H.P.paused` (which both
//!    disarms the point and tells the test it is there) and waits;
//! 3. the test applies its fault, then removes `DIR/H.P.paused`: the migration goes on.
//!
//! A pause lasts at most [`MAX_PAUSE`], so a test that dies cannot wedge a daemon.
//! Without the option, or with nothing armed, a phase boundary costs one failed
//! `rename`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::clock::unix_micros;
use crate::migration::{no_wait, PhaseWait, Step};

/// Longest pause; then the migration goes on by itself.
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

/// How often a paused migration looks for its release.
const POLL: Duration = Duration::from_millis(2);

/// The file-name part of a pause point, or None for a step without one.
pub fn phase_name(step: Step) -> Option<&'static str> {
    match step {
        Step::PreCopy => Some("precopy"),
        Step::Quiesce => Some("quiesce"),
        Step::Bitmap => Some("bitmap"),
        Step::Pull => Some("pull"),
        Step::Resume => Some("resume"),
        _ => None,
    }
}

/// The pause points of one host.
#[derive(Debug, Clone)]
pub struct PausePoints {
    dir: Option<PathBuf>,
    host: String,
}

impl PausePoints {
    pub fn new(dir: Option<PathBuf>, host: &str) -> PausePoints {
        PausePoints {
            dir,
            host: host.to_string(),
        }
    }

    /// The file that arms `step` on this host.
    fn armed(dir: &Path, host: &str, phase: &str) -> PathBuf {
        dir.join(format!("{host}.{phase}"))
    }

    /// Waits here if the test armed `step`; otherwise returns at once.
    pub fn at(&self, step: Step, vm: &str) -> PhaseWait {
        let (Some(dir), Some(phase)) = (&self.dir, phase_name(step)) else {
            return no_wait();
        };
        let armed = Self::armed(dir, &self.host, phase);
        let paused = armed.with_file_name(format!("{}.{phase}.paused", self.host));
        if std::fs::rename(&armed, &paused).is_err() {
            return no_wait();
        }
        tracing::info!(t_us = unix_micros(), vm, host = %self.host, phase,
            "test pause point reached; waiting for its release");
        let vm = vm.to_string();
        Box::pin(async move {
            let start = Instant::now();
            while paused.exists() {
                if start.elapsed() > MAX_PAUSE {
                    let _ = std::fs::remove_file(&paused);
                    tracing::warn!(vm = %vm, phase, "test pause never released; going on");
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            tracing::info!(t_us = unix_micros(), vm = %vm, phase, "test pause released");
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_armed_point_waits_for_its_release_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = PausePoints::new(Some(dir.path().to_path_buf()), "silo104");
        // Nothing armed: no wait.
        p.at(Step::Pull, "vm1").await;
        std::fs::write(dir.path().join("silo104.pull"), b"").unwrap();
        let paused = dir.path().join("silo104.pull.paused");
        let wait = p.at(Step::Pull, "vm1");
        assert!(paused.exists(), "the point says it is reached");
        assert!(!dir.path().join("silo104.pull").exists(), "and disarms");
        let task = tokio::spawn(wait);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished(), "held until released");
        std::fs::remove_file(&paused).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("released")
            .unwrap();
        // Disarmed: the next migration passes.
        p.at(Step::Pull, "vm1").await;
        // Another host's or another phase's file is not ours.
        std::fs::write(dir.path().join("silo105.pull"), b"").unwrap();
        std::fs::write(dir.path().join("silo104.resume"), b"").unwrap();
        p.at(Step::Pull, "vm1").await;
        assert!(
            dir.path().join("silo104.resume").exists(),
            "not this phase's"
        );
        PausePoints::new(None, "silo104")
            .at(Step::Resume, "vm1")
            .await;
    }
}
