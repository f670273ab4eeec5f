//! The MCP prompts: the usual investigations as guided sequences of tool calls, with
//! the health thresholds in force quoted so a model grades figures as `health_check` does.

use rmcp::ErrorData as McpError;
use rmcp::model::JsonObject;
use serde_json::{Value, json};

use crate::config::Threshold;

/// How prompt texts write example tool calls, with the `target` the client chose, if any.
pub(super) struct Example {
    target: Option<String>,
}

impl Example {
    pub(super) fn new(target: Option<String>) -> Self {
        Example { target }
    }

    /// A tool call written out: `tool {"arg": ...}` with `target` added when one was chosen.
    fn call(&self, tool: &str, args: Value) -> String {
        let mut args = match args {
            Value::Object(map) => map,
            _ => JsonObject::new(),
        };
        if let Some(target) = &self.target {
            args.insert("target".into(), json!(target));
        }
        if args.is_empty() {
            format!("`{tool}` with no arguments")
        } else {
            format!("`{tool}` with arguments `{}`", Value::Object(args))
        }
    }

    /// The opening sentence naming the image.
    fn intro(&self, what: &str) -> String {
        match &self.target {
            Some(t) => format!(
                "{what} of the SBCL image `{t}` (pass \"target\": {} on every sbmon tool call).",
                json!(t)
            ),
            None => format!(
                "{what} of the SBCL image sbmon watches (if it watches several, read the \
                 sbmon://targets resource and pass \"target\" on every call)."
            ),
        }
    }
}

/// The health thresholds in force (the config file's, else the defaults in the README), quoted by
/// the prompts so a model grades figures the way health_check does.
pub(super) struct Limits {
    pub(super) heap: Threshold,
    pub(super) rss: Threshold,
    pub(super) gc_time: Threshold,
    pub(super) threads: Threshold,
    pub(super) fds: Threshold,
    pub(super) agent: Threshold,
}

fn pct(x: f64) -> String {
    format!("{}%", (x * 1000.0).round() / 10.0)
}

impl Limits {
    fn ratio(t: &Threshold) -> String {
        match t.critical {
            Some(c) => format!("degraded from {}, critical from {}", pct(t.warning), pct(c)),
            None => format!("degraded from {}", pct(t.warning)),
        }
    }

    fn heap(&self) -> String {
        format!(
            "heap used / dynamic-space-size: {}",
            Self::ratio(&self.heap)
        )
    }

    fn rss(&self) -> String {
        format!("RSS / memory limit: {}", Self::ratio(&self.rss))
    }

    fn gc(&self) -> String {
        format!(
            "GC CPU time / wall time over the last minute: {}",
            Self::ratio(&self.gc_time)
        )
    }

    fn threads(&self) -> String {
        let t = &self.threads;
        match t.critical {
            Some(c) => format!(
                "Lisp threads: degraded from {}, critical from {c}",
                t.warning
            ),
            None => format!("Lisp threads: degraded from {}", t.warning),
        }
    }

    fn fds(&self) -> String {
        format!("open fds / soft limit: {}", Self::ratio(&self.fds))
    }

    fn agent(&self) -> String {
        format!(
            "agent round trip: degraded from {} s, critical when unreachable",
            self.agent.warning
        )
    }
}

pub(super) struct PromptDef {
    pub(super) name: &'static str,
    pub(super) title: &'static str,
    pub(super) description: &'static str,
    pub(super) text: fn(&Example, &Limits) -> String,
}

pub(super) static PROMPTS: &[PromptDef] = &[
    PromptDef {
        name: "basic_health_check",
        title: "Basic health check",
        description: "Overall health, then memory and runtime figures: is this SBCL image fine?",
        text: basic_health_check,
    },
    PromptDef {
        name: "memory_investigation",
        title: "Memory investigation",
        description: "Heap, generations and RSS, sampled twice with a GC in between: is memory \
                      growing, and where?",
        text: memory_investigation,
    },
    PromptDef {
        name: "gc_pressure",
        title: "GC pressure",
        description: "GC count, CPU share and measured pauses: is garbage collection costing \
                      too much time or pausing too long?",
        text: gc_pressure,
    },
    PromptDef {
        name: "thread_health",
        title: "Thread health",
        description: "Threads, lock waits and backtraces: are threads stuck, contending or \
                      too many?",
        text: thread_health,
    },
    PromptDef {
        name: "incident_response",
        title: "Incident response",
        description: "Something is wrong now: health, a full thread dump, memory, GC and \
                      runtime figures, gathered in order and summarised.",
        text: incident_response,
    },
];

