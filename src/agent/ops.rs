//! Requests of the agent's control, eval and event operations, and their encoding.
//!
//! Callers above the agent layer describe what they want with these types; only this file
//! knows the operation names and argument keywords of docs/protocol.md, so a tool cannot send
//! a misspelled key, and a change of the wire touches one place.

use std::time::Duration;

use super::bounded_by;
use super::error::RemoteKind;
use super::reply::{Evaluation, PauseRecord};
use crate::wire::{DecodeError, Sexp, from_sexp};

/// A protocol operation: its name and its argument plist.
pub(crate) trait Operation {
    const OP: &'static str;
    fn args(&self) -> Sexp;
}

fn int(v: impl Into<i64>) -> Sexp {
    Sexp::Int(v.into())
}

/// An unsigned count as a wire integer. The agent bounds every such value far below
/// `i64::MAX` (sizes by the dynamic space), so a clamped value is still refused there.
fn count(v: u64) -> Sexp {
    Sexp::Int(i64::try_from(v).unwrap_or(i64::MAX))
}

fn flag(on: bool) -> Sexp {
    if on { Sexp::T } else { Sexp::Nil }
}

/// `:gc-run`: collect up to one generation, or everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcRunRequest {
    /// Generations 0..=N (0..6).
    Generation(u8),
    Full,
}

impl GcRunRequest {
    /// A full collection can take long on a big heap; the agent does not bound it.
    pub(crate) const TIMEOUT: Duration = Duration::from_secs(120);
}

impl Operation for GcRunRequest {
    const OP: &'static str = "gc-run";
    fn args(&self) -> Sexp {
        match self {
            GcRunRequest::Full => Sexp::plist([("full", Sexp::T)]),
            GcRunRequest::Generation(g) => Sexp::plist([("generation", int(*g))]),
        }
    }
}

/// New parameters for one generation; `None` leaves a parameter as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationTuning {
    pub generation: u8,
    pub bytes_consed_between_gcs: Option<u64>,
    pub number_of_gcs_before_promotion: Option<u64>,
    pub minimum_age_before_gc: Option<f64>,
}

/// `:gc-tune`: the nursery size and per-generation parameters; absent ones stay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcTuneRequest {
    pub nursery_size: Option<u64>,
    pub generations: Vec<GenerationTuning>,
}

impl Operation for GcTuneRequest {
    const OP: &'static str = "gc-tune";
    fn args(&self) -> Sexp {
        let mut args = Vec::new();
        if let Some(n) = self.nursery_size {
            args.push(("nursery-size", count(n)));
        }
        if !self.generations.is_empty() {
            let generations = self.generations.iter().map(|g| {
                let mut entry = vec![("generation", int(g.generation))];
                if let Some(b) = g.bytes_consed_between_gcs {
                    entry.push(("bytes-consed-between-gcs", count(b)));
                }
                if let Some(n) = g.number_of_gcs_before_promotion {
                    entry.push(("number-of-gcs-before-promotion", count(n)));
                }
                if let Some(a) = g.minimum_age_before_gc {
                    entry.push(("minimum-age-before-gc", Sexp::Float(a)));
                }
                Sexp::plist(entry)
            });
            args.push(("generations", Sexp::List(generations.collect())));
        }
        Sexp::plist(args)
    }
}

/// `:kill-thread`: terminate the thread with OS tid `tid`, waiting up to `timeout_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillThreadRequest {
    pub tid: i32,
    pub timeout_ms: u64,
}

impl Operation for KillThreadRequest {
    const OP: &'static str = "kill-thread";
    fn args(&self) -> Sexp {
        Sexp::plist([
            ("tid", int(self.tid)),
            ("timeout-ms", count(self.timeout_ms)),
        ])
    }
}

impl KillThreadRequest {
    pub(crate) fn timeout(&self) -> Duration {
        bounded_by(self.timeout_ms)
    }
}

/// What sb-sprof samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProfileMode {
    #[default]
    Cpu,
    Alloc,
    Time,
}

impl ProfileMode {
    fn keyword(self) -> &'static str {
        match self {
            ProfileMode::Cpu => "cpu",
            ProfileMode::Alloc => "alloc",
            ProfileMode::Time => "time",
        }
    }
}

/// `:profile`: sample for `seconds`, return the top `max_rows` functions and the stacks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfileRequest {
    pub seconds: f64,
    pub mode: ProfileMode,
    pub max_rows: u32,
    /// Keep trampolines, foreign frames, `SB-THREAD::RUN` and sb-sprof's own frames.
    pub keep_runtime_frames: bool,
}

impl Operation for ProfileRequest {
    const OP: &'static str = "profile";
    fn args(&self) -> Sexp {
        Sexp::plist([
            ("seconds", Sexp::Float(self.seconds)),
            ("mode", Sexp::keyword(self.mode.keyword())),
            ("max-rows", int(self.max_rows)),
            ("keep-runtime-frames", flag(self.keep_runtime_frames)),
        ])
    }
}

