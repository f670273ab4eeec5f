//! MCP end to end with the rmcp client against a real SBCL: over stdio (the real `sbmon serve
//! --stdio` binary) and over Streamable HTTP (`mcp::http_service` mounted at /mcp on a
//! listener of the test's own). Both run the same checks: the handshake, tools/list, a call of
//! every read tool checked against /proc or what the test arranged in the image, tool errors
//! and protocol errors, prompts, resources, and 32 concurrent calls on one session.
//!
//! Every SBCL is stopped by the harness; every sbmon child is killed on drop
//! (`kill_on_drop`), so a failing assertion leaves no process behind.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{Image, READ_TOOLS, Setup, held_mutex, proc_status_bytes, proc_tids, sleeper};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ErrorCode, GetPromptRequestParams, JsonObject,
    ReadResourceRequestParams, ResourceContents,
};
use rmcp::service::{RunningService, ServiceError};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use sbmon::agent::{Address, ClientOptions};
use sbmon::config::Config;
use sbmon::targets::{Target, Targets};
use sbmon::tools::Catalog;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

type Client = RunningService<RoleClient, ()>;

const HEAP_MB: u64 = 448;
const WORKERS: usize = 8;
const PROMPTS: [&str; 5] = [
    "basic_health_check",
    "memory_investigation",
    "gc_pressure",
    "thread_health",
    "incident_response",
];

fn worker(i: usize) -> String {
    format!("mcp-worker-{i}")
}

/// An image with named worker threads, a held mutex with a waiter, a chosen heap size and the
/// collector thread.
async fn start_image() -> Image {
    let mut forms: Vec<String> = (0..WORKERS).map(|i| sleeper(&worker(i))).collect();
    forms.push(held_mutex("mcp-lock", "mcp-holder", "mcp-waiter"));
    Image::start(Setup {
        runtime_args: vec!["--dynamic-space-size".into(), format!("{HEAP_MB}MB")],
        forms,
        collector: true,
        ..Setup::default()
    })
    .await
}

/// Where no agent listens: the target called "down".
fn down_address(image: &Image) -> Address {
    Address::Unix(image.dir.path().join("nobody-listens.sock"))
}

/// `sbmon serve --stdio` watching the image as "test" and a dead socket as "down".
async fn stdio_client(image: &Image) -> Client {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sbmon"));
    cmd.args(["serve", "--stdio", "--target"])
        .arg(format!("test={}", image.sbcl.address))
        .arg("--target")
        .arg(format!("down={}", down_address(image)))
        .kill_on_drop(true);
    let transport = TokioChildProcess::new(cmd).expect("spawn sbmon serve --stdio");
    ().serve(transport)
        .await
        .expect("MCP initialize over stdio")
}

/// The HTTP endpoint on a listener of the test's own, mounted at /mcp as http.rs does. The
/// server stops when the returned guard drops.
async fn http_server(image: &Image) -> (String, tokio_util::sync::CancellationToken) {
    let targets = Targets::new(vec![
        Target::new("test", image.sbcl.address.clone(), ClientOptions::default()),
        Target::new("down", down_address(image), ClientOptions::default()),
    ]);
    let catalog = Arc::new(Catalog::new(Arc::new(targets), Arc::new(Config::default())));
    let router = axum::Router::new().nest_service("/mcp", sbmon::mcp::http_service(catalog));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let stop = tokio_util::sync::CancellationToken::new();
    let shutdown = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    (format!("http://{addr}/mcp"), stop)
}

fn args(v: Value) -> JsonObject {
    v.as_object().cloned().expect("arguments are an object")
}

/// Call `tool` on target "test" unless `arguments` names another.
async fn call(client: &Client, tool: &'static str, arguments: Value) -> CallToolResult {
    let mut arguments = args(arguments);
    arguments.entry("target").or_insert_with(|| json!("test"));
    client
        .call_tool(CallToolRequestParams::new(tool).with_arguments(arguments))
        .await
        .unwrap_or_else(|e| panic!("tools/call {tool}: {e}"))
}

fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The structured result of a successful call.
fn ok(tool: &str, result: CallToolResult) -> (Value, String) {
    let summary = text(&result);
    assert_eq!(result.is_error, Some(false), "{tool} failed: {summary}");
    let value = result
        .structured_content
        .unwrap_or_else(|| panic!("{tool}: no structuredContent"));
    assert!(!summary.is_empty(), "{tool}: no text summary");
    (value, summary)
}

