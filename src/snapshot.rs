//! One reading of a target: everything health checks and metrics need, fetched once and
//! concurrently (agent ping, heap, GC, threads; /proc for the process), so a
//! scrape or a health check asks the agent each question once.

use std::time::Duration;

use crate::agent::reply::{Gc, LispThread, Memory, Welcome};
use crate::agent::{AgentError, alongside};
use crate::process::{self, ProcessError, ProcessSnapshot};
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
}

impl Snapshot {
    pub async fn take(target: &Target) -> Snapshot {
        let c = &target.client;
        // Ping first: an unreachable agent then costs one timeout, not one per question.
        let rtt = match c.ping().await {
            Ok(rtt) => rtt,
            Err(e) => {
                return Snapshot {
                    rtt: Err(e),
                    image: None,
                };
            }
        };
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
        let calls = async { tokio::join!(c.memory(), c.gc(), c.threads()) };
        let ((memory, gc, threads), process) = alongside(calls, || process::snapshot(pid)).await;
        Snapshot {
            rtt: Ok(rtt),
            image: Some(Readings {
                welcome,
                memory,
                gc,
                threads,
                process,
            }),
        }
    }
}
