//! Faults of a watched image while `sbmon serve` works: the image killed in the middle of a
//! stream of calls, stopped (SIGSTOP) for 10 s and continued, its agent stopped and started
//! again, its socket file deleted. Each time every call is answered or fails with a clear
//! error within its timeout, `/health/live` and the other target are unaffected, and sbmon
//! recovers by itself. Signals go only to the SBCL children this test started.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Image, Sbmon, Setup};
use sbmon::agent::{AgentClient, ClientOptions};
use serde_json::{Value, json};

/// `--timeout` of the sbmon under test: how long one agent call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// What a failing call may take beyond its timeout (HTTP, a reconnect attempt, a loaded
/// machine) before the test calls it a hang.
const SLACK: Duration = Duration::from_secs(5);

fn serve(app: &Image, other: &Image) -> Sbmon {
    let app = format!("app={}", app.sbcl.address);
    let other = format!("other={}", other.sbcl.address);
    let timeout = CALL_TIMEOUT.as_secs().to_string();
    Sbmon::start(
        "serve",
        &["--target", &app, "--target", &other, "--timeout", &timeout],
        &[],
    )
}

/// One `/rpc` call of `memory_stats` on `target` with id `id`: the answer, and how long it
/// took. The HTTP client gives up well past the call's own bound, so a hang shows as an
/// `Err` here instead of stalling the test.
async fn memory_stats(base: &str, target: &str, id: u64) -> (Result<Value, String>, Duration) {
    let started = Instant::now();
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "memory_stats",
                      "params": {"target": target}});
    let outcome = async {
        let response = reqwest::Client::new()
            .post(format!("{base}/rpc"))
            .header("content-type", "application/json")
            .timeout(CALL_TIMEOUT + SLACK * 2)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| format!("no HTTP answer: {e}"))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("HTTP {status}: {text}"));
        }
        serde_json::from_str::<Value>(&text).map_err(|e| format!("{e}: {text}"))
    }
    .await;
    (outcome, started.elapsed())
}

/// The answer's `result`, or the error message of a well-formed JSON-RPC error for `id`.
fn result_or_error(answer: &Value, id: u64) -> Result<&Value, String> {
    assert_eq!(
        answer["id"],
        json!(id),
        "a reply for another call: {answer}"
    );
    assert_eq!(answer["jsonrpc"], "2.0", "{answer}");
    if let Some(result) = answer.get("result") {
        return Ok(result);
    }
    let error = &answer["error"];
    assert_eq!(error["code"], -32000, "a tool failure: {answer}");
    Err(error["message"].as_str().expect("a message").to_string())
}

async fn assert_serving(sbmon: &Sbmon, other: &Image) {
    let (status, body) = sbmon.get("/health/live").await;
    assert_eq!(status, 200, "/health/live: {body}");
    let (answer, _) = memory_stats(&sbmon.base, "other", 1).await;
    let answer = answer.expect("the other target answers");
    let result = result_or_error(&answer, 1).expect("the other target's memory_stats works");
    // Its figures are the other image's: its pid, as the test started it.
    assert_eq!(result["pid"], json!(other.pid()), "{result}");
}

fn all_threads_stopped(pid: i32) -> bool {
    common::proc_tids(pid).iter().all(|tid| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('T')
        })
    })
}

