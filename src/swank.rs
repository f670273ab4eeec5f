//! A small client of SLIME's Swank server, enough to evaluate forms in a running image:
//! `sbmon attach` loads and starts the agent through it, `sbmon detach` stops it.
//!
//! The wire format is Swank's (SLIME 2.27, Debian's `cl-swank`): each message is 6 hex digits
//! giving the payload's length in UTF-8 octets, then the payload, one s-expression. When the
//! image has a `~/.slime-secret`, the first frame a client sends must be that file's first line,
//! raw (not a Lisp string). A request is `(:emacs-rex FORM PACKAGE THREAD ID)`; its answer is
//! `(:return (:ok VALUE) ID)` or `(:return (:abort REASON) ID)`, possibly after other messages
//! (`:new-features`, `:indentation-update`, `:write-string`), which are skipped unread.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::Sexp;

/// Messages from Swank larger than this are refused (the indentation update of a big image
/// is about 100 KB).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SwankError {
    #[error(
        "cannot connect to a Swank server at {addr}: {reason}. Is the image running, and did it \
         call (swank:create-server :port PORT :dont-close t)?"
    )]
    Connect { addr: String, reason: String },
    #[error(
        "the Swank server at {addr} did not answer within {timeout:?}. {secret_hint} (after a \
         wrong secret, SLIME 2.27's listener stops accepting connections), or the image is too \
         busy to answer"
    )]
    NoAnswer {
        addr: String,
        timeout: Duration,
        secret_hint: String,
    },
    #[error(
        "{addr} is an sbmon agent, not a Swank server: watch it directly with \
         --target tcp:{addr}"
    )]
    IsAgent { addr: String },
    #[error("the Swank server at {addr} closed the connection: {detail}")]
    Closed { addr: String, detail: String },
    #[error("the Swank server at {addr} broke the protocol: {detail}")]
    Protocol { addr: String, detail: String },
    #[error("the image aborted the evaluation: {0}")]
    Aborted(String),
    #[error("cannot read the Swank secret {path}: {reason}")]
    Secret { path: String, reason: String },
}

/// `~/.slime-secret`, where SLIME and Swank keep the shared secret.
pub fn default_secret_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".slime-secret"))
}

