//! The audit log of control and eval calls: who (which front end) did what (tool, arguments
//! with code cut short), when, and how it ended. Every entry goes to stderr; with
//! `--audit-log PATH` also to a JSON Lines file, appended and flushed per entry.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

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
            entry["error"] = Value::String(shorten_text(error));
        }
        let line = entry.to_string();
        eprintln!("sbmon audit: {line}");
        if let Some(file) = &self.file {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = writeln!(file, "{line}").and_then(|()| file.flush()) {
                tracing::error!("cannot write the audit log: {e}");
            }
        }
    }
}

fn shorten_text(s: &str) -> String {
    if s.chars().count() > MAX_ARG_CHARS {
        let cut: String = s.chars().take(MAX_ARG_CHARS).collect();
        format!("{cut}... ({} chars)", s.chars().count())
    } else {
        s.to_string()
    }
}

fn shorten(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(shorten_text(s)),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shorten(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(shorten).collect()),
        other => other.clone(),
    }
}
