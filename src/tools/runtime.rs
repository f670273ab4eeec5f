//! `runtime_stats`: what the image is (versions, features, packages) and what the process
//! uses (CPU, threads, file descriptors, sockets).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::summary::{duration, percent, seconds, target_label};
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
pub struct RuntimeStats {
    pub target: String,
    /// The image as the agent describes it (pid, versions, features, packages, threads).
    #[serde(flatten)]
    pub image: Runtime,
    pub uptime_seconds: f64,
    /// Unix time the process started (from /proc).
    pub start_time_unix: f64,
    /// Tasks of the process as the kernel counts them (Lisp threads plus runtime threads).
    pub os_thread_count: u64,
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    /// GC CPU seconds per wall second since the process started.
    pub gc_time_ratio: f64,
    pub open_fds: u64,
    /// Soft limit on open files; null when unlimited.
    pub max_fds: Option<u64>,
    pub socket_count: u64,
}

// The doc comment is part of the output schema (schemars takes a flattened type's doc as the
// description of `RuntimeStats`), kept as it was when this was the agent's reply type.
/// What the image is: `runtime_stats` returns these fields as they are.
#[derive(Debug, Clone, Serialize, JsonSchema)]
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

impl From<reply::Runtime> for Runtime {
    fn from(r: reply::Runtime) -> Self {
        Runtime {
            pid: r.pid,
            lisp_implementation: r.lisp_implementation,
            lisp_version: r.lisp_version,
            agent_version: r.agent_version,
            machine_type: r.machine_type,
            software_version: r.software_version,
            features_count: r.features_count,
            features: r.features,
            package_count: r.package_count,
            thread_count: r.thread_count,
        }
    }
}

pub struct RuntimeStatsTool;

impl Tool for RuntimeStatsTool {
    const NAME: &'static str = "runtime_stats";
    const TITLE: &'static str = "Runtime statistics";
    const DESCRIPTION: &'static str = "Pid, uptime, Lisp and agent versions, features, \
        packages, threads, CPU seconds, GC time share, open file descriptors and their limit, \
        sockets.";
    const CLASS: Class = Class::Read;
    type Args = Args;
    type Output = RuntimeStats;

    async fn run(ctx: &Context, args: Args) -> Result<RuntimeStats, ToolError> {
        runtime_stats(ctx, args).await
    }

    fn summary(r: &RuntimeStats) -> String {
        format!(
            "{}: {} {} (agent {}), pid {}, up {}\n{} Lisp threads ({} OS threads), {} packages; \
             CPU user {} sys {}, GC {} of wall time\nfds {} of {}, {} sockets",
            target_label(&r.target),
            r.image.lisp_implementation,
            r.image.lisp_version,
            r.image.agent_version,
            r.image.pid,
            duration(r.uptime_seconds),
            r.image.thread_count,
            r.os_thread_count,
            r.image.package_count,
            seconds(r.cpu_user_seconds),
            seconds(r.cpu_system_seconds),
            percent(r.gc_time_ratio),
            r.open_fds,
            r.max_fds.map_or("unlimited".into(), |m| m.to_string()),
            r.socket_count,
        )
    }
}

async fn runtime_stats(ctx: &Context, args: Args) -> Result<RuntimeStats, ToolError> {
    let target = ctx.target(args.target.as_deref())?;
    let pid = target.pid().await?;
    let calls = async { tokio::try_join!(target.client.runtime(), target.read_gc()) };
    let (calls, proc) = alongside(calls, || process::snapshot(pid)).await;
    let ((rt, gc), proc) = (calls?, proc?);
    Ok(RuntimeStats {
        target: target.name.clone(),
        image: rt.into(),
        uptime_seconds: proc.uptime_seconds,
        start_time_unix: proc.start_time_unix,
        os_thread_count: proc.num_threads,
        cpu_user_seconds: proc.cpu_user_seconds,
        cpu_system_seconds: proc.cpu_system_seconds,
        gc_time_ratio: ratio(gc.gc_cpu_seconds, proc.uptime_seconds),
        open_fds: proc.open_fds,
        max_fds: proc.max_fds,
        socket_count: proc.socket_count,
    })
}
