//! Short human-readable summaries of tool results: what a front end shows next to the full
//! JSON (MCP puts it in the text content beside `structuredContent`). A summary is a few lines
//! per tool, bounded in size whatever the result holds, and never fails: it reads the JSON
//! value a tool returned, so a missing or odd field only makes the line shorter.

use std::fmt::Write as _;

use serde_json::Value;

/// Most characters in a summary; long thread lists and dumps are cut with a note.
pub const MAX_SUMMARY_CHARS: usize = 8_000;
/// Most threads listed by `thread_list`.
const MAX_THREAD_LINES: usize = 50;
/// Most threads shown by `thread_dump_all`, and frames shown per thread there.
const MAX_DUMP_THREADS: usize = 30;
const MAX_DUMP_FRAMES: usize = 5;
/// Per-thread lines stop once a summary is this long, leaving room for the "... and N more"
/// line under `MAX_SUMMARY_CHARS`.
const LINES_BUDGET: usize = MAX_SUMMARY_CHARS - 1_500;
/// Frames shown by `thread_inspect`.
const MAX_INSPECT_FRAMES: usize = 15;
/// A backtrace frame or a reason longer than this is cut (frames can print large objects).
const MAX_FIELD_CHARS: usize = 200;

/// A few lines saying what `value`, the result of tool `tool`, shows.
pub fn summarize(tool: &str, value: &Value) -> String {
    let text = match tool {
        "health_check" => health(value),
        "memory_stats" => memory(value),
        "gc_stats" => gc(value),
        "runtime_stats" => runtime(value),
        "thread_list" => thread_list(value),
        "thread_inspect" => thread_inspect(value),
        "thread_dump_all" => thread_dump(value),
        "repl_eval" => repl_eval(value),
        "memory_gc" => memory_gc(value),
        "gc_tune" => gc_tune(value),
        "thread_kill" => thread_kill(value),
        "code_reload_system" => reload(value),
        "profile_cpu" => profile(value),
        "gc_watch" => gc_watch(value),
        // The exposition is its own summary; the bound below keeps long ones readable.
        "metrics_export" => value["text"].as_str().unwrap_or_default().to_string(),
        // A tool without a summary of its own: its JSON, cut to size.
        _ => value.to_string(),
    };
    bound(text, MAX_SUMMARY_CHARS)
}

fn health(v: &Value) -> String {
    let mut out = format!(
        "{}: {}",
        target_label(v),
        str_or(v, "status", "unknown status")
    );
    let checks = arr(v, "checks");
    let mut problems = 0;
    for check in checks {
        let status = str_or(check, "status", "unknown");
        if status == "healthy" {
            continue;
        }
        problems += 1;
        let _ = write!(
            out,
            "\n- {} {}: {}",
            str_or(check, "name", "?"),
            status,
            cut(str_or(check, "reason", ""), MAX_FIELD_CHARS)
        );
    }
    if problems == 0 && !checks.is_empty() {
        let _ = write!(out, " (all {} checks healthy)", checks.len());
    }
    out
}

fn memory(v: &Value) -> String {
    let mut out = format!(
        "{}: heap {} of {} ({}), RSS {} of {} limit ({}; limit from {}), peak RSS {}",
        target_label(v),
        bytes(v, "heap_used_bytes"),
        bytes(v, "heap_limit_bytes"),
        percent(v, "heap_used_ratio"),
        bytes(v, "rss_bytes"),
        bytes(v, "memory_limit_bytes"),
        percent(v, "rss_limit_ratio"),
        cut(str_or(v, "memory_limit_source", "?"), MAX_FIELD_CHARS),
        bytes(v, "rss_peak_bytes"),
    );
    let _ = write!(
        out,
        "\nnursery {}, consed since start {}",
        bytes(v, "nursery_size_bytes"),
        bytes(v, "bytes_consed_total")
    );
    let generations: Vec<String> = arr(v, "generations")
        .iter()
        .map(|g| {
            format!(
                "{}: {}",
                g.get("generation").map_or("?".into(), Value::to_string),
                bytes(g, "bytes")
            )
        })
        .collect();
    if !generations.is_empty() {
        let _ = write!(
            out,
            "\n{} generations: {}",
            generations.len(),
            generations.join(", ")
        );
    }
    out
}

