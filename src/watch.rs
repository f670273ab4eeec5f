//! The watcher: under `sbmon serve`, every `--sample-interval`, each target is read (one
//! shared [`Snapshot`]), graded ([`health::grade`]) and compared with what it showed the
//! time before. What changed goes into the event journal:
//!
//! - a check's status changed (`health.<check>`; `memory.leak` as `leak`, `threads.stuck` as
//!   `deadlock` when either side is critical, else `stuck`): critical, warning when degraded,
//!   info when it recovered. A check that could not be observed (`unknown`) changes nothing:
//!   its last known status stands. Every check starts as healthy, so a target that is already
//!   degraded when first seen is reported.
//! - the target was lost (`target.lost`: its agent stopped answering, critical; or it is no
//!   longer watched because its process exited, warning), found (`target.found`, info) or
//!   restarted between two looks (`target.restarted`, a new pid, warning). While a target
//!   cannot be reached its checks are not compared: `target.lost` says it all.
//! - a collection paused the image at least `journal.gc_pause_seconds` (`gc.pause`, warning),
//!   from the records of the agent's GC ring that are new since the look before (the ring
//!   holds the last 64 collections, which is more than an interval sees in practice; a ring
//!   that turned over in between is logged).
//! - a Lisp thread started or ended (`thread.started`, `thread.ended`, info), from the thread
//!   lists of two looks; the agent's own threads are left out, and past
//!   [`MAX_THREAD_EVENTS`] a tick records one event for the rest.
//!
//! The first look at a target only sets the baselines of threads and collections.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agent::reply::{Gc, LispThread};
use crate::context::Context;
use crate::health::{self, HealthReport, Status};
use crate::journal::{NewEvent, Severity};
use crate::snapshot::{Detail, Snapshot};
use crate::targets::Target;

/// Thread events one look records one by one; the rest go into one event.
pub const MAX_THREAD_EVENTS: usize = 10;

