//! The HTTP front end: MCP Streamable HTTP at `/mcp`, JSON-RPC at `/rpc`, Prometheus metrics
//! at `/metrics` (with `/sd` for HTTP service discovery), health endpoints for orchestrators
//! and people, live GC and journal events at `/events` (Server-Sent Events), sbmon's own
//! operation metrics and the journal under `/monitoring/` (`http/monitoring.rs`), and the web
//! console: the fleet page at `/`, a page per target at `/targets/NAME` (`http/console.rs`).
//! It adapts the catalog; it holds no tool logic.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

mod console;
mod guard;
mod monitoring;

pub use guard::is_loopback_authority;

use crate::health::{self, HealthReport, Status};
use crate::metrics::Scope;
use crate::tools::Catalog;

/// Largest request body accepted on any endpoint.
pub const MAX_BODY: usize = 1024 * 1024;
/// Open `/events` streams at most; each holds a broadcast receiver and, per target, a feed.
pub const MAX_EVENT_STREAMS: usize = 32;

/// How the HTTP front end is reached and guarded.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Bearer token required on every endpoint but `/health/live` and `/monitoring/live`.
    pub token: Option<String>,
    /// `host:port` that Prometheus should scrape, as `/sd` advertises it: the listen address,
    /// or the authority of `--external-url`. Never taken from a request's `Host`.
    pub advertised: String,
}

