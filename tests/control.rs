//! Control and eval tools against a real SBCL, each effect checked independently (/proc,
//! memory_stats, later evaluations), plus the permission model, the audit log and the HTTP
//! bearer token.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Image, Sbmon, Setup, proc_tids};
use sbmon::audit::Audit;
use sbmon::tools::{Allow, Catalog, ToolError};
use sbmon::wire::Sexp;
use serde_json::{Value, json};

const ALL: Allow = Allow {
    control: true,
    eval: true,
};

async fn eval(c: &Catalog, code: &str) -> Value {
    c.call("repl_eval", json!({"code": code})).await.unwrap()
}

#[tokio::test]
async fn control_and_eval_tools_exist_only_when_allowed() {
    let image = Image::start(Setup {
        allow: ALL,
        ..Setup::default()
    })
    .await;
    let read_only = common::catalog_over(&image, Allow::default(), Audit::default());
    let names: Vec<&str> = read_only.tools().map(|t| t.name).collect();
    for hidden in [
        "memory_gc",
        "gc_tune",
        "thread_kill",
        "profile_cpu",
        "repl_eval",
        "code_reload_system",
    ] {
        assert!(!names.contains(&hidden), "{hidden} listed without --allow");
    }
    let err = read_only.call("memory_gc", Value::Null).await.unwrap_err();
    assert!(matches!(err, ToolError::NotAllowed { .. }));
    assert!(err.to_string().contains("--allow control"), "{err}");
    let err = read_only
        .call("repl_eval", json!({"code": "1"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--allow eval"), "{err}");

    let control_only = common::catalog_over(
        &image,
        Allow {
            control: true,
            eval: false,
        },
        Audit::default(),
    );
    assert!(control_only.tools().any(|t| t.name == "memory_gc"));
    assert!(!control_only.tools().any(|t| t.name == "repl_eval"));

    // The CLI refuses with the flag's name (usage error) and allows with it.
    let target = image.sbcl.address.to_string();
    let sbmon = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sbmon"))
            .args(args)
            .args(["--target", &target])
            .output()
            .unwrap()
    };
    let out = sbmon(&["call", "memory_gc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow control"));
    let audit = image.dir.path().join("audit.jsonl");
    let audit_arg = audit.to_str().unwrap();
    let long_code = json!({"code": format!("(length \"{}\")", "x".repeat(2000))}).to_string();
    for args in [
        [
            "call",
            "memory_gc",
            r#"{"full": true}"#,
            "--allow",
            "control,eval",
        ],
        ["call", "repl_eval", &long_code, "--allow", "eval"],
    ] {
        let out = sbmon(&[&args[..], &["--audit-log", audit_arg]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("sbmon audit:"), "{stderr}");
    }
    let lines: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["tool"], "memory_gc");
    assert_eq!(lines[0]["front_end"], "cli");
    assert_eq!(lines[0]["outcome"], "ok");
    assert_eq!(lines[0]["arguments"]["full"], true);
    assert_eq!(lines[1]["tool"], "repl_eval");
    let logged = lines[1]["arguments"]["code"].as_str().unwrap();
    assert!(
        logged.len() < 700 && logged.ends_with("(2011 chars)"),
        "{logged}"
    );
}

#[tokio::test]
async fn gc_tune_reads_back_and_memory_gc_frees_what_the_test_made() {
    let image = Image::start(Setup {
        allow: ALL,
        ..Setup::default()
    })
    .await;
    let c = common::catalog_over(&image, ALL, Audit::default());
    let tuned = c
        .call(
            "gc_tune",
            json!({
                "nursery_size_bytes": 300 << 20,
                "generations": [{"generation": 1, "number_of_gcs_before_promotion": 3,
                                 "minimum_age_before_gc": 0.5}],
                "generation-sizes": [64 << 20, 128 << 20],
            }),
        )
        .await
        .unwrap();
    assert_eq!(tuned["after"]["nursery_size"], 300 << 20);
    let m = c.call("memory_stats", Value::Null).await.unwrap();
    assert_eq!(m["nursery_size_bytes"], 300 << 20);
    let generation = |m: &Value, g: usize, k: &str| m["generations"][g][k].clone();
    assert_eq!(generation(&m, 0, "bytes_consed_between_gcs"), 64 << 20);
    assert_eq!(generation(&m, 1, "bytes_consed_between_gcs"), 128 << 20);
    assert_eq!(generation(&m, 1, "number_of_gcs_before_promotion"), 3);
    assert_eq!(generation(&m, 1, "minimum_age_before_gc"), 0.5);
    assert_ne!(
        tuned["before"]["nursery_size"],
        tuned["after"]["nursery_size"]
    );

    // One invalid value: nothing changes, not even the valid ones beside it.
    for bad in [
        json!({"nursery_size_bytes": 1 << 20, "promotion-thresholds": [0.5, 1.5]}),
        json!({"nursery_size_bytes": 1u64 << 50}),
        json!({"generations": [{"generation": 6, "number_of_gcs_before_promotion": 1}]}),
        json!({}),
    ] {
        let err = c.call("gc_tune", bad.clone()).await.unwrap_err();
        // Whether sbmon or the agent refuses it, a bad value is the caller's mistake.
        assert!(err.is_usage(), "{bad}: {err:?}");
        assert!(
            err.to_string().contains("invalid")
                || err.to_string().contains("BAD-ARGUMENT")
                || err.to_string().contains("nothing to change"),
            "{bad}: {err}"
        );
    }
    // The CLI says so with exit code 2, as for any usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args([
            "call",
            "gc_tune",
            r#"{"nursery_size_bytes": 1125899906842624}"#,
        ])
        .args(["--allow", "control", "--target"])
        .arg(image.sbcl.address.to_string())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unchanged = c.call("memory_stats", Value::Null).await.unwrap();
    assert_eq!(unchanged["nursery_size_bytes"], 300 << 20);
    assert_eq!(generation(&unchanged, 1, "minimum_age_before_gc"), 0.5);

    // With a 300 MB nursery, 100 MB of garbage stays in the heap until a GC.
    eval(&c, "(defvar *junk* (loop repeat 1600 collect (make-array 65536 :element-type '(unsigned-byte 8))))").await;
    eval(&c, "(setf *junk* nil)").await;
    let before = c.call("memory_stats", Value::Null).await.unwrap()["heap_used_bytes"]
        .as_u64()
        .unwrap();
    let gc = c.call("memory_gc", json!({"full": true})).await.unwrap();
    let freed = gc["bytes_freed"].as_i64().unwrap();
    assert!(freed >= 90 << 20, "freed {freed} of 100 MB of garbage");
    assert!(gc["heap_after"].as_u64().unwrap() + (90 << 20) <= before);
    assert!(gc["gc_count_after"].as_u64() > gc["gc_count_before"].as_u64());
    assert!(gc["pause_seconds"].as_f64().unwrap() > 0.0);
    let after = c.call("memory_stats", Value::Null).await.unwrap()["heap_used_bytes"]
        .as_u64()
        .unwrap();
    assert!(after + (90 << 20) <= before, "{before} -> {after}");
}

