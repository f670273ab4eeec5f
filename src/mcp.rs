//! The MCP front end (with the official SDK `rmcp`): stdio and Streamable HTTP. It adapts the
//! tool catalog to MCP and holds no tool logic: tools/list is the catalog with its schemas and
//! annotations, tools/call is `Catalog::call` with a text summary beside the structured result.
//! It also owns what only MCP has: the prompts (the usual investigations as guided
//! tool sequences) and the resources (the watched targets, a tool guide generated from
//! the catalog, and the event journal).
//!
//! The journal's news reaches clients as it happens, in the way of each protocol era:
//! - 2025 era (sessions opened with `initialize`): `resources/subscribe` to `sbmon://events`
//!   brings `notifications/resources/updated` after each new event (a burst is one
//!   notification); `logging/setLevel` brings each warning and critical event at or above
//!   that level as `notifications/message` (logger `sbmon.journal`, data: the event).
//! - 2026-07-28 (no sessions): `subscriptions/listen` with `sbmon://events` among its
//!   resource subscriptions brings the same `notifications/resources/updated` on that
//!   request's stream. This era deprecates logging: `logging/setLevel` is refused with a
//!   pointer to the subscription, and discovery does not advertise logging.
//!
//! Failures of a tool (agent down, unknown thread, bad arguments, unknown target) are tool
//! results with `isError: true`, so a model reads the message, which says what to do next.
//! Misuse of the protocol (unknown tool, prompt or resource) is a JSON-RPC error.

use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, GetPromptRequestParams,
    GetPromptResponse, GetPromptResult, Implementation, JsonObject, ListPromptsResult,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, Prompt, PromptArgument,
    PromptMessage, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
    ResourceContents, Role, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
#[allow(deprecated)]
use rmcp::model::{
    DiscoverResult, ErrorCode, LoggingLevel, LoggingMessageNotificationParam,
    ResourceUpdatedNotificationParam, SetLevelRequestParams, SubscribeRequestParams,
    SubscriptionFilter, UnsubscribeRequestParams,
};
use rmcp::service::{Peer, SubscriptionContext};
use rmcp::service::{RequestContext, ServerInitializeError};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::agent::address::runtime_dir;
use crate::journal::{Event, Filter, Severity};
use crate::targets::Listing;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

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
(pass one's name as `target` when there are several), sbmon://guide describes every tool, \
and sbmon://events is the event journal (what happened: health changes, targets lost and \
found, long GC pauses, threads started and ended, control actions); subscribe to it to hear \
of new events as they happen.";

const TARGETS_URI: &str = "sbmon://targets";
const GUIDE_URI: &str = "sbmon://guide";
const EVENTS_URI: &str = "sbmon://events";
/// The logger name of the journal's log notifications.
const JOURNAL_LOGGER: &str = "sbmon.journal";

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
/// no tool call takes a lock, so concurrent calls on one session run concurrently.
#[derive(Clone)]
pub struct McpServer {
    shared: Arc<Shared>,
    session: Arc<Session>,
}

/// What a 2025-era session asked to hear of the journal.
#[derive(Default)]
struct Wants {
    /// `resources/subscribe` to `sbmon://events`.
    updates: bool,
    /// `logging/setLevel`: priority events at or above this level.
    #[allow(deprecated)]
    level: Option<LoggingLevel>,
    /// The task that tells this session's client has started.
    forwarding: bool,
}

/// One session's subscriptions; its forwarding task ends when the session does.
#[derive(Default)]
struct Session {
    wants: Arc<Mutex<Wants>>,
    ended: CancellationToken,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.ended.cancel();
    }
}

impl Session {
    fn wants(&self) -> std::sync::MutexGuard<'_, Wants> {
        self.wants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change what this session wants, and start telling its client if nothing does yet.
    fn want(&self, catalog: &Catalog, peer: &Peer<RoleServer>, change: impl FnOnce(&mut Wants)) {
        let mut wants = self.wants();
        change(&mut wants);
        if !wants.forwarding {
            wants.forwarding = true;
            tokio::spawn(forward(
                peer.clone(),
                self.wants.clone(),
                catalog.context().journal.follow(),
                self.ended.clone(),
            ));
        }
    }
}

/// A 2025-era session's journal news: after each burst of events one
/// `notifications/resources/updated` while subscribed, and each priority event at or above
/// the logging level as `notifications/message`. Ends with the session or its transport.
#[allow(deprecated)]
async fn forward(
    peer: Peer<RoleServer>,
    wants: Arc<Mutex<Wants>>,
    mut journal: tokio::sync::broadcast::Receiver<Arc<Event>>,
    ended: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = ended.cancelled() => return,
            first = journal.recv() => first,
        };
        let mut burst = Vec::new();
        let mut missed = false;
        match first {
            Ok(e) => burst.push(e),
            Err(RecvError::Lagged(_)) => missed = true,
            Err(RecvError::Closed) => return,
        }
        loop {
            match journal.try_recv() {
                Ok(e) => burst.push(e),
                Err(TryRecvError::Lagged(_)) => missed = true,
                Err(_) => break,
            }
        }
        let (updates, level) = {
            let w = wants.lock().unwrap_or_else(|p| p.into_inner());
            (w.updates, w.level)
        };
        if updates {
            let param = ResourceUpdatedNotificationParam::new(EVENTS_URI);
            if peer.notify_resource_updated(param).await.is_err() {
                return;
            }
        }
        let Some(level) = level else { continue };
        for e in burst.iter().filter(|e| e.severity.is_priority()) {
            let as_log = log_level(e.severity);
            if rank(as_log) < rank(level) {
                continue;
            }
            let data = serde_json::to_value(&**e).unwrap_or(Value::Null);
            let param =
                LoggingMessageNotificationParam::new(as_log, data).with_logger(JOURNAL_LOGGER);
            if peer.notify_logging_message(param).await.is_err() {
                return;
            }
        }
        if missed {
            tracing::debug!("an MCP session fell behind the journal; read {EVENTS_URI}");
        }
    }
}

