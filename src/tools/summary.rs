//! How summaries are written: the units, cuts and bounds every tool's `summary` uses, so
//! figures read the same whichever tool shows them. Each tool writes its own summary, against
//! its typed result, in its family file; this module only formats.

use std::fmt::Write as _;

/// Most characters in a summary; long thread lists and dumps are cut with a note.
pub const MAX_SUMMARY_CHARS: usize = 8_000;
/// Per-item lines stop once a summary is this long, leaving room for the "... and N more"
/// line under `MAX_SUMMARY_CHARS`.
pub const LINES_BUDGET: usize = MAX_SUMMARY_CHARS - 1_500;
/// A backtrace frame, a name or a reason longer than this is cut (frames can print large
/// objects).
pub const MAX_FIELD_CHARS: usize = 200;

/// `target NAME`, the head of most summaries.
pub fn target_label(name: &str) -> String {
    format!("target {}", cut(name, MAX_FIELD_CHARS))
}

/// A ratio as a percentage with one decimal.
pub fn percent(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

/// Binary units with one decimal, e.g. `45.2 MiB`, `1 GiB`.
pub fn bytes(n: impl Into<f64>) -> String {
    let n = n.into();
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

/// `bytes` for the u64 and i64 figures results carry (f64 is exact far beyond any heap).
pub fn bytes_u64(n: u64) -> String {
    bytes(n as f64)
}

pub fn bytes_i64(n: i64) -> String {
    bytes(n as f64)
}

/// A duration in seconds as µs, ms or s.
pub fn seconds(s: f64) -> String {
    match s {
        0.0 => "0".into(),
        s if s < 1e-3 => format!("{:.0} µs", s * 1e6),
        s if s < 1.0 => format!("{:.2} ms", s * 1e3),
        s => format!("{s:.2} s"),
    }
}

/// `seconds`, or `-` when there is no such figure (e.g. no pause yet).
pub fn maybe_seconds(s: Option<f64>) -> String {
    s.map_or("-".into(), seconds)
}

/// Uptime as `3d 4h`, `2h 5m`, `4m 10s` or `12s`.
pub fn duration(s: f64) -> String {
    if !(s.is_finite() && s >= 0.0) {
        return "?".into();
    }
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
pub fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// A thread's name quoted, or `(unnamed)`.
pub fn thread_name(name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{:?}", cut(n, MAX_FIELD_CHARS)),
        None => "(unnamed)".into(),
    }
}

/// `?` for an absent figure.
pub fn or_unknown<T: ToString>(v: Option<T>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

/// Append one line per item (at most `most`, and only while the text is under
/// [`LINES_BUDGET`]), then say how many were left out.
pub fn lines<T>(
    out: &mut String,
    items: &[T],
    most: usize,
    what: &str,
    mut line: impl FnMut(&mut String, &T),
) {
    let mut shown = 0;
    for item in items.iter().take(most) {
        if out.len() > LINES_BUDGET {
            break;
        }
        out.push('\n');
        line(out, item);
        shown += 1;
    }
    if items.len() > shown {
        let _ = write!(
            out,
            "\n... and {} more {what} (all are in the structured result)",
            items.len() - shown
        );
    }
}

/// Backtrace frames, indented, at most `shown` of them.
pub fn frames(out: &mut String, frames: &[String], shown: usize, indent: &str) {
    for frame in frames.iter().take(shown) {
        let _ = write!(out, "\n{indent}{}", cut(frame, MAX_FIELD_CHARS));
    }
    if frames.len() > shown {
        let _ = write!(out, "\n{indent}... {} more frames", frames.len() - shown);
    }
}

/// A whole summary cut to [`MAX_SUMMARY_CHARS`], saying so.
pub fn bound(s: String) -> String {
    match s.char_indices().nth(MAX_SUMMARY_CHARS) {
        Some((i, _)) => format!(
            "{}\n... (summary cut; the structured result has everything)",
            &s[..i]
        ),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_units() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes_u64(1024 * 1024 * 1024), "1 GiB");
        assert_eq!(bytes_u64(47_395_635), "45.2 MiB");
        assert_eq!(bytes_i64(-2048), "-2 KiB");
        assert_eq!(seconds(0.00194), "1.94 ms");
        assert_eq!(seconds(0.00005), "50 µs");
        assert_eq!(maybe_seconds(None), "-");
        assert_eq!(duration(3725.0), "1h 2m");
        assert_eq!(cut("abcdef", 3), "abc...");
        assert_eq!(cut("äbc", 3), "äbc");
    }

    #[test]
    fn bounded_whatever_the_input() {
        let huge = "x".repeat(MAX_SUMMARY_CHARS * 3);
        let s = bound(huge);
        assert!(s.chars().count() <= MAX_SUMMARY_CHARS + 100);
        assert!(s.ends_with("the structured result has everything)"));
        let items: Vec<String> = (0..500).map(|_| "y".repeat(1000)).collect();
        let mut out = String::new();
        lines(&mut out, &items, 50, "threads", |o, s| o.push_str(s));
        assert!(out.len() < MAX_SUMMARY_CHARS, "{}", out.len());
        assert!(out.contains("more threads (all are in the structured result)"));
        let few: Vec<u32> = (0..60).collect();
        let mut out = String::new();
        lines(&mut out, &few, 50, "threads", |o, n| {
            o.push_str(&n.to_string())
        });
        assert!(out.contains("\n... and 10 more threads"), "{out}");
    }
}
