//! Command-line interface: one subcommand per daemon or control verb.

mod events;
mod host;
mod measure;
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
    /// Run the userspace learning switch (holds the TAP ports).
    Switch(switch::SwitchArgs),
    /// Show or flush the switch's forwarding table.
    Fdb(switch::FdbArgs),
    /// Show the switch's ports and their counters.
    Ports(switch::PortsArgs),
    /// Run the hypervisor daemon of one emulated host (in its namespace).
    Host(host::HostArgs),
    /// Create, list, show and destroy VMs.
    Vm(host::VmArgs),
    /// Live-migrate a running VM to another host.
    ///
    /// Ctrl-C cancels the migration, as `vfabric migrate cancel NAME` does from another
    /// shell: the VM keeps running on the source, memory intact. After the point of no
    /// return (the device state sent to the target) there is nothing left to cancel and
    /// the move completes. A CLI that dies otherwise (SIGKILL, lost connection) cancels
    /// nothing: the migration carries on.
    Migrate(host::MigrateArgs),
    /// Ping a VM from the client namespace while it migrates; report the loss window.
    Measure(measure::MeasureArgs),
    /// Send one request to a VM's UDP service (port 7777) and print the reply.
    Udp(udp::UdpArgs),
    /// Follow the daemons' events live, merged in time order.
    Events(events::EventsArgs),
    /// Create the fabric CA and host certificates for authenticated, encrypted vMotion.
    Pki(host::PkiArgs),
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Host(a) => host::run_host(a),
        Command::Vm(a) => host::run_vm(a),
        Command::Migrate(a) => host::run_migrate(a),
        Command::Measure(a) => measure::run(a),
        Command::Udp(args) => udp::run(args),
        Command::Events(a) => events::run(a),
        Command::Pki(a) => host::run_pki(a),
        Command::Switch(a) => switch::run_switch(a),
        Command::Fdb(a) => switch::run_fdb(a),
        Command::Ports(a) => switch::run_ports(a),
    }
}
