//! The `sbmon` binary: parse the command line, hand it to the library.

fn main() -> std::process::ExitCode {
    sbmon::logging::init();
    match sbmon::cli::parse() {
        Ok(cli) => sbmon::cli::run(cli),
        Err(code) => code,
    }
}
