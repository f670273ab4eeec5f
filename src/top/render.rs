//! Drawing one frame of `sbmon top` from its [`App`] state: a header (health, heap bar,
//! retained heap and trend, rates, RSS, heap sparkline), the thread table or the selected
//! thread's backtrace, and a footer of keys. Fits 80x24; wider terminals get wider columns.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Gauge, Paragraph, Row, Sparkline, Table, TableState};

use super::app::{App, Panel, SortBy};
use crate::figures::unix_now;

/// Health checks shown one a line (the rest are counted).
const MAX_CHECK_LINES: usize = 3;

pub fn draw(frame: &mut Frame, app: &App) {
    let problems = problem_lines(app);
    let [title, health, gauge, stats, spark, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(problems.len() as u16),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(2),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(title_line(app)), title);
    frame.render_widget(Paragraph::new(problems), health);
    draw_gauge(frame, app, gauge);
    frame.render_widget(Paragraph::new(stats_line(app)), stats);
    draw_sparkline(frame, app, spark);
    match &app.panel {
        Some(panel) => draw_backtrace(frame, panel, body),
        None => draw_threads(frame, app, body),
    }
    frame.render_widget(Paragraph::new(footer_line(app)), footer);
}

fn mib(bytes: u64) -> String {
    let m = bytes as f64 / 1048576.0;
    if m >= 10240.0 {
        format!("{:.1} GiB", m / 1024.0)
    } else {
        format!("{m:.1} MiB")
    }
}

fn status_style(status: &str) -> Style {
    match status {
        "healthy" => Style::new().fg(Color::Green),
        "degraded" => Style::new().fg(Color::Yellow),
        "critical" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        _ => Style::new().fg(Color::Gray),
    }
}

fn title_line(app: &App) -> Line<'static> {
    let mut spans = vec![Span::styled(
        "sbmon top ",
        Style::new().add_modifier(Modifier::BOLD),
    )];
    let pid = app
        .memory
        .as_ref()
        .map_or(String::new(), |m| format!(" pid {}", m.pid));
    spans.push(Span::raw(format!("{}{pid}  ", app.target)));
    match (&app.not_answering, &app.health) {
        (Some(why), _) => {
            let since = app.last_answer.map_or("never answered".to_string(), |t| {
                format!("last answer {:.0} s ago", (unix_now() - t).max(0.0))
            });
            spans.push(Span::styled(
                "NOT ANSWERING",
                Style::new()
                    .fg(Color::Red)
                    .add_modifier(Modifier::BOLD | Modifier::REVERSED),
            ));
            spans.push(Span::raw(format!(" ({since}): {why}")));
        }
        (None, Some(h)) => {
            spans.push(Span::styled(
                h.status.to_uppercase(),
                status_style(&h.status),
            ));
        }
        (None, None) if app.readings == 0 => spans.push(Span::raw("connecting...")),
        (None, None) => spans.push(Span::raw("health unknown")),
    }
    Line::from(spans)
}

/// One line per non-healthy check (its reason), or one saying all are healthy.
fn problem_lines(app: &App) -> Vec<Line<'static>> {
    let Some(h) = &app.health else {
        return Vec::new();
    };
    let bad: Vec<_> = h.checks.iter().filter(|c| c.status != "healthy").collect();
    if bad.is_empty() {
        return vec![Line::from(Span::styled(
            format!("all {} health checks healthy", h.checks.len()),
            Style::new().fg(Color::Green),
        ))];
    }
    let mut lines: Vec<Line> = bad
        .iter()
        .take(MAX_CHECK_LINES)
        .map(|c| {
            Line::from(vec![
                Span::styled(format!("{} {}", c.status, c.name), status_style(&c.status)),
                Span::raw(format!(": {}", c.reason)),
            ])
        })
        .collect();
    if bad.len() > MAX_CHECK_LINES {
        lines.pop();
        lines.push(Line::raw(format!(
            "... and {} more checks not healthy",
            bad.len() - MAX_CHECK_LINES + 1
        )));
    }
    lines
}

