//! What fills the heap and who holds it: `heap_histogram` (the live objects of the dynamic
//! space by type, and their change since an earlier snapshot) and `heap_retainers` (paths from
//! GC roots to a sample of one type's objects). Both walk the heap inside the image with
//! collections held off, so both are bounded: by the heap size the config allows
//! (`[heap] max_walk_heap_bytes`) and by a time budget.

use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::summary::{MAX_FIELD_CHARS, bytes_i64, bytes_u64, cut, seconds, target_label};
use super::{Class, Tool, ToolError};
use crate::agent::ops::{HeapHistogramRequest, HeapRetainersRequest};
use crate::agent::{AgentError, RemoteKind, reply};
use crate::context::Context;

/// Most rows `top` may ask for.
pub const MAX_TOP: u32 = 500;
/// Most objects `heap_retainers` samples.
pub const MAX_PATHS: u32 = 10;
/// Most steps kept per retainer path.
pub const MAX_DEPTH: u32 = 200;

/// A walk's time budget from the call, else the config; 0.1..60 s.
fn walk_seconds(tool: &str, asked: Option<f64>, ctx: &Context) -> Result<f64, ToolError> {
    match asked {
        None => Ok(ctx.config.heap.walk_seconds),
        Some(s) if s.is_finite() && (0.1..=60.0).contains(&s) => Ok(s),
        Some(s) => Err(ToolError::invalid(
            tool,
            format!("max_seconds must be in 0.1..60, got {s}"),
        )),
    }
}

fn in_range(
    tool: &str,
    name: &str,
    value: Option<u32>,
    default: u32,
    max: u32,
) -> Result<u32, ToolError> {
    match value.unwrap_or(default) {
        v if (1..=max).contains(&v) => Ok(v),
        v => Err(ToolError::invalid(
            tool,
            format!("{name} must be in 1..{max}, got {v}"),
        )),
    }
}

