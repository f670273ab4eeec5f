//! The operator assets under `tools/`: the Prometheus scrape config, the alert rules and their
//! unit tests, each checked by the real `promtool` (Debian's `prometheus` package, installed by
//! `tools/setup`); and the Grafana dashboard and the rules, whose queries may name only the
//! metrics docs/metrics.md lists, so neither can drift from what sbmon documents.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const DASHBOARD: &str = "tools/grafana/sbmon-dashboard.json";
const ALERTS: &str = "tools/prometheus/alerts.yml";
const ALERT_TESTS: &str = "tools/prometheus/alerts_test.yml";
const PROMETHEUS_CONFIG: &str = "tools/prometheus/prometheus.yml";
const METRICS_DOC: &str = "docs/metrics.md";

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs `promtool ARGS` in the crate's directory and fails, printing what promtool said,
/// unless it succeeds. A missing promtool is a failure, never a skip.
fn promtool(args: &[&str]) -> String {
    let output = match Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: run tools/setup (it installs Debian's `prometheus` \
             package, which provides promtool)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "`promtool {}` failed ({}):\n{text}",
        args.join(" "),
        output.status
    );
    text
}

#[test]
fn alert_rules_pass_promtool_check_rules() {
    let out = promtool(&["check", "rules", ALERTS]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rule_unit_tests_pass() {
    let out = promtool(&["test", "rules", ALERT_TESTS]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn scrape_config_passes_promtool_check_config() {
    let out = promtool(&["check", "config", PROMETHEUS_CONFIG]);
    // The check also loads the rule file it names, relative to the config.
    assert!(out.contains("1 rule files found"), "{out}");
}

/// Metric name → type (`gauge`, `counter`, `histogram`) from the tables of docs/metrics.md:
/// the backticked name in the first cell of each row, the type in the second.
fn documented_metrics() -> BTreeMap<String, String> {
    let mut metrics = BTreeMap::new();
    for line in read(METRICS_DOC).lines() {
        let Some(row) = line.trim().strip_prefix('|') else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Some(name) = cells
            .first()
            .and_then(|c| c.strip_prefix('`'))
            .and_then(|c| c.strip_suffix('`'))
        else {
            continue; // header and separator rows
        };
        let kind = cells.get(1).copied().unwrap_or("").to_string();
        metrics.insert(name.to_string(), kind);
    }
    metrics
}

/// Every identifier in `text` that starts with `sbcl_`, `process_` or `sbmon_`, outside
/// double-quoted strings (label values, YAML annotations).
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars().chain(std::iter::once(' ')) {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            current.push(c);
            continue;
        }
        if ["sbcl_", "process_", "sbmon_"]
            .iter()
            .any(|p| current.starts_with(p))
        {
            names.push(current.clone());
        }
        current.clear();
        in_string = c == '"';
    }
    names
}

/// Why `name` is not a series sbmon exports according to `documented`, if it is not: a
/// documented gauge or counter, or a documented histogram's `_bucket`, `_sum` or `_count`.
fn undocumented(name: &str, documented: &BTreeMap<String, String>) -> Option<String> {
    match documented.get(name).map(String::as_str) {
        Some("histogram") => {
            return Some(format!(
                "{name} is a histogram: query {name}_bucket, _sum or _count"
            ));
        }
        Some(_) => return None,
        None => {}
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && documented.get(base).map(String::as_str) == Some("histogram")
        {
            return None;
        }
    }
    Some(format!("{name} is not listed in {METRICS_DOC}"))
}

/// Every panel, including those nested in (collapsed) rows.
fn all_panels(panels: &[Value]) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in panels {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(all_panels(nested));
        }
    }
    out
}

