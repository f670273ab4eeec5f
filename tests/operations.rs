//! sbmon's own operation metrics (`operation_stats`, `/monitoring/*`) against a real SBCL:
//! the figures equal the calls the test made, counts and errors exact; a reset zeroes them
//! only with `--allow control`, audited, and leaves the Prometheus counters alone; the
//! `/monitoring` health probes answer as `/health*` do.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{Image, Sbmon, Setup};
use serde_json::{Value, json};

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn call(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

async fn get_json(sbmon: &Sbmon, path: &str) -> (u16, Value) {
    let (status, text) = sbmon.get(path).await;
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("GET {path} answered {status} non-JSON ({e}): {text}"));
    (status, body)
}

async fn post_reset(sbmon: &Sbmon) -> (u16, Value) {
    sbmon.post("/monitoring/reset", String::new()).await
}

/// The value of the Prometheus sample written exactly as `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn prometheus_calls(sbmon: &Sbmon, tool: &str) -> (f64, f64) {
    let (status, text) = sbmon.get("/metrics?scope=self").await;
    assert_eq!(status, 200);
    let of = |outcome: &str| {
        let series = format!("sbmon_tool_calls_total{{tool=\"{tool}\",outcome=\"{outcome}\"}}");
        sample(&text, &series).unwrap_or_else(|| panic!("no {series}\n{text}"))
    };
    (of("ok"), of("error"))
}

/// `n` successful and `m` failing calls of thread_inspect through /rpc, and two usage errors
/// (which are not counted). Returns the wall-clock window the calls ran in.
async fn inspect_calls(sbmon: &Sbmon, n: u64, m: u64) -> (f64, f64) {
    let from = now_unix();
    for i in 0..n {
        let answer = sbmon
            .rpc(call(i, "thread_inspect", json!({"thread_id": "alpha"})))
            .await;
        assert_eq!(answer["result"]["name"], "alpha", "{answer}");
    }
    for i in 0..m {
        let answer = sbmon
            .rpc(call(
                100 + i,
                "thread_inspect",
                json!({"thread_id": format!("no-such-thread-{i}")}),
            ))
            .await;
        // -32000: the call ran and failed (a usage error would be -32602, and not counted).
        assert_eq!(answer["error"]["code"], -32000, "{answer}");
    }
    for (i, bad) in [json!(1.5), json!({"thread_id": "alpha", "extra": 1})]
        .into_iter()
        .enumerate()
    {
        let params = if bad.is_object() {
            bad
        } else {
            json!({"thread_id": bad})
        };
        let answer = sbmon
            .rpc(call(200 + i as u64, "thread_inspect", params))
            .await;
        assert_eq!(answer["error"]["code"], -32602, "{answer}");
    }
    (from, now_unix())
}

/// Checks one span's figures: exactly `count` calls and `errors` errors, ordered latencies,
/// a last call inside `window` (or none without calls).
fn check_stats(s: &Value, count: u64, errors: u64, window: Option<(f64, f64)>, what: &str) {
    assert_eq!(s["count"], count, "{what}: {s}");
    assert_eq!(s["errors"], errors, "{what}: {s}");
    let rate = s["error_rate"].as_f64().unwrap();
    let expected = if count == 0 {
        0.0
    } else {
        errors as f64 / count as f64
    };
    assert!((rate - expected).abs() < 1e-12, "{what}: rate {rate}: {s}");
    if count == 0 {
        for field in [
            "avg_seconds",
            "min_seconds",
            "max_seconds",
            "last_call_unix",
        ] {
            assert!(s[field].is_null(), "{what}: {field}: {s}");
        }
        return;
    }
    let (min, avg, max) = (
        s["min_seconds"].as_f64().unwrap(),
        s["avg_seconds"].as_f64().unwrap(),
        s["max_seconds"].as_f64().unwrap(),
    );
    assert!(
        0.0 < min && min <= avg && avg <= max && max < 30.0,
        "{what}: {s}"
    );
    if let Some((from, to)) = window {
        let last = s["last_call_unix"].as_f64().unwrap();
        assert!(
            from <= last && last <= to,
            "{what}: last call {last} outside [{from}, {to}]"
        );
    }
}

