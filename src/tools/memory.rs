//! `memory_stats`: the heap as the image sees it, and the process as /proc sees it.

use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::summary::{MAX_FIELD_CHARS, bytes_u64, cut, percent, target_label};
use super::{Class, Tool, ToolError};
use crate::agent::alongside;
use crate::agent::reply;
use crate::context::Context;
use crate::figures::ratio;
use crate::process;

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
