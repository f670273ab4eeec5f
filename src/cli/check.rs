//! `sbmon check`: the health grade as a monitoring plugin reports it (the Nagios plugin API,
//! which Icinga, Naemon, Sensu and Checkmk read too): one status line with performance data on
//! stdout, and the exit code is the state: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
//!
//! It adapts the catalog's `health_check` and adds no grading of its own: healthy is OK,
//! degraded WARNING, critical CRITICAL. UNKNOWN is for what prevents grading: bad arguments, an
//! unreadable config file, no agent to ask, and (unless `--unreachable critical`) an agent
//! that does not answer, since then nothing about the image could be observed.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::{ClientArgs, TargetArgs, choose_address, client_and_config};
use crate::tools::Catalog;

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub agent: TargetArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// The state to report when the agent does not answer: unknown (the image could not be
    /// checked, the plugin convention) or critical (treat a silent agent as a down service).
    #[arg(long, value_enum, default_value_t = Unreachable::Unknown, value_name = "STATE")]
    pub unreachable: Unreachable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Unreachable {
    Unknown,
    Critical,
}

/// A plugin's state; its number is the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }
}

/// Print the plugin's line and return its exit code.
fn report(state: State, text: &str) -> ExitCode {
    println!("SBMON {} - {text}", state.name());
    ExitCode::from(state as u8)
}

/// What the line says when the command line itself was wrong (clap's message, one line).
pub fn bad_arguments(message: &str) -> ExitCode {
    let first = message
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ");
    report(State::Unknown, &format!("bad arguments: {}", clean(first)))
}

pub async fn run(args: CheckArgs) -> ExitCode {
    let (options, config) = match client_and_config(&args.client, args.agent.token_file.as_ref()) {
        Ok(both) => both,
        Err(e) => return report(State::Unknown, &clean(&e)),
    };
    let address = match choose_address(args.agent.target.as_deref()) {
        Ok(a) => a,
        Err((_, e)) => return report(State::Unknown, &clean(&e)),
    };
    let catalog = Catalog::single_target(
        address,
        options,
        config,
        Default::default(),
        Default::default(),
    );
    match catalog.call_from("cli", "health_check", Value::Null).await {
        Ok(called) => {
            let (state, line) = status_line(&called.value, args.unreachable);
            report(state, &line)
        }
        Err(e) => report(State::Unknown, &clean(&e.to_string())),
    }
}

/// The state and the text after `SBMON STATE - ` for a `health_check` result.
pub fn status_line(health: &Value, unreachable: Unreachable) -> (State, String) {
    let target = health["target"].as_str().unwrap_or("?");
    let checks: &[Value] = health["checks"].as_array().map_or(&[], Vec::as_slice);
    let agent = checks.iter().find(|c| c["name"] == "availability.agent");
    let silent = agent.is_some_and(|c| c["observed"].is_null() && status_of(c) == "critical");
    let mut state = match health["status"].as_str() {
        Some("healthy") => State::Ok,
        Some("degraded") => State::Warning,
        Some("critical") => State::Critical,
        _ => State::Unknown,
    };
    if silent && unreachable == Unreachable::Unknown {
        state = State::Unknown;
    }
    let mut text = format!("{target}: ");
    if silent {
        let reason = agent.and_then(|c| c["reason"].as_str()).unwrap_or("");
        text += &clean(reason);
    } else if state == State::Ok {
        let healthy = checks.iter().filter(|c| status_of(c) == "healthy").count();
        let _ = write!(text, "healthy ({healthy} of {} checks", checks.len());
        let ungraded: Vec<&str> = checks
            .iter()
            .filter(|c| status_of(c) == "unknown")
            .filter_map(|c| c["name"].as_str())
            .collect();
        if !ungraded.is_empty() {
            let _ = write!(text, "; not graded: {}", ungraded.join(", "));
        }
        text += ")";
    } else {
        let mut problems: Vec<&Value> = checks
            .iter()
            .filter(|c| matches!(status_of(c), "degraded" | "critical"))
            .collect();
        // The critical ones first, in the report's order otherwise.
        problems.sort_by_key(|c| status_of(c) != "critical");
        let described: Vec<String> = problems
            .iter()
            .map(|c| {
                format!(
                    "{} {}: {}",
                    c["name"].as_str().unwrap_or("?"),
                    status_of(c),
                    cut(&clean(c["reason"].as_str().unwrap_or("")), 300)
                )
            })
            .collect();
        text += &described.join("; ");
    }
    // A silent agent observed nothing about the image: no figures to graph.
    let perf = if silent {
        String::new()
    } else {
        perfdata(checks)
    };
    if !perf.is_empty() {
        text += " | ";
        text += &perf;
    }
    (state, text)
}

fn status_of(check: &Value) -> &str {
    check["status"].as_str().unwrap_or("unknown")
}

