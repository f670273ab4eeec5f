//! The event journal end to end, with a real SBCL and the real `sbmon serve` binary: a real
//! health change (a threshold set below what the image shows) becomes an event that
//! `events_recent`, `GET /monitoring/events` and the resource `sbmon://events` show, and that
//! reaches MCP clients as it happens: a 2025-era client subscribed to the resource gets
//! `notifications/resources/updated`, and after `logging/setLevel warning` the event as a
//! log message; a 2026-07-28 client gets the update on its `subscriptions/listen` stream and
//! is refused logging. A control action is an event with its outcome, on `/events` too. Bad
//! filters are usage errors.
// Logging is deprecated by MCP 2026-07-28 and still served to 2025-era clients: tested here.
#![allow(deprecated)]

mod common;

use std::time::{Duration, Instant};

use common::{Image, Listen, Sbmon, Setup, sleeper};
use rmcp::model::{
    CallToolRequestParams, ClientConfig, ErrorCode, LoggingLevel, LoggingMessageNotificationParam,
    ProtocolVersion, ReadResourceRequestParams, ResourceContents, ResourceUpdatedNotificationParam,
    ServerNotification, SetLevelRequestParams, SubscribeRequestParams, SubscriptionFilter,
};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt, NotificationContext, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use sbmon::agent::Address;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// What a client heard from the server, outside any answer.
#[derive(Debug)]
enum Heard {
    Updated(String),
    Log(LoggingLevel, Value),
}

/// A client that passes on every resource update and log message it hears.
struct Listener(mpsc::UnboundedSender<Heard>);

impl ClientHandler for Listener {
    async fn on_resource_updated(
        &self,
        params: ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let _ = self.0.send(Heard::Updated(params.uri));
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let _ = self.0.send(Heard::Log(params.level, params.data));
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::default()
    }
}

fn control() -> sbmon::tools::Allow {
    sbmon::tools::Allow {
        control: true,
        eval: false,
    }
}

const WAIT: Duration = Duration::from_secs(60);

/// `sbmon serve --http` sampling (and watching) every second.
fn serve(target: &str, config: Option<&std::path::Path>, allow_control: bool) -> Sbmon {
    let app = format!("app={target}");
    let mut args = vec!["--target", app.as_str(), "--sample-interval", "1"];
    let config = config.map(|p| p.display().to_string());
    if let Some(config) = &config {
        args.extend(["--config", config.as_str()]);
    }
    if allow_control {
        args.extend(["--allow", "control"]);
    }
    Sbmon::start("serve", &args, &[])
}

async fn call(
    client: &rmcp::service::RunningService<RoleClient, impl rmcp::Service<RoleClient>>,
    tool: &'static str,
    arguments: Value,
) -> rmcp::model::CallToolResult {
    let arguments = arguments.as_object().cloned().expect("an object");
    client
        .call_tool(CallToolRequestParams::new(tool).with_arguments(arguments))
        .await
        .unwrap_or_else(|e| panic!("tools/call {tool}: {e}"))
}

/// The events of a successful `events_recent` call.
async fn recent(
    client: &rmcp::service::RunningService<RoleClient, impl rmcp::Service<RoleClient>>,
    filter: Value,
) -> Vec<Value> {
    let result = call(client, "events_recent", filter).await;
    assert_eq!(result.is_error, Some(false), "{result:?}");
    let value = result.structured_content.expect("structuredContent");
    value["events"].as_array().expect("events").clone()
}

