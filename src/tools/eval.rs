//! Eval tools (offered only with `--allow eval`): `repl_eval` and `code_reload_system`. The
//! agent evaluates on its own thread with a timeout, captures bounded output and never enters
//! the debugger. An error in the evaluated code is part of the result (type, message,
//! backtrace, and what it printed before): the tool worked, the code failed.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::fmt::Write as _;

use super::summary::{MAX_FIELD_CHARS, cut};
use super::{Class, Tool, ToolError};
use crate::agent::ops::{CapturedOutput, EvalOutcome, EvalRequest, ReloadRequest};
use crate::audit::Verdict;
use crate::context::Context;

/// Source text accepted in one call; the agent's frame limit is 1 MiB.
const MAX_CODE_BYTES: usize = 256 * 1024;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalArgs {
    /// Lisp source: all its forms are read and evaluated in order, as a REPL does.
    pub code: String,
    /// Package to read and evaluate in (default CL-USER).
    pub package: Option<String>,
    /// Seconds before the evaluation is stopped (0.1..300, default 10).
    #[serde(default, alias = "timeout-s", alias = "timeout")]
    pub timeout_s: Option<f64>,
    /// Characters of standard output to keep (1..1048576, default 65536).
    #[serde(default, alias = "max-output")]
    pub max_output: Option<u64>,
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

/// A condition signalled by the evaluated code (or TIMEOUT when it was stopped).
#[derive(Debug, Serialize, JsonSchema)]
pub struct LispError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub backtrace: Vec<String>,
}

// The `#[serde(default)]`s below keep these fields optional in the output schema, as they
// were when this type was also decoded from the agent; the schema must not change.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Evaluation {
    /// Printed values of the last form.
    #[serde(default)]
    pub values: Vec<String>,
    /// Forms evaluated.
    #[serde(default)]
    pub forms: u64,
    #[serde(default)]
    pub seconds: f64,
}

// No doc comment: a flattened type's doc would become the description of `EvalResult`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Output {
    /// Standard output of the evaluation (bounded).
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub output_truncated: bool,
}