fn draw_gauge(frame: &mut Frame, app: &App, area: Rect) {
    let Some(m) = &app.memory else {
        frame.render_widget(Paragraph::new("heap: no reading yet"), area);
        return;
    };
    let ratio = if m.heap_limit_bytes > 0 {
        (m.heap_used_bytes as f64 / m.heap_limit_bytes as f64).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let color = match ratio {
        r if r >= 0.9 => Color::Red,
        r if r >= 0.75 => Color::Yellow,
        _ => Color::Green,
    };
    let [label, bar] = Layout::horizontal([Constraint::Length(5), Constraint::Fill(1)]).areas(area);
    frame.render_widget(Paragraph::new("heap "), label);
    frame.render_widget(
        Gauge::default()
            .gauge_style(Style::new().fg(color).bg(Color::Black))
            .ratio(ratio)
            .label(format!(
                "{} / {} ({:.0}%)",
                mib(m.heap_used_bytes),
                mib(m.heap_limit_bytes),
                ratio * 100.0
            )),
        bar,
    );
}

fn stats_line(app: &App) -> Line<'static> {
    let mut parts = Vec::new();
    if let Some(t) = &app.trend {
        let retained = t.retained.map_or("-".to_string(), |s| mib(s.last));
        let slope = t.retained_growth.map_or(String::new(), |f| {
            format!(" {:+.1} KiB/s", f.slope / 1024.0)
        });
        parts.push(Span::raw(format!("retained {retained} ")));
        let verdict_style = match t.verdict.as_str() {
            "leak_suspected" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            "growing" => Style::new().fg(Color::Yellow),
            "stable" => Style::new().fg(Color::Green),
            _ => Style::new().fg(Color::Gray),
        };
        parts.push(Span::styled(t.verdict.clone(), verdict_style));
        parts.push(Span::raw(slope));
        let alloc = t
            .allocation_bytes_per_second
            .map_or("-".to_string(), |a| format!("{}/s", mib(a.max(0.0) as u64)));
        parts.push(Span::raw(format!("  alloc {alloc}")));
        let gcs = if t.covered_seconds > 0.0 {
            format!("{:.2}", t.collections as f64 / t.covered_seconds)
        } else {
            "-".to_string()
        };
        parts.push(Span::raw(format!("  GC/s {gcs}")));
    }
    if let Some(g) = &app.gc {
        let p99 = match g.pauses.p99_seconds {
            Some(s) if g.pauses.count > 0 => format!("{:.1} ms", s * 1e3),
            _ => "-".to_string(),
        };
        parts.push(Span::raw(format!("  p99 {p99}")));
    }
    if let Some(m) = &app.memory {
        parts.push(Span::raw(format!("  RSS {}", mib(m.rss_bytes))));
    }
    Line::from(parts)
}

fn draw_sparkline(frame: &mut Frame, app: &App, area: Rect) {
    let [label, spark] =
        Layout::horizontal([Constraint::Length(5), Constraint::Fill(1)]).areas(area);
    // The newest readings that fit, the newest at the right edge.
    let width = usize::from(spark.width);
    let skip = app.heap.len().saturating_sub(width);
    let data: Vec<u64> = app.heap.iter().skip(skip).copied().collect();
    let seconds = data.len() as f64 * app.interval;
    frame.render_widget(
        Paragraph::new(vec![Line::raw("heap"), Line::raw(format!("{seconds:.0}s"))]),
        label,
    );
    let max = app
        .memory
        .as_ref()
        .map(|m| m.heap_limit_bytes)
        .filter(|&l| l > 0)
        .unwrap_or_else(|| data.iter().copied().max().unwrap_or(1));
    // Scaled to the busiest reading shown, so small movements stay visible; the bar above
    // shows the heap against its limit.
    let top = data.iter().copied().max().unwrap_or(1).max(1).min(max);
    frame.render_widget(
        Sparkline::default()
            .data(data.iter().copied())
            .max(top)
            .style(Style::new().fg(Color::Cyan)),
        spark,
    );
}

