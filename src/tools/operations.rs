//! `operation_stats`: sbmon's own per-tool figures (count, errors, error rate, average,
//! minimum and maximum latency, last call), per tool and across tools, since the last reset
//! and since sbmon started. `GET /monitoring/*` serves the same report.
//!
//! A call counts once it ran: a caller's usage error (unknown tool, bad arguments, a class
//! this sbmon does not offer) is not counted, any other failure is an error (see
//! `Catalog::call_from`).

use std::time::{SystemTime, UNIX_EPOCH};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Class, Tool, ToolError};
use crate::context::{Context, OpStats, Operations, ToolOps};

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// Only this tool's figures (the totals still cover every tool); default: every tool.
    pub name: Option<String>,
}

/// Calls over one span.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Stats {
    pub count: u64,
    /// Calls that failed (a caller's usage errors are not counted at all).
    pub errors: u64,
    /// errors / count; 0 without calls.
    pub error_rate: f64,
    /// Null without calls.
    pub avg_seconds: Option<f64>,
    pub min_seconds: Option<f64>,
    pub max_seconds: Option<f64>,
    /// When the last call ended, seconds since the Unix epoch; null without calls.
    pub last_call_unix: Option<f64>,
}

impl From<&OpStats> for Stats {
    fn from(s: &OpStats) -> Stats {
        let secs = |nanos: u64| nanos as f64 / 1e9;
        let called = s.count > 0;
        Stats {
            count: s.count,
            errors: s.errors,
            error_rate: if called {
                s.errors as f64 / s.count as f64
            } else {
                0.0
            },
            avg_seconds: called.then(|| secs(s.total_nanos) / s.count as f64),
            min_seconds: called.then(|| secs(s.min_nanos)),
            max_seconds: called.then(|| secs(s.max_nanos)),
            last_call_unix: s.last.map(unix),
        }
    }
}

/// Figures since the last reset (since sbmon started when it was never reset), with those
/// since sbmon started beside them.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Figures {
    #[serde(flatten)]
    pub since_reset: Stats,
    pub since_start: Stats,
}

impl Figures {
    fn of(since_reset: &OpStats, since_start: &OpStats) -> Figures {
        Figures {
            since_reset: since_reset.into(),
            since_start: since_start.into(),
        }
    }

