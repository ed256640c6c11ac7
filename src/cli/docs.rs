//! `vfabric completions` and `vfabric man`: shell completions and manual pages,
//! generated from the same clap definitions that parse the command line, so they
//! cannot drift from it.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{Cli, CliError};

/// Print a completion script on stdout.
#[derive(Debug, Args)]
#[command(after_help = "Install it where your shell looks:\n  \
    vfabric completions bash > /etc/bash_completion.d/vfabric\n  \
    vfabric completions zsh  > \"${fpath[1]}/_vfabric\"\n  \
    vfabric completions fish > ~/.config/fish/completions/vfabric.fish\n\
    or try it in the running shell:  source <(vfabric completions bash)")]
pub struct CompletionsArgs {
    /// The shell: bash, zsh or fish (also elvish, powershell).
    shell: Shell,
}

/// Write the manual pages, or print the main one.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    vfabric man | man -l -                      # read vfabric(1) now\n  \
    vfabric man /usr/local/share/man/man1       # install every page, then: man vfabric-migrate")]
pub struct ManArgs {
    /// Directory to write vfabric.1 and vfabric-VERB.1 into (created if missing).
    /// Without it, vfabric.1 goes to stdout.
    dir: Option<PathBuf>,
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is no error.
fn print(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn run_completions(a: CompletionsArgs) -> Result<(), CliError> {
    let mut cmd = Cli::command();
    // Into memory first: the generator panics on a failed write.
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "vfabric", &mut script);
    print(&script)
}

pub fn run_man(a: ManArgs) -> Result<(), CliError> {
    // Every page's footer names the version, not only the main one's; and no page
    // points to a `help` verb that has no page of its own.
    let cmd = Cli::command()
        .propagate_version(true)
        .disable_help_subcommand(true);
    match a.dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            print(&page)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir).map_err(|e| {
                format!("cannot write the manual pages into {}: {e}", dir.display())
            })?;
            let mut pages: Vec<String> = std::fs::read_dir(&dir)?
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("vfabric") && n.ends_with(".1"))
                .collect();
            pages.sort();
            println!(
                "wrote {} manual pages into {}: {}",
                pages.len(),
                dir.display(),
                pages.join(" ")
            );
        }
    }
    Ok(())
}
