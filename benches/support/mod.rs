//! What the benchmarks share: sequential timing with a warm-up, and latency percentiles.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

/// ITERATIONS from the environment, else `default`.
pub fn iterations(default: usize) -> usize {
    std::env::var("ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// Time `iterations` sequential calls of `f`, after a tenth as many unmeasured ones.
pub async fn sequential<F, Fut>(iterations: usize, mut f: F) -> Latencies
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..iterations / 10 {
        f().await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        f().await;
        samples.push(start.elapsed());
    }
    Latencies::new(samples)
}

/// Sorted call latencies.
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        Latencies(samples)
    }

    /// The `p` quantile, microseconds.
    pub fn micros(&self, p: f64) -> f64 {
        let i = ((self.0.len() as f64 * p) as usize).min(self.0.len() - 1);
        self.0[i].as_secs_f64() * 1e6
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Calls per second when made one after another.
    pub fn rate(&self) -> f64 {
        self.0.len() as f64 / self.0.iter().sum::<Duration>().as_secs_f64()
    }
}

/// Whether `tools/bench` asked for a short run (`SBMON_BENCH_SHORT=1`): fewer iterations and
/// rounds, enough for ratios but not for the README's figures.
pub fn short() -> bool {
    std::env::var("SBMON_BENCH_SHORT").is_ok_and(|v| v == "1")
}

/// Record one figure for `tools/bench`'s JSON report: a line appended to the file named by
/// `SBMON_BENCH_REPORT`, if set. `bench` is the bench binary, `metric` a stable dotted name
/// (`memory_stats.agent.p50`), `unit` one of `us`, `ms`, `s`, `bytes`, `per_s`, `ratio`,
/// `percent`, `count`.
pub fn record(bench: &str, metric: &str, value: f64, unit: &str) {
    use std::io::Write;
    let Ok(path) = std::env::var("SBMON_BENCH_REPORT") else {
        return;
    };
    let line =
        serde_json::json!({ "bench": bench, "metric": metric, "value": value, "unit": unit });
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot append to SBMON_BENCH_REPORT {path}: {e}"));
    writeln!(file, "{line}").expect("write bench report");
}