fn gc(v: &Value) -> String {
    let mut out = format!(
        "{}: {} GCs, GC CPU {} ({} of wall time since start",
        target_label(v),
        num_or(v, "gc_count"),
        seconds(v.get("gc_cpu_seconds")),
        percent(v, "gc_time_ratio"),
    );
    if v.get("gc_time_ratio_last_minute")
        .is_some_and(|x| x.is_number())
    {
        let _ = write!(
            out,
            ", {} over the last minute",
            percent(v, "gc_time_ratio_last_minute")
        );
    }
    let _ = write!(out, ", {} of process CPU)", percent(v, "gc_cpu_share"));
    let pauses = v.get("pauses").unwrap_or(&Value::Null);
    if pauses.get("measured").and_then(Value::as_bool) == Some(false) {
        out.push_str("\npauses: not measured on this SBCL");
    } else if pauses.get("count").and_then(Value::as_u64) == Some(0) {
        out.push_str("\npauses: none measured yet (no collection since the agent started)");
    } else {
        let _ = write!(
            out,
            "\npauses: {} measured, last {}, mean {}, p50 {}, p95 {}, p99 {}, max {}",
            num_or(pauses, "count"),
            seconds(pauses.get("last_seconds")),
            seconds(pauses.get("mean_seconds")),
            seconds(pauses.get("p50_seconds")),
            seconds(pauses.get("p95_seconds")),
            seconds(pauses.get("p99_seconds")),
            seconds(pauses.get("max_seconds")),
        );
    }
    let recent = arr(v, "recent").len();
    if recent > 0 {
        let _ = write!(
            out,
            "\nfreed {} in the last {} collections",
            signed_bytes(v.get("bytes_freed_recent")),
            recent
        );
    }
    out
}

fn runtime(v: &Value) -> String {
    format!(
        "{}: {} {} (agent {}), pid {}, up {}\n{} Lisp threads ({} OS threads), {} packages; \
         CPU user {} sys {}, GC {} of wall time\nfds {} of {}, {} sockets",
        target_label(v),
        str_or(v, "lisp_implementation", "Lisp"),
        str_or(v, "lisp_version", "?"),
        str_or(v, "agent_version", "?"),
        num_or(v, "pid"),
        duration(v.get("uptime_seconds").and_then(Value::as_f64)),
        num_or(v, "thread_count"),
        num_or(v, "os_thread_count"),
        num_or(v, "package_count"),
        seconds(v.get("cpu_user_seconds")),
        seconds(v.get("cpu_system_seconds")),
        percent(v, "gc_time_ratio"),
        num_or(v, "open_fds"),
        v.get("max_fds")
            .filter(|m| m.is_number())
            .map_or("unlimited".into(), Value::to_string),
        num_or(v, "socket_count"),
    )
}

/// `tid name [main] [agent] state, waits for X, cpu`
fn thread_line(t: &Value) -> String {
    let mut line = format!(
        "{} {}",
        t.get("tid")
            .filter(|x| x.is_number())
            .map_or("?".into(), Value::to_string),
        thread_name(t)
    );
    for flag in ["main", "agent"] {
        if t.get(flag).and_then(Value::as_bool) == Some(true) {
            let _ = write!(line, " [{flag}]");
        }
    }
    if t.get("alive").and_then(Value::as_bool) == Some(false) {
        line.push_str(" [dead]");
    }
    let _ = write!(line, " {}", str_or(t, "os_state", "state unknown"));
    if let Some(wait) = t.get("lisp_wait").and_then(Value::as_str) {
        let _ = write!(
            line,
            ", waits for {} {}",
            str_or(t, "lisp_wait_type", "object"),
            cut(wait, MAX_FIELD_CHARS)
        );
    }
    if let Some(cpu) = t.get("cpu_seconds").filter(|c| c.is_number()) {
        let _ = write!(line, ", cpu {}", seconds(Some(cpu)));
    }
    line
}

