//! Memory over time, against real images running the examples: a leak is called a leak, heavy
//! allocation that is freed and a cache that stopped filling are not, and a target killed
//! mid-window gets no verdict. The sampler runs as under `sbmon serve`, at a 1 s interval.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Image, Setup};
use sbmon::agent::ClientOptions;
use sbmon::config::Config;
use sbmon::samples::Settings;
use sbmon::targets::{Target, Targets};
use sbmon::tools::Catalog;
use sbmon::wire::Sexp;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn example(name: &str) -> Setup {
    let path = format!("{}/examples/{name}.lisp", env!("CARGO_MANIFEST_DIR"));
    Setup {
        forms: vec![format!("(load {})", Sexp::string(path))],
        ..Setup::default()
    }
}

/// What leaky.lisp keeps a second at most: 200 sessions, each a 4-word structure, a
/// 320-fixnum vector (2 header words + 320) and a cons.
const LEAK_AT_MOST: f64 = 200.0 * (32.0 + 8.0 * 322.0 + 16.0);

/// What churn.lisp allocates a second at most: ten ticks of 256 rounds, each a 256-cons list
/// (16 bytes a cons) and a 512-fixnum vector (2 header words + 512).
const CHURN_AT_MOST: f64 = 10.0 * 256.0 * (256.0 * 16.0 + 8.0 * 514.0);

