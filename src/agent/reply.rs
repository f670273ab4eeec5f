//! Typed values of the agent's operations (docs/protocol.md, "Operations and their values").
//! Only `Deserialize`: tools map these into result types of their own, so that renaming a
//! keyword on the wire cannot silently change a tool's output schema.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Welcome {
    pub protocol: i64,
    pub agent_version: String,
    /// The image's name, from `(sbmon-agent:start :name ...)`; absent from older agents.
    #[serde(default)]
    pub name: Option<String>,
    pub pid: i32,
    pub lisp_version: String,
    /// Operations the agent implements, and flags such as `pause-timing`.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Classes of operations the agent serves (`read`, `control`, `eval`), as given to
    /// `(sbmon-agent:start :allow ...)`; the others it answers with NOT-ALLOWED. Empty from an
    /// agent older than this field, which served every class.
    #[serde(default)]
    pub allow: Vec<String>,
    /// SBCL internals the agent looked for and did not find (a newer SBCL renamed them);
    /// the capability flags that need them are absent from `capabilities`.
    #[serde(default)]
    pub missing_internals: Vec<String>,
}

impl Welcome {
    /// True when the agent serves operations of `class` (`read`, `control` or `eval`).
    pub fn allows(&self, class: &str) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|c| c == class)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Memory {
    pub heap_used: u64,
    pub heap_limit: u64,
    pub bytes_consed: u64,
    pub nursery_size: u64,
    #[serde(default)]
    pub generations: Vec<Generation>,
}

/// One GC generation as the agent sees it.
#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
pub struct Gc {
    pub gc_count: Option<u64>,
    pub gc_count_source: String,
    pub gc_cpu_seconds: f64,
    pub agent_start_time: f64,
    #[serde(default)]
    pub pause_timing: bool,
    pub measured_by: MeasuredBy,
    pub pauses: PauseTotals,
    #[serde(default)]
    pub buckets: Vec<f64>,
    #[serde(default)]
    pub histograms: Vec<PauseHistogram>,
    #[serde(default)]
    pub recent: Vec<PauseRecord>,
}