fn thread_list(v: &Value) -> String {
    let threads = arr(v, "threads");
    let os_only = arr(v, "os_only_threads");
    let waiting = threads
        .iter()
        .filter(|t| t.get("lisp_wait").is_some_and(Value::is_string))
        .count();
    let mut out = format!(
        "{}: {} Lisp threads ({} waiting on a lock), {} OS-only threads",
        target_label(v),
        threads.len(),
        waiting,
        os_only.len()
    );
    let mut shown = 0;
    for t in threads.iter().take(MAX_THREAD_LINES) {
        if out.len() > LINES_BUDGET {
            break;
        }
        let _ = write!(out, "\n{}", thread_line(t));
        shown += 1;
    }
    if threads.len() > shown {
        let _ = write!(
            out,
            "\n... and {} more (all are in the structured result)",
            threads.len() - shown
        );
    }
    out
}

fn frames_block(out: &mut String, frames: &[Value], shown: usize, indent: &str) {
    for frame in frames.iter().take(shown) {
        let text = frame
            .as_str()
            .map_or_else(|| frame.to_string(), str::to_string);
        let _ = write!(out, "\n{indent}{}", cut(&text, MAX_FIELD_CHARS));
    }
    if frames.len() > shown {
        let _ = write!(out, "\n{indent}... {} more frames", frames.len() - shown);
    }
}

fn thread_inspect(v: &Value) -> String {
    let mut out = format!("{}: {}", target_label(v), thread_line(v));
    if let Some(wchan) = v.get("wchan").and_then(Value::as_str) {
        let _ = write!(out, ", kernel wait {}", cut(wchan, MAX_FIELD_CHARS));
    }
    if v.get("answered").and_then(Value::as_bool) == Some(false) {
        out.push_str(
            "\nno backtrace: the thread did not answer in time (it may run without interrupts)",
        );
        return out;
    }
    let frames = arr(v, "frames");
    let truncated = v.get("truncated").and_then(Value::as_bool) == Some(true);
    let _ = write!(
        out,
        "\nbacktrace ({} frames{}):",
        frames.len(),
        if truncated { ", cut at max_frames" } else { "" }
    );
    frames_block(&mut out, frames, MAX_INSPECT_FRAMES, "  ");
    out
}

fn thread_dump(v: &Value) -> String {
    let threads = arr(v, "threads");
    let mut out = format!(
        "{}: {} threads, {} did not answer",
        target_label(v),
        threads.len(),
        num_or(v, "unanswered")
    );
    let mut shown = 0;
    for t in threads.iter().take(MAX_DUMP_THREADS) {
        if out.len() > LINES_BUDGET {
            break;
        }
        shown += 1;
        let _ = write!(
            out,
            "\n{} {}:",
            t.get("tid")
                .filter(|x| x.is_number())
                .map_or("?".into(), Value::to_string),
            thread_name(t)
        );
        if t.get("answered").and_then(Value::as_bool) == Some(false) {
            out.push_str(" did not answer");
            continue;
        }
        frames_block(&mut out, arr(t, "frames"), MAX_DUMP_FRAMES, "  ");
    }
    if threads.len() > shown {
        let _ = write!(
            out,
            "\n... and {} more threads (all are in the structured result)",
            threads.len() - shown
        );
    }
    out
}

// ---- reading the JSON without failing ----

fn memory_gc(v: &Value) -> String {
    let what = if v.get("full") == Some(&Value::Bool(true)) {
        "full GC".to_string()
    } else {
        format!("GC of generations 0..{}", num_or(v, "generation"))
    };
    format!(
        "{what}: heap {} -> {} ({} freed) in {} s",
        bytes(v, "heap_before"),
        bytes(v, "heap_after"),
        bytes(v, "bytes_freed"),
        num_or(v, "pause_seconds")
    )
}