/// What the watcher remembers of one target between looks.
#[derive(Default)]
struct Seen {
    /// A look is in flight (a hung image): the next tick skips this target.
    busy: bool,
    /// Whether its agent answered the last look; `None` before the first.
    reachable: Option<bool>,
    pid: Option<i32>,
    /// The last known status of each check (`unknown` never replaces one).
    checks: HashMap<String, Status>,
    /// The Lisp threads of the last look, when it could read them.
    threads: Option<BTreeSet<ThreadKey>>,
    /// The newest collection seen: (pid, seq).
    last_gc: Option<(i32, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ThreadKey {
    tid: Option<i32>,
    name: Option<String>,
}

impl ThreadKey {
    fn label(&self) -> String {
        let name = self.name.as_deref().map_or("(unnamed)".into(), |n| {
            format!("{:?}", crate::echo::clip_to(n, 80))
        });
        match self.tid {
            Some(tid) => format!("{name} (tid {tid})"),
            None => name,
        }
    }
}

/// Watches every target of a context and records what changes in its journal.
pub struct Watcher {
    ctx: Arc<Context>,
    seen: Mutex<HashMap<String, Seen>>,
}

impl Watcher {
    pub fn new(ctx: Arc<Context>) -> Self {
        Watcher {
            ctx,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One look at every target, all at once; returns when all are done. (`run` instead
    /// starts each look on its own, so one hung target never holds up the others.)
    pub async fn tick(&self) {
        self.forget_gone();
        let targets = self.ctx.targets.all();
        futures::future::join_all(targets.iter().map(|t| self.look(t))).await;
    }

    /// Targets no longer watched (their process exited): a `target.lost` event each, and
    /// what was remembered of them is dropped.
    pub fn forget_gone(&self) {
        let names: BTreeSet<String> = self
            .ctx
            .targets
            .all()
            .iter()
            .map(|t| t.name.clone())
            .collect();
        let gone: Vec<(String, Seen)> = {
            let mut seen = self.lock();
            let names_gone: Vec<String> = seen
                .keys()
                .filter(|n| !names.contains(*n))
                .cloned()
                .collect();
            names_gone
                .into_iter()
                .filter_map(|n| seen.remove_entry(&n))
                .collect()
        };
        for (name, seen) in gone {
            let pid = seen.pid.map_or(String::new(), |p| format!(" (pid {p})"));
            self.ctx.journal.record(NewEvent::new(
                Some(&name),
                "target.lost",
                Severity::Warning,
                format!("{name}{pid} is no longer watched: its agent's socket is gone (the process exited)"),
                json!({"reason": "gone", "pid": seen.pid}),
            ));
        }
    }

    /// Look at `target` once and record what changed since the last look; nothing if a look
    /// at it is still in flight.
    pub async fn look(&self, target: &Target) {
        {
            let mut seen = self.lock();
            let s = seen.entry(target.name.clone()).or_default();
            if s.busy {
                return;
            }
            s.busy = true;
        }
        let snapshot = target.snapshot(Detail::Process).await;
        let report = health::grade(&self.ctx, target, &snapshot);
        let pause = self.ctx.config.journal.gc_pause_seconds;
        let events = {
            let mut seen = self.lock();
            let s = seen.entry(target.name.clone()).or_default();
            s.busy = false;
            compare(s, &target.name, &snapshot, &report, pause)
        };
        for event in events {
            self.ctx.journal.record(event);
        }
    }
}

/// Under `sbmon serve`: look at every target every `interval` until `stop`.
pub async fn run(ctx: Arc<Context>, interval: Duration, stop: CancellationToken) {
    let watcher = Arc::new(Watcher::new(ctx.clone()));
    let mut clock = tokio::time::interval(interval);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = clock.tick() => {}
        }
        watcher.forget_gone();
        for target in ctx.targets.all() {
            let watcher = watcher.clone();
            tokio::spawn(async move { watcher.look(&target).await });
        }
    }
}

/// The events between what `s` remembers and this look; `s` then remembers this look.
fn compare(
    s: &mut Seen,
    name: &str,
    snapshot: &Snapshot,
    report: &HealthReport,
    pause: f64,
) -> Vec<NewEvent> {
    let mut events = Vec::new();
    let Some(image) = &snapshot.image else {
        if s.reachable != Some(false) {
            let why = match &snapshot.rtt {
                Err(e) => e.to_string(),
                Ok(_) => "no answer".into(),
            };
            events.push(NewEvent::new(
                Some(name),
                "target.lost",
                Severity::Critical,
                format!("{name} cannot be reached: {why}"),
                json!({"reason": "unreachable", "error": why, "pid": s.pid}),
            ));
        }
        s.reachable = Some(false);
        return events;
    };
    let pid = image.welcome.pid;
    match (s.reachable, s.pid) {
        (Some(true), Some(before)) if before != pid => {
            events.push(NewEvent::new(
                Some(name),
                "target.restarted",
                Severity::Warning,
                format!("{name} is a new process: pid {pid}, was {before}"),
                json!({"pid": pid, "previous_pid": before}),
            ));
        }
        (Some(true), _) => {}
        (previously, _) => {
            let again = if previously.is_some() { " again" } else { "" };
            events.push(NewEvent::new(
                Some(name),
                "target.found",
                Severity::Info,
                format!(
                    "{name} answers{again}: pid {pid}, {}",
                    image.welcome.lisp_version
                ),
                json!({"pid": pid, "lisp_version": image.welcome.lisp_version}),
            ));
        }
    }
    if s.pid != Some(pid) {
        // A new process: its threads and collections start over.
        s.threads = None;
    }
    s.reachable = Some(true);
    s.pid = Some(pid);

    for check in &report.checks {
        if check.status == Status::Unknown {
            continue;
        }
        let before = s
            .checks
            .insert(check.name.clone(), check.status)
            .unwrap_or(Status::Healthy);
        if before != check.status {
            events.push(check_event(name, check, before));
        }
    }
    if let Ok(gc) = &image.gc {
        pauses(s, name, pid, gc, pause, &mut events);
    }
    if let Ok(threads) = &image.threads {
        thread_changes(s, name, threads, &mut events);
    }
    events
}

/// The kind of a check's change: the issue's own names for the leak and stuck-thread checks.
fn check_kind(check: &str, before: Status, now: Status) -> String {
    match check {
        "memory.leak" => "leak".into(),
        "threads.stuck" if before == Status::Critical || now == Status::Critical => {
            "deadlock".into()
        }
        "threads.stuck" => "stuck".into(),
        other => format!("health.{other}"),
    }
}

fn check_event(name: &str, check: &health::Check, before: Status) -> NewEvent {
    let severity = match check.status {
        Status::Critical => Severity::Critical,
        Status::Degraded => Severity::Warning,
        Status::Healthy | Status::Unknown => Severity::Info,
    };
    NewEvent::new(
        Some(name),
        check_kind(&check.name, before, check.status),
        severity,
        format!(
            "{name}: {} went from {} to {}: {}",
            check.name,
            before.name(),
            check.status.name(),
            check.reason
        ),
        json!({
            "check": check.name,
            "from": before,
            "to": check.status,
            "observed": check.observed,
            "warning": check.warning,
            "critical": check.critical,
            "reason": check.reason,
        }),
    )
}

fn pauses(s: &mut Seen, name: &str, pid: i32, gc: &Gc, pause: f64, events: &mut Vec<NewEvent>) {
    let after = s.last_gc.filter(|(p, _)| *p == pid).map(|(_, seq)| seq);
    if let Some(newest) = gc.recent.iter().map(|r| r.seq).max() {
        s.last_gc = Some((pid, newest));
    }
    // The first look at a process: what it did before is not news.
    let Some(after) = after else { return };
    let fresh: Vec<_> = gc.recent.iter().filter(|r| r.seq > after).collect();
    if let Some(oldest) = fresh.iter().map(|r| r.seq).min()
        && oldest > after + 1
    {
        tracing::debug!(
            target = name,
            "{} collections between two looks were beyond the agent's ring",
            oldest - after - 1
        );
    }
    for r in fresh.into_iter().filter(|r| r.wall_seconds >= pause) {
        events.push(NewEvent::new(
            Some(name),
            "gc.pause",
            Severity::Warning,
            format!(
                "{name}: a collection of generation {} paused the image {:.0} ms (threshold {:.0} ms); heap {:.1} -> {:.1} MiB",
                r.generation,
                r.wall_seconds * 1e3,
                pause * 1e3,
                r.heap_before as f64 / 1048576.0,
                r.heap_after as f64 / 1048576.0
            ),
            json!({
                "seq": r.seq,
                "generation": r.generation,
                "wall_seconds": r.wall_seconds,
                "cpu_seconds": r.cpu_seconds,
                "heap_before_bytes": r.heap_before,
                "heap_after_bytes": r.heap_after,
                "time": r.time,
                "threshold_seconds": pause,
            }),
        ));
    }
}

fn thread_changes(s: &mut Seen, name: &str, threads: &[LispThread], events: &mut Vec<NewEvent>) {
    let now: BTreeSet<ThreadKey> = threads
        .iter()
        .filter(|t| t.alive && !t.agent)
        .map(|t| ThreadKey {
            tid: t.tid,
            name: t.name.clone(),
        })
        .collect();
    let Some(before) = s.threads.replace(now.clone()) else {
        return;
    };
    for (kind, verb, changed) in [
        ("thread.started", "started", now.difference(&before)),
        ("thread.ended", "ended", before.difference(&now)),
    ] {
        let changed: Vec<&ThreadKey> = changed.collect();
        for t in changed.iter().take(MAX_THREAD_EVENTS) {
            events.push(NewEvent::new(
                Some(name),
                kind,
                Severity::Info,
                format!("{name}: thread {} {verb}", t.label()),
                json!({"tid": t.tid, "name": t.name}),
            ));
        }
        if changed.len() > MAX_THREAD_EVENTS {
            let rest = &changed[MAX_THREAD_EVENTS..];
            events.push(NewEvent::new(
                Some(name),
                kind,
                Severity::Info,
                format!("{name}: {} more threads {verb}", rest.len()),
                json!({
                    "count": rest.len(),
                    "threads": rest.iter().map(|t| json!({"tid": t.tid, "name": t.name})).collect::<Vec<_>>(),
                }),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leak_and_stuck_checks_have_the_issues_kinds() {
        use Status::*;
        assert_eq!(check_kind("memory.leak", Healthy, Degraded), "leak");
        assert_eq!(check_kind("threads.stuck", Healthy, Critical), "deadlock");
        assert_eq!(check_kind("threads.stuck", Critical, Healthy), "deadlock");
        assert_eq!(check_kind("threads.stuck", Healthy, Degraded), "stuck");
        assert_eq!(
            check_kind("threads.count", Healthy, Degraded),
            "health.threads.count"
        );
    }

    fn thread(tid: i32, name: &str) -> LispThread {
        LispThread {
            tid: Some(tid),
            name: Some(name.into()),
            alive: true,
            main: false,
            agent: false,
            daemon: false,
            ..LispThread::default()
        }
    }

    #[test]
    fn thread_changes_are_diffed_and_bounded() {
        let mut s = Seen::default();
        let mut events = Vec::new();
        let base: Vec<LispThread> = (0..3).map(|i| thread(i, &format!("t{i}"))).collect();
        thread_changes(&mut s, "app", &base, &mut events);
        assert!(events.is_empty(), "the first look is the baseline");
        let mut next = base[1..].to_vec();
        next.extend((100..125).map(|i| thread(i, &format!("w{i}"))));
        let mut agent = thread(7, "sbmon-agent worker");
        agent.agent = true;
        next.push(agent);
        thread_changes(&mut s, "app", &next, &mut events);
        let started: Vec<&NewEvent> = events
            .iter()
            .filter(|e| e.kind == "thread.started")
            .collect();
        let ended: Vec<&NewEvent> = events.iter().filter(|e| e.kind == "thread.ended").collect();
        assert_eq!(started.len(), MAX_THREAD_EVENTS + 1);
        assert_eq!(
            started.last().unwrap().data["count"],
            25 - MAX_THREAD_EVENTS
        );
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].message, "app: thread \"t0\" (tid 0) ended");
        assert!(!events.iter().any(|e| e.message.contains("sbmon-agent")));
    }
}
