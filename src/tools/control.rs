//! Control tools (offered only with `--allow control`): `memory_gc`, `gc_tune`, `thread_kill`,
//! `profile_cpu`. They change the image; the agent validates and bounds each action, and the
//! catalog writes every call to the audit log.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::fmt::Write as _;

use super::summary::{MAX_FIELD_CHARS, bytes_i64, bytes_u64, cut};
use super::threads::{ThreadId, find_thread};
use super::{Class, Tool, ToolError};
use crate::agent::ops::{self, GcRunRequest, GcTuneRequest, KillThreadRequest, ProfileRequest};
use crate::agent::reply;
use crate::context::Context;
use crate::flame::{self, FoldedStack};

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GcArgs {
    /// Collect generations 0..N (0..6; default 0, the nursery).
    pub generation: Option<u8>,
    /// Collect every generation (overrides `generation`).
    #[serde(default)]
    pub full: bool,
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GcOutcome {
    pub generation: u8,
    pub full: bool,
    pub heap_before: u64,
    pub heap_after: u64,
    /// Heap before minus after (negative when the heap grew meanwhile).
    pub bytes_freed: i64,
    /// Wall time of the collection, measured in the image with the monotonic clock.
    pub pause_seconds: f64,
    pub gc_count_before: u64,
    pub gc_count_after: u64,
}

async fn memory_gc(ctx: &Context, args: GcArgs) -> Result<GcOutcome, ToolError> {
    let target = ctx.target(args.target.as_deref())?;
    let request = if args.full {
        GcRunRequest::Full
    } else {
        let generation = args.generation.unwrap_or(0);
        if generation > 6 {
            return Err(ToolError::invalid("memory_gc", "generation must be 0..6"));
        }
        GcRunRequest::Generation(generation)
    };
    Ok(target.client.gc_run(request).await?.into())
}

impl From<reply::GcRun> for GcOutcome {
    fn from(r: reply::GcRun) -> Self {
        GcOutcome {
            generation: r.generation,
            full: r.full,
            heap_before: r.heap_before,
            heap_after: r.heap_after,
            bytes_freed: r.bytes_freed,
            pause_seconds: r.pause_seconds,
            gc_count_before: r.gc_count_before,
            gc_count_after: r.gc_count_after,
        }
    }
}

/// New parameters for one generation; absent fields stay as they are.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationTuning {
    /// 0..5 (6, pseudo-static, cannot be tuned).
    pub generation: u8,
    /// Bytes allocated into this generation before it is collected.
    #[serde(alias = "bytes-consed-between-gcs")]
    pub bytes_consed_between_gcs: Option<u64>,
    /// Collections of this generation before its survivors are promoted.
    #[serde(alias = "number-of-gcs-before-promotion")]
    pub number_of_gcs_before_promotion: Option<u64>,
    /// Average age (0..1) the generation must reach before it is collected.
    #[serde(alias = "minimum-age-before-gc")]
    pub minimum_age_before_gc: Option<f64>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TuneArgs {
    /// Bytes allocated between nursery collections (sb-ext:bytes-consed-between-gcs).
    #[serde(alias = "nursery-size-bytes")]
    pub nursery_size_bytes: Option<u64>,
    /// Per-generation parameters.
    #[serde(default)]
    pub generations: Vec<GenerationTuning>,
    /// Also accepted, as a list: bytes-consed-between-gcs for generations 0, 1, ...
    #[serde(default, rename = "generation-sizes", alias = "generation_sizes")]
    pub generation_sizes: Vec<u64>,
    /// Also accepted, as a list: minimum-age-before-gc (0..1) for generations 0, 1, ...
    #[serde(
        default,
        rename = "promotion-thresholds",
        alias = "promotion_thresholds"
    )]
    pub promotion_thresholds: Vec<f64>,
    /// Set sizes below the 1 MiB floor anyway (see `MIN_GC_BYTES`).
    #[serde(default)]
    pub force: bool,
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

