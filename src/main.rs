//! The `sbmon` binary: parse the command line, hand it to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    sbmon::logging::init();
    sbmon::cli::run(sbmon::cli::Cli::parse())
}
