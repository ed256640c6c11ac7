//! `tracing` set-up for the binary: `RUST_LOG` filters, timestamps to the microsecond,
//! plain text (no colour codes) when stderr is a log file, so scripts can read it.

use tracing_subscriber::{fmt::time::UtcTime, EnvFilter};

/// Installs the global subscriber. Logs go to stderr with UTC timestamps precise to the
/// microsecond; `RUST_LOG` overrides the default filter (`info`).
pub fn init() {
    let timer = UtcTime::new(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    ));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_timer(timer)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
