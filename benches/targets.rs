//! What each watched image costs sbmon: a real `sbmon serve` watching 1 and then 20 real SBCL
//! images. For each: sbmon's CPU and resident memory while idle (its sampler reading every
//! target every 5 s, the default, and nobody calling), then while sampling every second (the
//! shortest interval), and the latency of a full Prometheus scrape (`/metrics`, every target).
//! CPU is utime + stime from `/proc/PID/stat` over the window (10 ms ticks), RSS is `VmRSS`.
//!
//! Figures for `tools/bench`: `metrics.t1`, `metrics.t20` (`.p50`, `.p99`, `.rate`),
//! `idle.t1|t20.cpu_percent`, `idle.t1|t20.rss`, `sampling.t1|t20.cpu_percent`,
//! `sampling.t1|t20.rss`, `sampling.t1|t20.cpu_per_sample`, `rss.after_scrapes.t1|t20`, and
//! the checked ratios `metrics.t20_over_t1`, `metrics.per_target_over_t1` (the cost of one
//! more target over a 1-target scrape, p50) and `rss.t20_over_t1` (idle).
//!
//! Run: `cargo bench --bench targets` (ITERATIONS=N scrapes, BENCH_SECONDS=N per window).

use std::time::{Duration, Instant};

mod support;

use sbmon::launch::LaunchOptions;
use support::{Latencies, Sbmon};

const BENCH: &str = "targets";
const MANY: usize = 20;

struct Figures {
    scrape: Latencies,
    idle_rss: u64,
}

/// sbmon's CPU (percent of a core) and RSS after `window` of whatever it does by itself.
async fn watch(sbmon: &Sbmon, window: Duration) -> (f64, u64) {
    let before = support::cpu_seconds(sbmon.pid());
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let cpu = support::cpu_seconds(sbmon.pid()) - before;
    let percent = cpu / start.elapsed().as_secs_f64() * 100.0;
    (percent, support::rss_bytes(sbmon.pid()))
}

async fn measure(label: &str, targets: &[String], iterations: usize, window: Duration) -> Figures {
    let mut args = Vec::new();
    for t in targets {
        args.extend(["--target".to_string(), t.clone()]);
    }
    // Idle: the default 5 s sampler; the first samples and start-up allocations settle first.
    let sbmon = Sbmon::serve(&args);
    tokio::time::sleep(Duration::from_secs_f64(support::full_or_short(6.0, 2.0))).await;
    let (idle_cpu, idle_rss) = watch(&sbmon, window).await;

    let http = reqwest::Client::new();
    let url = format!("{}/metrics", sbmon.base);
    let scrape = support::sequential(iterations, || async {
        let text = http.get(&url).send().await.unwrap().text().await.unwrap();
        let up = text
            .lines()
            .filter(|l| l.starts_with("sbmon_target_up{") && l.ends_with(" 1"))
            .count();
        assert_eq!(up, targets.len(), "every target up in the scrape");
    })
    .await;
    let after_rss = support::rss_bytes(sbmon.pid());
    drop(sbmon);

    // Sampling every second.
    args.extend(["--sample-interval".to_string(), "1".to_string()]);
    let sbmon = Sbmon::serve(&args);
    tokio::time::sleep(Duration::from_secs_f64(support::full_or_short(3.0, 1.5))).await;
    let (sampling_cpu, sampling_rss) = watch(&sbmon, window).await;
    drop(sbmon);
    // Sampling every second takes 0.8 more samples a second per target than every 5 s.
    let per_sample = (sampling_cpu - idle_cpu) / 100.0 / (0.8 * targets.len() as f64) * 1e6;

    println!(
        "{label:>4} targets: /metrics p50 {:>8.1} µs p99 {:>8.1} µs | idle (5 s sampler) {:.2} % CPU, RSS {:.1} MiB ({:.1} MiB after {} scrapes) | sampling every 1 s: {:.2} % CPU, RSS {:.1} MiB, about {:.0} µs CPU a sample",
        scrape.micros(0.5),
        scrape.micros(0.99),
        idle_cpu,
        idle_rss as f64 / 1048576.0,
        after_rss as f64 / 1048576.0,
        scrape.len(),
        sampling_cpu,
        sampling_rss as f64 / 1048576.0,
        per_sample,
    );
    support::record_latencies(BENCH, &format!("metrics.{label}"), &scrape);
    support::record(
        BENCH,
        &format!("idle.{label}.cpu_percent"),
        idle_cpu,
        "percent",
    );
    support::record(
        BENCH,
        &format!("idle.{label}.rss"),
        idle_rss as f64,
        "bytes",
    );
    support::record(
        BENCH,
        &format!("rss.after_scrapes.{label}"),
        after_rss as f64,
        "bytes",
    );
    support::record(
        BENCH,
        &format!("sampling.{label}.cpu_percent"),
        sampling_cpu,
        "percent",
    );
    support::record(
        BENCH,
        &format!("sampling.{label}.rss"),
        sampling_rss as f64,
        "bytes",
    );
    support::record(
        BENCH,
        &format!("sampling.{label}.cpu_per_sample"),
        per_sample,
        "us",
    );
    Figures { scrape, idle_rss }
}

#[tokio::main]
async fn main() {
    let iterations = support::iterations(1000);
    let window = support::window(30.0, 3.0);
    let scratch = tempfile::tempdir().unwrap();
    let sockets: Vec<_> = (0..MANY)
        .map(|i| scratch.path().join(format!("image{i}.sock")))
        .collect();
    // All images start at once; each loads the agent on its own.
    let images = futures::future::join_all(
        sockets
            .iter()
            .map(|s| support::start_image(s, LaunchOptions::default(), Duration::from_secs(180))),
    )
    .await;
    let targets: Vec<String> = sockets
        .iter()
        .enumerate()
        .map(|(i, s)| format!("image{i}=unix:{}", s.display()))
        .collect();
    println!(
        "sbmon serve watching 1 and {MANY} SBCL images: {iterations} scrapes, {:.0} s windows, load average {:.2}",
        window.as_secs_f64(),
        support::load_average()
    );
    let one = measure("t1", &targets[..1], iterations, window).await;
    let many = measure("t20", &targets, iterations, window).await;
    let (p1, p20) = (one.scrape.micros(0.5), many.scrape.micros(0.5));
    let r = support::record_ratio(BENCH, "metrics.t20_over_t1", p20, p1);
    let per_target = support::record_ratio(
        BENCH,
        "metrics.per_target_over_t1",
        (p20 - p1) / (MANY - 1) as f64,
        p1,
    );
    let rss = support::record_ratio(
        BENCH,
        "rss.t20_over_t1",
        many.idle_rss as f64,
        one.idle_rss as f64,
    );
    println!(
        "20 targets against 1: scrape {r:.1}x (each further target {:.0} µs, {per_target:.2}x a 1-target scrape), idle RSS {rss:.2}x",
        (p20 - p1) / (MANY - 1) as f64
    );
    drop(images);
}
