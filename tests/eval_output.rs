//! repl_eval keeps what the code printed when the code fails or runs out of time: the output
//! before an error is often the clue to it.

mod common;

use std::sync::Arc;

use common::{Image, Setup};
use sbmon::agent::ClientOptions;
use sbmon::audit::Audit;
use sbmon::config::Config;
use sbmon::targets::{Target, Targets};
use sbmon::tools::{Allow, Catalog};
use serde_json::{Value, json};

const ALL: Allow = Allow {
    control: true,
    eval: true,
};

async fn eval(c: &Catalog, args: Value) -> Value {
    c.call("repl_eval", args).await.unwrap()
}

#[tokio::test]
async fn a_failed_or_stopped_evaluation_returns_its_output() {
    let image = Image::start(Setup {
        allow: ALL,
        ..Setup::default()
    })
    .await;
    let target = Target::new("test", image.sbcl.address.clone(), ClientOptions::default());
    let c = Catalog::with_policy(
        Arc::new(Targets::new(vec![target])),
        Arc::new(Config::default()),
        ALL,
        Audit::default(),
    );

    let failed = eval(&c, json!({"code": "(print 42) (error \"boom\")"})).await;
    assert_eq!(failed["ok"], false, "{failed}");
    assert_eq!(failed["error"]["type"], "SIMPLE-ERROR", "{failed}");
    assert_eq!(failed["error"]["message"], "boom", "{failed}");
    assert!(
        failed["output"].as_str().unwrap().contains("42"),
        "{failed}"
    );
    assert_eq!(failed["output_truncated"], false, "{failed}");

    let stopped = eval(
        &c,
        json!({"code": "(progn (princ \"before\") (finish-output) (sleep 10))", "timeout_s": 0.5}),
    )
    .await;
    assert_eq!(stopped["ok"], false, "{stopped}");
    assert_eq!(stopped["error"]["type"], "TIMEOUT", "{stopped}");
    assert_eq!(stopped["output"], "before", "{stopped}");

    // The bound and its flag hold on failure too.
    let long = eval(
        &c,
        json!({"code": "(dotimes (i 100) (write-string \"0123456789\")) (error \"late\")",
               "max_output": 100}),
    )
    .await;
    assert_eq!(long["ok"], false, "{long}");
    assert_eq!(long["output"].as_str().unwrap().len(), 100, "{long}");
    assert_eq!(long["output_truncated"], true, "{long}");
}
