//! `sbmon serve --http` and `sbmon launch` as separate processes: JSON-RPC at /rpc (single,
//! batch, every error code, a target that is down), the landing page, limits, target
//! discovery in the runtime directory, and launch's ownership of its SBCL.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Image, Listen, Sbmon, Setup, process_exists};
use serde_json::{Value, json};

fn call(id: Value, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

#[tokio::test]
async fn rpc_calls_batches_and_errors() {
    let image = Image::start(Setup {
        runtime_args: vec!["--dynamic-space-size".into(), "200MB".into()],
        forms: vec![common::sleeper("alpha")],
        ..Setup::default()
    })
    .await;
    let sbmon = Sbmon::serve(&image, &["gone=unix:/nonexistent/x.sock"]);

    let one = sbmon
        .rpc(call(json!(7), "memory_stats", json!({"target": "app"})))
        .await;
    assert_eq!(one["id"], 7);
    assert_eq!(one["result"]["heap_limit_bytes"], 200 * 1024 * 1024);
    assert_eq!(one["result"]["pid"], image.pid());

    // A batch: answers matched by id; the notification (no id) runs but is not answered.
    let batch = sbmon
        .rpc(json!([
            call(json!(1), "thread_list", json!({"target": "app"})),
            call(json!("b"), "thread_inspect", json!({"target": "app", "thread_id": "alpha"})),
            {"jsonrpc": "2.0", "method": "runtime_stats", "params": {"target": "app"}},
        ]))
        .await;
    let answers = batch.as_array().expect("a batch answer");
    assert_eq!(answers.len(), 2);
    let by_id = |id: Value| answers.iter().find(|a| a["id"] == id).unwrap();
    assert!(
        by_id(json!(1))["result"]["threads"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "alpha")
    );
    assert_eq!(by_id(json!("b"))["result"]["name"], "alpha");

    let code = |v: &Value| v["error"]["code"].as_i64();
    let unknown = sbmon.rpc(call(json!(2), "no_such_tool", json!({}))).await;
    assert_eq!(code(&unknown), Some(-32601));
    let (status, bad_json) = sbmon.post("/rpc", "{\"jsonrpc\": ".into()).await;
    assert_eq!((status, code(&bad_json)), (200, Some(-32700)));
    let wrong = sbmon
        .rpc(call(
            json!(3),
            "thread_inspect",
            json!({"target": "app", "thread_id": 1.5}),
        ))
        .await;
    assert_eq!(code(&wrong), Some(-32602));
    let positional = sbmon.rpc(call(json!(4), "memory_stats", json!([1]))).await;
    assert_eq!(code(&positional), Some(-32602));
    let not_rpc = sbmon.rpc(json!({"id": 5, "method": "memory_stats"})).await;
    assert_eq!(code(&not_rpc), Some(-32600));
    let (_, empty) = sbmon.post("/rpc", "[]".into()).await;
    assert_eq!(code(&empty), Some(-32600));
    let ambiguous = sbmon.rpc(call(json!(6), "memory_stats", json!({}))).await;
    assert!(
        ambiguous["error"]["message"]
            .as_str()
            .unwrap()
            .contains("app, gone")
    );

    // A target that is down: a clear error, and the other target is still served.
    let down = sbmon
        .rpc(call(json!(8), "memory_stats", json!({"target": "gone"})))
        .await;
    assert_eq!(code(&down), Some(-32000));
    assert!(
        down["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot connect")
    );
    let again = sbmon
        .rpc(call(json!(9), "gc_stats", json!({"target": "app"})))
        .await;
    assert!(again["result"]["gc_count"].as_u64().is_some(), "{again}");

    // Oversized bodies are refused before they are read whole.
    let (status, _) = sbmon.post("/rpc", " ".repeat(2 << 20)).await;
    assert_eq!(status, 413);

    let page = reqwest::get(format!("{}/", sbmon.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in ["/mcp", "/rpc", "/metrics", "console.js"] {
        assert!(page.contains(needle), "landing page lacks {needle}");
    }
    // The page holds no data itself (tests/console.rs drives it in a browser); what it lists
    // comes from the console's overview.
    let (status, overview) = sbmon.get("/console/api/overview").await;
    assert_eq!(status, 200, "{overview}");
    for needle in ["\"app\"", "\"gone\"", "thread_dump_all"] {
        assert!(
            overview.contains(needle),
            "overview lacks {needle}: {overview}"
        );
    }
}

#[test]
fn serve_refuses_non_loopback_binds() {
    let out = Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args(["serve", "--http", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[tokio::test]
async fn serve_follows_agents_in_the_runtime_dir() {
    let runtime = tempfile::tempdir().unwrap();
    let dir = runtime.path().to_str().unwrap().to_string();
    let sbmon = Sbmon::start("serve", &[], &[("XDG_RUNTIME_DIR", &dir)]);
    let mut image = Image::start(Setup {
        listen: Listen::AgentDefault,
        env: vec![("XDG_RUNTIME_DIR".into(), dir.clone())],
        ..Setup::default()
    })
    .await;
    let name = format!("pid-{}", image.pid());
    let ask = || sbmon.rpc(call(json!(1), "runtime_stats", json!({"target": name})));
    let deadline = Instant::now() + Duration::from_secs(20);
    let found = loop {
        let answer = ask().await;
        if answer["result"]["pid"] == image.pid() {
            break answer;
        }
        assert!(Instant::now() < deadline, "never discovered: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(found["result"]["target"], name);

    image.sbcl.stop();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = ask().await;
        if answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown target"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "never forgotten: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn launch_owns_its_sbcl() {
    let sbmon = Sbmon::start("launch", &["--", "--dynamic-space-size", "300MB"], &[]);
    let memory = sbmon.rpc(call(json!(1), "memory_stats", json!({}))).await;
    assert_eq!(
        memory["result"]["heap_limit_bytes"],
        300 * 1024 * 1024,
        "{memory}"
    );
    let sbcl = memory["result"]["pid"].as_i64().unwrap() as i32;
    assert!(process_exists(sbcl));

    // SIGTERM to sbmon: it stops its SBCL before exiting.
    // SAFETY: signalling the sbmon this test started.
    unsafe { libc::kill(sbmon.pid(), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while process_exists(sbcl) {
        assert!(Instant::now() < deadline, "SBCL {sbcl} outlived sbmon");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn launched_sbcl_dies_with_a_killed_sbmon() {
    let mut sbmon = Sbmon::start("launch", &[], &[]);
    let runtime = sbmon.rpc(call(json!(1), "runtime_stats", json!({}))).await;
    let sbcl = runtime["result"]["pid"].as_i64().expect("a pid") as i32;
    // SIGKILL leaves sbmon no chance to clean up: the kernel must stop its SBCL.
    sbmon.child.kill().unwrap();
    sbmon.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while process_exists(sbcl) {
        assert!(
            Instant::now() < deadline,
            "SBCL {sbcl} outlived a killed sbmon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn events_stream_collections_as_server_sent_events() {
    let image = Image::start(Setup {
        collector: true,
        ..Setup::default()
    })
    .await;
    let sbmon = Sbmon::serve(&image, &[]);
    assert_eq!(sbmon.get("/events?target=nope").await.0, 404);

    let mut stream = reqwest::get(format!("{}/events?target=app", sbmon.base))
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(
        stream.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    // Server-sent events as (event, data), read until `found` picks one or 20 s pass; `poke`
    // runs between reads (to make garbage).
    let mut pending = String::new();
    let mut next_until = async |found: &dyn Fn(&str, &Value) -> bool, poke: &dyn Fn()| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            while let Some(end) = pending.find("\n\n") {
                let block: String = pending.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::to_string)
                };
                if let (Some(event), Some(data)) = (field("event: "), field("data: ")) {
                    let data: Value = serde_json::from_str(&data).unwrap();
                    if found(&event, &data) {
                        return data;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no such event; got {pending}");
            poke();
            if let Ok(Ok(Some(chunk))) =
                tokio::time::timeout(Duration::from_millis(300), stream.chunk()).await
            {
                pending.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
    };
    let nothing = || {};
    let connected = next_until(&|e, _| e == "status", &nothing).await;
    assert_eq!(connected, json!({"target": "app", "connected": true}));

    // The full collection the test's collector makes arrives as an event.
    let trigger = image.dir.path().join("collect");
    let collect = || {
        if !trigger.exists() {
            std::fs::write(&trigger, "").unwrap();
        }
    };
    let full = next_until(
        &|e, d| e == "gc" && d["generation"].as_u64().unwrap() >= 5,
        &collect,
    )
    .await;
    assert_eq!(full["target"], "app");
    assert!(full["wall_seconds"].as_f64().unwrap() > 0.0);
    // Most of the test's garbage goes in the nursery collections before the full one; check
    // only that the full one shrank the heap.
    assert!(full["freed_bytes"].as_i64().unwrap() > 0, "{full}");

    // The image dies: the stream says so instead of going quiet.
    // SAFETY: signalling the SBCL this test started.
    unsafe { libc::kill(image.pid(), libc::SIGKILL) };
    let lost = next_until(&|e, _| e == "status", &nothing).await;
    assert_eq!(lost, json!({"target": "app", "connected": false}));

    // Streams are bounded: with all permits taken, one more is refused.
    let mut open = Vec::new();
    for _ in 1..sbmon::http::MAX_EVENT_STREAMS {
        open.push(
            reqwest::get(format!("{}/events", sbmon.base))
                .await
                .unwrap(),
        );
    }
    assert!(open.iter().all(|r| r.status() == 200));
    assert_eq!(sbmon.get("/events").await.0, 503);
}
