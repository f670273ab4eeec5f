//! The holes found when sbmon was attacked from outside, one test per defect, each named
//! after it: cross-site and DNS-rebinding requests, callers poisoning `/health`, a watch that
//! hid a lost image, a GC setting that cripples the image, an audit log that called failures
//! `ok`, and the input-echo and id-precision defects of JSON-RPC.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Image, Sbmon, Setup};
use sbmon::audit::Audit;
use sbmon::tools::{Allow, Catalog, ToolError};
use serde_json::{Value, json};

/// A request with chosen headers; returns status and body text.
async fn send(
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (u16, String) {
    let mut request = reqwest::Client::new().request(method, url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    // An SSE stream never ends; its status is all this needs.
    let text = if status == 200 && url.contains("/events") {
        String::new()
    } else {
        response.text().await.unwrap_or_default()
    };
    (status, text)
}

const JSON: (&str, &str) = ("content-type", "application/json");

fn eval_request(code: &str) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "repl_eval", "params": {"code": code}}).to_string()
}

#[tokio::test]
async fn cross_site_requests_are_refused_on_every_endpoint() {
    let image = Image::start(Setup {
        allow: Allow {
            control: true,
            eval: true,
        },
        ..Setup::default()
    })
    .await;
    let app = format!("app={}", image.sbcl.address);
    let sbmon = Sbmon::start("serve", &["--target", &app, "--allow", "eval"], &[]);
    let base = &sbmon.base;
    let port = base.rsplit(':').next().unwrap().to_string();
    let marker = image.dir.path().join("written-by-a-web-page");
    let code = format!(
        "(with-open-file (o {:?} :direction :output) (write-line \"pwned\" o))",
        marker.to_str().unwrap()
    );
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    let rpc = format!("{base}/rpc");

    // What a page on another site can send without a preflight (text/plain with its own
    // Origin), what no browser should get through (foreign or null Origin with JSON), and
    // text/plain even without an Origin.
    let text = ("content-type", "text/plain");
    for (headers, expected, what) in [
        (
            vec![text, ("origin", "http://evil.com")],
            403,
            "cross-origin text/plain",
        ),
        (vec![text], 415, "text/plain without an Origin"),
        (
            vec![JSON, ("origin", "http://evil.com")],
            403,
            "JSON from a foreign origin",
        ),
        (
            vec![JSON, ("origin", "null")],
            403,
            "Origin: null (sandboxed frame)",
        ),
    ] {
        let (status, _) = send(post.clone(), &rpc, &headers, Some(eval_request(&code))).await;
        assert_eq!(status, expected, "POST /rpc, {what}");
    }
    assert!(!marker.exists(), "a refused request ran its code");

    // DNS rebinding: a name the attacker controls, resolved to 127.0.0.1.
    let rebound = format!("evil.com:{port}");
    for path in [
        "/",
        "/metrics",
        "/sd",
        "/events",
        "/health",
        "/health/ready",
        "/health/live",
        "/health/targets/app",
        "/mcp",
        "/monitoring/metrics",
        "/monitoring/operation?name=thread_list",
        "/monitoring/system",
        "/monitoring/health",
        "/monitoring/ready",
        "/monitoring/live",
    ] {
        let (status, body) = send(
            get.clone(),
            &format!("{base}{path}"),
            &[("host", &rebound)],
            None,
        )
        .await;
        assert_eq!(status, 403, "GET {path} with Host {rebound}: {body}");
    }
    let dump = json!({"jsonrpc": "2.0", "id": 1, "method": "thread_dump_all"}).to_string();
    let (status, _) = send(post.clone(), &rpc, &[JSON, ("host", &rebound)], Some(dump)).await;
    assert_eq!(status, 403, "/rpc with a rebound Host");
    let (status, _) = send(
        get.clone(),
        &format!("{base}/metrics"),
        &[("sec-fetch-site", "cross-site")],
        None,
    )
    .await;
    assert_eq!(status, 403, "Sec-Fetch-Site: cross-site");

    // The same requests from loopback, as a script or sbmon's own page sends them, work: the
    // refusals above are the policy, not a broken server.
    let (status, body) = send(
        post.clone(),
        &rpc,
        &[JSON, ("origin", &format!("http://localhost:{port}"))],
        Some(eval_request(&code)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(marker.exists(), "the allowed evaluation ran: {body}");
    let local = format!("localhost:{port}");
    for path in ["/", "/metrics", "/health/live", "/health/targets/app"] {
        let (status, body) = send(
            get.clone(),
            &format!("{base}{path}"),
            &[("host", &local)],
            None,
        )
        .await;
        assert_eq!(status, 200, "GET {path}: {body}");
    }
    // /sd advertises where sbmon listens, whatever name the request used.
    let (status, sd) = send(get, &format!("{base}/sd"), &[("host", &local)], None).await;
    assert_eq!(status, 200);
    let sd: Value = serde_json::from_str(&sd).unwrap();
    let listen = base.trim_start_matches("http://");
    assert_eq!(sd[0]["targets"], json!([listen]), "{sd}");
}

/// `POST /monitoring/reset` changes state: a web page must not be able to make it, whether it
/// posts cross-site (a form needs no preflight) or rebinds a name to 127.0.0.1.
#[tokio::test]
async fn monitoring_reset_refuses_cross_site_requests() {
    let image = Image::start(Setup::default()).await;
    let app = format!("app={}", image.sbcl.address);
    let sbmon = Sbmon::start("serve", &["--target", &app, "--allow", "control"], &[]);
    let base = &sbmon.base;
    let port = base.rsplit(':').next().unwrap().to_string();
    let answer = sbmon
        .rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "memory_stats"}))
        .await;
    assert!(answer["result"].is_object(), "{answer}");
    let count = || async {
        let (_, text) = sbmon.get("/monitoring/system").await;
        let system: Value = serde_json::from_str(&text).unwrap();
        system["totals"]["count"].as_u64().unwrap()
    };
    assert_eq!(count().await, 1);

    let reset = format!("{base}/monitoring/reset");
    let form = ("content-type", "application/x-www-form-urlencoded");
    let rebound = format!("evil.com:{port}");
    for (headers, what) in [
        (
            vec![form, ("origin", "http://evil.com")],
            "a form from another site",
        ),
        (vec![("origin", "null")], "Origin: null"),
        (
            vec![("sec-fetch-site", "cross-site")],
            "Sec-Fetch-Site: cross-site",
        ),
        (vec![("host", rebound.as_str())], "a rebound Host"),
    ] {
        let (status, body) =
            send(reqwest::Method::POST, &reset, &headers, Some(String::new())).await;
        assert_eq!(status, 403, "{what}: {body}");
        assert_eq!(count().await, 1, "{what} reset the figures");
    }
    // From loopback, as curl or sbmon's own page sends it, the reset happens.
    let own = format!("http://localhost:{port}");
    let (status, body) = send(reqwest::Method::POST, &reset, &[("origin", &own)], None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count().await, 0);
}

