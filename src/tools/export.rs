//! `metrics_export`: the Prometheus exposition that `/metrics` serves, as a tool result.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Class, Tool, ToolError};
use crate::context::Context;
use crate::metrics::Scope;

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// Only this image's series (as `/metrics?target=NAME`); default: every image plus
    /// sbmon's own metrics.
    pub target: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct MetricsText {
    /// `text/plain; version=0.0.4`: the classic Prometheus text format.
    pub content_type: String,
    pub text: String,
}

pub struct MetricsExport;

impl Tool for MetricsExport {
    const NAME: &'static str = "metrics_export";
    const TITLE: &'static str = "Export Prometheus metrics";
    const DESCRIPTION: &'static str = "The Prometheus text exposition that /metrics serves: \
        heap, generations, GC counts, CPU and pause histograms, threads by state, process \
        figures, health per check.";
    const CLASS: Class = Class::Read;
    type Args = Args;
    type Output = MetricsText;

    async fn run(ctx: &Context, args: Args) -> Result<MetricsText, ToolError> {
        let scope = match args.target.as_deref() {
            Some(name) => Scope::Target(ctx.target(Some(name))?),
            None => Scope::All,
        };
        Ok(MetricsText {
            content_type: crate::metrics::CONTENT_TYPE.to_string(),
            text: crate::metrics::render(ctx, scope).await,
        })
    }

    /// The exposition is its own summary; `bound` keeps a long one readable.
    fn summary(m: &MetricsText) -> String {
        m.text.clone()
    }
}
