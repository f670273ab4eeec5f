//! `memory_stats`: the heap as the image sees it, and the process as /proc sees it;
//! `memory_trend`: the heap over a window of samples, and whether it leaks.

use std::fmt::Write as _;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::summary::{MAX_FIELD_CHARS, bytes, bytes_u64, cut, duration, percent, target_label};
use super::{Class, Tool, ToolError};
use crate::agent::alongside;
use crate::agent::reply;
use crate::context::Context;
use crate::figures::ratio;
use crate::process;
use crate::sampler;
use crate::trend::{self, Trend};

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct MemoryStats {
    pub target: String,
    pub pid: i32,
    /// Bytes in use in the dynamic space (sb-kernel:dynamic-usage).
    pub heap_used_bytes: u64,
    /// Size of the dynamic space (sb-ext:dynamic-space-size, set by --dynamic-space-size).
    pub heap_limit_bytes: u64,
    pub heap_used_ratio: f64,
    /// Generations 0..6 (6 is pseudo-static) with their GC parameters.
    pub generations: Vec<Generation>,
    /// Bytes allocated since the image started (sb-ext:get-bytes-consed).
    pub bytes_consed_total: u64,
    /// Bytes allocated between nursery collections (sb-ext:bytes-consed-between-gcs).
    pub nursery_size_bytes: u64,
    /// Resident set size (VmRSS).
    pub rss_bytes: u64,
    /// Peak resident set size (VmHWM).
    pub rss_peak_bytes: u64,
    pub virtual_bytes: u64,
    /// The memory limit that applies to the process: its cgroup limit, else physical memory.
    pub memory_limit_bytes: u64,
    pub memory_limit_source: String,
    pub rss_limit_ratio: f64,
}

/// One GC generation as the agent sees it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Generation {
    pub generation: u8,
    /// Bytes allocated in this generation (sb-ext:generation-bytes-allocated).
    pub bytes: u64,
    /// GCs of this generation since it was last promoted (sb-ext:generation-number-of-gcs).
    pub gc_count: u64,
    pub bytes_consed_between_gcs: u64,
    pub number_of_gcs_before_promotion: u64,
    pub minimum_age_before_gc: f64,
    pub average_age: f64,
}

impl From<reply::Generation> for Generation {
    fn from(g: reply::Generation) -> Self {
        Generation {
            generation: g.generation,
            bytes: g.bytes,
            gc_count: g.gc_count,
            bytes_consed_between_gcs: g.bytes_consed_between_gcs,
            number_of_gcs_before_promotion: g.number_of_gcs_before_promotion,
            minimum_age_before_gc: g.minimum_age_before_gc,
            average_age: g.average_age,
        }
    }
}

pub struct MemoryStatsTool;

impl Tool for MemoryStatsTool {
    const NAME: &'static str = "memory_stats";
    const TITLE: &'static str = "Memory statistics";
    const DESCRIPTION: &'static str = "Heap used and limit, bytes per GC generation with its \
        parameters, bytes consed, nursery size; RSS, peak RSS and virtual size from /proc; the \
        memory limit that applies.";
    const CLASS: Class = Class::Read;
    type Args = Args;
    type Output = MemoryStats;

    async fn run(ctx: &Context, args: Args) -> Result<MemoryStats, ToolError> {
        memory_stats(ctx, args).await
    }

    fn summary(m: &MemoryStats) -> String {
        let mut out = format!(
            "{}: heap {} of {} ({}), RSS {} of {} limit ({}; limit from {}), peak RSS {}",
            target_label(&m.target),
            bytes_u64(m.heap_used_bytes),
            bytes_u64(m.heap_limit_bytes),
            percent(m.heap_used_ratio),
            bytes_u64(m.rss_bytes),
            bytes_u64(m.memory_limit_bytes),
            percent(m.rss_limit_ratio),
            cut(&m.memory_limit_source, MAX_FIELD_CHARS),
            bytes_u64(m.rss_peak_bytes),
        );
        let _ = write!(
            out,
            "\nnursery {}, consed since start {}",
            bytes_u64(m.nursery_size_bytes),
            bytes_u64(m.bytes_consed_total)
        );
        let generations: Vec<String> = m
            .generations
            .iter()
            .map(|g| format!("{}: {}", g.generation, bytes_u64(g.bytes)))
            .collect();
        if !generations.is_empty() {
            let _ = write!(
                out,
                "\n{} generations: {}",
                generations.len(),
                generations.join(", ")
            );
        }
        out
    }
}