#[tokio::test]
async fn sd_advertises_the_external_url() {
    let image = Image::start(Setup::default()).await;
    let app = format!("app={}", image.sbcl.address);
    let sbmon = Sbmon::start(
        "serve",
        &[
            "--target",
            &app,
            "--external-url",
            "https://mon.example:8443/sbmon",
        ],
        &[],
    );
    let (status, sd) = sbmon.get("/sd").await;
    assert_eq!(status, 200);
    let sd: Value = serde_json::from_str(&sd).unwrap();
    assert_eq!(sd[0]["targets"], json!(["mon.example:8443"]), "{sd}");
}

fn rpc_call(id: i64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// Every answer of a JSON-RPC batch is an error.
fn all_failed(answers: &Value) {
    let answers = answers.as_array().expect("a batch answer");
    assert!(
        answers.iter().all(|a| a["error"].is_object()),
        "{answers:?}"
    );
}

#[tokio::test]
async fn health_is_not_poisoned_by_callers_mistakes() {
    let image = Image::start(Setup::default()).await;
    let app = format!("app={}", image.sbcl.address);
    let sbmon = Sbmon::start("serve", &["--target", &app, "--timeout", "1"], &[]);
    let errors_check = |report: &Value| -> Value {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "availability.errors")
            .cloned()
            .unwrap()
    };

    // 300 calls for a thread that does not exist and 100 for a target that does not: the
    // callers' mistakes, answered as errors, and nothing the image did wrong.
    let mistakes: Vec<Value> = (0..100)
        .map(|i| rpc_call(i, "thread_inspect", json!({"thread_id": 999_999_999})))
        .collect();
    for _ in 0..3 {
        all_failed(&sbmon.rpc(Value::Array(mistakes.clone())).await);
    }
    let wrong_target: Vec<Value> = (0..100)
        .map(|i| rpc_call(i, "memory_stats", json!({"target": "nope"})))
        .collect();
    all_failed(&sbmon.rpc(Value::Array(wrong_target)).await);

    let (status, body) = sbmon.get("/health/targets/app").await;
    let report: Value = serde_json::from_str(&body).unwrap();
    let check = errors_check(&report);
    assert_eq!(check["observed"], 0.0, "{check}");
    assert_eq!(check["status"], "healthy", "{check}");
    assert_eq!(status, 200, "{report}");
    let (status, _) = sbmon.get("/health/ready").await;
    assert_eq!(status, 200);

    // An outage the target really had counts, and is forgotten as soon as it answers again.
    // SAFETY: signals to the test's own SBCL child.
    unsafe { libc::kill(image.pid(), libc::SIGSTOP) };
    // kill(2) returns before every thread has stopped; wait until /proc says they have.
    let all_stopped = || {
        common::proc_tids(image.pid()).iter().all(|tid| {
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/stat", image.pid())).is_ok_and(
                |stat| {
                    stat.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('T')
                },
            )
        })
    };
    while !all_stopped() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let calls: Vec<Value> = (0..5)
        .map(|i| rpc_call(i, "memory_stats", json!({})))
        .collect();
    all_failed(&sbmon.rpc(Value::Array(calls)).await);
    let (status, body) = sbmon.get("/health/targets/app").await;
    assert_eq!(status, 503, "a stopped image is critical");
    let report: Value = serde_json::from_str(&body).unwrap();
    let check = errors_check(&report);
    assert_eq!(
        check["observed"], 1.0,
        "the 5 calls the test made all failed: {check}"
    );
    assert!(
        check["reason"]
            .as_str()
            .unwrap()
            .starts_with("5 of 5 tool calls failed"),
        "{check}"
    );
    unsafe { libc::kill(image.pid(), libc::SIGCONT) };
    let (status, body) = sbmon.get("/health/targets/app").await;
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200, "recovered at once: {report}");
    assert_eq!(errors_check(&report)["observed"], 0.0, "{report}");
}

