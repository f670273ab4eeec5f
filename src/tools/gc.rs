//! `gc_stats`: collections, GC CPU time and the pauses the agent measured around each one;
//! `gc_watch`: the collections of the next few seconds, as they happen.

use std::time::{Duration, Instant};

use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use super::summary::{bytes_i64, maybe_seconds, percent, seconds, target_label};
use super::{Class, Tool, ToolError};

use crate::agent::reply::{self, Gc};
use crate::agent::{AgentError, alongside};
use crate::context::Context;
use crate::events::GcEvent;
use crate::figures::ratio;
use crate::process;

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GcStats {
    pub target: String,
    pub pid: i32,
    /// Collections since the image started (C global n_gcs), or since the agent started when
    /// `gc_count_source` is "agent".
    pub gc_count: u64,
    pub gc_count_source: String,
    /// CPU seconds spent in GC since the image started (sb-ext:*gc-run-time*).
    pub gc_cpu_seconds: f64,
    /// GC CPU seconds per wall second since the process started.
    pub gc_time_ratio: f64,
    /// GC CPU seconds per wall second over the last minute, when an earlier reading exists.
    pub gc_time_ratio_last_minute: Option<f64>,
    /// GC CPU seconds as a share of the process's CPU seconds (user + system).
    pub gc_cpu_share: f64,
    pub pauses: Pauses,
    /// Pauses measured per generation collected, since the agent started.
    pub collections_by_generation: Vec<GenerationPauses>,
    /// The most recent collections, oldest first (at most 64).
    pub recent: Vec<PauseRecord>,
    /// Bytes freed by the recent collections listed above (heap before minus after).
    pub bytes_freed_recent: i64,
    /// Unix time of the last measured collection.
    pub last_gc_time: Option<f64>,
    pub measured_by: MeasuredBy,
}

/// How each GC figure was obtained inside the image.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct MeasuredBy {
    pub count: String,
    pub cpu: String,
    pub pause: String,
}

impl From<reply::MeasuredBy> for MeasuredBy {
    fn from(m: reply::MeasuredBy) -> Self {
        MeasuredBy {
            count: m.count,
            cpu: m.cpu,
            pause: m.pause,
        }
    }
}

/// One measured collection.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct PauseRecord {
    pub seq: u64,
    pub generation: u8,
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    pub heap_before: u64,
    pub heap_after: u64,
    /// Unix time (seconds) when the collection ended.
    pub time: f64,
}

