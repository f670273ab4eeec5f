//! The tool catalog. A tool is defined once, in its family file, as a type implementing
//! [`Tool`]: name, title, description, class, argument and result types, handler and text
//! summary together. This file only lists them ([`TOOLS`]) and runs them ([`Catalog`]), so
//! the front ends (CLI, MCP, JSON-RPC, HTTP) can never disagree about what a tool does, and a
//! listed tool without a handler or summary does not compile.

pub mod control;
pub mod eval;
pub mod export;
pub mod gc;
pub mod health;
pub mod heap;
pub mod journal;
pub mod memory;
pub mod operations;
pub mod runtime;
pub mod summary;
pub mod threads;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::agent::{Address, AgentError, ClientOptions, RemoteKind};
use crate::audit::{Audit, Verdict};
use crate::config::Config;
use crate::context::{CallLog, Context};
use crate::echo::clip;
use crate::journal::{NewEvent, Severity};
use crate::process::ProcessError;
use crate::targets::{Outcome, Target, TargetError, Targets, default_name};

/// What a tool may do to the image; `control` and `eval` must be allowed explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Read,
    Control,
    Eval,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Control => "control",
            Class::Eval => "eval",
        }
    }
}

/// Which tool classes this sbmon may use; `read` always, the others only when the operator
/// said so (`--allow control`, `--allow eval`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allow {
    pub control: bool,
    pub eval: bool,
}

impl Allow {
    pub fn permits(self, class: Class) -> bool {
        match class {
            Class::Read => true,
            Class::Control => self.control,
            Class::Eval => self.eval,
        }
    }
}

/// One tool. Implemented by a unit type in the tool's family file; listed in [`TOOLS`].
pub trait Tool: 'static {
    const NAME: &'static str;
    const TITLE: &'static str;
    const DESCRIPTION: &'static str;
    const CLASS: Class;
    type Args: DeserializeOwned + JsonSchema;
    type Output: Serialize + JsonSchema + Send + 'static;

    fn run(
        ctx: &Context,
        args: Self::Args,
    ) -> impl Future<Output = Result<Self::Output, ToolError>> + Send;

    /// A few lines saying what the result shows (MCP's text content beside the JSON).
    fn summary(output: &Self::Output) -> String;

    /// How the action went, for the audit log of control and eval calls: a tool that ran but
    /// whose action failed (an evaluation that signalled an error) overrides this.
    fn verdict(_output: &Self::Output) -> Verdict {
        Verdict::Done
    }
}

/// A tool's result as every front end takes it: the JSON, and what a person reads.
pub struct Called {
    pub value: Value,
    pub summary: String,
    pub verdict: Verdict,
}

type Runner = for<'a> fn(
    &'a Context,
    Value,
) -> Pin<Box<dyn Future<Output = Result<Called, ToolError>> + Send + 'a>>;

/// A [`Tool`] with its types erased, so that one list can hold them all.
pub struct ToolDef {
    pub name: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    pub class: Class,
    pub input_schema: fn() -> Value,
    pub output_schema: fn() -> Value,
    run: Runner,
}

impl ToolDef {
    pub const fn of<T: Tool>() -> ToolDef {
        ToolDef {
            name: T::NAME,
            title: T::TITLE,
            description: T::DESCRIPTION,
            class: T::CLASS,
            input_schema: schema::<T::Args>,
            output_schema: schema::<T::Output>,
            run: run::<T>,
        }
    }
}

/// Every tool, in the order they are listed.
pub static TOOLS: &[ToolDef] = &[
    ToolDef::of::<health::HealthCheck>(),
    ToolDef::of::<memory::MemoryStatsTool>(),
    ToolDef::of::<memory::MemoryTrendTool>(),
    ToolDef::of::<gc::GcStatsTool>(),
    ToolDef::of::<gc::GcWatchTool>(),
    ToolDef::of::<runtime::RuntimeStatsTool>(),
    ToolDef::of::<export::MetricsExport>(),
    ToolDef::of::<operations::OperationStats>(),
    ToolDef::of::<threads::ThreadListTool>(),
    ToolDef::of::<threads::ThreadInspect>(),
    ToolDef::of::<threads::ThreadDumpAll>(),
    ToolDef::of::<heap::HeapHistogramTool>(),
    ToolDef::of::<heap::HeapRetainersTool>(),
    ToolDef::of::<journal::EventsRecent>(),
    ToolDef::of::<control::MemoryGc>(),
    ToolDef::of::<control::GcTune>(),
    ToolDef::of::<control::ThreadKill>(),
    ToolDef::of::<control::ProfileCpu>(),
    ToolDef::of::<eval::ReplEval>(),
    ToolDef::of::<eval::CodeReloadSystem>(),
];

