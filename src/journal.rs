//! The event journal: what happened while nobody was looking. Health changes, targets lost
//! and found, long GC pauses, threads started and ended, control and eval actions: each an
//! [`Event`] with a time, target, kind, severity, message and a little data.
//!
//! Two bounded buckets keep them: warning and critical events (priority) and info events
//! (regular), each with its own limit on count and age ([`JournalConfig`]). A bucket that is
//! full drops its own oldest event, so a flood of info events never pushes out a warning.
//! Every event has a sequence number, increasing across both buckets, so a reader can ask for
//! what came after the last one it saw (`since`); live followers get each event as it is
//! recorded ([`Journal::follow`]).
//!
//! An event's memory is bounded: its message, kind and target are cut to a few hundred
//! characters and its data to [`MAX_DATA_BYTES`] of JSON, so a bucket's memory is at most its
//! count times [`MAX_EVENT_BYTES`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::broadcast;

use crate::config::JournalConfig;
use crate::echo::clip_to;
use crate::figures::unix_now;

/// Characters kept of a message.
pub const MAX_MESSAGE_CHARS: usize = 300;
/// Characters kept of a kind and of a target name.
pub const MAX_KIND_CHARS: usize = 64;
pub const MAX_TARGET_CHARS: usize = 128;
/// Characters kept of each string inside an event's data, and items of each array.
const MAX_DATA_STRING_CHARS: usize = 200;
const MAX_DATA_ITEMS: usize = 32;
/// Bytes of JSON kept of an event's data; larger data is replaced by a note of its size.
pub const MAX_DATA_BYTES: usize = 1024;
/// The most an event can take, all included (the strings are UTF-8, up to 4 bytes a
/// character, plus the suffix a cut string gets).
pub const MAX_EVENT_BYTES: usize = std::mem::size_of::<Event>()
    + 16
    + 4 * (MAX_MESSAGE_CHARS + MAX_KIND_CHARS + MAX_TARGET_CHARS)
    + 3 * 24
    + MAX_DATA_BYTES;
/// Events a live follower may fall behind by before it is told it missed some.
const FOLLOWER_BACKLOG: usize = 256;
/// Events one read returns when the caller gives no limit, and at most.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 1000;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    /// Warning and critical events go to the priority bucket.
    pub fn is_priority(self) -> bool {
        self >= Severity::Warning
    }
}

/// One thing that happened.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Event {
    /// Sequence number: increases by one per event recorded, across both buckets.
    pub seq: u64,
    /// Unix time (seconds) it was recorded.
    pub time: f64,
    /// The target it happened to, if any.
    pub target: Option<String>,
    /// What kind of event: e.g. `health.memory.heap`, `leak`, `deadlock`, `target.lost`,
    /// `gc.pause`, `thread.started`, `control.memory_gc`.
    pub kind: String,
    pub severity: Severity,
    /// One line saying what happened.
    pub message: String,
    /// Figures behind the message (at most 1 KiB of JSON).
    #[schemars(with = "Value")]
    pub data: Box<RawValue>,
}

impl Event {
    /// Bytes this event takes: the struct and what its strings hold.
    pub fn memory(&self) -> usize {
        std::mem::size_of::<Event>()
            + self.target.as_ref().map_or(0, String::capacity)
            + self.kind.capacity()
            + self.message.capacity()
            + self.data.get().len()
    }
}

/// An event to record: everything but its sequence number and time.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub target: Option<String>,
    pub kind: String,
    pub severity: Severity,
    pub message: String,
    pub data: Value,
}

impl NewEvent {
    pub fn new(
        target: Option<&str>,
        kind: impl Into<String>,
        severity: Severity,
        message: impl Into<String>,
        data: Value,
    ) -> Self {
        NewEvent {
            target: target.map(str::to_owned),
            kind: kind.into(),
            severity,
            message: message.into(),
            data,
        }
    }
}

/// Which events a reader wants (`events_recent`, `GET /monitoring/events`).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Only events after this sequence number: pass the `next_since` of the previous answer
    /// to get what happened since. Without it, the most recent events.
    pub since: Option<u64>,
    /// Least severity: `info` (everything), `warning` (warning and critical) or `critical`.
    pub severity: Option<Severity>,
    /// A kind, or the start of one up to a dot: `health` matches `health.memory.heap`.
    pub kind: Option<String>,
    /// Only events of this target.
    pub target: Option<String>,
    /// Events to return at most (default 50, at most 1000).
    pub limit: Option<usize>,
}

