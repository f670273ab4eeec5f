//! Health grading: the dimensions of the README's health checks (memory, GC, threads,
//! resources, availability), each graded from one snapshot against warning and critical
//! thresholds. The `health_check` tool, `/health` and `/metrics` all grade here.

use schemars::JsonSchema;
use serde::Serialize;

use crate::agent::reply::LispThread;
use crate::config::Threshold;
use crate::context::Context;
use crate::deadlock;
use crate::figures::{ratio, unix_now};
use crate::snapshot::{Detail, Readings, Snapshot};
use crate::targets::Target;
use crate::trend::{self, Verdict};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Could not be observed (only when something else already explains why).
    Unknown,
    Healthy,
    Degraded,
    Critical,
}

impl Status {
    /// As it is written in JSON and in summaries.
    pub fn name(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Critical => "critical",
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Check {
    /// e.g. memory.heap
    pub name: String,
    pub status: Status,
    /// The observed value the thresholds apply to (null when it could not be read).
    pub observed: Option<f64>,
    pub warning: f64,
    /// Null when no value is critical by itself.
    pub critical: Option<f64>,
    /// One line saying what was seen.
    pub reason: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct HealthReport {
    pub target: String,
    /// The worst status of all checks.
    pub status: Status,
    pub checks: Vec<Check>,
    /// Unix time of the check.
    pub time: f64,
}

fn status_of(observed: f64, t: &Threshold) -> Status {
    if t.critical.is_some_and(|c| observed >= c) {
        Status::Critical
    } else if observed >= t.warning {
        Status::Degraded
    } else {
        Status::Healthy
    }
}

fn check(name: &str, observed: f64, t: &Threshold, reason: String) -> Check {
    Check {
        name: name.into(),
        status: status_of(observed, t),
        observed: Some(observed),
        warning: t.warning,
        critical: t.critical,
        reason,
    }
}

fn unknown(name: &str, t: &Threshold, reason: String) -> Check {
    Check {
        name: name.into(),
        status: Status::Unknown,
        observed: None,
        warning: t.warning,
        critical: t.critical,
        reason,
    }
}

/// Uptime below which the GC time since the image started is not graded.
const MIN_LIFETIME_GC_SECONDS: f64 = 60.0;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// Grade every check for one target. An unreachable agent is itself the critical finding,
/// so this never fails.
pub async fn evaluate(ctx: &Context, target: &Target) -> HealthReport {
    grade(ctx, target, &*target.snapshot(Detail::Process).await)
}

/// Grade a snapshot already taken (a scrape grades the snapshot it exports).
pub fn grade(ctx: &Context, target: &Target, snap: &Snapshot) -> HealthReport {
    let h = &ctx.config.health;
    let mut checks = Vec::new();
    checks.push(match &snap.rtt {
        Ok(rtt) => check(
            "availability.agent",
            rtt.as_secs_f64(),
            &h.availability.agent,
            format!("agent answered a ping in {:.3} ms", rtt.as_secs_f64() * 1e3),
        ),
        Err(e) => Check {
            status: Status::Critical,
            reason: format!("agent unreachable: {e}"),
            ..unknown("availability.agent", &h.availability.agent, String::new())
        },
    });

    match &snap.image {
        Some(readings) => observe_image(ctx, target, readings, &mut checks),
        None => {
            for (name, t) in [
                ("memory.heap", &h.memory.heap),
                ("memory.rss", &h.memory.rss),
                ("gc.time", &h.gc.time),
                ("threads.count", &h.threads.count),
                ("threads.stuck", &h.threads.stuck),
                ("resources.fds", &h.resources.fds),
            ] {
                checks.push(unknown(
                    name,
                    t,
                    "not observed: the agent is unreachable".into(),
                ));
            }
        }
    }

    checks.push(leak_check(ctx, target));

    let (failed, total) = target.calls.last_minute();
    let error_ratio = ratio(failed as f64, total as f64);
    checks.push(check(
        "availability.errors",
        error_ratio,
        &h.availability.errors,
        if total == 0 {
            "no tool calls in the last minute".into()
        } else {
            format!("{failed} of {total} tool calls failed in the last minute (callers' own mistakes are not counted)")
        },
    ));

    HealthReport {
        target: target.name.clone(),
        status: checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Unknown)
            .max(Status::Healthy),
        checks,
        time: unix_now(),
    }
}

/// `memory.leak`: degraded while the sampler's history says `leak_suspected` (critical too
/// when the retained heap grows faster than a configured critical rate).
fn leak_check(ctx: &Context, target: &Target) -> Check {
    let t = &ctx.config.health.memory.leak;
    if target.history.settings().is_none() {
        return unknown(
            "memory.leak",
            t,
            "needs the sampler of `sbmon serve` (a one-shot call keeps no history; `sbmon call \
             memory_trend` samples live)"
                .into(),
        );
    }
    let trend = trend::recent(&target.history, trend::DEFAULT_WINDOW, t.warning);
    let observed = trend.retained_growth.map(|f| f.slope);
    let status = match (trend.verdict, observed) {
        (Verdict::InsufficientData, _) => Status::Unknown,
        (Verdict::LeakSuspected, Some(rate)) if t.critical.is_some_and(|c| rate >= c) => {
            Status::Critical
        }
        (Verdict::LeakSuspected, _) => Status::Degraded,
        _ => Status::Healthy,
    };
    Check {
        name: "memory.leak".into(),
        status,
        observed,
        warning: t.warning,
        critical: t.critical,
        reason: format!(
            "{} over the last {:.0} s: {}",
            trend.verdict.name(),
            trend.covered_seconds,
            trend.reason
        ),
    }
}

/// `threads.stuck`: critical for a deadlock cycle, degraded for a thread in the debugger;
/// otherwise graded on the longest time a thread has been seen waiting on one mutex.
fn stuck_check(threads: &[LispThread], t: &Threshold) -> Check {
    let cycles = deadlock::cycles(&deadlock::edges(threads));
    let in_debugger: Vec<&LispThread> = threads.iter().filter(|t| t.debugger.is_some()).collect();
    let longest = threads
        .iter()
        .filter(|t| t.waiting_for_type.as_deref() == Some("mutex"))
        .filter_map(|t| t.waiting_seconds.map(|s| (s, t)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let observed = longest.map_or(0.0, |(s, _)| s);
    let mut c = check(
        "threads.stuck",
        observed,
        t,
        match longest {
            Some((s, th)) => format!(
                "longest mutex wait seen: {} on {:?} held by {} ({s:.0} s since first seen)",
                th.name.as_deref().unwrap_or("unnamed"),
                th.waiting_for.as_deref().unwrap_or(""),
                th.owner_name.as_deref().unwrap_or("no owner")
            ),
            None => "no thread waits on a mutex".into(),
        },
    );
    if !in_debugger.is_empty() {
        c.status = c.status.max(Status::Degraded);
        let named: Vec<String> = in_debugger
            .iter()
            .map(|t| {
                format!(
                    "{} ({})",
                    t.name.as_deref().unwrap_or("unnamed"),
                    t.debugger.as_ref().map_or("", |d| d.type_name.as_str())
                )
            })
            .collect();
        c.reason = format!(
            "{} in the debugger: {}; {}",
            named.len(),
            named.join(", "),
            c.reason
        );
    }
    if !cycles.is_empty() {
        c.status = Status::Critical;
        let described: Vec<String> = cycles.iter().map(|d| d.describe()).collect();
        c.reason = format!("deadlock: {}; {}", described.join("; "), c.reason);
    }
    c
}

fn observe_image(ctx: &Context, target: &Target, image: &Readings, checks: &mut Vec<Check>) {
    let h = &ctx.config.health;
    checks.push(match &image.memory {
        Ok(mem) => {
            let heap = ratio(mem.heap_used as f64, mem.heap_limit as f64);
            check(
                "memory.heap",
                heap,
                &h.memory.heap,
                format!(
                    "heap {} of {} ({})",
                    mib(mem.heap_used),
                    mib(mem.heap_limit),
                    percent(heap)
                ),
            )
        }
        Err(e) => unknown(
            "memory.heap",
            &h.memory.heap,
            format!("could not be read: {e}"),
        ),
    });

    let proc = &image.process;
    checks.push(match proc {
        Ok(p) => {
            let rss = ratio(p.rss_bytes as f64, p.memory_limit.bytes as f64);
            check(
                "memory.rss",
                rss,
                &h.memory.rss,
                format!(
                    "RSS {} of {} limit ({}, {})",
                    mib(p.rss_bytes),
                    mib(p.memory_limit.bytes),
                    percent(rss),
                    p.memory_limit.source
                ),
            )
        }
        Err(e) => unknown("memory.rss", &h.memory.rss, e.to_string()),
    });

    checks.push(match (&image.gc, proc) {
        (Err(e), _) => unknown("gc.time", &h.gc.time, format!("could not be read: {e}")),
        (Ok(_), _) if let Some(rate) = target.gc_rate_last_minute() => check(
            "gc.time",
            rate.ratio,
            &h.gc.time,
            format!(
                "GC used {} of wall time over the last {:.0} s",
                percent(rate.ratio),
                rate.window_seconds
            ),
        ),
        // An image in its first minute has spent most of its life starting up (loading code,
        // the agent among it): its lifetime share says nothing about how it runs.
        (Ok(gc), Ok(p)) if p.uptime_seconds < MIN_LIFETIME_GC_SECONDS => Check {
            observed: Some(ratio(gc.gc_cpu_seconds, p.uptime_seconds)),
            reason: format!(
                "not graded: the image started {:.0} s ago, and GC time is graded over a \
                 minute",
                p.uptime_seconds
            ),
            ..unknown("gc.time", &h.gc.time, String::new())
        },
        // No earlier reading (first call): the lifetime share is the best true figure.
        (Ok(gc), Ok(p)) => {
            let lifetime = ratio(gc.gc_cpu_seconds, p.uptime_seconds);
            check(
                "gc.time",
                lifetime,
                &h.gc.time,
                format!(
                    "GC used {} of wall time since the image started {:.0} s ago \
                     (no reading from a minute ago yet)",
                    percent(lifetime),
                    p.uptime_seconds
                ),
            )
        }
        (Ok(_), Err(e)) => unknown("gc.time", &h.gc.time, e.to_string()),
    });

    checks.push(match &image.threads {
        Ok(threads) => {
            let count = threads.len();
            let blocked = threads.iter().filter(|t| t.waiting_for.is_some()).count();
            check(
                "threads.count",
                count as f64,
                &h.threads.count,
                format!("{count} Lisp threads, {blocked} waiting on a lock"),
            )
        }
        Err(e) => unknown(
            "threads.count",
            &h.threads.count,
            format!("could not be read: {e}"),
        ),
    });

    checks.push(match &image.threads {
        Ok(threads) => stuck_check(threads, &h.threads.stuck),
        Err(e) => unknown(
            "threads.stuck",
            &h.threads.stuck,
            format!("could not be read: {e}"),
        ),
    });

    checks.push(match proc {
        Ok(p) => match p.max_fds {
            Some(max) => {
                let fds = ratio(p.open_fds as f64, max as f64);
                check(
                    "resources.fds",
                    fds,
                    &h.resources.fds,
                    format!(
                        "{} of {} file descriptors open ({})",
                        p.open_fds,
                        max,
                        percent(fds)
                    ),
                )
            }
            None => check(
                "resources.fds",
                0.0,
                &h.resources.fds,
                format!("{} file descriptors open, no limit", p.open_fds),
            ),
        },
        Err(e) => unknown("resources.fds", &h.resources.fds, e.to_string()),
    });
}
