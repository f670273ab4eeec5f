//! The client side of the agent protocol. `AgentClient` is a long-lived handle to one agent:
//! it connects on first use, reconnects after the agent comes back, and offers typed calls.

pub mod address;
pub mod connection;
pub mod error;
pub mod ops;
pub mod reply;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

pub use address::Address;
pub use connection::Connection;
pub use error::{AgentError, RemoteKind};

use crate::histogram::Histogram;
use crate::wire::{Sexp, from_sexp};
use ops::{
    EvalFailure, EvalOutcome, EvalRequest, GcRunRequest, GcTuneRequest, HeapHistogramRequest,
    HeapRetainersRequest, KillThreadRequest, Operation, ProfileRequest, ReloadRequest,
};

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Default time a call may take; slow operations pass their own.
    pub call_timeout: Duration,
    pub connect_timeout: Duration,
    /// Token for TCP agents; when `None`, read from `token_file` at connect time.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            token: None,
            token_file: None,
        }
    }
}

/// `~/.sbmon-secret`, where the agent keeps the TCP token.
pub fn default_token_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".sbmon-secret"))
}

/// The agent bounds a slow call by `timeout_ms`; allow for transfer and scheduling on top.
pub fn bounded_by(timeout_ms: u64) -> Duration {
    Duration::from_millis(timeout_ms) + Duration::from_secs(2)
}

/// The agent runs at most this many slow operations per connection and answers BUSY beyond
/// (docs/protocol.md); callers past it queue here instead.
const SLOW_IN_FLIGHT: usize = 4;

pub struct AgentClient {
    address: Address,
    options: ClientOptions,
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
    slow: tokio::sync::Semaphore,
    /// Round trips of answered calls, for `sbmon_agent_rtt_seconds`.
    rtt: Histogram,
}

impl AgentClient {
    pub fn new(address: Address, options: ClientOptions) -> Self {
        AgentClient {
            address,
            options,
            current: tokio::sync::Mutex::new(None),
            slow: tokio::sync::Semaphore::new(SLOW_IN_FLIGHT),
            rtt: Histogram::default(),
        }
    }

