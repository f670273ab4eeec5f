//! The web console: the fleet page at `/`, one page per target at `/targets/NAME`, their
//! assets (our own script and style, and the vendored uPlot chart library, all embedded in
//! the binary), and the small JSON endpoints under `/console/api/` they read.
//!
//! The pages themselves carry no data, so they (and the assets) are served without a token
//! ([`is_public`]); everything they show comes from JSON endpoints behind the guard, fetched
//! with the token the page asks for. An open page costs the image nothing beyond what
//! `sbmon serve` already asks: the fleet and the charts are read from the sampler's ring and
//! the watcher's last look ([`InFlight::last`](crate::snapshot::InFlight::last)), graded and
//! analysed by the very functions `health_check` and `memory_trend` use, GC pauses and the
//! journal from `/events`. What
//! does ask the image (threads, backtraces, heap histograms, profiles) goes through the
//! catalog, from `/rpc` or [`profile`] here, when the person asks or at a modest interval.

use std::collections::BTreeSet;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::AppState;
use crate::context::Context;
use crate::figures::unix_now;
use crate::health::{self, Status};
use crate::samples::Entry;
use crate::targets::Target;
use crate::tools::{Catalog, Class};

const FLEET_PAGE: &str = include_str!("console/fleet.html");
const TARGET_PAGE: &str = include_str!("console/target.html");

/// Where the assets are served; the pages name them under this prefix.
const ASSETS: &str = "/console/assets/";

/// One embedded file: its name under [`ASSETS`], its media type and its bytes.
struct Asset {
    name: &'static str,
    media_type: &'static str,
    body: &'static [u8],
}

static FILES: &[Asset] = &[
    Asset {
        name: "console.js",
        media_type: "text/javascript; charset=utf-8",
        body: include_bytes!("console/console.js"),
    },
    Asset {
        name: "console.css",
        media_type: "text/css; charset=utf-8",
        body: include_bytes!("console/console.css"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        media_type: "text/javascript; charset=utf-8",
        body: include_bytes!("console/vendor/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        media_type: "text/css; charset=utf-8",
        body: include_bytes!("console/vendor/uPlot.min.css"),
    },
    Asset {
        name: "uPlot.LICENSE",
        media_type: "text/plain; charset=utf-8",
        body: include_bytes!("console/vendor/uPlot.LICENSE"),
    },
];

/// Samples one `samples` answer carries at most (a day at one a second is 86400).
const MAX_POINTS: usize = 4000;
/// How far back a card looks for the newest sample, seconds: a target with none in this
/// long (a sampler stuck on a hung image skips ticks) shows as waiting, not up.
const RECENT: f64 = 120.0;
/// Longest profile the console asks for, seconds.
const MAX_PROFILE_SECONDS: f64 = 30.0;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(fleet_page))
        .route("/targets/{name}", get(target_page))
        .route("/console/assets/{file}", get(asset))
        .route("/console/api/overview", get(overview))
        .route("/console/api/fleet", get(fleet))
        .route("/console/api/targets/{name}/samples", get(samples))
        .route("/console/api/targets/{name}/profile", post(profile))
}

/// Paths that hold no data and so answer without a token: the pages (which then ask for
/// it) and their assets.
pub fn is_public(path: &str) -> bool {
    path == "/"
        || path
            .strip_prefix("/targets/")
            .is_some_and(|name| !name.is_empty() && !name.contains('/'))
        || path
            .strip_prefix(ASSETS)
            .is_some_and(|file| FILES.iter().any(|a| a.name == file))
}

