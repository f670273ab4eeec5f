//! The MCP front end (with the official SDK `rmcp`): stdio and Streamable HTTP. It adapts the
//! tool catalog to MCP and holds no tool logic: tools/list is the catalog with its schemas and
//! annotations, tools/call is `Catalog::call` with a text summary beside the structured result.
//! It also owns what only MCP has: the prompts (the monitoring guide's workflows as guided
//! tool sequences) and the resources (the watched targets, and a tool guide generated from
//! the catalog).
//!
//! Failures of a tool (agent down, unknown thread, bad arguments, unknown target) are tool
//! results with `isError: true`, so a model reads the message, which says what to do next.
//! Misuse of the protocol (unknown tool, prompt or resource) is a JSON-RPC error.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

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
use crate::config::Threshold;
use crate::tools::ToolError;
use crate::tools::{Catalog, Class, ToolDef};

/// How long `sbmon://targets` waits for each agent's welcome: a hung image must not stall
/// the resource read, it is reported as not answering.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(2);

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
        let entries = futures::future::join_all(targets.iter().map(|t| async move {
            let mut entry = json!({
                "name": t.name,
                "address": t.client.address().to_string(),
            });
            let probe = tokio::time::timeout(WELCOME_TIMEOUT, t.client.welcome()).await;
            let facts = match probe {
                Ok(Ok(w)) => json!({
                    "status": "live",
                    "pid": w.pid,
                    "lisp_version": w.lisp_version,
                    "agent_version": w.agent_version,
                }),
                Ok(Err(e)) => json!({"status": "unreachable", "error": e.to_string()}),
                Err(_) => json!({
                    "status": "unreachable",
                    "error": format!("the agent did not answer within {WELCOME_TIMEOUT:?}"),
                }),
            };
            if let (Some(entry), Value::Object(facts)) = (entry.as_object_mut(), facts) {
                entry.extend(facts);
            }
            entry
        }))
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

// ---- prompts ----

/// How prompt texts write example tool calls, with the `target` the client chose, if any.
struct Example {
    target: Option<String>,
}

impl Example {
    fn new(target: Option<String>) -> Self {
        Example { target }
    }

    /// A tool call written out: `tool {"arg": ...}` with `target` added when one was chosen.
    fn call(&self, tool: &str, args: Value) -> String {
        let mut args = match args {
            Value::Object(map) => map,
            _ => JsonObject::new(),
        };
        if let Some(target) = &self.target {
            args.insert("target".into(), json!(target));
        }
        if args.is_empty() {
            format!("`{tool}` with no arguments")
        } else {
            format!("`{tool}` with arguments `{}`", Value::Object(args))
        }
    }

    /// The opening sentence naming the image.
    fn intro(&self, what: &str) -> String {
        match &self.target {
            Some(t) => format!(
                "{what} of the SBCL image `{t}` (pass \"target\": {} on every sbmon tool call).",
                json!(t)
            ),
            None => format!(
                "{what} of the SBCL image sbmon watches (if it watches several, read the \
                 sbmon://targets resource and pass \"target\" on every call)."
            ),
        }
    }
}

/// The health thresholds in force (the config file's, else DESIGN.md's defaults), quoted by
/// the prompts so a model grades figures the way health_check does.
struct Limits {
    heap: Threshold,
    rss: Threshold,
    gc_time: Threshold,
    threads: Threshold,
    fds: Threshold,
    agent: Threshold,
}

fn pct(x: f64) -> String {
    format!("{}%", (x * 1000.0).round() / 10.0)
}

impl Limits {
    fn ratio(t: &Threshold) -> String {
        match t.critical {
            Some(c) => format!("degraded from {}, critical from {}", pct(t.warning), pct(c)),
            None => format!("degraded from {}", pct(t.warning)),
        }
    }

    fn heap(&self) -> String {
        format!(
            "heap used / dynamic-space-size: {}",
            Self::ratio(&self.heap)
        )
    }

    fn rss(&self) -> String {
        format!("RSS / memory limit: {}", Self::ratio(&self.rss))
    }

    fn gc(&self) -> String {
        format!(
            "GC CPU time / wall time over the last minute: {}",
            Self::ratio(&self.gc_time)
        )
    }

    fn threads(&self) -> String {
        let t = &self.threads;
        match t.critical {
            Some(c) => format!(
                "Lisp threads: degraded from {}, critical from {c}",
                t.warning
            ),
            None => format!("Lisp threads: degraded from {}", t.warning),
        }
    }

