//! `sbmon top`: a full-screen live view of one image, refreshed every `--interval`. A front
//! end like the others: it runs the catalog's tools (`health_check`, `memory_stats`,
//! `memory_trend`, `gc_stats`, `thread_list`, and `thread_inspect` on Enter) and draws their
//! answers; it runs the sampler over its one target, so `memory_trend` and `cpu_percent` come
//! from the sampler's history as under `sbmon serve`.
//!
//! The image is asked from a background task, each refresh bounded by a timeout, so a slow or
//! dead image never freezes the screen: it shows "NOT ANSWERING" and keeps asking. The
//! terminal is restored on `q`, Ctrl-C, SIGTERM, SIGINT, SIGHUP and on a panic (ratatui's
//! panic hook).

pub mod app;
pub mod render;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::figures::unix_now;
use crate::samples::Settings;
use crate::tools::Catalog;
use app::{App, Backtrace, Panel, Reading, SortBy, view};

/// Size of the `--once` frame when stdout is not a terminal.
pub const ONCE_SIZE: (u16, u16) = (100, 30);
/// Samples the sampler keeps for `memory_trend`.
const HISTORY: Duration = Duration::from_secs(900);
/// Seconds of history `memory_trend` is asked about.
const TREND_WINDOW: u32 = 300;

pub struct Options {
    /// Seconds between refreshes (0.2..60).
    pub interval: f64,
    pub once: bool,
}

/// Run `top` over the single target of `catalog`.
pub async fn run(catalog: Catalog, options: Options) -> ExitCode {
    let Ok(target) = catalog.context().targets.resolve(None) else {
        eprintln!("sbmon: top needs exactly one target");
        return ExitCode::from(2);
    };
    let name = target.name.clone();
    let interval = Duration::from_secs_f64(options.interval);
    // The sampler reads at most once a second: a faster screen redraws the same history.
    let sampling = match Settings::new(interval.max(Duration::from_secs(1)), HISTORY) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sbmon: {e}");
            return ExitCode::from(2);
        }
    };
    let stop = CancellationToken::new();
    let sampler = tokio::spawn(crate::sampler::run(
        catalog.context().targets.clone(),
        sampling,
        stop.clone(),
    ));
    let catalog = Arc::new(catalog);
    let code = if options.once {
        once(&catalog, name, options.interval, sampling.interval).await
    } else {
        live(catalog, name, options.interval, &stop).await
    };
    stop.cancel();
    let _ = sampler.await;
    code
}

/// How long one refresh may take before it counts as not answering.
fn refresh_timeout(interval: f64) -> Duration {
    Duration::from_secs_f64((interval * 2.0).clamp(2.0, 10.0))
}

/// One refresh: the five tools at once, each bounded by `timeout`.
pub async fn read(catalog: &Catalog, timeout: Duration) -> Reading {
    let call = |tool: &'static str, args: Value| async move {
        match tokio::time::timeout(timeout, catalog.call_from("top", tool, args)).await {
            Ok(Ok(called)) => Ok(called.value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer in {:.1} s", timeout.as_secs_f64())),
        }
    };
    let time = unix_now();
    let (health, memory, trend, gc, threads) = tokio::join!(
        call("health_check", Value::Null),
        call("memory_stats", Value::Null),
        call("memory_trend", json!({ "window_s": TREND_WINDOW })),
        call("gc_stats", Value::Null),
        call("thread_list", Value::Null),
    );
    Reading {
        time,
        health: view(health),
        memory: view(memory),
        trend: view(trend),
        gc: view(gc),
        threads: view(threads),
    }
}

