//! The MCP front end (with the official SDK `rmcp`): stdio and Streamable HTTP. It adapts the
//! tool catalog to MCP and holds no tool logic: tools/list is the catalog with its schemas and
//! annotations, tools/call is `Catalog::call` with a text summary beside the structured result.
//! It also owns what only MCP has: the prompts (the usual investigations as guided
//! tool sequences) and the resources (the watched targets, and a tool guide generated from
//! the catalog).
//!
//! Failures of a tool (agent down, unknown thread, bad arguments, unknown target) are tool
//! results with `isError: true`, so a model reads the message, which says what to do next.
//! Misuse of the protocol (unknown tool, prompt or resource) is a JSON-RPC error.

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, GetPromptRequestParams,
    GetPromptResponse, GetPromptResult, Implementation, JsonObject, ListPromptsResult,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, Prompt, PromptArgument,
    PromptMessage, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
    ResourceContents, Role, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::{RequestContext, ServerInitializeError};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::agent::address::runtime_dir;
use crate::targets::Listing;

mod guide;
mod prompts;

use crate::tools::ToolError;
use crate::tools::{Catalog, Class, ToolDef};
use guide::guide;
use prompts::{Example, Limits, PROMPTS, prompt_target};

const INSTRUCTIONS: &str = "sbmon watches live SBCL (Common Lisp) images through an agent \
inside each image. Start with the health_check tool: it grades memory, GC, threads, file \
descriptors and agent reachability, and each check's reason says what it saw. The prompts \
(basic_health_check, memory_investigation, gc_pressure, thread_health, incident_response) \
are guided sequences of tool calls; the resource sbmon://targets lists the watched images \
(pass one's name as `target` when there are several) and sbmon://guide describes every tool.";

const TARGETS_URI: &str = "sbmon://targets";
const GUIDE_URI: &str = "sbmon://guide";

/// Serve MCP on stdin/stdout until the client closes stdin. Stdout carries protocol only;
/// logs go through `tracing` (to stderr).
pub async fn serve_stdio(catalog: Arc<Catalog>) -> Result<(), std::io::Error> {
    let server = McpServer::new(catalog);
    let running = match server.serve(rmcp::transport::stdio()).await {
        Ok(running) => running,
        // A client that closes stdin before initializing has simply gone away.
        Err(ServerInitializeError::ConnectionClosed(reason)) => {
            tracing::info!("MCP client closed stdin before initializing: {reason}");
            return Ok(());
        }
        Err(e) => return Err(std::io::Error::other(format!("MCP initialization: {e}"))),
    };
    let reason = running.waiting().await.map_err(std::io::Error::other)?;
    tracing::info!("MCP stdio session ended: {reason:?}");
    Ok(())
}

/// The Streamable HTTP MCP endpoint as an axum Router. It answers on every path, so it works
/// mounted with `nest_service("/mcp", ..)` or `nest("/mcp", ..)`.
///
/// rmcp checks the `Host` header against loopback names (DNS rebinding protection); browser
/// requests must also come from a loopback `Origin`. Requests without `Origin` (ordinary MCP
/// clients, curl) pass.
pub fn http_service(catalog: Arc<Catalog>) -> axum::Router {
    http_service_with_cancel(catalog, CancellationToken::new(), false)
}

/// `http_service` whose sessions and open event streams all end when `cancel` is cancelled,
/// so that a graceful HTTP shutdown is not held up by a client's open stream.
/// `authenticated`: every request already carried sbmon's bearer token, so the loopback-only
/// Host check (DNS-rebinding protection for unauthenticated local servers) is lifted.
pub fn http_service_with_cancel(
    catalog: Arc<Catalog>,
    cancel: CancellationToken,
    authenticated: bool,
) -> axum::Router {
    let shared = Arc::new(Shared::new(catalog));
    let mut config = StreamableHttpServerConfig::default();
    if authenticated {
        config = config.disable_allowed_hosts();
    }
    let config = config
        .with_cancellation_token(cancel)
        .with_allowed_origins([
            "http://localhost:*",
            "http://127.0.0.1:*",
            "http://[::1]:*",
            "https://localhost:*",
            "https://127.0.0.1:*",
            "https://[::1]:*",
        ]);
    let service: StreamableHttpService<McpServer, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(McpServer::from_shared(shared.clone())),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    axum::Router::new().fallback_service(service)
}

/// What every session shares: the catalog and its tool list, built once.
struct Shared {
    catalog: Arc<Catalog>,
    tools: Vec<Tool>,
}

impl Shared {
    fn new(catalog: Arc<Catalog>) -> Self {
        let tools = catalog.tools().map(mcp_tool).collect();
        Shared { catalog, tools }
    }
}

/// One MCP session's handler. Cheap to clone; rmcp runs every request on its own task, and
/// nothing here takes a lock, so concurrent calls on one session run concurrently.
#[derive(Clone)]
pub struct McpServer {
    shared: Arc<Shared>,
}

