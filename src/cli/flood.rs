//! `vfabric mac-flood` (hidden; for bench/flood.sh): sends frames with random source and
//! destination MACs out of an interface at a fixed rate, as a MAC-flooding attacker
//! (macof) does, bounded in count and time. Run it inside a namespace with
//! `ip netns exec`.

use std::time::{Duration, Instant};

use clap::Args;

use super::CliError;
use vfabric::port::packet::PacketSocket;
use vfabric::wire::ethernet::{Frame, Repr};
use vfabric::wire::{EtherType, MacAddr};

#[derive(Debug, Args)]
#[command(about = "Send random-source-MAC frames at a fixed rate (MAC flood benchmark)")]
pub struct FloodArgs {
    /// Interface to send on (in the current network namespace)
    #[arg(long)]
    ifname: String,
    /// Frames per second
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Stop after this many frames
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    /// Stop after this many seconds at most
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seed of the MAC generator
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
}

/// A random locally administered unicast MAC.
fn random_mac(x: &mut u64) -> MacAddr {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    let b = x.to_be_bytes();
    MacAddr([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
}

pub fn run(a: FloodArgs) -> Result<(), CliError> {
    if a.rate == 0 || !(a.seconds > 0.0 && a.seconds <= 3600.0) {
        return Err("--rate must be positive and --seconds in (0, 3600]".into());
    }
    let sock = PacketSocket::open(&a.ifname)?;
    let mut x = a.seed | 1;
    let mut frame = [0u8; 60];
    let limit = Duration::from_secs_f64(a.seconds);
    let start = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    while sent + errors < a.count {
        let elapsed = start.elapsed();
        if elapsed >= limit {
            break;
        }
        // Frames due by now at the requested rate; then a short sleep.
        let due = ((elapsed.as_secs_f64() * a.rate as f64) as u64).min(a.count);
        while sent + errors < due {
            Repr {
                src: random_mac(&mut x),
                dst: random_mac(&mut x),
                ethertype: EtherType::Unknown(0x88b5),
            }
            .emit(&mut Frame::new_checked(&mut frame[..])?);
            match sock.send(&frame) {
                Ok(()) => sent += 1,
                Err(_) => errors += 1,
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "sent": sent,
            "errors": errors,
            "secs": (secs * 1000.0).round() / 1000.0,
            "rate": (sent as f64 / secs).round(),
        })
    );
    Ok(())
}