#[allow(deprecated)]
fn log_level(severity: Severity) -> LoggingLevel {
    match severity {
        Severity::Info => LoggingLevel::Info,
        Severity::Warning => LoggingLevel::Warning,
        Severity::Critical => LoggingLevel::Critical,
    }
}

/// syslog order, as MCP's levels are (debug lowest, emergency highest).
#[allow(deprecated)]
fn rank(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

/// Whether a request comes from a client of the 2026-07-28 era (no `initialize`).
fn modern(context: &RequestContext<RoleServer>) -> bool {
    context
        .protocol_version()
        .is_some_and(|v| !v.has_initialize())
}

fn not_events(uri: &str) -> McpError {
    McpError::invalid_params(
        format!(
            "only {EVENTS_URI} can be subscribed to, not {:?}",
            crate::echo::clip(uri)
        ),
        None,
    )
}

impl McpServer {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self::from_shared(Arc::new(Shared::new(catalog)))
    }

    fn from_shared(shared: Arc<Shared>) -> Self {
        McpServer {
            shared,
            session: Arc::new(Session::default()),
        }
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
    #[allow(deprecated)]
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_logging()
                .enable_tools()
                .enable_prompts()
                .enable_resources()
                .enable_resources_subscribe()
                .build(),
        )
        .with_server_info(
            Implementation::new("sbmon", env!("CARGO_PKG_VERSION"))
                .with_title("sbmon: SBCL image monitor"),
        )
        .with_instructions(INSTRUCTIONS)
    }

    /// 2026-07-28 deprecates logging: its clients are not offered it.
    async fn discover(
        &self,
        _context: RequestContext<RoleServer>,
    ) -> Result<DiscoverResult, McpError> {
        let mut info = self.get_info();
        info.capabilities.logging = None;
        Ok(DiscoverResult::from_server_info(
            self.supported_protocol_versions().into_owned(),
            info,
        ))
    }

    #[allow(deprecated)]
    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        if modern(&context) {
            return Err(McpError::new(
                ErrorCode::METHOD_NOT_FOUND,
                format!(
                    "logging/setLevel is not served on protocol 2026-07-28, which deprecates \
                     logging; listen to {EVENTS_URI} (subscriptions/listen) to hear of journal \
                     events and read it for them"
                ),
                None,
            ));
        }
        self.session.want(self.catalog(), &context.peer, |w| {
            w.level = Some(request.level)
        });
        Ok(())
    }

    #[allow(deprecated)]
    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        if request.uri != EVENTS_URI {
            return Err(not_events(&request.uri));
        }
        self.session
            .want(self.catalog(), &context.peer, |w| w.updates = true);
        Ok(())
    }

    #[allow(deprecated)]
    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        if request.uri != EVENTS_URI {
            return Err(not_events(&request.uri));
        }
        self.session.wants().updates = false;
        Ok(())
    }

    fn accepted_subscription_filter(
        &self,
        _requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(
            SubscriptionFilter::builder()
                .resource_subscription(EVENTS_URI)
                .build(),
        )
    }

    /// A 2026-07-28 subscription: one `notifications/resources/updated` after each burst of
    /// journal events, until the client cancels it.
    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let wanted = context
            .accepted()
            .resource_subscriptions
            .as_ref()
            .is_some_and(|uris| uris.iter().any(|u| u == EVENTS_URI));
        if !wanted {
            context.cancelled().await;
            return Ok(());
        }
        let mut journal = self.catalog().context().journal.follow();
        let sink = context.sink().clone();
        loop {
            let next = tokio::select! {
                () = context.cancelled() => return Ok(()),
                next = journal.recv() => next,
            };
            if let Err(RecvError::Closed) = next {
                return Ok(());
            }
            while journal.try_recv().is_ok() {}
            if sink.notify_resource_updated(EVENTS_URI).await.is_err() {
                return Ok(());
            }
        }
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
            Resource::new(EVENTS_URI, "events")
                .with_title("Event journal")
                .with_description(
                    "What happened, newest last: health changes per check, targets lost and \
                     found, GC pauses over the threshold, threads started and ended, control \
                     and eval actions. Subscribable: each new event is announced with \
                     notifications/resources/updated. The events_recent tool filters it.",
                )
                .with_mime_type("application/json"),
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
            EVENTS_URI => {
                let all = Filter {
                    limit: Some(crate::journal::MAX_LIMIT),
                    ..Filter::default()
                };
                let recent = self.catalog().context().journal.recent(&all);
                let text = serde_json::to_string_pretty(&recent)
                    .map_err(|e| McpError::internal_error(e.to_string(), None))?;
                (text, "application/json")
            }
            other => {
                return Err(McpError::resource_not_found(
                    format!(
                        "no resource {other:?}; the resources are {TARGETS_URI}, {GUIDE_URI} \
                         and {EVENTS_URI}"
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