impl McpServer {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self::from_shared(Arc::new(Shared::new(catalog)))
    }

    fn from_shared(shared: Arc<Shared>) -> Self {
        McpServer { shared }
    }

    fn catalog(&self) -> &Catalog {
        &self.shared.catalog
    }

    async fn call(&self, name: &str, arguments: Option<JsonObject>) -> CallToolResult {
        let args = arguments.map_or(Value::Null, Value::Object);
        match self.catalog().call_from("mcp", name, args).await {
            Ok(called) => {
                let mut result = CallToolResult::success(vec![ContentBlock::text(called.summary)]);
                result.structured_content = Some(called.value);
                result
            }
            Err(e) => {
                tracing::debug!("tool {name} failed: {e}");
                CallToolResult::error(vec![ContentBlock::text(e.to_string())])
            }
        }
    }

    /// `sbmon://targets`: every watched target and whether its agent answers now.
    async fn targets_json(&self) -> Value {
        let targets = self.catalog().context().targets.all();
        let entries = futures::future::join_all(
            targets
                .iter()
                .map(|t| Listing::probe(Some(t.name.clone()), &t.client, None, true)),
        )
        .await;
        json!({
            "runtime_dir": runtime_dir().display().to_string(),
            "targets": entries,
        })
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .enable_resources()
                .build(),
        )
        .with_server_info(
            Implementation::new("sbmon", env!("CARGO_PKG_VERSION"))
                .with_title("sbmon: SBCL image monitor"),
        )
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.shared.tools.clone()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.shared.tools.iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let name = request.name.as_ref();
        // rmcp's own tool router answers an unknown tool the same way (invalid params); a
        // control or eval tool this sbmon was not allowed says which flag would allow it.
        if let Err(e) = self.catalog().check(name) {
            let message = match e {
                ToolError::UnknownTool(_) => {
                    format!("unknown tool {name:?}; tools/list lists the available tools")
                }
                other => other.to_string(),
            };
            return Err(McpError::invalid_params(message, None));
        }
        // A cancelled request stops its tool (e.g. a long thread dump) instead of running on
        // unobserved; the client no longer waits for this answer.
        tokio::select! {
            result = self.call(name, request.arguments) => Ok(result.into()),
            () = context.ct.cancelled() => Err(McpError::internal_error("request cancelled", None)),
        }
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        let prompts = PROMPTS
            .iter()
            .map(|p| {
                Prompt::new(
                    p.name,
                    Some(p.description),
                    Some(vec![
                        PromptArgument::new("target")
                            .with_description(
                                "Name of the image to look at (see the sbmon://targets \
                                 resource); needed only when sbmon watches several.",
                            )
                            .with_required(false),
                    ]),
                )
                .with_title(p.title)
            })
            .collect();
        Ok(ListPromptsResult::with_all_items(prompts))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        let Some(prompt) = PROMPTS.iter().find(|p| p.name == request.name) else {
            let known: Vec<&str> = PROMPTS.iter().map(|p| p.name).collect();
            return Err(McpError::invalid_params(
                format!(
                    "unknown prompt {:?}; the prompts are {}",
                    request.name,
                    known.join(", ")
                ),
                None,
            ));
        };
        let target = prompt_target(request.arguments.as_ref())?;
        let health = &self.catalog().context().config.health;
        let limits = Limits {
            heap: health.memory.heap,
            rss: health.memory.rss,
            gc_time: health.gc.time,
            threads: health.threads.count,
            fds: health.resources.fds,
            agent: health.availability.agent,
        };
        let text = (prompt.text)(&Example::new(target), &limits);
        let result = GetPromptResult::new(vec![PromptMessage::new_text(Role::User, text)])
            .with_description(prompt.description);
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new(TARGETS_URI, "targets")
                .with_title("Watched SBCL images")
                .with_description(
                    "Every target sbmon watches: name (the `target` argument of the tools), \
                     address, and whether its agent answers now, with pid and Lisp version.",
                )
                .with_mime_type("application/json"),
            Resource::new(GUIDE_URI, "guide")
                .with_title("sbmon tool guide")
                .with_description(
                    "Every tool with its class, description and arguments, and how threads \
                     and targets are named.",
                )
                .with_mime_type("text/markdown"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let (text, mime) = match request.uri.as_str() {
            TARGETS_URI => {
                let value = self.targets_json().await;
                let text = serde_json::to_string_pretty(&value)
                    .map_err(|e| McpError::internal_error(e.to_string(), None))?;
                (text, "application/json")
            }
            GUIDE_URI => (guide(self.catalog()), "text/markdown"),
            other => {
                return Err(McpError::resource_not_found(
                    format!(
                        "no resource {other:?}; the resources are {TARGETS_URI} and {GUIDE_URI}"
                    ),
                    None,
                ));
            }
        };
        let contents = ResourceContents::text(text, request.uri.clone()).with_mime_type(mime);
        Ok(ReadResourceResult::new(vec![contents]).into())
    }
}

// ---- tools ----