/// The smallest nursery or per-generation allocation budget gc_tune sets without `force`:
/// 32 of SBCL's 32 KiB GC pages. Below it the image collects after every few allocation
/// regions: a 1-byte nursery made a test image run 660 collections a second and spend 64 %
/// of its wall time in GC.
pub const MIN_GC_BYTES: u64 = 1024 * 1024;

/// Refuse allocation budgets under [`MIN_GC_BYTES`] unless the caller insists.
fn check_floor(args: &TuneArgs) -> Result<(), ToolError> {
    if args.force {
        return Ok(());
    }
    let sizes = args
        .nursery_size_bytes
        .map(|n| ("nursery_size_bytes".to_string(), n))
        .into_iter()
        .chain(args.generations.iter().filter_map(|g| {
            g.bytes_consed_between_gcs.map(|b| {
                (
                    format!("bytes_consed_between_gcs of generation {}", g.generation),
                    b,
                )
            })
        }))
        .chain(
            args.generation_sizes
                .iter()
                .enumerate()
                .map(|(g, b)| (format!("generation-sizes[{g}]"), *b)),
        );
    for (what, bytes) in sizes {
        if bytes < MIN_GC_BYTES {
            return Err(ToolError::invalid(
                "gc_tune",
                format!(
                    "{what} = {bytes} is below the floor of {MIN_GC_BYTES} bytes (1 MiB, 32 GC \
                     pages): the image would collect after every few allocations and spend \
                     most of its time in GC. Pass \"force\": true to set it anyway"
                ),
            ));
        }
    }
    Ok(())
}

/// GC parameters of the image.
#[derive(Debug, Serialize, JsonSchema)]
pub struct GcParameters {
    pub nursery_size: u64,
    pub generations: Vec<GenerationParameters>,
}

