//! What can go wrong talking to an agent, worded so the user knows what to do next.

use std::time::Duration;

use crate::wire::DecodeError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error(
        "cannot connect to the agent at {address}: {reason}. Is the SBCL image running and \
         has it called (sbmon-agent:start)? `sbmon targets` lists the agents found"
    )]
    Connect { address: String, reason: String },
    #[error("the agent refused the connection: {0}")]
    Refused(String),
    #[error("handshake with the agent failed: {0}")]
    Handshake(String),
    #[error(
        "the agent did not answer {op} within {timeout:?}; the image may be busy, stopped or hung"
    )]
    Timeout { op: String, timeout: Duration },
    #[error(
        "lost the connection to the agent: {0}; it reconnects on the next call once the image is back"
    )]
    Lost(String),
    #[error(
        "the agent in the image refuses this operation: {0}. sbmon's --allow only decides which \
         tools sbmon offers; the agent serves what its own (sbmon-agent:start :allow ...) names"
    )]
    NotAllowed(String),
    #[error(
        "the SBCL image exited (pid {pid}); the agent said goodbye before it went. It answers \
         again once the image is restarted"
    )]
    ImageExited { pid: i32 },
    #[error("the agent reported {kind}: {message}")]
    Remote {
        kind: String,
        message: String,
        backtrace: Vec<String>,
    },
    #[error("the agent broke the protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl AgentError {
    /// True when the agent could not be reached at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            AgentError::Connect { .. }
                | AgentError::Refused(_)
                | AgentError::Handshake(_)
                | AgentError::Timeout { .. }
                | AgentError::Lost(_)
                | AgentError::ImageExited { .. }
        )
    }
}