fn gc_tune(v: &Value) -> String {
    let mut out = format!(
        "nursery {} -> {}",
        bytes(&v["before"], "nursery_size"),
        bytes(&v["after"], "nursery_size")
    );
    for (before, after) in arr(&v["before"], "generations")
        .iter()
        .zip(arr(&v["after"], "generations"))
    {
        if before != after {
            out.push_str(&format!(
                "\ngeneration {}: bytes between GCs {} -> {}, GCs before promotion {} -> {}, \
                 minimum age {} -> {}",
                num_or(after, "generation"),
                bytes(before, "bytes_consed_between_gcs"),
                bytes(after, "bytes_consed_between_gcs"),
                num_or(before, "number_of_gcs_before_promotion"),
                num_or(after, "number_of_gcs_before_promotion"),
                num_or(before, "minimum_age_before_gc"),
                num_or(after, "minimum_age_before_gc"),
            ));
        }
    }
    out
}

fn thread_kill(v: &Value) -> String {
    let ended = if v.get("ended") == Some(&Value::Bool(true)) {
        "ended"
    } else {
        "did NOT end within the timeout"
    };
    format!(
        "thread {} ({}) {ended} after {} s",
        num_or(v, "tid"),
        cut(str_or(v, "name", "unnamed"), MAX_FIELD_CHARS),
        num_or(v, "waited_seconds")
    )
}

fn reload(v: &Value) -> String {
    let warnings = arr(v, "warnings");
    let mut out = format!(
        "{} {} in {} s, {} warning(s)",
        if v.get("forced") == Some(&Value::Bool(true)) {
            "reloaded"
        } else {
            "loaded"
        },
        cut(str_or(v, "system", "?"), MAX_FIELD_CHARS),
        num_or(v, "seconds"),
        warnings.len()
    );
    for w in warnings.iter().take(10) {
        out.push_str(&format!(
            "\n  {}",
            cut(w.as_str().unwrap_or(""), MAX_FIELD_CHARS)
        ));
    }
    out
}

fn repl_eval(v: &Value) -> String {
    if let Some(error) = v.get("error").filter(|e| !e.is_null()) {
        let mut out = format!(
            "error {}: {}",
            str_or(error, "type", "?"),
            cut(str_or(error, "message", ""), MAX_FIELD_CHARS)
        );
        for frame in arr(error, "backtrace").iter().take(10) {
            out.push_str(&format!(
                "\n  {}",
                cut(frame.as_str().unwrap_or(""), MAX_FIELD_CHARS)
            ));
        }
        return out;
    }
    let values: Vec<&str> = arr(v, "values").iter().filter_map(Value::as_str).collect();
    let mut out = format!("=> {}", values.join(" ; "));
    let output = str_or(v, "output", "");
    if !output.is_empty() {
        out.push_str(&format!("\noutput:\n{output}"));
    }
    out
}

fn gc_watch(v: &Value) -> String {
    let count = v.get("count").and_then(Value::as_u64).unwrap_or(0);
    let mut out = format!(
        "{count} collection{} in {:.1} s: pauses sum {}, max {}; freed {}",
        if count == 1 { "" } else { "s" },
        v.get("seconds").and_then(Value::as_f64).unwrap_or(0.0),
        seconds(v.get("pause_sum_seconds")),
        seconds(v.get("pause_max_seconds")),
        bytes(v, "freed_bytes"),
    );
    if let Some(missed) = v.get("missed").and_then(Value::as_u64).filter(|&m| m > 0) {
        out.push_str(&format!(" ({missed} more not delivered)"));
    }
    for e in arr(v, "events").iter().take(20) {
        out.push_str(&format!(
            "\n  gen {} pause {} freed {}",
            num_or(e, "generation"),
            seconds(e.get("wall_seconds")),
            bytes(e, "freed_bytes"),
        ));
    }
    out
}

