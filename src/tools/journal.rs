//! `events_recent`: what the event journal kept (the journal itself is `crate::journal`,
//! shared with `GET /monitoring/events`, the `/events` stream and the MCP resource
//! `sbmon://events`).

use std::fmt::Write as _;

use super::summary::{MAX_FIELD_CHARS, cut};
use super::{Class, Tool, ToolError};
use crate::context::Context;
use crate::journal::{Filter, Recent};

/// Events listed one per line in a summary; the structured result has them all.
const SUMMARY_EVENTS: usize = 10;

pub struct EventsRecent;

impl Tool for EventsRecent {
    const NAME: &'static str = "events_recent";
    const TITLE: &'static str = "Recent events";
    const DESCRIPTION: &'static str = "What happened while nobody was looking, from sbmon's \
        event journal: health changes per check (a leak verdict, a deadlock), targets lost and \
        found, GC pauses over the threshold, threads started and ended, and every control or \
        eval action with its outcome. Each event has seq, time, target, kind, severity (info, \
        warning, critical), message and data. Filter by severity (least), kind (or its start, \
        e.g. \"health\"), target; pass the answer's next_since as since to get only newer events.";
    const CLASS: Class = Class::Read;
    type Args = Filter;
    type Output = Recent;

    async fn run(ctx: &Context, filter: Filter) -> Result<Recent, ToolError> {
        filter
            .check()
            .map_err(|message| ToolError::invalid(Self::NAME, message))?;
        Ok(ctx.journal.recent(&filter))
    }

    /// How many events, then the newest few, one line each.
    fn summary(r: &Recent) -> String {
        let mut out = format!(
            "{} event{}{} (journal keeps {} priority, {} regular; latest seq {})",
            r.events.len(),
            if r.events.len() == 1 { "" } else { "s" },
            if r.more { ", more match" } else { "" },
            r.kept.priority_events,
            r.kept.regular_events,
            r.latest_seq
        );
        let shown = r.events.len().saturating_sub(SUMMARY_EVENTS);
        if shown > 0 {
            let _ = write!(out, "\n... {shown} older ones in the structured result");
        }
        for e in &r.events[shown..] {
            let _ = write!(
                out,
                "\n- #{} {} {} {}: {}",
                e.seq,
                e.severity.name(),
                e.target.as_deref().unwrap_or("-"),
                e.kind,
                cut(&e.message, MAX_FIELD_CHARS)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Journal, NewEvent, Severity};

    #[test]
    fn the_summary_lists_the_newest_events() {
        let j = Journal::default();
        for i in 0..12 {
            j.record_at(
                NewEvent::new(
                    Some("app"),
                    "thread.started",
                    Severity::Info,
                    format!("thread t{i} started"),
                    serde_json::Value::Null,
                ),
                1.0,
            );
        }
        j.record_at(
            NewEvent::new(
                Some("app"),
                "deadlock",
                Severity::Critical,
                "2 threads in a cycle",
                serde_json::Value::Null,
            ),
            1.0,
        );
        let r = j.recent_at(&Filter::default(), 2.0);
        let s = EventsRecent::summary(&r);
        assert!(
            s.starts_with("13 events (journal keeps 1 priority, 12 regular; latest seq 13)"),
            "{s}"
        );
        assert!(s.contains("... 3 older ones"), "{s}");
        assert!(
            s.ends_with("- #13 critical app deadlock: 2 threads in a cycle"),
            "{s}"
        );
        assert!(!s.contains("thread t2 "), "{s}");
    }
}