/// A tool error (isError) and its message.
fn tool_error(what: &str, result: CallToolResult) -> String {
    assert_eq!(
        result.is_error,
        Some(true),
        "{what} should fail: {result:?}"
    );
    text(&result)
}

fn threads_named<'a>(list: &'a Value, name: &str) -> Vec<&'a Value> {
    list["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .filter(|t| t["name"] == name)
        .collect()
}

fn mcp_error_code(result: Result<impl std::fmt::Debug, ServiceError>) -> ErrorCode {
    match result {
        Err(ServiceError::McpError(e)) => e.code,
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    }
}

/// Everything both transports must do.
async fn exercise(client: &Client, image: &Image) {
    handshake(client);
    list_tools(client).await;
    read_tools(client, image).await;
    errors(client).await;
    prompts(client).await;
    resources(client, image).await;
    concurrent_calls(client, image).await;
}

fn handshake(client: &Client) {
    let info = client.peer_info().expect("server info");
    let server = info.server_info.as_ref().expect("server identity");
    assert_eq!(server.name, "sbmon");
    assert_eq!(server.version, env!("CARGO_PKG_VERSION"));
    let instructions = info.instructions.as_deref().expect("instructions");
    assert!(instructions.contains("health_check"), "{instructions}");
    assert!(info.capabilities.tools.is_some());
    assert!(info.capabilities.prompts.is_some());
    let resources = info.capabilities.resources.as_ref().expect("resources");
    assert_eq!(
        resources.subscribe,
        Some(true),
        "sbmon://events is subscribable"
    );
}

async fn list_tools(client: &Client) {
    let tools = client.list_all_tools().await.expect("tools/list");
    let names: BTreeSet<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    // Exactly the read tools: no control or eval tool without --allow.
    assert_eq!(names, READ_TOOLS.into_iter().collect());
    for tool in &tools {
        let name = tool.name.as_ref();
        assert!(
            tool.description.as_deref().is_some_and(|d| d.len() > 20),
            "{name}"
        );
        let input = &tool.input_schema;
        assert_eq!(input.get("type"), Some(&json!("object")), "{name}");
        let props = input
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("{name}: no properties"));
        // Every tool about an image takes `target`; operation_stats is about sbmon itself.
        assert_eq!(
            props.contains_key("target"),
            name != "operation_stats",
            "{name}"
        );
        for (arg, schema) in props {
            assert!(
                schema.get("description").and_then(Value::as_str).is_some(),
                "{name}.{arg} has no description"
            );
        }
        let output = tool.output_schema.as_ref().expect("output schema");
        assert_eq!(output.get("type"), Some(&json!("object")), "{name}");
        assert!(output.get("properties").is_some(), "{name}");
        let a = tool.annotations.as_ref().expect("annotations");
        assert_eq!(a.title.as_deref(), tool.title.as_deref(), "{name}");
        assert!(a.title.is_some(), "{name}");
        assert_eq!(a.read_only_hint, Some(true), "{name}");
        assert_eq!(a.destructive_hint, Some(false), "{name}");
        assert_eq!(a.idempotent_hint, Some(true), "{name}");
        assert_eq!(a.open_world_hint, Some(false), "{name}");
    }
    let inspect = tools
        .iter()
        .find(|t| t.name == "thread_inspect")
        .expect("thread_inspect");
    assert_eq!(
        inspect.input_schema.get("required"),
        Some(&json!(["thread_id"]))
    );
}