fn draw_threads(frame: &mut Frame, app: &App, area: Rect) {
    let rows = app.rows();
    let header = Row::new(["NAME", "TID", "CPU%", "STATE", "WAITS FOR (OWNER)", "FLAGS"])
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let body: Vec<Row> = rows
        .iter()
        .map(|t| {
            let waits = match (&t.lisp_wait, &t.owner_name, t.owner_tid) {
                (None, _, _) => String::new(),
                (Some(w), None, None) => w.clone(),
                (Some(w), name, tid) => format!(
                    "{w} ({} {})",
                    name.as_deref().unwrap_or("?"),
                    tid.map_or("?".into(), |x| x.to_string())
                ),
            };
            let mut flags = Vec::new();
            if app.deadlocked(t.tid) {
                flags.push("DEADLOCK");
            }
            if t.in_debugger {
                flags.push("DEBUGGER");
            }
            if t.agent {
                flags.push("agent");
            }
            let stuck = flags.iter().any(|f| *f != "agent");
            let row = Row::new([
                Cell::from(t.name.clone().unwrap_or_else(|| "(unnamed)".into())),
                Cell::from(t.tid.map_or("-".into(), |x| x.to_string())),
                Cell::from(t.cpu_percent.map_or("-".into(), |c| format!("{c:5.1}"))),
                Cell::from(t.os_state.clone().unwrap_or_else(|| "-".into())),
                Cell::from(waits),
                Cell::from(flags.join(" ")),
            ]);
            if stuck {
                row.style(Style::new().fg(Color::Red))
            } else {
                row
            }
        })
        .collect();
    let widths = [
        Constraint::Fill(2),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Fill(3),
        Constraint::Length(9),
    ];
    let count = rows.len();
    let title = format!(" threads: {count}, sorted by {} ", app.sort.label());
    let table = Table::new(body, widths)
        .header(header)
        .block(Block::new().borders(Borders::TOP).title(title))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .column_spacing(1);
    let mut state = TableState::default().with_selected((count > 0).then_some(app.selected));
    frame.render_stateful_widget(table, area, &mut state);
}

fn draw_backtrace(frame: &mut Frame, panel: &Panel, area: Rect) {
    let (title, lines): (String, Vec<Line>) = match panel {
        Panel::Loading(who) => (
            format!(" backtrace of {who} "),
            vec![Line::raw("asking...")],
        ),
        Panel::Failed(who, why) => (
            format!(" backtrace of {who} "),
            vec![Line::styled(
                format!("no backtrace: {why}"),
                Style::new().fg(Color::Red),
            )],
        ),
        Panel::Shown(b) => {
            let who = format!(
                "{} ({})",
                b.name.as_deref().unwrap_or("unnamed"),
                b.tid.map_or("?".into(), |x| x.to_string())
            );
            let mut lines: Vec<Line> = b
                .frames
                .iter()
                .enumerate()
                .map(|(i, f)| Line::raw(format!("{i:>3} {f}")))
                .collect();
            if !b.answered {
                lines.insert(
                    0,
                    Line::styled(
                        "the thread did not answer in time (it may run without interrupts)",
                        Style::new().fg(Color::Yellow),
                    ),
                );
            }
            if b.truncated {
                lines.push(Line::raw("    ... more frames"));
            }
            (format!(" backtrace of {who} "), lines)
        }
    };
    frame.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::TOP).title(title)),
        area,
    );
}

fn footer_line(app: &App) -> Line<'static> {
    let keys = if app.panel.is_some() {
        "Esc/Enter back  q quit".to_string()
    } else {
        let mark = |s: SortBy, key: &str, what: &str| {
            if app.sort == s {
                format!("[{key}]{what}")
            } else {
                format!("{key} {what}")
            }
        };
        format!(
            "q quit  ↑↓/j/k move  Enter backtrace  {}  {}  {}",
            mark(SortBy::Cpu, "c", "cpu"),
            mark(SortBy::Name, "n", "name"),
            mark(SortBy::State, "s", "state"),
        )
    };
    let mut spans = vec![Span::styled(
        keys,
        Style::new().add_modifier(Modifier::REVERSED),
    )];
    if let Some(e) = app.part_errors.first() {
        spans.push(Span::styled(
            format!("  {e}"),
            Style::new().fg(Color::Yellow),
        ));
    }
    Line::from(spans)
}
