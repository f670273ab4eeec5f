//! `sbmon check`, the Nagios/Icinga plugin: its exit code follows the thresholds of the config
//! file, its status line and performance data parse as the plugin guidelines say, and its
//! figures are the image's.

mod common;

use std::collections::BTreeMap;

use common::{Image, Setup, sbmon, text};
use serde_json::Value;

/// One performance datum: `label=value[UOM];warn;crit;min;max`.
#[derive(Debug)]
struct Perf {
    value: f64,
    uom: String,
    warn: Option<f64>,
    crit: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
}

/// The state word, the text, and the performance data of a plugin's one line of output.
fn parse(stdout: &str) -> (String, String, BTreeMap<String, Perf>) {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stdout:?}");
    let rest = lines[0]
        .strip_prefix("SBMON ")
        .unwrap_or_else(|| panic!("no SBMON prefix: {stdout}"));
    let (state, rest) = rest.split_once(" - ").expect("STATE - text");
    let (message, perf) = rest.split_once(" | ").unwrap_or((rest, ""));
    let optional = |f: &str| (!f.is_empty()).then(|| f.parse::<f64>().expect(f));
    let mut data = BTreeMap::new();
    for item in perf.split_whitespace() {
        let (label, fields) = item.split_once('=').expect("label=value");
        let fields: Vec<&str> = fields.split(';').collect();
        assert_eq!(fields.len(), 5, "value;warn;crit;min;max in {item}");
        let digits = fields[0]
            .trim_end_matches(|c: char| !(c.is_ascii_digit() || c == '.'))
            .len();
        let (value, uom) = fields[0].split_at(digits);
        assert!(
            ["", "s", "%", "B", "KB", "MB", "GB", "TB", "c"].contains(&uom),
            "{item}"
        );
        data.insert(
            label.to_string(),
            Perf {
                value: value.parse().unwrap_or_else(|_| panic!("value of {item}")),
                uom: uom.into(),
                warn: optional(fields[1]),
                crit: optional(fields[2]),
                min: optional(fields[3]),
                max: optional(fields[4]),
            },
        );
    }
    (state.into(), message.into(), data)
}

