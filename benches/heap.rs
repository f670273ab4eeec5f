//! What `heap_histogram` and `heap_retainers` cost a running image, measured against a real
//! SBCL whose heap holds known objects (SIZES, default 100 and 500 MB of them):
//! - the walk's own time and the tool's wall time;
//! - the longest gap two threads in the image saw between iterations of their loops while the
//!   tool ran, against their longest gap over the same time without it: a thread that sleeps
//!   1 ms per iteration and allocates nothing (`idle`), and one that allocates 64 KiB and
//!   sleeps 0.1 ms per iteration into an 8 MiB nursery (`alloc`, which needs a collection
//!   every few tens of ms and so waits for any walk that holds collections off), both timed
//!   with CLOCK_MONOTONIC;
//! - for `heap_retainers`, the duration of SB-EXT:SEARCH-ROOTS (every thread stopped, with
//!   the agent's retries) and the same two gaps.
//!
//! The gaps are read back with the agent's :eval (the image is started with :allow :eval).
//! Figures for `tools/bench` (the median of the runs), for each size N: `heap_histogram.Nmb.`
//! and `heap_retainers.Nmb.` `wall`, `walk` or `search` (s), `gap_idle`, `gap_alloc` (ms),
//! `quiet.Nmb.gap_idle|gap_alloc` (ms), `heap.Nmb.used` (bytes), `heap.Nmb.objects`.
//!
//! Run: `cargo bench --bench heap` (SIZES=100,500 and RUNS=3 to change; a short run: 50 MB,
//! one run).

use std::time::{Duration, Instant};

use sbmon::agent::ops::{EvalOutcome, EvalRequest};
use sbmon::agent::{Address, AgentClient, ClientOptions};
use sbmon::config::Config;
use sbmon::launch::{AgentAllow, LaunchOptions, Sbcl};
use sbmon::tools::Catalog;
use serde_json::{Value, json};

mod support;

const BENCH: &str = "heap";

/// One item: a 4-slot structure (48 bytes) holding a cons (16) and a 64-byte octet vector
/// (80): 144 bytes, plus its 8-byte slot in the vector that holds them all.
const ITEM_BYTES: u64 = 152;