/// The optional `target` argument of every prompt; an empty string counts as absent (some
/// clients send empty strings for unfilled optional arguments).
pub(super) fn prompt_target(arguments: Option<&JsonObject>) -> Result<Option<String>, McpError> {
    let Some(arguments) = arguments else {
        return Ok(None);
    };
    if let Some(unknown) = arguments.keys().find(|k| k.as_str() != "target") {
        return Err(McpError::invalid_params(
            format!("unknown prompt argument {unknown:?}; the only argument is \"target\""),
            None,
        ));
    }
    match arguments.get("target") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(other) => Err(McpError::invalid_params(
            format!("prompt argument \"target\" must be a string, not {other}"),
            None,
        )),
    }
}

pub(super) fn basic_health_check(ex: &Example, l: &Limits) -> String {
    format!(
        "{intro}\n\n\
         1. Call {health}. Its `status` is the worst of its checks: healthy, degraded or \
         critical. For every check that is not healthy, read `observed`, the thresholds and \
         `reason`.\n\
         2. Call {memory}. Look at `heap_used_ratio` ({heap}) and `rss_limit_ratio` ({rss}); \
         note `memory_limit_source` (cgroup or physical memory).\n\
         3. Call {runtime}. Note `uptime_seconds`, `thread_count`, `gc_time_ratio` and \
         `open_fds` against `max_fds` ({fds}).\n\n\
         Thresholds in force: {heap}; {rss}; {gc}; {threads}; {fds}; {agent}.\n\n\
         Answer with the overall status, then one line per finding that is not healthy with \
         its figure and threshold, and what to look at next (memory_investigation, \
         gc_pressure or thread_health). If a call fails because the agent is unreachable, say \
         so: the image is down or has not started its agent.",
        intro = ex.intro("Check the health"),
        health = ex.call("health_check", json!({})),
        memory = ex.call("memory_stats", json!({})),
        runtime = ex.call("runtime_stats", json!({})),
        heap = l.heap(),
        rss = l.rss(),
        gc = l.gc(),
        threads = l.threads(),
        fds = l.fds(),
        agent = l.agent(),
    )
}

fn memory_investigation(ex: &Example, l: &Limits) -> String {
    format!(
        "{intro}\n\n\
         1. Call {memory}. Record `heap_used_bytes`, `heap_limit_bytes`, `heap_used_ratio` \
         ({heap}), `rss_bytes` and `rss_limit_ratio` ({rss}), and the bytes of each entry in \
         `generations` (0 is the nursery, 1-5 older objects, 6 pseudo-static).\n\
         2. Is it growing, and is it a leak? Call {trend}. Under `sbmon serve` it reads the \
         sampler's history at once; a one-shot call samples for `window_s` first. Report \
         `verdict` (stable, growing, leak_suspected, insufficient_data) with its `reason`, \
         `retained_growth.slope` (bytes a second the heap after older-generation collections \
         grows: the figure a leak moves), `allocation_bytes_per_second`, and \
         `seconds_to_heap_limit` when leaking. Heavy allocation that is freed is not a leak; \
         `insufficient_data` says what is missing (too few samples or collections, a gap, a \
         restart): say so rather than guess.\n\
         3. What fills the heap? Call {histogram} (it walks the heap: tens of milliseconds \
         per 100 MB, on the agent's worker). Note `snapshot_id`. The rows are types by bytes; \
         structure and CLOS instances appear under their class names. To see what grows, \
         wait (a minute or more, or until {trend} shows growth) and call it again with \
         `since` set to that id: the types that grew come first.\n\
         4. Who holds it? For the type that grows, call {retainers} with that type name: each \
         path runs from a root (a global variable, a thread's stack) to one object. It stops \
         every thread while it searches (about a second per 100 MB): say so before calling \
         it on a large heap.\n\
         5. If RSS is much larger than the heap limit suggests, say so: memory outside the \
         Lisp heap (foreign libraries, thread stacks) is growing.\n\n\
         Answer with the heap and RSS figures, the verdict and its evidence, the types that \
         fill or grow the heap, what holds them, and whether the heap will reach its limit \
         soon. Nothing here changes the image.",
        intro = ex.intro("Investigate the memory"),
        memory = ex.call("memory_stats", json!({})),
        trend = ex.call("memory_trend", json!({})),
        histogram = ex.call("heap_histogram", json!({"top": 20})),
        retainers = ex.call("heap_retainers", json!({"type": "MYAPP::SESSION"})),
        heap = l.heap(),
        rss = l.rss(),
    )
}