    /// Every tool's calls together.
    fn total(tools: &[ToolOps]) -> Figures {
        let (mut reset, mut start) = (OpStats::default(), OpStats::default());
        for t in tools {
            reset = reset.merge(&t.since_reset);
            start = start.merge(&t.since_start);
        }
        Figures::of(&reset, &start)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ToolStats {
    pub name: String,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct OperationReport {
    /// When sbmon started counting (seconds since the Unix epoch).
    pub started_unix: f64,
    pub uptime_seconds: f64,
    /// When the figures were last reset (`POST /monitoring/reset`); null if never.
    pub reset_unix: Option<f64>,
    /// Across every tool this sbmon offers.
    pub totals: Figures,
    /// Per tool, in name order: every tool offered, or the one asked for.
    pub tools: Vec<ToolStats>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The report of `ops` for every tool.
pub fn report_all(ops: &Operations) -> OperationReport {
    let tools = ops.tools.iter().collect();
    assemble(ops, tools)
}

/// The report of `ops`, for every tool or only `name` (a usage error naming the tools counted
/// when it is not one of them).
pub fn report(ops: &Operations, name: Option<&str>) -> Result<OperationReport, ToolError> {
    let chosen: Vec<&ToolOps> = match name {
        None => return Ok(report_all(ops)),
        Some(name) => vec![ops.tools.iter().find(|t| t.name == name).ok_or_else(|| {
            let counted: Vec<&str> = ops.tools.iter().map(|t| t.name).collect();
            let why = match super::find(name) {
                Some(tool) => format!(
                    "{name} is a {} tool and this sbmon does not offer it (start it with \
                     --allow {}), so it has no calls",
                    tool.class.name(),
                    tool.class.name()
                ),
                None => format!("no tool named {:?}", crate::echo::clip(name)),
            };
            ToolError::invalid(
                OperationStats::NAME,
                format!("{why}; the tools counted are {}", counted.join(", ")),
            )
        })?],
    };
    Ok(assemble(ops, chosen))
}

fn assemble(ops: &Operations, chosen: Vec<&ToolOps>) -> OperationReport {
    OperationReport {
        started_unix: unix(ops.started),
        uptime_seconds: ops.uptime.as_secs_f64(),
        reset_unix: ops.reset.map(unix),
        totals: Figures::total(&ops.tools),
        tools: chosen
            .into_iter()
            .map(|t| ToolStats {
                name: t.name.to_string(),
                figures: Figures::of(&t.since_reset, &t.since_start),
            })
            .collect(),
    }
}

pub struct OperationStats;

impl Tool for OperationStats {
    const NAME: &'static str = "operation_stats";
    const TITLE: &'static str = "sbmon's own operation metrics";
    const DESCRIPTION: &'static str = "sbmon's own tool calls: per tool the count, errors, \
        error rate, average, minimum and maximum latency and the last call time, and the \
        totals across tools, since the last reset and since sbmon started. `name` picks one \
        tool. Callers' usage errors (unknown tool, bad arguments) are not counted.";
    const CLASS: Class = Class::Read;
    type Args = Args;
    type Output = OperationReport;

    async fn run(ctx: &Context, args: Args) -> Result<OperationReport, ToolError> {
        report(&ctx.calls.operations(), args.name.as_deref())
    }

    fn summary(r: &OperationReport) -> String {
        use super::summary::{duration, percent, seconds};
        let line = |label: &str, s: &Stats| {
            let latency = match (s.min_seconds, s.avg_seconds, s.max_seconds) {
                (Some(min), Some(avg), Some(max)) => format!(
                    ", latency min {} avg {} max {}",
                    seconds(min),
                    seconds(avg),
                    seconds(max)
                ),
                _ => String::new(),
            };
            format!(
                "{label}: {} calls, {} errors ({}){latency}",
                s.count,
                s.errors,
                percent(s.error_rate)
            )
        };
        let since = match r.reset_unix {
            Some(_) => "since the last reset",
            None => "since sbmon started",
        };
        let mut out = format!(
            "sbmon up {}; figures {since}\n{}\n",
            duration(r.uptime_seconds),
            line("all tools", &r.totals.since_reset)
        );
        for t in r.tools.iter().filter(|t| t.figures.since_reset.count > 0) {
            out.push_str(&line(&t.name, &t.figures.since_reset));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::CallLog;
    use std::time::Duration;

    #[test]
    fn totals_sum_the_tools_and_unknown_names_are_usage_errors() {
        let log = CallLog::counting(["gc_stats", "thread_list"]);
        log.record("gc_stats", true, Duration::from_millis(2));
        log.record("thread_list", false, Duration::from_millis(6));
        log.record("thread_list", true, Duration::from_millis(4));
        let r = report(&log.operations(), None).unwrap();
        let total = &r.totals.since_reset;
        assert_eq!((total.count, total.errors), (3, 1));
        assert!((total.error_rate - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(total.min_seconds, Some(0.002));
        assert_eq!(total.max_seconds, Some(0.006));
        assert!((total.avg_seconds.unwrap() - 0.004).abs() < 1e-12);
        assert_eq!(r.totals.since_start, *total);

        let one = report(&log.operations(), Some("thread_list")).unwrap();
        assert_eq!(one.tools.len(), 1);
        assert_eq!(one.tools[0].figures.since_reset.count, 2);

        for (name, says) in [
            ("nope", "no tool named \"nope\""),
            ("repl_eval", "--allow eval"),
        ] {
            let e = report(&log.operations(), Some(name)).unwrap_err();
            assert!(e.is_usage(), "{e}");
            let text = e.to_string();
            assert!(text.contains(says), "{text}");
            assert!(text.contains("gc_stats, thread_list"), "{text}");
        }
        let never = report(&CallLog::counting(["gc_stats"]).operations(), None).unwrap();
        assert_eq!(never.totals.since_reset.avg_seconds, None);
        assert_eq!(never.totals.since_reset.error_rate, 0.0);
    }
}
