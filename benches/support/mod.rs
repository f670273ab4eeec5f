//! What the benchmarks share: sequential timing with a warm-up, latency percentiles, the
//! figures each bench hands `tools/bench` (`record`, `short`), and the real processes several
//! benches start: SBCL images with the agent, a `sbmon serve` with its HTTP address, and the
//! `/proc` figures (CPU, RSS) read of them.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sbmon::agent::{Address, ClientOptions};
use sbmon::launch::{LaunchOptions, Sbcl};

/// ITERATIONS from the environment, else `default` (a tenth of it in a short run, at least 50).
pub fn iterations(default: usize) -> usize {
    std::env::var("ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if short() {
            (default / 10).max(50)
        } else {
            default
        })
}

/// `full`, or `short_value` in a short run.
pub fn full_or_short<T>(full: T, short_value: T) -> T {
    if short() { short_value } else { full }
}

/// A measuring window: `full` seconds, or `short_secs` in a short run (BENCH_SECONDS in the
/// environment overrides both).
pub fn window(full: f64, short_secs: f64) -> Duration {
    let secs = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if short() { short_secs } else { full });
    Duration::from_secs_f64(secs)
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

/// Record `l`'s p50 and p99 (`METRIC.p50`, `.p99`, µs) and its sequential rate (`.rate`).
pub fn record_latencies(bench: &str, metric: &str, l: &Latencies) {
    record(bench, &format!("{metric}.p50"), l.micros(0.50), "us");
    record(bench, &format!("{metric}.p99"), l.micros(0.99), "us");
    record(bench, &format!("{metric}.rate"), l.rate(), "per_s");
}

/// Record a ratio for `tools/bench --check`. By the project's convention a checked ratio is
/// the cost of what sbmon does over a reference measured in the same run (sbmon over Swank,
/// 20 targets over 1), so machine speed cancels out and a larger value is a regression.
pub fn record_ratio(bench: &str, metric: &str, cost: f64, reference: f64) -> f64 {
    let ratio = cost / reference;
    record(bench, metric, ratio, "ratio");
    ratio
}

/// Start SBCL with the agent listening on `socket`, with `options` otherwise, and wait until
/// it answers (`wait` allows for loading Swank or building a big heap first).
pub async fn start_image(socket: &Path, options: LaunchOptions, wait: Duration) -> Sbcl {
    let mut sbcl = Sbcl::spawn(&LaunchOptions {
        listen: Some(Address::Unix(socket.to_path_buf())),
        ..options
    })
    .expect("start sbcl");
    if let Err(e) = sbcl.wait_ready(wait, &ClientOptions::default()).await {
        panic!("agent not ready: {e}\n{}", sbcl.log_tail());
    }
    sbcl
}

/// A `sbmon` process under test, killed and reaped when dropped (also when the bench panics).
pub struct Sbmon {
    pub child: Child,
    /// `http://127.0.0.1:PORT` when started with `--http`.
    pub base: String,
}

impl Sbmon {
    /// `sbmon serve --http 127.0.0.1:0 ARGS`, once it has reported its address.
    pub fn serve(args: &[String]) -> Sbmon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sbmon"))
            .args(["serve", "--http", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sbmon serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps draining stderr after the address, so sbmon never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("http://") {
                    let url: String = line[at..].split_whitespace().next().unwrap_or("").into();
                    let _ = tx.send(url);
                }
            }
        });
        let mut sbmon = Sbmon {
            child,
            base: String::new(),
        };
        sbmon.base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("sbmon serve reports its address");
        sbmon
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Sbmon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU seconds of process `pid`, from `/proc/PID/stat` (10 ms ticks).
pub fn cpu_seconds(pid: i32) -> f64 {
    sbmon::process::sample(pid)
        .expect("/proc/PID/stat")
        .cpu_seconds
}

/// Resident set of process `pid`, bytes (`VmRSS`).
pub fn rss_bytes(pid: i32) -> u64 {
    sbmon::process::sample(pid)
        .expect("/proc/PID/status")
        .rss_bytes
}

/// The 1-minute load average, to say how busy the machine was while a figure was taken.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