impl From<reply::PauseRecord> for PauseRecord {
    fn from(r: reply::PauseRecord) -> Self {
        PauseRecord {
            seq: r.seq,
            generation: r.generation,
            wall_seconds: r.wall_seconds,
            cpu_seconds: r.cpu_seconds,
            heap_before: r.heap_before,
            heap_after: r.heap_after,
            time: r.time,
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Pauses {
    /// Pauses measured since the agent started.
    pub count: u64,
    pub sum_seconds: f64,
    pub max_seconds: f64,
    pub last_seconds: f64,
    pub mean_seconds: f64,
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    /// How the percentiles were derived.
    pub percentile_method: String,
    /// How each pause was measured.
    pub measured_by: String,
    /// Whether pauses are measured at all (false when the SBCL lacks the internals used).
    pub measured: bool,
    pub histogram: Histogram,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Histogram {
    /// Upper bounds of the buckets, seconds.
    pub bounds_seconds: Vec<f64>,
    /// Pauses per bucket (not cumulative); the last count is above the last bound.
    pub counts: Vec<u64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GenerationPauses {
    pub generation: u8,
    pub count: u64,
    pub sum_seconds: f64,
}

pub struct GcStatsTool;

impl Tool for GcStatsTool {
    const NAME: &'static str = "gc_stats";
    const TITLE: &'static str = "GC statistics";
    const DESCRIPTION: &'static str = "Garbage collection: count, CPU seconds, share of CPU \
        and wall time, measured pause times (count, sum, max, last, p50/p95/p99, histogram), \
        collections per generation, recent collections with heap before/after.";
    const CLASS: Class = Class::Read;
    type Args = Args;
    type Output = GcStats;

    async fn run(ctx: &Context, args: Args) -> Result<GcStats, ToolError> {
        gc_stats(ctx, args).await
    }

    fn summary(g: &GcStats) -> String {
        let mut out = format!(
            "{}: {} GCs, GC CPU {} ({} of wall time since start",
            target_label(&g.target),
            g.gc_count,
            seconds(g.gc_cpu_seconds),
            percent(g.gc_time_ratio),
        );
        if let Some(last_minute) = g.gc_time_ratio_last_minute {
            let _ = write!(out, ", {} over the last minute", percent(last_minute));
        }
        let _ = write!(out, ", {} of process CPU)", percent(g.gc_cpu_share));
        let p = &g.pauses;
        if !p.measured {
            out.push_str("\npauses: not measured on this SBCL");
        } else if p.count == 0 {
            out.push_str("\npauses: none measured yet (no collection since the agent started)");
        } else {
            let _ = write!(
                out,
                "\npauses: {} measured, last {}, mean {}, p50 {}, p95 {}, p99 {}, max {}",
                p.count,
                seconds(p.last_seconds),
                seconds(p.mean_seconds),
                maybe_seconds(p.p50_seconds),
                maybe_seconds(p.p95_seconds),
                maybe_seconds(p.p99_seconds),
                seconds(p.max_seconds),
            );
        }
        if !g.recent.is_empty() {
            let _ = write!(
                out,
                "\nfreed {} in the last {} collections",
                bytes_i64(g.bytes_freed_recent),
                g.recent.len()
            );
        }
        out
    }
}

async fn gc_stats(ctx: &Context, args: Args) -> Result<GcStats, ToolError> {
    let target = ctx.target(args.target.as_deref())?;
    let pid = target.pid().await?;
    let (gc, proc) = alongside(target.read_gc(), || process::times(pid)).await;
    let (gc, proc) = (gc?, proc?);
    let recent_rate = target.gc_rate_last_minute();
    Ok(summarize(
        target.name.clone(),
        pid,
        gc,
        &proc,
        recent_rate.map(|r| r.ratio),
    ))
}

fn summarize(
    target: String,
    pid: i32,
    gc: Gc,
    proc: &process::ProcessTimes,
    last_minute: Option<f64>,
) -> GcStats {
    let mut counts = vec![0u64; gc.buckets.len() + 1];
    for h in &gc.histograms {
        for (total, n) in counts.iter_mut().zip(&h.counts) {
            *total += n;
        }
    }
    let q = |p| quantile(&gc.buckets, &counts, p, gc.pauses.max_seconds);
    let pauses = Pauses {
        count: gc.pauses.count,
        sum_seconds: gc.pauses.sum_seconds,
        max_seconds: gc.pauses.max_seconds,
        last_seconds: gc.pauses.last_seconds,
        mean_seconds: ratio(gc.pauses.sum_seconds, gc.pauses.count as f64),
        p50_seconds: q(0.50),
        p95_seconds: q(0.95),
        p99_seconds: q(0.99),
        percentile_method: "estimated from the pause histogram (linear within a bucket, \
                            capped at the measured maximum), all pauses since the agent started"
            .into(),
        measured_by: gc.measured_by.pause.clone(),
        measured: gc.pause_timing,
        histogram: Histogram {
            bounds_seconds: gc.buckets.clone(),
            counts,
        },
    };
    let bytes_freed_recent = gc
        .recent
        .iter()
        .map(|r| r.heap_before as i64 - r.heap_after as i64)
        .sum();
    let cpu = proc.cpu_user_seconds + proc.cpu_system_seconds;
    GcStats {
        target,
        pid,
        gc_count: gc.gc_count.unwrap_or(gc.pauses.count),
        gc_count_source: gc.gc_count_source,
        gc_cpu_seconds: gc.gc_cpu_seconds,
        gc_time_ratio: ratio(gc.gc_cpu_seconds, proc.uptime_seconds),
        gc_time_ratio_last_minute: last_minute,
        gc_cpu_share: ratio(gc.gc_cpu_seconds, cpu).min(1.0),
        pauses,
        collections_by_generation: gc
            .histograms
            .iter()
            .map(|h| GenerationPauses {
                generation: h.generation,
                count: h.count,
                sum_seconds: h.sum_seconds,
            })
            .collect(),
        bytes_freed_recent,
        last_gc_time: gc.pauses.last_time,
        recent: gc.recent.into_iter().map(PauseRecord::from).collect(),
        measured_by: gc.measured_by.into(),
    }
}

/// The `q` quantile of a histogram (`counts` has one more entry than `bounds`, for values
/// above the last bound), interpolating linearly inside the bucket and never exceeding `max`.
pub fn quantile(bounds: &[f64], counts: &[u64], q: f64, max: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let Some(&upper) = bounds.get(i) else {
                return Some(max);
            };
            let within = ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
            return Some((lower + (upper - lower) * within).min(max));
        }
        seen += n;
    }
    Some(max)
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let bounds = [0.001, 0.01, 0.1];
        // 10 pauses in (0, 1ms], 10 in (1ms, 10ms].
        let counts = [10, 10, 0, 0];
        assert_eq!(quantile(&bounds, &counts, 0.5, 1.0), Some(0.001));
        let p75 = quantile(&bounds, &counts, 0.75, 1.0).unwrap();
        assert!((p75 - 0.0055).abs() < 1e-12, "{p75}");
        // Capped at the measured maximum.
        assert_eq!(quantile(&bounds, &counts, 0.99, 0.004), Some(0.004));
        // Values above the last bound report the maximum.
        assert_eq!(quantile(&bounds, &[0, 0, 0, 3], 0.5, 7.0), Some(7.0));
        assert_eq!(quantile(&bounds, &[0, 0, 0, 0], 0.5, 0.0), None);
    }
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchArgs {
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
    /// How long to watch, in seconds: 0.1..60 (default 10).
    pub seconds: Option<f64>,
    /// Return early once this many collections were seen: 1..1000 (default 100).
    pub max_events: Option<usize>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GcWatch {
    pub target: String,
    /// Seconds watched (less than asked when max_events was reached first).
    pub seconds: f64,
    /// Collections seen, in order.
    pub events: Vec<GcEvent>,
    pub count: usize,
    /// Sum and maximum of the wall-clock pauses seen.
    pub pause_sum_seconds: f64,
    pub pause_max_seconds: f64,
    /// Net bytes the collections seen freed.
    pub freed_bytes: i64,
    /// Collections that happened while watching but were not delivered.
    pub missed: u64,
}

pub struct GcWatchTool;

impl Tool for GcWatchTool {
    const NAME: &'static str = "gc_watch";
    const TITLE: &'static str = "Watch garbage collections";
    const DESCRIPTION: &'static str = "The garbage collections of the next few seconds as they \
        happen (0.1..60 s, or until max_events): generation, measured pause, CPU, heap before \
        and after, bytes freed; with the sum and maximum of the pauses seen.";
    const CLASS: Class = Class::Read;
    type Args = WatchArgs;
    type Output = GcWatch;

    async fn run(ctx: &Context, args: WatchArgs) -> Result<GcWatch, ToolError> {
        gc_watch(ctx, args).await
    }

    fn summary(w: &GcWatch) -> String {
        let mut out = format!(
            "{}: {} collection{} in {:.1} s: pauses sum {}, max {}; freed {}",
            target_label(&w.target),
            w.count,
            if w.count == 1 { "" } else { "s" },
            w.seconds,
            seconds(w.pause_sum_seconds),
            seconds(w.pause_max_seconds),
            bytes_i64(w.freed_bytes),
        );
        if w.missed > 0 {
            let _ = write!(out, " ({} more not delivered)", w.missed);
        }
        for e in w.events.iter().take(20) {
            let _ = write!(
                out,
                "\n  gen {} pause {} freed {}",
                e.generation,
                seconds(e.wall_seconds),
                bytes_i64(e.freed_bytes),
            );
        }
        out
    }
}

/// Watch the collections of one image as they happen, for a bounded time.
async fn gc_watch(ctx: &Context, args: WatchArgs) -> Result<GcWatch, ToolError> {
    let seconds = args.seconds.unwrap_or(10.0);
    if !(0.1..=60.0).contains(&seconds) {
        return Err(ToolError::invalid("gc_watch", "seconds must be 0.1..60"));
    }
    let max_events = args.max_events.unwrap_or(100);
    if !(1..=1000).contains(&max_events) {
        return Err(ToolError::invalid("gc_watch", "max_events must be 1..1000"));
    }
    let target = ctx.target(args.target.as_deref())?;
    // An image that is not there is an error now, not an empty watch.
    target.client.welcome().await?;
    let feed = target.gc_feed();
    let mut events = feed.follow();
    let timeout = target.client.options().call_timeout;
    if !feed.subscribed(timeout).await {
        return Err(ToolError::Agent(AgentError::Timeout {
            op: "subscribe".into(),
            timeout,
        }));
    }
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    let mut status = feed.status();
    let mut seen = Vec::new();
    let mut lagged = 0;
    while seen.len() < max_events {
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline, events.recv()) => next,
            // Events stop flowing when the image dies or its agent goes: a watch that went on
            // quietly would report "no collections", which is not what happened.
            _ = status.wait_for(|on| !*on) => {
                return Err(ToolError::Agent(AgentError::Lost(format!(
                    "{} stopped sending events {:.1} s into a {seconds} s watch, after {} \
                     collection(s)",
                    target.name,
                    started.elapsed().as_secs_f64(),
                    seen.len()
                ))));
            }
        };
        match next {
            Err(_) => break,
            Ok(Ok(event)) => seen.push(event),
            Ok(Err(RecvError::Lagged(n))) => lagged += n,
            Ok(Err(RecvError::Closed)) => break,
        }
    }
    Ok(GcWatch {
        target: target.name.clone(),
        seconds: started.elapsed().as_secs_f64(),
        count: seen.len(),
        pause_sum_seconds: seen.iter().map(|e| e.wall_seconds).sum(),
        pause_max_seconds: seen.iter().map(|e| e.wall_seconds).fold(0.0, f64::max),
        freed_bytes: seen.iter().map(|e| e.freed_bytes).sum(),
        // The first event's gap predates the watch.
        missed: seen.iter().skip(1).map(|e| e.missed).sum::<u64>() + lagged,
        events: seen,
    })
}