    fn fds(&self) -> String {
        format!("open fds / soft limit: {}", Self::ratio(&self.fds))
    }

    fn agent(&self) -> String {
        format!(
            "agent round trip: degraded from {} s, critical when unreachable",
            self.agent.warning
        )
    }
}

struct PromptDef {
    name: &'static str,
    title: &'static str,
    description: &'static str,
    text: fn(&Example, &Limits) -> String,
}

static PROMPTS: &[PromptDef] = &[
    PromptDef {
        name: "basic_health_check",
        title: "Basic health check",
        description: "Overall health, then memory and runtime figures: is this SBCL image fine?",
        text: basic_health_check,
    },
    PromptDef {
        name: "memory_investigation",
        title: "Memory investigation",
        description: "Heap, generations and RSS, sampled twice with a GC in between: is memory \
                      growing, and where?",
        text: memory_investigation,
    },
    PromptDef {
        name: "gc_pressure",
        title: "GC pressure",
        description: "GC count, CPU share and measured pauses: is garbage collection costing \
                      too much time or pausing too long?",
        text: gc_pressure,
    },
    PromptDef {
        name: "thread_health",
        title: "Thread health",
        description: "Threads, lock waits and backtraces: are threads stuck, contending or \
                      too many?",
        text: thread_health,
    },
    PromptDef {
        name: "incident_response",
        title: "Incident response",
        description: "Something is wrong now: health, a full thread dump, memory, GC and \
                      runtime figures, gathered in order and summarised.",
        text: incident_response,
    },
];

/// The optional `target` argument of every prompt; an empty string counts as absent (some
/// clients send empty strings for unfilled optional arguments).
fn prompt_target(arguments: Option<&JsonObject>) -> Result<Option<String>, McpError> {
    let Some(arguments) = arguments else {
        return Ok(None);
    };
    if let Some(unknown) = arguments.keys().find(|k| k.as_str() != "target") {
        return Err(McpError::invalid_params(
            format!("unknown prompt argument {unknown:?}; the only argument is \"target\""),
            None,
        ));
    }
    match arguments.get("target") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(other) => Err(McpError::invalid_params(
            format!("prompt argument \"target\" must be a string, not {other}"),
            None,
        )),
    }
}

fn basic_health_check(ex: &Example, l: &Limits) -> String {
    format!(
        "{intro}\n\n\
         1. Call {health}. Its `status` is the worst of its checks: healthy, degraded or \
         critical. For every check that is not healthy, read `observed`, the thresholds and \
         `reason`.\n\
         2. Call {memory}. Look at `heap_used_ratio` ({heap}) and `rss_limit_ratio` ({rss}); \
         note `memory_limit_source` (cgroup or physical memory).\n\
         3. Call {runtime}. Note `uptime_seconds`, `thread_count`, `gc_time_ratio` and \
         `open_fds` against `max_fds` ({fds}).\n\n\
         Thresholds in force: {heap}; {rss}; {gc}; {threads}; {fds}; {agent}.\n\n\
         Answer with the overall status, then one line per finding that is not healthy with \
         its figure and threshold, and what to look at next (memory_investigation, \
         gc_pressure or thread_health). If a call fails because the agent is unreachable, say \
         so: the image is down or has not started its agent.",
        intro = ex.intro("Check the health"),
        health = ex.call("health_check", json!({})),
        memory = ex.call("memory_stats", json!({})),
        runtime = ex.call("runtime_stats", json!({})),
        heap = l.heap(),
        rss = l.rss(),
        gc = l.gc(),
        threads = l.threads(),
        fds = l.fds(),
        agent = l.agent(),
    )
}