async fn read_tools(client: &Client, image: &Image) {
    let pid = image.pid();

    let (health, summary) = ok(
        "health_check",
        call(client, "health_check", json!({})).await,
    );
    assert_eq!(health["target"], "test");
    assert!(
        ["healthy", "degraded", "critical"].contains(&health["status"].as_str().unwrap_or("")),
        "{health}"
    );
    let checks: Vec<&str> = health["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for check in [
        "availability.agent",
        "memory.heap",
        "memory.rss",
        "threads.count",
    ] {
        assert!(checks.contains(&check), "{check} missing: {checks:?}");
    }
    assert!(summary.starts_with("target test: "), "{summary}");

    let (m, summary) = ok(
        "memory_stats",
        call(client, "memory_stats", json!({})).await,
    );
    assert_eq!(m["pid"], pid);
    assert_eq!(m["heap_limit_bytes"], HEAP_MB * 1024 * 1024);
    let rss = m["rss_bytes"].as_u64().expect("rss") as f64;
    let proc_rss = proc_status_bytes(pid, "VmRSS") as f64;
    assert!(
        (rss - proc_rss).abs() / proc_rss < 0.05,
        "rss {rss} vs /proc {proc_rss}"
    );
    assert_eq!(m["generations"].as_array().map(Vec::len), Some(7));
    assert!(
        summary.contains(&format!(" of {HEAP_MB} MiB (")),
        "{summary}"
    );

    let (before, _) = ok("gc_stats", call(client, "gc_stats", json!({})).await);
    image.collect().await;
    let (after, summary) = ok("gc_stats", call(client, "gc_stats", json!({})).await);
    let count = |v: &Value| v["gc_count"].as_u64().expect("gc_count");
    let pauses = |v: &Value| v["pauses"]["count"].as_u64().expect("pause count");
    assert!(count(&after) > count(&before), "{before} -> {after}");
    assert!(pauses(&after) > pauses(&before));
    assert!(
        summary.contains(&format!("{} GCs", count(&after))),
        "{summary}"
    );

    // The watch sees a collection the test's collector causes while it runs.
    let (watched, summary) = {
        let watch = call(client, "gc_watch", json!({"seconds": 30, "max_events": 1}));
        let make_garbage = async {
            loop {
                image.collect().await;
            }
        };
        tokio::select! {
            w = watch => ok("gc_watch", w),
            () = make_garbage => unreachable!(),
        }
    };
    assert_eq!(watched["count"], 1, "{watched}");
    assert!(watched["events"][0]["wall_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        summary.starts_with("target test: 1 collection in "),
        "{summary}"
    );

    let (rt, summary) = ok(
        "runtime_stats",
        call(client, "runtime_stats", json!({})).await,
    );
    assert_eq!(rt["pid"], pid);
    assert!(rt["thread_count"].as_u64().expect("thread_count") >= WORKERS as u64 + 3);
    assert!(rt["os_thread_count"].as_u64().expect("os threads") >= WORKERS as u64 + 3);
    assert!(rt["lisp_version"].as_str().is_some_and(|v| !v.is_empty()));
    assert!(summary.contains(&format!("pid {pid}")), "{summary}");

    let (list, summary) = ok("thread_list", call(client, "thread_list", json!({})).await);
    let tids = proc_tids(pid);
    for i in 0..WORKERS {
        let found = threads_named(&list, &worker(i));
        assert_eq!(found.len(), 1, "{}", worker(i));
        let tid = found[0]["tid"].as_i64().expect("tid") as i32;
        assert!(tids.contains(&tid), "tid {tid} not in /proc ({tids:?})");
        assert!(
            summary.contains(&format!("{tid} \"{}\"", worker(i))),
            "{summary}"
        );
    }
    assert_eq!(
        threads_named(&list, "mcp-waiter")[0]["lisp_wait"],
        "mcp-lock"
    );
    assert!(summary.contains("waits for mutex mcp-lock"), "{summary}");

    let (detail, summary) = ok(
        "thread_inspect",
        call(
            client,
            "thread_inspect",
            json!({"thread_id": worker(3), "max_frames": 10}),
        )
        .await,
    );
    assert_eq!(detail["name"], worker(3));
    assert_eq!(detail["answered"], true);
    let frames = detail["frames"].as_array().expect("frames");
    assert!(!frames.is_empty() && frames.len() <= 10, "{frames:?}");
    assert!(
        frames.iter().any(|f| f
            .as_str()
            .is_some_and(|f| f.to_lowercase().contains("sbmon-test-sleeper"))),
        "{frames:?}"
    );
    assert!(summary.contains("backtrace ("), "{summary}");

    let (dump, summary) = ok(
        "thread_dump_all",
        call(client, "thread_dump_all", json!({"max_frames": 5})).await,
    );
    for i in 0..WORKERS {
        let t = threads_named(&dump, &worker(i));
        assert_eq!(t.len(), 1, "{}", worker(i));
        assert_eq!(t[0]["answered"], true);
        let n = t[0]["frames"].as_array().map_or(0, Vec::len);
        assert!((1..=5).contains(&n), "{n} frames");
    }
    assert!(summary.contains(&worker(0)), "{summary}");

    let (metrics, _) = ok(
        "metrics_export",
        call(client, "metrics_export", json!({"target": "test"})).await,
    );
    let text = metrics["text"].as_str().expect("exposition text");
    let limit = format!(
        "sbcl_heap_limit_bytes{{target=\"test\"}} {}\n",
        HEAP_MB << 20
    );
    assert!(text.contains(&limit), "{text}");
}

async fn errors(client: &Client) {
    // Tool failures are results the model can read and act on.
    let message = tool_error(
        "unknown thread",
        call(
            client,
            "thread_inspect",
            json!({"thread_id": "no-such-thread"}),
        )
        .await,
    );
    assert!(message.contains("no thread"), "{message}");
    assert!(
        message.contains(&worker(0)),
        "should list live threads: {message}"
    );

    let message = tool_error(
        "unknown argument",
        call(
            client,
            "thread_inspect",
            json!({"thread_id": worker(0), "bogus": 1}),
        )
        .await,
    );
    assert!(message.contains("invalid arguments"), "{message}");

    let message = tool_error(
        "unknown target",
        call(client, "memory_stats", json!({"target": "nope"})).await,
    );
    assert!(message.contains("known targets: test, down"), "{message}");

    let message = tool_error(
        "target down",
        call(client, "memory_stats", json!({"target": "down"})).await,
    );
    assert!(message.contains("cannot connect"), "{message}");
    // health_check reports a down agent as its critical finding rather than failing.
    let (health, summary) = ok(
        "health_check",
        call(client, "health_check", json!({"target": "down"})).await,
    );
    assert_eq!(health["status"], "critical");
    assert!(summary.contains("availability.agent critical"), "{summary}");
    // ... and the server keeps serving the live one.
    let (m, _) = ok(
        "memory_stats",
        call(client, "memory_stats", json!({})).await,
    );
    assert_eq!(m["heap_limit_bytes"], HEAP_MB * 1024 * 1024);

    // Protocol misuse is a JSON-RPC error.
    let unknown = client
        .call_tool(CallToolRequestParams::new("no_such_tool"))
        .await;
    assert_eq!(mcp_error_code(unknown), ErrorCode::INVALID_PARAMS);
}

async fn prompts(client: &Client) {
    let prompts = client.list_all_prompts().await.expect("prompts/list");
    let names: BTreeSet<&str> = prompts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, PROMPTS.into_iter().collect());
    for p in &prompts {
        let arg = &p.arguments.as_ref().expect("arguments")[0];
        assert_eq!(arg.name, "target");
        assert_eq!(arg.required, Some(false));
        assert!(p.description.is_some());
    }
    let tools_of = |name: &str| -> &[&str] {
        match name {
            "basic_health_check" => &["health_check", "memory_stats", "runtime_stats"],
            "memory_investigation" => &[
                "memory_stats",
                "memory_trend",
                "heap_histogram",
                "heap_retainers",
            ],
            "gc_pressure" => &["gc_stats", "gc_watch", "memory_stats"],
            "thread_health" => &["thread_list", "thread_inspect"],
            _ => &[
                "health_check",
                "thread_dump_all",
                "memory_stats",
                "runtime_stats",
                "memory_trend",
            ],
        }
    };
    for name in PROMPTS {
        let mut params = GetPromptRequestParams::new(name);
        params.arguments = Some(args(json!({"target": "test"})));
        let result = client.get_prompt(params).await.expect("prompts/get");
        let text: String = result
            .messages
            .iter()
            .filter_map(|m| m.content.as_text().map(|t| t.text.clone()))
            .collect();
        for tool in tools_of(name) {
            assert!(
                text.contains(&format!("`{tool}`")),
                "{name} should mention {tool}: {text}"
            );
        }
        assert!(text.contains(r#""target":"test""#), "{name}: {text}");
        // Without a target the examples carry none.
        let plain = client
            .get_prompt(GetPromptRequestParams::new(name))
            .await
            .expect("prompts/get without arguments");
        let plain: String = plain
            .messages
            .iter()
            .filter_map(|m| m.content.as_text().map(|t| t.text.clone()))
            .collect();
        assert!(!plain.contains(r#""target":"#), "{name}: {plain}");
    }
    let unknown = client
        .get_prompt(GetPromptRequestParams::new("no_such_prompt"))
        .await;
    assert_eq!(mcp_error_code(unknown), ErrorCode::INVALID_PARAMS);
}

fn resource_text(contents: &[ResourceContents]) -> String {
    match contents.first() {
        Some(ResourceContents::TextResourceContents { text, .. }) => text.clone(),
        other => panic!("expected text contents, got {other:?}"),
    }
}

async fn resources(client: &Client, image: &Image) {
    let list = client.list_all_resources().await.expect("resources/list");
    let uris: BTreeSet<&str> = list.iter().map(|r| r.uri.as_str()).collect();
    assert_eq!(
        uris,
        ["sbmon://events", "sbmon://guide", "sbmon://targets"]
            .into_iter()
            .collect()
    );

    let targets = client
        .read_resource(ReadResourceRequestParams::new("sbmon://targets"))
        .await
        .expect("read targets");
    let targets: Value =
        serde_json::from_str(&resource_text(&targets.contents)).expect("targets JSON");
    let entry = |name: &str| {
        targets["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no target {name} in {targets}"))
    };
    let live = entry("test");
    assert_eq!(live["status"], "live");
    assert_eq!(live["pid"], image.pid());
    assert_eq!(live["address"], image.sbcl.address.to_string());
    assert!(live["lisp_version"].as_str().is_some_and(|v| !v.is_empty()));
    let down = entry("down");
    assert_eq!(down["status"], "not answering");
    assert!(
        down["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot connect"))
    );

    let guide = client
        .read_resource(ReadResourceRequestParams::new("sbmon://guide"))
        .await
        .expect("read guide");
    let guide = resource_text(&guide.contents);
    for tool in READ_TOOLS {
        assert!(
            guide.contains(&format!("### `{tool}`")),
            "{tool} missing from the guide"
        );
    }
    assert!(guide.contains("`thread_id`"), "{guide}");
    assert!(guide.contains("OS tid"), "{guide}");

    let unknown = client
        .read_resource(ReadResourceRequestParams::new("sbmon://nothing"))
        .await;
    assert!(
        matches!(unknown, Err(ServiceError::McpError(_))),
        "{unknown:?}"
    );
}

/// 32 calls in flight at once on one session, each answer checked against its own request.
async fn concurrent_calls(client: &Client, image: &Image) {
    let pid = image.pid();
    let calls = (0..32).map(|i| async move {
        let (tool, arguments) = match i % 4 {
            0 | 2 => (
                "thread_inspect",
                json!({"thread_id": worker(i % WORKERS), "max_frames": 3}),
            ),
            1 => ("memory_stats", json!({})),
            _ => ("runtime_stats", json!({})),
        };
        (i, tool, call(client, tool, arguments).await)
    });
    let results = futures::future::join_all(calls).await;
    assert_eq!(results.len(), 32);
    for (i, tool, result) in results {
        let (v, _) = ok(tool, result);
        match tool {
            "thread_inspect" => assert_eq!(v["name"], worker(i % WORKERS), "call {i}"),
            "memory_stats" => {
                assert_eq!(v["heap_limit_bytes"], HEAP_MB * 1024 * 1024, "call {i}");
                assert!(v.get("lisp_version").is_none(), "call {i}");
            }
            _ => {
                assert_eq!(v["pid"], pid, "call {i}");
                assert!(v.get("lisp_version").is_some(), "call {i}");
            }
        }
    }
}

#[tokio::test]
async fn mcp_over_stdio_with_the_real_binary() {
    let image = start_image().await;
    let client = stdio_client(&image).await;
    exercise(&client, &image).await;
    client.cancel().await.expect("close the session");
}

#[tokio::test]
async fn mcp_over_streamable_http() {
    let image = start_image().await;
    let (url, stop) = http_server(&image).await;
    let _stop = stop.drop_guard();
    let client =
        ().serve(StreamableHttpClientTransport::from_uri(url.as_str()))
            .await
            .expect("MCP initialize over HTTP");
    exercise(&client, &image).await;
    client.cancel().await.expect("close the session");
    legacy_session(&url).await;

    // Browsers on another origin are refused (DNS rebinding protection); so is a foreign Host.
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
    let http = reqwest::Client::new();
    let post = |origin: Option<&'static str>| {
        let mut request = http
            .post(&url)
            .header("Accept", "application/json, text/event-stream")
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(origin) = origin {
            request = request.header("Origin", origin);
        }
        request.send()
    };
    let evil = post(Some("http://evil.example")).await.expect("POST");
    assert_eq!(evil.status(), 403, "foreign Origin");
    let foreign_host = http
        .post(&url)
        .header("Host", "evil.example")
        .header("Accept", "application/json, text/event-stream")
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST");
    assert!(
        foreign_host.status().is_client_error(),
        "foreign Host: {}",
        foreign_host.status()
    );
}

/// The JSON-RPC message in a Streamable HTTP reply: the body itself, or the first SSE `data:`
/// line holding a JSON-RPC message.
fn http_reply(body: &str) -> Value {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return v;
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|v| v.get("jsonrpc").is_some())
        .unwrap_or_else(|| panic!("no JSON-RPC message in {body:?}"))
}