#[tokio::test]
async fn sigkill_in_a_stream_of_calls_fails_each_call_cleanly() {
    let (app, other) = tokio::join!(
        Image::start(Setup::default()),
        Image::start(Setup::default())
    );
    let sbmon = Arc::new(serve(&app, &other));
    let stop = Arc::new(AtomicBool::new(false));
    // 8 callers, each a stream of calls with ids of its own.
    let callers: Vec<_> = (0..8u64)
        .map(|caller| {
            let (sbmon, stop) = (sbmon.clone(), stop.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let id = caller * 1_000_000 + n;
                    n += 1;
                    let (answer, took) = memory_stats(&sbmon.base, "app", id).await;
                    let answer = answer.unwrap_or_else(|e| panic!("call {id}: {e}"));
                    let outcome = result_or_error(&answer, id).map(|_| ());
                    outcomes.push((outcome, took, Instant::now()));
                }
                outcomes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let killed_at = Instant::now();
    // SAFETY: a signal to the SBCL child this test started.
    assert_eq!(unsafe { libc::kill(app.pid(), libc::SIGKILL) }, 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);

    let (mut before, mut after, mut failures) = (0, 0, Vec::new());
    for caller in callers {
        for (outcome, took, at) in caller.await.expect("a caller panicked") {
            assert!(
                took <= CALL_TIMEOUT + SLACK,
                "a call took {took:?}, beyond its timeout"
            );
            match outcome {
                Ok(()) if at < killed_at => before += 1,
                Ok(()) => {}
                Err(message) => {
                    after += 1;
                    failures.push(message);
                }
            }
        }
    }
    println!("{before} calls answered before the kill, {after} failed after it");
    assert!(before > 0, "no call succeeded before the kill");
    assert!(after > 0, "no call failed after the kill");
    for message in &failures {
        assert!(
            message.contains("lost the connection to the agent")
                || message.contains("cannot connect to the agent")
                || message.contains("the SBCL image exited"),
            "an unclear error: {message}"
        );
    }

    let (status, body) = sbmon.get("/health/targets/app").await;
    assert_eq!(status, 503, "a killed image is critical: {body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["status"], "critical", "{report}");
    assert_serving(&sbmon, &other).await;
}

#[tokio::test]
async fn sigstop_times_calls_out_and_sigcont_brings_them_back() {
    let (app, other) = tokio::join!(
        Image::start(Setup::default()),
        Image::start(Setup::default())
    );
    let sbmon = serve(&app, &other);
    let (answer, _) = memory_stats(&sbmon.base, "app", 1).await;
    result_or_error(&answer.unwrap(), 1).expect("app answers before the stop");

    // SAFETY: signals to the SBCL child this test started.
    assert_eq!(unsafe { libc::kill(app.pid(), libc::SIGSTOP) }, 0);
    while !all_threads_stopped(app.pid()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped_at = Instant::now();
    let mut id = 100;
    let mut timeouts = 0;
    while stopped_at.elapsed() < Duration::from_secs(10) {
        id += 1;
        let (answer, took) = memory_stats(&sbmon.base, "app", id).await;
        let message = result_or_error(&answer.unwrap(), id).expect_err("a stopped image answered");
        assert!(
            message.contains("did not answer memory within"),
            "not a clear timeout: {message}"
        );
        assert!(
            took >= CALL_TIMEOUT,
            "gave up after {took:?}, before the timeout"
        );
        assert!(took <= CALL_TIMEOUT + SLACK, "took {took:?}");
        timeouts += 1;
        // Meanwhile sbmon itself and the other image are served as usual.
        assert_serving(&sbmon, &other).await;
    }
    let (status, _) = sbmon.get("/health/targets/app").await;
    assert_eq!(status, 503, "a stopped image is critical");
    println!("{timeouts} calls timed out cleanly during the 10 s stop");

    assert_eq!(unsafe { libc::kill(app.pid(), libc::SIGCONT) }, 0);
    let continued = Instant::now();
    let mut first = None;
    while continued.elapsed() < Duration::from_secs(20) {
        id += 1;
        let (answer, _) = memory_stats(&sbmon.base, "app", id).await;
        if result_or_error(&answer.unwrap(), id).is_ok() {
            first = Some(continued.elapsed());
            break;
        }
    }
    let first = first.expect("calls work again after SIGCONT");
    println!("first answer {first:?} after SIGCONT");
    // And keep working: the late replies to the timed-out calls are not taken for new ones.
    for _ in 0..20 {
        id += 1;
        let (answer, _) = memory_stats(&sbmon.base, "app", id).await;
        result_or_error(&answer.unwrap(), id).expect("app answers after SIGCONT");
    }
    let (status, body) = sbmon.get("/health/targets/app").await;
    assert_eq!(status, 200, "{body}");
}

/// A thread of the image that stops its agent and starts it again on the same socket
/// whenever the file `<dir>/restart` appears (as an operator would at the REPL), then removes
/// the file.
fn restarter(image_dir: &std::path::Path) -> String {
    let trigger = image_dir.join("restart");
    let socket = image_dir.join("agent.sock");
    format!(
        r#"(sb-thread:make-thread
             (lambda ()
               (loop
                 (when (probe-file {trigger})
                   (sbmon-agent:stop)
                   (sbmon-agent:start :socket {socket})
                   (delete-file {trigger}))
                 (sleep 0.005)))
             :name "test-restarter")"#,
        trigger = sbmon::wire::Sexp::string(trigger.to_string_lossy()),
        socket = sbmon::wire::Sexp::string(socket.to_string_lossy()),
    )
}

/// The name of the agent's connection thread that serves sbmon (one connection per target).
async fn connection_thread(sbmon: &Sbmon) -> String {
    let answer = sbmon
        .rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "thread_list", "params": {"target": "app"}}))
        .await;
    let names: Vec<String> = answer["result"]["threads"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .filter_map(|t| t["name"].as_str())
        .filter(|n| n.starts_with("sbmon-agent conn"))
        .map(str::to_string)
        .collect();
    assert_eq!(names.len(), 1, "one connection from sbmon: {names:?}");
    names[0].clone()
}

#[tokio::test]
async fn sbmon_reconnects_by_itself_after_the_agent_restarts() {
    // The image's temp dir is made inside Image::start; the restarter needs its path first,
    // so it gets a directory of its own and the agent listens there.
    let dir = tempfile::tempdir().unwrap();
    let address = sbmon::agent::Address::Unix(dir.path().join("agent.sock"));
    let (app, other) = tokio::join!(
        Image::start(Setup {
            forms: vec![restarter(dir.path())],
            listen: common::Listen::At(address),
            ..Setup::default()
        }),
        Image::start(Setup::default())
    );
    let sbmon = serve(&app, &other);
    let before = connection_thread(&sbmon).await;

    let mut outages = Vec::new();
    let mut id = 10;
    for round in 0..5 {
        std::fs::write(dir.path().join("restart"), "").unwrap();
        let asked_at = Instant::now();
        // Callers keep calling every 10 ms; the agent is back when the trigger is gone.
        let mut back_at = None;
        let mut failed = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        let answered_at = loop {
            assert!(
                Instant::now() < deadline,
                "no answer 30 s after the restart"
            );
            if back_at.is_none() && !dir.path().join("restart").exists() {
                back_at = Some(Instant::now());
            }
            id += 1;
            let (answer, took) = memory_stats(&sbmon.base, "app", id).await;
            assert!(took <= CALL_TIMEOUT + SLACK, "a call took {took:?}");
            match result_or_error(&answer.unwrap(), id) {
                Ok(_) if back_at.is_some() => break Instant::now(),
                Ok(_) => {}
                Err(message) => {
                    failed += 1;
                    assert!(
                        message.contains("lost the connection to the agent")
                            || message.contains("cannot connect to the agent"),
                        "unclear: {message}"
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let reconnect = answered_at - back_at.unwrap();
        println!(
            "restart {round}: first answer {reconnect:?} after the agent was back, {:?} after \
             the restart was asked for ({failed} calls failed meanwhile)",
            answered_at - asked_at
        );
        outages.push(reconnect);
    }
    outages.sort();
    println!(
        "reconnect after an agent restart: median {:?}, max {:?} (5 restarts, a call every 10 ms)",
        outages[2], outages[4]
    );
    let after = connection_thread(&sbmon).await;
    assert_ne!(before, after, "sbmon answers over a new connection");
    let (status, body) = sbmon.get("/health/targets/app").await;
    assert_eq!(status, 200, "{body}");
    assert_serving(&sbmon, &other).await;
}

#[tokio::test]
async fn a_deleted_socket_file_gives_a_clear_error_until_the_agent_makes_it_again() {
    let (app, other) = tokio::join!(
        Image::start(Setup::default()),
        Image::start(Setup::default())
    );
    let sbmon = serve(&app, &other);
    let (answer, _) = memory_stats(&sbmon.base, "app", 1).await;
    result_or_error(&answer.unwrap(), 1).expect("app answers");
    let sbmon::agent::Address::Unix(path) = app.sbcl.address.clone() else {
        panic!("a Unix agent")
    };

    // A new client in the gap: the agent re-makes the file within a second, so try again
    // when the gap closed before the client got there.
    let mut refused = None;
    for _ in 0..20 {
        std::fs::remove_file(&path).unwrap();
        let client = AgentClient::new(app.sbcl.address.clone(), ClientOptions::default());
        match client.ping().await {
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
            Ok(_) => wait_for_file(&path).await,
        }
    }
    let refused = refused.expect("a client found no socket while the file was gone");
    assert!(
        refused.contains("cannot connect to the agent at")
            && refused.contains(path.to_str().unwrap())
            && refused.contains("No such file"),
        "{refused}"
    );
    // The CLI says the same, with its exit code for a failed tool.
    let mut cli = None;
    for _ in 0..20 {
        wait_for_file(&path).await;
        std::fs::remove_file(&path).unwrap();
        let target = format!("unix:{}", path.display());
        let out = common::sbmon(
            &["call", "--target", &target, "memory_stats"],
            app.dir.path(),
        );
        if !out.status.success() {
            cli = Some(out);
            break;
        }
    }
    let out = cli.expect("the CLI ran while the file was gone");
    let stderr = common::text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No such file"), "{stderr}");
    assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");

    // sbmon's connection made before the deletion never needed the file: it keeps answering.
    let (answer, _) = memory_stats(&sbmon.base, "app", 2).await;
    result_or_error(&answer.unwrap(), 2).expect("the open connection still answers");

    // Then the agent makes the file again, private as before, and new clients connect.
    wait_for_file(&path).await;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let client = AgentClient::new(app.sbcl.address.clone(), ClientOptions::default());
    client.ping().await.expect("a new client connects again");
    let out = common::sbmon(
        &[
            "call",
            "--target",
            &format!("unix:{}", path.display()),
            "memory_stats",
        ],
        app.dir.path(),
    );
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    assert_serving(&sbmon, &other).await;
}

/// Wait (up to 10 s) until the agent has made its socket file again.
async fn wait_for_file(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent did not make {} again",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