/// A JSON Schema (2020-12) of `T`, without the non-standard `format` values schemars gives
/// Rust integer types (`uint64`, `int32`, ...), which MCP clients warn about: bounds say the
/// same in standard terms.
fn schema<T: JsonSchema>() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null);
    standard_formats_only(&mut schema);
    schema
}

/// Formats JSON Schema 2020-12 defines; any other `format` is dropped (it is only a hint).
const STANDARD_FORMATS: &[&str] = &[
    "date-time",
    "date",
    "time",
    "duration",
    "email",
    "idn-email",
    "hostname",
    "idn-hostname",
    "ipv4",
    "ipv6",
    "uri",
    "uri-reference",
    "iri",
    "iri-reference",
    "uuid",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
    "regex",
];

fn standard_formats_only(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| !STANDARD_FORMATS.contains(&f))
            {
                map.remove("format");
            }
            map.values_mut().for_each(standard_formats_only);
        }
        Value::Array(items) => items.iter_mut().for_each(standard_formats_only),
        _ => {}
    }
}

fn run<T: Tool>(
    ctx: &Context,
    args: Value,
) -> Pin<Box<dyn Future<Output = Result<Called, ToolError>> + Send + '_>> {
    Box::pin(async move {
        let args = if args.is_null() {
            Value::Object(Default::default())
        } else {
            args
        };
        if !args.is_object() {
            return Err(ToolError::invalid(
                T::NAME,
                "arguments must be a JSON object",
            ));
        }
        let args: T::Args =
            serde_json::from_value(args).map_err(|e| ToolError::invalid(T::NAME, e.to_string()))?;
        let output = T::run(ctx, args).await?;
        let value = serde_json::to_value(&output).map_err(|e| ToolError::Internal {
            tool: T::NAME,
            message: e.to_string(),
        })?;
        Ok(Called {
            value,
            summary: summary::bound(T::summary(&output)),
            verdict: T::verdict(&output),
        })
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("unknown tool {:?}; `sbmon tools` lists the available tools", clip(.0))]
    UnknownTool(String),
    #[error(
        "{tool} is a {class} tool and this sbmon was started without it: restart sbmon with \
         --allow {class} to use it"
    )]
    NotAllowed { tool: String, class: &'static str },
    #[error("invalid arguments for {tool}: {message}")]
    InvalidArguments { tool: String, message: String },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("no thread {query}; live threads: {known}")]
    UnknownThread { query: String, known: String },
    #[error("thread name {name:?} is ambiguous; use one of the tids: {matches}")]
    AmbiguousThread { name: String, matches: String },
    /// sbmon's own fault: a result it could not encode. Worth a bug report.
    #[error("internal error in {tool}: {message}; please report this")]
    Internal { tool: &'static str, message: String },
}

/// Agent error kinds that mean the caller asked for something wrong or impossible, not that
/// the image failed (docs/protocol.md). `NOT-ALLOWED` never gets here: the client turns it
/// into [`AgentError::NotAllowed`].
fn is_caller_kind(kind: &RemoteKind) -> bool {
    matches!(
        kind,
        RemoteKind::BadArgument | RemoteKind::UnknownThread | RemoteKind::Refused
    )
}

impl ToolError {
    /// Errors in what the caller asked (as opposed to failures while doing it): CLI exit 2,
    /// JSON-RPC -32602 (or -32601 for a tool it cannot call).
    pub fn is_usage(&self) -> bool {
        match self {
            ToolError::UnknownTool(_)
            | ToolError::NotAllowed { .. }
            | ToolError::InvalidArguments { .. } => true,
            // The agent bounds every argument itself (docs/protocol.md); its refusal of one is
            // the caller's mistake as much as ours would be.
            ToolError::Agent(AgentError::Remote { kind, .. }) => *kind == RemoteKind::BadArgument,
            _ => false,
        }
    }

