//! The `vfabric` binary: parses the command line and dispatches. Errors become one line.

mod cli;

use clap::error::ErrorKind;
use clap::Parser;

fn main() {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        // Help and version are answers, not errors: clap prints them and exits 0.
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            let argv: Vec<String> = std::env::args().collect();
            eprintln!(
                "vfabric: error: {}",
                cli::usage_error_line(&e.render().to_string(), &cli::command_path(&argv))
            );
            std::process::exit(e.exit_code());
        }
    };
    if let Err(e) = cli::run(args) {
        let msg = vfabric::errors::chain(&*e);
        eprintln!("vfabric: error: {msg}");
        std::process::exit(1);
    }
}
