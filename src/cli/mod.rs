//! Command-line interface: one subcommand per daemon or control verb.

mod switch;
mod udp;

use clap::{Parser, Subcommand};

/// Error type of every subcommand: the binary prints it, with its causes, on one line.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Parser)]
#[command(
    name = "vfabric",
    version,
    about = "Emulate vMotion-style live migration on a real virtual network",
    long_about = "Emulate vMotion-style live migration on a real virtual network.\n\n\
        A userspace learning switch joins TAP ports of emulated hypervisor hosts and a \
        client namespace; a VM runs on one host and is moved to another by pre-copy \
        migration; the target announces the VM with RARP so the switch relearns it.\n\n\
        Daemons serve control sockets under $VFABRIC_RUN_DIR (default /run/vfabric); \
        logs go to stderr, filtered by RUST_LOG (default info)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send one request to a VM's UDP service (port 7777) and print the reply
    Udp(udp::UdpArgs),
    Switch(switch::SwitchArgs),
    Fdb(switch::FdbArgs),
    Ports(switch::PortsArgs),
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Udp(args) => udp::run(args),
        Command::Switch(a) => switch::run_switch(a),
        Command::Fdb(a) => switch::run_fdb(a),
        Command::Ports(a) => switch::run_ports(a),
    }
}
