//! The HTTP front end: MCP Streamable HTTP at `/mcp`, JSON-RPC at `/rpc`, and a landing page
//! at `/` listing endpoints, targets and tools. It adapts the catalog; it holds no tool logic.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::tools::{Catalog, Class};

/// Largest request body accepted on any endpoint.
pub const MAX_BODY: usize = 1024 * 1024;

/// The whole HTTP surface; cancelling `stop` ends open MCP sessions and streams, so a
/// graceful shutdown is not held up by a connected client.
pub fn router(catalog: Arc<Catalog>, stop: CancellationToken) -> Router {
    Router::new()
        .route("/", get(landing))
        .route("/rpc", post(rpc))
        .with_state(catalog.clone())
        .nest_service("/mcp", crate::mcp::http_service_with_cancel(catalog, stop))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

async fn rpc(State(catalog): State<Arc<Catalog>>, body: Bytes) -> Response {
    match crate::rpc::handle(&catalog, &body).await {
        Some(answer) => (
            [(header::CONTENT_TYPE, "application/json")],
            answer.to_string(),
        )
            .into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn landing(State(catalog): State<Arc<Catalog>>) -> Html<String> {
    let targets: String = catalog
        .context()
        .targets
        .all()
        .iter()
        .map(|t| {
            format!(
                "<li><code>{}</code> at <code>{}</code></li>",
                escape(&t.name),
                escape(&t.client.address().to_string())
            )
        })
        .collect();
    let targets = if targets.is_empty() {
        "<li>none yet: start an agent with <code>(sbmon-agent:start)</code></li>".to_string()
    } else {
        targets
    };
    let tools: String = catalog
        .tools()
        .map(|t| {
            let class = match t.class {
                Class::Read => "read",
                Class::Control => "control",
                Class::Eval => "eval",
            };
            format!(
                "<tr><td><code>{}</code></td><td>{class}</td><td>{}</td></tr>",
                t.name,
                escape(t.description)
            )
        })
        .collect();
    Html(format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>sbmon</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{padding:.2em .6em;vertical-align:top}}</style>
</head><body>
<h1>sbmon {version}</h1>
<p>Watching live SBCL images.</p>
<h2>Endpoints</h2>
<ul>
<li><code>/mcp</code>: MCP (Streamable HTTP) for AI assistants and editors</li>
<li><code>POST /rpc</code>: JSON-RPC 2.0, <code>method</code> = tool name, <code>params</code> = its arguments, e.g.
<pre>curl -s localhost:9405/rpc -d '{{"jsonrpc":"2.0","id":1,"method":"health_check"}}'</pre></li>
</ul>
<h2>Targets</h2><ul>{targets}</ul>
<h2>Tools</h2><table>{tools}</table>
</body></html>"#,
        version = env!("CARGO_PKG_VERSION"),
    ))
}