#[tokio::test]
async fn thread_kill_ends_threads_and_refuses_main_and_agent_threads() {
    let image = Image::start(Setup {
        forms: vec![common::sleeper("victim")],
        allow: ALL,
        ..Setup::default()
    })
    .await;
    let c = common::catalog_over(&image, ALL, Audit::default());
    let list = c.call("thread_list", Value::Null).await.unwrap();
    let victim = list["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "victim")
        .unwrap()["tid"]
        .as_i64()
        .unwrap() as i32;
    assert!(proc_tids(image.pid()).contains(&victim));
    let killed = c
        .call("thread_kill", json!({"thread_id": "victim"}))
        .await
        .unwrap();
    assert_eq!(killed["ended"], true);
    assert_eq!(killed["tid"], victim);
    // SBCL marks the thread finished (what join-thread waits for) just before its pthread
    // exits, so the task may outlive the answer by a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while proc_tids(image.pid()).contains(&victim) {
        assert!(
            std::time::Instant::now() < deadline,
            "the thread's task is still there 5 s after thread_kill said it ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let err = c
        .call("thread_kill", json!({"thread_id": image.pid()}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("REFUSED"), "{err}");
    let agent = list["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["agent"] == true)
        .unwrap()["tid"]
        .clone();
    let err = c
        .call("thread_kill", json!({"thread_id": agent}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("REFUSED"), "{err}");
    c.call("memory_stats", Value::Null).await.unwrap();
}

#[tokio::test]
async fn profile_names_the_busy_function() {
    let scratch = tempfile::tempdir().unwrap();
    let churn_trigger = scratch.path().join("churn");
    let image = Image::start(Setup {
        forms: vec![
            "(defun sbmon-test::busy-loop () (loop (sqrt (random 1d0))))".into(),
            "(sb-thread:make-thread #'sbmon-test::busy-loop :name \"busy\")".into(),
            // Conses lists and nothing else: what an allocation profile must point at. The
            // lists go to a global, or the compiler drops the allocation as dead code. It
            // starts only when the file `churn` appears, after the CPU profile.
            "(defvar sbmon-test::*sink* nil)".into(),
            "(defun sbmon-test::churn () (loop (setf sbmon-test::*sink* (make-list 10))))".into(),
            format!(
                "(sb-thread:make-thread (lambda () (loop until (probe-file {}) do (sleep 0.02)) \
                 (sbmon-test::churn)) :name \"churner\")",
                Sexp::string(churn_trigger.to_string_lossy())
            ),
        ],
        allow: ALL,
        ..Setup::default()
    })
    .await;
    let c = common::catalog_over(&image, ALL, Audit::default());
    let profile = c
        .call("profile_cpu", json!({"seconds": 1.0, "max_rows": 10}))
        .await
        .unwrap();
    assert!(profile["samples"].as_u64().unwrap() > 10, "{profile}");
    let rows = profile["rows"].as_array().unwrap();
    assert!(rows.len() <= 10);
    let top: Vec<&str> = rows
        .iter()
        .take(5)
        .filter_map(|r| r["function"].as_str())
        .collect();
    assert!(
        top.iter()
            .any(|f| f.contains("BUSY-LOOP") || f.contains("SQRT") || f.contains("RANDOM")),
        "{top:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r["function"].as_str().unwrap_or("").contains("BUSY-LOOP")),
        "{rows:?}"
    );

    // Allocation mode samples where memory is allocated: the churner's lists, not the busy
    // loop's CPU (its boxed doubles are a small share of the bytes).
    std::fs::write(&churn_trigger, "").unwrap();
    let profile = c
        .call(
            "profile_cpu",
            json!({"seconds": 1.0, "mode": "alloc", "max_rows": 40}),
        )
        .await
        .unwrap();
    assert!(profile["samples"].as_u64().unwrap() > 10, "{profile}");
    let rows = profile["rows"].as_array().unwrap();
    assert_eq!(rows[0]["function"], "MAKE-LIST", "{profile}");
    assert!(
        rows[0]["self_percent"].as_f64().unwrap() > 50.0,
        "{profile}"
    );
    let churn = rows
        .iter()
        .find(|r| r["function"].as_str().unwrap_or("").contains("CHURN"))
        .unwrap_or_else(|| panic!("CHURN not among the rows: {profile}"));
    assert!(
        churn["cumulative_percent"].as_f64().unwrap() > 50.0,
        "{profile}"
    );
}

#[tokio::test]
async fn repl_eval_keeps_definitions_reports_errors_and_stops_runaways() {
    let image = Image::start(Setup {
        allow: ALL,
        ..Setup::default()
    })
    .await;
    let c = common::catalog_over(&image, ALL, Audit::default());
    let def = eval(&c, "(defun sbmon-double (x) (* x 2))").await;
    assert_eq!(def["ok"], true);
    let answer = eval(&c, "(sbmon-double 21)").await;
    assert_eq!(answer["values"], json!(["42"]));
    let several = eval(&c, "(print :hello) (values 2 3)").await;
    assert_eq!(several["values"], json!(["2", "3"]));
    assert_eq!(several["forms"], 2);
    assert!(several["output"].as_str().unwrap().contains(":HELLO"));

    let failed = eval(&c, "(defun oops (x) (/ 1 x)) (oops 0)").await;
    assert_eq!(failed["ok"], false);
    assert_eq!(failed["error"]["type"], "DIVISION-BY-ZERO");
    let frames = failed["error"]["backtrace"].as_array().unwrap();
    assert!(!frames.is_empty() && frames.len() <= 30);
    assert!(
        frames.iter().any(|f| f.as_str().unwrap().contains("OOPS")),
        "{frames:?}"
    );

    let big = c
        .call(
            "repl_eval",
            json!({"code": "(dotimes (i 100000) (write-string \"0123456789\"))", "max_output": 1000}),
        )
        .await
        .unwrap();
    assert_eq!(big["output_truncated"], true);
    assert!(big["output"].as_str().unwrap().len() <= 1000);

    let started = Instant::now();
    let runaway = c
        .call("repl_eval", json!({"code": "(loop)", "timeout_s": 1}))
        .await
        .unwrap();
    assert_eq!(runaway["ok"], false);
    assert_eq!(runaway["error"]["type"], "TIMEOUT");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The image runs on; no evaluation thread is left behind, none sits in the debugger.
    let threads = c.call("thread_list", Value::Null).await.unwrap();
    let names: Vec<&str> = threads["threads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(!names.iter().any(|n| n.contains("eval")), "{names:?}");
    assert_eq!(eval(&c, "(+ 1 2)").await["values"], json!(["3"]));

    let err = c
        .call(
            "repl_eval",
            json!({"code": "1", "package": "NO-SUCH-PACKAGE"}),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NO-SUCH-PACKAGE"), "{err}");
}

#[tokio::test]
async fn reload_picks_up_changed_sources() {
    let image = Image::start(Setup {
        allow: ALL,
        ..Setup::default()
    })
    .await;
    let c = common::catalog_over(&image, ALL, Audit::default());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sbmon-reload-test.asd"),
        "(defsystem \"sbmon-reload-test\" :components ((:file \"main\")))",
    )
    .unwrap();
    let main = dir.path().join("main.lisp");
    std::fs::write(&main, "(defun cl-user::reload-probe () 1)").unwrap();
    eval(
        &c,
        &format!(
            "(require :asdf) (push #p\"{}/\" (symbol-value (find-symbol \"*CENTRAL-REGISTRY*\" \"ASDF\")))",
            dir.path().display()
        ),
    )
    .await;
    let loaded = c
        .call("code_reload_system", json!({"system": "sbmon-reload-test"}))
        .await
        .unwrap();
    assert_eq!(loaded["system"], "sbmon-reload-test");
    assert_eq!(eval(&c, "(reload-probe)").await["values"], json!(["1"]));

    std::fs::write(&main, "(defun cl-user::reload-probe () 2)").unwrap();
    let reloaded = c
        .call(
            "code_reload_system",
            json!({"system": "sbmon-reload-test", "force": true}),
        )
        .await
        .unwrap();
    assert_eq!(reloaded["forced"], true);
    assert_eq!(eval(&c, "(reload-probe)").await["values"], json!(["2"]));

    let err = c
        .call(
            "code_reload_system",
            json!({"system": "no-such-system-here"}),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("MISSING-SYSTEM"), "{err}");
}

#[tokio::test]
async fn http_requires_the_bearer_token_when_one_is_set() {
    let image = Image::start(Setup::default()).await;
    let app = format!("app={}", image.sbcl.address);
    let token = "s3cret-token-for-the-test";
    let sbmon = Sbmon::start("serve", &["--target", &app, "--token", token], &[]);
    let client = reqwest::Client::new();
    let rpc = json!({"jsonrpc": "2.0", "id": 1, "method": "memory_stats"}).to_string();
    for (path, post) in [
        ("/rpc", true),
        ("/metrics", false),
        ("/mcp", true),
        ("/health", false),
        ("/sd", false),
    ] {
        let url = format!("{}{path}", sbmon.base);
        let request = if post {
            client.post(&url).body(rpc.clone())
        } else {
            client.get(&url)
        };
        assert_eq!(
            request.send().await.unwrap().status(),
            401,
            "{path} without a token"
        );
    }
    let wrong = client
        .post(format!("{}/rpc", sbmon.base))
        .bearer_auth("wrong-token-of-the-same-size")
        .body(rpc.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right: Value = client
        .post(format!("{}/rpc", sbmon.base))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(rpc)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(right["result"]["pid"], image.pid());
    let metrics = client
        .get(format!("{}/metrics", sbmon.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    // Liveness stays open: orchestrators probe it without credentials.
    assert_eq!(sbmon.get("/health/live").await.0, 200);

    // Beyond loopback, a token is required.
    let out = Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args(["serve", "--http", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
}
