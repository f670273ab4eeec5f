//! Plain JSON-RPC 2.0 for scripts that do not want an MCP session: `method` is a tool name,
//! `params` its arguments; batches work. Transport-free: `http.rs` serves it at `/rpc`.

use serde_json::{Value, json};

use crate::tools::{Catalog, ToolError};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// The tool ran and failed (agent unreachable, unknown thread, ...): a server error.
pub const TOOL_FAILED: i64 = -32000;
/// Requests in one batch; more is refused rather than run without bound.
pub const MAX_BATCH: usize = 100;

fn error(id: Value, code: i64, message: impl Into<String>) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}})
}

/// Handle one request body; `None` when nothing is to be answered (only notifications).
pub async fn handle(catalog: &Catalog, body: &[u8]) -> Option<Value> {
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Some(error(Value::Null, PARSE_ERROR, format!("parse error: {e}"))),
    };
    match parsed {
        Value::Array(requests) if requests.is_empty() => {
            Some(error(Value::Null, INVALID_REQUEST, "empty batch"))
        }
        Value::Array(requests) if requests.len() > MAX_BATCH => Some(error(
            Value::Null,
            INVALID_REQUEST,
            format!(
                "batch of {} requests exceeds the limit of {MAX_BATCH}",
                requests.len()
            ),
        )),
        Value::Array(requests) => {
            let answers = futures::future::join_all(requests.into_iter().map(|r| one(catalog, r)));
            let answers: Vec<Value> = answers.await.into_iter().flatten().collect();
            (!answers.is_empty()).then_some(Value::Array(answers))
        }
        request => one(catalog, request).await,
    }
}

async fn one(catalog: &Catalog, request: Value) -> Option<Value> {
    let Value::Object(mut request) = request else {
        return Some(error(
            Value::Null,
            INVALID_REQUEST,
            "a request must be an object",
        ));
    };
    // A request without "id" is a notification: run it, answer nothing.
    let id = request.remove("id");
    let reply_id = id.clone().unwrap_or(Value::Null);
    if !matches!(reply_id, Value::Null | Value::Number(_) | Value::String(_)) {
        return Some(error(
            Value::Null,
            INVALID_REQUEST,
            "id must be a number or a string",
        ));
    }
    if request.get("jsonrpc") != Some(&json!("2.0")) {
        return Some(error(
            reply_id,
            INVALID_REQUEST,
            "\"jsonrpc\" must be \"2.0\"",
        ));
    }
    let Some(Value::String(method)) = request.remove("method") else {
        return Some(error(
            reply_id,
            INVALID_REQUEST,
            "\"method\" must be a tool name",
        ));
    };
    let params = match request.remove("params") {
        None | Some(Value::Null) => Value::Null,
        Some(p @ Value::Object(_)) => p,
        Some(_) => {
            return Some(error(
                reply_id,
                INVALID_PARAMS,
                "params must be an object of named arguments",
            ));
        }
    };
    let outcome = catalog.call_from("rpc", &method, params).await;
    id.as_ref()?;
    Some(match outcome {
        Ok(result) => json!({"jsonrpc": "2.0", "id": reply_id, "result": result}),
        Err(e @ (ToolError::UnknownTool(_) | ToolError::NotAllowed { .. })) => {
            error(reply_id, METHOD_NOT_FOUND, e.to_string())
        }
        Err(e) if e.is_usage() => error(reply_id, INVALID_PARAMS, e.to_string()),
        Err(e) => error(reply_id, TOOL_FAILED, e.to_string()),
    })
}