/// The backtrace of thread `tid`.
pub async fn backtrace(
    catalog: &Catalog,
    tid: i32,
    timeout: Duration,
) -> Result<Backtrace, String> {
    let args = json!({ "thread_id": tid, "max_frames": 60, "timeout_ms": 1000 });
    let answer =
        match tokio::time::timeout(timeout, catalog.call_from("top", "thread_inspect", args)).await
        {
            Ok(Ok(called)) => Ok(called.value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer in {:.1} s", timeout.as_secs_f64())),
        };
    view(answer)
}

/// Draw `app` into a buffer of `width` x `height`.
pub fn render_to_buffer(app: &App, width: u16, height: u16) -> Buffer {
    let mut terminal = match Terminal::new(TestBackend::new(width, height)) {
        Ok(t) => t,
        Err(never) => match never {},
    };
    let drawn = terminal.draw(|f| render::draw(f, app)).map(|_| ());
    if let Err(never) = drawn {
        match never {}
    }
    terminal.backend().buffer().clone()
}

/// The buffer as plain text, one line per row, trailing blanks trimmed.
pub fn buffer_text(buffer: &Buffer) -> String {
    let area = buffer.area;
    let mut out = String::new();
    for y in area.top()..area.bottom() {
        let mut line = String::new();
        for x in area.left()..area.right() {
            if let Some(cell) = buffer.cell((x, y)) {
                line.push_str(cell.symbol());
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `--once`: let the sampler take two readings (so CPU percent and rates have an interval),
/// read once, print one frame as text.
async fn once(catalog: &Catalog, name: String, interval: f64, sampling: Duration) -> ExitCode {
    tokio::time::sleep(sampling + Duration::from_millis(300)).await;
    let mut app = App::new(name, interval);
    app.apply(read(catalog, refresh_timeout(interval)).await);
    let (width, height) = if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        ratatui::crossterm::terminal::size().unwrap_or(ONCE_SIZE)
    } else {
        ONCE_SIZE
    };
    let text = buffer_text(&render_to_buffer(&app, width, height));
    let _ = std::io::stdout().write_all(text.as_bytes());
    if app.not_answering.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// What the screen loop waits for.
enum Input {
    Key(event::KeyEvent),
    Resize,
}

/// Terminal events, read on a thread of their own (crossterm's reads block).
fn input_thread(tx: mpsc::UnboundedSender<Input>) {
    std::thread::spawn(move || {
        while !tx.is_closed() {
            match event::poll(Duration::from_millis(200)) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(_) => return,
            }
            let sent = match event::read() {
                Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => tx.send(Input::Key(k)),
                Ok(Event::Resize(..)) => tx.send(Input::Resize),
                Ok(_) => Ok(()),
                Err(_) => return,
            };
            if sent.is_err() {
                return;
            }
        }
    });
}

async fn live(
    catalog: Arc<Catalog>,
    name: String,
    interval: f64,
    stop: &CancellationToken,
) -> ExitCode {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("sbmon: cannot watch for signals");
        return ExitCode::FAILURE;
    };
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            ratatui::restore();
            eprintln!("sbmon: cannot take over the terminal: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (keys_tx, mut keys) = mpsc::unbounded_channel();
    input_thread(keys_tx);
    let (readings_tx, mut readings) = mpsc::channel::<Reading>(1);
    let timeout = refresh_timeout(interval);
    let reader = {
        let catalog = catalog.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut clock = tokio::time::interval(Duration::from_secs_f64(interval));
            clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = clock.tick() => {}
                }
                let reading = read(&catalog, timeout).await;
                if readings_tx.send(reading).await.is_err() {
                    return;
                }
            }
        })
    };
    let (bt_tx, mut backtraces) = mpsc::channel::<(i32, Result<Backtrace, String>)>(4);
    let mut app = App::new(name, interval);
    let mut redraw = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        if let Err(e) = terminal.draw(|f| render::draw(f, &app)) {
            break Err(format!("cannot draw: {e}"));
        }
        tokio::select! {
            Some(r) = readings.recv() => app.apply(r),
            Some((tid, bt)) = backtraces.recv() => {
                // Only the backtrace still asked for is shown.
                if let Some(Panel::Loading(_)) = &app.panel
                    && app.asked == Some(tid)
                {
                    app.panel = Some(match bt {
                        Ok(b) => Panel::Shown(b),
                        Err(e) => Panel::Failed(tid.to_string(), e),
                    });
                }
            }
            key = keys.recv() => match key {
                Some(Input::Key(k)) => match handle_key(&mut app, k) {
                    Action::Quit => break Ok(()),
                    Action::Backtrace(tid) => {
                        let catalog = catalog.clone();
                        let tx = bt_tx.clone();
                        tokio::spawn(async move {
                            let _ = tx.send((tid, backtrace(&catalog, tid, timeout).await)).await;
                        });
                    }
                    Action::None => {}
                },
                Some(Input::Resize) => {}
                None => break Err("the terminal's input ended".to_string()),
            },
            // The "last answer N s ago" of a silent target keeps counting.
            _ = redraw.tick() => {}
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            _ = hup.recv() => break Ok(()),
        }
    };
    stop.cancel();
    reader.abort();
    ratatui::restore();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sbmon: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    /// Ask for the backtrace of this tid.
    Backtrace(i32),
}

/// What a key does to the state.
pub fn handle_key(app: &mut App, key: event::KeyEvent) -> Action {
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        return Action::Quit;
    }
    if app.panel.is_some() {
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Esc | KeyCode::Enter | KeyCode::Backspace => app.panel = None,
            _ => {}
        }
        return Action::None;
    }
    match key.code {
        KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
        KeyCode::Up | KeyCode::Char('k') => app.move_by(-1),
        KeyCode::Down | KeyCode::Char('j') => app.move_by(1),
        KeyCode::PageUp => app.move_by(-10),
        KeyCode::PageDown => app.move_by(10),
        KeyCode::Home | KeyCode::Char('g') => app.selected = 0,
        KeyCode::End | KeyCode::Char('G') => app.move_by(isize::MAX),
        KeyCode::Char('c') => app.sort_by(SortBy::Cpu),
        KeyCode::Char('n') => app.sort_by(SortBy::Name),
        KeyCode::Char('s') => app.sort_by(SortBy::State),
        KeyCode::Enter => {
            let who = app.rows().get(app.selected).map(|t| {
                format!(
                    "{} ({})",
                    t.name.as_deref().unwrap_or("unnamed"),
                    t.tid.map_or("?".into(), |x| x.to_string())
                )
            });
            if let (Some(tid), Some(who)) = (app.selected_tid(), who) {
                app.panel = Some(Panel::Loading(who));
                app.asked = Some(tid);
                return Action::Backtrace(tid);
            }
        }
        _ => {}
    }
    Action::None
}
