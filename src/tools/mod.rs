//! The tool catalog: every tool's name, description, safety class, argument and result
//! schemas, and its handler. Front ends (CLI, MCP, HTTP) reach tools only through
//! `Catalog::call`, so they can never disagree about what a tool does.

pub mod control;
pub mod eval;
pub mod export;
pub mod gc;
pub mod health;
pub mod memory;
pub mod runtime;
pub mod summary;
pub mod threads;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::agent::AgentError;
use crate::audit::Audit;
use crate::config::Config;
use crate::histogram::Histogram;
use crate::process::ProcessError;
use crate::targets::{Outcome, Target, TargetError, Targets};

/// What a tool may do to the image; `control` and `eval` must be allowed explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Read,
    Control,
    Eval,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Control => "control",
            Class::Eval => "eval",
        }
    }
}

/// Which tool classes this sbmon may use; `read` always, the others only when the operator
/// said so (`--allow control`, `--allow eval`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allow {
    pub control: bool,
    pub eval: bool,
}

impl Allow {
    pub fn permits(self, class: Class) -> bool {
        match class {
            Class::Read => true,
            Class::Control => self.control,
            Class::Eval => self.eval,
        }
    }
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
        "gc_watch",
        "Watch garbage collections",
        Read,
        gc::WatchArgs,
        gc::GcWatch,
        "The garbage collections of the next few seconds as they happen (0.1..60 s, or until \
         max_events): generation, measured pause, CPU, heap before and after, bytes freed; \
         with the sum and maximum of the pauses seen."
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
    tool!(
        "memory_gc",
        "Run a garbage collection",
        Control,
        control::GcArgs,
        control::GcOutcome,
        "Collect generation N (default 0) or everything (full): heap before and after, bytes \
         freed and the pause, measured in the image."
    ),
    tool!(
        "gc_tune",
        "Tune the garbage collector",
        Control,
        control::TuneArgs,
        control::TuneOutcome,
        "Set the nursery size and per-generation GC parameters (bytes between GCs, GCs before \
         promotion, minimum age; also the guide's generation-sizes and promotion-thresholds \
         lists). Every value is validated and nothing changes if one is invalid; returns the \
         parameters before and after."
    ),
    tool!(
        "thread_kill",
        "Terminate a thread",
        Control,
        control::KillArgs,
        control::KillOutcome,
        "Terminate a thread (by OS tid or name) and report whether it ended within the timeout. \
         The main thread and the agent's own threads are refused."
    ),
    tool!(
        "profile_cpu",
        "Profile the image",
        Control,
        control::ProfileArgs,
        control::Profile,
        "Statistical profile with sb-sprof for a few seconds (cpu, alloc or time mode): \
         functions with self and cumulative share of samples, sample count, sampled threads. \
         One profile at a time."
    ),
    tool!(
        "repl_eval",
        "Evaluate Lisp code",
        Eval,
        eval::EvalArgs,
        eval::EvalResult,
        "Read and evaluate all forms of code in a package (default CL-USER) with a timeout, on \
         a thread of its own, never entering the debugger: printed values of the last form and \
         captured output (bounded), or the condition with a bounded backtrace."
    ),
    tool!(
        "code_reload_system",
        "Reload an ASDF system",
        Eval,
        eval::ReloadArgs,
        eval::Reload,
        "Load (or with force, fully reload) an ASDF system in the image: warnings, output and \
         duration; a clear error for a system ASDF cannot find."
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("unknown tool {:?}; `sbmon tools` lists the available tools", clip(.0))]
    UnknownTool(String),
    #[error(
        "{tool} is a {class} tool and this sbmon was started without it: restart sbmon with \
         --allow {class} to use it"
    )]
    NotAllowed { tool: String, class: &'static str },
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

/// Agent error kinds that mean the caller asked for something wrong or impossible, not that
/// the image failed (docs/protocol.md).
const CALLER_KINDS: &[&str] = &["BAD-ARGUMENT", "UNKNOWN-THREAD", "NOT-ALLOWED", "REFUSED"];

impl ToolError {
    /// Errors in what the caller asked (as opposed to failures while doing it).
    pub fn is_usage(&self) -> bool {
        match self {
            ToolError::UnknownTool(_)
            | ToolError::NotAllowed { .. }
            | ToolError::InvalidArguments { .. } => true,
            ToolError::Agent(AgentError::Remote { kind, .. }) => kind == "BAD-ARGUMENT",
            _ => false,
        }
    }

    /// What this failure says about the target: `None` when it is the caller's own mistake
    /// (which must not make a healthy image look broken).
    pub fn target_outcome(&self) -> Option<Outcome> {
        match self {
            ToolError::Agent(e) if e.is_unreachable() => Some(Outcome::Unreachable),
            ToolError::Agent(AgentError::Remote { kind, .. })
                if CALLER_KINDS.contains(&kind.as_str()) =>
            {
                None
            }
            ToolError::Agent(_) | ToolError::Process(_) => Some(Outcome::Failed),
            _ => None,
        }
    }

    pub(crate) fn invalid(tool: &str, message: impl Into<String>) -> Self {
        ToolError::InvalidArguments {
            tool: tool.to_string(),
            message: clip(&message.into()),
        }
    }
}

/// Echoed input longer than this is cut, so a huge argument cannot make a huge error.
const ECHO_CHARS: usize = 300;

/// `text` cut to a few hundred characters, saying how long it was.
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(ECHO_CHARS) {
        None => text.to_string(),
        Some((end, _)) => format!("{}... ({} chars)", &text[..end], text.chars().count()),
    }
}

