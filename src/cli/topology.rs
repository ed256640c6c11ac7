//! `vfabric topology check|render`: validates a topology file and prints the plan
//! netns-scripts/up.sh builds from, so that no shell script parses TOML.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use vfabric::topology::{self, Topology};

use super::CliError;

#[derive(Debug, Args)]
#[command(
    about = "Check a topology file, or print the plan up.sh builds from it",
    long_about = "Check a topology file, or print the plan netns-scripts/up.sh builds from it.\n\n\
        A topology file (TOML) lists the fabric's hosts, clients, vMotion network and the \
        VMs to create at start; netns-scripts/topologies/ holds examples. Errors name the \
        file, the line and column, and the field, on one line.",
    after_help = "Examples:\n  \
        vfabric topology check netns-scripts/topologies/four-hosts.toml\n  \
        vfabric topology render four-hosts.toml --format json\n  \
        vfabric topology render            # the built-in default (client, silo104, silo105)"
)]
pub struct TopologyArgs {
    #[command(subcommand)]
    cmd: TopologyCmd,
}

#[derive(Debug, Subcommand)]
enum TopologyCmd {
    /// Validate FILE and summarise it.
    Check {
        file: PathBuf,
        #[command(flatten)]
        opts: Opts,
    },
    /// Print the validated plan: bash assignments (what up.sh sources) or JSON.
    Render {
        /// The topology file (default: the built-in default topology).
        file: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
        #[command(flatten)]
        opts: Opts,
    },
}

#[derive(Debug, Args)]
struct Opts {
    /// Capacity of hosts whose entry gives none, MB (up.sh passes VF_HOST_CAPACITY_MB).
    #[arg(long, value_name = "MB", default_value_t = topology::DEFAULT_CAPACITY_MB)]
    default_capacity_mb: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// One JSON object.
    Json,
    /// bash array assignments, every value single-quoted.
    Shell,
}

fn load(file: Option<&PathBuf>, opts: &Opts) -> Result<Topology, CliError> {
    match file {
        Some(f) => Ok(topology::load(f, opts.default_capacity_mb)?),
        None => Ok(topology::parse(
            topology::DEFAULT_LABEL,
            topology::DEFAULT_TOML,
            opts.default_capacity_mb,
        )?),
    }
}

pub fn run(a: TopologyArgs) -> Result<(), CliError> {
    match a.cmd {
        TopologyCmd::Check { file, opts } => {
            let t = load(Some(&file), &opts)?;
            let machines = if t.machines.is_empty() {
                String::new()
            } else {
                format!(
                    ", machines: {}",
                    t.machines
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            println!(
                "{}: ok: {} host(s), {} client(s), {} VM(s), vMotion network: {}{machines}",
                file.display(),
                t.hosts.len(),
                t.clients.len(),
                t.vms.len(),
                t.vmotion
            );
        }
        TopologyCmd::Render { file, format, opts } => {
            let t = load(file.as_ref(), &opts)?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&t)?),
                Format::Shell => print!("{}", t.to_shell()),
            }
        }
    }
    Ok(())
}