/// How each GC figure was obtained inside the image.
#[derive(Debug, Clone, Deserialize)]
pub struct MeasuredBy {
    pub count: String,
    pub cpu: String,
    pub pause: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PauseTotals {
    pub count: u64,
    pub sum_seconds: f64,
    pub max_seconds: f64,
    pub last_seconds: f64,
    pub last_time: Option<f64>,
    pub bytes_freed: Option<i64>,
}

/// Pause counts per bucket (not cumulative) for one generation; one more count than bounds.
#[derive(Debug, Clone, Deserialize)]
pub struct PauseHistogram {
    pub generation: u8,
    pub count: u64,
    pub sum_seconds: f64,
    pub counts: Vec<u64>,
}

/// One measured collection.
#[derive(Debug, Clone, Deserialize)]
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

/// `:runtime`: what the image is.
#[derive(Debug, Clone, Deserialize)]
pub struct Runtime {
    pub pid: i32,
    pub lisp_implementation: String,
    pub lisp_version: String,
    pub agent_version: String,
    pub machine_type: Option<String>,
    pub software_version: Option<String>,
    pub features_count: u64,
    /// *features* (at most 200 names).
    #[serde(default)]
    pub features: Vec<String>,
    pub package_count: u64,
    /// Threads Lisp knows about.
    pub thread_count: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct LispThread {
    pub tid: Option<i32>,
    pub name: Option<String>,
    pub alive: bool,
    pub main: bool,
    #[serde(default)]
    pub agent: bool,
    #[serde(default)]
    pub daemon: bool,
    /// The name of what the thread waits on ("" when unnamed), or `None`.
    pub waiting_for: Option<String>,
    /// "mutex", "waitqueue", "semaphore", or another type name.
    pub waiting_for_type: Option<String>,
    /// Identifies the waited object within one reply (mutex names need not be unique).
    #[serde(default)]
    pub waiting_for_id: Option<u64>,
    /// The thread holding the mutex waited for (`sb-thread:mutex-owner`).
    #[serde(default)]
    pub owner_tid: Option<i32>,
    #[serde(default)]
    pub owner_name: Option<String>,
    /// Seconds since a `:threads` call first saw this thread waiting on this same object: a
    /// lower bound of the real wait (0 when first seen by this call).
    #[serde(default)]
    pub waiting_seconds: Option<f64>,
    /// The condition this thread's debugger was invoked with and nobody answered yet.
    #[serde(default)]
    pub debugger: Option<InDebugger>,
}

/// A mutex a thread in the debugger was about to wait for, named as [`LispThread`]'s wait.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Waited {
    /// The object's name ("" when unnamed); `None` when the thread waits on nothing.
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// "mutex", "waitqueue", "semaphore", or another type name.
    #[serde(default)]
    pub waiting_for_type: Option<String>,
    /// Identifies the object within one reply (mutex names need not be unique).
    #[serde(default)]
    pub waiting_for_id: Option<u64>,
    /// The thread holding the mutex (`sb-thread:mutex-owner`), when it is a held mutex.
    #[serde(default)]
    pub owner_tid: Option<i32>,
    #[serde(default)]
    pub owner_name: Option<String>,
}

/// A thread inside a debugger.
#[derive(Debug, Clone, Deserialize)]
pub struct InDebugger {
    /// The condition's type, e.g. `SB-THREAD:THREAD-DEADLOCK`.
    #[serde(rename = "type")]
    pub type_name: String,
    pub message: String,
    /// The variable the condition was found in (SBCL's debugger or SLIME's).
    pub found_by: String,
    /// For a THREAD-DEADLOCK: the mutex the thread was about to wait for when SBCL stopped it.
    #[serde(default)]
    pub wanted: Option<Waited>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Backtrace {
    pub tid: Option<i32>,
    pub name: Option<String>,
    pub answered: bool,
    #[serde(default)]
    pub frames: Vec<String>,
    #[serde(default)]
    pub truncated: bool,
}

/// `:gc-run`.
#[derive(Debug, Clone, Deserialize)]
pub struct GcRun {
    pub generation: u8,
    pub full: bool,
    pub heap_before: u64,
    pub heap_after: u64,
    pub bytes_freed: i64,
    pub pause_seconds: f64,
    pub gc_count_before: u64,
    pub gc_count_after: u64,
}

/// `:gc-tune`: the parameters before and after.
#[derive(Debug, Clone, Deserialize)]
pub struct GcTune {
    pub before: GcParameters,
    pub after: GcParameters,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GcParameters {
    pub nursery_size: u64,
    pub generations: Vec<GenerationParameters>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GenerationParameters {
    pub generation: u8,
    pub bytes_consed_between_gcs: u64,
    pub number_of_gcs_before_promotion: u64,
    pub minimum_age_before_gc: f64,
}

/// `:kill-thread`.
#[derive(Debug, Clone, Deserialize)]
pub struct KilledThread {
    pub tid: i32,
    pub name: Option<String>,
    pub ended: bool,
    pub waited_seconds: f64,
}

/// `:profile`.
#[derive(Debug, Clone, Deserialize)]
pub struct Profile {
    pub mode: String,
    pub seconds: f64,
    pub samples: u64,
    pub rows: Vec<ProfileRow>,
    #[serde(default)]
    pub threads: Vec<String>,
    #[serde(default)]
    pub thread_samples: Vec<ThreadSamples>,
    /// Frame names, indexed by the stacks' `frames`.
    #[serde(default)]
    pub frames: Vec<String>,
    #[serde(default)]
    pub stacks: Vec<ProfileStack>,
    #[serde(default)]
    pub stacks_dropped: u64,
    #[serde(default)]
    pub max_stacks: u64,
    #[serde(default)]
    pub max_depth: u64,
    /// `folded` or `kept`.
    #[serde(default)]
    pub runtime_frames: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ThreadSamples {
    pub thread: String,
    pub samples: u64,
}

/// One distinct stack: indices into `Profile::frames`, root first.
#[derive(Debug, Clone, Deserialize)]
pub struct ProfileStack {
    pub samples: u64,
    #[serde(default)]
    pub frames: Vec<usize>,
    /// The sum of the stacks beyond the agent's bound.
    #[serde(default)]
    pub other: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProfileRow {
    pub function: String,
    pub samples: u64,
    pub self_percent: f64,
    pub cumulative_percent: f64,
}

/// `:eval` that ran to the end.
#[derive(Debug, Clone, Deserialize)]
pub struct Evaluation {
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub output_truncated: bool,
    #[serde(default)]
    pub forms: u64,
    #[serde(default)]
    pub seconds: f64,
}

/// `:reload-system`.
#[derive(Debug, Clone, Deserialize)]
pub struct Reload {
    pub system: String,
    pub forced: bool,
    pub seconds: f64,
    #[serde(default)]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub output_truncated: bool,
}

/// `:heap-histogram`.
#[derive(Debug, Clone, Deserialize)]
pub struct HeapHistogram {
    /// Absent when the walk was truncated (such a walk is not kept).
    pub snapshot_id: Option<u64>,
    /// The snapshot the deltas are relative to.
    pub since: Option<u64>,
    pub generation: Option<u8>,
    #[serde(default)]
    pub truncated: bool,
    pub seconds: f64,
    pub heap_used: u64,
    pub objects: u64,
    pub bytes: u64,
    pub types: u64,
    #[serde(default)]
    pub rows: Vec<HeapRow>,
    pub rows_omitted: u64,
    pub objects_delta: Option<i64>,
    pub bytes_delta: Option<i64>,
    /// Ids of the snapshots the agent keeps, oldest first.
    #[serde(default)]
    pub snapshots: Vec<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HeapRow {
    #[serde(rename = "type")]
    pub type_name: String,
    pub count: u64,
    pub bytes: u64,
    pub count_delta: Option<i64>,
    pub bytes_delta: Option<i64>,
}

/// `:heap-retainers`.
#[derive(Debug, Clone, Deserialize)]
pub struct HeapRetainers {
    #[serde(rename = "type")]
    pub type_name: String,
    pub sampled: u64,
    pub walk_seconds: f64,
    #[serde(default)]
    pub walk_truncated: bool,
    pub search_seconds: f64,
    #[serde(default)]
    pub paths: Vec<RetainerPath>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RetainerPath {
    pub target: String,
    pub root: RetainerRoot,
    /// The first symbol on the path whose value holds the next object.
    pub global: Option<String>,
    pub depth: u64,
    pub steps_omitted: u64,
    #[serde(default)]
    pub steps: Vec<RetainerStep>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RetainerRoot {
    pub kind: String,
    pub thread: Option<String>,
    pub symbol: Option<String>,
    pub current: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RetainerStep {
    #[serde(rename = "type")]
    pub type_name: String,
    pub via: String,
    pub generation: Option<i64>,
    pub symbol: Option<String>,
}