impl ProfileRequest {
    /// The agent samples for `seconds`, then builds the report; allow for that on top.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.seconds) + Duration::from_secs(30)
    }
}

/// `:eval`: read and evaluate `code` on a thread of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRequest {
    pub code: String,
    /// `None`: CL-USER.
    pub package: Option<String>,
    pub timeout_s: f64,
    pub max_output: u64,
}

impl Operation for EvalRequest {
    const OP: &'static str = "eval";
    fn args(&self) -> Sexp {
        let mut args = vec![
            ("code", Sexp::string(self.code.clone())),
            ("timeout-s", Sexp::Float(self.timeout_s)),
            ("max-output", count(self.max_output)),
        ];
        if let Some(package) = &self.package {
            args.push(("package", Sexp::string(package.clone())));
        }
        Sexp::plist(args)
    }
}

impl EvalRequest {
    /// The agent stops the evaluation at `timeout_s`; wait a little longer for its answer.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s) + Duration::from_secs(10)
    }
}

/// `:reload-system`: load (or with `force`, fully reload) an ASDF system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadRequest {
    pub system: String,
    pub force: bool,
}

impl Operation for ReloadRequest {
    const OP: &'static str = "reload-system";
    fn args(&self) -> Sexp {
        Sexp::plist([
            ("system", Sexp::string(self.system.clone())),
            ("force", flag(self.force)),
        ])
    }
}

impl ReloadRequest {
    /// Loading a large system compiles it: allow minutes, not forever.
    pub(crate) const TIMEOUT: Duration = Duration::from_secs(600);
}

/// `:heap-histogram`: the live objects of the dynamic space by type (a read operation that
/// walks the heap with collections held off, bounded by `max_seconds` and `max_heap_bytes`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeapHistogramRequest {
    /// Rows returned, 1..500.
    pub top: u32,
    /// A snapshot id the agent returned: report the change per type since it.
    pub since: Option<u64>,
    /// Only the objects on the pages of this generation (0..6).
    pub generation: Option<u8>,
    /// The walk's time budget; past it the result is marked truncated.
    pub max_seconds: f64,
    /// The agent refuses (REFUSED) when the heap in use is larger.
    pub max_heap_bytes: u64,
}

/// Loading the heap part (compiled on its first use) and naming the types come on top of
/// the walk itself.
const HEAP_MARGIN: Duration = Duration::from_secs(60);

impl Operation for HeapHistogramRequest {
    const OP: &'static str = "heap-histogram";
    fn args(&self) -> Sexp {
        let mut args = vec![
            ("top", int(self.top)),
            ("max-seconds", Sexp::Float(self.max_seconds)),
            ("max-heap-bytes", count(self.max_heap_bytes)),
        ];
        if let Some(since) = self.since {
            args.push(("since", count(since)));
        }
        if let Some(g) = self.generation {
            args.push(("generation", int(g)));
        }
        Sexp::plist(args)
    }
}

impl HeapHistogramRequest {
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.max_seconds) + HEAP_MARGIN
    }
}

/// `:heap-retainers`: paths from GC roots to a sample of the live objects of one type. The
/// search runs inside a full collection (SB-EXT:SEARCH-ROOTS with `:gc t`).
#[derive(Debug, Clone, PartialEq)]
pub struct HeapRetainersRequest {
    /// A type name as `:heap-histogram` prints it.
    pub type_name: String,
    /// Objects sampled, 1..10.
    pub max_paths: u32,
    /// Steps kept per path (those nearest the object).
    pub max_depth: u32,
    /// The sampling walk's time budget.
    pub max_seconds: f64,
    pub max_heap_bytes: u64,
}

impl Operation for HeapRetainersRequest {
    const OP: &'static str = "heap-retainers";
    fn args(&self) -> Sexp {
        Sexp::plist([
            ("type", Sexp::string(self.type_name.clone())),
            ("max-paths", int(self.max_paths)),
            ("max-depth", int(self.max_depth)),
            ("max-seconds", Sexp::Float(self.max_seconds)),
            ("max-heap-bytes", count(self.max_heap_bytes)),
        ])
    }
}

impl HeapRetainersRequest {
    /// The walk, then a full collection of a heap of up to `max_heap_bytes`, which the agent
    /// does not bound: allow minutes, as `:gc-run` does.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.max_seconds) + GcRunRequest::TIMEOUT
    }
}

/// Kinds of events the agent pushes after `:subscribe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Gc,
}

impl EventKind {
    fn keyword(self) -> &'static str {
        match self {
            EventKind::Gc => "gc",
        }
    }
}

