//! One live connection to an agent: handshake, many calls in flight matched by id, a timeout
//! per call, pushed events. A dead connection fails its pending calls at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::error::{AgentError, RemoteKind};
use super::ops::{CapturedOutput, Operation, SubscribeRequest};
use super::reply::Welcome;
use crate::wire::{FrameCodec, Sexp, from_sexp};

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Sexp, AgentError>>>>>;

/// Events are few (one per GC); a slow listener loses the oldest, never blocks the reader.
const EVENT_BACKLOG: usize = 256;
/// Outgoing messages queued before callers wait.
const OUTBOX: usize = 64;

pub struct Connection {
    outbox: mpsc::Sender<Sexp>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
    events: broadcast::Sender<(String, Sexp)>,
    welcome: Welcome,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Connection {
    /// Perform the handshake on a fresh stream and start the reader and writer tasks.
    pub async fn establish<S>(
        stream: S,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Connection, AgentError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read_half, write_half) = tokio::io::split(stream);
        let mut reader = FramedRead::new(read_half, FrameCodec::default());
        let mut writer = FramedWrite::new(write_half, FrameCodec::default());

        let mut hello = vec![
            ("protocol", Sexp::Int(1)),
            (
                "client",
                Sexp::string(concat!("sbmon ", env!("CARGO_PKG_VERSION"))),
            ),
        ];
        if let Some(token) = token {
            hello.push(("token", Sexp::string(token)));
        }
        let mut message = vec![Sexp::keyword("hello")];
        if let Some(items) = Sexp::plist(hello).as_list() {
            message.extend_from_slice(items);
        }
        let handshake = async {
            writer
                .send(Sexp::List(message))
                .await
                .map_err(|e| AgentError::Handshake(e.to_string()))?;
            match reader.next().await {
                Some(Ok(reply)) => Ok(reply),
                Some(Err(e)) => Err(AgentError::Handshake(e.to_string())),
                None => Err(AgentError::Handshake(
                    "the agent closed the connection before answering".into(),
                )),
            }
        };
        let reply = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| AgentError::Handshake(format!("no welcome within {timeout:?}")))??;
        let welcome = parse_welcome(&reply)?;

        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (outbox, mut outbox_rx) = mpsc::channel::<Sexp>(OUTBOX);

        let writer_task = {
            let closed = closed.clone();
            tokio::spawn(async move {
                while let Some(message) = outbox_rx.recv().await {
                    if let Err(e) = writer.send(message).await {
                        tracing::debug!("agent write failed: {e}");
                        break;
                    }
                }
                closed.store(true, Ordering::SeqCst);
            })
        };
        let reader_task = {
            let (pending, closed, events) = (pending.clone(), closed.clone(), events.clone());
            let pid = welcome.pid;
            tokio::spawn(async move {
                let error = loop {
                    match reader.next().await {
                        Some(Ok(message)) => {
                            if let Some(error) = dispatch(message, pid, &pending, &events) {
                                break error;
                            }
                        }
                        Some(Err(e)) => break AgentError::Lost(e.to_string()),
                        None => break AgentError::Lost("the agent closed the connection".into()),
                    }
                };
                tracing::debug!("agent connection ended: {error}");
                closed.store(true, Ordering::SeqCst);
                let waiting: Vec<_> = lock(&pending).drain().collect();
                for (_, tx) in waiting {
                    let _ = tx.send(Err(error.clone()));
                }
            })
        };

        Ok(Connection {
            outbox,
            pending,
            next_id: AtomicU64::new(1),
            closed,
            events,
            welcome,
            tasks: [writer_task, reader_task],
        })
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Pushed events as (kind, value); subscribe with the `:subscribe` operation first.
    pub fn events(&self) -> broadcast::Receiver<(String, Sexp)> {
        self.events.subscribe()
    }

    /// Have the agent push events of the kinds `request` names on this connection (they
    /// arrive through [`Connection::events`]).
    pub async fn subscribe(
        &self,
        request: &SubscribeRequest,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        self.call(SubscribeRequest::OP, request.args(), timeout)
            .await
            .map(drop)
    }