/// The secret as Swank compares it: the first line of the file, without its newline.
pub fn read_secret(path: &Path) -> Result<String, SwankError> {
    let text = std::fs::read(path).map_err(|e| SwankError::Secret {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let text = String::from_utf8_lossy(&text);
    Ok(text.split('\n').next().unwrap_or_default().to_string())
}

/// Where the secret comes from: `explicit` (which must be readable), else `~/.slime-secret`
/// when it exists, as SLIME does.
pub fn secret_from(explicit: Option<&Path>) -> Result<Option<(String, PathBuf)>, SwankError> {
    match explicit {
        Some(path) => Ok(Some((read_secret(path)?, path.to_path_buf()))),
        None => match default_secret_file().filter(|p| p.exists()) {
            Some(path) => Ok(Some((read_secret(&path)?, path))),
            None => Ok(None),
        },
    }
}

/// One connection to a Swank server.
pub struct Swank {
    stream: TcpStream,
    addr: String,
    next_id: u64,
    /// Which secret was sent, for error messages.
    secret_file: Option<PathBuf>,
}

impl Swank {
    /// Connect to `host:port`, sending `secret` first when given.
    pub async fn connect(
        host: &str,
        port: u16,
        secret: Option<(String, PathBuf)>,
        timeout: Duration,
    ) -> Result<Swank, SwankError> {
        let addr = format!("{host}:{port}");
        let failed = |reason: String| SwankError::Connect {
            addr: addr.clone(),
            reason,
        };
        let stream = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| failed(format!("no answer within {timeout:?}")))?
            .map_err(|e| failed(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut swank = Swank {
            stream,
            addr: addr.clone(),
            next_id: 0,
            secret_file: None,
        };
        if let Some((secret, file)) = secret {
            swank.send_raw(&secret).await?;
            swank.secret_file = Some(file);
        }
        Ok(swank)
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn send_raw(&mut self, payload: &str) -> Result<(), SwankError> {
        let frame = frame(payload).ok_or_else(|| SwankError::Protocol {
            addr: self.addr.clone(),
            detail: "message too long for a Swank frame".into(),
        })?;
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| SwankError::Closed {
                addr: self.addr.clone(),
                detail: e.to_string(),
            })
    }

    /// The next message, as text.
    async fn read_message(&mut self) -> Result<String, SwankError> {
        let closed = |e: std::io::Error| SwankError::Closed {
            addr: self.addr.clone(),
            detail: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "end of file before an answer".into()
            } else {
                e.to_string()
            },
        };
        let mut header = [0u8; 6];
        self.stream.read_exact(&mut header).await.map_err(closed)?;
        let len = std::str::from_utf8(&header)
            .ok()
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .ok_or_else(|| SwankError::Protocol {
                addr: self.addr.clone(),
                detail: format!("bad header {:?}", String::from_utf8_lossy(&header)),
            })?;
        if len > MAX_MESSAGE {
            return Err(SwankError::Protocol {
                addr: self.addr.clone(),
                detail: format!("message of {len} bytes (limit {MAX_MESSAGE})"),
            });
        }
        let mut payload = vec![0u8; len];
        let closed = |e: std::io::Error| SwankError::Closed {
            addr: self.addr.clone(),
            detail: e.to_string(),
        };
        self.stream.read_exact(&mut payload).await.map_err(closed)?;
        String::from_utf8(payload).map_err(|_| SwankError::Protocol {
            addr: self.addr.clone(),
            detail: "message is not valid UTF-8".into(),
        })
    }

    /// Evaluate `form` (Lisp source text, read in CL-USER) with
    /// `swank:eval-and-grab-output`; returns the printed primary value. Errors should be
    /// caught by the form itself: one that reaches Swank's debugger leaves this waiting
    /// until `timeout`.
    pub async fn eval(&mut self, form: &str, timeout: Duration) -> Result<String, SwankError> {
        self.next_id += 1;
        let id = self.next_id;
        let request = format!(
            "(:emacs-rex (swank:eval-and-grab-output {}) \"COMMON-LISP-USER\" t {id})",
            Sexp::string(form)
        );
        self.send_raw(&request).await?;
        let answer = async {
            loop {
                let message = self.read_message().await?;
                if let Some(value) = self.answer_to(&message, id).await? {
                    return Ok(value);
                }
            }
        };
        match tokio::time::timeout(timeout, answer).await {
            // Swank hangs up on a client whose secret is wrong (or missing) before answering.
            Ok(Err(SwankError::Closed { addr, detail })) if id == 1 => Err(SwankError::Closed {
                addr,
                detail: format!(
                    "{detail}, before answering anything. {} (after a wrong secret, SLIME \
                     2.27's listener stops accepting connections)",
                    self.secret_hint()
                ),
            }),
            Ok(result) => result,
            Err(_) => Err(SwankError::NoAnswer {
                addr: self.addr.clone(),
                timeout,
                secret_hint: self.secret_hint(),
            }),
        }
    }

    fn secret_hint(&self) -> String {
        match &self.secret_file {
            Some(file) => format!(
                "The secret sent (the first line of {}) may not be the image's ~/.slime-secret",
                file.display()
            ),
            None => "If the image has a ~/.slime-secret, give the same secret (--secret-file \
                     FILE, or ~/.slime-secret here)"
                .into(),
        }
    }

    /// The value of `(:return (:ok (OUTPUT VALUE)) id)` in `message`, or `None` for any other
    /// message; a `(:ping THREAD TAG)` is answered on the way.
    async fn answer_to(&mut self, message: &str, id: u64) -> Result<Option<String>, SwankError> {
        let head = message.trim_start();
        if head.starts_with("(:bye") {
            return Err(SwankError::IsAgent {
                addr: self.addr.clone(),
            });
        }
        if let Some(rest) = head.strip_prefix("(:ping ") {
            let pong = format!("(:emacs-pong {}", rest);
            self.send_raw(&pong).await?;
            return Ok(None);
        }
        if !head.starts_with("(:return ") {
            return Ok(None);
        }
        let protocol = |detail: String| SwankError::Protocol {
            addr: self.addr.clone(),
            detail,
        };
        let parsed = Sexp::parse(head).map_err(|e| protocol(format!("{e} in {}", clip(head))))?;
        let items = parsed.as_list().unwrap_or_default();
        if items.get(2).and_then(Sexp::as_int) != Some(id as i64) {
            return Ok(None);
        }
        let outcome = items.get(1).and_then(Sexp::as_list).unwrap_or_default();
        match outcome.first().and_then(Sexp::as_keyword) {
            Some("ok") => {
                let value = outcome
                    .get(1)
                    .and_then(Sexp::as_list)
                    .and_then(|pair| pair.get(1))
                    .and_then(Sexp::as_str)
                    .ok_or_else(|| protocol(format!("unexpected answer {}", clip(head))))?;
                Ok(Some(value.to_string()))
            }
            Some("abort") => Err(SwankError::Aborted(
                outcome
                    .get(1)
                    .and_then(Sexp::as_str)
                    .unwrap_or("no reason given")
                    .to_string(),
            )),
            _ => Err(protocol(format!("unexpected answer {}", clip(head)))),
        }
    }
}

/// `payload` as one Swank frame; `None` beyond what 6 hex digits can say.
pub fn frame(payload: &str) -> Option<Vec<u8>> {
    let len = payload.len();
    (len <= 0xff_ffff).then(|| {
        let mut out = format!("{len:06x}").into_bytes();
        out.extend_from_slice(payload.as_bytes());
        out
    })
}

fn clip(text: &str) -> String {
    crate::echo::clip(text)
}

/// True when a Swank server answers a harmless request (`swank:connection-info`) at
/// `host:port` within `timeout`: used to explain why an agent handshake failed there.
pub async fn answers_at(host: &str, port: u16, timeout: Duration) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect((host, port)).await.ok()?;
        let request = frame("(:emacs-rex (swank:connection-info) \"COMMON-LISP-USER\" t 1)")?;
        stream.write_all(&request).await.ok()?;
        let mut header = [0u8; 6];
        stream.read_exact(&mut header).await.ok()?;
        let len = usize::from_str_radix(std::str::from_utf8(&header).ok()?, 16).ok()?;
        let mut start = vec![0u8; len.min(16)];
        stream.read_exact(&mut start).await.ok()?;
        let start = String::from_utf8_lossy(&start).into_owned();
        Some(start.starts_with("(:return") || start.starts_with("(:new-features"))
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::frame;

    #[test]
    fn frames_count_utf8_octets() {
        // SLIME 2.27's write-message and read-packet count octets, not characters.
        // "é" is one character and two octets: 6 octets in all.
        assert_eq!(frame("(\"é\")").unwrap(), "000006(\"é\")".as_bytes());
        assert!(frame(&"x".repeat(0x100_0000)).is_none());
    }
}
