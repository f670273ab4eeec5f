//! The `sbmon` binary as scripts use it: JSON on stdout, exit codes 0/1/2, target discovery
//! in the runtime directory, and the demo (which must leave no SBCL behind).

mod common;

use std::process::Command;

use common::{Image, Listen, Setup, process_exists, sbmon, text};
use serde_json::Value;

#[tokio::test]
async fn call_prints_json_and_uses_exit_codes() {
    let image = Image::start(Setup {
        runtime_args: vec!["--dynamic-space-size".into(), "256MB".into()],
        forms: vec![common::sleeper("alpha")],
        ..Setup::default()
    })
    .await;
    let nowhere = tempfile::tempdir().unwrap();
    let target = format!("{}", image.sbcl.address);

    let out = sbmon(
        &["call", "memory_stats", "--target", &target],
        nowhere.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["heap_limit_bytes"], 256 * 1024 * 1024);

    let out = sbmon(
        &[
            "call",
            "thread_inspect",
            r#"{"thread_id": "alpha"}"#,
            "--target",
            &target,
        ],
        nowhere.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "alpha");

    // Tool errors: exit 1 with a message on stderr and nothing on stdout.
    let out = sbmon(
        &[
            "call",
            "thread_inspect",
            r#"{"thread_id": "nobody"}"#,
            "--target",
            &target,
        ],
        nowhere.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("no thread named \"nobody\""),
        "{}",
        text(&out.stderr)
    );
    let out = sbmon(
        &[
            "call",
            "memory_stats",
            "--target",
            "unix:/nonexistent/x.sock",
        ],
        nowhere.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out.stderr)
    );

    // Usage errors: exit 2.
    for args in [
        vec!["call", "no_such_tool", "--target", &target],
        vec!["call", "memory_stats", "{not json", "--target", &target],
        vec![
            "call",
            "thread_inspect",
            r#"{"thread_id": 1.5}"#,
            "--target",
            &target,
        ],
        vec!["call", "memory_stats", "--target", "gopher:x"],
        vec!["call", "memory_stats", "--bogus-flag"],
        vec![
            "call",
            "memory_stats",
            "--timeout",
            "-1",
            "--target",
            &target,
        ],
    ] {
        let out = sbmon(&args, nowhere.path());
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty());
    }
}

#[tokio::test]
async fn health_thresholds_come_from_the_config_file() {
    let image = Image::start(Setup::default()).await;
    let nowhere = tempfile::tempdir().unwrap();
    let config = nowhere.path().join("sbmon.toml");
    std::fs::write(
        &config,
        "[health.threads]\ncount = { warning = 1, critical = 2 }\n",
    )
    .unwrap();
    let target = format!("{}", image.sbcl.address);
    let out = sbmon(
        &["call", "health_check", "--target", &target, "--config"],
        nowhere.path(),
    );
    assert_eq!(out.status.code(), Some(2), "--config needs a file");
    let with_config = || {
        sbmon(
            &[
                "call",
                "health_check",
                "--target",
                &target,
                "--config",
                config.to_str().unwrap(),
            ],
            nowhere.path(),
        )
    };
    let out = with_config();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "critical");
    std::fs::write(&config, "[health.threads]\ncont = { warning = 1 }\n").unwrap();
    let out = with_config();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cont"), "{}", text(&out.stderr));
}

