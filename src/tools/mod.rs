//! The tool catalog: every tool's name, description, safety class, argument and result
//! schemas, and its handler. Front ends (CLI, MCP, HTTP) reach tools only through
//! `Catalog::call`, so they can never disagree about what a tool does.

pub mod export;
pub mod gc;
pub mod health;
pub mod memory;
pub mod runtime;
pub mod summary;
pub mod threads;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::agent::AgentError;
use crate::config::Config;
use crate::histogram::Histogram;
use crate::process::ProcessError;
use crate::targets::{RATE_WINDOW, Target, TargetError, Targets};

/// What a tool may do to the image; `control` and `eval` must be allowed explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Read,
    Control,
    Eval,
}

pub struct ToolDef {
    pub name: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    pub class: Class,
    pub input_schema: fn() -> Value,
    pub output_schema: fn() -> Value,
}

fn schema<T: JsonSchema>() -> Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null)
}

macro_rules! tool {
    ($name:literal, $title:literal, $class:ident, $args:ty, $out:ty, $desc:literal) => {
        ToolDef {
            name: $name,
            title: $title,
            description: $desc,
            class: Class::$class,
            input_schema: schema::<$args>,
            output_schema: schema::<$out>,
        }
    };
}

pub static TOOLS: &[ToolDef] = &[
    tool!(
        "health_check",
        "Health check",
        Read,
        health::Args,
        health::HealthReport,
        "Overall health (healthy, degraded, critical) of an SBCL image, with every check's \
         observed value, thresholds, status and reason: heap, RSS, GC time, threads, fds, \
         agent reachability, tool-call errors."
    ),
    tool!(
        "memory_stats",
        "Memory statistics",
        Read,
        memory::Args,
        memory::MemoryStats,
        "Heap used and limit, bytes per GC generation with its parameters, bytes consed, \
         nursery size; RSS, peak RSS and virtual size from /proc; the memory limit that applies."
    ),
    tool!(
        "gc_stats",
        "GC statistics",
        Read,
        gc::Args,
        gc::GcStats,
        "Garbage collection: count, CPU seconds, share of CPU and wall time, measured pause \
         times (count, sum, max, last, p50/p95/p99, histogram), collections per generation, \
         recent collections with heap before/after."
    ),
    tool!(
        "runtime_stats",
        "Runtime statistics",
        Read,
        runtime::Args,
        runtime::RuntimeStats,
        "Pid, uptime, Lisp and agent versions, features, packages, threads, CPU seconds, GC \
         time share, open file descriptors and their limit, sockets."
    ),
    tool!(
        "metrics_export",
        "Export Prometheus metrics",
        Read,
        export::Args,
        export::MetricsText,
        "The Prometheus text exposition that /metrics serves: heap, generations, GC counts, \
         CPU and pause histograms, threads by state, process figures, health per check."
    ),
    tool!(
        "thread_list",
        "List threads",
        Read,
        threads::ListArgs,
        threads::ThreadList,
        "Every Lisp thread with OS tid, name, main/agent flags, what it waits for (mutex name), \
         OS state and CPU seconds from /proc; plus OS threads Lisp does not list."
    ),
    tool!(
        "thread_inspect",
        "Inspect a thread",
        Read,
        threads::InspectArgs,
        threads::ThreadDetail,
        "One thread (by OS tid or name): state, lock wait, CPU, kernel wait channel and its \
         backtrace (bounded frames; a thread that cannot be interrupted is reported as such)."
    ),
    tool!(
        "thread_dump_all",
        "Dump all threads",
        Read,
        threads::DumpArgs,
        threads::ThreadDump,
        "Backtraces of all threads, each bounded in frames; the whole dump is bounded in time \
         and threads that do not answer are reported, never waited for."
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("unknown tool {0:?}; `sbmon tools` lists the available tools")]
    UnknownTool(String),
    #[error("invalid arguments for {tool}: {message}")]
    InvalidArguments { tool: String, message: String },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("no thread {query}; live threads: {known}")]
    UnknownThread { query: String, known: String },
    #[error("thread name {name:?} is ambiguous; use one of the tids: {matches}")]
    AmbiguousThread { name: String, matches: String },
}

impl ToolError {
    /// Errors in what the caller asked (as opposed to failures while doing it).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ToolError::UnknownTool(_) | ToolError::InvalidArguments { .. }
        )
    }

    pub(crate) fn invalid(tool: &str, message: impl Into<String>) -> Self {
        ToolError::InvalidArguments {
            tool: tool.to_string(),
            message: message.into(),
        }
    }
}

/// Counts and durations of one tool's calls since sbmon started.
#[derive(Debug, Default)]
pub struct ToolCounters {
    pub ok: u64,
    pub error: u64,
    pub duration: Histogram,
}