/// The agent's refusal of a heap over the limit, with where sbmon's limit is set.
fn explain_refusal(e: AgentError) -> ToolError {
    match e {
        AgentError::Remote {
            kind: RemoteKind::Refused,
            message,
            backtrace,
            output,
        } => ToolError::Agent(AgentError::Remote {
            kind: RemoteKind::Refused,
            message: format!(
                "{message}. The limit is sbmon's: set `[heap] max_walk_heap_bytes = BYTES` in the \
                 file given with --config (default 4 GiB). A walk holds off every collection of \
                 the image while it runs"
            ),
            backtrace,
            output,
        }),
        e => e.into(),
    }
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HistogramArgs {
    /// Rows returned, largest first (1..500, default 30); the others are counted in
    /// `types_omitted`.
    pub top: Option<u32>,
    /// A `snapshot_id` an earlier call returned: report each type's change since it, growing
    /// types first. The image keeps the last 4 snapshots.
    pub since: Option<u64>,
    /// Only the objects on the pages of GC generation 0..6.
    pub generation: Option<u8>,
    /// The walk's time budget in seconds (0.1..60; default `[heap] walk_seconds`, 10). A walk
    /// that runs out is returned with `truncated: true` and is not kept as a snapshot.
    #[serde(alias = "max-seconds")]
    pub max_seconds: Option<f64>,
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct HeapHistogram {
    pub target: String,
    /// Pass as `since` to a later call. Absent when the walk was truncated.
    pub snapshot_id: Option<u64>,
    /// The snapshot the deltas are relative to, when `since` was given.
    pub since: Option<u64>,
    /// The generation walked; absent: all of them.
    pub generation: Option<u8>,
    /// The walk ran out of its time budget: the counts cover part of the heap only.
    pub truncated: bool,
    /// How long the walk took; threads that needed a collection meanwhile waited for it.
    pub walk_seconds: f64,
    /// Heap in use before the walk (sb-kernel:dynamic-usage).
    pub heap_used_bytes: u64,
    /// Objects walked and their bytes (headers and padding included).
    pub objects: u64,
    pub bytes: u64,
    /// Distinct types seen.
    pub types: u64,
    /// Largest first; with `since`, the types that changed, growing first (by bytes).
    pub rows: Vec<HeapType>,
    /// Types (with `since`: changed types) beyond `top`.
    pub types_omitted: u64,
    /// With `since`: the change of `objects` and `bytes`.
    pub objects_delta: Option<i64>,
    pub bytes_delta: Option<i64>,
    /// The snapshot ids the image keeps now, oldest first.
    pub snapshots_kept: Vec<u64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct HeapType {
    /// The class name of structure and CLOS instances (PACKAGE::NAME), else the object's
    /// type: CONS, SIMPLE-VECTOR, (SIMPLE-ARRAY (UNSIGNED-BYTE 8) (*)), CLOSURE, CODE, ...
    #[serde(rename = "type")]
    pub type_name: String,
    pub count: u64,
    pub bytes: u64,
    pub count_delta: Option<i64>,
    pub bytes_delta: Option<i64>,
}

pub struct HeapHistogramTool;

impl Tool for HeapHistogramTool {
    const NAME: &'static str = "heap_histogram";
    const TITLE: &'static str = "Heap histogram";
    const DESCRIPTION: &'static str = "The objects of the dynamic-space heap by type (class \
        name for structure and CLOS instances), with count and bytes, largest first, like \
        `jmap -histo`: totals, types seen, types left out by `top`. Each call returns a \
        `snapshot_id`; `since: ID` gives each type's change since that snapshot, growing types \
        first, so a leak's type comes to the top. Objects made since the last collection count \
        even if already garbage. Expensive: walks the whole heap with collections held off \
        (measured 40-90 ms for 125 MiB / 2.6 M objects, 200-250 ms for 518 MiB / 10.6 M), and \
        the first collection any thread needs meanwhile stops every thread until the walk \
        ends; refused above the configured heap size (default 4 GiB).";
    const CLASS: Class = Class::Read;
    type Args = HistogramArgs;
    type Output = HeapHistogram;

    async fn run(ctx: &Context, args: HistogramArgs) -> Result<HeapHistogram, ToolError> {
        const TOOL: &str = "heap_histogram";
        let top = in_range(TOOL, "top", args.top, 30, MAX_TOP)?;
        if let Some(g) = args.generation
            && g > 6
        {
            return Err(ToolError::invalid(
                TOOL,
                format!("generation must be in 0..6, got {g}"),
            ));
        }
        let request = HeapHistogramRequest {
            top,
            since: args.since,
            generation: args.generation,
            max_seconds: walk_seconds(TOOL, args.max_seconds, ctx)?,
            max_heap_bytes: ctx.config.heap.max_walk_heap_bytes,
        };
        let target = ctx.target(args.target.as_deref())?;
        let h = target
            .client
            .heap_histogram(request)
            .await
            .map_err(explain_refusal)?;
        Ok(HeapHistogram {
            target: target.name.clone(),
            snapshot_id: h.snapshot_id,
            since: h.since,
            generation: h.generation,
            truncated: h.truncated,
            walk_seconds: h.seconds,
            heap_used_bytes: h.heap_used,
            objects: h.objects,
            bytes: h.bytes,
            types: h.types,
            rows: h
                .rows
                .into_iter()
                .map(|r| HeapType {
                    type_name: r.type_name,
                    count: r.count,
                    bytes: r.bytes,
                    count_delta: r.count_delta,
                    bytes_delta: r.bytes_delta,
                })
                .collect(),
            types_omitted: h.rows_omitted,
            objects_delta: h.objects_delta,
            bytes_delta: h.bytes_delta,
            snapshots_kept: h.snapshots,
        })
    }

    fn summary(h: &HeapHistogram) -> String {
        let mut out = format!(
            "{}: {} objects, {} in {} types{} (walk {}{})",
            target_label(&h.target),
            h.objects,
            bytes_u64(h.bytes),
            h.types,
            h.generation
                .map_or(String::new(), |g| format!(", generation {g}")),
            seconds(h.walk_seconds),
            if h.truncated {
                ", TRUNCATED: out of time, counts are partial"
            } else {
                ""
            },
        );
        match (h.snapshot_id, h.since) {
            (Some(id), Some(since)) => {
                let _ = write!(
                    out,
                    "\nsnapshot {id}; since snapshot {since}: {:+} objects, {}",
                    h.objects_delta.unwrap_or(0),
                    signed_bytes(h.bytes_delta.unwrap_or(0)),
                );
            }
            (Some(id), None) => {
                let _ = write!(out, "\nsnapshot {id} (pass \"since\": {id} to compare)");
            }
            _ => {}
        }
        for r in &h.rows {
            let name = cut(&r.type_name, MAX_FIELD_CHARS);
            match (r.count_delta, r.bytes_delta) {
                (Some(dc), Some(db)) => {
                    let _ = write!(
                        out,
                        "\n{:>+10} {:>12}  {name} (now {}, {})",
                        dc,
                        signed_bytes(db),
                        r.count,
                        bytes_u64(r.bytes)
                    );
                }
                _ => {
                    let _ = write!(out, "\n{:>10} {:>12}  {name}", r.count, bytes_u64(r.bytes));
                }
            }
        }
        if h.types_omitted > 0 {
            let _ = write!(out, "\n... and {} more types", h.types_omitted);
        }
        out
    }
}

fn signed_bytes(n: i64) -> String {
    if n > 0 {
        format!("+{}", bytes_i64(n))
    } else {
        bytes_i64(n)
    }
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetainersArgs {
    /// The type, as `heap_histogram` prints it: a class name such as "MYAPP::SESSION", or
    /// "CONS", "SIMPLE-VECTOR", ...
    #[serde(rename = "type")]
    pub type_name: String,
    /// Objects of the type to sample, one path each (1..10, default 3).
    #[serde(alias = "max-paths")]
    pub max_paths: Option<u32>,
    /// Steps kept per path, those nearest the object (1..200, default 20).
    #[serde(alias = "max-depth")]
    pub max_depth: Option<u32>,
    /// The sampling walk's time budget in seconds (0.1..60; default `[heap] walk_seconds`).
    #[serde(alias = "max-seconds")]
    pub max_seconds: Option<f64>,
    /// Which image, when sbmon watches several (see `sbmon targets`).
    pub target: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct HeapRetainers {
    pub target: String,
    #[serde(rename = "type")]
    pub type_name: String,
    /// Objects of the type found by the walk (at most `max_paths`); 0 when none is live.
    pub sampled: u64,
    /// The sampling walk (collections held off).
    pub walk_seconds: f64,
    /// The walk ran out of time before finding `max_paths` objects.
    pub walk_truncated: bool,
    /// SB-EXT:SEARCH-ROOTS (every thread stopped), with its retries.
    pub search_seconds: f64,
    /// One per sampled object that is still reachable.
    pub paths: Vec<RetainerPath>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RetainerPath {
    /// The type of the object the path leads to.
    pub target: String,
    pub root: RetainerRoot,
    /// The first global variable on the path (a symbol whose value holds the next step).
    pub global: Option<String>,
    /// Steps on the whole path.
    pub depth: u64,
    /// Steps left out nearest the root (beyond `max_depth`).
    pub steps_omitted: u64,
    /// From the root side to the object: each object and how it holds the next.
    pub steps: Vec<RetainerStep>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RetainerRoot {
    /// `static` (an object the GC never frees: the path starts in the oldest generations or
    /// static space), `thread-binding` (a thread's special binding of `symbol`),
    /// `thread-stack` (a variable on `thread`'s stack), `pinned`.
    pub kind: String,
    pub thread: Option<String>,
    pub symbol: Option<String>,
    /// For `thread-binding`: the binding is the current value (not a shadowed one).
    pub current: Option<bool>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RetainerStep {
    #[serde(rename = "type")]
    pub type_name: String,
    /// How this object holds the next: `value` (of a symbol), `car`, `cdr`, `nthcdr N`,
    /// `element N`, `slot NAME`, or `word N`.
    pub via: String,
    /// GC generation of the object (6: pseudo-static).
    pub generation: Option<i64>,
    /// The symbol, when the object is one.
    pub symbol: Option<String>,
}

pub struct HeapRetainersTool;

impl Tool for HeapRetainersTool {
    const NAME: &'static str = "heap_retainers";
    const TITLE: &'static str = "Heap retainers";
    const DESCRIPTION: &'static str = "What keeps objects of one type alive: for a sample of \
        live objects of `type` (a name as heap_histogram prints it), the path from a GC root \
        (a global variable, a thread's binding or stack, a static object) to the object, each \
        step with its type and the slot or index that holds the next, as SB-EXT:SEARCH-ROOTS \
        finds it. Expensive: a heap walk to sample the objects, then a search that stops \
        every thread for its whole duration (measured 0.9-1.5 s for a 135 MiB heap, 3.9-4.9 s \
        for 521 MiB of small objects); refused above the configured heap size (default \
        4 GiB).";
    const CLASS: Class = Class::Read;
    type Args = RetainersArgs;
    type Output = HeapRetainers;

    async fn run(ctx: &Context, args: RetainersArgs) -> Result<HeapRetainers, ToolError> {
        const TOOL: &str = "heap_retainers";
        if args.type_name.trim().is_empty() {
            return Err(ToolError::invalid(TOOL, "type must not be empty"));
        }
        let request = HeapRetainersRequest {
            type_name: args.type_name.clone(),
            max_paths: in_range(TOOL, "max_paths", args.max_paths, 3, MAX_PATHS)?,
            max_depth: in_range(TOOL, "max_depth", args.max_depth, 20, MAX_DEPTH)?,
            max_seconds: walk_seconds(TOOL, args.max_seconds, ctx)?,
            max_heap_bytes: ctx.config.heap.max_walk_heap_bytes,
        };
        let target = ctx.target(args.target.as_deref())?;
        let r = target
            .client
            .heap_retainers(&request)
            .await
            .map_err(explain_refusal)?;
        Ok(HeapRetainers {
            target: target.name.clone(),
            type_name: r.type_name,
            sampled: r.sampled,
            walk_seconds: r.walk_seconds,
            walk_truncated: r.walk_truncated,
            search_seconds: r.search_seconds,
            paths: r.paths.into_iter().map(RetainerPath::from).collect(),
        })
    }

    fn summary(r: &HeapRetainers) -> String {
        let mut out = format!(
            "{}: {} sampled object{} of {} (walk {}{}, root search, every thread stopped, {})",
            target_label(&r.target),
            r.sampled,
            if r.sampled == 1 { "" } else { "s" },
            cut(&r.type_name, MAX_FIELD_CHARS),
            seconds(r.walk_seconds),
            if r.walk_truncated {
                ", out of time"
            } else {
                ""
            },
            seconds(r.search_seconds),
        );
        if r.sampled == 0 {
            out.push_str("\nno live object of this type was found");
        } else if r.paths.is_empty() {
            out.push_str("\nno path found: the sampled objects became unreachable");
        }
        for (i, p) in r.paths.iter().enumerate() {
            let root = match (&p.root.thread, &p.root.symbol) {
                (Some(t), Some(s)) => format!("{} {s} in thread {t}", p.root.kind),
                (Some(t), None) => format!("{} of thread {t}", p.root.kind),
                _ => p.root.kind.clone(),
            };
            let _ = write!(
                out,
                "\npath {}: from {}{}, {} steps:",
                i + 1,
                cut(&root, MAX_FIELD_CHARS),
                p.global.as_deref().map_or(String::new(), |g| format!(
                    ", held by {}",
                    cut(g, MAX_FIELD_CHARS)
                )),
                p.depth
            );
            if p.steps_omitted > 0 {
                let _ = write!(out, " ... {} steps ...", p.steps_omitted);
            }
            for s in &p.steps {
                let what = s.symbol.as_deref().unwrap_or(&s.type_name);
                let _ = write!(out, " {} [{}] ->", cut(what, MAX_FIELD_CHARS), s.via);
            }
            let _ = write!(out, " {}", cut(&p.target, MAX_FIELD_CHARS));
        }
        out
    }
}

impl From<reply::RetainerPath> for RetainerPath {
    fn from(p: reply::RetainerPath) -> Self {
        RetainerPath {
            target: p.target,
            root: RetainerRoot {
                kind: p.root.kind,
                thread: p.root.thread,
                symbol: p.root.symbol,
                current: p.root.current,
            },
            global: p.global,
            depth: p.depth,
            steps_omitted: p.steps_omitted,
            steps: p
                .steps
                .into_iter()
                .map(|s| RetainerStep {
                    type_name: s.type_name,
                    via: s.via,
                    generation: s.generation,
                    symbol: s.symbol,
                })
                .collect(),
        }
    }
}
