//! `health_check`: the image graded against the README's thresholds (the grading
//! itself is `crate::health`, shared with `/health` and `/metrics`).

use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::Deserialize;

use super::summary::{MAX_FIELD_CHARS, cut, target_label};
use super::{Class, Tool, ToolError};
use crate::context::Context;
use crate::health::{HealthReport, Status, evaluate};

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

pub struct HealthCheck;

impl Tool for HealthCheck {
    const NAME: &'static str = "health_check";
    const TITLE: &'static str = "Health check";
    const DESCRIPTION: &'static str = "Overall health (healthy, degraded, critical) of an SBCL \
        image, with every check's observed value, thresholds, status and reason: heap, RSS, \
        GC time, threads, fds, agent reachability, tool-call errors.";
    const CLASS: Class = Class::Read;
    type Args = Args;
    type Output = HealthReport;

    async fn run(ctx: &Context, args: Args) -> Result<HealthReport, ToolError> {
        let target = ctx.target(args.target.as_deref())?;
        Ok(evaluate(ctx, &target).await)
    }

    /// The status, then only the checks that are not healthy.
    fn summary(report: &HealthReport) -> String {
        let mut out = format!("{}: {}", target_label(&report.target), report.status.name());
        let problems: Vec<_> = report
            .checks
            .iter()
            .filter(|c| c.status != Status::Healthy)
            .collect();
        for check in &problems {
            let _ = write!(
                out,
                "\n- {} {}: {}",
                check.name,
                check.status.name(),
                cut(&check.reason, MAX_FIELD_CHARS)
            );
        }
        if problems.is_empty() && !report.checks.is_empty() {
            let _ = write!(out, " (all {} checks healthy)", report.checks.len());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Check;

    #[test]
    fn health_lists_only_problems() {
        let check = |name: &str, status, reason: &str| Check {
            name: name.into(),
            status,
            observed: Some(0.75),
            warning: 0.7,
            critical: Some(0.9),
            reason: reason.into(),
        };
        let report = HealthReport {
            target: "t".into(),
            status: Status::Degraded,
            checks: vec![
                check("memory.heap", Status::Degraded, "heap at 75%"),
                check("gc.time", Status::Healthy, "fine"),
            ],
            time: 0.0,
        };
        assert_eq!(
            HealthCheck::summary(&report),
            "target t: degraded\n- memory.heap degraded: heap at 75%"
        );
    }
}