#[tokio::test]
async fn targets_are_discovered_in_the_runtime_dir() {
    let runtime = tempfile::tempdir().unwrap();
    let empty = sbmon(&["call", "runtime_stats"], runtime.path());
    assert_eq!(empty.status.code(), Some(1));
    assert!(
        text(&empty.stderr).contains("no live agent"),
        "{}",
        text(&empty.stderr)
    );

    let image = Image::start(Setup {
        // No explicit socket: the agent picks $XDG_RUNTIME_DIR/sbmon/<pid>.sock.
        listen: Listen::AgentDefault,
        env: vec![(
            "XDG_RUNTIME_DIR".into(),
            runtime.path().to_string_lossy().into_owned(),
        )],
        ..Setup::default()
    })
    .await;
    // A socket left by a process that no longer exists.
    std::fs::write(runtime.path().join("sbmon/99999999.sock"), "").unwrap();

    let out = sbmon(&["targets", "--json"], runtime.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let live = rows.iter().find(|r| r["pid"] == image.pid()).unwrap();
    assert_eq!(live["status"], "live");
    assert!(live["lisp_version"].as_str().unwrap().starts_with("2."));
    let stale = rows.iter().find(|r| r["pid"] == 99999999).unwrap();
    assert_eq!(stale["status"], "stale");

    // Without --target the only live agent is used; pid:N names it too.
    let out = sbmon(&["call", "runtime_stats"], runtime.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pid"], image.pid());
    let pid_spec = format!("pid:{}", image.pid());
    let out = sbmon(&["call", "gc_stats", "--target", &pid_spec], runtime.path());
    assert!(out.status.success(), "{}", text(&out.stderr));

    let table = sbmon(&["targets"], runtime.path());
    let table = text(&table.stdout);
    assert!(table.contains("live") && table.contains("stale"), "{table}");
}

#[test]
fn demo_runs_and_stops_its_sbcl() {
    let runtime = tempfile::tempdir().unwrap();
    let out = sbmon(&["demo", "--duration", "5"], runtime.path());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let summaries: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert!(summaries.len() >= 2, "{stdout}");
    assert!(
        summaries
            .iter()
            .all(|l| l.contains("heap") && l.contains("threads")),
        "{stdout}"
    );
    // The workload's contended mutex is named, with the thread holding it, in some line (a
    // reading may fall between two holders).
    assert!(
        summaries
            .iter()
            .any(|l| l.contains("waiting on mutex \"shared-state\" held by worker-")),
        "{stdout}"
    );
    // Whose CPU a figure is.
    assert!(
        summaries
            .iter()
            .all(|l| l.contains("image CPU") && l.contains("busiest thread ")),
        "{stdout}"
    );
    check_final_summary(&stdout);
    let pid: i32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("stopped SBCL pid "))
        .and_then(|p| p.trim().parse().ok())
        .expect("the demo names the SBCL it stopped");
    assert!(!process_exists(pid), "SBCL {pid} left running");
    let leftovers = std::fs::read_dir(runtime.path().join("sbmon"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "socket left behind");
}

/// The summary the demo prints on exit, before it says it stopped SBCL.
fn check_final_summary(stdout: &str) {
    let summary = stdout
        .split_once("summary of ")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no final summary:\n{stdout}"));
    for part in [
        "health: healthy",
        "GCs: ",
        "peak heap seen: ",
        "image CPU: ",
        "most contended mutex: \"shared-state\"",
        "busiest thread: ",
        "stopped SBCL pid",
    ] {
        assert!(summary.contains(part), "{part:?} missing:\n{stdout}");
    }
    // The summary names the holder the readings saw. A short run can catch the waiters only
    // in the instant the holder let go ("held by nobody (just released)"); then it has none.
    let readings = stdout.split_once("summary of ").map_or("", |(r, _)| r);
    let holder = if readings.contains("held by worker-") {
        "held by worker-"
    } else {
        "held by -"
    };
    assert!(summary.contains(holder), "{holder:?} missing:\n{stdout}");
}

#[test]
fn demo_prints_its_summary_when_terminated() {
    use std::io::BufRead;
    let runtime = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args(["demo"])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Two readings, then SIGTERM, as a service manager stops it.
    while seen.iter().filter(|l: &&String| l.starts_with('[')).count() < 2 {
        match lines.next() {
            Some(Ok(line)) => seen.push(line),
            _ => panic!("the demo ended early: {seen:?}"),
        }
    }
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    seen.extend(lines.map_while(Result::ok));
    let status = child.wait().unwrap();
    let stdout = seen.join("\n");
    assert!(status.success(), "{status:?}\n{stdout}");
    check_final_summary(&stdout);
    let pid: i32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("stopped SBCL pid "))
        .and_then(|p| p.trim().parse().ok())
        .expect("the demo names the SBCL it stopped");
    assert!(!process_exists(pid), "SBCL {pid} left running");
}

#[test]
fn tools_lists_the_read_catalog() {
    let runtime = tempfile::tempdir().unwrap();
    let out = sbmon(&["tools"], runtime.path());
    assert!(out.status.success());
    let listing = text(&out.stdout);
    for name in common::READ_TOOLS {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(name) && l.contains("read")),
            "{name} missing:\n{listing}"
        );
    }
    // Control and eval tools are listed only for the classes --allow names, as serve offers.
    assert!(
        !listing.contains("repl_eval") && !listing.contains("memory_gc"),
        "{listing}"
    );
    assert_eq!(
        listing.lines().count(),
        common::READ_TOOLS.len(),
        "{listing}"
    );
    let out = sbmon(&["tools", "--allow", "control"], runtime.path());
    let listing = text(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("memory_gc") && l.contains("control"))
    );
    assert!(!listing.contains("repl_eval"), "{listing}");
}

