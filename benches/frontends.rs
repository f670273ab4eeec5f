//! The front ends against a real SBCL and a real `sbmon serve` process: `memory_stats`
//! through JSON-RPC over HTTP (`/rpc`), MCP `tools/call` over stdio and over Streamable HTTP
//! (`/mcp`), and a Prometheus scrape of one target (`/metrics?target=`). Each path is timed
//! one call at a time (latency) and with 8 calls in flight (throughput), against the same tool
//! called in process (no front end) as the reference.
//!
//! Figures for `tools/bench`: `in_process`, `rpc`, `mcp_stdio`, `mcp_http`, `scrape_target`
//! (`.p50`, `.p99`, `.rate`, `.in_flight8_rate`), and the checked ratios `rpc.over_in_process`,
//! `mcp_stdio.over_in_process`, `mcp_http.over_in_process` (p50 over p50): what each front
//! end adds, whatever the machine's speed.
//!
//! Run: `cargo bench --bench frontends` (ITERATIONS=N to change the sample size).

use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use sbmon::agent::{Address, ClientOptions};
use sbmon::config::Config;
use sbmon::launch::LaunchOptions;
use serde_json::json;
use support::{Latencies, Sbmon};

const BENCH: &str = "frontends";
const IN_FLIGHT: usize = 8;

/// Print and record one path's figures; its sequential p50.
fn report(
    name: &str,
    metric: &str,
    sequential: Latencies,
    concurrent: Duration,
    calls: usize,
) -> f64 {
    let rate = calls as f64 / concurrent.as_secs_f64();
    println!(
        "{name:<24} p50={:>7.1}µs p99={:>7.1}µs  sequential {:>6.0} calls/s  {IN_FLIGHT} in flight {:>6.0} calls/s",
        sequential.micros(0.50),
        sequential.micros(0.99),
        sequential.rate(),
        rate,
    );
    support::record_latencies(BENCH, metric, &sequential);
    support::record(BENCH, &format!("{metric}.in_flight8_rate"), rate, "per_s");
    sequential.micros(0.50)
}

/// Sequential latencies of `f`, then the time taken by the same number of calls made
/// `IN_FLIGHT` at a time, and how many that was.
async fn time_calls<F, Fut>(iterations: usize, f: F) -> (Latencies, Duration, usize)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let sequential = support::sequential(iterations, &f).await;
    let start = Instant::now();
    let rounds = iterations / IN_FLIGHT;
    for _ in 0..rounds {
        futures::future::join_all((0..IN_FLIGHT).map(|_| f())).await;
    }
    (sequential, start.elapsed(), rounds * IN_FLIGHT)
}

/// `memory_stats` through an MCP client (whatever its transport), timed as the other paths
/// are; the client is closed after. Returns the p50 that `report` gives.
async fn time_mcp(
    client: rmcp::service::RunningService<rmcp::RoleClient, ()>,
    iterations: usize,
    label: &str,
    metric: &str,
) -> f64 {
    let client = Arc::new(client);
    let (samples, concurrent, calls) = time_calls(iterations, || {
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
    let p50 = report(label, metric, samples, concurrent, calls);
    if let Ok(client) = Arc::try_unwrap(client) {
        let _ = client.cancel().await;
    }
    p50
}

#[tokio::main]
async fn main() {
    let iterations = support::iterations(3000);
    let scratch = tempfile::tempdir().unwrap();
    let socket = scratch.path().join("bench.sock");
    let mut sbcl =
        support::start_image(&socket, LaunchOptions::default(), Duration::from_secs(60)).await;
    let target = format!("app=unix:{}", socket.display());
    println!("memory_stats through the front ends, {iterations} calls per path");

    // The reference: the same tool called in this process, no front end.
    let catalog = sbmon::tools::Catalog::single_target(
        Address::Unix(socket.clone()),
        ClientOptions::default(),
        Config::default(),
        Default::default(),
        Default::default(),
    );
    let (samples, concurrent, calls) = time_calls(iterations, || async {
        let v = catalog
            .call("memory_stats", serde_json::Value::Null)
            .await
            .unwrap();
        assert!(v["heap_used_bytes"].is_u64(), "{v}");
    })
    .await;
    let in_process = report(
        "in process memory_stats",
        "in_process",
        samples,
        concurrent,
        calls,
    );

    // JSON-RPC over HTTP, one keep-alive client.
    let server = Sbmon::serve(&["--target".into(), target.clone()]);
    let url = format!("{}/rpc", server.base);
    let http = reqwest::Client::new();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "memory_stats"}).to_string();
    let (samples, concurrent, calls) = time_calls(iterations, || async {
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
    let rpc = report("/rpc memory_stats", "rpc", samples, concurrent, calls);

    // A Prometheus scrape of the one target, as `/sd` points scrapers at it.
    let scrape = format!("{}/metrics?target=app", server.base);
    let (samples, concurrent, calls) = time_calls(iterations / 3, || async {
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
    report(
        "/metrics?target=app",
        "scrape_target",
        samples,
        concurrent,
        calls,
    );

    // MCP over Streamable HTTP with the rmcp client, against the same server.
    let mcp_url = format!("{}/mcp", server.base);
    let client =
        ().serve(StreamableHttpClientTransport::from_uri(mcp_url.as_str()))
            .await
            .expect("MCP initialize over HTTP");
    let mcp_http = time_mcp(client, iterations, "MCP HTTP tools/call", "mcp_http").await;
    drop(server);

    // MCP over stdio with the rmcp client, through a child `sbmon serve --stdio`.
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sbmon"));
    cmd.args(["serve", "--stdio", "--target", &target]);
    let client =
        ().serve(TokioChildProcess::new(cmd).expect("spawn sbmon serve --stdio"))
            .await
            .expect("MCP initialize");
    let mcp_stdio = time_mcp(client, iterations, "MCP stdio tools/call", "mcp_stdio").await;

    for (metric, p50) in [
        ("rpc", rpc),
        ("mcp_stdio", mcp_stdio),
        ("mcp_http", mcp_http),
    ] {
        let r = support::record_ratio(BENCH, &format!("{metric}.over_in_process"), p50, in_process);
        println!("{metric}: {r:.2}x the in-process call (p50)");
    }
    sbcl.stop();
}