    /// What this failure says about the target: `None` when it is the caller's own mistake
    /// (which must not make a healthy image look broken) or sbmon's.
    pub fn target_outcome(&self) -> Option<Outcome> {
        match self {
            ToolError::Agent(e) if e.is_unreachable() => Some(Outcome::Unreachable),
            ToolError::Agent(AgentError::Remote { kind, .. }) if is_caller_kind(kind) => None,
            // The agent's own :allow refused the operation: how the image was started, not a
            // failure of it.
            ToolError::Agent(AgentError::NotAllowed(_)) => None,
            ToolError::Agent(_) | ToolError::Process(_) => Some(Outcome::Failed),
            _ => None,
        }
    }

    pub(crate) fn invalid(tool: &str, message: impl Into<String>) -> Self {
        ToolError::InvalidArguments {
            tool: tool.to_string(),
            message: clip(&message.into()),
        }
    }
}

/// The definition of tool `name`.
pub fn find(name: &str) -> Option<&'static ToolDef> {
    TOOLS.iter().find(|t| t.name == name)
}

/// What the audit log calls a reset of the operation figures (not a tool: no front end but
/// `POST /monitoring/reset` can ask for it).
pub const RESET_OPERATIONS: &str = "operation_stats_reset";

pub struct Catalog {
    ctx: Arc<Context>,
    allow: Allow,
    audit: Audit,
}

impl Catalog {
    /// A read-only catalog.
    pub fn new(targets: Arc<Targets>, config: Arc<Config>) -> Self {
        Catalog::with_policy(targets, config, Allow::default(), Audit::default())
    }

    /// A catalog that also offers the classes `allow` names, auditing their calls.
    pub fn with_policy(
        targets: Arc<Targets>,
        config: Arc<Config>,
        allow: Allow,
        audit: Audit,
    ) -> Self {
        Catalog {
            ctx: Arc::new(Context::new(
                targets,
                config,
                CallLog::counting(
                    TOOLS
                        .iter()
                        .filter(|t| allow.permits(t.class))
                        .map(|t| t.name),
                ),
            )),
            allow,
            audit,
        }
    }

    /// A catalog over one target, as `sbmon call`, `demo` and the benchmarks use it.
    pub fn single_target(
        address: Address,
        options: ClientOptions,
        config: Config,
        allow: Allow,
        audit: Audit,
    ) -> Self {
        let target = Target::new(default_name(&address), address, options);
        Catalog::with_policy(
            Arc::new(Targets::new(vec![target])),
            Arc::new(config),
            allow,
            audit,
        )
    }

    /// The definition of `name` if this catalog offers it; else why not.
    pub fn check(&self, name: &str) -> Result<&'static ToolDef, ToolError> {
        let tool = find(name).ok_or_else(|| ToolError::UnknownTool(name.to_string()))?;
        if !self.allow.permits(tool.class) {
            return Err(ToolError::NotAllowed {
                tool: tool.name.to_string(),
                class: tool.class.name(),
            });
        }
        Ok(tool)
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The tools this catalog offers (control and eval tools only when allowed).
    pub fn tools(&self) -> impl Iterator<Item = &'static ToolDef> + '_ {
        TOOLS.iter().filter(|t| self.allow.permits(t.class))
    }

    /// Zero the since-reset operation figures (`POST /monitoring/reset`): a change of
    /// sbmon's state, so only with `--allow control`, and audited like a control tool. `None`
    /// when this sbmon was started without it; else the figures as they were just before.
    /// The Prometheus counters are not touched: they are monotonic.
    pub fn reset_operations(&self, front_end: &str) -> Option<operations::OperationReport> {
        if !self.allow.control {
            return None;
        }
        let started = Instant::now();
        let before = self.ctx.calls.reset();
        self.audit.record(
            front_end,
            RESET_OPERATIONS,
            &Value::Object(Default::default()),
            &Verdict::Done,
            started.elapsed(),
        );
        Some(operations::report_all(&before))
    }

    /// Run tool `name` with JSON `args` (an object, or null for none); its JSON result.
    pub async fn call(&self, name: &str, args: Value) -> Result<Value, ToolError> {
        self.call_from("internal", name, args)
            .await
            .map(|called| called.value)
    }

