//! The `vfabric` binary: parses the command line and dispatches. Errors become one line.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        eprintln!("vfabric: error: {msg}");
        std::process::exit(1);
    }
}
