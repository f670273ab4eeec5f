//! What can go wrong talking to an agent, worded so the user knows what to do next.

use std::time::Duration;

use crate::wire::DecodeError;

use super::ops::CapturedOutput;

/// The `:type` of an agent's error reply (docs/protocol.md, "Messages"): the agent's own
/// kinds, or the type name of a Lisp condition that evaluated code signalled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteKind {
    UnknownOperation,
    BadArgument,
    UnknownThread,
    /// Too many slow calls in flight on the connection, or a second profile.
    Busy,
    /// The reply would not fit in a frame.
    TooLarge,
    /// A thread that must not be killed.
    Refused,
    /// An evaluation ran out of time and was stopped.
    Timeout,
    /// The evaluation thread ended without a result.
    Aborted,
    MissingSystem,
    /// sb-sprof or ASDF cannot be loaded.
    Unavailable,
    NotAllowed,
    ImageExiting,
    /// A Lisp condition's type name, such as `SIMPLE-ERROR`.
    Lisp(String),
}

impl RemoteKind {
    /// Every kind of the agent's own, with its spelling on the wire.
    const AGENT_KINDS: [(RemoteKind, &'static str); 12] = [
        (RemoteKind::UnknownOperation, "UNKNOWN-OPERATION"),
        (RemoteKind::BadArgument, "BAD-ARGUMENT"),
        (RemoteKind::UnknownThread, "UNKNOWN-THREAD"),
        (RemoteKind::Busy, "BUSY"),
        (RemoteKind::TooLarge, "TOO-LARGE"),
        (RemoteKind::Refused, "REFUSED"),
        (RemoteKind::Timeout, "TIMEOUT"),
        (RemoteKind::Aborted, "ABORTED"),
        (RemoteKind::MissingSystem, "MISSING-SYSTEM"),
        (RemoteKind::Unavailable, "UNAVAILABLE"),
        (RemoteKind::NotAllowed, "NOT-ALLOWED"),
        (RemoteKind::ImageExiting, "IMAGE-EXITING"),
    ];

    /// The kind the agent's `:type` string names; any other name is a Lisp condition type.
    pub fn parse(name: &str) -> RemoteKind {
        Self::AGENT_KINDS
            .iter()
            .find(|(_, wire)| *wire == name)
            .map_or_else(|| RemoteKind::Lisp(name.to_string()), |(k, _)| k.clone())
    }

    /// The name as the agent spells it.
    pub fn as_str(&self) -> &str {
        match self {
            RemoteKind::Lisp(name) => name,
            known => Self::AGENT_KINDS
                .iter()
                .find(|(k, _)| k == known)
                .map_or("", |(_, wire)| wire),
        }
    }
}

impl std::fmt::Display for RemoteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error(
        "cannot connect to the agent at {address}: {reason}. Is the SBCL image running and \
         has it called (sbmon-agent:start)? `sbmon targets` lists the agents found"
    )]
    Connect { address: String, reason: String },
    #[error(
        "{address} is a Swank server (SLIME), not an sbmon agent: load the agent into that \
         image with `sbmon attach --swank {swank}`, then use the target it prints"
    )]
    Swank { address: String, swank: String },
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
        kind: RemoteKind,
        message: String,
        backtrace: Vec<String>,
        /// What an evaluation (or a system load) wrote before it failed, when the agent sent
        /// it (`:output` and `:output-truncated` of the error reply).
        output: Option<CapturedOutput>,
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
                | AgentError::Swank { .. }
                | AgentError::Refused(_)
                | AgentError::Handshake(_)
                | AgentError::Timeout { .. }
                | AgentError::Lost(_)
                | AgentError::ImageExited { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_read_and_print_as_the_agent_spells_them() {
        for (kind, wire) in RemoteKind::AGENT_KINDS {
            assert_eq!(RemoteKind::parse(wire), kind);
            assert_eq!(kind.to_string(), wire);
        }
        let lisp = RemoteKind::parse("DIVISION-BY-ZERO");
        assert_eq!(lisp, RemoteKind::Lisp("DIVISION-BY-ZERO".into()));
        let e = AgentError::Remote {
            kind: RemoteKind::BadArgument,
            message: ":tid must be an integer".into(),
            backtrace: vec![],
            output: None,
        };
        assert_eq!(
            e.to_string(),
            "the agent reported BAD-ARGUMENT: :tid must be an integer"
        );
    }
}
