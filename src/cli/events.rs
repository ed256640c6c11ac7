//! `vfabric events`: the daemons' events, live, merged in time order.

use std::time::Duration;

use clap::Args;
use vfabric::clock::unix_micros;
use vfabric::control;
use vfabric::monitor::{self, Merger, Message, Monitor};

use super::CliError;

/// Follow what the daemons do, live.
#[derive(Debug, Args)]
#[command(
    about = "Follow the daemons' events live (MAC learned/moved, VM quiesced/resumed, announces, …)",
    long_about = "Follow the daemons' events live, merged in time order, as `bridge monitor` does.\n\n\
        Subscribes to every daemon in $VFABRIC_RUN_DIR (or one of them) over its control \
        socket and prints each event once no daemon can still report an earlier one \
        (about 0.1 s after it happened). Each event carries t_us, microseconds since the \
        epoch taken where it happened. Ends when every daemon has stopped, or after \
        --count events or --duration seconds. A subscriber that cannot keep up is \
        dropped by the daemon and told so (exit status 1); the daemons never wait for it.",
    after_help = "Examples:\n  \
        vfabric events                      # everything, one line each\n  \
        vfabric events --json               # one JSON object per line (t_us, source, event, …)\n  \
        vfabric events --switch --count 1   # the switch's next event\n  \
        vfabric events --switch vmotion     # the vMotion network's switch only"
)]
pub struct EventsArgs {
    /// One JSON object per line: {"t_us", "source", "event": KIND, …its fields}.
    #[arg(long)]
    json: bool,
    /// Only this host's events.
    #[arg(long, conflicts_with = "switch")]
    host: Option<String>,
    /// Only a switch's events: the VM network's (no NAME, or "switch") or another one,
    /// e.g. "vmotion" (a topology's vMotion network).
    #[arg(long, value_name = "NAME", num_args = 0..=1,
          default_missing_value = vfabric::switchd::DEFAULT_NAME)]
    switch: Option<String>,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
}

pub fn run(a: EventsArgs) -> Result<(), CliError> {
    if let Some(d) = a.duration {
        if !(d > 0.0 && d.is_finite()) {
            return Err(format!("--duration {d} is not a positive number of seconds").into());
        }
    }
    let mut mon = if let Some(sw) = &a.switch {
        vfabric::names::validate("switch", sw)?;
        Monitor::open_one(control::endpoint(sw)?)?
    } else if let Some(h) = &a.host {
        // Unknown hosts are named as such, with the known ones.
        vfabric::host::client::host_info(h)?;
        Monitor::open_one(control::endpoint(h)?)?
    } else {
        let socks = monitor::daemon_endpoints().map_err(|e| match e {
            control::ControlError::Io(e) => format!(
                "cannot read the runtime directory {}: {e}",
                control::runtime_dir().display()
            ),
            e => control::error_line(&e),
        })?;
        let m = Monitor::open(&socks, true)?;
        if m.open_streams() == 0 {
            return Err(format!(
                "no daemon answers in {} (set VFABRIC_RUN_DIR if they run elsewhere)",
                control::runtime_dir().display()
            )
            .into());
        }
        m
    };
    // Like tcpdump's "listening on": from here on, nothing the daemons do is missed.
    eprintln!("vfabric events: following {}", mon.sources().join(", "));
    let deadline = a
        .duration
        .map(|d| std::time::Instant::now() + Duration::from_secs_f64(d));
    let mut merger = Merger::new(monitor::DEFAULT_HOLD);
    let mut printed = 0u64;
    let mut failure: Option<String> = None;
    let mut print = |records: Vec<vfabric::events::Record>| -> Result<bool, CliError> {
        for r in records {
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}  {:<8} {}",
                    super::switch::utc_time_of_day(r.t_us),
                    r.source,
                    r.event
                );
            }
            printed += 1;
            if a.count.is_some_and(|c| printed >= c) {
                return Ok(true);
            }
        }
        Ok(false)
    };
    loop {
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            print(merger.drain())?;
            break;
        }
        match mon.recv(Duration::from_millis(20)) {
            Some(Message::Event(r)) => merger.push(r),
            Some(Message::End { source, error }) => {
                if let Some(e) = error {
                    failure = Some(format!("{source}: {}", control::error_line(&e)));
                }
                if mon.open_streams() == 0 {
                    print(merger.drain())?;
                    break;
                }
            }
            None => {}
        }
        if print(merger.pop_ready(unix_micros()))? {
            break;
        }
    }
    match failure {
        Some(f) => Err(f.into()),
        None => Ok(()),
    }
}
