//! One reading of a target: everything health checks and metrics need, fetched once and
//! concurrently (agent ping, heap, GC, threads; /proc for the process, read while the agent
//! answers), so a scrape or a health check asks the agent each question once.

use std::time::Duration;

use crate::agent::AgentError;
use crate::agent::reply::{Gc, LispThread, Memory, Welcome};
use crate::process::{self, ProcessError, ProcessSnapshot, TaskInfo};
use crate::targets::Target;

pub struct Snapshot {
    /// The ping round trip, or why the agent could not be reached.
    pub rtt: Result<Duration, AgentError>,
    /// What the image and its process showed; `None` when the agent was unreachable.
    pub image: Option<Readings>,
}

pub struct Readings {
    pub welcome: Welcome,
    pub memory: Result<Memory, AgentError>,
    pub gc: Result<Gc, AgentError>,
    pub threads: Result<Vec<LispThread>, AgentError>,
    pub process: Result<ProcessSnapshot, ProcessError>,
    /// The process's tasks, when asked for ([`Detail::Tasks`]).
    pub tasks: Option<Result<Vec<TaskInfo>, ProcessError>>,
}

/// How much of /proc a reading covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// The process files: what health checks need.
    Process,
    /// Also one `stat` per task (thread states for metrics); a file per thread, so only when
    /// it is used.
    Tasks,
}

impl Snapshot {
    pub async fn take(target: &Target, detail: Detail) -> Snapshot {
        let c = &target.client;
        // Connects if need be; an unreachable agent ends the reading here, after one timeout.
        let welcome = match c.welcome().await {
            Ok(w) => w,
            Err(e) => {
                return Snapshot {
                    rtt: Err(e),
                    image: None,
                };
            }
        };
        let pid = welcome.pid;
        let calls = async { tokio::join!(c.ping(), c.memory(), target.read_gc(), c.threads()) };
        // On the blocking pool: the fd walk and the task files cost what the target makes
        // them cost. The calls are polled first, so their requests are queued and the agent
        // works while the pool thread reads.
        let read_proc = crate::blocking::run(move || {
            let tasks = (detail == Detail::Tasks).then(|| process::tasks(pid));
            (process::snapshot(pid), tasks)
        });
        let ((rtt, memory, gc, threads), (process, tasks)) = tokio::join!(calls, read_proc);
        match rtt {
            // An agent that stopped answering: report it down rather than half its figures.
            Err(e) => Snapshot {
                rtt: Err(e),
                image: None,
            },
            Ok(rtt) => {
                target.calls.reached();
                Snapshot {
                    rtt: Ok(rtt),
                    image: Some(Readings {
                        welcome,
                        memory,
                        gc,
                        threads,
                        process,
                        tasks,
                    }),
                }
            }
        }
    }
}