/// Tool calls: the last minute's outcomes (for the `availability.errors` health check) and
/// per-tool totals (for metrics).
#[derive(Default)]
pub struct CallLog {
    recent: Mutex<VecDeque<(Instant, bool)>>,
    per_tool: Mutex<BTreeMap<&'static str, ToolCounters>>,
}

const CALL_LOG_MAX: usize = 10_000;

impl CallLog {
    pub fn record(&self, tool: &'static str, ok: bool, elapsed: Duration) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() >= CALL_LOG_MAX {
                recent.pop_front();
            }
            recent.push_back((Instant::now(), ok));
        }
        let mut per_tool = self.per_tool.lock().unwrap_or_else(|p| p.into_inner());
        let counters = per_tool.entry(tool).or_default();
        if ok {
            counters.ok += 1;
        } else {
            counters.error += 1;
        }
        counters.duration.observe(elapsed);
    }

    /// (failed, total) over the last minute.
    pub fn last_minute(&self) -> (usize, usize) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while recent
            .front()
            .is_some_and(|(t, _)| t.elapsed() > RATE_WINDOW)
        {
            recent.pop_front();
        }
        let failed = recent.iter().filter(|(_, ok)| !ok).count();
        (failed, recent.len())
    }

    /// Per tool: (name, ok, error, duration reading), in name order.
    pub fn totals(&self) -> Vec<(&'static str, u64, u64, crate::histogram::Reading)> {
        let per_tool = self.per_tool.lock().unwrap_or_else(|p| p.into_inner());
        per_tool
            .iter()
            .map(|(name, c)| (*name, c.ok, c.error, c.duration.read()))
            .collect()
    }
}

/// What handlers share: the targets, the configuration, the call log.
pub struct Context {
    pub targets: Arc<Targets>,
    pub config: Arc<Config>,
    pub calls: CallLog,
}

impl Context {
    pub fn target(&self, name: Option<&str>) -> Result<Arc<Target>, ToolError> {
        Ok(self.targets.resolve(name)?)
    }
}

/// The definition of tool `name`.
pub fn find(name: &str) -> Option<&'static ToolDef> {
    TOOLS.iter().find(|t| t.name == name)
}

pub struct Catalog {
    ctx: Arc<Context>,
}

impl Catalog {
    pub fn new(targets: Arc<Targets>, config: Arc<Config>) -> Self {
        Catalog {
            ctx: Arc::new(Context {
                targets,
                config,
                calls: CallLog::default(),
            }),
        }
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The tools this catalog offers.
    pub fn tools(&self) -> impl Iterator<Item = &'static ToolDef> {
        TOOLS.iter()
    }

    /// Run tool `name` with JSON `args` (an object, or null for none).
    pub async fn call(&self, name: &str, args: Value) -> Result<Value, ToolError> {
        let tool = find(name).ok_or_else(|| ToolError::UnknownTool(name.to_string()))?;
        let ctx = &*self.ctx;
        let started = Instant::now();
        let result = match tool.name {
            "health_check" => run(name, args, |a| health::health_check(ctx, a)).await,
            "memory_stats" => run(name, args, |a| memory::memory_stats(ctx, a)).await,
            "gc_stats" => run(name, args, |a| gc::gc_stats(ctx, a)).await,
            "runtime_stats" => run(name, args, |a| runtime::runtime_stats(ctx, a)).await,
            "metrics_export" => run(name, args, |a| export::metrics_export(ctx, a)).await,
            "thread_list" => run(name, args, |a| threads::thread_list(ctx, a)).await,
            "thread_inspect" => run(name, args, |a| threads::thread_inspect(ctx, a)).await,
            "thread_dump_all" => run(name, args, |a| threads::thread_dump_all(ctx, a)).await,
            other => Err(ToolError::UnknownTool(other.to_string())),
        };
        if !matches!(&result, Err(e) if e.is_usage()) {
            ctx.calls
                .record(tool.name, result.is_ok(), started.elapsed());
        }
        result
    }
}

async fn run<A, R, F>(
    tool: &str,
    args: Value,
    handler: impl FnOnce(A) -> F,
) -> Result<Value, ToolError>
where
    A: DeserializeOwned,
    R: Serialize,
    F: Future<Output = Result<R, ToolError>>,
{
    let args = if args.is_null() {
        Value::Object(Default::default())
    } else {
        args
    };
    if !args.is_object() {
        return Err(ToolError::invalid(tool, "arguments must be a JSON object"));
    }
    let args: A =
        serde_json::from_value(args).map_err(|e| ToolError::invalid(tool, e.to_string()))?;
    let result = handler(args).await?;
    serde_json::to_value(result).map_err(|e| ToolError::invalid(tool, e.to_string()))
}

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `part / whole`, or 0 when `whole` is 0 (an empty or unlimited denominator).
pub(crate) fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}
