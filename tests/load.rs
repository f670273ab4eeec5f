//! Load on one `sbmon serve`: 64 concurrent clients making 200 calls each (1000 with
//! `SBMON_LOAD_CALLS=1000`), most over JSON-RPC at `/rpc` and one client in eight over MCP
//! (Streamable HTTP). Every call has an id
//! of its own and names one of eight targets (all the same image), and its reply must carry
//! that id and that target: no call is lost or answered with another's reply. sbmon's RSS
//! (VmRSS of its process) after the run equals its RSS before within 2 MB, after a warm-up
//! round. Throughput is printed, not asserted (speed is measured by `benches/`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Image, Sbmon, Setup};
use serde_json::{Value, json};

const CLIENTS: usize = 64;
/// Calls per client in CI. The issue asks for 1000; sbmon's debug build, which `cargo test`
/// runs, answers some 300 calls/s on a shared 2-core machine, so 64 x 1000 takes 3-4
/// minutes there: CI runs 64 x 200 and `SBMON_LOAD_CALLS=1000` runs the full figure (the
/// README gives both results).
const CALLS: usize = 200;
/// Calls per client before RSS is first read.
const WARM_UP: usize = 100;
const TARGETS: usize = 8;
/// One client in this many speaks MCP instead of JSON-RPC.
const MCP_EVERY: usize = 8;
const RSS_TOLERANCE: i64 = 2 * 1024 * 1024;

enum Client {
    Rpc(reqwest::Client),
    Mcp(reqwest::Client, String),
}

/// An MCP session over HTTP, initialized.
async fn mcp_session(base: &str) -> Client {
    let http = reqwest::Client::new();
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "load", "version": "1"}}});
    let response = http
        .post(format!("{base}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(init.to_string())
        .send()
        .await
        .unwrap();
    let session = response.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    response.text().await.unwrap();
    let status = http
        .post(format!("{base}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &session)
        .body(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 202);
    Client::Mcp(http, session)
}

/// One call of `memory_stats` for `target` with id `id`; what went wrong, if anything.
async fn call(client: &Client, base: &str, id: u64, target: &str) -> Result<(), String> {
    let (result, got_id) = match client {
        Client::Rpc(http) => {
            let body = json!({"jsonrpc": "2.0", "id": id, "method": "memory_stats",
                              "params": {"target": target}});
            let answer: Value = http
                .post(format!("{base}/rpc"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| format!("lost: {e}"))?
                .json()
                .await
                .map_err(|e| format!("lost: {e}"))?;
            (answer["result"].clone(), answer["id"].clone())
        }
        Client::Mcp(http, session) => {
            let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                              "params": {"name": "memory_stats", "arguments": {"target": target}}});
            let text = http
                .post(format!("{base}/mcp"))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-session-id", session)
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| format!("lost: {e}"))?
                .text()
                .await
                .map_err(|e| format!("lost: {e}"))?;
            // An SSE stream: the reply is the one `data:` line that holds JSON.
            let answer: Value = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .find_map(|d| serde_json::from_str(d).ok())
                .ok_or_else(|| format!("lost: no reply in {text:.200}"))?;
            (
                answer["result"]["structuredContent"].clone(),
                answer["id"].clone(),
            )
        }
    };
    if got_id != json!(id) {
        return Err(format!("mismatched: id {id} answered as {got_id}"));
    }
    if result["target"] != json!(target) {
        return Err(format!(
            "mismatched: call {id} for {target} got {result:.200}"
        ));
    }
    Ok(())
}

/// `CLIENTS` clients making `calls` calls each; every failure, and the time taken.
async fn round(
    clients: &Arc<Vec<Client>>,
    base: &str,
    calls: usize,
    seed: u64,
) -> (Vec<String>, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients.len())
        .map(|c| {
            let (clients, base) = (clients.clone(), base.to_string());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for n in 0..calls {
                    // Distinct across clients, calls and rounds.
                    let id = seed + (c * calls + n) as u64;
                    let target = format!("t{}", (c + n) % TARGETS);
                    if let Err(e) = call(&clients[c], &base, id, &target).await {
                        failures.push(e);
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.expect("a client panicked"));
    }
    (failures, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_lose_no_reply_and_sbmon_keeps_its_memory() {
    // SBMON_LOAD_CALLS re-measures with another count per client; CI runs CALLS.
    let calls: usize = std::env::var("SBMON_LOAD_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CALLS);
    let image = Image::start(Setup::default()).await;
    let address = image.sbcl.address.to_string();
    let targets: Vec<String> = (0..TARGETS).map(|i| format!("t{i}={address}")).collect();
    let mut args = Vec::new();
    for t in &targets {
        args.extend(["--target", t.as_str()]);
    }
    let sbmon = Sbmon::start("serve", &args, &[]);
    let base = sbmon.base.clone();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        clients.push(if c % MCP_EVERY == 0 {
            mcp_session(&base).await
        } else {
            Client::Rpc(reqwest::Client::new())
        });
    }
    let clients = Arc::new(clients);

    // Warm-up: connections, sessions, the allocator's arenas and every buffer at its size.
    let (failures, took) = round(&clients, &base, WARM_UP, 1 << 40).await;
    assert!(
        failures.is_empty(),
        "warm-up: {:?}",
        &failures[..failures.len().min(5)]
    );
    println!("warm-up: {} calls in {took:.1?}", CLIENTS * WARM_UP);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = common::proc_status_bytes(sbmon.pid(), "VmRSS") as i64;

    let cpu = |pid: i32| common::proc_cpu_seconds(&format!("/proc/{pid}/stat"));
    let cpu_before = (
        cpu(sbmon.pid()),
        cpu(image.pid()),
        cpu(std::process::id() as i32),
    );
    let (failures, took) = round(&clients, &base, calls, 0).await;
    let cpu_after = (
        cpu(sbmon.pid()),
        cpu(image.pid()),
        cpu(std::process::id() as i32),
    );
    println!(
        "CPU seconds: sbmon {:.1}, the image {:.1}, this test's clients {:.1}",
        cpu_after.0 - cpu_before.0,
        cpu_after.1 - cpu_before.1,
        cpu_after.2 - cpu_before.2
    );
    let total = CLIENTS * calls;
    let lost = failures.iter().filter(|f| f.starts_with("lost")).count();
    let mismatched = failures
        .iter()
        .filter(|f| f.starts_with("mismatched"))
        .count();
    println!(
        "{total} calls ({} over MCP) from {CLIENTS} clients in {took:.1?}: {:.0} calls/s, {lost} lost, {mismatched} mismatched",
        total / MCP_EVERY,
        total as f64 / took.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} calls failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = common::proc_status_bytes(sbmon.pid(), "VmRSS") as i64;
    println!(
        "sbmon RSS before {:.2} MiB, after {:.2} MiB ({:+.2} MiB)",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        (after - before) as f64 / 1048576.0
    );
    assert!(
        (after - before).abs() <= RSS_TOLERANCE,
        "sbmon's RSS went from {before} to {after} bytes"
    );
    // sbmon counted every call it answered (its own figure against the test's count).
    let (_, system) = sbmon.get("/monitoring/system").await;
    let system: Value = serde_json::from_str(&system).unwrap();
    let counted = system["totals"]["count"].as_u64().unwrap();
    assert_eq!(counted as usize, total + CLIENTS * WARM_UP, "{system}");
}
