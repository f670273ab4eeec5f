//! The state of `sbmon top`: the last answer of each tool it shows, as views of the tools'
//! JSON (only the fields it shows; a field the tool renames shows as missing, never as a
//! crash), the heap history of the sparkline, the sort order, the selection and the backtrace
//! on screen. Nothing here asks the image anything: `fetch` does, through the catalog.

use std::collections::VecDeque;

use serde::Deserialize;
use serde_json::Value;

/// Heap readings kept for the sparkline (at one a second, five minutes).
pub const HEAP_HISTORY: usize = 300;

/// `health_check`, as shown.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Health {
    pub status: String,
    #[serde(default)]
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: String,
    #[serde(default)]
    pub reason: String,
}

/// `memory_stats`, as shown.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Memory {
    pub heap_used_bytes: u64,
    pub heap_limit_bytes: u64,
    #[serde(default)]
    pub rss_bytes: u64,
    #[serde(default)]
    pub pid: i32,
}

/// `memory_trend`, as shown.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Trend {
    pub verdict: String,
    #[serde(default)]
    pub covered_seconds: f64,
    #[serde(default)]
    pub collections: u64,
    pub retained: Option<Span>,
    pub allocation_bytes_per_second: Option<f64>,
    pub retained_growth: Option<Fit>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Span {
    pub last: u64,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Fit {
    pub slope: f64,
}

/// `gc_stats`, as shown.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Gc {
    pub gc_count: u64,
    pub pauses: Pauses,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Pauses {
    #[serde(default)]
    pub count: u64,
    pub p99_seconds: Option<f64>,
}

/// `thread_list`, as shown.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Threads {
    pub threads: Vec<Thread>,
    #[serde(default)]
    pub deadlocks: Vec<Deadlock>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Thread {
    pub tid: Option<i32>,
    pub name: Option<String>,
    pub os_state: Option<String>,
    pub lisp_wait: Option<String>,
    pub owner_tid: Option<i32>,
    pub owner_name: Option<String>,
    #[serde(default)]
    pub in_debugger: bool,
    pub cpu_percent: Option<f64>,
    #[serde(default)]
    pub agent: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Deadlock {
    pub threads: Vec<Edge>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Edge {
    pub tid: i32,
}

/// `thread_inspect`, as shown.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Backtrace {
    pub name: Option<String>,
    pub tid: Option<i32>,
    #[serde(default)]
    pub answered: bool,
    #[serde(default)]
    pub frames: Vec<String>,
    #[serde(default)]
    pub truncated: bool,
}

/// A tool's answer read into its view, or why there is none.
pub fn view<T: serde::de::DeserializeOwned>(answer: Result<Value, String>) -> Result<T, String> {
    answer.and_then(|v| serde_json::from_value(v).map_err(|e| format!("unexpected answer: {e}")))
}

/// One refresh: every tool's answer (or its error), taken at `time` (Unix seconds).
#[derive(Debug, Clone)]
pub struct Reading {
    pub time: f64,
    pub health: Result<Health, String>,
    pub memory: Result<Memory, String>,
    pub trend: Result<Trend, String>,
    pub gc: Result<Gc, String>,
    pub threads: Result<Threads, String>,
}

impl Reading {
    /// Why the target did not answer at all: every tool failed (the first error says why).
    pub fn not_answering(&self) -> Option<&str> {
        match (&self.memory, &self.gc, &self.threads) {
            (Err(e), Err(_), Err(_)) => Some(e),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Cpu,
    Name,
    State,
}

impl SortBy {
    pub fn label(self) -> &'static str {
        match self {
            SortBy::Cpu => "CPU",
            SortBy::Name => "name",
            SortBy::State => "state",
        }
    }
}

/// The backtrace panel: asked for, shown, or failed.
#[derive(Debug, Clone)]
pub enum Panel {
    Loading(String),
    Shown(Backtrace),
    Failed(String, String),
}

/// What the screen shows.
#[derive(Debug)]
pub struct App {
    pub target: String,
    pub interval: f64,
    pub sort: SortBy,
    /// Index into [`App::rows`].
    pub selected: usize,
    pub panel: Option<Panel>,
    /// The tid whose backtrace was asked for last.
    pub asked: Option<i32>,
    /// The last answer of each part that answered (kept on screen when the target stops
    /// answering), and the last reading's outcome.
    pub health: Option<Health>,
    pub memory: Option<Memory>,
    pub trend: Option<Trend>,
    pub gc: Option<Gc>,
    pub threads: Option<Threads>,
    pub heap: VecDeque<u64>,
    /// Why the last reading got no answer at all, and when the target last answered.
    pub not_answering: Option<String>,
    pub last_answer: Option<f64>,
    pub last_reading: Option<f64>,
    pub readings: u64,
    /// Errors of single parts of the last reading (`tool: message`).
    pub part_errors: Vec<String>,
}

impl App {
    pub fn new(target: String, interval: f64) -> App {
        App {
            target,
            interval,
            sort: SortBy::Cpu,
            selected: 0,
            panel: None,
            asked: None,
            health: None,
            memory: None,
            trend: None,
            gc: None,
            threads: None,
            heap: VecDeque::with_capacity(HEAP_HISTORY),
            not_answering: None,
            last_answer: None,
            last_reading: None,
            readings: 0,
            part_errors: Vec::new(),
        }
    }

    /// Take in one refresh.
    pub fn apply(&mut self, r: Reading) {
        self.readings += 1;
        self.last_reading = Some(r.time);
        self.not_answering = r.not_answering().map(str::to_string);
        if self.not_answering.is_none() {
            self.last_answer = Some(r.time);
        }
        let mut errors = Vec::new();
        fn keep<T>(
            slot: &mut Option<T>,
            part: Result<T, String>,
            tool: &str,
            errs: &mut Vec<String>,
        ) {
            match part {
                Ok(v) => *slot = Some(v),
                Err(e) => errs.push(format!("{tool}: {e}")),
            }
        }
        if let Ok(m) = &r.memory {
            if self.heap.len() == HEAP_HISTORY {
                self.heap.pop_front();
            }
            self.heap.push_back(m.heap_used_bytes);
        }
        keep(&mut self.health, r.health, "health_check", &mut errors);
        keep(&mut self.memory, r.memory, "memory_stats", &mut errors);
        keep(&mut self.trend, r.trend, "memory_trend", &mut errors);
        keep(&mut self.gc, r.gc, "gc_stats", &mut errors);
        keep(&mut self.threads, r.threads, "thread_list", &mut errors);
        self.part_errors = if self.not_answering.is_some() {
            Vec::new()
        } else {
            errors
        };
        let rows = self.rows().len();
        self.selected = self.selected.min(rows.saturating_sub(1));
    }

    /// The threads in the order shown.
    pub fn rows(&self) -> Vec<&Thread> {
        let Some(t) = &self.threads else {
            return Vec::new();
        };
        let mut rows: Vec<&Thread> = t.threads.iter().collect();
        let name = |t: &Thread| t.name.clone().unwrap_or_default().to_lowercase();
        match self.sort {
            // Busiest first; a thread without a figure after every thread with one.
            SortBy::Cpu => rows.sort_by(|a, b| {
                let cpu = |t: &Thread| t.cpu_percent.unwrap_or(-1.0);
                cpu(b)
                    .total_cmp(&cpu(a))
                    .then_with(|| name(a).cmp(&name(b)))
            }),
            SortBy::Name => rows.sort_by_key(|t| (name(t), t.tid)),
            SortBy::State => {
                rows.sort_by_key(|t| (t.os_state.clone().unwrap_or_default(), name(t), t.tid))
            }
        }
        rows
    }

    /// Whether the thread `tid` is in a deadlock cycle.
    pub fn deadlocked(&self, tid: Option<i32>) -> bool {
        let (Some(tid), Some(t)) = (tid, &self.threads) else {
            return false;
        };
        t.deadlocks
            .iter()
            .any(|d| d.threads.iter().any(|e| e.tid == tid))
    }

    /// The selected thread's tid, if it has one.
    pub fn selected_tid(&self) -> Option<i32> {
        self.rows().get(self.selected).and_then(|t| t.tid)
    }

    pub fn move_by(&mut self, delta: isize) {
        let last = self.rows().len().saturating_sub(1);
        self.selected = self.selected.saturating_add_signed(delta).min(last);
    }

    pub fn sort_by(&mut self, sort: SortBy) {
        let tid = self.selected_tid();
        self.sort = sort;
        // The selection follows its thread.
        if let Some(i) = self
            .rows()
            .iter()
            .position(|t| t.tid.is_some() && t.tid == tid)
        {
            self.selected = i;
        }
    }
}