    /// Send `(:call ID OP ARGS)` and wait for its `(:return ID ...)`.
    pub async fn call(&self, op: &str, args: Sexp, timeout: Duration) -> Result<Sexp, AgentError> {
        if self.is_closed() {
            return Err(AgentError::Lost("connection already closed".into()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        // Removes the entry however this call ends (timeout, error, caller dropped).
        let _guard = PendingGuard {
            pending: &self.pending,
            id,
        };
        let message = Sexp::List(vec![
            Sexp::keyword("call"),
            Sexp::Int(id as i64),
            Sexp::keyword(op),
            args,
        ]);
        let exchange = async {
            self.outbox
                .send(message)
                .await
                .map_err(|_| AgentError::Lost("connection closed".into()))?;
            rx.await
                .map_err(|_| AgentError::Lost("connection closed".into()))?
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(AgentError::Timeout {
                op: op.to_string(),
                timeout,
            }),
        }
    }
}

struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.id);
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not wedge every later call: the map stays consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn parse_welcome(reply: &Sexp) -> Result<Welcome, AgentError> {
    let items = reply.as_list().unwrap_or_default();
    let body = Sexp::List(items.iter().skip(1).cloned().collect());
    match items.first().and_then(Sexp::as_keyword) {
        Some("welcome") => {
            let welcome: Welcome =
                from_sexp(&body).map_err(|e| AgentError::Handshake(e.to_string()))?;
            if welcome.protocol != 1 {
                return Err(AgentError::Handshake(format!(
                    "agent speaks protocol {}, sbmon speaks 1",
                    welcome.protocol
                )));
            }
            Ok(welcome)
        }
        Some("bye") => Err(AgentError::Refused(
            body.get("reason")
                .and_then(Sexp::as_str)
                .unwrap_or("no reason given")
                .to_string(),
        )),
        _ => Err(AgentError::Handshake(format!(
            "unexpected greeting {reply}"
        ))),
    }
}

/// The agent's goodbye when its image exits (docs/protocol.md, "The image exiting").
const IMAGE_EXITING: &str = "image exiting";

/// Handle one message from the agent (of image `pid`); returns the error that ends the
/// connection when the agent said goodbye.
fn dispatch(
    message: Sexp,
    pid: i32,
    pending: &Pending,
    events: &broadcast::Sender<(String, Sexp)>,
) -> Option<AgentError> {
    let items = message.as_list().unwrap_or_default();
    match (items.first().and_then(Sexp::as_keyword), items) {
        (Some("return"), [_, Sexp::Int(id), outcome]) => {
            // None: the caller gave up (timeout) before the reply came.
            if let Some(tx) = lock(pending).remove(&(*id as u64)) {
                let _ = tx.send(decode_outcome(outcome, pid));
            }
        }
        (Some("event"), [_, Sexp::Keyword(kind), value]) => {
            let _ = events.send((kind.clone(), value.clone()));
        }
        (Some("bye"), [_, rest @ ..]) => {
            let reason = Sexp::List(rest.to_vec())
                .get("reason")
                .and_then(Sexp::as_str)
                .unwrap_or("no reason given")
                .to_string();
            return Some(if reason == IMAGE_EXITING {
                AgentError::ImageExited { pid }
            } else {
                AgentError::Lost(format!("the agent closed the connection: {reason}"))
            });
        }
        _ => tracing::warn!("ignoring unexpected message from agent: {message}"),
    }
    None
}

fn decode_outcome(outcome: &Sexp, pid: i32) -> Result<Sexp, AgentError> {
    match outcome.as_list() {
        Some([Sexp::Keyword(k), value]) if k == "ok" => Ok(value.clone()),
        Some([Sexp::Keyword(k), details @ ..]) if k == "error" => {
            let details = Sexp::List(details.to_vec());
            let text = |key| {
                details
                    .get(key)
                    .and_then(Sexp::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let kind = RemoteKind::parse(&text("type"));
            match kind {
                RemoteKind::NotAllowed => return Err(AgentError::NotAllowed(text("message"))),
                // An evaluation that ended because the image is exiting.
                RemoteKind::ImageExiting => return Err(AgentError::ImageExited { pid }),
                _ => {}
            }
            let backtrace = details
                .get("backtrace")
                .and_then(Sexp::as_list)
                .unwrap_or_default()
                .iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            // :eval and :reload-system send what the code wrote before it failed.
            let output = details
                .get("output")
                .and_then(Sexp::as_str)
                .map(|text| CapturedOutput {
                    text: text.to_string(),
                    truncated: matches!(details.get("output-truncated"), Some(Sexp::T)),
                });
            Err(AgentError::Remote {
                kind,
                message: text("message"),
                backtrace,
                output,
            })
        }
        _ => Err(AgentError::Protocol(format!("malformed return {outcome}"))),
    }
}
