//! sbmon's tool-call series exist from the first scrape of a fresh `sbmon serve`, at zero for
//! every tool its catalog offers (control and eval tools only when allowed), so Prometheus
//! rates and alerts over them work before the first call; `promtool check metrics` accepts
//! the exposition.

mod common;

use common::{Image, READ_TOOLS, Sbmon, Setup};
use serde_json::json;

/// The value of the sample written exactly as `series` (name and labels), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Checks that `text` has every series of each tool in `tools` at zero, and none of `absent`.
fn at_zero(text: &str, tools: &[&str], absent: &[&str]) {
    for tool in tools {
        for outcome in ["ok", "error"] {
            let series = format!("sbmon_tool_calls_total{{tool=\"{tool}\",outcome=\"{outcome}\"}}");
            assert_eq!(value(text, &series), Some(0.0), "{series}\n{text}");
        }
        for series in [
            format!("sbmon_tool_duration_seconds_bucket{{tool=\"{tool}\",le=\"+Inf\"}}"),
            format!("sbmon_tool_duration_seconds_count{{tool=\"{tool}\"}}"),
            format!("sbmon_tool_duration_seconds_sum{{tool=\"{tool}\"}}"),
        ] {
            assert_eq!(value(text, &series), Some(0.0), "{series}\n{text}");
        }
    }
    for tool in absent {
        assert!(
            !text.contains(&format!("tool=\"{tool}\"")),
            "{tool} is not offered\n{text}"
        );
    }
}

#[tokio::test]
async fn every_offered_tool_is_exported_at_zero_before_its_first_call() {
    let image = Image::start(Setup::default()).await;
    let not_read: Vec<&str> = sbmon::tools::TOOLS
        .iter()
        .map(|t| t.name)
        .filter(|t| !READ_TOOLS.contains(t))
        .collect();
    assert!(not_read.contains(&"repl_eval") && not_read.contains(&"memory_gc"));

    let sbmon = Sbmon::serve(&image, &[]);
    for path in ["/metrics?scope=self", "/metrics"] {
        let (status, text) = sbmon.get(path).await;
        assert_eq!(status, 200);
        common::promtool_check(&text);
        at_zero(&text, &READ_TOOLS, &not_read);
    }

    // A call moves its own series only.
    let answer = sbmon
        .rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "memory_stats"}))
        .await;
    assert!(answer["result"].is_object(), "{answer}");
    let (_, text) = sbmon.get("/metrics?scope=self").await;
    common::promtool_check(&text);
    let calls = |tool: &str, outcome: &str| {
        value(
            &text,
            &format!("sbmon_tool_calls_total{{tool=\"{tool}\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(calls("memory_stats", "ok"), Some(1.0));
    assert_eq!(calls("memory_stats", "error"), Some(0.0));
    assert_eq!(calls("gc_stats", "ok"), Some(0.0));
    assert_eq!(
        value(
            &text,
            "sbmon_tool_duration_seconds_count{tool=\"memory_stats\"}"
        ),
        Some(1.0)
    );
    drop(sbmon);

    // Allowed, the control and eval tools are offered, and exported, too.
    let app = format!("app={}", image.sbcl.address);
    let allowed = Sbmon::start("serve", &["--target", &app, "--allow", "control,eval"], &[]);
    let (_, text) = allowed.get("/metrics?scope=self").await;
    common::promtool_check(&text);
    at_zero(&text, &READ_TOOLS, &[]);
    at_zero(&text, &not_read, &[]);
}
