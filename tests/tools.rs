//! The read tools against a real SBCL, each figure checked against /proc or against what the
//! test arranged in the image.

mod common;

use common::{Image, Setup, held_mutex, proc_status_bytes, proc_tids, sleeper};
use sbmon::config::Config;
use sbmon::tools::ToolError;
use serde_json::{Value, json};

fn threads_named<'a>(list: &'a Value, name: &str) -> Vec<&'a Value> {
    list["threads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == name)
        .collect()
}

#[tokio::test]
async fn memory_stats_match_the_chosen_heap_and_proc() {
    let image = Image::start(Setup {
        runtime_args: vec!["--dynamic-space-size".into(), "384MB".into()],
        forms: vec![format!(
            "(setf (sb-ext:bytes-consed-between-gcs) {})",
            7 << 20
        )],
        ..Setup::default()
    })
    .await;
    let m = image
        .catalog()
        .call("memory_stats", Value::Null)
        .await
        .unwrap();
    assert_eq!(m["pid"], image.pid());
    assert_eq!(m["heap_limit_bytes"], 384 * 1024 * 1024);
    let used = m["heap_used_bytes"].as_u64().unwrap();
    assert!(used > 1 << 20 && used < 384 << 20, "heap used {used}");
    let ratio = m["heap_used_ratio"].as_f64().unwrap();
    assert!((ratio - used as f64 / (384u64 << 20) as f64).abs() < 1e-9);

    let rss = m["rss_bytes"].as_u64().unwrap() as f64;
    let proc_rss = proc_status_bytes(image.pid(), "VmRSS") as f64;
    assert!(
        (rss - proc_rss).abs() / proc_rss < 0.05,
        "rss {rss} vs /proc {proc_rss}"
    );
    assert!(m["rss_peak_bytes"].as_u64().unwrap() as f64 >= rss);
    assert_eq!(
        m["virtual_bytes"].as_u64().unwrap() / (1 << 20),
        proc_status_bytes(image.pid(), "VmSize") / (1 << 20)
    );

    let gens = m["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 7, "generations 0..6");
    for (i, g) in gens.iter().enumerate() {
        assert_eq!(g["generation"], i);
    }
    let in_gens: u64 = gens.iter().map(|g| g["bytes"].as_u64().unwrap()).sum();
    assert!(
        in_gens <= used,
        "generation bytes {in_gens} exceed heap used {used}"
    );
    assert_eq!(m["nursery_size_bytes"], 7 << 20, "the nursery the test set");
    // The limit is the cgroup's when one is set (the source names its file), else physical
    // memory: read both here, independently of sbmon.
    let limit = m["memory_limit_bytes"].as_u64().unwrap();
    let source = m["memory_limit_source"].as_str().unwrap();
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024;
    if source.starts_with("cgroup") {
        let dir = source.split_once('(').unwrap().1.trim_end_matches(')');
        let file = if source.starts_with("cgroup v2") {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        let text = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        assert_eq!(limit, text.trim().parse::<u64>().unwrap(), "{source}");
        assert!(limit <= mem_total);
    } else {
        assert!(source.starts_with("physical memory"), "{source}");
        assert_eq!(limit, mem_total);
    }
}

#[tokio::test]
async fn gc_counts_and_pauses_rise_when_the_image_collects() {
    let image = Image::start(Setup {
        collector: true,
        ..Setup::default()
    })
    .await;
    let catalog = image.catalog();
    let before = catalog.call("gc_stats", Value::Null).await.unwrap();
    let consed_before =
        catalog.call("memory_stats", Value::Null).await.unwrap()["bytes_consed_total"]
            .as_u64()
            .unwrap();
    let wall_before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    image.collect().await;
    let after = catalog.call("gc_stats", Value::Null).await.unwrap();
    let consed_after =
        catalog.call("memory_stats", Value::Null).await.unwrap()["bytes_consed_total"]
            .as_u64()
            .unwrap();

    assert_eq!(after["gc_count_source"], "n_gcs");
    let count = |v: &Value| v["gc_count"].as_u64().unwrap();
    let pauses = |v: &Value| v["pauses"]["count"].as_u64().unwrap();
    assert!(count(&after) > count(&before), "gc count did not rise");
    assert!(pauses(&after) > pauses(&before), "pause count did not rise");
    // Every collection is timed once: both counters rose by the same amount.
    assert_eq!(
        count(&after) - count(&before),
        pauses(&after) - pauses(&before)
    );
    // The test made 64 MiB of garbage; SBCL's allocation accounting (by region) lands within
    // a fraction of a percent of it.
    assert!(
        consed_after - consed_before >= (64 << 20) * 9 / 10,
        "consed {consed_before} -> {consed_after}"
    );

    let p = &after["pauses"];
    assert_eq!(p["measured"], true);
    let sum = p["sum_seconds"].as_f64().unwrap();
    assert!(sum > before["pauses"]["sum_seconds"].as_f64().unwrap());
    let max = p["max_seconds"].as_f64().unwrap();
    assert!(max > 0.0 && max < 10.0);
    assert!(p["p99_seconds"].as_f64().unwrap() <= max);
    let hist: u64 = p["histogram"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(hist, pauses(&after));

    // The full GC the collector ran is the last recorded, with the heap it freed.
    let recent = after["recent"].as_array().unwrap();
    let full = recent
        .iter()
        .rev()
        .find(|r| r["generation"].as_u64().unwrap() >= 5)
        .expect("a recorded full collection");
    assert!(full["wall_seconds"].as_f64().unwrap() > 0.0);
    assert!(full["heap_before"].as_u64().unwrap() > full["heap_after"].as_u64().unwrap());
    assert!(
        after["gc_cpu_seconds"].as_f64().unwrap() >= before["gc_cpu_seconds"].as_f64().unwrap()
    );
    // GC CPU is part of the process's CPU, as the kernel counts it.
    let process_cpu = common::proc_cpu_seconds(&format!("/proc/{}/stat", image.pid()));
    assert!(after["gc_cpu_seconds"].as_f64().unwrap() <= process_cpu + 0.02);
    // The last collection happened while the test waited for it, by the test's own clock.
    let wall_after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = after["last_gc_time"].as_f64().unwrap();
    assert!(
        last >= wall_before - 0.01 && last <= wall_after + 0.01,
        "{last}"
    );
    // The summaries agree with the records they summarize.
    let by_generation: u64 = after["collections_by_generation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["count"].as_u64().unwrap())
        .sum();
    assert_eq!(by_generation, pauses(&after));
    let freed: i64 = recent
        .iter()
        .map(|r| r["heap_before"].as_i64().unwrap() - r["heap_after"].as_i64().unwrap())
        .sum();
    assert_eq!(after["bytes_freed_recent"], freed);
    assert_eq!(recent.last().unwrap()["time"].as_f64().unwrap(), last);
}

#[tokio::test]
async fn thread_list_matches_proc_and_shows_mutex_waits() {
    let image = Image::start(Setup {
        forms: vec![
            sleeper("alpha"),
            sleeper("beta"),
            held_mutex("test-lock", "holder", "waiter"),
        ],
        ..Setup::default()
    })
    .await;
    let list = image
        .catalog()
        .call("thread_list", Value::Null)
        .await
        .unwrap();
    let tids = proc_tids(image.pid());
    for name in ["alpha", "beta", "holder", "waiter"] {
        let found = threads_named(&list, name);
        assert_eq!(found.len(), 1, "{name}");
        let tid = found[0]["tid"].as_i64().unwrap() as i32;
        assert!(
            tids.contains(&tid),
            "{name}'s tid {tid} not in /proc ({tids:?})"
        );
        assert_eq!(found[0]["main"], false);
        assert!(found[0]["os_state"].is_string());
    }
    let waiter = threads_named(&list, "waiter")[0];
    assert_eq!(waiter["lisp_wait"], "test-lock");
    assert_eq!(waiter["lisp_wait_type"], "mutex");
    assert_eq!(threads_named(&list, "holder")[0]["lisp_wait"], Value::Null);
    assert_eq!(threads_named(&list, "alpha")[0]["lisp_wait"], Value::Null);
    // Per-thread CPU as the kernel counts it (the sleeper barely moves meanwhile).
    let alpha = threads_named(&list, "alpha")[0];
    let stat = format!("/proc/{}/task/{}/stat", image.pid(), alpha["tid"]);
    let cpu = alpha["cpu_seconds"].as_f64().unwrap();
    assert!(
        (cpu - common::proc_cpu_seconds(&stat)).abs() <= 0.05,
        "{cpu}"
    );

    let threads = list["threads"].as_array().unwrap();
    let main: Vec<_> = threads.iter().filter(|t| t["main"] == true).collect();
    assert_eq!(main.len(), 1);
    assert_eq!(
        main[0]["tid"],
        image.pid(),
        "the main thread's tid is the pid"
    );
    assert!(threads.iter().any(|t| t["agent"] == true));

    // Lisp threads plus OS-only tasks are exactly the tasks of the process. Agent connection
    // threads come and go, so retry until a listing and /proc agree.
    let all_tids = |list: &Value| {
        let mut all: Vec<i32> = list["threads"]
            .as_array()
            .unwrap()
            .iter()
            .chain(list["os_only_threads"].as_array().unwrap())
            .filter_map(|t| t["tid"].as_i64())
            .map(|t| t as i32)
            .collect();
        all.sort();
        all
    };
    let mut last = (vec![], vec![]);
    for _ in 0..20 {
        let list = image
            .catalog()
            .call("thread_list", Value::Null)
            .await
            .unwrap();
        last = (all_tids(&list), proc_tids(image.pid()));
        if last.0 == last.1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(last.0, last.1, "thread_list vs /proc/PID/task");
}

#[tokio::test]
async fn thread_inspect_finds_threads_by_name_or_tid() {
    let image = Image::start(Setup {
        forms: vec![sleeper("alpha"), sleeper("twin"), sleeper("twin")],
        ..Setup::default()
    })
    .await;
    let catalog = image.catalog();
    let alpha = catalog
        .call(
            "thread_inspect",
            json!({"thread_id": "alpha", "max_frames": 30}),
        )
        .await
        .unwrap();
    assert_eq!(alpha["name"], "alpha");
    assert_eq!(alpha["answered"], true);
    let frames = alpha["frames"].as_array().unwrap();
    assert!(!frames.is_empty() && frames.len() <= 30);
    assert!(
        frames
            .iter()
            .any(|f| f.as_str().unwrap().contains("SBMON-TEST-SLEEPER")),
        "{frames:?}"
    );
    let tid = alpha["tid"].as_i64().unwrap();
    assert!(proc_tids(image.pid()).contains(&(tid as i32)));

    // The seed guide's spelling, and a tid instead of a name.
    let by_tid = catalog
        .call("thread_inspect", json!({"thread-id": tid, "max_frames": 1}))
        .await
        .unwrap();
    assert_eq!(by_tid["name"], "alpha");
    assert_eq!(by_tid["frames"].as_array().unwrap().len(), 1);
    assert_eq!(by_tid["truncated"], true);

    let err = catalog
        .call("thread_inspect", json!({"thread_id": "twin"}))
        .await
        .unwrap_err();
    assert!(matches!(err, ToolError::AmbiguousThread { .. }), "{err}");
    let err = catalog
        .call("thread_inspect", json!({"thread_id": "nobody"}))
        .await
        .unwrap_err();
    assert!(matches!(err, ToolError::UnknownThread { .. }), "{err}");
    assert!(
        err.to_string().contains("alpha"),
        "lists the live threads: {err}"
    );
    for bad in [
        json!({}),
        json!({"thread_id": 1.5}),
        json!({"thread_id": "alpha", "max_frames": 0}),
        json!({"thread_id": "alpha", "colour": 1}),
        json!([1]),
    ] {
        let err = catalog
            .call("thread_inspect", bad.clone())
            .await
            .unwrap_err();
        assert!(err.is_usage(), "{bad} gave {err}");
    }
}

#[tokio::test]
async fn thread_dump_reports_deaf_threads_without_waiting_for_them() {
    let image = Image::start(Setup {
        forms: vec![sleeper("alpha"), common::deaf_thread("deaf")],
        ..Setup::default()
    })
    .await;
    let catalog = image.catalog();
    let started = std::time::Instant::now();
    let dump = catalog
        .call(
            "thread_dump_all",
            json!({"timeout_ms": 500, "max_frames": 20}),
        )
        .await
        .unwrap();
    // Bounded: the deaf thread costs the timeout, not forever (generous margin for CI).
    assert!(started.elapsed().as_secs_f64() < 5.0);
    let threads = dump["threads"].as_array().unwrap();
    // Every thread of the image is in the dump (the dump may add the agent worker doing it).
    let list = catalog.call("thread_list", Value::Null).await.unwrap();
    for t in list["threads"].as_array().unwrap() {
        if t["agent"] == false {
            assert!(
                threads.iter().any(|d| d["tid"] == t["tid"]),
                "{t} missing from the dump"
            );
        }
    }
    let by_name = |n: &str| threads.iter().find(|t| t["name"] == n).unwrap();
    assert_eq!(by_name("deaf")["answered"], false);
    assert_eq!(by_name("alpha")["answered"], true);
    assert!(
        by_name("alpha")["frames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("SBMON-TEST-SLEEPER"))
    );
    // Only the deaf thread stays silent; an agent connection thread that is just exiting
    // may also not answer, which is no concern of the test's threads.
    let silent: Vec<&str> = threads
        .iter()
        .filter(|t| t["answered"] == false)
        .map(|t| t["name"].as_str().unwrap_or(""))
        .collect();
    assert!(
        silent
            .iter()
            .all(|n| *n == "deaf" || n.starts_with("sbmon-agent")),
        "{silent:?}"
    );
    assert_eq!(dump["unanswered"], silent.len());
    // The agent still answers afterwards.
    catalog.call("memory_stats", Value::Null).await.unwrap();
}

#[tokio::test]
async fn runtime_stats_match_proc() {
    let image = Image::start(Setup::default()).await;
    let catalog = image.catalog();
    let rt = catalog.call("runtime_stats", Value::Null).await.unwrap();
    assert_eq!(rt["pid"], image.pid());
    let sbcl_version = std::process::Command::new("sbcl")
        .arg("--version")
        .output()
        .unwrap();
    let sbcl_version = String::from_utf8_lossy(&sbcl_version.stdout);
    assert_eq!(
        sbcl_version.trim(),
        format!("SBCL {}", rt["lisp_version"].as_str().unwrap())
    );
    assert_eq!(rt["lisp_implementation"], "SBCL");
    assert_eq!(rt["agent_version"], "0.1.0");
    let fds = std::fs::read_dir(format!("/proc/{}/fd", image.pid()))
        .unwrap()
        .count() as i64;
    assert!((rt["open_fds"].as_i64().unwrap() - fds).abs() <= 2, "{rt}");
    assert!(
        rt["socket_count"].as_u64().unwrap() >= 2,
        "listener + our connection"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", image.pid())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(rt["max_fds"], soft);
    // Agent connection threads come and go (the launcher's readiness probe, for one): retry
    // until the readings agree rather than compare a moving count once.
    let mut agreed = false;
    for _ in 0..20 {
        let list = catalog.call("thread_list", Value::Null).await.unwrap();
        let again = catalog.call("runtime_stats", Value::Null).await.unwrap();
        let tasks = proc_tids(image.pid()).len();
        if again["thread_count"] == list["count"]
            && again["os_thread_count"].as_u64() == Some(tasks as u64)
        {
            agreed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(agreed, "thread counts never matched thread_list and /proc");
    let uptime = rt["uptime_seconds"].as_f64().unwrap();
    assert!(uptime > 0.0 && uptime < 120.0, "uptime {uptime}");
    assert!(rt["package_count"].as_u64().unwrap() > 20);
    assert!(
        rt["features"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "SB-THREAD")
    );
    let cpu = rt["cpu_user_seconds"].as_f64().unwrap() + rt["cpu_system_seconds"].as_f64().unwrap();
    assert!(cpu > 0.0 && cpu < uptime * 2.0 + 1.0);
}

#[tokio::test]
async fn health_check_grades_against_configured_thresholds() {
    let image = Image::start(Setup::default()).await;
    let healthy = image
        .catalog()
        .call("health_check", Value::Null)
        .await
        .unwrap();
    assert_eq!(healthy["status"], "healthy", "{healthy:#}");
    let names: Vec<&str> = healthy["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "availability.agent",
            "memory.heap",
            "memory.rss",
            "gc.time",
            "threads.count",
            "threads.stuck",
            "resources.fds",
            "memory.leak",
            "availability.errors"
        ]
    );
    let heap = healthy["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "memory.heap")
        .unwrap();
    let observed = heap["observed"].as_f64().unwrap();
    assert!(observed > 0.0 && observed < 0.7);

    // Thresholds far below what the image shows (a GC between the calls cannot undercut
    // them): the heap turns critical, threads degraded.
    let config = Config::parse(&format!(
        "[health.memory]\nheap = {{ warning = {w}, critical = {c} }}\n\
         [health.threads]\ncount = {{ warning = 2, critical = 1000 }}\n",
        w = observed / 100.0,
        c = observed / 50.0
    ))
    .unwrap();
    let report = image
        .catalog_with(config)
        .call("health_check", Value::Null)
        .await
        .unwrap();
    assert_eq!(report["status"], "critical");
    let status = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status("memory.heap"), "critical");
    assert_eq!(status("threads.count"), "degraded");
    assert_eq!(status("memory.rss"), "healthy");
}

#[tokio::test]
async fn health_check_of_a_dead_image_is_critical() {
    let mut image = Image::start(Setup::default()).await;
    let catalog = image.catalog();
    image.sbcl.stop();
    let report = catalog.call("health_check", Value::Null).await.unwrap();
    assert_eq!(report["status"], "critical");
    let agent = &report["checks"][0];
    assert_eq!(agent["name"], "availability.agent");
    assert_eq!(agent["status"], "critical");
    assert!(agent["reason"].as_str().unwrap().contains("unreachable"));
    // Other tools fail with an error that says what to do, not a panic.
    let err = catalog.call("memory_stats", Value::Null).await.unwrap_err();
    assert!(err.to_string().contains("(sbmon-agent:start)"), "{err}");
}

#[tokio::test]
async fn gc_watch_reports_the_collections_the_test_makes() {
    let image = Image::start(Setup {
        collector: true,
        ..Setup::default()
    })
    .await;
    let catalog = image.catalog();

    for bad in [
        json!({"seconds": 0}),
        json!({"seconds": 61}),
        json!({"max_events": 0}),
        json!({"max_events": 1001}),
        json!({"seconds": "ten"}),
    ] {
        let err = catalog.call("gc_watch", bad.clone()).await.unwrap_err();
        assert!(err.is_usage(), "{bad}: {err}");
    }

    // A window in which the test makes garbage: the watch ends at max_events.
    let watch = catalog.call("gc_watch", json!({"seconds": 30, "max_events": 3}));
    let make_garbage = async {
        loop {
            image.collect().await;
        }
    };
    let watched = tokio::select! {
        w = watch => w.unwrap(),
        () = make_garbage => unreachable!(),
    };
    assert_eq!(watched["count"], 3, "{watched}");
    assert!(watched["seconds"].as_f64().unwrap() < 30.0);
    let events = watched["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    let wall: Vec<f64> = events
        .iter()
        .map(|e| e["wall_seconds"].as_f64().unwrap())
        .collect();
    assert_eq!(
        watched["pause_sum_seconds"].as_f64().unwrap(),
        wall.iter().sum::<f64>()
    );
    assert_eq!(
        watched["pause_max_seconds"].as_f64().unwrap(),
        wall.iter().cloned().fold(0.0, f64::max)
    );
    // Each event is the agent's own record of that collection, and none was skipped.
    let stats = catalog.call("gc_stats", Value::Null).await.unwrap();
    let recent = stats["recent"].as_array().unwrap();
    for pair in events.windows(2) {
        assert_eq!(
            pair[1]["seq"].as_u64(),
            pair[0]["seq"].as_u64().map(|s| s + 1)
        );
    }
    for e in events {
        let r = recent
            .iter()
            .find(|r| r["seq"] == e["seq"])
            .unwrap_or_else(|| panic!("{e} not among the recorded pauses"));
        assert_eq!(e["wall_seconds"], r["wall_seconds"]);
        assert_eq!(e["cpu_seconds"], r["cpu_seconds"]);
        assert_eq!(e["heap_before_bytes"], r["heap_before"]);
        assert_eq!(e["heap_after_bytes"], r["heap_after"]);
        assert_eq!(e["time"], r["time"]);
        assert_eq!(
            e["freed_bytes"].as_i64().unwrap(),
            r["heap_before"].as_i64().unwrap() - r["heap_after"].as_i64().unwrap()
        );
    }
    assert_eq!(
        watched["freed_bytes"].as_i64().unwrap(),
        events
            .iter()
            .map(|e| e["freed_bytes"].as_i64().unwrap())
            .sum::<i64>()
    );
    assert_eq!(watched["missed"], 0);

    // A short window ends on time whatever happens in it.
    let quiet = catalog
        .call("gc_watch", json!({"seconds": 0.5}))
        .await
        .unwrap();
    let seconds = quiet["seconds"].as_f64().unwrap();
    assert!((0.5..5.0).contains(&seconds), "{quiet}");
    assert_eq!(
        quiet["count"].as_u64(),
        Some(quiet["events"].as_array().unwrap().len() as u64)
    );
}
