//! Prometheus exposition (text format 0.0.4), built at scrape time from one fresh snapshot per
//! target, the same snapshot health is graded from. docs/metrics.md is the list of metrics.
//! A target that cannot be reached gives `sbmon_target_up 0` and none of its other series.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use crate::context::Context;
use crate::health::{self, Status};
use crate::histogram::Reading;
use crate::snapshot::{Detail, Readings};
use crate::targets::Target;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Families in order of first appearance, each with its samples, so that a family's lines
/// stay together whichever target added them.
#[derive(Default)]
struct Exposition {
    families: Vec<Family>,
    index: HashMap<&'static str, usize>,
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    lines: String,
}

impl Exposition {
    fn family(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
    ) -> &mut Family {
        let next = self.families.len();
        let i = *self.index.entry(name).or_insert(next);
        if i == next {
            self.families.push(Family {
                name,
                kind,
                help,
                lines: String::new(),
            });
        }
        &mut self.families[i]
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, labels: &[(&str, &str)], v: f64) {
        self.family(name, "gauge", help).sample("", labels, v);
    }

    /// `name` includes `_total`: in the classic text format the family is named as sampled.
    fn counter(&mut self, name: &'static str, help: &'static str, labels: &[(&str, &str)], v: f64) {
        self.family(name, "counter", help).sample("", labels, v);
    }

    fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        r: &Reading,
    ) {
        let family = self.family(name, "histogram", help);
        for (bound, count) in &r.cumulative {
            let le = format_value(*bound);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            family.sample("_bucket", &with_le, *count as f64);
        }
        let mut with_inf = labels.to_vec();
        with_inf.push(("le", "+Inf"));
        family.sample("_bucket", &with_inf, r.count as f64);
        family.sample("_sum", labels, r.sum_seconds);
        family.sample("_count", labels, r.count as f64);
    }

    fn finish(self) -> String {
        let mut out = String::new();
        for f in self.families {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            out.push_str(&f.lines);
        }
        out
    }
}

impl Family {
    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.lines, "{}{suffix}", self.name);
        if !labels.is_empty() {
            self.lines.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.lines.push(',');
                }
                let _ = write!(self.lines, "{k}=\"{}\"", escape_label(v));
            }
            self.lines.push('}');
        }
        let _ = writeln!(self.lines, " {}", format_value(value));
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Lisp thread states exported by `sbcl_threads`; every one is always present.
const THREAD_STATES: [&str; 6] = [
    "running",
    "sleeping",
    "disk_wait",
    "stopped",
    "lock_wait",
    "other",
];

fn thread_state(waiting: bool, os_state: Option<&str>) -> &'static str {
    if waiting {
        return "lock_wait";
    }
    match os_state {
        Some("running") => "running",
        Some("sleeping" | "idle") => "sleeping",
        Some("disk wait") => "disk_wait",
        Some("stopped" | "tracing stop") => "stopped",
        _ => "other",
    }
}

/// What one exposition covers.
pub enum Scope {
    /// Every target and sbmon's own metrics (`/metrics`).
    All,
    /// One target's series (`/metrics?target=NAME`, what `/sd` points scrapers at).
    Target(Arc<Target>),
    /// Only sbmon's own metrics (`/metrics?scope=self`): no target is asked anything.
    Own,
}