/// The pages are the same for every sbmon; they must not be framed by another site.
fn page(body: &'static str) -> Response {
    (
        [
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(body),
    )
        .into_response()
}

async fn fleet_page() -> Response {
    page(FLEET_PAGE)
}

/// The target page; the script reads the name from the address and says when it is unknown
/// (the page itself holds no data, so it does not look the target up).
async fn target_page(Path(_name): Path<String>) -> Response {
    page(TARGET_PAGE)
}

async fn asset(Path(file): Path<String>) -> Response {
    match FILES.iter().find(|a| a.name == file) {
        Some(a) => (
            [
                (header::CONTENT_TYPE, a.media_type),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            a.body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such console asset\n").into_response(),
    }
}

fn not_found(message: String) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": message }))).into_response()
}

/// What the pages need to know once: version, what this sbmon allows, the sampling, the
/// tools (for the endpoint documentation) and the stuck-thread threshold.
async fn overview(State(state): State<AppState>) -> Json<Value> {
    let catalog = &state.catalog;
    let ctx = catalog.context();
    let tools: Vec<Value> = catalog
        .tools()
        .map(|t| json!({"name": t.name, "class": t.class.name(), "description": t.description}))
        .collect();
    let targets = ctx.targets.all();
    let settings = targets.iter().find_map(|t| t.history.settings());
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "control": allows(catalog, Class::Control),
        "eval": allows(catalog, Class::Eval),
        "sample_interval_seconds": settings.map(|s| s.interval.as_secs_f64()),
        "sample_history_seconds": settings.map(|s| s.history.as_secs_f64()),
        "stuck_warning_seconds": ctx.config.health.threads.stuck.warning,
        "targets": targets.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        "tools": tools,
        "mcp": "/mcp",
    }))
}

fn allows(catalog: &Catalog, class: Class) -> bool {
    catalog.tools().any(|t| t.class == class)
}