/// The whole HTTP surface; cancelling `stop` ends open MCP sessions and streams, so a
/// graceful shutdown is not held up by a connected client.
pub fn router(catalog: Arc<Catalog>, stop: CancellationToken, options: HttpOptions) -> Router {
    let state = AppState {
        catalog: catalog.clone(),
        started: Instant::now(),
        event_streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
        stop: stop.clone(),
        advertised: Arc::from(options.advertised.as_str()),
    };
    let authenticated = options.token.is_some();
    Router::new()
        .route(guard::LIVENESS, get(live))
        .route("/rpc", post(rpc))
        .route("/metrics", get(metrics))
        .route("/sd", get(service_discovery))
        .route("/events", get(events))
        .route("/health", get(health_all))
        .route("/health/ready", get(ready))
        .route("/health/targets/{name}", get(health_one))
        .route("/monitoring/events", get(monitoring_events))
        .merge(monitoring::routes())
        .merge(console::routes())
        .with_state(state)
        .nest_service(
            "/mcp",
            crate::mcp::http_service_with_cancel(catalog, stop, authenticated),
        )
        .layer(middleware::from_fn(limit_mcp_body))
        .layer(middleware::from_fn_with_state(
            guard::Policy::new(options.token),
            guard::admit,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// rmcp reads `/mcp` bodies itself, past `DefaultBodyLimit` (which only axum's extractors
/// heed): without this, one POST could make sbmon buffer any number of bytes.
async fn limit_mcp_body(request: axum::extract::Request, next: middleware::Next) -> Response {
    if !request.uri().path().starts_with("/mcp") {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(bytes) => {
            let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
            next.run(request).await
        }
        Err(_) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a request body to /mcp is limited to {MAX_BODY} bytes (length limit exceeded)\n"
            ),
        )
            .into_response(),
    }
}

#[derive(Clone)]
struct AppState {
    catalog: Arc<Catalog>,
    started: Instant,
    /// One permit per open `/events` stream.
    event_streams: Arc<Semaphore>,
    stop: CancellationToken,
    advertised: Arc<str>,
}

/// JSON-RPC takes JSON only: a browser can send `text/plain` or a form cross-origin without
/// asking first, but never `application/json`.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

async fn rpc(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if !is_json(&headers) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "/rpc takes JSON-RPC with Content-Type: application/json\n",
        )
            .into_response();
    }
    match crate::rpc::handle(&state.catalog, &body).await {
        Some(answer) => ([(header::CONTENT_TYPE, "application/json")], answer).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

#[derive(Deserialize)]
struct MetricsQuery {
    target: Option<String>,
    scope: Option<String>,
}

async fn metrics(State(state): State<AppState>, Query(q): Query<MetricsQuery>) -> Response {
    let ctx = state.catalog.context();
    let scope = match (q.target.as_deref(), q.scope.as_deref()) {
        (Some(name), None) => match ctx.target(Some(name)) {
            Ok(t) => Scope::Target(t),
            Err(e) => return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
        },
        (None, Some("self")) => Scope::Own,
        (None, None) => Scope::All,
        _ => {
            let usage = "use /metrics, /metrics?target=NAME or /metrics?scope=self\n";
            return (StatusCode::BAD_REQUEST, usage).into_response();
        }
    };
    let text = crate::metrics::render(ctx, scope).await;
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

#[derive(Deserialize)]
struct EventsQuery {
    target: Option<String>,
}

/// Server-Sent Events: `event: gc` with a [`GcEvent`](crate::events::GcEvent) as JSON for
/// each collection of the chosen target (`?target=NAME`) or of every target watched when the
/// stream opened; `event: journal` with each [journal event](crate::journal::Event) as it is
/// recorded (of that target only, with `?target`); `event: status` when a target's events
/// start or stop flowing (agent reached or lost); `event: lagged` when this client fell
/// behind and missed some.
async fn events(State(state): State<AppState>, Query(q): Query<EventsQuery>) -> Response {
    let targets = match q.target.as_deref() {
        Some(name) => match state.catalog.context().targets.resolve(Some(name)) {
            Ok(t) => vec![t],
            Err(e) => return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
        },
        None => state.catalog.context().targets.all(),
    };
    if targets.is_empty() {
        let none = "no target is watched yet: start an agent with (sbmon-agent:start)\n";
        return (StatusCode::NOT_FOUND, none).into_response();
    }
    let Ok(permit) = state.event_streams.clone().try_acquire_owned() else {
        let busy = format!("{MAX_EVENT_STREAMS} event streams are open already; try later\n");
        return (StatusCode::SERVICE_UNAVAILABLE, busy).into_response();
    };
    let streams = targets.iter().map(|target| {
        let feed = target.gc_feed();
        let state = (feed.follow(), feed.status(), target.name.clone(), feed);
        futures::stream::unfold(state, |(mut rx, mut status, name, feed)| async move {
            let event = tokio::select! {
                gc = rx.recv() => match gc {
                    Ok(gc) => Event::default().event("gc").json_data(&gc).ok()?,
                    Err(RecvError::Lagged(n)) => Event::default()
                        .event("lagged")
                        .data(json!({ "target": name, "missed": n }).to_string()),
                    Err(RecvError::Closed) => return None,
                },
                changed = status.changed() => {
                    changed.ok()?;
                    let connected = *status.borrow_and_update();
                    Event::default()
                        .event("status")
                        .data(json!({ "target": name, "connected": connected }).to_string())
                }
            };
            Some((Ok::<_, Infallible>(event), (rx, status, name, feed)))
        })
        .boxed()
    });
    let journal = journal_stream(&state.catalog, q.target.clone());
    let stream = futures::stream::select_all(streams.chain(std::iter::once(journal)))
        .take_until(state.stop.cancelled_owned())
        // The permit is released when the client goes and the stream is dropped.
        .map(move |event| {
            let _held = &permit;
            event
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The journal's events as they are recorded, as `event: journal` (only `target`'s when given).
fn journal_stream(
    catalog: &Catalog,
    target: Option<String>,
) -> futures::stream::BoxStream<'static, Result<Event, Infallible>> {
    let rx = catalog.context().journal.follow();
    futures::stream::unfold((rx, target), |(mut rx, target)| async move {
        loop {
            let event = match rx.recv().await {
                Ok(e)
                    if target
                        .as_deref()
                        .is_some_and(|t| e.target.as_deref() != Some(t)) =>
                {
                    continue;
                }
                Ok(e) => Event::default().event("journal").json_data(&*e).ok()?,
                Err(RecvError::Lagged(n)) => Event::default()
                    .event("lagged")
                    .data(json!({ "journal": true, "missed": n }).to_string()),
                Err(RecvError::Closed) => return None,
            };
            return Some((Ok(event), (rx, target)));
        }
    })
    .boxed()
}

/// `GET /monitoring/events?since=&severity=&kind=&target=&limit=`: the journal's events, as
/// `events_recent` answers; 400 with the reason for a filter it cannot use.
async fn monitoring_events(
    State(state): State<AppState>,
    query: Result<Query<crate::journal::Filter>, QueryRejection>,
) -> Response {
    const USAGE: &str = "use /monitoring/events?since=SEQ&severity=info|warning|critical\
                         &kind=KIND&target=NAME&limit=1..1000 (all optional)";
    let bad = |why: String| {
        let body = json!({"error": format!("{why}; {USAGE}")});
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    };
    let filter = match query {
        Ok(Query(filter)) => filter,
        Err(e) => return bad(crate::echo::clip(&e.body_text())),
    };
    if let Err(why) = filter.check() {
        return bad(why);
    }
    Json(state.catalog.context().journal.recent(&filter)).into_response()
}

/// Prometheus HTTP service discovery: one entry per target, each scraped through
/// `/metrics?target=NAME` at sbmon's advertised address (the request's `Host` is never
/// echoed: a rebound name would send Prometheus elsewhere).
async fn service_discovery(State(state): State<AppState>) -> Json<Value> {
    let host = state.advertised.to_string();
    let entries: Vec<Value> = state
        .catalog
        .context()
        .targets
        .all()
        .iter()
        .map(|t| {
            json!({
                "targets": [host],
                "labels": {
                    "__metrics_path__": "/metrics",
                    "__param_target": t.name,
                    "target": t.name,
                },
            })
        })
        .collect();
    Json(Value::Array(entries))
}

fn status_code(status: Status) -> StatusCode {
    if status == Status::Critical {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn reports(catalog: &Catalog) -> Vec<HealthReport> {
    let ctx = catalog.context();
    let targets = ctx.targets.all();
    futures::future::join_all(targets.iter().map(|t| health::evaluate(ctx, t))).await
}

/// Every target's health; 503 when the worst is critical.
async fn health_all(State(state): State<AppState>) -> Response {
    let reports = reports(&state.catalog).await;
    let status = reports
        .iter()
        .map(|r| r.status)
        .max()
        .unwrap_or(Status::Healthy);
    let body = json!({
        "status": status,
        "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "targets": reports,
    });
    (status_code(status), Json(body)).into_response()
}

/// Liveness: sbmon runs. Depends on nothing else.
async fn live() -> Json<Value> {
    Json(json!({"status": "alive"}))
}

/// Readiness: every target answers and none is critical (and there is at least one).
async fn ready(State(state): State<AppState>) -> Response {
    let reports = reports(&state.catalog).await;
    let not_ready: Vec<String> = reports
        .iter()
        .filter(|r| r.status == Status::Critical)
        .map(|r| {
            let failing: Vec<&str> = r
                .checks
                .iter()
                .filter(|c| c.status == Status::Critical)
                .map(|c| c.name.as_str())
                .collect();
            format!("{}: {}", r.target, failing.join(", "))
        })
        .collect();
    let (code, reason) = if reports.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "no targets".to_string())
    } else if not_ready.is_empty() {
        (
            StatusCode::OK,
            "every target answers, none is critical".to_string(),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("critical: {}", not_ready.join("; ")),
        )
    };
    let targets: Vec<Value> = reports
        .iter()
        .map(|r| json!({"target": r.target, "status": r.status}))
        .collect();
    (
        code,
        Json(json!({"ready": code == StatusCode::OK, "reason": reason, "targets": targets})),
    )
        .into_response()
}

/// One target's health, same codes as `/health`; 404 for an unknown name.
async fn health_one(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let ctx = state.catalog.context();
    match ctx.target(Some(&name)) {
        Ok(target) => {
            let report = health::evaluate(ctx, &target).await;
            (status_code(report.status), Json(report)).into_response()
        }
        Err(e) => (StatusCode::NOT_FOUND, Json(json!({"error": e.to_string()}))).into_response(),
    }
}