#[test]
fn docs_list_the_metrics_the_checks_rely_on() {
    let documented = documented_metrics();
    for (name, kind) in [
        ("sbcl_info", "gauge"),
        ("sbcl_heap_used_bytes", "gauge"),
        ("sbcl_gc_cpu_seconds_total", "counter"),
        ("sbcl_gc_pause_seconds", "histogram"),
        ("process_open_fds", "gauge"),
        ("sbmon_tool_calls_total", "counter"),
        ("sbmon_agent_rtt_seconds", "histogram"),
    ] {
        let found = documented.get(name).unwrap_or_else(|| {
            panic!("{METRICS_DOC} no longer lists {name}; documented: {documented:?}")
        });
        assert_eq!(found, kind, "type of {name} in {METRICS_DOC}");
    }
    assert_eq!(
        metric_names(r#"rate(sbmon_tool_calls_total{outcome="sbcl_x"}[5m]) / my_sbcl_y"#),
        ["sbmon_tool_calls_total"]
    );
}

#[test]
fn dashboard_is_valid_json_and_every_panel_queries_something() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("a panels array");
    let mut queried = 0;
    for panel in all_panels(panels) {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let exprs: Vec<&str> = panel["targets"]
            .as_array()
            .map(|targets| {
                targets
                    .iter()
                    .filter_map(|t| t["expr"].as_str())
                    .filter(|e| !e.trim().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            !exprs.is_empty(),
            "panel {title:?} has no target with an expr"
        );
        queried += 1;
    }
    assert!(queried >= 20, "only {queried} panels with queries");

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating variables");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` template variable"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    let target = variable("target");
    assert_eq!(target["definition"], "label_values(sbcl_info, target)");
    assert_eq!(target["multi"], true);
    assert_eq!(target["includeAll"], true);
}

#[test]
fn dashboard_and_rules_name_only_documented_metrics() {
    let documented = documented_metrics();
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");

    let mut sources: Vec<(String, String)> = Vec::new();
    for panel in all_panels(dashboard["panels"].as_array().expect("panels")) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or("(untitled)");
                sources.push((format!("{DASHBOARD} panel {title:?}"), expr.to_string()));
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for query in [&variable["definition"], &variable["query"]["query"]] {
            if let Some(q) = query.as_str() {
                let name = variable["name"].as_str().unwrap_or("?");
                sources.push((format!("{DASHBOARD} variable {name}"), q.to_string()));
            }
        }
    }
    // Rules and their tests: every line but comments (annotations are quoted, so skipped).
    for file in [ALERTS, ALERT_TESTS] {
        let text: String = read(file)
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        sources.push((file.to_string(), text));
    }

    let mut problems = Vec::new();
    let mut seen = 0;
    for (place, text) in &sources {
        for name in metric_names(text) {
            seen += 1;
            if let Some(why) = undocumented(&name, &documented) {
                problems.push(format!("{place}: {why}"));
            }
        }
    }
    assert!(
        seen > 50,
        "only {seen} metric names found: is the scan broken?"
    );
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

const RUNBOOK: &str = "docs/runbook.md";

/// The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of every heading of `markdown` (outside fenced code).
fn heading_anchors(markdown: &str) -> Vec<String> {
    let mut fenced = false;
    let mut anchors = Vec::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            anchors.push(anchor(line.trim_start_matches('#')));
        }
    }
    anchors
}

/// (alert, its `runbook_url` annotations) for every rule of alerts.yml, in order.
fn runbook_urls(rules: &str) -> Vec<(String, Vec<String>)> {
    let mut alerts: Vec<(String, Vec<String>)> = Vec::new();
    for line in rules.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert:") {
            alerts.push((name.trim().to_string(), Vec::new()));
        } else if let Some(url) = line.strip_prefix("runbook_url:") {
            let url = url.trim().trim_matches('"').to_string();
            alerts
                .last_mut()
                .unwrap_or_else(|| panic!("runbook_url outside an alert: {line}"))
                .1
                .push(url);
        }
    }
    alerts
}

#[test]
fn every_alert_links_to_its_runbook_section() {
    assert_eq!(anchor("SbclHeapUsageHigh"), "sbclheapusagehigh");
    assert_eq!(anchor(" GC pauses too long"), "gc-pauses-too-long");
    let runbook = read(RUNBOOK);
    let anchors = heading_anchors(&runbook);
    let alerts = runbook_urls(&read(ALERTS));
    let rule_count = read(ALERTS).matches("- alert:").count();
    assert!(rule_count >= 17, "only {rule_count} alerts found");
    assert_eq!(alerts.len(), rule_count);
    let mut problems = Vec::new();
    for (alert, urls) in &alerts {
        let [url] = urls.as_slice() else {
            problems.push(format!(
                "{alert} has {} runbook_url annotations",
                urls.len()
            ));
            continue;
        };
        let expected = format!("{RUNBOOK}#{}", alert.to_lowercase());
        if *url != expected {
            problems.push(format!(
                "{alert}: runbook_url {url:?}, expected {expected:?}"
            ));
        }
        let fragment = url.split_once('#').map_or("", |(_, f)| f);
        if !anchors.iter().any(|a| a == fragment) {
            problems.push(format!(
                "{alert}: no heading in {RUNBOOK} has the anchor #{fragment}"
            ));
        }
    }
    // The alerts of the threads work have their sections already.
    for planned in ["sbclthreadsdeadlocked", "sbclthreadindebugger"] {
        if !anchors.iter().any(|a| a == planned) {
            problems.push(format!("{RUNBOOK} lacks a section #{planned}"));
        }
    }
    // Links inside the runbook land on its headings.
    for (at, _) in runbook.match_indices("](#") {
        let fragment: String = runbook[at + 3..]
            .chars()
            .take_while(|&c| c != ')')
            .collect();
        if !anchors.contains(&fragment) {
            problems.push(format!(
                "{RUNBOOK} links to #{fragment}, which is no heading"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