/// One target as the fleet page shows it.
#[derive(Debug, Serialize)]
struct Card {
    name: String,
    address: String,
    /// `up`, `down`, or `waiting` before the first look.
    state: &'static str,
    /// Why it is down.
    reason: Option<String>,
    pid: Option<i32>,
    lisp_version: Option<String>,
    uptime_seconds: Option<f64>,
    /// Unix time of the watcher's last look the health and threads come from.
    looked: Option<f64>,
    health: Option<Status>,
    /// The checks that are degraded or critical, with their reasons.
    problems: Vec<Problem>,
    /// From the sampler's newest sample.
    sampled: Option<f64>,
    heap_used_bytes: Option<u64>,
    heap_limit_bytes: Option<u64>,
    rss_bytes: Option<u64>,
    memory_limit_bytes: Option<u64>,
    /// `memory_trend`'s verdict and the heap retained after collections.
    trend: Option<Value>,
    gc_pause_p99_seconds: Option<f64>,
    threads: Option<usize>,
    /// Threads in a deadlock, in the debugger or waiting on a mutex past the stuck threshold.
    stuck_threads: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Problem {
    check: String,
    status: Status,
    reason: String,
}

/// Every target's card; asks the image nothing.
async fn fleet(State(state): State<AppState>) -> Json<Vec<Card>> {
    let ctx = state.catalog.context();
    Json(ctx.targets.all().iter().map(|t| card(ctx, t)).collect())
}

fn card(ctx: &Context, target: &Target) -> Card {
    let mut card = Card {
        name: target.name.clone(),
        address: target.client.address().to_string(),
        state: "waiting",
        reason: None,
        pid: None,
        lisp_version: None,
        uptime_seconds: None,
        looked: None,
        health: None,
        problems: Vec::new(),
        sampled: None,
        heap_used_bytes: None,
        heap_limit_bytes: None,
        rss_bytes: None,
        memory_limit_bytes: None,
        trend: None,
        gc_pause_p99_seconds: None,
        threads: None,
        stuck_threads: None,
    };
    let newest = target.history.since(unix_now() - RECENT).pop();
    match newest {
        Some(Entry::Sample(s)) => {
            card.state = "up";
            card.sampled = Some(s.time);
            card.pid = Some(s.pid);
            card.heap_used_bytes = Some(s.heap_used);
            card.heap_limit_bytes = Some(s.heap_limit);
            card.rss_bytes = Some(s.rss);
        }
        Some(Entry::Gap { time }) => {
            card.state = "down";
            card.sampled = Some(time);
            card.reason = Some("the sampler's last reading failed".into());
        }
        None => {}
    }
    if let Some((looked, snap)) = target.readings.last() {
        card.looked = Some(looked);
        let report = health::grade(ctx, target, &snap);
        card.health = Some(report.status);
        card.problems = report
            .checks
            .into_iter()
            // Unknown is not a finding: something else (the agent unreachable, too few
            // samples yet) already says why.
            .filter(|c| matches!(c.status, Status::Degraded | Status::Critical))
            .map(|c| Problem {
                check: c.name,
                status: c.status,
                reason: c.reason,
            })
            .collect();
        match (&snap.rtt, &snap.image) {
            (Ok(_), Some(image)) => {
                // The newer of the two looks decides whether it is up.
                if card.sampled.is_none_or(|t| looked > t) {
                    card.state = "up";
                    card.reason = None;
                }
                card.pid = card.pid.or(Some(image.welcome.pid));
                card.lisp_version = Some(image.welcome.lisp_version.clone());
                if let Ok(p) = &image.process {
                    card.uptime_seconds = Some((unix_now() - p.start_time_unix).max(0.0));
                    card.memory_limit_bytes = Some(p.memory_limit.bytes);
                }
                if let Ok(gc) = &image.gc {
                    card.gc_pause_p99_seconds = pause_p99(gc);
                }
                if let Ok(threads) = &image.threads {
                    let warning = ctx.config.health.threads.stuck.warning;
                    card.threads = Some(threads.iter().filter(|t| !t.agent).count());
                    card.stuck_threads = Some(stuck(threads, warning));
                }
            }
            (rtt, _) if card.sampled.is_none_or(|t| looked >= t) => {
                card.state = "down";
                card.reason = Some(match rtt {
                    Err(e) => e.to_string(),
                    Ok(_) => "the agent did not answer".into(),
                });
            }
            _ => {}
        }
    }
    if target.history.settings().is_some() {
        // What `memory_trend` answers under serve, read straight from the ring: through the
        // catalog, every refresh of every open page would count as a tool call on the target
        // and dilute the `availability.errors` ratio.
        let min_growth = ctx.config.health.memory.leak.warning;
        let t = crate::trend::recent(&target.history, crate::trend::DEFAULT_WINDOW, min_growth);
        card.trend = Some(json!({
            "verdict": t.verdict,
            "reason": t.reason,
            "retained_last_bytes": t.retained.map(|r| r.last),
            "retained_slope_bytes_per_second": t.retained_growth.map(|f| f.slope),
            "allocation_bytes_per_second": t.allocation_bytes_per_second,
        }));
    }
    card
}

/// The 99th percentile of every pause the agent measured, from its histograms.
fn pause_p99(gc: &crate::agent::reply::Gc) -> Option<f64> {
    let mut counts = vec![0u64; gc.buckets.len() + 1];
    for h in &gc.histograms {
        for (total, n) in counts.iter_mut().zip(&h.counts) {
            *total += n;
        }
    }
    crate::tools::gc::quantile(&gc.buckets, &counts, 0.99, gc.pauses.max_seconds)
}

/// Threads in a deadlock cycle, in the debugger, or waiting on a mutex for `warning` seconds.
fn stuck(threads: &[crate::agent::reply::LispThread], warning: f64) -> usize {
    let mut tids: BTreeSet<Option<i32>> = crate::deadlock::cycles(&crate::deadlock::edges(threads))
        .iter()
        .flat_map(|d| d.threads.iter().map(|e| Some(e.tid)))
        .collect();
    let mut unnamed = 0;
    for t in threads {
        let waited = t.waiting_for_type.as_deref() == Some("mutex")
            && t.waiting_seconds.is_some_and(|s| s >= warning);
        if t.debugger.is_some() || waited {
            if t.tid.is_some() {
                tids.insert(t.tid);
            } else {
                unnamed += 1;
            }
        }
    }
    tids.len() + unnamed
}

#[derive(Deserialize)]
struct SamplesQuery {
    /// Unix time: only samples taken after it.
    since: Option<f64>,
}

/// The sampler's ring of one target as columns (gaps as nulls), with the rates between
/// consecutive samples of one process, and the collections of the watcher's last look.
async fn samples(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<SamplesQuery>,
) -> Response {
    let ctx = state.catalog.context();
    let target = match ctx.target(Some(&name)) {
        Ok(t) => t,
        Err(e) => return not_found(e.to_string()),
    };
    let since = q.since.filter(|s| s.is_finite()).unwrap_or(0.0);
    // From a little before `since`, so the first new sample has a rate.
    let all = target
        .history
        .since(if since > 0.0 { since - RECENT } else { 0.0 });
    let start = all.partition_point(|e| e.time() <= since);
    let from = start
        .saturating_sub(1)
        .max(all.len().saturating_sub(MAX_POINTS));
    let mut columns = Columns::default();
    let mut previous = None;
    for (i, entry) in all[from..].iter().enumerate() {
        let fresh = from + i >= start;
        match entry {
            Entry::Sample(s) => {
                if fresh {
                    columns.push(s, previous.as_ref());
                }
                previous = Some(*s);
            }
            Entry::Gap { time } => {
                if fresh {
                    columns.gap(*time);
                }
                previous = None;
            }
        }
    }
    let last = target.readings.last();
    let image = last.as_ref().and_then(|(_, s)| s.image.as_ref());
    let memory_limit = image
        .and_then(|i| i.process.as_ref().ok())
        .map(|p| p.memory_limit.bytes);
    let pauses: Vec<Value> = image
        .and_then(|i| i.gc.as_ref().ok())
        .map(|gc| {
            gc.recent
                .iter()
                .filter(|r| r.time > since)
                .map(|r| json!({"seq": r.seq, "time": r.time, "wall_seconds": r.wall_seconds, "generation": r.generation}))
                .collect()
        })
        .unwrap_or_default();
    let settings = target.history.settings();
    Json(json!({
        "target": target.name,
        "now": unix_now(),
        "interval_seconds": settings.map(|s| s.interval.as_secs_f64()),
        "history_seconds": settings.map(|s| s.history.as_secs_f64()),
        "memory_limit_bytes": memory_limit,
        "columns": columns,
        "pauses": pauses,
    }))
    .into_response()
}

/// The ring as parallel arrays, the form uPlot draws; `None` is a gap.
#[derive(Default, Serialize)]
struct Columns {
    time: Vec<f64>,
    heap_used: Vec<Option<u64>>,
    heap_limit: Vec<Option<u64>>,
    retained: Vec<Option<u64>>,
    rss: Vec<Option<u64>>,
    threads: Vec<Option<u64>>,
    /// Bytes allocated per second since the previous sample.
    allocation_rate: Vec<Option<f64>>,
    /// Process CPU since the previous sample, percent of one core.
    cpu_percent: Vec<Option<f64>>,
}

impl Columns {
    fn push(&mut self, s: &crate::samples::Sample, previous: Option<&crate::samples::Sample>) {
        let between = previous.filter(|p| p.pid == s.pid && s.time > p.time);
        self.time.push(s.time);
        self.heap_used.push(Some(s.heap_used));
        self.heap_limit.push(Some(s.heap_limit));
        self.retained.push(s.retained);
        self.rss.push(Some(s.rss));
        self.threads.push(Some(s.threads));
        self.allocation_rate.push(between.and_then(|p| {
            let bytes = s.bytes_consed.checked_sub(p.bytes_consed)?;
            Some(bytes as f64 / (s.time - p.time))
        }));
        self.cpu_percent.push(between.and_then(|p| {
            let cpu = s.cpu_seconds - p.cpu_seconds;
            (cpu >= 0.0).then(|| 100.0 * cpu / (s.time - p.time))
        }));
    }