fn heap_forms(megabytes: u64) -> Vec<String> {
    let items = megabytes * 1_000_000 / ITEM_BYTES;
    vec![
        "(defpackage :sbmon-bench (:use :cl))".into(),
        "(defstruct (sbmon-bench::bench-item (:constructor sbmon-bench::make-bench-item (sbmon-bench::a sbmon-bench::b))) sbmon-bench::a sbmon-bench::b sbmon-bench::c sbmon-bench::d)".into(),
        format!(
            "(defvar sbmon-bench::*heap*
               (let ((v (make-array {items})))
                 (dotimes (i {items} v)
                   (setf (svref v i)
                         (sbmon-bench::make-bench-item
                           (cons i i) (make-array 64 :element-type '(unsigned-byte 8)))))))"
        ),
        "(sb-ext:gc :full t)".into(),
        "(setf (sb-ext:bytes-consed-between-gcs) (* 8 1024 1024))".into(),
        // Longest gap (µs) between loop iterations of each thread, since the last reset.
        "(progn
           (sb-ext:defglobal sbmon-bench::**gaps** (make-array 2 :element-type 'fixnum :initial-element 0))
           (defvar sbmon-bench::*sink* nil)
           (defun sbmon-bench::now-us ()
             (multiple-value-bind (s ns) (sb-unix::clock-gettime 1) ; CLOCK_MONOTONIC
               (+ (* s 1000000) (floor ns 1000))))
           (defun sbmon-bench::tick (slot allocate)
             (let ((last (sbmon-bench::now-us)))
               (loop
                 (when allocate
                   (setf sbmon-bench::*sink* (make-array 65536 :element-type '(unsigned-byte 8))))
                 (sleep (if allocate 0.0001 0.001))
                 (let* ((now (sbmon-bench::now-us)) (gap (- now last)))
                   (setf last now)
                   (when (> gap (aref sbmon-bench::**gaps** slot))
                     (setf (aref sbmon-bench::**gaps** slot) gap))))))
           (sb-thread:make-thread (lambda () (sbmon-bench::tick 0 nil)) :name \"bench idle ticker\")
           (sb-thread:make-thread (lambda () (sbmon-bench::tick 1 t)) :name \"bench alloc ticker\"))"
            .into(),
    ]
}

async fn eval(client: &AgentClient, code: &str) -> String {
    let request = EvalRequest {
        code: code.into(),
        package: None,
        timeout_s: 30.0,
        max_output: 4096,
    };
    match client.eval(&request).await.expect("eval") {
        EvalOutcome::Done(e) => e.values.join(" "),
        EvalOutcome::Failed(f) => panic!("eval failed: {}", f.message),
    }
}

/// Reset both threads' longest gaps.
async fn reset_gaps(client: &AgentClient) {
    eval(client, "(fill sbmon-bench::**gaps** 0)").await;
}

/// (idle, alloc) longest gaps in ms since the reset.
async fn gaps(client: &AgentClient) -> (f64, f64) {
    let text = eval(
        client,
        "(format nil \"~d ~d\" (aref sbmon-bench::**gaps** 0) (aref sbmon-bench::**gaps** 1))",
    )
    .await;
    let mut it = text
        .trim_matches('"')
        .split_whitespace()
        .map(|n| n.parse::<f64>().unwrap() / 1000.0);
    (it.next().unwrap(), it.next().unwrap())
}

struct Run {
    wall: f64,
    inner: f64,
    idle_gap: f64,
    alloc_gap: f64,
}

/// Record the median of the runs' figures as `WHAT.wall`, `WHAT.INNER`, `WHAT.gap_idle`,
/// `WHAT.gap_alloc`.
fn record_runs(what: &str, runs: &[Run], inner: Option<&str>) {
    let median = |f: &dyn Fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    if let Some(inner) = inner {
        support::record(BENCH, &format!("{what}.wall"), median(&|r| r.wall), "s");
        support::record(BENCH, &format!("{what}.{inner}"), median(&|r| r.inner), "s");
    }
    support::record(
        BENCH,
        &format!("{what}.gap_idle"),
        median(&|r| r.idle_gap),
        "ms",
    );
    support::record(
        BENCH,
        &format!("{what}.gap_alloc"),
        median(&|r| r.alloc_gap),
        "ms",
    );
}

fn print_runs(what: &str, runs: &[Run], inner: &str) {
    for (i, r) in runs.iter().enumerate() {
        println!(
            "  {what:<22} run {}: wall {:>7.1} ms  {inner} {:>7.1} ms  longest gap: idle thread {:>6.1} ms, allocating thread {:>6.1} ms",
            i + 1,
            r.wall * 1e3,
            r.inner * 1e3,
            r.idle_gap,
            r.alloc_gap
        );
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let sizes: Vec<u64> = std::env::var("SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| {
            if support::short() {
                vec![50]
            } else {
                vec![100, 500]
            }
        });
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if support::short() { 1 } else { 3 });
    for megabytes in sizes {
        let scratch = tempfile::tempdir().unwrap();
        let socket = scratch.path().join("bench.sock");
        let space = (megabytes * 4).max(1024);
        let mut sbcl = Sbcl::spawn(&LaunchOptions {
            runtime_args: vec!["--dynamic-space-size".into(), format!("{space}MB")],
            listen: Some(Address::Unix(socket.clone())),
            before_start: heap_forms(megabytes),
            allow: AgentAllow {
                control: false,
                eval: true,
            },
            ..LaunchOptions::default()
        })
        .expect("start sbcl");
        sbcl.wait_ready(Duration::from_secs(300), &ClientOptions::default())
            .await
            .expect("agent ready");
        let client = AgentClient::new(Address::Unix(socket.clone()), ClientOptions::default());
        let catalog = Catalog::single_target(
            Address::Unix(socket.clone()),
            ClientOptions::default(),
            Config::default(),
            Default::default(),
            Default::default(),
        );
        let memory = client.memory().await.unwrap();
        // Load the heap part and warm up.
        let warm = catalog
            .call("heap_histogram", json!({"top": 5}))
            .await
            .unwrap();
        println!(
            "\n{megabytes} MB of items: heap in use {:.0} MiB, {} objects walked, dynamic space {space} MB, pid {}",
            memory.heap_used as f64 / 1048576.0,
            warm["objects"],
            sbcl.pid
        );

        // The threads' longest gaps over as long as a walk takes, with nothing else running.
        let mut baseline = Vec::new();
        for _ in 0..runs {
            reset_gaps(&client).await;
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (idle_gap, alloc_gap) = gaps(&client).await;
            baseline.push(Run {
                wall: t0.elapsed().as_secs_f64(),
                inner: 0.0,
                idle_gap,
                alloc_gap,
            });
        }
        print_runs("no tool (2 s)", &baseline, "     ");
        record_runs(&format!("quiet.{megabytes}mb"), &baseline, None);
        support::record(
            BENCH,
            &format!("heap.{megabytes}mb.used"),
            memory.heap_used as f64,
            "bytes",
        );
        support::record(
            BENCH,
            &format!("heap.{megabytes}mb.objects"),
            warm["objects"].as_f64().unwrap_or(f64::NAN),
            "count",
        );

        let mut histogram = Vec::new();
        for _ in 0..runs {
            reset_gaps(&client).await;
            let t0 = Instant::now();
            let h: Value = catalog
                .call("heap_histogram", json!({"top": 30}))
                .await
                .unwrap();
            let wall = t0.elapsed().as_secs_f64();
            let (idle_gap, alloc_gap) = gaps(&client).await;
            assert_eq!(h["truncated"], false);
            histogram.push(Run {
                wall,
                inner: h["walk_seconds"].as_f64().unwrap(),
                idle_gap,
                alloc_gap,
            });
        }
        print_runs("heap_histogram", &histogram, "walk  ");
        record_runs(
            &format!("heap_histogram.{megabytes}mb"),
            &histogram,
            Some("walk"),
        );

        let mut retainers = Vec::new();
        for _ in 0..runs {
            reset_gaps(&client).await;
            let t0 = Instant::now();
            let r: Value = catalog
                .call(
                    "heap_retainers",
                    json!({"type": "SBMON-BENCH::BENCH-ITEM", "max_paths": 1}),
                )
                .await
                .unwrap();
            let wall = t0.elapsed().as_secs_f64();
            let (idle_gap, alloc_gap) = gaps(&client).await;
            assert_eq!(r["paths"][0]["global"], "SBMON-BENCH::*HEAP*", "{r}");
            retainers.push(Run {
                wall,
                inner: r["search_seconds"].as_f64().unwrap(),
                idle_gap,
                alloc_gap,
            });
        }
        print_runs("heap_retainers", &retainers, "search");
        record_runs(
            &format!("heap_retainers.{megabytes}mb"),
            &retainers,
            Some("search"),
        );
        drop(sbcl);
    }
}
