//! One reading of a target: everything health checks and metrics need, fetched once and
//! concurrently (agent ping, heap, GC, threads; /proc for the process, read while the agent
//! answers), so a scrape or a health check asks the agent each question once.
//!
//! Requests that arrive while a reading of the same target is in flight share it: a burst of
//! probes (`/health`, `/health/ready`, `/metrics`, ...) costs the image one reading. A request
//! after a reading completes takes a fresh one; only the last is kept, for readers that must
//! not ask the image themselves (the web console shows the watcher's last look).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::Shared;

use crate::agent::reply::{Gc, LispThread, Memory, Welcome};
use crate::agent::{AgentClient, AgentError};
use crate::process::{self, ProcessError, ProcessSnapshot, TaskInfo};

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

impl Detail {
    /// Whether a reading of this detail answers a request for `wanted`: one with the tasks
    /// also has everything a process-only request needs, not the reverse.
    fn serves(self, wanted: Detail) -> bool {
        self == Detail::Tasks || wanted == Detail::Process
    }
}

impl Snapshot {
    /// A new reading through `client`, not shared with anyone.
    pub async fn read(c: &AgentClient, detail: Detail) -> Snapshot {
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
        let calls = async { tokio::join!(c.ping(), c.memory(), c.gc(), c.threads()) };
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
            Ok(rtt) => Snapshot {
                rtt: Ok(rtt),
                image: Some(Readings {
                    welcome,
                    memory,
                    gc,
                    threads,
                    process,
                    tasks,
                }),
            },
        }
    }
}

type Reading = Shared<oneshot::Receiver<Arc<Snapshot>>>;

/// The readings of one target in flight, at most one per [`Detail`].
#[derive(Default)]
pub struct InFlight {
    slots: Mutex<Slots>,
    /// The last reading completed, with the Unix time it completed.
    last: Mutex<Option<(f64, Arc<Snapshot>)>>,
}

#[derive(Default)]
struct Slots {
    process: Option<(u64, Reading)>,
    tasks: Option<(u64, Reading)>,
    next_id: u64,
}

impl Slots {
    fn slot(&mut self, detail: Detail) -> &mut Option<(u64, Reading)> {
        match detail {
            Detail::Process => &mut self.process,
            Detail::Tasks => &mut self.tasks,
        }
    }
}

enum Role<'a> {
    /// Wait for the reading another request is taking.
    Follow(Reading),
    /// Take the reading and hand it to those who joined.
    Lead(Lead<'a>),
}

/// The request taking a reading. Finished or dropped, it frees its slot, so a request that
/// comes after the reading completes takes a new one.
struct Lead<'a> {
    in_flight: &'a InFlight,
    id: u64,
    detail: Detail,
    result: Option<oneshot::Sender<Arc<Snapshot>>>,
}

impl InFlight {
    /// The last reading that completed and when (Unix time), whoever took it; asks nothing.
    pub fn last(&self) -> Option<(f64, Arc<Snapshot>)> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The reading in flight that covers `detail` if there is one, else a new one taken with
    /// `read`, which requests arriving meanwhile join.
    pub async fn share<F, Fut>(&self, detail: Detail, read: F) -> Arc<Snapshot>
    where
        F: Fn(Detail) -> Fut,
        Fut: Future<Output = Snapshot>,
    {
        loop {
            match self.join_or_lead(detail) {
                Role::Follow(reading) => match reading.await {
                    Ok(snapshot) => return snapshot,
                    // Its leader was dropped before it finished (the client went away);
                    // the slot is free again, so take the lead or join whoever took it.
                    Err(oneshot::Canceled) => continue,
                },
                Role::Lead(lead) => {
                    let snapshot = Arc::new(read(lead.detail).await);
                    *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((crate::figures::unix_now(), snapshot.clone()));
                    lead.finish(snapshot.clone());
                    return snapshot;
                }
            }
        }
    }

    fn join_or_lead(&self, detail: Detail) -> Role<'_> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for running in [Detail::Tasks, Detail::Process] {
            if running.serves(detail)
                && let Some((_, reading)) = slots.slot(running)
            {
                return Role::Follow(reading.clone());
            }
        }
        slots.next_id += 1;
        let id = slots.next_id;
        let (tx, rx) = oneshot::channel();
        *slots.slot(detail) = Some((id, rx.shared()));
        Role::Lead(Lead {
            in_flight: self,
            id,
            detail,
            result: Some(tx),
        })
    }
}

impl Lead<'_> {
    fn finish(mut self, snapshot: Arc<Snapshot>) {
        // Free the slot before answering: whoever comes once the reading is done must not
        // get it.
        self.release();
        if let Some(tx) = self.result.take() {
            // Nobody joined, or all who did have gone: nothing to tell.
            let _ = tx.send(snapshot);
        }
    }

    fn release(&self) {
        let mut slots = self
            .in_flight
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let slot = slots.slot(self.detail);
        if slot.as_ref().is_some_and(|(id, _)| *id == self.id) {
            *slot = None;
        }
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        // Dropped before finishing: free the slot first, so the followers that wake up on
        // the dropped sender find it empty (or taken by a new leader) and do not wait on it.
        if self.result.is_some() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> Arc<Snapshot> {
        Arc::new(Snapshot {
            rtt: Ok(Duration::from_micros(1)),
            image: None,
        })
    }

    fn lead(role: Role<'_>) -> Lead<'_> {
        match role {
            Role::Lead(lead) => lead,
            Role::Follow(_) => panic!("expected to lead"),
        }
    }

    fn follow(role: Role<'_>) -> Reading {
        match role {
            Role::Follow(reading) => reading,
            Role::Lead(_) => panic!("expected to follow"),
        }
    }

    #[test]
    fn requests_join_a_reading_that_covers_them() {
        let f = InFlight::default();
        let process = lead(f.join_or_lead(Detail::Process));
        let joined_process = follow(f.join_or_lead(Detail::Process));
        // A process-only reading lacks the tasks: a request for them takes its own.
        let tasks = lead(f.join_or_lead(Detail::Tasks));
        let joined_tasks = follow(f.join_or_lead(Detail::Tasks));
        // With both in flight, a process request joins the fuller one.
        let joined_either = follow(f.join_or_lead(Detail::Process));

        let (a, b) = (empty(), empty());
        tasks.finish(b.clone());
        process.finish(a.clone());
        let got = |r: Reading| futures::executor::block_on(r).unwrap();
        assert!(Arc::ptr_eq(&got(joined_process), &a));
        assert!(Arc::ptr_eq(&got(joined_tasks), &b));
        assert!(Arc::ptr_eq(&got(joined_either), &b));
    }

    #[test]
    fn a_finished_reading_is_not_handed_out_again() {
        let f = InFlight::default();
        lead(f.join_or_lead(Detail::Tasks)).finish(empty());
        let _again = lead(f.join_or_lead(Detail::Process));
        let _tasks = lead(f.join_or_lead(Detail::Tasks));
    }

    #[test]
    fn followers_of_a_dropped_leader_are_told_and_can_lead() {
        let f = InFlight::default();
        let first = lead(f.join_or_lead(Detail::Process));
        let joined = follow(f.join_or_lead(Detail::Process));
        drop(first);
        assert!(futures::executor::block_on(joined).is_err());
        let second = lead(f.join_or_lead(Detail::Process));
        let joined = follow(f.join_or_lead(Detail::Process));
        second.finish(empty());
        assert!(futures::executor::block_on(joined).is_ok());
    }
}