fn profile(v: &Value) -> String {
    let mut out = format!(
        "{} samples over {} s ({} mode); top functions by self samples:",
        num_or(v, "samples"),
        num_or(v, "seconds"),
        str_or(v, "mode", "?")
    );
    for row in arr(v, "rows").iter().take(20) {
        out.push_str(&format!(
            "\n  {:>5.1}% self {:>5.1}% cum  {}",
            row.get("self_percent")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            row.get("cumulative_percent")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            cut(str_or(row, "function", "?"), MAX_FIELD_CHARS)
        ));
    }
    out
}

fn arr<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn str_or<'a>(v: &'a Value, key: &str, default: &'a str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or(default)
}

fn num_or(v: &Value, key: &str) -> String {
    v.get(key)
        .filter(|x| x.is_number())
        .map_or("?".into(), Value::to_string)
}

fn target_label(v: &Value) -> String {
    match v.get("target").and_then(Value::as_str) {
        Some(t) => format!("target {}", cut(t, MAX_FIELD_CHARS)),
        None => "target".into(),
    }
}

fn thread_name(t: &Value) -> String {
    match t.get("name").and_then(Value::as_str) {
        Some(n) => format!("{:?}", cut(n, MAX_FIELD_CHARS)),
        None => "(unnamed)".into(),
    }
}

// ---- formatting ----

fn percent(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_f64) {
        Some(r) => format!("{:.1}%", r * 100.0),
        None => "?".into(),
    }
}

/// Binary units with one decimal, e.g. `45.2 MiB`, `1 GiB`.
fn format_bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n.abs();
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let sign = if n < 0.0 { "-" } else { "" };
    if unit == 0 || value.fract() == 0.0 {
        format!("{sign}{value:.0} {}", UNITS[unit])
    } else {
        format!("{sign}{value:.1} {}", UNITS[unit])
    }
}

fn bytes(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_f64)
        .map_or("?".into(), format_bytes)
}

fn signed_bytes(v: Option<&Value>) -> String {
    v.and_then(Value::as_f64).map_or("?".into(), format_bytes)
}