/// A client of today's MCP (2025-06-18, with an `Mcp-Session-Id` session), by hand: the
/// endpoint nested at /mcp keeps the session across requests.
async fn legacy_session(url: &str) {
    let http = reqwest::Client::new();
    let post = |session: Option<String>, body: Value| {
        let mut request = http
            .post(url)
            .header("Accept", "application/json, text/event-stream")
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(session) = session {
            request = request
                .header("Mcp-Session-Id", session)
                .header("MCP-Protocol-Version", "2025-06-18");
        }
        request.send()
    };
    let init = post(
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "legacy-test", "version": "0"}}}),
    )
    .await
    .expect("initialize");
    assert_eq!(init.status(), 200);
    let session = init
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .expect("a session id");
    let reply = http_reply(&init.text().await.expect("body"));
    assert_eq!(reply["result"]["protocolVersion"], "2025-06-18", "{reply}");
    let initialized = post(
        Some(session.clone()),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await
    .expect("initialized");
    assert!(
        initialized.status().is_success(),
        "{}",
        initialized.status()
    );
    let call = post(
        Some(session),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
               "params": {"name": "memory_stats", "arguments": {"target": "test"}}}),
    )
    .await
    .expect("tools/call");
    assert_eq!(call.status(), 200);
    let reply = http_reply(&call.text().await.expect("body"));
    assert_eq!(reply["id"], 2, "{reply}");
    assert_eq!(
        reply["result"]["structuredContent"]["heap_limit_bytes"],
        HEAP_MB * 1024 * 1024,
        "{reply}"
    );
}

