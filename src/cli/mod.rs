//! Command-line interface: one subcommand per daemon or control verb.

mod docs;
mod events;
mod fleet;
mod flood;
mod host;
mod measure;
mod switch;
mod topology;
mod udp;

use clap::{CommandFactory, Parser, Subcommand};

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
        logs go to stderr, filtered by RUST_LOG (default info).",
    after_help = "Getting started (as root): netns-scripts/demo.sh runs the whole story; \
        netns-scripts/up.sh brings the fabric up for `vfabric vm create`, `migrate` and \
        `measure`. Each verb has its own --help.\n\n\
        Environment: VF_PREFIX names the fabric's namespaces (default vf: vf-client, \
        vf-silo104, vf-silo105); VFABRIC_RUN_DIR holds its control sockets and logs \
        (default /run/vfabric). Use the same values as netns-scripts/up.sh did. \
        VFABRIC_REMOTE=NAME=IP:PORT[,…] (else the file $VFABRIC_RUN_DIR/remotes) names \
        daemons on other machines, reached over TCP and TLS with the operator certificate \
        $VFABRIC_RUN_DIR/pki/$VFABRIC_OPERATOR.operator.pem (default admin; see `vfabric \
        pki issue-operator`)."
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
    /// Add or delete a port of the running switch.
    Port(switch::PortArgs),
    /// Run the hypervisor daemon of one emulated host (in its namespace), or put a host
    /// in and out of maintenance mode (`vfabric host maintenance enter|exit HOST`).
    Host(host::HostArgs),
    /// List the hosts: mode, capacity, reserved memory, load and VMs.
    Hosts(fleet::HostsArgs),
    /// Even out the hosts' memory loads by live migration (a DRS-like balancer).
    Balance(fleet::BalanceArgs),
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
    /// Print a shell completion script for bash, zsh or fish.
    Completions(docs::CompletionsArgs),
    /// Write the manual pages (vfabric.1 and one per verb), or print vfabric.1.
    Man(docs::ManArgs),
    /// Follow the daemons' events live, merged in time order.
    Events(events::EventsArgs),
    /// Send random-source-MAC frames at a fixed rate (for bench/flood.sh).
    #[command(hide = true)]
    MacFlood(flood::FloodArgs),
    /// Create the fabric CA and host certificates for authenticated, encrypted vMotion.
    Pki(host::PkiArgs),
    /// Check a topology file, or print the plan netns-scripts/up.sh builds from it.
    Topology(topology::TopologyArgs),
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Host(a) => host::run_host(a),
        Command::Hosts(a) => fleet::run_hosts(a),
        Command::Balance(a) => fleet::run_balance(a),
        Command::Vm(a) => host::run_vm(a),
        Command::Migrate(a) => host::run_migrate(a),
        Command::Measure(a) => measure::run(a),
        Command::Udp(args) => udp::run(args),
        Command::Events(a) => events::run(a),
        Command::MacFlood(a) => flood::run(a),
        Command::Pki(a) => host::run_pki(a),
        Command::Topology(a) => topology::run(a),
        Command::Switch(a) => switch::run_switch(a),
        Command::Fdb(a) => switch::run_fdb(a),
        Command::Ports(a) => switch::run_ports(a),
        Command::Port(a) => switch::run_port(a),
        Command::Completions(a) => docs::run_completions(a),
        Command::Man(a) => docs::run_man(a),
    }
}

/// The verbs of `args` (the whole command line) that name subcommands:
/// `vfabric vm create x --host a` gives "vfabric vm create".
pub fn command_path(args: &[String]) -> String {
    let mut cmd = Cli::command();
    let mut path = vec!["vfabric".to_string()];
    for a in args.iter().skip(1) {
        let Some(sub) = cmd.find_subcommand(a).cloned() else {
            continue;
        };
        path.push(a.clone());
        cmd = sub;
    }
    path.join(" ")
}

/// Folds clap's multi-line report of a bad command line into the one line the binary
/// prints after `vfabric: error: `: the error with its indented details, clap's tips,
/// and which `--help` to read (that of `command`, unless clap's usage names another).
pub fn usage_error_line(rendered: &str, command: &str) -> String {
    let mut error = String::new();
    let mut tips = Vec::new();
    let mut help = format!("{command} --help");
    for para in rendered.split("\n\n") {
        let joined = para
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if let Some(usage) = joined.strip_prefix("Usage: ") {
            // "vfabric migrate --to <TO> <NAME>": the command path ends where the
            // arguments begin.
            let path: Vec<&str> = usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['-', '<', '[']))
                .collect();
            if !path.is_empty() {
                help = format!("{} --help", path.join(" "));
            }
        } else if joined.starts_with("tip: ") {
            tips.push(joined);
        } else if joined.starts_with("For more information") || joined.is_empty() {
            continue;
        } else if error.is_empty() {
            error = joined
                .strip_prefix("error: ")
                .unwrap_or(&joined)
                .to_string();
        } else {
            tips.push(joined);
        }
    }
    let mut line = error;
    for t in tips {
        line.push_str("; ");
        line.push_str(&t);
    }
    line.push_str(&format!(" (see '{help}')"));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_for(args: &[&str]) -> String {
        let e = Cli::try_parse_from(args).unwrap_err();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        usage_error_line(&e.render().to_string(), &command_path(&args))
    }

    #[test]
    fn clap_errors_fold_into_one_line() {
        let l = line_for(&["vfabric", "migrate", "vm1"]);
        assert_eq!(
            l,
            "the following required arguments were not provided: --to <TO> (see 'vfabric migrate --help')"
        );
        let l = line_for(&["vfabric", "migrat"]);
        assert_eq!(
            l,
            "unrecognized subcommand 'migrat'; tip: a similar subcommand exists: 'migrate' (see 'vfabric --help')"
        );
        let l = line_for(&["vfabric", "fdb", "show", "--jsn"]);
        assert!(
            l.starts_with("unexpected argument '--jsn' found; tip:"),
            "{l}"
        );
        assert!(l.ends_with("(see 'vfabric fdb show --help')"), "{l}");
        let l2 = line_for(&["vfabric", "completions", "tcsh"]);
        assert!(l2.starts_with("invalid value 'tcsh' for '<SHELL>'"), "{l2}");
        assert!(l2.ends_with("(see 'vfabric completions --help')"), "{l2}");
        for l in [l, l2, line_for(&["vfabric", "udp"])] {
            assert!(!l.contains('\n'), "{l}");
            assert!(!l.starts_with("error:"), "{l}");
        }
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