/// A duration in seconds as µs, ms or s; `-` when absent (e.g. no pause yet).
fn seconds(v: Option<&Value>) -> String {
    match v.and_then(Value::as_f64) {
        None => "-".into(),
        Some(0.0) => "0".into(),
        Some(s) if s < 1e-3 => format!("{:.0} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.2} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
    }
}

/// Uptime as `3d 4h`, `2h 5m`, `4m 10s` or `12s`.
fn duration(v: Option<f64>) -> String {
    let Some(s) = v.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "?".into();
    };
    let s = s as u64;
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

/// At most `max` characters of `s`, with `...` when cut.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

fn bound(s: String, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!(
            "{}\n... (summary cut; the structured result has everything)",
            &s[..i]
        ),
        None => s,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn control_and_eval_summaries_carry_their_figures() {
        let gc = summarize(
            "memory_gc",
            &json!({"generation": 6, "full": true, "heap_before": 104857600,
                    "heap_after": 20971520, "bytes_freed": 83886080, "pause_seconds": 0.012}),
        );
        assert!(
            gc.starts_with("full GC: heap 100 MiB -> 20 MiB (80 MiB freed) in 0.012 s"),
            "{gc}"
        );
        let kill = summarize(
            "thread_kill",
            &json!({"tid": 42, "name": "worker", "ended": false, "waited_seconds": 2.0}),
        );
        assert!(kill.contains("42 (worker) did NOT end"), "{kill}");
        let eval = summarize(
            "repl_eval",
            &json!({"ok": false, "error": {"type": "DIVISION-BY-ZERO", "message": "x",
                    "backtrace": ["(OOPS 0)"]}}),
        );
        assert!(
            eval.starts_with("error DIVISION-BY-ZERO: x\n  (OOPS 0)"),
            "{eval}"
        );
        let tune = summarize(
            "gc_tune",
            &json!({"before": {"nursery_size": 1048576, "generations": [
                        {"generation": 1, "bytes_consed_between_gcs": 1048576,
                         "number_of_gcs_before_promotion": 1, "minimum_age_before_gc": 0.75}]},
                    "after": {"nursery_size": 2097152, "generations": [
                        {"generation": 1, "bytes_consed_between_gcs": 1048576,
                         "number_of_gcs_before_promotion": 3, "minimum_age_before_gc": 0.75}]}}),
        );
        assert!(tune.contains("nursery 1 MiB -> 2 MiB"), "{tune}");
        assert!(tune.contains("GCs before promotion 1 -> 3"), "{tune}");
    }

    use serde_json::json;

    use super::*;

    #[test]
    fn formats_units() {
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(1024.0 * 1024.0 * 1024.0), "1 GiB");
        assert_eq!(format_bytes(47_395_635.0), "45.2 MiB");
        assert_eq!(seconds(Some(&json!(0.00194))), "1.94 ms");
        assert_eq!(seconds(Some(&json!(0.00005))), "50 µs");
        assert_eq!(seconds(None), "-");
        assert_eq!(duration(Some(3725.0)), "1h 2m");
        assert_eq!(cut("abcdef", 3), "abc...");
        assert_eq!(cut("äbc", 3), "äbc");
    }

    #[test]
    fn memory_line() {
        let v = json!({
            "target": "t", "heap_used_bytes": 47_395_635u64, "heap_limit_bytes": 1_073_741_824u64,
            "heap_used_ratio": 0.0441, "rss_bytes": 94_476_698u64,
            "memory_limit_bytes": 25_232_932_864u64, "memory_limit_source": "physical",
            "rss_limit_ratio": 0.0037, "rss_peak_bytes": 100_000_000u64,
            "generations": [{"generation": 0, "bytes": 1024}]
        });
        let s = summarize("memory_stats", &v);
        assert!(
            s.starts_with(
                "target t: heap 45.2 MiB of 1 GiB (4.4%), RSS 90.1 MiB of 23.5 GiB limit (0.4%; \
                 limit from physical)"
            ),
            "{s}"
        );
        assert!(s.contains("1 generations: 0: 1 KiB"), "{s}");
    }

    #[test]
    fn health_lists_only_problems() {
        let v = json!({"target": "t", "status": "degraded", "checks": [
            {"name": "memory.heap", "status": "degraded", "reason": "heap at 75%"},
            {"name": "gc.time", "status": "healthy", "reason": "fine"}]});
        let s = summarize("health_check", &v);
        assert_eq!(s, "target t: degraded\n- memory.heap degraded: heap at 75%");
    }

    #[test]
    fn bounded_whatever_the_input() {
        let frames = vec!["f".repeat(2000); 20];
        let threads: Vec<Value> = (0..500)
            .map(|i| json!({"tid": i, "name": "x".repeat(1000), "frames": frames}))
            .collect();
        let v = json!({"threads": threads, "unanswered": 0});
        for tool in ["thread_list", "thread_dump_all", "thread_inspect", "other"] {
            let s = summarize(tool, &v);
            assert!(s.chars().count() <= MAX_SUMMARY_CHARS + 100, "{tool}");
        }
        let s = summarize("thread_list", &v);
        assert!(s.contains("more (all are in the structured result)"), "{s}");
        assert!(!s.contains("summary cut"), "{s}");
        let few: Vec<Value> = (0..60).map(|i| json!({"tid": i, "name": "w"})).collect();
        let s = summarize("thread_list", &json!({"threads": few}));
        assert!(s.contains("\n... and 10 more"), "{s}");
        // Nonsense never panics.
        for tool in [
            "health_check",
            "memory_stats",
            "gc_stats",
            "runtime_stats",
            "thread_inspect",
        ] {
            summarize(tool, &json!(null));
            summarize(
                tool,
                &json!({"checks": 3, "frames": {"a": 1}, "pauses": []}),
            );
        }
    }
}
