//! What every tool handler, health grade and metrics scrape shares: the watched targets, the
//! configuration, the per-tool call counters and the event journal. It sits below all of them, so none of them
//! has to import another to reach it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::histogram::{Histogram, Reading};
use crate::journal::Journal;
use crate::targets::{Target, TargetError, Targets};

/// Calls of one tool over some span: how many, how many failed, and their latencies. Plain
/// integers, updated under [`CallLog`]'s one lock; no allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpStats {
    pub count: u64,
    pub errors: u64,
    pub total_nanos: u64,
    /// Meaningless while `count` is 0.
    pub min_nanos: u64,
    pub max_nanos: u64,
    /// When the last call ended (wall clock).
    pub last: Option<SystemTime>,
}

impl OpStats {
    fn observe(&mut self, ok: bool, nanos: u64, now: SystemTime) {
        self.min_nanos = if self.count == 0 {
            nanos
        } else {
            self.min_nanos.min(nanos)
        };
        self.max_nanos = self.max_nanos.max(nanos);
        self.count += 1;
        self.errors += u64::from(!ok);
        self.total_nanos = self.total_nanos.saturating_add(nanos);
        self.last = Some(now);
    }

    /// The calls of `self` and of `other` together.
    pub fn merge(&self, other: &OpStats) -> OpStats {
        if self.count == 0 {
            return *other;
        }
        if other.count == 0 {
            return *self;
        }
        OpStats {
            count: self.count + other.count,
            errors: self.errors + other.errors,
            total_nanos: self.total_nanos.saturating_add(other.total_nanos),
            min_nanos: self.min_nanos.min(other.min_nanos),
            max_nanos: self.max_nanos.max(other.max_nanos),
            last: self.last.max(other.last),
        }
    }
}

/// Counts and durations of one tool's calls.
#[derive(Debug, Default)]
pub struct ToolCounters {
    /// Since sbmon started, for the Prometheus histogram (never reset: counters are monotonic).
    pub duration: Histogram,
    /// Since sbmon started; never reset.
    pub since_start: OpStats,
    /// Since the last [`CallLog::reset`] (or the start): what `operation_stats` shows.
    pub since_reset: OpStats,
}

/// One tool's figures as [`CallLog::operations`] copies them.
#[derive(Debug, Clone, Copy)]
pub struct ToolOps {
    pub name: &'static str,
    pub since_start: OpStats,
    pub since_reset: OpStats,
}

/// Every tool's figures at one moment, with when the log started and was last reset.
#[derive(Debug, Clone)]
pub struct Operations {
    pub started: SystemTime,
    pub uptime: Duration,
    pub reset: Option<SystemTime>,
    pub tools: Vec<ToolOps>,
}

struct Calls {
    per_tool: BTreeMap<&'static str, ToolCounters>,
    reset: Option<SystemTime>,
}

/// Per-tool totals of calls (for metrics and `operation_stats`). What a target's own failures
/// do to its health is kept per target ([`Target::calls`]). A caller's usage errors are not
/// recorded at all (see `Catalog::call_from`).
pub struct CallLog {
    calls: Mutex<Calls>,
    started: SystemTime,
    started_at: Instant,
}

impl Default for CallLog {
    fn default() -> Self {
        CallLog::counting([])
    }
}

impl CallLog {
    /// A log that reports `tools` from the start, at zero until called, so that rates and
    /// alerts over their counters work before the first call.
    pub fn counting(tools: impl IntoIterator<Item = &'static str>) -> Self {
        let per_tool = tools.into_iter().map(|t| (t, ToolCounters::default()));
        CallLog {
            calls: Mutex::new(Calls {
                per_tool: per_tool.collect(),
                reset: None,
            }),
            started: SystemTime::now(),
            started_at: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record(&self, tool: &'static str, ok: bool, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let now = SystemTime::now();
        let mut calls = self.lock();
        let counters = calls.per_tool.entry(tool).or_default();
        counters.since_start.observe(ok, nanos, now);
        counters.since_reset.observe(ok, nanos, now);
        counters.duration.observe(elapsed);
    }

    /// Per tool since sbmon started: (name, ok, error, duration reading), in name order.
    pub fn totals(&self) -> Vec<(&'static str, u64, u64, Reading)> {
        let calls = self.lock();
        calls
            .per_tool
            .iter()
            .map(|(name, c)| {
                let s = &c.since_start;
                (*name, s.count - s.errors, s.errors, c.duration.read())
            })
            .collect()
    }

    /// Every tool's figures since the start and since the last reset, in name order.
    pub fn operations(&self) -> Operations {
        self.view(&self.lock())
    }

    fn view(&self, calls: &Calls) -> Operations {
        let tools = calls
            .per_tool
            .iter()
            .map(|(name, c)| ToolOps {
                name,
                since_start: c.since_start,
                since_reset: c.since_reset,
            })
            .collect();
        Operations {
            started: self.started,
            uptime: self.started_at.elapsed(),
            reset: calls.reset,
            tools,
        }
    }

    /// Zero the since-reset figures of every tool (the since-start ones and the Prometheus
    /// series stay: counters are monotonic); the figures as they were just before.
    pub fn reset(&self) -> Operations {
        let mut calls = self.lock();
        let before = self.view(&calls);
        for c in calls.per_tool.values_mut() {
            c.since_reset = OpStats::default();
        }
        calls.reset = Some(SystemTime::now());
        before
    }
}

/// The shared state of one sbmon.
pub struct Context {
    pub targets: Arc<Targets>,
    pub config: Arc<Config>,
    pub calls: CallLog,
    /// What happened: health changes, targets lost and found, actions taken.
    pub journal: Arc<Journal>,
}

impl Context {
    pub fn new(targets: Arc<Targets>, config: Arc<Config>, calls: CallLog) -> Self {
        let journal = Arc::new(Journal::new(config.journal));
        Context {
            targets,
            config,
            calls,
            journal,
        }
    }

    /// The target called `name`, or the only one.
    pub fn target(&self, name: Option<&str>) -> Result<Arc<Target>, TargetError> {
        self.targets.resolve(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_errors_and_bound_latencies_and_reset_keeps_the_start() {
        let log = CallLog::counting(["a", "b"]);
        log.record("a", true, Duration::from_millis(3));
        log.record("a", false, Duration::from_millis(1));
        log.record("a", true, Duration::from_millis(8));
        let ops = log.operations();
        assert_eq!(ops.tools.len(), 2);
        let a = ops.tools[0].since_reset;
        assert_eq!((a.count, a.errors), (3, 1));
        assert_eq!(a.min_nanos, 1_000_000);
        assert_eq!(a.max_nanos, 8_000_000);
        assert_eq!(a.total_nanos, 12_000_000);
        assert!(a.last.is_some());
        assert_eq!(ops.tools[1].since_reset, OpStats::default());
        assert_eq!(a.merge(&ops.tools[1].since_reset), a);

        let before = log.reset();
        assert_eq!(before.tools[0].since_reset, a);
        let after = log.operations();
        assert!(after.reset.is_some());
        assert_eq!(after.tools[0].since_reset, OpStats::default());
        assert_eq!(after.tools[0].since_start, a);
        let totals = log.totals();
        assert_eq!(
            (totals[0].1, totals[0].2),
            (2, 1),
            "Prometheus counts are not reset"
        );
    }
}
