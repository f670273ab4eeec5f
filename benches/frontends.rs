//! The front ends against a real SBCL and a real `sbmon serve` process: `memory_stats` through
//! JSON-RPC over HTTP (`/rpc`) and MCP `tools/call` over stdio, and a Prometheus scrape of
//! one target (`/metrics?target=`). Each path is timed one call at a time (latency) and with
//! 8 calls in flight (throughput).
//!
//! Run: `cargo bench --bench frontends` (ITERATIONS=N to change the sample size).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;
use sbmon::agent::{Address, ClientOptions};
use sbmon::launch::{LaunchOptions, Sbcl};
use serde_json::json;
use support::Latencies;

const IN_FLIGHT: usize = 8;

/// The `sbmon serve` under test, stopped when dropped, also when the bench panics.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn report(name: &str, sequential: Latencies, concurrent: Duration, concurrent_calls: usize) {
    println!(
        "{name:<22} p50={:>7.1}µs p99={:>7.1}µs  sequential {:>6.0} calls/s  {IN_FLIGHT} in flight {:>6.0} calls/s",
        sequential.micros(0.50),
        sequential.micros(0.99),
        sequential.rate(),
        concurrent_calls as f64 / concurrent.as_secs_f64(),
    );
}

/// Sequential latencies of `f`, then the time taken by the same number of calls made
/// `IN_FLIGHT` at a time.
async fn time_calls<F, Fut>(iterations: usize, f: F) -> (Latencies, Duration)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let sequential = support::sequential(iterations, &f).await;
    let start = Instant::now();
    for _ in 0..iterations / IN_FLIGHT {
        futures::future::join_all((0..IN_FLIGHT).map(|_| f())).await;
    }
    (sequential, start.elapsed())
}

#[tokio::main]
async fn main() {
    let iterations = support::iterations(3000);
    let scratch = tempfile::tempdir().unwrap();
    let socket = scratch.path().join("bench.sock");
    let mut sbcl = Sbcl::spawn(&LaunchOptions {
        listen: Some(Address::Unix(socket.clone())),
        ..LaunchOptions::default()
    })
    .expect("start sbcl");
    sbcl.wait_ready(Duration::from_secs(60), &ClientOptions::default())
        .await
        .expect("agent ready");
    let target = format!("app=unix:{}", socket.display());
    println!("memory_stats through the front ends, {iterations} calls per path");

    // JSON-RPC over HTTP, one keep-alive client.
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_sbmon"))
            .args(["serve", "--http", "127.0.0.1:0", "--target", &target])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sbmon serve"),
    );
    let stderr = server.0.stderr.take().unwrap();
    let url = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.find("http://")
                .map(|at| l[at..].split_whitespace().next().unwrap_or("").to_string())
        })
        .expect("sbmon reports its address")
        + "/rpc";
    let http = reqwest::Client::new();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "memory_stats"}).to_string();
    let (samples, concurrent) = time_calls(iterations, || async {
        let answer: serde_json::Value = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(answer["result"]["heap_used_bytes"].is_u64(), "{answer}");
    })
    .await;
    report(
        "/rpc memory_stats",
        samples,
        concurrent,
        iterations / IN_FLIGHT * IN_FLIGHT,
    );

    // A Prometheus scrape of the one target, as `/sd` points scrapers at it.
    let scrape = url.replace("/rpc", "/metrics?target=app");
    let (samples, concurrent) = time_calls(iterations / 3, || async {
        let text = http
            .get(&scrape)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("sbcl_heap_used_bytes"));
    })
    .await;
    let scrapes = iterations / 3 / IN_FLIGHT * IN_FLIGHT;
    report("/metrics?target=app", samples, concurrent, scrapes);
    drop(server);

    // MCP over stdio with the rmcp client, through a child `sbmon serve --stdio`.
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sbmon"));
    cmd.args(["serve", "--stdio", "--target", &target]);
    let client = Arc::new(
        ().serve(TokioChildProcess::new(cmd).expect("spawn sbmon serve --stdio"))
            .await
            .expect("MCP initialize"),
    );
    let (samples, concurrent) = time_calls(iterations, || {
        let client = client.clone();
        async move {
            let result = client
                .call_tool(CallToolRequestParams::new("memory_stats"))
                .await
                .unwrap();
            assert!(result.structured_content.is_some());
        }
    })
    .await;
    report(
        "MCP stdio tools/call",
        samples,
        concurrent,
        iterations / IN_FLIGHT * IN_FLIGHT,
    );
    if let Ok(client) = Arc::try_unwrap(client) {
        let _ = client.cancel().await;
    }
    sbcl.stop();
}