#[derive(Debug, PartialEq, Serialize, JsonSchema)]
pub struct GenerationParameters {
    pub generation: u8,
    pub bytes_consed_between_gcs: u64,
    pub number_of_gcs_before_promotion: u64,
    pub minimum_age_before_gc: f64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TuneOutcome {
    pub before: GcParameters,
    pub after: GcParameters,
}

impl From<reply::GcTune> for TuneOutcome {
    fn from(r: reply::GcTune) -> Self {
        TuneOutcome {
            before: r.before.into(),
            after: r.after.into(),
        }
    }
}

impl From<reply::GcParameters> for GcParameters {
    fn from(r: reply::GcParameters) -> Self {
        GcParameters {
            nursery_size: r.nursery_size,
            generations: r.generations.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<reply::GenerationParameters> for GenerationParameters {
    fn from(r: reply::GenerationParameters) -> Self {
        GenerationParameters {
            generation: r.generation,
            bytes_consed_between_gcs: r.bytes_consed_between_gcs,
            number_of_gcs_before_promotion: r.number_of_gcs_before_promotion,
            minimum_age_before_gc: r.minimum_age_before_gc,
        }
    }
}

/// Merge both spellings into one entry per generation (in the order generations are first
/// named); a value given twice is refused.
fn generation_tunings(args: &TuneArgs) -> Result<Vec<ops::GenerationTuning>, ToolError> {
    let mut merged: Vec<ops::GenerationTuning> = Vec::new();
    fn entry(
        merged: &mut Vec<ops::GenerationTuning>,
        generation: u8,
    ) -> &mut ops::GenerationTuning {
        match merged.iter().position(|g| g.generation == generation) {
            Some(i) => &mut merged[i],
            None => {
                merged.push(ops::GenerationTuning {
                    generation,
                    ..Default::default()
                });
                merged.last_mut().expect("just pushed")
            }
        }
    }
    for g in &args.generations {
        let e = entry(&mut merged, g.generation);
        if let Some(v) = g.bytes_consed_between_gcs {
            set(
                &mut e.bytes_consed_between_gcs,
                fits(v)?,
                "bytes-consed-between-gcs",
                g.generation,
            )?;
        }
        if let Some(v) = g.number_of_gcs_before_promotion {
            set(
                &mut e.number_of_gcs_before_promotion,
                fits(v)?,
                "number-of-gcs-before-promotion",
                g.generation,
            )?;
        }
        if let Some(v) = g.minimum_age_before_gc {
            set(
                &mut e.minimum_age_before_gc,
                v,
                "minimum-age-before-gc",
                g.generation,
            )?;
        }
    }
    for (g, v) in args.generation_sizes.iter().enumerate() {
        let g = generation_index(g)?;
        set(
            &mut entry(&mut merged, g).bytes_consed_between_gcs,
            fits(*v)?,
            "bytes-consed-between-gcs",
            g,
        )?;
    }
    for (g, v) in args.promotion_thresholds.iter().enumerate() {
        let g = generation_index(g)?;
        set(
            &mut entry(&mut merged, g).minimum_age_before_gc,
            *v,
            "minimum-age-before-gc",
            g,
        )?;
    }
    Ok(merged)
}

fn set<T>(slot: &mut Option<T>, value: T, key: &str, generation: u8) -> Result<(), ToolError> {
    if slot.is_some() {
        return Err(ToolError::invalid(
            "gc_tune",
            format!("{key} of generation {generation} is given twice"),
        ));
    }
    *slot = Some(value);
    Ok(())
}

/// The wire's integers are signed 64-bit.
fn fits(v: u64) -> Result<u64, ToolError> {
    i64::try_from(v)
        .map(|_| v)
        .map_err(|_| ToolError::invalid("gc_tune", format!("{v} is too large")))
}

fn generation_index(i: usize) -> Result<u8, ToolError> {
    u8::try_from(i)
        .ok()
        .filter(|g| *g <= 5)
        .ok_or_else(|| ToolError::invalid("gc_tune", "lists cover generations 0..5 at most"))
}

async fn gc_tune(ctx: &Context, args: TuneArgs) -> Result<TuneOutcome, ToolError> {
    check_floor(&args)?;
    let generations = generation_tunings(&args)?;
    if generations.is_empty() && args.nursery_size_bytes.is_none() {
        return Err(ToolError::invalid(
            "gc_tune",
            "nothing to change: give nursery_size_bytes, generations, generation-sizes or \
             promotion-thresholds",
        ));
    }
    let request = GcTuneRequest {
        nursery_size: args.nursery_size_bytes.map(fits).transpose()?,
        generations,
    };
    let target = ctx.target(args.target.as_deref())?;
    Ok(target.client.gc_tune(&request).await?.into())
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KillArgs {
    /// The thread: its OS tid (as in thread_list) or its name.
    #[serde(alias = "thread-id")]
    pub thread_id: ThreadId,
    /// How long to wait for the thread to end, ms (1..60000, default 2000).
    #[serde(default, alias = "timeout-ms")]
    pub timeout_ms: Option<u64>,
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct KillOutcome {
    pub tid: i32,
    pub name: Option<String>,
    /// Whether the thread ended within the timeout.
    pub ended: bool,
    pub waited_seconds: f64,
}

async fn thread_kill(ctx: &Context, args: KillArgs) -> Result<KillOutcome, ToolError> {
    let timeout_ms = args.timeout_ms.unwrap_or(2000);
    if !(1..=60_000).contains(&timeout_ms) {
        return Err(ToolError::invalid(
            "thread_kill",
            "timeout_ms must be 1..60000",
        ));
    }
    let target = ctx.target(args.target.as_deref())?;
    let threads = target.client.threads().await?;
    let thread = find_thread(&threads, &args.thread_id)?;
    let tid = thread.tid.ok_or_else(|| {
        ToolError::invalid("thread_kill", "that thread has no OS tid (it has exited)")
    })?;
    let killed = target
        .client
        .kill_thread(KillThreadRequest { tid, timeout_ms })
        .await?;
    Ok(KillOutcome {
        tid: killed.tid,
        name: killed.name,
        ended: killed.ended,
        waited_seconds: killed.waited_seconds,
    })
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProfileMode {
    /// Where CPU time goes.
    #[default]
    Cpu,
    /// Where allocation happens.
    Alloc,
    /// Wall-clock samples.
    Time,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileArgs {
    /// How long to sample, seconds (0.1..60, default 5).
    pub seconds: Option<f64>,
    /// cpu (default), alloc or time.
    #[serde(default)]
    pub mode: ProfileMode,
    /// Rows to return (1..200, default 20).
    #[serde(default, alias = "max-rows")]
    pub max_rows: Option<u32>,
    /// Distinct stacks to return, most samples first (0..1000, default 100); the rest are
    /// summed into one `[other stacks]` stack, so the counts still add up to `samples`.
    #[serde(default)]
    pub max_stacks: Option<u32>,
    /// Keep the frames that say how a sample was taken rather than what ran (allocation and
    /// thread trampolines, foreign frames, SB-THREAD::RUN, sb-sprof's own); default false:
    /// folded away, so the leaf is the user's function.
    #[serde(default)]
    pub keep_runtime_frames: bool,
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ProfileRow {
    pub function: String,
    pub samples: u64,
    pub self_percent: f64,
    pub cumulative_percent: f64,
}

/// A function's share: `self_percent` of the samples have it as their leaf,
/// `cumulative_percent` have it anywhere on their stack (counted once per sample, so a
/// recursive function never exceeds 100).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Profile {
    pub mode: String,
    pub seconds: f64,
    /// Samples taken in all, over every sampled thread (one sample is one thread's stack at
    /// one tick; in alloc mode, one allocation region); per thread in `thread_samples`.
    pub samples: u64,
    /// By self samples, most first.
    pub rows: Vec<ProfileRow>,
    /// Threads that were sampled.
    #[serde(default)]
    pub threads: Vec<String>,
    /// Samples of each sampled thread; they add up to `samples`.
    #[serde(default)]
    pub thread_samples: Vec<ThreadSampleCount>,
    /// Folded stacks (root first, frames joined by `;`), most samples first; their counts add
    /// up to `samples`.
    #[serde(default)]
    pub stacks: Vec<FoldedStack>,
    /// Distinct stacks summed into `[other stacks]` (beyond max_stacks or the agent's bound).
    #[serde(default)]
    pub stacks_dropped: u64,
    /// Frames kept per stack, leaf-most; a deeper stack starts with `[truncated]`.
    #[serde(default)]
    pub max_depth: u64,
    /// `folded` (default) or `kept`: whether runtime and sampler frames were left out.
    #[serde(default)]
    pub runtime_frames: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ThreadSampleCount {
    pub thread: String,
    pub samples: u64,
}

/// The frame that stands for the stacks beyond the bound.
pub const OTHER_STACKS: &str = "[other stacks]";

/// The agent's stacks as folded stacks: at most `max` distinct ones, the rest (and the
/// agent's own remainder) summed into one `[other stacks]` stack.
fn folded_stacks(profile: &reply::Profile, max: usize) -> (Vec<FoldedStack>, u64) {
    let mut out = Vec::new();
    let mut other = 0;
    let mut dropped = profile.stacks_dropped;
    for s in &profile.stacks {
        if s.other || out.len() == max {
            other += s.samples;
            if !s.other {
                dropped += 1;
            }
            continue;
        }
        let names = s
            .frames
            .iter()
            .map(|&i| profile.frames.get(i).map_or("[?]", String::as_str));
        out.push(FoldedStack {
            stack: flame::fold(names),
            samples: s.samples,
        });
    }
    if other > 0 {
        out.push(FoldedStack {
            stack: OTHER_STACKS.into(),
            samples: other,
        });
    }
    (out, dropped)
}

async fn profile_cpu(ctx: &Context, args: ProfileArgs) -> Result<Profile, ToolError> {
    let seconds = args.seconds.unwrap_or(5.0);
    if !(0.1..=60.0).contains(&seconds) {
        return Err(ToolError::invalid("profile_cpu", "seconds must be 0.1..60"));
    }
    let max_rows = args.max_rows.unwrap_or(20);
    if !(1..=200).contains(&max_rows) {
        return Err(ToolError::invalid("profile_cpu", "max_rows must be 1..200"));
    }
    let max_stacks = args.max_stacks.unwrap_or(100);
    if max_stacks > 1000 {
        return Err(ToolError::invalid(
            "profile_cpu",
            "max_stacks must be 0..1000",
        ));
    }
    let mode = match args.mode {
        ProfileMode::Cpu => ops::ProfileMode::Cpu,
        ProfileMode::Alloc => ops::ProfileMode::Alloc,
        ProfileMode::Time => ops::ProfileMode::Time,
    };
    let target = ctx.target(args.target.as_deref())?;
    let profile = target
        .client
        .profile(ProfileRequest {
            seconds,
            mode,
            max_rows,
            keep_runtime_frames: args.keep_runtime_frames,
        })
        .await?;
    let (stacks, stacks_dropped) = folded_stacks(&profile, max_stacks as usize);
    Ok(Profile {
        stacks,
        stacks_dropped,
        max_depth: profile.max_depth,
        runtime_frames: profile.runtime_frames,
        thread_samples: profile
            .thread_samples
            .into_iter()
            .map(|t| ThreadSampleCount {
                thread: t.thread,
                samples: t.samples,
            })
            .collect(),
        mode: profile.mode,
        seconds: profile.seconds,
        samples: profile.samples,
        rows: profile
            .rows
            .into_iter()
            .map(|r| ProfileRow {
                function: r.function,
                samples: r.samples,
                self_percent: r.self_percent,
                cumulative_percent: r.cumulative_percent,
            })
            .collect(),
        threads: profile.threads,
    })
}

pub struct MemoryGc;

impl Tool for MemoryGc {
    const NAME: &'static str = "memory_gc";
    const TITLE: &'static str = "Run a garbage collection";
    const DESCRIPTION: &'static str = "Collect generation N (default 0) or everything (full): \
        heap before and after, bytes freed and the pause, measured in the image.";
    const CLASS: Class = Class::Control;
    type Args = GcArgs;
    type Output = GcOutcome;

    async fn run(ctx: &Context, args: GcArgs) -> Result<GcOutcome, ToolError> {
        memory_gc(ctx, args).await
    }

    fn summary(g: &GcOutcome) -> String {
        let what = if g.full {
            "full GC".to_string()
        } else {
            format!("GC of generations 0..{}", g.generation)
        };
        format!(
            "{what}: heap {} -> {} ({} freed) in {} s",
            bytes_u64(g.heap_before),
            bytes_u64(g.heap_after),
            bytes_i64(g.bytes_freed),
            g.pause_seconds
        )
    }
}

pub struct GcTune;

impl Tool for GcTune {
    const NAME: &'static str = "gc_tune";
    const TITLE: &'static str = "Tune the garbage collector";
    const DESCRIPTION: &'static str = "Set the nursery size and per-generation GC parameters \
        (bytes between GCs, GCs before promotion, minimum age; also the guide's \
        generation-sizes and promotion-thresholds lists). Every value is validated and nothing \
        changes if one is invalid; sizes under 1 MiB need force. Returns the parameters before \
        and after.";
    const CLASS: Class = Class::Control;
    type Args = TuneArgs;
    type Output = TuneOutcome;

    async fn run(ctx: &Context, args: TuneArgs) -> Result<TuneOutcome, ToolError> {
        gc_tune(ctx, args).await
    }

    /// The nursery, then only the generations that changed.
    fn summary(t: &TuneOutcome) -> String {
        let mut out = format!(
            "nursery {} -> {}",
            bytes_u64(t.before.nursery_size),
            bytes_u64(t.after.nursery_size)
        );
        for (before, after) in t.before.generations.iter().zip(&t.after.generations) {
            if before != after {
                let _ = write!(
                    out,
                    "\ngeneration {}: bytes between GCs {} -> {}, GCs before promotion {} -> \
                     {}, minimum age {} -> {}",
                    after.generation,
                    bytes_u64(before.bytes_consed_between_gcs),
                    bytes_u64(after.bytes_consed_between_gcs),
                    before.number_of_gcs_before_promotion,
                    after.number_of_gcs_before_promotion,
                    before.minimum_age_before_gc,
                    after.minimum_age_before_gc,
                );
            }
        }
        out
    }
}

pub struct ThreadKill;

impl Tool for ThreadKill {
    const NAME: &'static str = "thread_kill";
    const TITLE: &'static str = "Terminate a thread";
    const DESCRIPTION: &'static str = "Terminate a thread (by OS tid or name) and report \
        whether it ended within the timeout. The main thread and the agent's own threads are \
        refused.";
    const CLASS: Class = Class::Control;
    type Args = KillArgs;
    type Output = KillOutcome;

    async fn run(ctx: &Context, args: KillArgs) -> Result<KillOutcome, ToolError> {
        thread_kill(ctx, args).await
    }

    fn summary(k: &KillOutcome) -> String {
        let ended = if k.ended {
            "ended"
        } else {
            "did NOT end within the timeout"
        };
        format!(
            "thread {} ({}) {ended} after {} s",
            k.tid,
            cut(k.name.as_deref().unwrap_or("unnamed"), MAX_FIELD_CHARS),
            k.waited_seconds
        )
    }
}

pub struct ProfileCpu;

impl Tool for ProfileCpu {
    const NAME: &'static str = "profile_cpu";
    const TITLE: &'static str = "Profile the image";
    const DESCRIPTION: &'static str = "Statistical profile with sb-sprof for a few seconds \
        (cpu, alloc or time mode): functions with self and cumulative share of samples (each \
        function counted once per sample), sample count in all and per thread, and the folded \
        stacks a flame graph is drawn from (runtime frames folded away unless \
        keep_runtime_frames). One profile at a time.";
    const CLASS: Class = Class::Control;
    type Args = ProfileArgs;
    type Output = Profile;

    async fn run(ctx: &Context, args: ProfileArgs) -> Result<Profile, ToolError> {
        profile_cpu(ctx, args).await
    }

    fn summary(p: &Profile) -> String {
        let mut out = format!(
            "{} samples over {} s ({} mode); top functions by self samples:",
            p.samples, p.seconds, p.mode
        );
        for row in p.rows.iter().take(20) {
            let _ = write!(
                out,
                "\n  {:>5.1}% self {:>5.1}% cum  {}",
                row.self_percent,
                row.cumulative_percent,
                cut(&row.function, MAX_FIELD_CHARS)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(promotion: u64) -> GenerationParameters {
        GenerationParameters {
            generation: 1,
            bytes_consed_between_gcs: 1 << 20,
            number_of_gcs_before_promotion: promotion,
            minimum_age_before_gc: 0.75,
        }
    }

    #[test]
    fn summaries_carry_their_figures() {
        let gc = MemoryGc::summary(&GcOutcome {
            generation: 6,
            full: true,
            heap_before: 104_857_600,
            heap_after: 20_971_520,
            bytes_freed: 83_886_080,
            pause_seconds: 0.012,
            gc_count_before: 1,
            gc_count_after: 2,
        });
        assert!(
            gc.starts_with("full GC: heap 100 MiB -> 20 MiB (80 MiB freed) in 0.012 s"),
            "{gc}"
        );
        let kill = ThreadKill::summary(&KillOutcome {
            tid: 42,
            name: Some("worker".into()),
            ended: false,
            waited_seconds: 2.0,
        });
        assert!(kill.contains("42 (worker) did NOT end"), "{kill}");
        let tune = GcTune::summary(&TuneOutcome {
            before: GcParameters {
                nursery_size: 1 << 20,
                generations: vec![generation(1)],
            },
            after: GcParameters {
                nursery_size: 2 << 20,
                generations: vec![generation(3)],
            },
        });
        assert!(tune.contains("nursery 1 MiB -> 2 MiB"), "{tune}");
        assert!(tune.contains("GCs before promotion 1 -> 3"), "{tune}");
    }
}