/// Counts and durations of one tool's calls since sbmon started.
#[derive(Debug, Default)]
pub struct ToolCounters {
    pub ok: u64,
    pub error: u64,
    pub duration: Histogram,
}

/// Per-tool totals of calls (for metrics). What a target's own failures do to its health
/// is kept per target ([`Target::calls`](crate::targets::Target)).
#[derive(Default)]
pub struct CallLog {
    per_tool: Mutex<BTreeMap<&'static str, ToolCounters>>,
}

impl CallLog {
    /// A log that reports `tools` from the start, at zero until called, so that rates and
    /// alerts over their counters work before the first call.
    pub fn counting(tools: impl IntoIterator<Item = &'static str>) -> Self {
        let per_tool = tools.into_iter().map(|t| (t, ToolCounters::default()));
        CallLog {
            per_tool: Mutex::new(per_tool.collect()),
        }
    }

    pub fn record(&self, tool: &'static str, ok: bool, elapsed: Duration) {
        let mut per_tool = self.per_tool.lock().unwrap_or_else(|p| p.into_inner());
        let counters = per_tool.entry(tool).or_default();
        if ok {
            counters.ok += 1;
        } else {
            counters.error += 1;
        }
        counters.duration.observe(elapsed);
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
    allow: Allow,
    audit: Audit,
}

impl Catalog {
    /// A read-only catalog.
    pub fn new(targets: Arc<Targets>, config: Arc<Config>) -> Self {
        Catalog::with_policy(targets, config, Allow::default(), Audit::default())
    }

    /// A catalog that also offers the classes `allow` names, auditing their calls.
    pub fn with_policy(
        targets: Arc<Targets>,
        config: Arc<Config>,
        allow: Allow,
        audit: Audit,
    ) -> Self {
        Catalog {
            ctx: Arc::new(Context {
                targets,
                config,
                calls: CallLog::counting(
                    TOOLS
                        .iter()
                        .filter(|t| allow.permits(t.class))
                        .map(|t| t.name),
                ),
            }),
            allow,
            audit,
        }
    }

    /// The definition of `name` if this catalog offers it; else why not.
    pub fn check(&self, name: &str) -> Result<&'static ToolDef, ToolError> {
        let tool = find(name).ok_or_else(|| ToolError::UnknownTool(name.to_string()))?;
        if !self.allow.permits(tool.class) {
            return Err(ToolError::NotAllowed {
                tool: tool.name.to_string(),
                class: tool.class.name(),
            });
        }
        Ok(tool)
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The tools this catalog offers (control and eval tools only when allowed).
    pub fn tools(&self) -> impl Iterator<Item = &'static ToolDef> + '_ {
        TOOLS.iter().filter(|t| self.allow.permits(t.class))
    }

    /// Run tool `name` with JSON `args` (an object, or null for none).
    pub async fn call(&self, name: &str, args: Value) -> Result<Value, ToolError> {
        self.call_from("internal", name, args).await
    }

    /// `call`, saying which front end asked (for the audit log of control and eval calls).
    pub async fn call_from(
        &self,
        front_end: &'static str,
        name: &str,
        args: Value,
    ) -> Result<Value, ToolError> {
        let tool = self.check(name)?;
        let audited = (tool.class != Class::Read).then(|| args.clone());
        let target = args
            .get("target")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let ctx = &*self.ctx;
        let started = Instant::now();
        let result = match tool.name {
            "health_check" => run(name, args, |a| health::health_check(ctx, a)).await,
            "memory_stats" => run(name, args, |a| memory::memory_stats(ctx, a)).await,
            "gc_stats" => run(name, args, |a| gc::gc_stats(ctx, a)).await,
            "gc_watch" => run(name, args, |a| gc::gc_watch(ctx, a)).await,
            "runtime_stats" => run(name, args, |a| runtime::runtime_stats(ctx, a)).await,
            "metrics_export" => run(name, args, |a| export::metrics_export(ctx, a)).await,
            "thread_list" => run(name, args, |a| threads::thread_list(ctx, a)).await,
            "thread_inspect" => run(name, args, |a| threads::thread_inspect(ctx, a)).await,
            "thread_dump_all" => run(name, args, |a| threads::thread_dump_all(ctx, a)).await,
            "memory_gc" => run(name, args, |a| control::memory_gc(ctx, a)).await,
            "gc_tune" => run(name, args, |a| control::gc_tune(ctx, a)).await,
            "thread_kill" => run(name, args, |a| control::thread_kill(ctx, a)).await,
            "profile_cpu" => run(name, args, |a| control::profile_cpu(ctx, a)).await,
            "repl_eval" => run(name, args, |a| eval::repl_eval(ctx, a)).await,
            "code_reload_system" => run(name, args, |a| eval::code_reload_system(ctx, a)).await,
            other => Err(ToolError::UnknownTool(other.to_string())),
        };
        if !matches!(&result, Err(e) if e.is_usage()) {
            ctx.calls
                .record(tool.name, result.is_ok(), started.elapsed());
        }
        let outcome = match &result {
            Ok(_) => Some(Outcome::Ok),
            Err(e) => e.target_outcome(),
        };
        if let Some(outcome) = outcome
            && let Ok(target) = ctx.targets.resolve(target.as_deref())
        {
            target.calls.record(outcome);
        }
        if let Some(args) = audited {
            self.audit
                .record(front_end, tool.name, &args, &result, started.elapsed());
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
