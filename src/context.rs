//! What every tool handler, health grade and metrics scrape shares: the watched targets, the
//! configuration, the per-tool call counters and the event journal. It sits below all of them, so none of them
//! has to import another to reach it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::histogram::{Histogram, Reading};
use crate::journal::Journal;
use crate::targets::{Target, TargetError, Targets};

/// Counts and durations of one tool's calls since sbmon started.
#[derive(Debug, Default)]
pub struct ToolCounters {
    pub ok: u64,
    pub error: u64,
    pub duration: Histogram,
}

/// Per-tool totals of calls (for metrics). What a target's own failures do to its health is
/// kept per target ([`Target::calls`]).
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
    pub fn totals(&self) -> Vec<(&'static str, u64, u64, Reading)> {
        let per_tool = self.per_tool.lock().unwrap_or_else(|p| p.into_inner());
        per_tool
            .iter()
            .map(|(name, c)| (*name, c.ok, c.error, c.duration.read()))
            .collect()
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