#[tokio::test]
async fn operation_metrics_equal_the_calls_made_and_reset_with_allow_control() {
    let image = Image::start(Setup {
        forms: vec![common::sleeper("alpha")],
        ..Setup::default()
    })
    .await;
    let app = format!("app={}", image.sbcl.address);
    let audit_log = image.dir.path().join("audit.jsonl");
    let audit_arg = audit_log.to_str().unwrap();
    let sbmon = Sbmon::start(
        "serve",
        &[
            "--target",
            &app,
            "--allow",
            "control",
            "--audit-log",
            audit_arg,
        ],
        &[],
    );

    // Nothing called yet: every offered tool is listed, at zero.
    let (status, fresh) = get_json(&sbmon, "/monitoring/metrics").await;
    assert_eq!(status, 200);
    let tools = fresh["tools"].as_array().unwrap();
    let offered = sbmon::tools::TOOLS
        .iter()
        .filter(|t| t.class != sbmon::tools::Class::Eval)
        .count();
    assert_eq!(tools.len(), offered, "{fresh}");
    assert!(tools.iter().any(|t| t["name"] == "memory_gc"), "{fresh}");
    check_stats(&fresh["totals"], 0, 0, None, "fresh totals");
    assert!(fresh["reset_unix"].is_null());

    let (n, m) = (5, 3);
    let window = inspect_calls(&sbmon, n, m).await;

    let (status, one) = get_json(&sbmon, "/monitoring/operation?name=thread_inspect").await;
    assert_eq!(status, 200, "{one}");
    let tool = &one["tool"];
    assert_eq!(tool["name"], "thread_inspect");
    check_stats(tool, n + m, m, Some(window), "since reset");
    check_stats(&tool["since_start"], n + m, m, Some(window), "since start");
    assert_eq!(prometheus_calls(&sbmon, "thread_inspect").await, (5.0, 3.0));

    // The tool answers the same figures (its own call is counted under its own name).
    let answer = sbmon
        .rpc(call(
            300,
            "operation_stats",
            json!({"name": "thread_inspect"}),
        ))
        .await;
    let result = &answer["result"];
    assert_eq!(
        result["tools"].as_array().map(Vec::len),
        Some(1),
        "{answer}"
    );
    assert_eq!(result["tools"][0], *tool, "tool and endpoint disagree");
    let unknown = sbmon
        .rpc(call(
            301,
            "operation_stats",
            json!({"name": "no_such_tool"}),
        ))
        .await;
    assert_eq!(unknown["error"]["code"], -32602, "{unknown}");
    let message = unknown["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no tool named \"no_such_tool\"") && message.contains("thread_inspect"),
        "{message}"
    );

    // Totals: 8 thread_inspect calls and the one operation_stats call that ran.
    let (_, all) = get_json(&sbmon, "/monitoring/metrics").await;
    let tools = all["tools"].as_array().unwrap();
    let sum = |field: &str| {
        tools
            .iter()
            .map(|t| t[field].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!((sum("count"), sum("errors")), (n + m + 1, m), "{all}");
    let stats_row = tools
        .iter()
        .find(|t| t["name"] == "operation_stats")
        .unwrap();
    check_stats(stats_row, 1, 0, None, "operation_stats");
    check_stats(&all["totals"], n + m + 1, m, None, "totals");
    let (status, system) = get_json(&sbmon, "/monitoring/system").await;
    assert_eq!(status, 200);
    assert_eq!(system["totals"], all["totals"], "{system}");
    assert_eq!(system["targets"], 1);
    assert_eq!(system["tools"], tools.len());
    assert_eq!(system["version"], env!("CARGO_PKG_VERSION"));
    let uptime = system["uptime_seconds"].as_f64().unwrap();
    let started = system["started_unix"].as_f64().unwrap();
    assert!(uptime > 0.0 && started <= window.0 && started + uptime <= now_unix() + 1.0);

    // Missing and unknown names.
    for (path, code, says) in [
        ("/monitoring/operation", 400, "name=TOOL"),
        ("/monitoring/operation?name=", 400, "name=TOOL"),
        ("/monitoring/operation?name=nope", 404, "no tool named"),
        ("/monitoring/operation?name=repl_eval", 404, "--allow eval"),
    ] {
        let (status, body) = get_json(&sbmon, path).await;
        assert_eq!(status, code, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(says),
            "{path}: {body}"
        );
    }

    // Reset: the since-reset figures go to zero, since-start and Prometheus stay, audited.
    let before_reset = now_unix();
    let (status, reset) = post_reset(&sbmon).await;
    assert_eq!(status, 200, "{reset}");
    check_stats(
        &reset["before"]["totals"],
        n + m + 1,
        m,
        None,
        "before the reset",
    );
    let (_, after) = get_json(&sbmon, "/monitoring/operation?name=thread_inspect").await;
    check_stats(&after["tool"], 0, 0, None, "after the reset");
    check_stats(
        &after["tool"]["since_start"],
        n + m,
        m,
        Some(window),
        "kept",
    );
    let reset_at = after["reset_unix"].as_f64().unwrap();
    assert!(before_reset <= reset_at && reset_at <= now_unix());
    let (_, system) = get_json(&sbmon, "/monitoring/system").await;
    check_stats(&system["totals"], 0, 0, None, "system after the reset");
    check_stats(
        &system["totals"]["since_start"],
        n + m + 1,
        m,
        None,
        "system since start",
    );
    assert_eq!(prometheus_calls(&sbmon, "thread_inspect").await, (5.0, 3.0));
    let audit = std::fs::read_to_string(&audit_log).expect("audit log written");
    let entries: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(entries[0]["tool"], sbmon::tools::RESET_OPERATIONS);
    assert_eq!(entries[0]["front_end"], "http");
    assert_eq!(entries[0]["outcome"], "ok");

    // Counting goes on from zero.
    let window = inspect_calls(&sbmon, 1, 1).await;
    let (_, again) = get_json(&sbmon, "/monitoring/operation?name=thread_inspect").await;
    check_stats(
        &again["tool"],
        2,
        1,
        Some(window),
        "after the reset, counted again",
    );
    check_stats(
        &again["tool"]["since_start"],
        n + m + 2,
        m + 1,
        Some(window),
        "lifetime",
    );
    assert_eq!(prometheus_calls(&sbmon, "thread_inspect").await, (6.0, 4.0));
}

/// Status and body of `path`, the body as JSON.
async fn probe(sbmon: &Sbmon, path: &str) -> (u16, Value) {
    get_json(sbmon, path).await
}

/// `/monitoring/{health,ready,live}` give the status codes and statuses of `/health*`.
async fn same_probes(sbmon: &Sbmon, expected: [u16; 3]) {
    for ((plain, alias), code) in [
        ("/health", "/monitoring/health"),
        ("/health/ready", "/monitoring/ready"),
        ("/health/live", "/monitoring/live"),
    ]
    .into_iter()
    .zip(expected)
    {
        let (a, body_a) = probe(sbmon, plain).await;
        let (b, body_b) = probe(sbmon, alias).await;
        assert_eq!((a, b), (code, code), "{plain}: {body_a}\n{alias}: {body_b}");
        for field in ["status", "ready", "reason"] {
            assert_eq!(
                body_a[field], body_b[field],
                "{field} of {plain} and {alias}"
            );
        }
        let statuses = |body: &Value| -> Vec<(Value, Value)> {
            body["targets"]
                .as_array()
                .map(|ts| {
                    ts.iter()
                        .map(|t| (t["target"].clone(), t["status"].clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(statuses(&body_a), statuses(&body_b), "{plain} vs {alias}");
    }
}

#[tokio::test]
async fn reset_needs_allow_control_and_monitoring_probes_answer_as_health() {
    let image = Image::start(Setup {
        forms: vec![common::sleeper("alpha")],
        ..Setup::default()
    })
    .await;
    let app = format!("app={}", image.sbcl.address);
    let audit_log = image.dir.path().join("audit.jsonl");
    let read_only = Sbmon::start(
        "serve",
        &["--target", &app, "--audit-log", audit_log.to_str().unwrap()],
        &[],
    );
    let window = inspect_calls(&read_only, 2, 1).await;
    let (status, refused) = post_reset(&read_only).await;
    assert_eq!(status, 403, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("--allow control"),
        "{refused}"
    );
    let (_, kept) = get_json(&read_only, "/monitoring/operation?name=thread_inspect").await;
    check_stats(
        &kept["tool"],
        3,
        1,
        Some(window),
        "a refused reset changes nothing",
    );
    assert!(kept["reset_unix"].is_null());
    let audit = std::fs::read_to_string(&audit_log).unwrap_or_default();
    assert!(
        audit.is_empty(),
        "a refused reset did nothing to audit: {audit}"
    );
    // Read-only, the control tools are neither offered nor counted.
    let (_, all) = get_json(&read_only, "/monitoring/metrics").await;
    assert_eq!(
        all["tools"].as_array().unwrap().len(),
        common::READ_TOOLS.len(),
        "{all}"
    );

    // A healthy target: every probe 200, under both names.
    same_probes(&read_only, [200, 200, 200]).await;
    drop(read_only);

    // A target that does not answer is critical: /health and /ready say 503, live stays 200.
    let with_lost = Sbmon::serve(&image, &["gone=unix:/nonexistent/sbmon-test.sock"]);
    same_probes(&with_lost, [503, 503, 200]).await;
    let (_, health) = probe(&with_lost, "/monitoring/health").await;
    assert_eq!(health["status"], "critical", "{health}");
}
