//! What one sample costs: the sampler reads each target every `--sample-interval`, so its
//! price is paid forever. Measured against a real SBCL running `examples/churn.lisp` (so the
//! GC ring is full and collections happen between samples):
//! - the wall time of one sample (`sampler::sample`: `:memory`, `:gc` with its 64 records,
//!   and two /proc files);
//! - the CPU the image spends per sample (its /proc CPU with sampling minus without, over the
//!   same time), and the CPU sbmon spends per sample (its own getrusage);
//! - the ring's memory per target.
//!
//! Figures for `tools/bench`: `sample` (`.p50`, `.p99` µs, `.rate`), `image_cpu_per_sample`,
//! `sbmon_cpu_per_sample` (µs), `ring.bytes_per_target`.
//!
//! Run: `cargo bench --bench sampler` (ITERATIONS=N to change the sample size).

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::Latencies;

mod support;

const BENCH: &str = "sampler";

use sbmon::agent::{Address, ClientOptions};
use sbmon::launch::{LaunchOptions, Sbcl};
use sbmon::samples::{Entry, Settings};
use sbmon::targets::Target;
use sbmon::wire::Sexp;

fn process_cpu(pid: i32) -> f64 {
    let p = sbmon::process::sample(pid).expect("/proc");
    p.cpu_seconds
}

fn own_cpu() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let iterations = support::iterations(2000);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let churn = format!("{}/examples/churn.lisp", env!("CARGO_MANIFEST_DIR"));
    let mut sbcl = Sbcl::spawn(&LaunchOptions {
        listen: Some(Address::Unix(socket.clone())),
        before_start: vec![format!("(load {})", Sexp::string(churn))],
        ..LaunchOptions::default()
    })
    .expect("start sbcl");
    sbcl.wait_ready(Duration::from_secs(60), &ClientOptions::default())
        .await
        .expect("agent ready");
    let pid = sbcl.pid;
    let target = Arc::new(Target::new(
        "bench",
        Address::Unix(socket),
        ClientOptions::default(),
    ));

    // The image's own CPU over a quiet stretch, then over the same stretch while sampled.
    let quiet = support::window(5.0, 2.0);
    let before = process_cpu(pid);
    tokio::time::sleep(quiet).await;
    let idle_rate = (process_cpu(pid) - before) / quiet.as_secs_f64();

    let mut samples = Vec::with_capacity(iterations);
    let (image_before, own_before, started) = (process_cpu(pid), own_cpu(), Instant::now());
    for _ in 0..iterations {
        let t = Instant::now();
        let entry = sbmon::sampler::sample(&target).await;
        samples.push(t.elapsed());
        assert!(matches!(entry, Entry::Sample(_)), "a sample failed");
    }
    let wall = started.elapsed().as_secs_f64();
    let image_cpu = process_cpu(pid) - image_before - idle_rate * wall;
    let own = own_cpu() - own_before;
    let l = Latencies::new(samples);
    println!(
        "one sample          n={:<6} p50={:>8.1}µs p90={:>8.1}µs p99={:>8.1}µs max={:>8.1}µs",
        l.len(),
        l.micros(0.50),
        l.micros(0.90),
        l.micros(0.99),
        l.micros(1.0),
    );
    println!(
        "image CPU per sample {:>8.1}µs (beyond its own work of {:.1} % of a core)",
        image_cpu / iterations as f64 * 1e6,
        idle_rate * 100.0
    );
    println!(
        "sbmon CPU per sample {:>8.1}µs",
        own / iterations as f64 * 1e6
    );
    support::record_latencies(BENCH, "sample", &l);
    support::record(
        BENCH,
        "image_cpu_per_sample",
        image_cpu / iterations as f64 * 1e6,
        "us",
    );
    support::record(
        BENCH,
        "sbmon_cpu_per_sample",
        own / iterations as f64 * 1e6,
        "us",
    );
    let settings = Settings::default();
    println!(
        "ring per target      {} entries x {} bytes = {} KiB (interval {:?}, history {:?})",
        settings.capacity(),
        std::mem::size_of::<Entry>(),
        settings.capacity() * std::mem::size_of::<Entry>() / 1024,
        settings.interval,
        settings.history
    );
    support::record(
        BENCH,
        "ring.bytes_per_target",
        (settings.capacity() * std::mem::size_of::<Entry>()) as f64,
        "bytes",
    );
    sbcl.stop();
}
