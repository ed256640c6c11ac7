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
        let mut msg = e.to_string();
        let mut last = msg.clone();
        let mut src = e.source();
        while let Some(s) = src {
            let text = s.to_string();
            // A daemon's answer often names what the context named ("host silo104" and
            // "host silo104 is in maintenance mode …"): say it once.
            if text.starts_with(&last) {
                msg.truncate(msg.len() - last.len());
            } else {
                msg.push_str(": ");
            }
            msg.push_str(&text);
            last = text;
            src = s.source();
        }
        eprintln!("vfabric: error: {msg}");
        std::process::exit(1);
    }
}