impl From<CapturedOutput> for Output {
    fn from(o: CapturedOutput) -> Self {
        Output {
            output: o.text,
            output_truncated: o.truncated,
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EvalResult {
    pub ok: bool,
    /// Absent when the code failed.
    #[serde(flatten)]
    pub evaluation: Option<Evaluation>,
    /// What the code printed, also when it failed or ran out of time: often the clue.
    #[serde(flatten)]
    pub output: Output,
    /// Set when the code signalled an error or ran out of time.
    pub error: Option<LispError>,
}

async fn repl_eval(ctx: &Context, args: EvalArgs) -> Result<EvalResult, ToolError> {
    if args.code.len() > MAX_CODE_BYTES {
        return Err(ToolError::invalid(
            "repl_eval",
            format!(
                "code is {} bytes; the limit is {MAX_CODE_BYTES}",
                args.code.len()
            ),
        ));
    }
    let timeout_s = args.timeout_s.unwrap_or(10.0);
    if !(0.1..=300.0).contains(&timeout_s) {
        return Err(ToolError::invalid(
            "repl_eval",
            "timeout_s must be 0.1..300",
        ));
    }
    let max_output = args.max_output.unwrap_or(65536);
    if !(1..=1_048_576).contains(&max_output) {
        return Err(ToolError::invalid(
            "repl_eval",
            "max_output must be 1..1048576",
        ));
    }
    let request = EvalRequest {
        code: args.code,
        package: args.package,
        timeout_s,
        max_output,
    };
    let target = ctx.target(args.target.as_deref())?;
    Ok(match target.client.eval(&request).await? {
        EvalOutcome::Done(e) => EvalResult {
            ok: true,
            evaluation: Some(Evaluation {
                values: e.values,
                forms: e.forms,
                seconds: e.seconds,
            }),
            output: Output {
                output: e.output,
                output_truncated: e.output_truncated,
            },
            error: None,
        },
        EvalOutcome::Failed(f) => EvalResult {
            ok: false,
            evaluation: None,
            output: f.output.into(),
            error: Some(LispError {
                kind: f.kind.to_string(),
                message: f.message,
                backtrace: f.backtrace,
            }),
        },
    })
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadArgs {
    /// ASDF system name.
    pub system: String,
    /// Reload every file of the system, not only changed ones.
    #[serde(default)]
    pub force: bool,
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Reload {
    pub system: String,
    pub forced: bool,
    pub seconds: f64,
    /// Warnings signalled while compiling and loading (at most 100).
    #[serde(default)]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub output_truncated: bool,
}

async fn code_reload_system(ctx: &Context, args: ReloadArgs) -> Result<Reload, ToolError> {
    let target = ctx.target(args.target.as_deref())?;
    let request = ReloadRequest {
        system: args.system,
        force: args.force,
    };
    let r = target.client.reload_system(&request).await?;
    Ok(Reload {
        system: r.system,
        forced: r.forced,
        seconds: r.seconds,
        warnings: r.warnings,
        output: r.output,
        output_truncated: r.output_truncated,
    })
}

pub struct ReplEval;

impl Tool for ReplEval {
    const NAME: &'static str = "repl_eval";
    const TITLE: &'static str = "Evaluate Lisp code";
    const DESCRIPTION: &'static str = "Read and evaluate all forms of code in a package \
        (default CL-USER) with a timeout, on a thread of its own, never entering the debugger: \
        printed values of the last form and captured output (bounded), or the condition with a \
        bounded backtrace.";
    const CLASS: Class = Class::Eval;
    type Args = EvalArgs;
    type Output = EvalResult;

    async fn run(ctx: &Context, args: EvalArgs) -> Result<EvalResult, ToolError> {
        repl_eval(ctx, args).await
    }

    fn summary(r: &EvalResult) -> String {
        let mut out = String::new();
        if let Some(error) = &r.error {
            let _ = write!(
                out,
                "error {}: {}",
                error.kind,
                cut(&error.message, MAX_FIELD_CHARS)
            );
            for frame in error.backtrace.iter().take(10) {
                let _ = write!(out, "\n  {}", cut(frame, MAX_FIELD_CHARS));
            }
        } else if let Some(e) = &r.evaluation {
            let _ = write!(out, "=> {}", e.values.join(" ; "));
        }
        if !r.output.output.is_empty() {
            let _ = write!(out, "\noutput:\n{}", r.output.output);
        }
        out
    }

    /// An evaluation that signalled an error or timed out did not do what was asked.
    fn verdict(r: &EvalResult) -> Verdict {
        match &r.error {
            Some(e) => Verdict::Failed(format!("{}: {}", e.kind, e.message)),
            None => Verdict::Done,
        }
    }
}

pub struct CodeReloadSystem;

impl Tool for CodeReloadSystem {
    const NAME: &'static str = "code_reload_system";
    const TITLE: &'static str = "Reload an ASDF system";
    const DESCRIPTION: &'static str = "Load (or with force, fully reload) an ASDF system in \
        the image: warnings, output and duration; a clear error for a system ASDF cannot find.";
    const CLASS: Class = Class::Eval;
    type Args = ReloadArgs;
    type Output = Reload;

    async fn run(ctx: &Context, args: ReloadArgs) -> Result<Reload, ToolError> {
        code_reload_system(ctx, args).await
    }

    fn summary(r: &Reload) -> String {
        let mut out = format!(
            "{} {} in {} s, {} warning(s)",
            if r.forced { "reloaded" } else { "loaded" },
            cut(&r.system, MAX_FIELD_CHARS),
            r.seconds,
            r.warnings.len()
        );
        for w in r.warnings.iter().take(10) {
            let _ = write!(out, "\n  {}", cut(w, MAX_FIELD_CHARS));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_evaluation_is_summarized_and_audited_as_failed() {
        let failed = EvalResult {
            ok: false,
            evaluation: None,
            output: Output {
                output: "partial\n".into(),
                output_truncated: false,
            },
            error: Some(LispError {
                kind: "DIVISION-BY-ZERO".into(),
                message: "x".into(),
                backtrace: vec!["(OOPS 0)".into()],
            }),
        };
        let text = ReplEval::summary(&failed);
        assert!(
            text.starts_with("error DIVISION-BY-ZERO: x\n  (OOPS 0)"),
            "{text}"
        );
        assert!(text.ends_with("\noutput:\npartial\n"), "{text}");
        assert!(matches!(ReplEval::verdict(&failed), Verdict::Failed(m) if m.contains("DIVISION")));
    }
}
