//! The audit log of control and eval calls: who (which front end) did what (tool, arguments
//! with code cut short), when, and how it ended. Every entry goes to stderr; with
//! `--audit-log PATH` also to a JSON Lines file, appended and flushed per entry.
//!
//! Writing is done in a [`blocking::section`](crate::blocking::section): stderr may be a pipe
//! that its reader drains slowly and the file may sit on a slow disk, so the runtime worker
//! hands its other tasks over meanwhile. The write still completes before `record` returns, so
//! an entry is on disk when the audited call answers, and none is lost when sbmon exits.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::echo::clip_to;

/// Strings in audited arguments longer than this are cut (eval code can be large).
const MAX_ARG_CHARS: usize = 500;

/// How an audited call went.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The tool did what was asked.
    Done,
    /// The tool ran but its action did not succeed (an evaluation that signalled an error or
    /// timed out): the condition's type and message.
    Failed(String),
    /// The tool itself failed (refused, target down): the error.
    Error(String),
}

#[derive(Default)]
pub struct Audit {
    file: Option<Mutex<std::fs::File>>,
}

impl Audit {
    /// Also append entries to `path` (created 0600 if absent).
    pub fn to_file(path: &Path) -> std::io::Result<Audit> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Audit {
            file: Some(Mutex::new(file)),
        })
    }

    /// Record one call: `outcome` is `ok`, `failed` or `error` as [`Verdict`] says.
    pub fn record(
        &self,
        front_end: &str,
        tool: &str,
        args: &Value,
        verdict: &Verdict,
        elapsed: Duration,
    ) {
        let (verdict, error) = match verdict {
            Verdict::Done => ("ok", None),
            Verdict::Failed(why) => ("failed", Some(why)),
            Verdict::Error(why) => ("error", Some(why)),
        };
        let mut entry = json!({
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "front_end": front_end,
            "tool": tool,
            "arguments": shorten(args),
            "outcome": verdict,
            "seconds": elapsed.as_secs_f64(),
        });
        if let Some(error) = error {
            entry["error"] = Value::String(clip_to(error, MAX_ARG_CHARS));
        }
        let line = entry.to_string();
        crate::blocking::section(|| self.write(&line));
    }

    fn write(&self, line: &str) {
        eprintln!("sbmon audit: {line}");
        if let Some(file) = &self.file {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = writeln!(file, "{line}").and_then(|()| file.flush()) {
                tracing::error!("cannot write the audit log: {e}");
            }
        }
    }
}

fn shorten(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(clip_to(s, MAX_ARG_CHARS)),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shorten(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(shorten).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::Arc;

    fn bytes_waiting(pipe: &std::fs::File) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which outlives the call.
        assert_eq!(
            unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) },
            0
        );
        usize::try_from(n).unwrap()
    }

    #[test]
    fn a_log_that_cannot_take_the_entry_does_not_hold_up_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("audit.fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // The reader end first (without waiting for a writer), so the log's open succeeds.
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        // SAFETY: F_GETPIPE_SZ only reads the pipe's capacity.
        let capacity = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let capacity = usize::try_from(capacity).unwrap();
        let audit = Arc::new(Audit::to_file(&fifo).unwrap());
        // An entry twice the pipe's size: its write blocks until the test reads.
        let args: serde_json::Map<String, Value> = (0..2 * capacity / MAX_ARG_CHARS)
            .map(|i| (format!("k{i}"), Value::String("x".repeat(MAX_ARG_CHARS))))
            .collect();
        let args = Value::Object(args);

        // One worker: if the write held it, no other task could run until the pipe drained.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let line = rt.block_on(async {
            let writer = tokio::spawn({
                let (audit, args) = (audit.clone(), args.clone());
                async move {
                    audit.record("rpc", "repl_eval", &args, &Verdict::Done, Duration::ZERO);
                }
            });
            while bytes_waiting(&reader) < capacity {
                std::thread::sleep(Duration::from_millis(5));
            }
            // Waited for off the runtime: a stuck worker would not drive a tokio timer.
            let (tx, rx) = std::sync::mpsc::channel();
            tokio::spawn(async move { tx.send("ran") });
            let ran = rx.recv_timeout(Duration::from_secs(10));
            let mut line = Vec::new();
            while !line.ends_with(b"\n") {
                let mut chunk = [0u8; 65536];
                match reader.read(&mut chunk) {
                    Ok(n) => line.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            writer.await.unwrap();
            assert_eq!(
                ran.ok(),
                Some("ran"),
                "another task waited for the audit write"
            );
            String::from_utf8(line).unwrap()
        });
        let entry: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(entry["tool"], "repl_eval");
        assert_eq!(entry["outcome"], "ok");
        assert_eq!(entry["arguments"], args);
    }
}