/// Raw JSON-RPC lines on the binary's stdin: stdout carries only protocol messages, an
/// unknown tool is JSON-RPC error -32602 on the wire, and closing stdin ends the server
/// cleanly. No agent is needed for that.
#[tokio::test]
async fn stdio_stdout_is_protocol_only_and_stdin_eof_ends_the_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args(["serve", "--stdio", "--target"])
        .arg(format!("unix:{}", dir.path().join("none.sock").display()))
        .env("SBMON_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sbmon");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let messages = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw-test", "version": "0"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
               "params": {"name": "no_such_tool", "arguments": {}}}),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
               "params": {"name": "memory_stats", "arguments": {}}}),
    ];
    let mut lines = BufReader::new(stdout).lines();
    let mut replies = Vec::new();
    for m in &messages {
        stdin
            .write_all(format!("{m}\n").as_bytes())
            .await
            .expect("write");
        if m.get("id").is_some() {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("a reply in time")
                .expect("read")
                .expect("a line");
            replies.push(line);
        }
    }
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("sbmon exits once stdin closes")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
    while let Some(line) = lines.next_line().await.expect("read") {
        replies.push(line);
    }
    let replies: Vec<Value> = replies
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON on stdout: {l:?}: {e}"))
        })
        .collect();
    for r in &replies {
        assert_eq!(r["jsonrpc"], "2.0", "{r}");
    }
    assert_eq!(replies[0]["id"], 1);
    assert_eq!(replies[0]["result"]["serverInfo"]["name"], "sbmon");
    assert_eq!(replies[1]["id"], 2);
    assert_eq!(replies[1]["error"]["code"], -32602, "{}", replies[1]);
    // No agent there: a tool result with isError and a message saying what to do.
    assert_eq!(replies[2]["id"], 3);
    assert_eq!(replies[2]["result"]["isError"], true, "{}", replies[2]);
    let message = replies[2]["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or("");
    assert!(message.contains("sbmon-agent:start"), "{message}");
}