fn gc_pressure(ex: &Example, l: &Limits) -> String {
    format!(
        "{intro}\n\n\
         1. Call {gc}. Read `gc_count`, `gc_cpu_seconds`, `gc_time_ratio` (since start) and \
         `gc_time_ratio_last_minute` ({gc_limit}), and `gc_cpu_share` (GC share of the \
         process's CPU).\n\
         2. Read `pauses`: `last_seconds`, `p50_seconds`, `p95_seconds`, `p99_seconds` and \
         `max_seconds` are wall-clock pauses measured inside the image (`measured_by` says \
         how; percentiles are estimated from the histogram). Pauses of tens of milliseconds \
         hurt interactive latency; `collections_by_generation` shows which generations are \
         collected and how long they take.\n\
         3. Call {watch}: the collections of the next 10 s as they happen, each with its \
         generation, pause and bytes freed. `count` over `seconds` is the collection rate; \
         many collections per second means a small nursery for this allocation rate, and \
         `pause_max_seconds` is the worst pause of the window.\n\
         4. Call {memory}: `nursery_size_bytes` (bytes consed between GCs) and the \
         generations' parameters explain the rate.\n\n\
         Answer with the GC time share against its thresholds, the pause figures, the \
         collection rate, and whether a larger nursery (bytes-consed-between-gcs) or less \
         allocation would help.",
        intro = ex.intro("Assess the garbage collection pressure"),
        gc = ex.call("gc_stats", json!({})),
        watch = ex.call("gc_watch", json!({"seconds": 10})),
        memory = ex.call("memory_stats", json!({})),
        gc_limit = l.gc(),
    )
}

fn thread_health(ex: &Example, l: &Limits) -> String {
    format!(
        "{intro}\n\n\
         1. Call {list}. Count the threads ({threads}). For each thread read `os_state` \
         (running, sleeping, disk wait, ...), `lisp_wait` (the name of the mutex it waits \
         for) and `cpu_seconds`. Threads flagged `agent` belong to sbmon's agent; \
         `os_only_threads` are runtime threads Lisp does not list (e.g. the finalizer).\n\
         2. Several threads waiting on the same mutex is contention; find the thread holding \
         it by inspecting the others. A thread with rising `cpu_seconds` across two calls is \
         busy; one in disk wait for long is blocked in the kernel.\n\
         3. For each suspicious thread call {inspect} (a thread is named by its OS tid, a \
         number, or by its name; an ambiguous name is an error listing the tids). Read \
         `frames` (the backtrace, innermost first), `wchan` (the kernel wait) and \
         `answered` (false when the thread did not take the interrupt in time, e.g. inside \
         without-interrupts).\n\n\
         Answer with the thread count, the threads that wait or spin and on what, the lock \
         contention if any (mutex, waiters, likely holder), and the backtrace lines that \
         show where they are.",
        intro = ex.intro("Check the threads"),
        list = ex.call("thread_list", json!({})),
        inspect = ex.call(
            "thread_inspect",
            json!({"thread_id": "worker-1", "max_frames": 20})
        ),
        threads = l.threads(),
    )
}

fn incident_response(ex: &Example, l: &Limits) -> String {
    format!(
        "{intro}\n\n\
         1. Identify: call {health}. Note every check that is degraded or critical. If the \
         agent is unreachable, stop here and report it: the image is down, hung, or has not \
         started its agent (`sbmon targets` lists the agents).\n\
         2. Gather, before anything changes: call {dump} for every thread's backtrace \
         (threads that do not answer in time are listed as such), then {memory} and \
         {gc}.\n\
         3. Find the cause: call {runtime} and {list}. Look for high CPU (`cpu_user_seconds`, \
         per-thread `cpu_seconds`), many threads waiting on one mutex (`lisp_wait`), \
         excessive GC time, a heap near its limit, or file descriptors near their limit.\n\
         4. What happened before: call {trend} for the last hour of samples (under `sbmon \
         serve`): the heap's first, last, min and max, the allocation rate, GC time, and \
         whether memory leaks. A `memory.leak` check that is degraded means the same; then \
         follow the memory_investigation prompt.\n\n\
         Thresholds in force: {heap}; {rss}; {gc_limit}; {threads}; {fds}; {agent}.\n\n\
         Answer with: the status and failing checks; the most likely cause with the figures \
         and backtrace lines that support it; and the next action for the operator. These \
         tools only read the image; do not suggest they changed anything.",
        intro = ex.intro("Respond to an incident"),
        health = ex.call("health_check", json!({})),
        dump = ex.call(
            "thread_dump_all",
            json!({"max_frames": 30, "timeout_ms": 2000})
        ),
        memory = ex.call("memory_stats", json!({})),
        gc = ex.call("gc_stats", json!({})),
        runtime = ex.call("runtime_stats", json!({})),
        list = ex.call("thread_list", json!({})),
        trend = ex.call("memory_trend", json!({"window_s": 3600})),
        heap = l.heap(),
        rss = l.rss(),
        gc_limit = l.gc(),
        threads = l.threads(),
        fds = l.fds(),
        agent = l.agent(),
    )
}
