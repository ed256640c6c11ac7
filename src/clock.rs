//! Wall-clock helpers shared by the daemons.
//!
//! Every daemon runs on the same machine, so the realtime clock is a common time base:
//! events that users correlate across processes (quiesce, resume, RARP sent, MAC moved)
//! carry `t_us`, microseconds since the Unix epoch, from [`unix_micros`].

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