#[tokio::test]
async fn check_exit_codes_follow_the_config_thresholds() {
    let image = Image::start(Setup {
        runtime_args: vec!["--dynamic-space-size".into(), "256MB".into()],
        forms: vec![common::sleeper("alpha"), common::sleeper("beta")],
        ..Setup::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("{}", image.sbcl.address);
    let config = dir.path().join("sbmon.toml");
    let check = |extra: &[&str]| {
        let mut args = vec!["check", "--target", &target];
        args.extend_from_slice(extra);
        sbmon(&args, dir.path())
    };
    let with_config = |toml: &str| {
        std::fs::write(&config, toml).unwrap();
        check(&["--config", config.to_str().unwrap()])
    };

    // A fresh image: its start-up collections (loading the agent) are not graded as GC time.
    // Default thresholds, an idle image: OK, and the figures are the image's.
    let out = check(&[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let (state, message, perf) = parse(&stdout);
    assert_eq!(state, "OK");
    assert!(message.contains("healthy"), "{message}");
    // Started seconds ago: GC time over its life is not graded yet, but still measured.
    assert!(message.contains("not graded: gc.time"), "{message}");
    for label in [
        "availability.agent",
        "memory.heap",
        "memory.rss",
        "gc.time",
        "threads.count",
        "threads.stuck",
        "resources.fds",
        "availability.errors",
    ] {
        assert!(perf.contains_key(label), "{label} missing: {stdout}");
    }
    let threads = &perf["threads.count"];
    assert_eq!((threads.warn, threads.crit), (Some(100.0), Some(500.0)));
    assert_eq!((threads.min, threads.max), (Some(0.0), None));
    let listed = sbmon(&["call", "thread_list", "--target", &target], dir.path());
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let count = listed["count"].as_f64().unwrap();
    // Each sbmon run has its own agent connection thread; nothing else changes.
    assert!((threads.value - count).abs() <= 1.0, "{stdout} vs {count}");
    let names: Vec<&str> = listed["threads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"alpha") && names.contains(&"beta"),
        "{names:?}"
    );
    let heap = &perf["memory.heap"];
    assert_eq!(
        (heap.warn, heap.crit, heap.min, heap.max),
        (Some(0.7), Some(0.9), Some(0.0), Some(1.0))
    );
    let memory = sbmon(&["call", "memory_stats", "--target", &target], dir.path());
    let memory: Value = serde_json::from_slice(&memory.stdout).unwrap();
    assert_eq!(memory["heap_limit_bytes"], 256 * 1024 * 1024);
    let ratio = memory["heap_used_ratio"].as_f64().unwrap();
    assert!(
        (heap.value - ratio).abs() < 0.02,
        "{} vs {ratio}",
        heap.value
    );
    assert_eq!(perf["availability.agent"].uom, "s");
    assert!(perf["availability.agent"].value < 1.0);

    // A warning threshold below the image's thread count: WARNING, naming the check.
    let out = with_config("[health.threads]\ncount = { warning = 1, critical = 1000 }\n");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let (state, message, perf) = parse(&stdout);
    assert_eq!(state, "WARNING");
    assert!(message.contains("threads.count degraded"), "{message}");
    let threads = &perf["threads.count"];
    assert_eq!((threads.warn, threads.crit), (Some(1.0), Some(1000.0)));

    // A critical one below it: CRITICAL.
    let out = with_config("[health.threads]\ncount = { warning = 1, critical = 2 }\n");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}{}", text(&out.stderr));
    let (state, message, _) = parse(&stdout);
    assert_eq!(state, "CRITICAL");
    assert!(message.contains("threads.count critical"), "{message}");

    // Thresholds above it again: OK again (the state is the file's, not a leftover).
    let out = with_config("[health.threads]\ncount = { warning = 1000, critical = 2000 }\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));

    // A config file with a typo cannot be checked against: UNKNOWN, saying why.
    let out = with_config("[health.threads]\ncont = { warning = 1 }\n");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    let (state, message, _) = parse(&stdout);
    assert_eq!(state, "UNKNOWN");
    assert!(message.contains("cont"), "{message}");

    // `health_check` through `call` still exits 0 whatever the grade.
    std::fs::write(
        &config,
        "[health.threads]\ncount = { warning = 1, critical = 2 }\n",
    )
    .unwrap();
    let out = sbmon(
        &[
            "call",
            "health_check",
            "--target",
            &target,
            "--config",
            config.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "critical");
}

#[test]
fn check_is_unknown_when_it_cannot_check() {
    let empty = tempfile::tempdir().unwrap();
    let gone = "unix:/nonexistent/agent.sock";
    let cases: [(&[&str], &str); 5] = [
        (&["check", "--target", gone], "agent unreachable"),
        // No --target and no agent in the runtime directory.
        (&["check"], "no live agent"),
        (&["check", "--target", "gopher:x"], "gopher"),
        (&["check", "--bogus-flag"], "bad arguments"),
        (&["check", "--timeout", "0", "--target", gone], "timeout"),
    ];
    for (args, says) in cases {
        let out = sbmon(args, empty.path());
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{args:?}: {stdout}{}",
            text(&out.stderr)
        );
        let (state, message, perf) = parse(&stdout);
        assert_eq!(state, "UNKNOWN");
        assert!(message.contains(says), "{args:?}: {message}");
        assert!(perf.is_empty(), "{args:?}: {stdout}");
    }
    // Who wants a silent agent to page as a down service says so.
    let out = sbmon(
        &["check", "--target", gone, "--unreachable", "critical"],
        empty.path(),
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.starts_with("SBMON CRITICAL - "), "{stdout}");
    // Help is not a failure.
    let out = sbmon(&["check", "--help"], empty.path());
    assert_eq!(out.status.code(), Some(0));
}
