//! `thread_list` and `thread_dump_all` of an image with 1000 threads, against the same tools
//! on an image with only its own few threads: what a big image's thread view costs, and how
//! it grows with the threads (the agent walks every thread; a dump interrupts each one to take
//! its backtrace). Called as a client would, through JSON-RPC (`/rpc`) of a real `sbmon serve`
//! whose sampler (every second) supplies the per-thread CPU interval, as it does in service;
//! without a sampler, `thread_list` would measure its own 0.5 s interval.
//!
//! Figures for `tools/bench`: `thread_list.few`, `thread_list.t1000`, `thread_dump_all.few`,
//! `thread_dump_all.t1000` (`.p50`, `.p99` µs, `.rate`), the threads counted, and the checked
//! ratios `thread_list.t1000_over_few`, `thread_dump_all.t1000_over_few` (p50 over p50).
//!
//! Run: `cargo bench --bench threads` (ITERATIONS=N to change the sample size).

use std::time::Duration;

mod support;

use sbmon::launch::LaunchOptions;
use serde_json::{Value, json};
use support::{Latencies, Sbmon};

const BENCH: &str = "threads";
const THREADS: usize = 1000;

/// Threads that sleep until the image stops, so that the image has `n` of them.
fn sleepers(n: usize) -> String {
    format!(
        "(dotimes (i {n}) (sb-thread:make-thread (lambda () (loop (sleep 60))) \
         :name (format nil \"bench sleeper ~d\" i)))"
    )
}

/// Time `tool` through `/rpc` `iterations` times; the last answer is checked by `check`.
async fn time_tool(
    http: &reqwest::Client,
    url: &str,
    tool: &str,
    args: Value,
    iterations: usize,
    check: impl Fn(&Value),
) -> Latencies {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": tool, "params": args}).to_string();
    let last = std::cell::RefCell::new(Value::Null);
    let l = support::sequential(iterations, || async {
        let answer: Value = http
            .post(url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        *last.borrow_mut() = answer;
    })
    .await;
    let answer = last.borrow();
    check(
        answer
            .get("result")
            .unwrap_or_else(|| panic!("{tool} failed: {answer}")),
    );
    l
}

fn print(what: &str, l: &Latencies) {
    println!(
        "{what:<28} n={:<4} p50={:>9.1} ms p99={:>9.1} ms",
        l.len(),
        l.micros(0.5) / 1e3,
        l.micros(0.99) / 1e3
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let iterations = support::iterations(100);
    let mut p50s = Vec::new();
    for (label, extra) in [("few", 0), ("t1000", THREADS)] {
        let scratch = tempfile::tempdir().unwrap();
        let socket = scratch.path().join("bench.sock");
        let options = LaunchOptions {
            before_start: if extra > 0 {
                vec![sleepers(extra)]
            } else {
                vec![]
            },
            ..LaunchOptions::default()
        };
        let mut sbcl = support::start_image(&socket, options, Duration::from_secs(120)).await;
        let sbmon = Sbmon::serve(&[
            "--target".into(),
            format!("app=unix:{}", socket.display()),
            "--sample-interval".into(),
            "1".into(),
        ]);
        // Two sampler readings, so thread_list takes its CPU interval from them.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (http, url) = (reqwest::Client::new(), format!("{}/rpc", sbmon.base));
        let tasks = sbmon::process::sample(sbcl.pid).unwrap().threads;
        let list = time_tool(&http, &url, "thread_list", json!({}), iterations, |v| {
            assert_eq!(
                v["cpu_interval"]["source"], "sampler",
                "{}",
                v["cpu_interval"]
            );
            let count = v["count"].as_u64().unwrap();
            assert!(
                count as usize >= extra,
                "{count} Lisp threads, {extra} made"
            );
            assert!(
                count <= tasks,
                "{count} Lisp threads, /proc says {tasks} tasks"
            );
        })
        .await;
        // A dump takes each thread's backtrace in turn: fewer of them, and time for all.
        let dump_iterations = if extra > 0 {
            (iterations / 4).max(5)
        } else {
            iterations
        };
        let dump = time_tool(
            &http,
            &url,
            "thread_dump_all",
            json!({"timeout_ms": 30000}),
            dump_iterations,
            |v| {
                assert_eq!(v["unanswered"], 0, "every thread answers");
                let dumped = v["threads"].as_array().unwrap().len();
                assert!(dumped >= extra, "{dumped} threads dumped, {extra} made");
            },
        )
        .await;
        println!(
            "image with {tasks} tasks (pid {}, {} Lisp threads made by the bench):",
            sbcl.pid, extra
        );
        print(&format!("thread_list ({label})"), &list);
        print(&format!("thread_dump_all ({label})"), &dump);
        support::record_latencies(BENCH, &format!("thread_list.{label}"), &list);
        support::record_latencies(BENCH, &format!("thread_dump_all.{label}"), &dump);
        support::record(BENCH, &format!("tasks.{label}"), tasks as f64, "count");
        p50s.push((list.micros(0.5), dump.micros(0.5)));
        drop(sbmon);
        sbcl.stop();
    }
    let (few, big) = (p50s[0], p50s[1]);
    let list = support::record_ratio(BENCH, "thread_list.t1000_over_few", big.0, few.0);
    let dump = support::record_ratio(BENCH, "thread_dump_all.t1000_over_few", big.1, few.1);
    println!("1000 threads against few: thread_list {list:.1}x, thread_dump_all {dump:.1}x (p50)");
}