    pub fn address(&self) -> &Address {
        &self.address
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Round trips of the calls the agent answered so far.
    pub fn rtt(&self) -> &Histogram {
        &self.rtt
    }

    /// The live connection, opening a new one if there is none or the last one died.
    pub async fn connection(&self) -> Result<Arc<Connection>, AgentError> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref().filter(|c| !c.is_closed()) {
            return Ok(conn.clone());
        }
        *current = None;
        let conn = Arc::new(self.connect().await?);
        *current = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self) -> Result<Connection, AgentError> {
        let failed = |reason: String| AgentError::Connect {
            address: self.address.to_string(),
            reason,
        };
        let timeout = self.options.connect_timeout;
        match &self.address {
            Address::Unix(path) => {
                let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| failed(format!("no answer within {timeout:?}")))?
                    .map_err(|e| failed(e.to_string()))?;
                Connection::establish(stream, None, timeout).await
            }
            Address::Tcp { host, port } => {
                // Connect even without a token: what answers may not be an agent at all.
                let token = self.token();
                let stream = tokio::time::timeout(
                    timeout,
                    tokio::net::TcpStream::connect((host.as_str(), *port)),
                )
                .await
                .map_err(|_| failed(format!("no answer within {timeout:?}")))?
                .map_err(|e| failed(e.to_string()))?;
                stream
                    .set_nodelay(true)
                    .map_err(|e| failed(e.to_string()))?;
                match Connection::establish(stream, token.as_deref().ok(), timeout).await {
                    Ok(connection) => Ok(connection),
                    // An agent always says why it hangs up; a Swank server hangs up silently
                    // on a message it does not know. Ask it something harmless to be sure.
                    Err(AgentError::Handshake(reason))
                        if reason.contains("closed the connection")
                            && crate::swank::answers_at(host, *port, timeout).await =>
                    {
                        Err(AgentError::Swank {
                            address: self.address.to_string(),
                            swank: format!("{host}:{port}"),
                        })
                    }
                    Err(e) => match token {
                        Err(reason) => Err(failed(reason)),
                        Ok(_) => Err(e),
                    },
                }
            }
        }
    }

    fn token(&self) -> Result<String, String> {
        if let Some(token) = &self.options.token {
            return Ok(token.clone());
        }
        let path = self
            .options
            .token_file
            .clone()
            .or_else(default_token_file)
            .ok_or("no token file: set HOME or pass --token-file")?;
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(|e| {
                format!(
                    "cannot read the token from {}: {e} (a TCP agent needs it)",
                    path.display()
                )
            })
    }

    /// Call `op` with `args` and return the raw value.
    pub async fn call_raw(
        &self,
        op: &str,
        args: Sexp,
        timeout: Option<Duration>,
    ) -> Result<Sexp, AgentError> {
        let timeout = timeout.unwrap_or(self.options.call_timeout);
        let conn = tokio::time::timeout(timeout, self.connection())
            .await
            .map_err(|_| AgentError::Timeout {
                op: op.to_string(),
                timeout,
            })??;
        let start = std::time::Instant::now();
        let value = conn.call(op, args, timeout).await?;
        self.rtt.observe(start.elapsed());
        Ok(value)
    }

    /// Call `op` and decode its value into `T`. Private: callers outside the agent layer use
    /// the typed methods, so only this layer knows operation names and argument keys.
    async fn call<T: DeserializeOwned>(
        &self,
        op: &str,
        args: Sexp,
        timeout: Option<Duration>,
    ) -> Result<T, AgentError> {
        let value = self.call_raw(op, args, timeout).await?;
        Ok(from_sexp(&value)?)
    }

    pub async fn welcome(&self) -> Result<reply::Welcome, AgentError> {
        Ok(self.connection().await?.welcome().clone())
    }

    pub async fn memory(&self) -> Result<reply::Memory, AgentError> {
        self.call("memory", Sexp::Nil, None).await
    }

    pub async fn gc(&self) -> Result<reply::Gc, AgentError> {
        self.call("gc", Sexp::Nil, None).await
    }

    pub async fn runtime(&self) -> Result<reply::Runtime, AgentError> {
        self.call("runtime", Sexp::Nil, None).await
    }

    pub async fn threads(&self) -> Result<Vec<reply::LispThread>, AgentError> {
        self.call("threads", Sexp::Nil, None).await
    }

    /// Round trip of a `:ping`.
    pub async fn ping(&self) -> Result<Duration, AgentError> {
        let start = std::time::Instant::now();
        self.call_raw("ping", Sexp::Nil, None).await?;
        Ok(start.elapsed())
    }

    /// One thread's backtrace; the call waits a little longer than the agent's own timeout.
    pub async fn backtrace(
        &self,
        tid: i32,
        max_frames: u32,
        timeout_ms: u64,
    ) -> Result<reply::Backtrace, AgentError> {
        let args = Sexp::plist([
            ("tid", Sexp::Int(tid.into())),
            ("max-frames", Sexp::Int(max_frames.into())),
            ("timeout-ms", Sexp::Int(timeout_ms as i64)),
        ]);
        self.slow_call("backtrace", args, bounded_by(timeout_ms))
            .await
    }

    pub async fn backtraces(
        &self,
        max_frames: u32,
        timeout_ms: u64,
    ) -> Result<Vec<reply::Backtrace>, AgentError> {
        let args = Sexp::plist([
            ("max-frames", Sexp::Int(max_frames.into())),
            ("timeout-ms", Sexp::Int(timeout_ms as i64)),
        ]);
        self.slow_call("backtraces", args, bounded_by(timeout_ms))
            .await
    }

    /// `:gc-run`: collect and report the heap before and after.
    pub async fn gc_run(&self, request: GcRunRequest) -> Result<reply::GcRun, AgentError> {
        self.slow_call(GcRunRequest::OP, request.args(), GcRunRequest::TIMEOUT)
            .await
    }

    /// `:gc-tune` (a fast operation): set GC parameters, report them before and after.
    pub async fn gc_tune(&self, request: &GcTuneRequest) -> Result<reply::GcTune, AgentError> {
        self.call(GcTuneRequest::OP, request.args(), None).await
    }

    /// `:kill-thread`: terminate a thread and wait for it to end.
    pub async fn kill_thread(
        &self,
        request: KillThreadRequest,
    ) -> Result<reply::KilledThread, AgentError> {
        self.slow_call(KillThreadRequest::OP, request.args(), request.timeout())
            .await
    }

    /// `:profile`: a statistical profile of the whole image.
    pub async fn profile(&self, request: ProfileRequest) -> Result<reply::Profile, AgentError> {
        self.slow_call(ProfileRequest::OP, request.args(), request.timeout())
            .await
    }

    /// `:eval`. Code that signals an error or runs out of time is an [`EvalOutcome::Failed`]
    /// with what it printed; only a call the agent refused (a bad argument, too many calls in
    /// flight) or could not make is an `Err`.
    pub async fn eval(&self, request: &EvalRequest) -> Result<EvalOutcome, AgentError> {
        match self
            .slow_call(EvalRequest::OP, request.args(), request.timeout())
            .await
        {
            Ok(evaluation) => Ok(EvalOutcome::Done(evaluation)),
            Err(AgentError::Remote {
                kind,
                message,
                backtrace,
                output,
            }) if !matches!(kind, RemoteKind::BadArgument | RemoteKind::Busy) => {
                Ok(EvalOutcome::Failed(EvalFailure {
                    kind,
                    message,
                    backtrace,
                    output: output.unwrap_or_default(),
                }))
            }
            Err(e) => Err(e),
        }
    }

    /// `:reload-system`: load an ASDF system (which runs its code).
    pub async fn reload_system(
        &self,
        request: &ReloadRequest,
    ) -> Result<reply::Reload, AgentError> {
        self.slow_call(ReloadRequest::OP, request.args(), ReloadRequest::TIMEOUT)
            .await
    }

    /// `:heap-histogram`: the heap's live objects by type, or their change since a snapshot.
    pub async fn heap_histogram(
        &self,
        request: HeapHistogramRequest,
    ) -> Result<reply::HeapHistogram, AgentError> {
        self.slow_call(HeapHistogramRequest::OP, request.args(), request.timeout())
            .await
    }

    /// `:heap-retainers`: what keeps a sample of one type's objects alive (runs a full GC).
    pub async fn heap_retainers(
        &self,
        request: &HeapRetainersRequest,
    ) -> Result<reply::HeapRetainers, AgentError> {
        self.slow_call(HeapRetainersRequest::OP, request.args(), request.timeout())
            .await
    }

    /// A call the agent runs on a worker thread; it waits `timeout` once its turn comes.
    async fn slow_call<T: DeserializeOwned>(
        &self,
        op: &str,
        args: Sexp,
        timeout: Duration,
    ) -> Result<T, AgentError> {
        let _permit = self
            .slow
            .acquire()
            .await
            .map_err(|_| AgentError::Lost("client closed".into()))?;
        self.call(op, args, Some(timeout)).await
    }
}

/// Runs `read` (a /proc read of some tens of µs) while the agent call `call` is in flight.
///
/// The call is polled first and queues its request; `read` waits one scheduler turn, in which
/// the connection's writer sends that request, and then runs on this task while the agent
/// works, so the two costs overlap instead of adding up.
pub async fn alongside<A, R>(call: impl Future<Output = A>, read: impl FnOnce() -> R) -> (A, R) {
    tokio::join!(call, async {
        tokio::task::yield_now().await;
        read()
    })
}
