//! Plain JSON-RPC 2.0 for scripts that do not want an MCP session: `method` is a tool name,
//! `params` its arguments; batches work. Transport-free: `http.rs` serves it at `/rpc`.
//!
//! Ids are echoed byte for byte as sent (an id of `18446744073709551616` comes back as that,
//! not as a float), so each request is read as raw JSON first and only its parts are parsed.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::echo::clip;
use crate::tools::{Catalog, ToolError};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// The tool ran and failed (agent unreachable, unknown thread, ...): a server error.
pub const TOOL_FAILED: i64 = -32000;
/// Requests in one batch; more is refused rather than run without bound.
pub const MAX_BATCH: usize = 100;

#[derive(Serialize)]
struct Reply<'a> {
    jsonrpc: &'static str,
    id: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorObject>,
}

#[derive(Serialize)]
struct ErrorObject {
    code: i64,
    message: String,
}

fn answer(id: &RawValue, outcome: Result<Value, (i64, String)>) -> String {
    let (result, error) = match outcome {
        Ok(result) => (Some(result), None),
        Err((code, message)) => (None, Some(ErrorObject { code, message })),
    };
    let reply = Reply {
        jsonrpc: "2.0",
        id,
        result,
        error,
    };
    // Serializing a Value and a RawValue that parsed cannot fail; a fallback keeps it total.
    serde_json::to_string(&reply).unwrap_or_else(|e| {
        format!(
            r#"{{"jsonrpc":"2.0","id":null,"error":{{"code":-32603,"message":"{}"}}}}"#,
            e.to_string().replace('"', "'")
        )
    })
}

fn error(id: &RawValue, code: i64, message: impl Into<String>) -> String {
    answer(id, Err((code, message.into())))
}

/// Handle one request body; `None` when nothing is to be answered (only notifications).
pub async fn handle(catalog: &Catalog, body: &[u8]) -> Option<String> {
    let parsed: &RawValue = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Some(error(
                RawValue::NULL,
                PARSE_ERROR,
                format!("parse error: {e}"),
            ));
        }
    };
    if !parsed.get().starts_with('[') {
        return one(catalog, parsed).await;
    }
    let requests: Vec<&RawValue> = match serde_json::from_str(parsed.get()) {
        Ok(requests) => requests,
        Err(e) => {
            return Some(error(
                RawValue::NULL,
                PARSE_ERROR,
                format!("parse error: {e}"),
            ));
        }
    };
    if requests.is_empty() {
        return Some(error(RawValue::NULL, INVALID_REQUEST, "empty batch"));
    }
    if requests.len() > MAX_BATCH {
        return Some(error(
            RawValue::NULL,
            INVALID_REQUEST,
            format!(
                "batch of {} requests exceeds the limit of {MAX_BATCH}",
                requests.len()
            ),
        ));
    }
    let answers = futures::future::join_all(requests.into_iter().map(|r| one(catalog, r)));
    let answers: Vec<String> = answers.await.into_iter().flatten().collect();
    (!answers.is_empty()).then(|| format!("[{}]", answers.join(",")))
}

/// One request, its parts unparsed until needed. `id` is `Some` whenever the key is present,
/// even as `null` (which is answered), and `None` only for a notification.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    jsonrpc: Option<Value>,
    method: Option<Value>,
    params: Option<Value>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

async fn one(catalog: &Catalog, raw: &RawValue) -> Option<String> {
    let request: Request = match raw.get().starts_with('{') {
        true => match serde_json::from_str(raw.get()) {
            Ok(request) => request,
            Err(e) => {
                let message = format!("malformed request: {}", clip(&e.to_string()));
                return Some(error(RawValue::NULL, INVALID_REQUEST, message));
            }
        },
        false => {
            return Some(error(
                RawValue::NULL,
                INVALID_REQUEST,
                "a request must be an object",
            ));
        }
    };
    let reply_id = request.id.unwrap_or(RawValue::NULL);
    if !matches!(
        reply_id.get().as_bytes()[0],
        b'"' | b'-' | b'0'..=b'9' | b'n'
    ) {
        return Some(error(
            RawValue::NULL,
            INVALID_REQUEST,
            "id must be a number or a string",
        ));
    }
    if request.jsonrpc.as_ref().and_then(Value::as_str) != Some("2.0") {
        return Some(error(
            reply_id,
            INVALID_REQUEST,
            "\"jsonrpc\" must be \"2.0\"",
        ));
    }
    let Some(Value::String(method)) = request.method else {
        return Some(error(
            reply_id,
            INVALID_REQUEST,
            "\"method\" must be a tool name",
        ));
    };
    let params = match request.params {
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
    let outcome = catalog
        .call_from("rpc", &method, params)
        .await
        .map(|called| called.value);
    request.id?;
    Some(answer(
        reply_id,
        outcome.map_err(|e| {
            let code = match &e {
                ToolError::UnknownTool(_) | ToolError::NotAllowed { .. } => METHOD_NOT_FOUND,
                e if e.is_usage() => INVALID_PARAMS,
                _ => TOOL_FAILED,
            };
            (code, e.to_string())
        }),
    ))
}