/// A catalog tool as MCP lists it.
fn mcp_tool(def: &'static ToolDef) -> Tool {
    let read = def.class == Class::Read;
    let annotations = ToolAnnotations::with_title(def.title)
        .read_only(read)
        .destructive(!read)
        .idempotent(read)
        .open_world(false);
    let mut tool = Tool::new(
        def.name,
        def.description,
        object_schema(def.name, (def.input_schema)()),
    )
    .with_title(def.title)
    .with_annotations(annotations);
    tool.output_schema = Some(object_schema(def.name, (def.output_schema)()));
    tool
}

/// A schemars schema as MCP wants it: an object schema without the Rust type's name as
/// title. MCP requires object schemas; should one not be, the tool still lists (with an
/// open object schema) and the mistake is logged rather than taking the server down.
fn object_schema(tool: &str, schema: Value) -> Arc<JsonObject> {
    match schema {
        Value::Object(mut object) if object.get("type") == Some(&json!("object")) => {
            object.remove("title");
            Arc::new(object)
        }
        other => {
            tracing::error!("tool {tool}: schema is not an object schema: {other}");
            let mut object = JsonObject::new();
            object.insert("type".into(), json!("object"));
            Arc::new(object)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prompts::basic_health_check;
    use super::*;
    use crate::config::Config;
    use crate::targets::Targets;

    fn catalog() -> Catalog {
        Catalog::new(Arc::new(Targets::default()), Arc::new(Config::default()))
    }

    #[test]
    fn tools_have_object_schemas_and_annotations() {
        let shared = Shared::new(Arc::new(catalog()));
        assert!(!shared.tools.is_empty());
        for tool in &shared.tools {
            assert_eq!(tool.input_schema.get("type"), Some(&json!("object")));
            assert!(tool.input_schema.get("title").is_none());
            let out = tool.output_schema.as_ref().expect("output schema");
            assert_eq!(out.get("type"), Some(&json!("object")));
            let a = tool.annotations.as_ref().expect("annotations");
            assert_eq!(a.read_only_hint, Some(true));
            assert_eq!(a.destructive_hint, Some(false));
            assert_eq!(a.open_world_hint, Some(false));
        }
    }

    #[test]
    fn allowed_control_and_eval_tools_are_marked_destructive() {
        let allowed = Catalog::with_policy(
            Arc::new(Targets::default()),
            Arc::new(Config::default()),
            crate::tools::Allow {
                control: true,
                eval: true,
            },
            crate::audit::Audit::default(),
        );
        let shared = Shared::new(Arc::new(allowed));
        for name in [
            "memory_gc",
            "gc_tune",
            "thread_kill",
            "profile_cpu",
            "repl_eval",
            "code_reload_system",
        ] {
            let tool = shared.tools.iter().find(|t| t.name == name).expect(name);
            let a = tool.annotations.as_ref().expect("annotations");
            assert_eq!(a.read_only_hint, Some(false), "{name}");
            assert_eq!(a.destructive_hint, Some(true), "{name}");
        }
    }

    #[test]
    fn guide_describes_every_tool_and_argument() {
        let c = catalog();
        let g = guide(&c);
        for def in c.tools() {
            assert!(g.contains(&format!("`{}`", def.name)), "{}", def.name);
        }
        assert!(
            g.contains("- `thread_id` (integer or string, required): The thread"),
            "{g}"
        );
        assert!(g.contains("- `target` (string or null)"), "{g}");
    }

    #[test]
    fn prompts_mention_tools_and_target() {
        let limits = Limits {
            heap: crate::config::Config::default().health.memory.heap,
            rss: Config::default().health.memory.rss,
            gc_time: Config::default().health.gc.time,
            threads: Config::default().health.threads.count,
            fds: Config::default().health.resources.fds,
            agent: Config::default().health.availability.agent,
        };
        for p in PROMPTS {
            let text = (p.text)(&Example::new(Some("app\"1".into())), &limits);
            assert!(
                text.contains("\"target\":\"app\\\"1\""),
                "{}: {text}",
                p.name
            );
            let plain = (p.text)(&Example::new(None), &limits);
            assert!(!plain.contains("\"target\":"), "{}", p.name);
        }
        let text = basic_health_check(&Example::new(None), &limits);
        assert!(
            text.contains("degraded from 70%, critical from 90%"),
            "{text}"
        );
    }

    #[test]
    fn prompt_arguments() {
        let obj = |v: Value| v.as_object().cloned().expect("object");
        assert_eq!(prompt_target(None).ok(), Some(None));
        assert_eq!(
            prompt_target(Some(&obj(json!({"target": ""})))).ok(),
            Some(None)
        );
        assert_eq!(
            prompt_target(Some(&obj(json!({"target": "a"})))).ok(),
            Some(Some("a".into()))
        );
        assert!(prompt_target(Some(&obj(json!({"target": 3})))).is_err());
        assert!(prompt_target(Some(&obj(json!({"tagret": "a"})))).is_err());
    }
}