fn memory_investigation(ex: &Example, l: &Limits) -> String {
    format!(
        "{intro}\n\n\
         1. Call {memory}. Record `heap_used_bytes`, `heap_limit_bytes`, `heap_used_ratio` \
         ({heap}), `rss_bytes` and `rss_limit_ratio` ({rss}), and the bytes of each entry in \
         `generations` (0 is the nursery, 1-5 older objects, 6 pseudo-static).\n\
         2. Call {gc}. `recent` lists the last collections with the heap before and after: \
         heap after a collection that keeps rising means live data grows (a leak or a \
         growing cache); a heap that drops back after each collection is only garbage. \
         `bytes_freed_recent` says how much the recent collections reclaimed.\n\
         3. Wait a little (30 s or more for a service under load) and call {memory} again. \
         Compare `bytes_consed_total` (allocation rate), the heap, and which generations grew: \
         growth in generations 2-5 is data that survives.\n\
         4. If RSS is much larger than the heap limit suggests, say so: memory outside the \
         Lisp heap (foreign libraries, thread stacks) is growing.\n\n\
         Answer with the heap and RSS figures, the trend between the two readings, where \
         growth is (which generations), and whether the heap will reach its limit soon. \
         Nothing here changes the image.",
        intro = ex.intro("Investigate the memory"),
        memory = ex.call("memory_stats", json!({})),
        gc = ex.call("gc_stats", json!({})),
        heap = l.heap(),
        rss = l.rss(),
    )
}

fn gc_pressure(ex: &Example, l: &Limits) -> String {
    format!(
        "{intro}\n\n\
         1. Call {gc}. Read `gc_count`, `gc_cpu_seconds`, `gc_time_ratio` (since start) and \
         `gc_time_ratio_last_minute` ({gc_limit}), and `gc_cpu_share` (GC share of the \
         process's CPU).\n\
         2. Read `pauses`: `last_seconds`, `p50_seconds`, `p95_seconds`, `p99_seconds` and \
         `max_seconds` are wall-clock pauses measured inside the image (`measured_by` says \
         how; percentiles are estimated from the histogram). Pauses of tens of milliseconds \
         hurt interactive latency; `collections_by_generation` shows which generations are \
         collected and how long they take.\n\
         3. Call {watch}: the collections of the next 10 s as they happen, each with its \
         generation, pause and bytes freed. `count` over `seconds` is the collection rate; \
         many collections per second means a small nursery for this allocation rate, and \
         `pause_max_seconds` is the worst pause of the window.\n\
         4. Call {memory}: `nursery_size_bytes` (bytes consed between GCs) and the \
         generations' parameters explain the rate.\n\n\
         Answer with the GC time share against its thresholds, the pause figures, the \
         collection rate, and whether a larger nursery (bytes-consed-between-gcs) or less \
         allocation would help.",
        intro = ex.intro("Assess the garbage collection pressure"),
        gc = ex.call("gc_stats", json!({})),
        watch = ex.call("gc_watch", json!({"seconds": 10})),
        memory = ex.call("memory_stats", json!({})),
        gc_limit = l.gc(),
    )
}

fn thread_health(ex: &Example, l: &Limits) -> String {
    format!(
        "{intro}\n\n\
         1. Call {list}. Count the threads ({threads}). For each thread read `os_state` \
         (running, sleeping, disk wait, ...), `lisp_wait` (the name of the mutex it waits \
         for) and `cpu_seconds`. Threads flagged `agent` belong to sbmon's agent; \
         `os_only_threads` are runtime threads Lisp does not list (e.g. the finalizer).\n\
         2. Several threads waiting on the same mutex is contention; find the thread holding \
         it by inspecting the others. A thread with rising `cpu_seconds` across two calls is \
         busy; one in disk wait for long is blocked in the kernel.\n\
         3. For each suspicious thread call {inspect} (a thread is named by its OS tid, a \
         number, or by its name; an ambiguous name is an error listing the tids). Read \
         `frames` (the backtrace, innermost first), `wchan` (the kernel wait) and \
         `answered` (false when the thread did not take the interrupt in time, e.g. inside \
         without-interrupts).\n\n\
         Answer with the thread count, the threads that wait or spin and on what, the lock \
         contention if any (mutex, waiters, likely holder), and the backtrace lines that \
         show where they are.",
        intro = ex.intro("Check the threads"),
        list = ex.call("thread_list", json!({})),
        inspect = ex.call(
            "thread_inspect",
            json!({"thread_id": "worker-1", "max_frames": 20})
        ),
        threads = l.threads(),
    )
}

