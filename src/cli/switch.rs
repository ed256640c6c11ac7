//! `vfabric switch`, `vfabric fdb show|flush`, `vfabric ports`, `vfabric port add|del`:
//! the switch daemon and its control verbs.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::CliError;
use vfabric::control;
use vfabric::switch::FdbConfig;
use vfabric::switchd::api;
use vfabric::switchd::{self, DaemonConfig, FdbRow, PortSpec, PortStats};

#[derive(Debug, Args)]
#[command(
    about = "Run the userspace L2 learning switch on TAP ports",
    long_about = "Run the userspace L2 learning switch on TAP ports.\n\n\
        Each --port creates a TAP device, moves its kernel side into network namespace \
        NETNS (as created by `ip netns add`) renamed IFNAME there, and keeps its fd: \
        frames the namespace sends on IFNAME reach the switch, which learns source MACs \
        and forwards like the Linux bridge. An empty NETNS (client=:tap-c) leaves the \
        interface in the switch's namespace. The control socket \
        $VFABRIC_RUN_DIR/NAME.sock (default /run/vfabric) appears once every port is \
        ready. Stops on SIGINT/SIGTERM; the TAP devices vanish with it. Needs root.\n\n\
        A port NAME=vxlan:vni=VNI,local=[NETNS:]IP[:PORT],remote=IP[:PORT][,remote=...] \
        is a VXLAN tunnel (RFC 7348) instead: a UDP socket bound to IP:PORT (default \
        4789) in namespace NETNS (default: the switch's), sending frames of segment VNI \
        to the remotes (all of them for broadcast and unknown destinations, the one a \
        MAC was learned behind otherwise) and taking datagrams from them only.\n\n\
        A port NAME=qemu-stream:PATH puts a QEMU guest on the switch with no TAP: the \
        switch listens on the Unix stream socket PATH (an absolute path, or a plain name \
        for $VFABRIC_RUN_DIR/qemu/NAME.sock) and QEMU connects with -netdev \
        stream,id=n0,server=off,addr.type=unix,addr.path=PATH. A QEMU that quits leaves \
        the port waiting for the next. NAME=qemu-dgram:local=PATH,remote=QPATH binds PATH \
        and sends to QEMU's socket QPATH, for -netdev dgram,id=n0,local.type=unix,\
        local.path=QPATH,remote.type=unix,remote.path=PATH.\n\n\
        A port NAME=attach:NETNS:IFNAME uses an interface that already exists (a \
        libvirt/QEMU TAP, a veth end) through a packet socket, as `ip link set IFNAME \
        master` would: frames IFNAME receives enter the switch, frames for it are sent \
        out of it. Ports can be added and deleted while the switch runs (`vfabric port \
        add|del`).\n\n\
        Example: vfabric switch --port client=vf-client:eth0 --port silo104=vf-silo104:vmnic0 \
        --port wan=vxlan:vni=42,local=vf-ul:10.99.0.1,remote=10.99.0.2"
)]
pub struct SwitchArgs {
    /// Switch name; the control socket is $VFABRIC_RUN_DIR/NAME.sock (1 to 31 of a-z,
    /// 0-9 and '-', starting with a letter or digit; port names follow the same rule)
    #[arg(long, default_value = switchd::DEFAULT_NAME)]
    name: String,
    /// A port, e.g. client=vf-client:eth0, or a VXLAN tunnel
    /// wan=vxlan:vni=42,local=NETNS:10.99.0.1,remote=10.99.0.2, an existing interface
    /// vm1=attach:NETNS:IFNAME, or a QEMU guest's socket vm1=qemu-stream:PATH (repeat
    /// for each port)
    #[arg(
        long = "port",
        value_name = "NAME=NETNS:IFNAME|NAME=attach:NETNS:IFNAME|NAME=vxlan:…|NAME=qemu-stream:PATH",
        required = true
    )]
    ports: Vec<String>,
    /// Create a mirror TAP named IFNAME in the switch's namespace that gets a copy of
    /// every frame (watch it with tcpdump -i IFNAME)
    #[arg(long, value_name = "IFNAME")]
    mirror: Option<String>,
    /// Seconds an unused FDB entry lives; 0 learns nothing and floods everything
    #[arg(long, default_value_t = FdbConfig::default().ageing.as_secs(), value_name = "SECS")]
    ageing_secs: u64,
    /// Most FDB entries; a new MAC beyond it evicts one from the busiest port
    #[arg(long, default_value_t = FdbConfig::default().max_entries, value_name = "N")]
    max_entries: usize,
    /// Refuse to move a MAC to another port until it has been silent this long on its
    /// current port (0: move at once, as the Linux bridge does)
    #[arg(long, default_value_t = FdbConfig::default().hold_down.as_millis() as u64, value_name = "MS")]
    hold_down_ms: u64,
    /// Open the TAPs without checksum/TSO offloads: the kernel then sends only finished
    /// frames of at most the MTU (slower; for comparison)
    #[arg(long)]
    no_offload: bool,
    /// Data-path threads: "single" (one thread polls every port: one wake-up per round
    /// trip) or "per-port" (one thread sleeping on each port)
    #[arg(long, default_value = "single", value_name = "MODE")]
    threading: vfabric::switchd::Threading,
    /// Run the data-path threads under SCHED_FIFO at this priority (1-99), so a busy
    /// machine does not delay forwarding; off by default
    #[arg(long, value_name = "PRIO", value_parser = clap::value_parser!(u8).range(1..=99))]
    rt_priority: Option<u8>,
    /// Pin the data-path threads to this CPU; off by default
    #[arg(long, value_name = "CPU")]
    cpu: Option<usize>,
    /// Frames the data-path thread forwards between two polls, one from each readable
    /// port in turn: a port that becomes readable waits at most this many frames
    #[arg(long, value_name = "FRAMES", default_value_t = switchd::datapath::ROUND_BUDGET as u16,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    batch: u16,
}