async fn trend(catalog: &Catalog, target: &str) -> Value {
    catalog
        .call("memory_trend", json!({"target": target}))
        .await
        .unwrap_or_else(|e| panic!("memory_trend {target}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaks_are_told_from_churn_caches_and_dead_targets() {
    let (leaky, churn, cache, mut doomed) = tokio::join!(
        Image::start(example("leaky")),
        Image::start(example("churn")),
        Image::start(example("cache")),
        Image::start(example("leaky")),
    );
    let names = ["leaky", "churn", "cache", "doomed"];
    let targets = Arc::new(Targets::new(
        [&leaky, &churn, &cache, &doomed]
            .iter()
            .zip(names)
            .map(|(image, name)| {
                Target::new(name, image.sbcl.address.clone(), ClientOptions::default())
            })
            .collect(),
    ));
    let settings = Settings::new(Duration::from_secs(1), Duration::from_secs(120)).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(sbmon::sampler::run(targets.clone(), settings, stop.clone()));
    let catalog = Catalog::new(targets.clone(), Arc::new(Config::default()));

    let started = Instant::now();
    let mut leak_seen_at = None;
    let mut churn_verdicts = Vec::new();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(70) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let leaky = trend(&catalog, "leaky").await;
        if leak_seen_at.is_none() && leaky["verdict"] == "leak_suspected" {
            leak_seen_at = Some(started.elapsed());
        }
        churn_verdicts.push(trend(&catalog, "churn").await["verdict"].clone());
        if !killed && started.elapsed() > Duration::from_secs(40) {
            doomed.sbcl.stop();
            killed = true;
        }
    }
    stop.cancel();

    // The leak: found within the minute, at the rate the example keeps.
    let seen = leak_seen_at.expect("leaky.lisp was never leak_suspected");
    assert!(seen <= Duration::from_secs(60), "leak found after {seen:?}");
    let leaky = trend(&catalog, "leaky").await;
    assert_eq!(leaky["verdict"], "leak_suspected", "{leaky:#}");
    let rate = leaky["retained_growth"]["slope"].as_f64().unwrap();
    assert!(
        rate > 0.4 * LEAK_AT_MOST && rate < 1.2 * LEAK_AT_MOST,
        "retained growth {rate} B/s, the example keeps at most {LEAK_AT_MOST} B/s"
    );
    assert!(leaky["collections"].as_u64().unwrap() >= 5, "{leaky:#}");
    assert!(leaky["seconds_to_heap_limit"].as_f64().unwrap() > 0.0);

    // Churn allocates far more than the leak keeps, and is never a leak.
    let churn_trend = trend(&catalog, "churn").await;
    assert!(
        !churn_verdicts.iter().any(|v| v == "leak_suspected"),
        "churn was called a leak: {churn_verdicts:?}, last {churn_trend:#}"
    );
    assert_eq!(churn_trend["verdict"], "stable", "{churn_trend:#}");
    let churn_rate = churn_trend["allocation_bytes_per_second"].as_f64().unwrap();
    // The bytes the image counted against what the example can make: all of it (other
    // threads add little), less when the machine slows its ticks.
    assert!(
        churn_rate > 0.5 * CHURN_AT_MOST && churn_rate < 1.1 * CHURN_AT_MOST,
        "churn allocates {churn_rate} B/s, the example at most {CHURN_AT_MOST} B/s"
    );
    assert!(
        churn_rate > 10.0 * LEAK_AT_MOST,
        "churn allocates {churn_rate} B/s"
    );

    // The cache filled in its first ~20 s and has not grown since.
    let cache_trend = trend(&catalog, "cache").await;
    assert_eq!(cache_trend["verdict"], "stable", "{cache_trend:#}");

    // Killed at 40 s: a gap, and no verdict.
    let dead = trend(&catalog, "doomed").await;
    assert_eq!(dead["verdict"], "insufficient_data", "{dead:#}");
    assert!(dead["gaps"].as_u64().unwrap() >= 1, "{dead:#}");

    // The windowed health check and the gauge read the same history.
    let health = catalog
        .call("health_check", json!({"target": "leaky"}))
        .await
        .unwrap();
    let leak = health["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "memory.leak")
        .expect("memory.leak check");
    assert_eq!(leak["status"], "degraded", "{leak:#}");
    let metrics = catalog
        .call("metrics_export", json!({"target": "leaky"}))
        .await
        .unwrap();
    let text = metrics["text"].as_str().unwrap_or_default();
    let gauge = text
        .lines()
        .find(|l| l.starts_with("sbcl_heap_retained_growth_bytes_per_second{"))
        .unwrap_or_else(|| panic!("no growth gauge in {text}"));
    let value: f64 = gauge.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value > 0.4 * LEAK_AT_MOST, "{gauge}");

    // The ring holds at most its capacity: 120 s at 1 s.
    for t in targets.all() {
        assert!(t.history.len() <= 120, "{}: {}", t.name, t.history.len());
    }
}

#[tokio::test]
async fn a_one_shot_call_samples_live_and_says_so() {
    let image = Image::start(example("leaky")).await;
    let catalog = image.catalog();
    let started = Instant::now();
    let t = catalog
        .call("memory_trend", json!({"window_s": 10}))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(10));
    assert_eq!(t["sampling"]["live"], true, "{t:#}");
    assert_eq!(t["samples"], 11, "{t:#}");
    // Ten seconds are too few for any verdict, and the reply says why.
    assert_eq!(t["verdict"], "insufficient_data", "{t:#}");
    assert!(t["reason"].as_str().unwrap().contains("needs 10"), "{t:#}");
    // The heap in use is in resident pages: under what /proc says the process holds.
    let heap_last = t["heap"]["last"].as_u64().unwrap();
    let rss = common::proc_status_bytes(image.pid(), "VmRSS");
    assert!(
        heap_last > 1_000_000 && heap_last < rss,
        "{heap_last} vs RSS {rss}"
    );

    // The health check says what it needs instead of guessing.
    let health = catalog.call("health_check", json!({})).await.unwrap();
    let leak = health["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "memory.leak")
        .unwrap()
        .clone();
    assert_eq!(leak["status"], "unknown");
    assert!(leak["reason"].as_str().unwrap().contains("sbmon serve"));

    for bad in [
        json!({"window_s": 5}),
        json!({"window_s": "ten"}),
        json!({"window": 10}),
    ] {
        let e = catalog.call("memory_trend", bad.clone()).await.unwrap_err();
        assert!(e.is_usage(), "{bad}: {e}");
    }
}