#[tokio::test]
async fn gc_watch_reports_a_target_lost_mid_watch() {
    let mut image = Image::start(Setup::default()).await;
    let catalog = Arc::new(common::catalog_over(
        &image,
        Allow::default(),
        Audit::default(),
    ));
    let watching = {
        let catalog = catalog.clone();
        tokio::spawn(async move { catalog.call("gc_watch", json!({"seconds": 3})).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    image.sbcl.stop();
    let outcome = watching.await.unwrap();
    let err = outcome.expect_err("a watch whose image died must not report success");
    assert!(matches!(err, ToolError::Agent(_)), "{err:?}");
    assert!(err.to_string().contains("stopped sending events"), "{err}");
}

async fn nursery(c: &Catalog) -> u64 {
    c.call("memory_stats", json!({})).await.unwrap()["nursery_size_bytes"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn gc_tune_refuses_a_nursery_below_the_floor() {
    let image = Image::start(Setup {
        allow: Allow {
            control: true,
            eval: true,
        },
        ..Setup::default()
    })
    .await;
    let control = Allow {
        control: true,
        eval: false,
    };
    let catalog = common::catalog_over(&image, control, Audit::default());
    let before = nursery(&catalog).await;
    for bad in [
        json!({"nursery_size_bytes": 1}),
        json!({"generations": [{"generation": 1, "bytes_consed_between_gcs": 4096}]}),
        json!({"generation-sizes": [2 << 20, 1000]}),
    ] {
        let err = catalog.call("gc_tune", bad.clone()).await.unwrap_err();
        assert!(err.is_usage(), "{bad}: {err}");
        assert!(err.to_string().contains("floor"), "{err}");
        assert!(err.to_string().contains("force"), "{err}");
    }
    assert_eq!(
        nursery(&catalog).await,
        before,
        "a refused value changed nothing"
    );
    // At the floor it is taken; below it only when forced.
    let floor = 1u64 << 20;
    catalog
        .call("gc_tune", json!({"nursery_size_bytes": floor}))
        .await
        .unwrap();
    assert_eq!(nursery(&catalog).await, floor);
    catalog
        .call(
            "gc_tune",
            json!({"nursery_size_bytes": floor / 2, "force": true}),
        )
        .await
        .unwrap();
    assert_eq!(nursery(&catalog).await, floor / 2);
    catalog
        .call("gc_tune", json!({"nursery_size_bytes": before}))
        .await
        .unwrap();
}

#[tokio::test]
async fn audit_log_records_failed_evaluations() {
    let image = Image::start(Setup {
        allow: Allow {
            control: true,
            eval: true,
        },
        ..Setup::default()
    })
    .await;
    let log = image.dir.path().join("audit.jsonl");
    let eval = Allow {
        control: false,
        eval: true,
    };
    let catalog = common::catalog_over(&image, eval, Audit::to_file(&log).unwrap());
    let failed = catalog
        .call("repl_eval", json!({"code": "(error \"boom\")"}))
        .await
        .unwrap();
    assert_eq!(failed["ok"], false);
    let timed_out = catalog
        .call("repl_eval", json!({"code": "(loop)", "timeout_s": 0.5}))
        .await
        .unwrap();
    assert_eq!(timed_out["ok"], false);
    catalog
        .call("repl_eval", json!({"code": "(+ 1 2)"}))
        .await
        .unwrap();
    let entries: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert_eq!(entries[0]["outcome"], "failed");
    assert!(
        entries[0]["error"].as_str().unwrap().contains("boom"),
        "{}",
        entries[0]
    );
    assert_eq!(entries[1]["outcome"], "failed");
    assert!(
        entries[1]["error"].as_str().unwrap().contains("TIMEOUT"),
        "{}",
        entries[1]
    );
    assert_eq!(entries[2]["outcome"], "ok");
    assert!(entries[2].get("error").is_none());
}

#[tokio::test]
async fn rpc_echoes_ids_exactly_and_never_echoes_huge_input() {
    let image = Image::start(Setup::default()).await;
    let sbmon = Sbmon::serve(&image, &[]);
    for id in [
        "18446744073709551616",
        "-99999999999999999999999",
        "1.5",
        "1e400",
        "\"x\"",
    ] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"no_such_tool"}}"#);
        let (_, response) = send(
            reqwest::Method::POST,
            &format!("{}/rpc", sbmon.base),
            &[JSON],
            Some(body),
        )
        .await;
        assert!(
            response.contains(&format!(r#""id":{id}"#)),
            "id {id} came back as {response}"
        );
    }

    let huge = "m".repeat(1_000_000);
    // Each answer quotes the million characters only cut short; a thread-name error also
    // lists the image's live threads, hence its larger bound.
    for (what, method, params, bound) in [
        ("method name", huge.as_str(), json!({}), 2_000),
        (
            "unknown target",
            "memory_stats",
            json!({"target": huge}),
            2_000,
        ),
        (
            "unknown field",
            "memory_stats",
            json!({huge.clone(): 1}),
            2_000,
        ),
        (
            "thread name",
            "thread_inspect",
            json!({"thread_id": huge}),
            4_000,
        ),
    ] {
        let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let (_, answer) = sbmon.post("/rpc", request.to_string()).await;
        let text = answer.to_string();
        assert!(answer["error"].is_object(), "{what}: {text:.300}");
        assert!(text.len() < bound, "{what}: {} bytes echoed", text.len());
        // The cut says how long the quoted text was.
        assert!(text.contains(" chars)"), "{what}: {text}");
    }
}

#[tokio::test]
async fn bad_thread_ids_get_a_clear_message() {
    let image = Image::start(Setup::default()).await;
    let catalog = common::catalog_over(&image, Allow::default(), Audit::default());
    let huge: Value = serde_json::from_str("1000000000000000000000000000000").unwrap();
    for bad in [huge, json!(1.5), json!(true), Value::Null, json!([1])] {
        let err = catalog
            .call("thread_inspect", json!({"thread_id": bad}))
            .await
            .unwrap_err();
        assert!(err.is_usage(), "{bad}: {err}");
        assert!(
            err.to_string()
                .contains("thread_id must be an OS tid (integer) or a thread name")
                || err
                    .to_string()
                    .contains("an OS tid (integer) or a thread name"),
            "{bad}: {err}"
        );
        assert!(!err.to_string().contains("untagged"), "{err}");
    }
}

#[tokio::test]
async fn http_flags_take_localhost_and_refuse_blank_tokens() {
    let image = Image::start(Setup::default()).await;
    let app = format!("app={}", image.sbcl.address);
    // `--http localhost:PORT` is an address people type; it serves on loopback.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args(["serve", "--target", &app, "--http", "localhost:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let first = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .find(|l| l.contains("http://") || l.contains("error"))
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.contains("http://127.0.0.1:"), "{first}");

    let blank = " ".repeat(16);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args([
            "serve",
            "--target",
            &app,
            "--http",
            "127.0.0.1:0",
            "--token",
        ])
        .arg(&blank)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a token of spaces is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("visible ASCII"));

    // With a token, the scheme may be written in any case.
    let token = "0123456789abcdef0123";
    let sbmon = Sbmon::start("serve", &["--target", &app, "--token", token], &[]);
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} {token}");
        let (status, _) = send(
            reqwest::Method::GET,
            &format!("{}/metrics", sbmon.base),
            &[("authorization", &auth)],
            None,
        )
        .await;
        assert_eq!(status, 200, "{scheme}");
    }
    let (status, _) = sbmon.get("/metrics").await;
    assert_eq!(status, 401);
}