#[derive(Debug, Args)]
#[command(about = "Add or delete a port of the running switch")]
pub struct PortArgs {
    #[command(subcommand)]
    cmd: PortCmd,
}

#[derive(Debug, Subcommand)]
enum PortCmd {
    /// Add port NAME: SPEC is NETNS:IFNAME (a new TAP), attach:NETNS:IFNAME (an existing
    /// interface) or vxlan:KEY=VALUE,… as --port of `vfabric switch` takes it
    Add {
        name: String,
        spec: String,
        /// Name of the switch to ask
        #[arg(long, value_name = "NAME", default_value = switchd::DEFAULT_NAME)]
        switch: String,
        /// Print {"port","id","ifname","kind"}
        #[arg(long)]
        json: bool,
    },
    /// Delete port NAME; the MACs learned on it are forgotten
    Del {
        name: String,
        /// Name of the switch to ask
        #[arg(long, value_name = "NAME", default_value = switchd::DEFAULT_NAME)]
        switch: String,
        /// Print {"port","fdb_entries_removed"}
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[command(about = "Show or flush the switch's forwarding database")]
pub struct FdbArgs {
    #[command(subcommand)]
    cmd: FdbCmd,
}

#[derive(Debug, Subcommand)]
enum FdbCmd {
    /// List learned MACs: one line per entry with MAC, port (and, behind a VXLAN port,
    /// the remote endpoint), age and since when (UTC) the MAC is on that port
    Show {
        /// Name of the switch to ask
        #[arg(long, value_name = "NAME", default_value = switchd::DEFAULT_NAME)]
        switch: String,
        /// Print a JSON array of {"mac","port","port_id","remote","age_s","updated_t_us"}
        /// ("remote" only behind a VXLAN port)
        #[arg(long)]
        json: bool,
    },
    /// Forget every learned MAC (traffic floods until relearned)
    Flush {
        /// Name of the switch to ask
        #[arg(long, value_name = "NAME", default_value = switchd::DEFAULT_NAME)]
        switch: String,
        /// Print {"flushed": N}
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[command(about = "Show the switch's ports and their counters")]
pub struct PortsArgs {
    /// Name of the switch to ask
    #[arg(long, value_name = "NAME", default_value = switchd::DEFAULT_NAME)]
    switch: String,
    /// Print a JSON array, one object per port
    #[arg(long)]
    json: bool,
}

pub fn run_switch(args: SwitchArgs) -> Result<(), CliError> {
    vfabric::names::validate("switch", &args.name)?;
    let ports = args
        .ports
        .iter()
        .map(|s| s.parse::<PortSpec>())
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(m) = &args.mirror {
        if m.is_empty() || m.len() > 15 || m.contains('/') || m.contains(char::is_whitespace) {
            return Err(format!("bad mirror interface name {m:?} (1 to 15 characters)").into());
        }
    }
    if !vfabric::sys::tap::is_root() {
        return Err("vfabric switch creates TAP devices and needs root".into());
    }
    vfabric::logging::init();
    switchd::run(DaemonConfig {
        name: args.name,
        ports,
        mirror: args.mirror,
        fdb: FdbConfig {
            ageing: Duration::from_secs(args.ageing_secs),
            max_entries: args.max_entries,
            hold_down: Duration::from_millis(args.hold_down_ms),
        },
        offload: !args.no_offload,
        threading: args.threading,
        rt_priority: args.rt_priority,
        cpu: args.cpu,
        batch: usize::from(args.batch),
    })?;
    Ok(())
}

fn ask<R: control::Request>(switch: &str, req: R) -> Result<R::Reply, CliError> {
    vfabric::names::validate("switch", switch)?;
    Ok(control::request(control::socket_path(switch), req)?)
}

pub fn run_fdb(args: FdbArgs) -> Result<(), CliError> {
    match args.cmd {
        FdbCmd::Show { switch, json } => {
            let rows: Vec<FdbRow> = ask(&switch, api::FdbShow {})?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for r in rows {
                    let remote = r.remote.map(|a| format!(" remote {a}")).unwrap_or_default();
                    println!(
                        "{} port {}{remote} age {:.1}s since {}",
                        r.mac,
                        r.port,
                        r.age_s,
                        utc_time_of_day(r.updated_t_us)
                    );
                }
            }
        }
        FdbCmd::Flush { switch, json } => {
            let v = ask(&switch, api::FdbFlush {})?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("flushed {} entries", v.flushed);
            }
        }
    }
    Ok(())
}

/// `HH:MM:SS.ffffff` (UTC) of a µs stamp, as the log lines print it; `?` for none.
pub fn utc_time_of_day(t_us: u64) -> String {
    if t_us == 0 {
        return "?".into();
    }
    let secs = t_us / 1_000_000;
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:06}", t_us % 1_000_000)
}

pub fn run_port(args: PortArgs) -> Result<(), CliError> {
    match args.cmd {
        PortCmd::Add {
            name,
            spec,
            switch,
            json,
        } => {
            vfabric::names::validate("port", &name)?;
            let spec = format!("{name}={spec}");
            // Refused here with the parser's message rather than by the daemon.
            spec.parse::<PortSpec>()?;
            let r = ask(&switch, api::PortAdd { spec })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("port {} added ({} {})", r.port, r.kind, r.ifname);
            }
        }
        PortCmd::Del { name, switch, json } => {
            vfabric::names::validate("port", &name)?;
            let r = ask(&switch, api::PortDel { name })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "port {} deleted, {} entries removed",
                    r.port, r.fdb_entries_removed
                );
            }
        }
    }
    Ok(())
}