    fn gap(&mut self, time: f64) {
        self.time.push(time);
        self.heap_used.push(None);
        self.heap_limit.push(None);
        self.retained.push(None);
        self.rss.push(None);
        self.threads.push(None);
        self.allocation_rate.push(None);
        self.cpu_percent.push(None);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileBody {
    seconds: Option<f64>,
}

/// `profile_cpu` through the catalog (so it needs `--allow control` and is audited as the
/// console's), drawn as an interactive SVG flame graph.
async fn profile(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !super::is_json(&headers) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send {\"seconds\": N} with Content-Type: application/json\n",
        )
            .into_response();
    }
    let body: ProfileBody =
        match serde_json::from_slice(if body.is_empty() { b"{}" } else { &body }) {
            Ok(b) => b,
            Err(e) => {
                let why = crate::echo::clip(&e.to_string());
                return (StatusCode::BAD_REQUEST, Json(json!({ "error": why }))).into_response();
            }
        };
    let seconds = body.seconds.unwrap_or(5.0);
    if !(0.1..=MAX_PROFILE_SECONDS).contains(&seconds) {
        let why = format!("seconds must be 0.1..{MAX_PROFILE_SECONDS}, not {seconds}");
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": why }))).into_response();
    }
    let args = json!({ "target": name, "seconds": seconds, "max_stacks": 1000 });
    let called = match state
        .catalog
        .call_from("console", "profile_cpu", args)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            let code = if e.is_usage() {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::BAD_GATEWAY
            };
            return (code, Json(json!({ "error": e.to_string() }))).into_response();
        }
    };
    let stacks: Vec<crate::flame::FoldedStack> =
        serde_json::from_value(called.value["stacks"].clone()).unwrap_or_default();
    if stacks.is_empty() {
        let why = format!("no samples in {seconds} s: {}", called.summary);
        return (StatusCode::OK, Json(json!({ "error": why }))).into_response();
    }
    let title = format!("{name}: CPU, {seconds} s");
    match crate::flame::svg(&title, "samples", &stacks) {
        Ok(svg) => (
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            svg,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": format!("the flame graph could not be drawn: {e}") })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pages_and_known_assets_are_public() {
        for public in [
            "/",
            "/targets/app",
            "/console/assets/console.js",
            "/console/assets/uPlot.iife.min.js",
        ] {
            assert!(is_public(public), "{public}");
        }
        for guarded in [
            "/rpc",
            "/targets/",
            "/targets/a/b",
            "/console/assets/other.js",
            "/console/assets/",
            "/console/api/fleet",
            "/console/api/targets/app/samples",
            "/metrics",
        ] {
            assert!(!is_public(guarded), "{guarded}");
        }
    }

    #[test]
    fn page_weight_stays_under_300_kb() {
        let total: usize = FLEET_PAGE.len().max(TARGET_PAGE.len())
            + FILES
                .iter()
                .filter(|a| !a.name.ends_with("LICENSE"))
                .map(|a| a.body.len())
                .sum::<usize>();
        assert!(total < 300 * 1024, "{total} bytes");
    }

    #[test]
    fn no_asset_names_an_external_address() {
        for a in FILES.iter().filter(|a| !a.name.ends_with("LICENSE")) {
            let text = String::from_utf8_lossy(a.body);
            for (at, _) in text.match_indices("://") {
                let before = &text[at.saturating_sub(5)..at];
                let after: String = text[at + 3..].chars().take(40).collect();
                // uPlot names its repository in its banner comment and SVG's namespace URI;
                // neither is fetched.
                let known = after.starts_with("github.com/leeoniya/uPlot")
                    || after.starts_with("www.w3.org/");
                assert!(known, "{}: {before}://{after}", a.name);
            }
        }
        for page in [FLEET_PAGE, TARGET_PAGE] {
            assert!(!page.contains("://"), "a page names an external address");
        }
    }
}