#[tokio::test]
async fn events_prints_each_collection_the_image_makes() {
    let image = Image::start(Setup {
        collector: true,
        ..Setup::default()
    })
    .await;
    let nowhere = tempfile::tempdir().unwrap();
    let target = format!("{}", image.sbcl.address);

    // Nothing listens there: a clear error at once, not a silent wait.
    let out = sbmon(
        &["events", "--target", "unix:/nonexistent/agent.sock"],
        nowhere.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/agent.sock"));

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args([
            "events",
            "--count",
            "3",
            "--duration",
            "60",
            "--target",
            &target,
        ])
        .env("XDG_RUNTIME_DIR", nowhere.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    // The command subscribes on its own schedule: make garbage until it has printed 3 events.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(50);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "no 3 events");
        image.collect().await;
    }
    assert!(child.wait().unwrap().success());
    let events: Vec<Value> = reader
        .join()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{events:?}");

    // Each event is one of the collections the agent recorded, with the same figures.
    let gc = sbmon(&["call", "gc_stats", "--target", &target], nowhere.path());
    let gc: Value = serde_json::from_slice(&gc.stdout).unwrap();
    let recent = gc["recent"].as_array().unwrap();
    let mut previous = None;
    for e in &events {
        let seq = e["seq"].as_u64().unwrap();
        let r = recent
            .iter()
            .find(|r| r["seq"].as_u64() == Some(seq))
            .unwrap_or_else(|| panic!("seq {seq} not among the recorded pauses"));
        assert_eq!(e["generation"], r["generation"]);
        assert_eq!(e["wall_seconds"], r["wall_seconds"]);
        assert_eq!(e["heap_before_bytes"], r["heap_before"]);
        assert_eq!(e["heap_after_bytes"], r["heap_after"]);
        assert_eq!(e["time"], r["time"]);
        assert!(e["wall_seconds"].as_f64().unwrap() > 0.0);
        // Consecutive collections, none skipped.
        if let Some(p) = previous {
            assert_eq!(seq, p + 1, "{events:?}");
        }
        assert_eq!(e["missed"], 0);
        previous = Some(seq);
    }
}

#[tokio::test]
async fn call_text_prints_the_summary_people_read() {
    let image = Image::start(Setup {
        runtime_args: vec!["--dynamic-space-size".into(), "256MB".into()],
        ..Setup::default()
    })
    .await;
    let nowhere = tempfile::tempdir().unwrap();
    let target = format!("{}", image.sbcl.address);

    let out = sbmon(
        &["call", "--text", "memory_stats", "--target", &target],
        nowhere.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(
        serde_json::from_str::<Value>(&summary).is_err(),
        "JSON: {summary}"
    );
    assert!(summary.contains("of 256 MiB"), "{summary}");
    // "heap 12.3 MiB of 256 MiB": the figure is the one the JSON gives.
    let used: f64 = summary
        .split_once("heap ")
        .and_then(|(_, rest)| rest.split_once(" MiB of"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no heap figure in {summary}"));
    let out = sbmon(
        &["call", "--json", "memory_stats", "--target", &target],
        nowhere.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let json_used = v["heap_used_bytes"].as_f64().unwrap() / 1048576.0;
    assert!((used - json_used).abs() < 4.0, "{used} vs {json_used}");

    // A failing tool: exit 1, the error on stderr, nothing on stdout.
    let out = sbmon(
        &[
            "call",
            "--text",
            "thread_inspect",
            r#"{"thread_id": "nobody"}"#,
            "--target",
            &target,
        ],
        nowhere.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("no thread named \"nobody\""),
        "{}",
        text(&out.stderr)
    );
    // --text and --json together is a usage error.
    let out = sbmon(
        &[
            "call",
            "--text",
            "--json",
            "memory_stats",
            "--target",
            &target,
        ],
        nowhere.path(),
    );
    assert_eq!(out.status.code(), Some(2));
}