/// Poll `events_recent` until `filter` selects something.
async fn wait_for_events(
    client: &rmcp::service::RunningService<RoleClient, impl rmcp::Service<RoleClient>>,
    filter: Value,
) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let events = recent(client, filter.clone()).await;
        if !events.is_empty() {
            return events;
        }
        assert!(Instant::now() < deadline, "no event for {filter}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_real_health_change_is_journaled_and_reaches_subscribed_clients() {
    let place = tempfile::tempdir().expect("temp dir");
    let socket = Address::Unix(place.path().join("agent.sock"));
    let config = place.path().join("sbmon.toml");
    // Any image has more than one Lisp thread: threads.count is degraded from the start.
    std::fs::write(
        &config,
        "[health.threads]\ncount = { warning = 2, critical = 1000 }\n",
    )
    .expect("write config");
    // sbmon first, watching a socket where nothing listens yet.
    let sbmon = serve(&socket.to_string(), Some(&config), true);
    let (tx, mut heard) = mpsc::unbounded_channel();
    let url = format!("{}/mcp", sbmon.base);
    let client = Listener(tx)
        .serve(StreamableHttpClientTransport::from_uri(url.as_str()))
        .await
        .expect("MCP initialize (2025 era)");
    let info = client.peer_info().expect("server info");
    let resources = info.capabilities.resources.as_ref().expect("resources");
    assert_eq!(resources.subscribe, Some(true));
    assert!(
        info.capabilities.logging.is_some(),
        "2025 era: logging offered"
    );
    client
        .subscribe(SubscribeRequestParams::new("sbmon://events"))
        .await
        .expect("resources/subscribe");
    client
        .set_level(SetLevelRequestParams::new(LoggingLevel::Warning))
        .await
        .expect("logging/setLevel");
    let wrong = client
        .subscribe(SubscribeRequestParams::new("sbmon://targets"))
        .await;
    match wrong {
        Err(ServiceError::McpError(e)) => {
            assert!(e.message.contains("only sbmon://events"), "{e:?}")
        }
        other => panic!("subscribing to another resource: {other:?}"),
    }

    // The image starts where sbmon looks: found, and its thread count is over the warning.
    let image = Image::start(Setup {
        listen: Listen::At(socket.clone()),
        forms: vec![sleeper("journal-worker")],
        allow: control(),
        ..Setup::default()
    })
    .await;

    // As it happens: the resource is updated, and the warning comes as a log message.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut updated, mut logged) = (false, None::<Value>);
    let mut levels = Vec::new();
    while !(updated && logged.is_some()) {
        let next = tokio::time::timeout_at(deadline, heard.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("not heard in time: updated {updated}, logged {logged:?}, levels {levels:?}")
            })
            .expect("the client is listening");
        match next {
            Heard::Updated(uri) => {
                assert_eq!(uri, "sbmon://events");
                updated = true;
            }
            Heard::Log(level, data) => {
                levels.push(level);
                if data["kind"] == "health.threads.count" {
                    assert_eq!(level, LoggingLevel::Warning, "{data}");
                    logged = Some(data);
                }
            }
        }
    }
    let logged = logged.unwrap();
    assert_eq!(logged["target"], "app");
    assert_eq!(logged["severity"], "warning");
    // Only warning and critical events are logged at level warning (target.found is info).
    assert!(
        levels
            .iter()
            .all(|l| matches!(l, LoggingLevel::Warning | LoggingLevel::Critical)),
        "{levels:?}"
    );

    // The same event through the tool, with the figures behind it.
    let events = recent(&client, json!({"kind": "health", "severity": "warning"})).await;
    let change = events
        .iter()
        .find(|e| e["kind"] == "health.threads.count")
        .unwrap_or_else(|| panic!("no threads.count change in {events:?}"));
    assert_eq!(change["seq"], logged["seq"]);
    assert_eq!(change["data"]["from"], "healthy");
    assert_eq!(change["data"]["to"], "degraded");
    assert_eq!(change["data"]["warning"], 2.0);
    let observed = change["data"]["observed"].as_f64().expect("observed");
    let lisp_threads = call(&client, "thread_list", json!({"target": "app"}))
        .await
        .structured_content
        .expect("thread_list")["threads"]
        .as_array()
        .expect("threads")
        .len() as f64;
    assert!(
        observed >= 2.0 && (observed - lisp_threads).abs() <= 2.0,
        "observed {observed}, thread_list {lisp_threads}"
    );
    // Lost before the image started, found once it answered, in that order.
    let lost = recent(&client, json!({"kind": "target.lost"})).await;
    assert_eq!(lost[0]["severity"], "critical", "{lost:?}");
    let found = recent(&client, json!({"kind": "target.found", "target": "app"})).await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["data"]["pid"], image.pid());
    assert!(lost[0]["seq"].as_u64() < found[0]["seq"].as_u64());
    assert!(found[0]["seq"].as_u64() < change["seq"].as_u64());
    // A degraded check that stays degraded is not news again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        recent(&client, json!({"kind": "health.threads.count"}))
            .await
            .len(),
        1
    );

    // The resource holds it too.
    let read = client
        .read_resource(ReadResourceRequestParams::new("sbmon://events"))
        .await
        .expect("read sbmon://events");
    let text = match &read.contents[0] {
        ResourceContents::TextResourceContents { text, .. } => text.clone(),
        other => panic!("not text: {other:?}"),
    };
    let journal: Value = serde_json::from_str(&text).expect("JSON");
    assert!(
        journal["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["seq"] == change["seq"]),
        "{journal}"
    );

    // And GET /monitoring/events, with the same filters.
    let (status, body) = sbmon
        .get("/monitoring/events?kind=health&severity=warning&target=app")
        .await;
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        page["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["seq"] == change["seq"]),
        "{page}"
    );
    let since = change["seq"].as_u64().unwrap();
    let (_, body) = sbmon
        .get(&format!(
            "/monitoring/events?since={since}&kind=health.threads.count"
        ))
        .await;
    let after: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(after["events"], json!([]), "{after}");
    assert_eq!(after["next_since"], since);

    // A control action is an event with who, what and how it went.
    let gc = call(&client, "memory_gc", json!({"target": "app"})).await;
    assert_eq!(gc.is_error, Some(false), "{gc:?}");
    let actions = wait_for_events(&client, json!({"kind": "control"})).await;
    assert_eq!(actions.len(), 1, "{actions:?}");
    let action = &actions[0];
    assert_eq!(action["kind"], "control.memory_gc");
    assert_eq!(action["target"], "app");
    assert_eq!(action["severity"], "info");
    assert_eq!(action["data"]["front_end"], "mcp");
    assert_eq!(action["data"]["outcome"], "ok");
    assert_eq!(action["data"]["arguments"]["target"], "app");

    // Bad filters are usage errors that say what is wrong.
    for (filter, says) in [
        (json!({"severity": "error"}), "unknown variant"),
        (json!({"limit": 0}), "limit must be 1..1000"),
        (json!({"kind": "no such kind!"}), "kind must be"),
        (json!({"sinse": 3}), "unknown field"),
    ] {
        let result = call(&client, "events_recent", filter.clone()).await;
        assert_eq!(result.is_error, Some(true), "{filter}");
        let text = format!("{:?}", result.content);
        assert!(text.contains(says), "{filter}: {text}");
    }
    for (query, says) in [
        ("severity=error", "unknown variant"),
        ("limit=5000", "limit must be 1..1000"),
        ("since=x", "since"),
        ("sinse=1", "unknown field"),
    ] {
        let (status, body) = sbmon.get(&format!("/monitoring/events?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body.contains(says) && body.contains("severity=info|warning|critical"),
            "{query}: {body}"
        );
    }
    client.cancel().await.expect("close the session");
}

#[tokio::test]
async fn a_2026_client_listens_and_the_event_stream_carries_the_journal() {
    let image = Image::start(Setup {
        allow: control(),
        ..Setup::default()
    })
    .await;
    let sbmon = serve(&image.sbcl.address.to_string(), None, true);
    let url = format!("{}/mcp", sbmon.base);
    let client = ()
        .serve_with_lifecycle(
            StreamableHttpClientTransport::from_uri(url.as_str()),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .expect("MCP discover (2026-07-28)");
    let info = client.peer_info().expect("server info");
    assert_eq!(info.protocol_version, ProtocolVersion::V_2026_07_28);
    assert!(
        info.capabilities.logging.is_none(),
        "2026: logging not offered"
    );
    // Logging is deprecated in this era: refused, with where to look instead.
    match client
        .set_level(SetLevelRequestParams::new(LoggingLevel::Info))
        .await
    {
        Err(ServiceError::McpError(e)) => {
            assert_eq!(e.code, ErrorCode::METHOD_NOT_FOUND);
            assert!(e.message.contains("sbmon://events"), "{e:?}");
        }
        other => panic!("logging/setLevel on 2026-07-28: {other:?}"),
    }
    let mut subscription = client
        .listen(
            SubscriptionFilter::builder()
                .resource_subscription("sbmon://events")
                .build(),
        )
        .await
        .expect("subscriptions/listen");
    assert_eq!(
        subscription.acknowledged().resource_subscriptions,
        Some(vec!["sbmon://events".to_string()])
    );

    // The SSE stream, open before the action.
    let mut stream = reqwest::get(format!("{}/events?target=app", sbmon.base))
        .await
        .expect("GET /events");
    assert_eq!(stream.status(), 200);
    // Let the stream's subscriptions start before the action it must carry.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let gc = call(&client, "memory_gc", json!({"target": "app"})).await;
    assert_eq!(gc.is_error, Some(false), "{gc:?}");

    let deadline = tokio::time::Instant::now() + WAIT;
    let note = tokio::time::timeout_at(deadline, subscription.next())
        .await
        .expect("an update in time")
        .expect("the subscription")
        .expect("a notification");
    match note {
        ServerNotification::ResourceUpdatedNotification(n) => {
            assert_eq!(n.params.uri, "sbmon://events")
        }
        other => panic!("not a resource update: {other:?}"),
    }

    let mut seen = String::new();
    let action = loop {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .unwrap_or_else(|_| panic!("no journal event on /events: {seen}"))
            .expect("read /events")
            .expect("the stream is open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
        let found = seen.split("\n\n").find_map(|block| {
            let data = block.strip_prefix("event: journal\ndata: ")?;
            let event: Value = serde_json::from_str(data).ok()?;
            (event["kind"] == "control.memory_gc").then_some(event)
        });
        if let Some(event) = found {
            break event;
        }
    };
    assert_eq!(action["target"], "app");
    assert_eq!(action["data"]["outcome"], "ok");
    assert_eq!(action["data"]["front_end"], "mcp");
    let events = recent(&client, json!({"kind": "control.memory_gc"})).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["seq"], action["seq"]);
    subscription.cancel().await.expect("end the subscription");
    drop(image);
}
