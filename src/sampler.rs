//! The sampler: under `sbmon serve`, every target is read every `--sample-interval` (heap,
//! heap retained after collections, generations, bytes consed, GC count and CPU, RSS, process
//! threads and CPU) into its [`History`](crate::samples::History). A reading that fails
//! leaves a gap. A one-shot `sbmon call` runs no sampler; its `memory_trend` samples for the
//! window it is given instead ([`tick`]), and says so.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::agent::AgentError;
use crate::agent::reply::{Gc, Memory};
use crate::figures::unix_now;
use crate::process::{self, ProcessError};
use crate::samples::{Entry, GENERATIONS, Sample, Settings};
use crate::targets::{Target, Targets};

/// Why one reading failed.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// One reading of `target` as the ring keeps it: a sample, or a gap when it cannot be read.
pub async fn sample(target: &Target) -> Entry {
    match read(target).await {
        Ok(sample) => Entry::Sample(sample),
        Err(e) => {
            tracing::debug!(target = %target.name, "sample failed: {e}");
            Entry::Gap { time: unix_now() }
        }
    }
}

async fn read(target: &Target) -> Result<Sample, SampleError> {
    let pid = target.pid().await?;
    let time = unix_now();
    let (memory, gc, proc) = tokio::join!(
        target.client.memory(),
        target.read_gc(),
        crate::blocking::run(move || process::sample(pid))
    );
    let (memory, gc, proc): (Memory, Gc, _) = (memory?, gc?, proc?);
    let (new_collections, retained) = target.history.new_collections(pid, &gc);
    let mut generations = [0; GENERATIONS];
    for g in &memory.generations {
        if let Some(slot) = generations.get_mut(usize::from(g.generation)) {
            *slot = g.bytes;
        }
    }
    Ok(Sample {
        time,
        pid,
        heap_used: memory.heap_used,
        heap_limit: memory.heap_limit,
        retained,
        new_collections,
        generations,
        bytes_consed: memory.bytes_consed,
        gc_count: gc.gc_count,
        gc_cpu_seconds: gc.gc_cpu_seconds,
        rss: proc.rss_bytes,
        threads: proc.threads,
        cpu_seconds: proc.cpu_seconds,
    })
}

/// Per-thread CPU for `cpu_percent`, kept on the target outside the ring: /proc only, nothing
/// asked of the image. A failure is only logged: the sample says whether the target answered.
async fn task_cpu(target: &Target) {
    let Ok(pid) = target.pid().await else { return };
    match crate::blocking::run(move || crate::thread_cpu::Reading::take(pid)).await {
        Ok(reading) => target.task_cpu.record(reading),
        Err(e) => tracing::debug!(target = %target.name, "task CPU not read: {e}"),
    }
}

/// Samples every target of `targets` every `settings.interval` until `stop`. Targets that
/// appear later (discovery) are sampled from the next tick on; a target whose reading is still
/// in flight (a hung image, until the call times out) skips ticks rather than piling them up.
pub async fn run(targets: Arc<Targets>, settings: Settings, stop: CancellationToken) {
    let mut clock = tokio::time::interval(settings.interval);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = clock.tick() => {}
        }
        for target in targets.all() {
            if target.history.settings() != Some(settings) {
                target.history.start(settings);
            }
            if !target.history.begin_tick() {
                continue;
            }
            tokio::spawn(async move {
                let (entry, ()) = tokio::join!(sample(&target), task_cpu(&target));
                target.history.end_tick(entry);
            });
        }
    }
}
