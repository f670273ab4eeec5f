//! `thread_list`, `thread_inspect`, `thread_dump_all`: Lisp threads joined with their kernel
//! tasks by OS tid, and backtraces bounded in frames and time.

use std::collections::HashMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::fmt::Write as _;

use super::summary::{
    MAX_FIELD_CHARS, cut, frames, lines, or_unknown, seconds, target_label, thread_name,
};
use super::{Class, Tool, ToolError};
use crate::agent::reply::{Backtrace, InDebugger, LispThread};
use crate::context::Context;
use crate::deadlock::{self, Deadlock};
use crate::process::{self, TaskInfo};
use crate::targets::Target;
use crate::thread_cpu::{self, Interval, Source};

const MAX_FRAMES_LIMIT: u32 = 1000;
const TIMEOUT_MS_LIMIT: u64 = 60_000;

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

/// A thread named by its OS tid (number) or its name (string).
#[derive(Debug, Clone, JsonSchema)]
#[schemars(untagged)]
pub enum ThreadId {
    Tid(i64),
    Name(String),
}

const THREAD_ID_EXPECTED: &str = "thread_id must be an OS tid (integer) or a thread name";

/// By hand, so that a float, a boolean, null or a tid out of range gets a message that says
/// what to send instead of serde's "did not match any variant".
impl<'de> Deserialize<'de> for ThreadId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ThreadId;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an OS tid (integer) or a thread name")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ThreadId, E> {
                Ok(ThreadId::Tid(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ThreadId, E> {
                i64::try_from(v)
                    .map(ThreadId::Tid)
                    .map_err(|_| E::custom(THREAD_ID_EXPECTED))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ThreadId, E> {
                Ok(ThreadId::Name(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<ThreadId, E> {
                Ok(ThreadId::Name(v))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<ThreadId, E> {
                Err(E::custom(THREAD_ID_EXPECTED))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<ThreadId, E> {
                Err(E::custom(THREAD_ID_EXPECTED))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<ThreadId, E> {
                Err(E::custom(THREAD_ID_EXPECTED))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InspectArgs {
    /// The thread: its OS tid (as in thread_list) or its name.
    #[serde(alias = "thread-id")]
    pub thread_id: ThreadId,
    /// Most frames to return (1..1000, default 40).
    #[serde(default, alias = "max-frames")]
    pub max_frames: Option<u32>,
    /// How long to wait for the thread to answer, ms (1..60000, default 1000).
    #[serde(default, alias = "timeout-ms")]
    pub timeout_ms: Option<u64>,
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DumpArgs {
    /// Most frames per thread (1..1000, default 40).
    #[serde(default, alias = "max-frames")]
    pub max_frames: Option<u32>,
    /// How long the whole dump may wait for threads to answer, ms (1..60000, default 1000).
    #[serde(default, alias = "timeout-ms")]
    pub timeout_ms: Option<u64>,
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ThreadInfo {
    /// OS thread id (matches /proc/PID/task/TID); the main thread's tid is the pid.
    pub tid: Option<i32>,
    pub name: Option<String>,
    pub main: bool,
    pub alive: bool,
    /// One of the agent's own threads.
    pub agent: bool,
    /// Kernel state: running, sleeping, disk wait, stopped, zombie, ...
    pub os_state: Option<String>,
    /// What the thread waits for in Lisp (mutex name), or null.
    pub lisp_wait: Option<String>,
    /// Kind of object waited for: mutex, waitqueue, semaphore, ...
    pub lisp_wait_type: Option<String>,
    /// OS tid of the thread holding the mutex waited for (`sb-thread:mutex-owner`); null when
    /// not waiting on a held mutex.
    pub owner_tid: Option<i32>,
    /// Name of that owner thread.
    pub owner_name: Option<String>,
    /// Seconds this thread has waited on this same object *since the agent first saw it
    /// waiting* (SBCL does not record when a wait began; the agent notes each wait when a
    /// `:threads` call sees it: every thread tool, health check and /metrics scrape makes one):
    /// a lower bound of the real wait, 0 when first seen by this call; null when not waiting.
    pub waited_seconds: Option<f64>,
    /// True when the thread sits in a debugger: a condition was signalled, nobody handled
    /// it, and nobody answered the debugger (e.g. SBCL's own THREAD-DEADLOCK).
    pub in_debugger: bool,
    /// The condition the debugger was invoked with.
    pub debugger_condition: Option<DebuggerCondition>,
    /// User + system CPU seconds of this thread.
    pub cpu_seconds: Option<f64>,
    /// CPU use over the interval of `cpu_interval` (100 = one CPU all the time), from
    /// /proc/PID/task/TID/stat deltas; null for a thread that did not exist at both reads.
    pub cpu_percent: Option<f64>,
}

/// The condition a thread's debugger was invoked with.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct DebuggerCondition {
    /// The condition's type, e.g. `SB-THREAD:THREAD-DEADLOCK`.
    #[serde(rename = "type")]
    pub type_name: String,
    /// The condition's report (at most 2000 characters).
    pub message: String,
    /// Where the agent found it: `sb-debug:*debug-condition*` (SBCL's debugger) or
    /// `swank::*swank-debugger-condition*` (SLIME's).
    pub found_by: String,
}

impl From<&InDebugger> for DebuggerCondition {
    fn from(d: &InDebugger) -> Self {
        DebuggerCondition {
            type_name: d.type_name.clone(),
            message: d.message.clone(),
            found_by: d.found_by.clone(),
        }
    }
}

/// The interval `cpu_percent` covers.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct CpuInterval {
    pub seconds: f64,
    /// `sampler`: the last two readings of `sbmon serve`'s sampler; `this_call`: no fresh
    /// sampler reading, so this call read /proc twice, 0.5 s apart.
    pub source: Source,
}

impl From<&Interval> for CpuInterval {
    fn from(i: &Interval) -> Self {
        CpuInterval {
            seconds: i.seconds,
            source: i.source,
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ThreadList {
    pub target: String,
    pub pid: i32,
    pub count: usize,
    pub threads: Vec<ThreadInfo>,
    /// Tasks of the process that Lisp does not list (e.g. the finalizer thread).
    pub os_only_threads: Vec<TaskInfo>,
    /// Cycles of the wait-for graph (thread → mutex → owner thread), each with every thread
    /// and mutex in it; empty when there is no deadlock.
    pub deadlocks: Vec<Deadlock>,
    /// How many threads sit in a debugger.
    pub in_debugger: usize,
    /// The interval `cpu_percent` covers.
    pub cpu_interval: CpuInterval,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ThreadDetail {
    pub target: String,
    #[serde(flatten)]
    pub thread: ThreadInfo,
    /// Kernel function the thread sleeps in (/proc/PID/task/TID/wchan).
    pub wchan: Option<String>,
    /// False when the thread did not answer the backtrace request in time (e.g. it runs
    /// without interrupts).
    pub answered: bool,
    pub frames: Vec<String>,
    /// True when more frames existed than were returned.
    pub truncated: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DumpedThread {
    pub tid: Option<i32>,
    pub name: Option<String>,
    /// The condition this thread's debugger was invoked with, when it sits in one.
    pub debugger_condition: Option<DebuggerCondition>,
    pub answered: bool,
    pub frames: Vec<String>,
    pub truncated: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ThreadDump {
    pub target: String,
    pub pid: i32,
    pub threads: Vec<DumpedThread>,
    /// How many threads did not answer in time.
    pub unanswered: usize,
    /// Cycles of the wait-for graph, as in `thread_list`.
    pub deadlocks: Vec<Deadlock>,
}

fn join(thread: &LispThread, task: Option<&TaskInfo>, cpu: &Interval) -> ThreadInfo {
    ThreadInfo {
        tid: thread.tid,
        name: thread.name.clone(),
        main: thread.main,
        alive: thread.alive,
        agent: thread.agent,
        os_state: task.map(|t| t.state.clone()),
        lisp_wait: thread.waiting_for.clone(),
        lisp_wait_type: thread.waiting_for_type.clone(),
        owner_tid: thread.owner_tid,
        owner_name: thread.owner_name.clone(),
        waited_seconds: thread.waiting_for.as_ref().and(thread.waiting_seconds),
        in_debugger: thread.debugger.is_some(),
        debugger_condition: thread.debugger.as_ref().map(DebuggerCondition::from),
        cpu_seconds: task.map(|t| t.cpu_seconds),
        cpu_percent: thread.tid.and_then(|tid| cpu.percent.get(&tid).copied()),
    }
}

/// CPU per thread over the sampler's last interval, or over one this call measures.
async fn cpu(target: &Target, pid: i32) -> Result<Interval, ToolError> {
    let sampling = target.history.settings().map(|s| s.interval);
    Ok(thread_cpu::recent(&target.task_cpu, pid, sampling).await?)
}

async fn thread_list(ctx: &Context, args: ListArgs) -> Result<ThreadList, ToolError> {
    let target = ctx.target(args.target.as_deref())?;
    let pid = target.pid().await?;
    let (lisp, cpu) = tokio::join!(target.client.threads(), cpu(&target, pid));
    let (lisp, cpu) = (lisp?, cpu?);
    let tasks = process::tasks(pid)?;
    let by_tid: HashMap<i32, &TaskInfo> = tasks.iter().map(|t| (t.tid, t)).collect();
    let threads: Vec<ThreadInfo> = lisp
        .iter()
        .map(|t| join(t, t.tid.and_then(|tid| by_tid.get(&tid).copied()), &cpu))
        .collect();
    let os_only_threads = tasks
        .iter()
        .filter(|task| !lisp.iter().any(|t| t.tid == Some(task.tid)))
        .cloned()
        .collect();
    Ok(ThreadList {
        target: target.name.clone(),
        pid,
        count: threads.len(),
        in_debugger: threads.iter().filter(|t| t.in_debugger).count(),
        threads,
        os_only_threads,
        deadlocks: deadlock::cycles(&deadlock::edges(&lisp)),
        cpu_interval: CpuInterval::from(&cpu),
    })
}

/// Find one Lisp thread by tid or by name; a name held by several threads is an error.
pub(crate) fn find_thread<'a>(
    threads: &'a [LispThread],
    id: &ThreadId,
) -> Result<&'a LispThread, ToolError> {
    let known = || {
        threads
            .iter()
            .map(|t| {
                format!(
                    "{} ({})",
                    t.tid.map_or("?".into(), |x| x.to_string()),
                    t.name.as_deref().unwrap_or("unnamed")
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match id {
        ThreadId::Tid(tid) => threads
            .iter()
            .find(|t| t.tid.map(i64::from) == Some(*tid))
            .ok_or_else(|| ToolError::UnknownThread {
                query: format!("with tid {tid}"),
                known: known(),
            }),
        ThreadId::Name(name) => {
            let matches: Vec<&LispThread> = threads
                .iter()
                .filter(|t| t.name.as_deref() == Some(name.as_str()))
                .collect();
            match matches.as_slice() {
                [one] => Ok(one),
                [] => match name.trim().parse::<i64>() {
                    // "1234" from a shell or a model: a tid written as a string.
                    Ok(tid) => find_thread(threads, &ThreadId::Tid(tid)),
                    Err(_) => Err(ToolError::UnknownThread {
                        query: format!("named {:?}", crate::echo::clip(name)),
                        known: known(),
                    }),
                },
                several => Err(ToolError::AmbiguousThread {
                    name: name.clone(),
                    matches: several
                        .iter()
                        .filter_map(|t| t.tid.map(|x| x.to_string()))
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            }
        }
    }
}

fn bounds(
    tool: &str,
    max_frames: Option<u32>,
    timeout_ms: Option<u64>,
) -> Result<(u32, u64), ToolError> {
    let max_frames = max_frames.unwrap_or(40);
    let timeout_ms = timeout_ms.unwrap_or(1000);
    if !(1..=MAX_FRAMES_LIMIT).contains(&max_frames) {
        return Err(ToolError::invalid(
            tool,
            format!("max_frames must be 1..{MAX_FRAMES_LIMIT}"),
        ));
    }
    if !(1..=TIMEOUT_MS_LIMIT).contains(&timeout_ms) {
        return Err(ToolError::invalid(
            tool,
            format!("timeout_ms must be 1..{TIMEOUT_MS_LIMIT}"),
        ));
    }
    Ok((max_frames, timeout_ms))
}

async fn thread_inspect(ctx: &Context, args: InspectArgs) -> Result<ThreadDetail, ToolError> {
    let (max_frames, timeout_ms) = bounds("thread_inspect", args.max_frames, args.timeout_ms)?;
    let target = ctx.target(args.target.as_deref())?;
    let pid = target.pid().await?;
    let (lisp, cpu) = tokio::join!(target.client.threads(), cpu(&target, pid));
    let (lisp, cpu) = (lisp?, cpu?);
    let thread = find_thread(&lisp, &args.thread_id)?;
    let tid = thread.tid.ok_or_else(|| {
        ToolError::invalid(
            "thread_inspect",
            "that thread has no OS tid (it has not started or has exited)",
        )
    })?;
    let bt: Backtrace = target.client.backtrace(tid, max_frames, timeout_ms).await?;
    // The task may have exited between the two readings; report what is known.
    let task = process::task(pid, tid).ok();
    Ok(ThreadDetail {
        target: target.name.clone(),
        thread: join(thread, task.as_ref(), &cpu),
        wchan: task.and_then(|t| t.wchan),
        answered: bt.answered,
        frames: bt.frames,
        truncated: bt.truncated,
    })
}

async fn thread_dump_all(ctx: &Context, args: DumpArgs) -> Result<ThreadDump, ToolError> {
    let (max_frames, timeout_ms) = bounds("thread_dump_all", args.max_frames, args.timeout_ms)?;
    let target = ctx.target(args.target.as_deref())?;
    let pid = target.pid().await?;
    let (dump, lisp) = tokio::join!(
        target.client.backtraces(max_frames, timeout_ms),
        target.client.threads()
    );
    let (dump, lisp) = (dump?, lisp?);
    let threads: Vec<DumpedThread> = dump
        .into_iter()
        .map(|b| DumpedThread {
            debugger_condition: lisp
                .iter()
                .find(|t| b.tid.is_some() && t.tid == b.tid)
                .and_then(|t| t.debugger.as_ref())
                .map(DebuggerCondition::from),
            tid: b.tid,
            name: b.name,
            answered: b.answered,
            frames: b.frames,
            truncated: b.truncated,
        })
        .collect();
    Ok(ThreadDump {
        target: target.name.clone(),
        pid,
        unanswered: threads.iter().filter(|t| !t.answered).count(),
        threads,
        deadlocks: deadlock::cycles(&deadlock::edges(&lisp)),
    })
}

/// Most threads listed by `thread_list`'s summary.
const MAX_THREAD_LINES: usize = 50;
/// Most threads shown by `thread_dump_all`'s summary, and frames shown per thread there.
const MAX_DUMP_THREADS: usize = 30;
const MAX_DUMP_FRAMES: usize = 5;
/// Frames shown by `thread_inspect`'s summary.
const MAX_INSPECT_FRAMES: usize = 15;

/// `tid name [main] [agent] state, waits for X, cpu`
fn thread_line(out: &mut String, t: &ThreadInfo) {
    let _ = write!(
        out,
        "{} {}",
        or_unknown(t.tid),
        thread_name(t.name.as_deref())
    );
    if t.main {
        out.push_str(" [main]");
    }
    if t.agent {
        out.push_str(" [agent]");
    }
    if !t.alive {
        out.push_str(" [dead]");
    }
    let _ = write!(out, " {}", t.os_state.as_deref().unwrap_or("state unknown"));
    if let Some(wait) = &t.lisp_wait {
        let _ = write!(
            out,
            ", waits for {} {}",
            t.lisp_wait_type.as_deref().unwrap_or("object"),
            cut(wait, MAX_FIELD_CHARS)
        );
        if let Some(owner) = t.owner_tid {
            let _ = write!(
                out,
                " held by {owner} {}",
                thread_name(t.owner_name.as_deref())
            );
        }
        if let Some(waited) = t.waited_seconds {
            let _ = write!(out, " (seen waiting {})", seconds(waited));
        }
    }
    if let Some(c) = &t.debugger_condition {
        let _ = write!(out, ", IN DEBUGGER: {}", cut(&c.type_name, MAX_FIELD_CHARS));
    }
    if let Some(cpu) = t.cpu_seconds {
        let _ = write!(out, ", cpu {}", seconds(cpu));
    }
    if let Some(p) = t.cpu_percent {
        let _ = write!(out, " ({p:.0}%)");
    }
}

/// One line per deadlock cycle.
fn deadlock_lines(out: &mut String, deadlocks: &[Deadlock]) {
    for d in deadlocks {
        let _ = write!(
            out,
            "\nDEADLOCK: {}",
            cut(&d.describe(), 4 * MAX_FIELD_CHARS)
        );
    }
}

pub struct ThreadListTool;

impl Tool for ThreadListTool {
    const NAME: &'static str = "thread_list";
    const TITLE: &'static str = "List threads";
    const DESCRIPTION: &'static str = "Every Lisp thread with OS tid, name, main/agent flags, \
        what it waits for (mutex name and the mutex's owner thread, how long it has been seen \
        waiting), whether it sits in the debugger (with the condition), OS state, CPU seconds \
        and CPU percent over the last sample interval from /proc; deadlock cycles (thread → \
        mutex → owner); plus OS threads Lisp does not list.";
    const CLASS: Class = Class::Read;
    type Args = ListArgs;
    type Output = ThreadList;

    async fn run(ctx: &Context, args: ListArgs) -> Result<ThreadList, ToolError> {
        thread_list(ctx, args).await
    }

    fn summary(l: &ThreadList) -> String {
        let waiting = l.threads.iter().filter(|t| t.lisp_wait.is_some()).count();
        let mut out = format!(
            "{}: {} Lisp threads ({} waiting on a lock, {} in the debugger), {} OS-only \
             threads, {} deadlock{}; cpu % over {:.1} s ({})",
            target_label(&l.target),
            l.threads.len(),
            waiting,
            l.in_debugger,
            l.os_only_threads.len(),
            l.deadlocks.len(),
            if l.deadlocks.len() == 1 { "" } else { "s" },
            l.cpu_interval.seconds,
            match l.cpu_interval.source {
                Source::Sampler => "the sampler's last interval",
                Source::ThisCall => "measured by this call",
            }
        );
        deadlock_lines(&mut out, &l.deadlocks);
        lines(
            &mut out,
            &l.threads,
            MAX_THREAD_LINES,
            "threads",
            thread_line,
        );
        out
    }
}

pub struct ThreadInspect;

impl Tool for ThreadInspect {
    const NAME: &'static str = "thread_inspect";
    const TITLE: &'static str = "Inspect a thread";
    const DESCRIPTION: &'static str = "One thread (by OS tid or name): state, lock wait, CPU, \
        kernel wait channel and its backtrace (bounded frames; a thread that cannot be \
        interrupted is reported as such).";
    const CLASS: Class = Class::Read;
    type Args = InspectArgs;
    type Output = ThreadDetail;

    async fn run(ctx: &Context, args: InspectArgs) -> Result<ThreadDetail, ToolError> {
        thread_inspect(ctx, args).await
    }

    fn summary(d: &ThreadDetail) -> String {
        let mut out = format!("{}: ", target_label(&d.target));
        thread_line(&mut out, &d.thread);
        if let Some(wchan) = &d.wchan {
            let _ = write!(out, ", kernel wait {}", cut(wchan, MAX_FIELD_CHARS));
        }
        if !d.answered {
            out.push_str(
                "\nno backtrace: the thread did not answer in time (it may run without \
                 interrupts)",
            );
            return out;
        }
        let _ = write!(
            out,
            "\nbacktrace ({} frames{}):",
            d.frames.len(),
            if d.truncated {
                ", cut at max_frames"
            } else {
                ""
            }
        );
        frames(&mut out, &d.frames, MAX_INSPECT_FRAMES, "  ");
        out
    }
}

pub struct ThreadDumpAll;

impl Tool for ThreadDumpAll {
    const NAME: &'static str = "thread_dump_all";
    const TITLE: &'static str = "Dump all threads";
    const DESCRIPTION: &'static str = "Backtraces of all threads, each bounded in frames; the \
        whole dump is bounded in time and threads that do not answer are reported, never \
        waited for. Threads in the debugger carry their condition; deadlock cycles are \
        listed.";
    const CLASS: Class = Class::Read;
    type Args = DumpArgs;
    type Output = ThreadDump;

    async fn run(ctx: &Context, args: DumpArgs) -> Result<ThreadDump, ToolError> {
        thread_dump_all(ctx, args).await
    }

    fn summary(d: &ThreadDump) -> String {
        let mut out = format!(
            "{}: {} threads, {} did not answer",
            target_label(&d.target),
            d.threads.len(),
            d.unanswered
        );
        deadlock_lines(&mut out, &d.deadlocks);
        lines(
            &mut out,
            &d.threads,
            MAX_DUMP_THREADS,
            "threads",
            |out, t| {
                let _ = write!(
                    out,
                    "{} {}:",
                    or_unknown(t.tid),
                    thread_name(t.name.as_deref())
                );
                if let Some(c) = &t.debugger_condition {
                    let _ = write!(out, " IN DEBUGGER: {}", cut(&c.type_name, MAX_FIELD_CHARS));
                }
                if t.answered {
                    frames(out, &t.frames, MAX_DUMP_FRAMES, "  ");
                } else {
                    out.push_str(" did not answer");
                }
            },
        );
        out
    }
}