impl Filter {
    /// Why this filter cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if let Some(limit) = self.limit
            && !(1..=MAX_LIMIT).contains(&limit)
        {
            return Err(format!("limit must be 1..{MAX_LIMIT}, not {limit}"));
        }
        if let Some(kind) = &self.kind {
            let fine = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '_';
            if kind.is_empty() || kind.chars().count() > MAX_KIND_CHARS || !kind.chars().all(fine) {
                return Err(format!(
                    "kind must be a kind or the start of one (letters, digits, '.' and '_', at \
                     most {MAX_KIND_CHARS}), e.g. \"health\" or \"target.lost\"; not {:?}",
                    crate::echo::clip(kind)
                ));
            }
        }
        if let Some(target) = &self.target
            && (target.is_empty() || target.chars().count() > MAX_TARGET_CHARS)
        {
            return Err(format!(
                "target must be a target name of 1..{MAX_TARGET_CHARS} characters"
            ));
        }
        Ok(())
    }

    fn matches(&self, e: &Event) -> bool {
        self.since.is_none_or(|s| e.seq > s)
            && self.severity.is_none_or(|s| e.severity >= s)
            && self
                .target
                .as_deref()
                .is_none_or(|t| e.target.as_deref() == Some(t))
            && self.kind.as_deref().is_none_or(|k| {
                e.kind == k
                    || e.kind
                        .strip_prefix(k)
                        .is_some_and(|rest| rest.starts_with('.'))
            })
    }
}

/// What a read returns.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Recent {
    /// Matching events, oldest first: the most recent ones, or with `since` the first ones
    /// after it.
    pub events: Vec<Event>,
    /// More events matched than `limit` allowed.
    pub more: bool,
    /// Pass as `since` to get the events after these (the last one's seq; with no events, the
    /// newest seq recorded so far, or the `since` given).
    pub next_since: u64,
    /// The newest sequence number recorded so far (0: none yet).
    pub latest_seq: u64,
    /// What the journal keeps.
    pub kept: Kept,
}

/// The buckets: events in each now, and their limits.
#[derive(Debug, Clone, Copy, Serialize, JsonSchema)]
pub struct Kept {
    pub priority_events: usize,
    pub priority_max_events: usize,
    pub priority_max_age_seconds: f64,
    pub regular_events: usize,
    pub regular_max_events: usize,
    pub regular_max_age_seconds: f64,
    /// Events older than their bucket's age or pushed out of a full bucket since sbmon started.
    pub dropped: u64,
}

#[derive(Default)]
struct Buckets {
    last_seq: u64,
    priority: VecDeque<Arc<Event>>,
    regular: VecDeque<Arc<Event>>,
    dropped: u64,
}

impl Buckets {
    fn expire(&mut self, limits: &JournalConfig, now: f64) {
        for (bucket, age) in [
            (&mut self.priority, limits.priority_seconds),
            (&mut self.regular, limits.regular_seconds),
        ] {
            while bucket.front().is_some_and(|e| now - e.time > age) {
                bucket.pop_front();
                self.dropped += 1;
            }
        }
    }
}

/// The journal of one sbmon.
pub struct Journal {
    limits: JournalConfig,
    buckets: Mutex<Buckets>,
    live: broadcast::Sender<Arc<Event>>,
}

impl Default for Journal {
    fn default() -> Self {
        Journal::new(JournalConfig::default())
    }
}

impl Journal {
    pub fn new(limits: JournalConfig) -> Self {
        Journal {
            limits,
            buckets: Mutex::new(Buckets::default()),
            live: broadcast::channel(FOLLOWER_BACKLOG).0,
        }
    }

