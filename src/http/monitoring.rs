//! `/monitoring/*`: sbmon's own operation metrics as JSON (what `operation_stats` answers),
//! a system summary, the health probes under the names the seed documents use (the very
//! handlers of `/health*`), and `POST /monitoring/reset`. Routed inside the HTTP router, so
//! behind the same guard as every other endpoint.

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use crate::tools::{ToolError, operations};

/// The liveness probe's second name; like [`super::guard::LIVENESS`], it answers without a
/// token.
pub const LIVENESS: &str = "/monitoring/live";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/monitoring/metrics", get(all_operations))
        .route("/monitoring/operation", get(one_operation))
        .route("/monitoring/system", get(system))
        .route("/monitoring/health", get(super::health_all))
        .route("/monitoring/ready", get(super::ready))
        .route(LIVENESS, get(super::live))
        .route("/monitoring/reset", post(reset))
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

/// Every tool's figures: `operation_stats` without a name.
async fn all_operations(State(state): State<AppState>) -> Response {
    let ops = state.catalog.context().calls.operations();
    Json(operations::report_all(&ops)).into_response()
}

#[derive(Deserialize)]
struct OperationQuery {
    name: Option<String>,
}

/// One tool's figures; 400 without `name`, 404 for a tool this sbmon does not count.
async fn one_operation(State(state): State<AppState>, Query(q): Query<OperationQuery>) -> Response {
    let Some(name) = q.name.filter(|n| !n.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "use /monitoring/operation?name=TOOL (/monitoring/metrics lists every tool)".into(),
        );
    };
    let ops = state.catalog.context().calls.operations();
    match operations::report(&ops, Some(&name)) {
        Ok(mut report) => match report.tools.pop() {
            Some(tool) => Json(json!({
                "started_unix": report.started_unix,
                "uptime_seconds": report.uptime_seconds,
                "reset_unix": report.reset_unix,
                "tool": tool,
            }))
            .into_response(),
            None => error(StatusCode::NOT_FOUND, format!("no tool named {name:?}")),
        },
        Err(ToolError::InvalidArguments { message, .. }) => error(StatusCode::NOT_FOUND, message),
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}

/// Totals across tools, uptime, version, how many targets and tools.
async fn system(State(state): State<AppState>) -> Response {
    let ctx = state.catalog.context();
    let report = operations::report_all(&ctx.calls.operations());
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_unix": report.started_unix,
        "uptime_seconds": report.uptime_seconds,
        "reset_unix": report.reset_unix,
        "targets": ctx.targets.all().len(),
        "tools": report.tools.len(),
        "totals": report.totals,
    }))
    .into_response()
}

/// Zero the since-reset figures (the Prometheus counters stay); only with `--allow control`,
/// audited. Answers the figures as they were just before.
async fn reset(State(state): State<AppState>) -> Response {
    match state.catalog.reset_operations("http") {
        Some(before) => Json(json!({
            "reset": true,
            "before": {
                "reset_unix": before.reset_unix,
                "totals": before.totals,
            },
        }))
        .into_response(),
        None => error(
            StatusCode::FORBIDDEN,
            "POST /monitoring/reset changes sbmon's state: this sbmon was started without \
             --allow control, so it refuses; restart it with --allow control to reset the \
             operation metrics"
                .into(),
        ),
    }
}