/// Nagios performance data, `label=value[UOM];warn;crit;min;max` for each check that observed
/// a value; the label is the check's name and the thresholds are the ones it was graded with.
fn perfdata(checks: &[Value]) -> String {
    let mut out = Vec::new();
    for c in checks {
        let (Some(name), Some(value)) = (c["name"].as_str(), c["observed"].as_f64()) else {
            continue;
        };
        let (uom, min, max) = scale(name);
        let field = |v: &Value| v.as_f64().map_or(String::new(), number);
        out.push(format!(
            "{}={}{uom};{};{};{};{}",
            label(name),
            number(value),
            field(&c["warning"]),
            field(&c["critical"]),
            min.map_or(String::new(), number),
            max.map_or(String::new(), number),
        ));
    }
    out.join(" ")
}

/// Unit of measure, minimum and maximum of a check's observed value.
fn scale(check: &str) -> (&'static str, Option<f64>, Option<f64>) {
    match check {
        "memory.heap" | "memory.rss" | "gc.time" | "resources.fds" | "availability.errors" => {
            ("", Some(0.0), Some(1.0))
        }
        "availability.agent" | "threads.stuck" => ("s", Some(0.0), None),
        "threads.count" => ("", Some(0.0), None),
        // memory.leak: bytes a second of retained-heap growth, which may be negative; Nagios
        // has no unit for a rate of bytes.
        _ => ("", None, None),
    }
}

/// A label as the plugin guidelines allow it: quoted when it holds a space, `=` or a quote.
fn label(name: &str) -> String {
    if name.chars().any(|c| c == ' ' || c == '=' || c == '\'') {
        format!("'{}'", name.replace('\'', "''"))
    } else {
        name.to_string()
    }
}

/// A figure in plain decimal notation (no exponent, which graphers may not read), at most six
/// decimals.
fn number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        return format!("{}", x as i64);
    }
    let text = format!("{x:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}

/// One line without `|` (which starts the performance data).
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '|' => '/',
            '\n' | '\r' | '\t' => ' ',
            c => c,
        })
        .collect()
}

fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max - 3).collect();
    out += "...";
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(status: &str, checks: Value) -> Value {
        json!({"target": "app", "status": status, "checks": checks, "time": 0.0})
    }

    #[test]
    fn states_follow_the_grade_and_list_problems_critical_first() {
        let checks = json!([
            {"name": "memory.heap", "status": "degraded", "observed": 0.75, "warning": 0.7,
             "critical": 0.9, "reason": "heap at 75% | high"},
            {"name": "threads.stuck", "status": "critical", "observed": 3.0, "warning": 60.0,
             "critical": null, "reason": "deadlock:\nA -> B"},
            {"name": "memory.leak", "status": "unknown", "observed": null, "warning": 4096.0,
             "critical": null, "reason": "needs the sampler"},
        ]);
        let (state, line) = status_line(&report("critical", checks), Unreachable::Unknown);
        assert_eq!(state, State::Critical);
        assert_eq!(
            line,
            "app: threads.stuck critical: deadlock: A -> B; memory.heap degraded: heap at 75% / \
             high | memory.heap=0.75;0.7;0.9;0;1 threads.stuck=3s;60;;0;"
        );
    }

    #[test]
    fn ok_counts_the_checks_and_a_silent_agent_is_unknown_by_default() {
        let checks = json!([
            {"name": "threads.count", "status": "healthy", "observed": 9.0, "warning": 100.0,
             "critical": 500.0, "reason": "9 Lisp threads"},
            {"name": "memory.leak", "status": "unknown", "observed": null, "warning": 4096.0,
             "critical": null, "reason": "needs the sampler"},
        ]);
        let (state, line) = status_line(&report("healthy", checks), Unreachable::Unknown);
        assert_eq!(state, State::Ok);
        assert_eq!(
            line,
            "app: healthy (1 of 2 checks; not graded: memory.leak) | threads.count=9;100;500;0;"
        );
        let silent = report(
            "critical",
            json!([{"name": "availability.agent", "status": "critical", "observed": null,
                    "warning": 1.0, "critical": null, "reason": "agent unreachable: refused"}]),
        );
        let (state, line) = status_line(&silent, Unreachable::Unknown);
        assert_eq!(
            (state, line.as_str()),
            (State::Unknown, "app: agent unreachable: refused")
        );
        assert_eq!(
            status_line(&silent, Unreachable::Critical).0,
            State::Critical
        );
    }

    #[test]
    fn numbers_are_plain_decimals() {
        assert_eq!(number(9.0), "9");
        assert_eq!(number(0.123456789), "0.123457");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(-0.0000001), "0");
        assert_eq!(number(1e20), "100000000000000000000");
        assert_eq!(label("a b"), "'a b'");
    }
}
