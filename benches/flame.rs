//! What drawing a profile costs sbmon: a real 10 s CPU profile (`profile_cpu`) of an image
//! with three busy threads, then its stacks rendered again and again as an SVG flame graph
//! (`flame::svg`, through inferno), as speedscope JSON and as folded text, and a differential
//! SVG of the profile against itself. The profile is taken once; only the rendering is timed.
//!
//! Figures for `tools/bench`: `profile.samples`, `profile.stacks`, `profile.wall` (s),
//! `svg.bytes`, and `svg`, `diff_svg`, `speedscope`, `folded` (`.p50`, `.p99` µs, `.rate`).
//!
//! Run: `cargo bench --bench flame` (ITERATIONS=N renders, BENCH_SECONDS=N of profile).

use std::time::{Duration, Instant};

mod support;

use sbmon::agent::{Address, ClientOptions};
use sbmon::config::Config;
use sbmon::flame::{self, FoldedStack};
use sbmon::launch::{AgentAllow, LaunchOptions};
use sbmon::tools::{Allow, Catalog};
use serde_json::json;
use support::Latencies;

const BENCH: &str = "flame";

/// Three threads busy in different, recursive code, so the profile has depth and variety
/// (separate forms: the package must exist before the others are read).
const BUSY: [&str; 2] = [
    "(defpackage :sbmon-bench (:use :cl))",
    "(progn
  (defun sbmon-bench::fib (n) (if (< n 2) n (+ (sbmon-bench::fib (- n 1)) (sbmon-bench::fib (- n 2)))))
  (defun sbmon-bench::sorter () (loop (sort (loop repeat 2000 collect (random 1000000)) #'<)))
  (defun sbmon-bench::hasher ()
    (loop (let ((h (make-hash-table :test 'equal)))
            (dotimes (i 5000) (setf (gethash (format nil \"k~d\" i) h) i)))))
  (sb-thread:make-thread (lambda () (loop (sbmon-bench::fib 25))) :name \"bench fib\")
  (sb-thread:make-thread #'sbmon-bench::sorter :name \"bench sorter\")
  (sb-thread:make-thread #'sbmon-bench::hasher :name \"bench hasher\"))",
];

fn time(iterations: usize, mut f: impl FnMut()) -> Latencies {
    for _ in 0..iterations / 10 {
        f();
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        f();
        samples.push(start.elapsed());
    }
    Latencies::new(samples)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let iterations = support::iterations(200);
    let seconds = support::window(10.0, 2.0).as_secs_f64();
    let scratch = tempfile::tempdir().unwrap();
    let socket = scratch.path().join("bench.sock");
    let mut sbcl = support::start_image(
        &socket,
        LaunchOptions {
            before_start: BUSY.iter().map(|f| f.to_string()).collect(),
            allow: AgentAllow {
                control: true,
                eval: false,
            },
            ..LaunchOptions::default()
        },
        Duration::from_secs(60),
    )
    .await;
    let catalog = Catalog::single_target(
        Address::Unix(socket.clone()),
        ClientOptions {
            call_timeout: Duration::from_secs_f64(seconds + 60.0),
            ..ClientOptions::default()
        },
        Config::default(),
        Allow {
            control: true,
            eval: false,
        },
        Default::default(),
    );
    let started = Instant::now();
    let profile = catalog
        .call(
            "profile_cpu",
            json!({"seconds": seconds, "max_stacks": 1000}),
        )
        .await
        .expect("profile_cpu");
    let wall = started.elapsed().as_secs_f64();
    sbcl.stop();
    let stacks: Vec<FoldedStack> =
        serde_json::from_value(profile["stacks"].clone()).expect("stacks");
    let samples = profile["samples"].as_u64().unwrap();
    assert_eq!(
        stacks.iter().map(|s| s.samples).sum::<u64>(),
        samples,
        "the stacks add up to the samples"
    );
    assert!(
        stacks.len() > 3,
        "a profile with variety: {} stacks",
        stacks.len()
    );

    let svg = flame::svg("bench", "samples", &stacks).unwrap();
    let text = String::from_utf8_lossy(&svg);
    assert!(
        text.contains("FIB") && text.trim_end().ends_with("</svg>"),
        "an SVG that draws the busy threads"
    );
    let renders = [
        (
            "svg",
            time(iterations, || {
                flame::svg("bench", "samples", &stacks).unwrap();
            }),
        ),
        (
            "diff_svg",
            time(iterations, || {
                flame::diff_svg("bench", "samples", &stacks, &stacks).unwrap();
            }),
        ),
        (
            "speedscope",
            time(iterations, || {
                flame::speedscope("bench", &stacks);
            }),
        ),
        (
            "folded",
            time(iterations, || {
                flame::folded_text(&stacks);
            }),
        ),
    ];
    println!(
        "a {seconds} s profile of 3 busy threads: {samples} samples, {} distinct stacks, taken in {wall:.2} s; SVG {} KB",
        stacks.len(),
        svg.len() / 1000
    );
    support::record(BENCH, "profile.samples", samples as f64, "count");
    support::record(BENCH, "profile.stacks", stacks.len() as f64, "count");
    support::record(BENCH, "profile.wall", wall, "s");
    support::record(BENCH, "svg.bytes", svg.len() as f64, "bytes");
    for (name, l) in &renders {
        println!(
            "{name:<12} n={:<4} p50 {:>9.1} µs  p99 {:>9.1} µs",
            l.len(),
            l.micros(0.5),
            l.micros(0.99)
        );
        support::record_latencies(BENCH, name, l);
    }
}
