//! What the event journal costs: the time to record and classify one event (clip its strings,
//! bound its data, sequence it, route it to its bucket by severity, expire and evict, hand it
//! to followers), and the memory one event takes. The watcher and the catalog record events
//! on their own paths, so this is paid per event, forever; the budget is 1 ms.
//!
//! Figures for `tools/bench`: `record`, `record_oversized`, `recent_50` (`.p50`, `.p99` µs,
//! `.rate`), `memory.typical_per_event`, `memory.oversized_per_event` (bytes).
//!
//! Run: `cargo bench --bench journal` (ITERATIONS=N to change the sample size).

use std::time::{Duration, Instant};

use sbmon::config::JournalConfig;
use sbmon::journal::{Filter, Journal, MAX_EVENT_BYTES, NewEvent, Severity};
use serde_json::json;
use support::Latencies;

mod support;

const BENCH: &str = "journal";

/// An event like the watcher's: a health change with its figures.
fn health_change(i: usize) -> NewEvent {
    NewEvent::new(
        Some("orders"),
        "health.threads.count",
        if i.is_multiple_of(3) {
            Severity::Warning
        } else {
            Severity::Info
        },
        format!(
            "orders: threads.count went from healthy to degraded: {i} Lisp threads, 0 waiting on a lock"
        ),
        json!({
            "check": "threads.count", "from": "healthy", "to": "degraded",
            "observed": i as f64, "warning": 100.0, "critical": 500.0,
            "reason": format!("{i} Lisp threads, 0 waiting on a lock"),
        }),
    )
}

/// The worst an event can be: every field far over its bound.
fn oversized() -> NewEvent {
    let huge = "x".repeat(100_000);
    NewEvent::new(
        Some(&huge),
        huge.clone(),
        Severity::Critical,
        huge.clone(),
        json!({"text": huge, "list": vec![1; 10_000]}),
    )
}

fn time(iterations: usize, mut f: impl FnMut(usize)) -> Latencies {
    for i in 0..iterations / 10 {
        f(i);
    }
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let start = Instant::now();
        f(i);
        samples.push(start.elapsed());
    }
    Latencies::new(samples)
}

fn report(what: &str, l: &Latencies) {
    println!(
        "{what}: p50 {:.2} µs, p99 {:.2} µs, max {:.2} µs ({} events)",
        l.micros(0.5),
        l.micros(0.99),
        l.micros(1.0),
        l.len()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let iterations = support::iterations(100_000);
    let journal = Journal::new(JournalConfig::default());
    // A follower, as /events or an MCP session holds one; it drains as it would.
    let mut follower = journal.follow();
    let typical = time(iterations, |i| {
        journal.record(health_change(i));
        while follower.try_recv().is_ok() {}
    });
    report("record one event (full buckets, one follower)", &typical);
    support::record_latencies(BENCH, "record", &typical);
    let worst = time(iterations / 10, |_| {
        journal.record(oversized());
        while follower.try_recv().is_ok() {}
    });
    report("record one oversized event (clipped to its bound)", &worst);
    support::record_latencies(BENCH, "record_oversized", &worst);
    let read = time(iterations / 100, |_| {
        journal.recent(&Filter {
            severity: Some(Severity::Warning),
            limit: Some(50),
            ..Filter::default()
        });
    });
    report("events_recent over full buckets (warning, limit 50)", &read);
    support::record_latencies(BENCH, "recent_50", &read);

    // Memory: the buckets full of typical events, then of the largest ones.
    let full = Journal::new(JournalConfig::default());
    for i in 0..1000 {
        full.record(health_change(i));
    }
    let kept = full.recent(&Filter::default()).kept;
    let events = kept.priority_events + kept.regular_events;
    println!(
        "memory: {} typical events kept take {} bytes, {} bytes an event",
        events,
        full.memory(),
        full.memory() / events
    );
    support::record(
        BENCH,
        "memory.typical_per_event",
        (full.memory() / events) as f64,
        "bytes",
    );
    let full = Journal::new(JournalConfig::default());
    for _ in 0..300 {
        full.record(oversized());
    }
    let kept = full.recent(&Filter::default()).kept;
    let events = kept.priority_events + kept.regular_events;
    println!(
        "memory: {} oversized events take {} bytes, {} bytes an event (bound: {MAX_EVENT_BYTES})",
        events,
        full.memory(),
        full.memory() / events
    );
    support::record(
        BENCH,
        "memory.oversized_per_event",
        (full.memory() / events) as f64,
        "bytes",
    );
    assert!(
        typical.micros(0.99) < Duration::from_millis(1).as_secs_f64() * 1e6,
        "over the 1 ms budget"
    );
}