async fn memory_stats(ctx: &Context, args: Args) -> Result<MemoryStats, ToolError> {
    let target = ctx.target(args.target.as_deref())?;
    let pid = target.pid().await?;
    let (mem, proc) = alongside(target.client.memory(), || process::memory(pid)).await;
    let (mem, proc) = (mem?, proc?);
    Ok(MemoryStats {
        target: target.name.clone(),
        pid,
        heap_used_bytes: mem.heap_used,
        heap_limit_bytes: mem.heap_limit,
        heap_used_ratio: ratio(mem.heap_used as f64, mem.heap_limit as f64),
        generations: mem.generations.into_iter().map(Generation::from).collect(),
        bytes_consed_total: mem.bytes_consed,
        nursery_size_bytes: mem.nursery_size,
        rss_bytes: proc.rss_bytes,
        rss_peak_bytes: proc.rss_peak_bytes,
        virtual_bytes: proc.virtual_bytes,
        memory_limit_bytes: proc.memory_limit.bytes,
        memory_limit_source: proc.memory_limit.source,
        rss_limit_ratio: ratio(proc.rss_bytes as f64, proc.memory_limit.bytes as f64),
    })
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrendArgs {
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
    /// Seconds to look back over (10..86400; default 600 under `sbmon serve`). A one-shot
    /// `sbmon call`, which has no sampler, samples once a second for this long (at most
    /// 300 s; default 30 s) before it answers.
    #[schemars(range(min = 10, max = 86400))]
    pub window_s: Option<u32>,
}

/// Where the samples came from.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Sampling {
    /// Seconds between samples.
    pub interval_seconds: f64,
    /// Seconds of history the sampler keeps; 0 when this call sampled for itself.
    pub history_seconds: f64,
    /// True when no sampler runs (a one-shot `sbmon call`) and this call sampled live.
    pub live: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct MemoryTrend {
    pub target: String,
    /// The window asked for, in seconds.
    pub window_seconds: f64,
    pub sampling: Sampling,
    #[serde(flatten)]
    pub trend: Trend,
}

const LIVE_WINDOW: u32 = 30;
const MAX_LIVE_WINDOW: u32 = 300;
const LIVE_INTERVAL: Duration = Duration::from_secs(1);

pub struct MemoryTrendTool;

impl Tool for MemoryTrendTool {
    const NAME: &'static str = "memory_trend";
    const TITLE: &'static str = "Memory trend and leak verdict";
    const DESCRIPTION: &'static str = "Memory over a window of samples: heap first/last/min/max, \
        allocation rate, growth of the heap and of the heap retained after collections (the \
        figure a leak moves), collections, and a verdict (stable, growing, leak_suspected, \
        insufficient_data) with its evidence: samples, collections, slope, fit, window. Under \
        `sbmon serve` it reads the sampler's history at once; a one-shot call samples live for \
        window_s.";
    const CLASS: Class = Class::Read;
    type Args = TrendArgs;
    type Output = MemoryTrend;

    async fn run(ctx: &Context, args: TrendArgs) -> Result<MemoryTrend, ToolError> {
        if let Some(w) = args.window_s
            && !(10..=86_400).contains(&w)
        {
            return Err(ToolError::invalid(
                Self::NAME,
                format!("window_s must be 10..86400 seconds, not {w}"),
            ));
        }
        let target = ctx.target(args.target.as_deref())?;
        let min_growth = ctx.config.health.memory.leak.warning;
        if let Some(settings) = target.history.settings() {
            let window = args.window_s.map_or(trend::DEFAULT_WINDOW, f64::from);
            return Ok(MemoryTrend {
                target: target.name.clone(),
                window_seconds: window,
                sampling: Sampling {
                    interval_seconds: settings.interval.as_secs_f64(),
                    history_seconds: settings.history.as_secs_f64(),
                    live: false,
                },
                trend: trend::recent(&target.history, window, min_growth),
            });
        }
        // No sampler: sample now, and fail at once if the target cannot be reached at all.
        target.pid().await?;
        let window = args.window_s.unwrap_or(LIVE_WINDOW).min(MAX_LIVE_WINDOW);
        let mut entries = Vec::new();
        let mut clock = tokio::time::interval(LIVE_INTERVAL);
        for _ in 0..=window {
            clock.tick().await;
            entries.push(sampler::sample(&target).await);
        }
        Ok(MemoryTrend {
            target: target.name.clone(),
            window_seconds: f64::from(window),
            sampling: Sampling {
                interval_seconds: LIVE_INTERVAL.as_secs_f64(),
                history_seconds: 0.0,
                live: true,
            },
            trend: trend::analyse(&entries, min_growth),
        })
    }

    fn summary(m: &MemoryTrend) -> String {
        let t = &m.trend;
        let mut out = format!(
            "{}: {} — {}",
            target_label(&m.target),
            t.verdict.name(),
            cut(&t.reason, 400)
        );
        let _ = write!(
            out,
            "\n{} samples over {:.0} s ({}), {} gaps, {} collections",
            t.samples,
            t.covered_seconds,
            if m.sampling.live {
                "sampled live: no sbmon serve sampler".to_string()
            } else {
                format!("every {:.0} s", m.sampling.interval_seconds)
            },
            t.gaps,
            t.collections
        );
        if let Some(h) = t.heap {
            let _ = write!(
                out,
                "\nheap {} → {} (min {}, max {})",
                bytes_u64(h.first),
                bytes_u64(h.last),
                bytes_u64(h.min),
                bytes_u64(h.max)
            );
        }
        if let Some(r) = t.retained {
            let _ = write!(
                out,
                "; retained after GC {} → {}",
                bytes_u64(r.first),
                bytes_u64(r.last)
            );
        }
        if let Some(a) = t.allocation_bytes_per_second {
            let _ = write!(out, "\nallocating {}/s", bytes(a));
        }
        if let Some(s) = t.seconds_to_heap_limit {
            let _ = write!(out, "; at this rate the heap is full in {}", duration(s));
        }
        out
    }
}