pub async fn render(ctx: &Context, scope: Scope) -> String {
    let started = Instant::now();
    let all = !matches!(scope, Scope::Target(_));
    let targets = match scope {
        Scope::All => ctx.targets.all(),
        Scope::Target(t) => vec![t],
        Scope::Own => Vec::new(),
    };
    let snapshots =
        futures::future::join_all(targets.iter().map(|t| t.snapshot(Detail::Tasks))).await;
    let mut e = Exposition::default();
    if all {
        e.gauge(
            "sbmon_build_info",
            "sbmon build, value 1.",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
    }
    for (target, snap) in targets.iter().zip(&snapshots) {
        let name = target.name.as_str();
        let up = snap.image.is_some();
        e.gauge(
            "sbmon_target_up",
            "1 when the target's agent answered this scrape.",
            &[("target", name)],
            if up { 1.0 } else { 0.0 },
        );
        let report = health::grade(ctx, target, snap);
        // The leak check observes the retained heap's growth over the sampler's window.
        if let Some(rate) = report
            .checks
            .iter()
            .filter(|_| up)
            .find(|c| c.name == "memory.leak" && c.status != Status::Unknown)
            .and_then(|c| c.observed)
        {
            e.gauge(
                "sbcl_heap_retained_growth_bytes_per_second",
                "Growth of the heap retained after GC over the memory_trend window (least \
                 squares over the sampler's history).",
                &[("target", name)],
                rate,
            );
        }
        for check in &report.checks {
            let value = match check.status {
                Status::Healthy => 0.0,
                Status::Degraded => 1.0,
                Status::Critical => 2.0,
                Status::Unknown => continue,
            };
            e.gauge(
                "sbmon_health_status",
                "Health check status: 0 healthy, 1 degraded, 2 critical.",
                &[("target", name), ("check", &check.name)],
                value,
            );
        }
        e.histogram(
            "sbmon_agent_rtt_seconds",
            "Round trip of agent calls answered.",
            &[("target", name)],
            &target.client.rtt().read(),
        );
        if let Some(readings) = &snap.image {
            image_metrics(&mut e, name, readings);
        }
    }
    if all {
        for (tool, ok, error, duration) in ctx.calls.totals() {
            for (outcome, n) in [("ok", ok), ("error", error)] {
                e.counter(
                    "sbmon_tool_calls_total",
                    "Tool calls through any front end, by outcome.",
                    &[("tool", tool), ("outcome", outcome)],
                    n as f64,
                );
            }
            e.histogram(
                "sbmon_tool_duration_seconds",
                "Duration of tool calls.",
                &[("tool", tool)],
                &duration,
            );
        }
        e.gauge(
            "sbmon_scrape_duration_seconds",
            "Time taken to build this exposition.",
            &[],
            started.elapsed().as_secs_f64(),
        );
    }
    e.finish()
}

fn image_metrics(e: &mut Exposition, target: &str, r: &Readings) {
    let t = [("target", target)];
    e.gauge(
        "sbcl_info",
        "SBCL image, value 1.",
        &[
            ("target", target),
            ("version", &r.welcome.lisp_version),
            ("agent_version", &r.welcome.agent_version),
        ],
        1.0,
    );
    if let Ok(m) = &r.memory {
        e.gauge(
            "sbcl_heap_used_bytes",
            "Dynamic space in use.",
            &t,
            m.heap_used as f64,
        );
        e.gauge(
            "sbcl_heap_limit_bytes",
            "Dynamic space size.",
            &t,
            m.heap_limit as f64,
        );
        for g in &m.generations {
            let generation = g.generation.to_string();
            e.gauge(
                "sbcl_heap_generation_bytes",
                "Bytes allocated in each GC generation.",
                &[("target", target), ("generation", &generation)],
                g.bytes as f64,
            );
        }
        e.counter(
            "sbcl_allocated_bytes_total",
            "Bytes allocated (consed) since the image started.",
            &t,
            m.bytes_consed as f64,
        );
        e.gauge(
            "sbcl_gc_nursery_size_bytes",
            "Bytes allocated between nursery collections.",
            &t,
            m.nursery_size as f64,
        );
    }
    if let Ok(gc) = &r.gc {
        if let Some(last) = gc.recent.last() {
            e.gauge(
                "sbcl_heap_after_gc_bytes",
                "Heap in use right after the last measured collection.",
                &t,
                last.heap_after as f64,
            );
        }
        e.counter(
            "sbcl_gc_cpu_seconds_total",
            "CPU seconds spent in GC since the image started.",
            &t,
            gc.gc_cpu_seconds,
        );
        for generation in 0..7u8 {
            let h = gc.histograms.iter().find(|h| h.generation == generation);
            let label = generation.to_string();
            let labels = [("target", target), ("generation", label.as_str())];
            e.counter(
                "sbcl_gc_collections_total",
                "Collections measured since the agent started, by generation collected.",
                &labels,
                h.map_or(0.0, |h| h.count as f64),
            );
            let mut running = 0;
            let cumulative = gc
                .buckets
                .iter()
                .enumerate()
                .map(|(i, bound)| {
                    running += h.and_then(|h| h.counts.get(i)).copied().unwrap_or(0);
                    (*bound, running)
                })
                .collect();
            e.histogram(
                "sbcl_gc_pause_seconds",
                "Measured wall pause of each collection.",
                &labels,
                &Reading {
                    cumulative,
                    count: h.map_or(0, |h| h.count),
                    sum_seconds: h.map_or(0.0, |h| h.sum_seconds),
                },
            );
        }
    }
    if let Ok(threads) = &r.threads {
        let tasks = r.tasks.as_ref().and_then(|t| t.as_ref().ok());
        let mut counts: HashMap<&str, u32> = HashMap::new();
        for thread in threads {
            let os_state = tasks.and_then(|tasks| {
                tasks
                    .iter()
                    .find(|task| Some(task.tid) == thread.tid)
                    .map(|task| task.state.as_str())
            });
            *counts
                .entry(thread_state(thread.waiting_for.is_some(), os_state))
                .or_default() += 1;
        }
        for state in THREAD_STATES {
            e.gauge(
                "sbcl_threads",
                "Lisp threads by state (lock_wait: waiting for a Lisp mutex).",
                &[("target", target), ("state", state)],
                counts.get(state).copied().unwrap_or(0) as f64,
            );
        }
        let cycles = crate::deadlock::cycles(&crate::deadlock::edges(threads));
        e.gauge(
            "sbcl_threads_deadlocked",
            "Lisp threads in a deadlock cycle (thread -> mutex -> owner thread -> ...).",
            &t,
            cycles.iter().map(|c| c.threads.len()).sum::<usize>() as f64,
        );
        e.gauge(
            "sbcl_threads_in_debugger",
            "Lisp threads sitting in a debugger with a condition nobody answered.",
            &t,
            threads.iter().filter(|th| th.debugger.is_some()).count() as f64,
        );
    }
    if let Ok(p) = &r.process {
        e.counter(
            "process_cpu_seconds_total",
            "User and system CPU seconds of the target process.",
            &t,
            p.cpu_user_seconds + p.cpu_system_seconds,
        );
        e.gauge(
            "process_resident_memory_bytes",
            "Resident memory of the target process.",
            &t,
            p.rss_bytes as f64,
        );
        e.gauge(
            "process_virtual_memory_bytes",
            "Virtual memory of the target process.",
            &t,
            p.virtual_bytes as f64,
        );
        e.gauge(
            "process_open_fds",
            "Open file descriptors.",
            &t,
            p.open_fds as f64,
        );
        if let Some(max) = p.max_fds {
            e.gauge(
                "process_max_fds",
                "Soft limit on open file descriptors.",
                &t,
                max as f64,
            );
        }
        e.gauge(
            "process_start_time_seconds",
            "Start time of the target process, seconds since the epoch.",
            &t,
            p.start_time_unix,
        );
        e.gauge(
            "process_threads",
            "Tasks of the target process.",
            &t,
            p.num_threads as f64,
        );
        e.gauge(
            "process_memory_limit_bytes",
            "Memory limit of the target process: its cgroup limit, else physical memory.",
            &t,
            p.memory_limit.bytes as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_stay_together_and_labels_are_escaped() {
        let mut e = Exposition::default();
        e.gauge("a", "first", &[("target", "x")], 1.0);
        e.counter("b_total", "second", &[("target", "x")], 2.0);
        e.gauge("a", "first", &[("target", "we\"ird\\\n")], 0.5);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP a first\n# TYPE a gauge\na{target=\"x\"} 1\n\
             a{target=\"we\\\"ird\\\\\\n\"} 0.5\n\
             # HELP b_total second\n# TYPE b_total counter\nb_total{target=\"x\"} 2\n"
        );
    }

    #[test]
    fn histograms_end_with_inf_sum_and_count() {
        let mut e = Exposition::default();
        let r = Reading {
            cumulative: vec![(0.001, 1), (0.01, 3)],
            count: 4,
            sum_seconds: 2.5,
        };
        e.histogram("h_seconds", "h", &[], &r);
        let text = e.finish();
        assert!(text.contains("h_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("h_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(text.contains("h_seconds_sum 2.5\nh_seconds_count 4\n"));
    }

    #[test]
    fn thread_states_are_bounded() {
        assert_eq!(thread_state(true, Some("running")), "lock_wait");
        assert_eq!(thread_state(false, Some("disk wait")), "disk_wait");
        assert_eq!(thread_state(false, Some("zombie")), "other");
        assert_eq!(thread_state(false, None), "other");
    }
}