    pub fn limits(&self) -> &JournalConfig {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record `event` now; followers get it at once.
    pub fn record(&self, event: NewEvent) -> Arc<Event> {
        self.record_at(event, unix_now())
    }

    /// Record `event` as of unix time `now`.
    pub fn record_at(&self, event: NewEvent, now: f64) -> Arc<Event> {
        let mut event = Event {
            seq: 0,
            time: now,
            target: event.target.map(|t| shrunk(clip_to(&t, MAX_TARGET_CHARS))),
            kind: shrunk(clip_to(&event.kind, MAX_KIND_CHARS)),
            severity: event.severity,
            message: shrunk(clip_to(&event.message, MAX_MESSAGE_CHARS)),
            data: bounded(event.data),
        };
        let recorded = {
            let mut b = self.lock();
            b.expire(&self.limits, now);
            b.last_seq += 1;
            event.seq = b.last_seq;
            let event = Arc::new(event);
            let (bucket, max) = if event.severity.is_priority() {
                (&mut b.priority, self.limits.priority_events)
            } else {
                (&mut b.regular, self.limits.regular_events)
            };
            let mut dropped = 0;
            while bucket.len() >= max {
                bucket.pop_front();
                dropped += 1;
            }
            bucket.push_back(event.clone());
            b.dropped += dropped;
            event
        };
        // No follower is not an error.
        let _ = self.live.send(recorded.clone());
        recorded
    }

    /// Events as they are recorded from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }

    /// The events `filter` selects (checked by the caller with [`Filter::check`]).
    pub fn recent(&self, filter: &Filter) -> Recent {
        self.recent_at(filter, unix_now())
    }

    /// The events `filter` selects, as of unix time `now` (older ones have expired).
    pub fn recent_at(&self, filter: &Filter, now: f64) -> Recent {
        let limit = filter.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
        let mut b = self.lock();
        b.expire(&self.limits, now);
        let mut matching: Vec<&Arc<Event>> = b
            .priority
            .iter()
            .chain(b.regular.iter())
            .filter(|e| filter.matches(e))
            .collect();
        matching.sort_unstable_by_key(|e| e.seq);
        let more = matching.len() > limit;
        let chosen = if filter.since.is_some() {
            &matching[..matching.len().min(limit)]
        } else {
            &matching[matching.len().saturating_sub(limit)..]
        };
        let events: Vec<Event> = chosen.iter().map(|e| Event::clone(e)).collect();
        let next_since = events
            .last()
            .map(|e| e.seq)
            .or(filter.since)
            .unwrap_or(b.last_seq);
        Recent {
            events,
            more,
            next_since,
            latest_seq: b.last_seq,
            kept: self.kept(&b),
        }
    }

    fn kept(&self, b: &Buckets) -> Kept {
        Kept {
            priority_events: b.priority.len(),
            priority_max_events: self.limits.priority_events,
            priority_max_age_seconds: self.limits.priority_seconds,
            regular_events: b.regular.len(),
            regular_max_events: self.limits.regular_events,
            regular_max_age_seconds: self.limits.regular_seconds,
            dropped: b.dropped,
        }
    }

    /// Bytes the kept events take (the buckets' own slots aside).
    pub fn memory(&self) -> usize {
        let b = self.lock();
        b.priority
            .iter()
            .chain(b.regular.iter())
            .map(|e| e.memory() + 16)
            .sum()
    }
}

fn shrunk(mut s: String) -> String {
    s.shrink_to_fit();
    s
}

/// `data` cut to size: long strings and arrays shortened, and when the JSON is still larger
/// than [`MAX_DATA_BYTES`], a note of its size instead.
fn bounded(data: Value) -> Box<RawValue> {
    let text = serde_json::to_string(&shorten(data)).unwrap_or_else(|_| "null".into());
    let text = if text.len() > MAX_DATA_BYTES {
        format!("{{\"clipped\":true,\"bytes\":{}}}", text.len())
    } else {
        text
    };
    RawValue::from_string(text)
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

fn shorten(v: Value) -> Value {
    match v {
        Value::String(s) if s.len() > MAX_DATA_STRING_CHARS => {
            Value::String(clip_to(&s, MAX_DATA_STRING_CHARS))
        }
        Value::Array(items) => {
            let n = items.len();
            let mut kept: Vec<Value> = items
                .into_iter()
                .take(MAX_DATA_ITEMS)
                .map(shorten)
                .collect();
            if n > MAX_DATA_ITEMS {
                kept.push(Value::String(format!("... ({n} items)")));
            }
            Value::Array(kept)
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .take(MAX_DATA_ITEMS)
                .map(|(k, v)| (clip_to(&k, MAX_KIND_CHARS), shorten(v)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(severity: Severity, kind: &str, target: &str) -> NewEvent {
        NewEvent::new(
            Some(target),
            kind,
            severity,
            format!("{kind} on {target}"),
            json!({"n": 1}),
        )
    }

    fn small() -> JournalConfig {
        JournalConfig {
            priority_events: 20,
            priority_seconds: 1000.0,
            regular_events: 10,
            regular_seconds: 100.0,
            gc_pause_seconds: 0.1,
        }
    }

    fn all(j: &Journal, now: f64) -> Vec<Event> {
        j.recent_at(
            &Filter {
                limit: Some(MAX_LIMIT),
                ..Filter::default()
            },
            now,
        )
        .events
    }

    #[test]
    fn a_flood_of_regular_events_keeps_every_priority_event() {
        let j = Journal::new(small());
        let mut priority = Vec::new();
        for i in 0..20 {
            let severity = if i % 2 == 0 {
                Severity::Warning
            } else {
                Severity::Critical
            };
            priority.push(j.record_at(event(severity, "health.x", "a"), 1.0).seq);
            for _ in 0..50 {
                j.record_at(event(Severity::Info, "thread.started", "a"), 1.0);
            }
        }
        for _ in 0..10_000 {
            j.record_at(event(Severity::Info, "thread.ended", "a"), 2.0);
        }
        let kept = all(&j, 2.0);
        let kept_priority: Vec<u64> = kept
            .iter()
            .filter(|e| e.severity.is_priority())
            .map(|e| e.seq)
            .collect();
        assert_eq!(kept_priority, priority);
        let regular: Vec<&Event> = kept.iter().filter(|e| !e.severity.is_priority()).collect();
        assert_eq!(regular.len(), 10);
        assert!(regular.iter().all(|e| e.kind == "thread.ended"));
        // The newest ten, in order.
        let last = kept.iter().map(|e| e.seq).max().unwrap();
        assert_eq!(regular.last().unwrap().seq, last);
        assert_eq!(regular.first().unwrap().seq, last - 9);

        // A priority bucket that is full drops its own oldest, not a regular one.
        for _ in 0..5 {
            j.record_at(event(Severity::Critical, "deadlock", "a"), 3.0);
        }
        let kept = all(&j, 3.0);
        assert_eq!(kept.iter().filter(|e| e.severity.is_priority()).count(), 20);
        assert_eq!(
            kept.iter().filter(|e| !e.severity.is_priority()).count(),
            10
        );
        let r = j.recent_at(&Filter::default(), 3.0);
        assert_eq!(r.kept.priority_events, 20);
        assert_eq!(r.kept.regular_events, 10);
        assert_eq!(r.kept.dropped, 5 + (20 * 50 + 10_000 - 10) as u64);
    }

    #[test]
    fn events_expire_by_their_buckets_age() {
        let j = Journal::new(small());
        j.record_at(event(Severity::Info, "thread.started", "a"), 0.0);
        j.record_at(event(Severity::Warning, "gc.pause", "a"), 0.0);
        j.record_at(event(Severity::Info, "thread.ended", "a"), 50.0);
        assert_eq!(all(&j, 100.0).len(), 3);
        // Info lives 100 s, warning 1000 s.
        let at_101: Vec<String> = all(&j, 100.5).into_iter().map(|e| e.kind).collect();
        assert_eq!(at_101, ["gc.pause", "thread.ended"]);
        let at_200: Vec<String> = all(&j, 200.0).into_iter().map(|e| e.kind).collect();
        assert_eq!(at_200, ["gc.pause"]);
        assert!(all(&j, 1000.5).is_empty());
        // Recording expires too, and sequence numbers go on.
        let next = j.record_at(event(Severity::Info, "x", "a"), 5000.0);
        assert_eq!(next.seq, 4);
        assert_eq!(j.recent_at(&Filter::default(), 5000.0).kept.dropped, 3);
    }

    #[test]
    fn filters_select_and_since_pages_forward() {
        let j = Journal::new(small());
        j.record_at(event(Severity::Info, "thread.started", "a"), 1.0);
        j.record_at(event(Severity::Warning, "health.memory.heap", "a"), 1.0);
        j.record_at(event(Severity::Critical, "health.memory.rss", "b"), 1.0);
        j.record_at(event(Severity::Info, "healthy", "b"), 1.0);
        j.record_at(event(Severity::Warning, "leak", "b"), 1.0);
        let kinds = |f: Filter| -> Vec<String> {
            j.recent_at(&f, 1.0)
                .events
                .into_iter()
                .map(|e| e.kind)
                .collect()
        };
        assert_eq!(
            kinds(Filter {
                kind: Some("health".into()),
                ..Filter::default()
            }),
            ["health.memory.heap", "health.memory.rss"]
        );
        assert_eq!(
            kinds(Filter {
                severity: Some(Severity::Warning),
                target: Some("b".into()),
                ..Filter::default()
            }),
            ["health.memory.rss", "leak"]
        );
        assert_eq!(
            kinds(Filter {
                severity: Some(Severity::Critical),
                ..Filter::default()
            }),
            ["health.memory.rss"]
        );
        // Without since: the newest; with since: the first after it.
        let newest = j.recent_at(
            &Filter {
                limit: Some(2),
                ..Filter::default()
            },
            1.0,
        );
        assert!(newest.more);
        assert_eq!(
            newest.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        let page = j.recent_at(
            &Filter {
                since: Some(1),
                limit: Some(2),
                ..Filter::default()
            },
            1.0,
        );
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(page.next_since, 3);
        let rest = j.recent_at(
            &Filter {
                since: Some(page.next_since),
                ..Filter::default()
            },
            1.0,
        );
        assert_eq!(
            rest.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        assert!(!rest.more);
        let none = j.recent_at(
            &Filter {
                since: Some(5),
                ..Filter::default()
            },
            1.0,
        );
        assert!(none.events.is_empty());
        assert_eq!((none.next_since, none.latest_seq), (5, 5));
    }

    #[test]
    fn bad_filters_are_refused_with_what_is_wrong() {
        let bad = |f: Filter| f.check().unwrap_err();
        assert!(
            bad(Filter {
                limit: Some(0),
                ..Filter::default()
            })
            .contains("limit must be 1..1000")
        );
        assert!(
            bad(Filter {
                kind: Some("health check!".into()),
                ..Filter::default()
            })
            .contains("kind must be")
        );
        assert!(
            bad(Filter {
                target: Some(String::new()),
                ..Filter::default()
            })
            .contains("target must be")
        );
        let unknown: Result<Filter, _> = serde_json::from_value(json!({"severity": "error"}));
        let message = unknown.unwrap_err().to_string();
        assert!(
            message.contains("info") && message.contains("critical"),
            "{message}"
        );
        let typo: Result<Filter, _> = serde_json::from_value(json!({"sinse": 3}));
        assert!(typo.unwrap_err().to_string().contains("unknown field"));
        assert!(Filter::default().check().is_ok());
    }

    #[test]
    fn an_events_memory_is_bounded_whatever_it_is_given() {
        let j = Journal::new(small());
        let huge = "é".repeat(100_000);
        let e = j.record_at(
            NewEvent::new(
                Some(&huge),
                huge.clone(),
                Severity::Warning,
                huge.clone(),
                json!({"text": huge, "list": vec![huge.clone(); 1000], "n": 1}),
            ),
            1.0,
        );
        assert!(
            e.memory() <= MAX_EVENT_BYTES,
            "{} > {MAX_EVENT_BYTES}",
            e.memory()
        );
        assert!(e.data.get().len() <= MAX_DATA_BYTES);
        let data: Value = serde_json::from_str(e.data.get()).unwrap();
        assert_eq!(data["clipped"], true);
        assert!(e.message.ends_with("(100000 chars)"));
        // Small data is kept as given.
        let e = j.record_at(event(Severity::Info, "x", "a"), 1.0);
        assert_eq!(e.data.get(), r#"{"n":1}"#);
        const { assert!(MAX_EVENT_BYTES < 4096) };
    }

    #[tokio::test]
    async fn followers_get_each_event_as_it_is_recorded() {
        let j = Journal::new(small());
        let mut rx = j.follow();
        j.record_at(event(Severity::Critical, "deadlock", "a"), 1.0);
        let got = rx.recv().await.unwrap();
        assert_eq!((got.seq, got.kind.as_str()), (1, "deadlock"));
    }
}