fn incident_response(ex: &Example, l: &Limits) -> String {
    format!(
        "{intro}\n\n\
         1. Identify: call {health}. Note every check that is degraded or critical. If the \
         agent is unreachable, stop here and report it: the image is down, hung, or has not \
         started its agent (`sbmon targets` lists the agents).\n\
         2. Gather, before anything changes: call {dump} for every thread's backtrace \
         (threads that do not answer in time are listed as such), then {memory} and \
         {gc}.\n\
         3. Find the cause: call {runtime} and {list}. Look for high CPU (`cpu_user_seconds`, \
         per-thread `cpu_seconds`), many threads waiting on one mutex (`lisp_wait`), \
         excessive GC time, a heap near its limit, or file descriptors near their limit.\n\n\
         Thresholds in force: {heap}; {rss}; {gc_limit}; {threads}; {fds}; {agent}.\n\n\
         Answer with: the status and failing checks; the most likely cause with the figures \
         and backtrace lines that support it; and the next action for the operator. These \
         tools only read the image; do not suggest they changed anything.",
        intro = ex.intro("Respond to an incident"),
        health = ex.call("health_check", json!({})),
        dump = ex.call(
            "thread_dump_all",
            json!({"max_frames": 30, "timeout_ms": 2000})
        ),
        memory = ex.call("memory_stats", json!({})),
        gc = ex.call("gc_stats", json!({})),
        runtime = ex.call("runtime_stats", json!({})),
        list = ex.call("thread_list", json!({})),
        heap = l.heap(),
        rss = l.rss(),
        gc_limit = l.gc(),
        threads = l.threads(),
        fds = l.fds(),
        agent = l.agent(),
    )
}

// ---- the guide resource ----

/// `sbmon://guide`: the tools as the catalog describes them (so it never drifts from what
/// tools/list says), and how threads and targets are named.
fn guide(catalog: &Catalog) -> String {
    let mut out = String::from(
        "# sbmon tool guide\n\n\
         sbmon reads live SBCL images through an agent inside each image, plus what Linux \
         /proc says about the process. Start with `health_check`; the prompts \
         (basic_health_check, memory_investigation, gc_pressure, thread_health, \
         incident_response) walk through the usual investigations.\n\n\
         ## Naming\n\n\
         - **Targets**: every tool takes an optional `target`, the name of a watched image as \
         listed by the `sbmon://targets` resource (`NAME` from `--target NAME=SPEC`, or \
         `pid-N` for an agent found in the runtime directory). It is needed only when sbmon \
         watches several images.\n\
         - **Threads**: a thread is named by its OS tid (a number, as in `thread_list` and \
         /proc/PID/task) or by its name (a string). A name held by several threads is an \
         error that lists their tids; pass a tid then.\n\
         - Argument names are snake_case; hyphenated spellings (`thread-id`, `max-frames`) \
         are accepted too. Unknown arguments are refused.\n\
         - Classes: `read` tools only read; `control` and `eval` tools change the image and \
         exist only when sbmon was started with `--allow control` / `--allow eval`.\n\n\
         ## Tools\n",
    );
    for def in catalog.tools() {
        let class = match def.class {
            Class::Read => "read",
            Class::Control => "control",
            Class::Eval => "eval",
        };
        let _ = write!(
            out,
            "\n### `{}`: {} ({class})\n\n{}\n",
            def.name, def.title, def.description
        );
        let schema = (def.input_schema)();
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            out.push_str("\nArguments:\n");
            for (name, prop) in props {
                let _ = write!(
                    out,
                    "\n- `{name}` ({}{}){}",
                    schema_type(prop, &schema),
                    if required.contains(&name.as_str()) {
                        ", required"
                    } else {
                        ""
                    },
                    prop.get("description")
                        .and_then(Value::as_str)
                        .map_or(Cow::Borrowed(""), |d| Cow::Owned(format!(": {d}"))),
                );
            }
            out.push('\n');
        }
    }
    out
}

/// A short type for a property schema: `string`, `integer or null`, `integer or string`.
fn schema_type(prop: &Value, root: &Value) -> String {
    // Follow a local `$ref` (schemars puts enums such as the thread id in `$defs`).
    let resolved = prop
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/"))
        .and_then(|path| path.split('/').try_fold(root, |node, key| node.get(key)))
        .unwrap_or(prop);
    let mut types: Vec<String> = Vec::new();
    match resolved.get("type") {
        Some(Value::String(t)) => types.push(t.clone()),
        Some(Value::Array(ts)) => {
            types.extend(ts.iter().filter_map(Value::as_str).map(String::from))
        }
        _ => {}
    }
    for key in ["anyOf", "oneOf"] {
        for alt in resolved
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let t = schema_type(alt, root);
            if !types.contains(&t) {
                types.push(t);
            }
        }
    }
    if types.is_empty() {
        "any".into()
    } else {
        types.join(" or ")
    }
}

#[cfg(test)]
mod tests {
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