/// `:subscribe`: have the agent push events of these kinds on this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeRequest {
    pub events: Vec<EventKind>,
}

impl Operation for SubscribeRequest {
    const OP: &'static str = "subscribe";
    fn args(&self) -> Sexp {
        let kinds = self.events.iter().map(|k| Sexp::keyword(k.keyword()));
        Sexp::plist([("events", Sexp::List(kinds.collect()))])
    }
}

/// One event the agent pushed.
#[derive(Debug, Clone)]
pub enum Event {
    /// A collection the agent measured.
    Gc(PauseRecord),
    /// A kind this sbmon does not know (a newer agent); ignored by callers.
    Other(String),
}

impl Event {
    /// Decode a pushed `(:event KIND VALUE)` as [`super::Connection::events`] delivers it.
    pub fn decode(kind: &str, value: &Sexp) -> Result<Event, DecodeError> {
        match kind {
            "gc" => Ok(Event::Gc(from_sexp(value)?)),
            other => Ok(Event::Other(other.to_string())),
        }
    }
}

/// Output an evaluation wrote before it ended, as the agent captured it (bounded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapturedOutput {
    pub text: String,
    /// Set when the output exceeded the bound and was cut.
    pub truncated: bool,
}

/// Code that ended with an error (a condition it signalled, TIMEOUT, ABORTED): what the
/// agent reported, including what the code printed before.
#[derive(Debug, Clone)]
pub struct EvalFailure {
    pub kind: RemoteKind,
    pub message: String,
    pub backtrace: Vec<String>,
    pub output: CapturedOutput,
}

/// How an evaluation ended. The agent answered either way: a failure of the code is a
/// result, not an error of the call.
#[derive(Debug, Clone)]
pub enum EvalOutcome {
    Done(Evaluation),
    Failed(EvalFailure),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire<O: Operation>(op: &O) -> String {
        format!("{} {}", O::OP, op.args())
    }

    /// The argument lists are those docs/protocol.md gives, byte for byte.
    #[test]
    fn requests_encode_as_the_protocol_says() {
        assert_eq!(wire(&GcRunRequest::Full), "gc-run (:full t)");
        assert_eq!(wire(&GcRunRequest::Generation(2)), "gc-run (:generation 2)");
        let tune = GcTuneRequest {
            nursery_size: Some(1 << 21),
            generations: vec![GenerationTuning {
                generation: 1,
                bytes_consed_between_gcs: Some(1 << 20),
                number_of_gcs_before_promotion: Some(3),
                minimum_age_before_gc: Some(0.5),
            }],
        };
        assert_eq!(
            wire(&tune),
            "gc-tune (:nursery-size 2097152 :generations ((:generation 1 \
             :bytes-consed-between-gcs 1048576 :number-of-gcs-before-promotion 3 \
             :minimum-age-before-gc 0.5d0)))"
        );
        assert_eq!(
            wire(&KillThreadRequest {
                tid: 42,
                timeout_ms: 2000
            }),
            "kill-thread (:tid 42 :timeout-ms 2000)"
        );
        assert_eq!(
            wire(&ProfileRequest {
                seconds: 1.0,
                mode: ProfileMode::Alloc,
                max_rows: 10,
                keep_runtime_frames: true,
            }),
            "profile (:seconds 1.0d0 :mode :alloc :max-rows 10 :keep-runtime-frames t)"
        );
        assert_eq!(
            wire(&EvalRequest {
                code: "(+ 1 2)".into(),
                package: Some("CL-USER".into()),
                timeout_s: 10.0,
                max_output: 65536
            }),
            "eval (:code \"(+ 1 2)\" :timeout-s 10.0d0 :max-output 65536 :package \"CL-USER\")"
        );
        assert_eq!(
            wire(&ReloadRequest {
                system: "demo".into(),
                force: false
            }),
            "reload-system (:system \"demo\" :force nil)"
        );
        assert_eq!(
            wire(&HeapHistogramRequest {
                top: 30,
                since: Some(2),
                generation: Some(0),
                max_seconds: 10.0,
                max_heap_bytes: 1 << 32
            }),
            "heap-histogram (:top 30 :max-seconds 10.0d0 :max-heap-bytes 4294967296 :since 2 \
             :generation 0)"
        );
        assert_eq!(
            wire(&HeapRetainersRequest {
                type_name: "APP::SESSION".into(),
                max_paths: 3,
                max_depth: 20,
                max_seconds: 10.0,
                max_heap_bytes: 1 << 32
            }),
            "heap-retainers (:type \"APP::SESSION\" :max-paths 3 :max-depth 20 :max-seconds \
             10.0d0 :max-heap-bytes 4294967296)"
        );
        assert_eq!(
            wire(&SubscribeRequest {
                events: vec![EventKind::Gc]
            }),
            "subscribe (:events (:gc))"
        );
    }
}