pub fn run_ports(args: PortsArgs) -> Result<(), CliError> {
    let ports: Vec<PortStats> = ask(&args.switch, api::Ports {})?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&ports)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<6} {:<10} {:<14} {:<9} {:>4} {:>10} {:>14} {:>10} {:>14} {:>8}  DROPPED",
        "PORT",
        "KIND",
        "IFNAME",
        "NETNS",
        "STATE",
        "MACS",
        "RX_FRAMES",
        "RX_BYTES",
        "TX_FRAMES",
        "TX_BYTES",
        "FLOODED"
    );
    for p in ports {
        let mut dropped: Vec<String> = p.dropped.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if p.rx_errors > 0 {
            dropped.push(format!("rx_errors={}", p.rx_errors));
        }
        println!(
            "{:<10} {:<6} {:<10} {:<14} {:<9} {:>4} {:>10} {:>14} {:>10} {:>14} {:>8}  {}",
            p.port,
            if p.kind.is_empty() { "-" } else { &p.kind },
            p.ifname,
            if p.netns.is_empty() { "-" } else { &p.netns },
            match (p.up, p.link_up) {
                (false, _) => "down",
                (true, false) => "no-link",
                (true, true) => "up",
            },
            p.fdb_entries,
            p.rx_frames,
            p.rx_bytes,
            p.tx_frames,
            p.tx_bytes,
            p.flooded,
            if dropped.is_empty() {
                "0".to_string()
            } else {
                dropped.join(",")
            }
        );
        if let Some(v) = &p.vxlan {
            println!("{:<10} {v}", "");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_print_as_utc_time_of_day() {
        assert_eq!(utc_time_of_day(1_700_000_000_123_456), "22:13:20.123456");
        assert_eq!(utc_time_of_day(0), "?");
    }
}
