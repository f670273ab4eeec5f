//! Logs go to stderr only (stdout carries results and, for MCP, protocol). The level comes
//! from `SBMON_LOG` (e.g. `SBMON_LOG=debug`), default `warn`.

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SBMON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