    /// Run a tool, saying which front end asked (for the audit log of control and eval
    /// calls): its JSON result with a text summary.
    pub async fn call_from(
        &self,
        front_end: &'static str,
        name: &str,
        args: Value,
    ) -> Result<Called, ToolError> {
        let tool = self.check(name)?;
        let audited = (tool.class != Class::Read).then(|| args.clone());
        let target = args
            .get("target")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let ctx = &*self.ctx;
        let started = Instant::now();
        let result = (tool.run)(ctx, args).await;
        if !matches!(&result, Err(e) if e.is_usage()) {
            ctx.calls
                .record(tool.name, result.is_ok(), started.elapsed());
        }
        let outcome = match &result {
            Ok(_) => Some(Outcome::Ok),
            Err(e) => e.target_outcome(),
        };
        if let Some(outcome) = outcome
            && let Ok(target) = ctx.targets.resolve(target.as_deref())
        {
            target.calls.record(outcome);
        }
        if let Some(args) = audited {
            let verdict = match &result {
                Ok(called) => called.verdict.clone(),
                Err(e) => Verdict::Error(e.to_string()),
            };
            let elapsed = started.elapsed();
            self.audit
                .record(front_end, tool.name, &args, &verdict, elapsed);
            let target = match ctx.targets.resolve(target.as_deref()) {
                Ok(t) => Some(t.name.clone()),
                Err(_) => target,
            };
            ctx.journal.record(action_event(
                front_end,
                tool,
                target.as_deref(),
                args,
                &verdict,
                elapsed,
            ));
        }
        result
    }
}

/// The journal's record of a control or eval call: who (front end), what (tool, arguments),
/// on which target, and how it ended. A failed action is a warning.
fn action_event(
    front_end: &str,
    tool: &ToolDef,
    target: Option<&str>,
    args: Value,
    verdict: &Verdict,
    elapsed: std::time::Duration,
) -> NewEvent {
    let (outcome, why) = match verdict {
        Verdict::Done => ("ok", None),
        Verdict::Failed(why) => ("failed", Some(why.as_str())),
        Verdict::Error(why) => ("error", Some(why.as_str())),
    };
    let on = target.map_or(String::new(), |t| format!(" on {t}"));
    let message = match why {
        None => format!(
            "{} ({}) via {front_end}{on}: ok in {:.3} s",
            tool.name,
            tool.class.name(),
            elapsed.as_secs_f64()
        ),
        Some(why) => format!(
            "{} ({}) via {front_end}{on}: {outcome}: {why}",
            tool.name,
            tool.class.name()
        ),
    };
    let mut data = serde_json::json!({
        "front_end": front_end,
        "tool": tool.name,
        "class": tool.class.name(),
        "outcome": outcome,
        "seconds": elapsed.as_secs_f64(),
        "arguments": args,
    });
    if let Some(why) = why {
        data["error"] = Value::String(why.to_string());
    }
    let severity = if why.is_none() {
        Severity::Info
    } else {
        Severity::Warning
    };
    NewEvent::new(
        target,
        format!("{}.{}", tool.class.name(), tool.name),
        severity,
        message,
        data,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_targets_own_failures_count_against_it() {
        let remote = |kind| {
            ToolError::Agent(AgentError::Remote {
                kind,
                message: String::new(),
                backtrace: vec![],
                output: None,
            })
        };
        for mine in [
            remote(RemoteKind::BadArgument),
            remote(RemoteKind::UnknownThread),
            ToolError::Agent(AgentError::NotAllowed("eval".into())),
            ToolError::invalid("x", "bad"),
        ] {
            assert_eq!(mine.target_outcome(), None, "{mine}");
        }
        assert_eq!(
            remote(RemoteKind::Lisp("STORAGE-CONDITION".into())).target_outcome(),
            Some(Outcome::Failed)
        );
        assert_eq!(
            ToolError::Agent(AgentError::Lost("gone".into())).target_outcome(),
            Some(Outcome::Unreachable)
        );
    }

    #[test]
    fn tool_names_are_unique_and_schemas_are_objects_with_standard_formats() {
        let mut names: Vec<&str> = TOOLS.iter().map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TOOLS.len(), "a tool name is listed twice");
        for t in TOOLS {
            for schema in [(t.input_schema)(), (t.output_schema)()] {
                assert_eq!(schema["type"], "object", "{}", t.name);
                let text = schema.to_string();
                for bad in ["\"uint", "\"int", "\"double\"", "\"float\"", "\"uint8\""] {
                    assert!(
                        !text.contains(&format!("\"format\":{bad}")),
                        "{}: {bad} format in {text}",
                        t.name
                    );
                }
            }
        }
    }
}
