//! A burst of health probes and scrapes against a real `sbmon serve` costs the image one
//! reading, not one per request. The image counts the readings itself: the test wraps the
//! agent's `:memory` operation (asked once per reading) so that each call adds a byte to a
//! file, and waits at a gate the test opens, which holds the first reading in flight while
//! the other requests arrive.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Image, Sbmon, Setup};
use sbmon::wire::Sexp;

/// Wraps `sbmon-agent::op-memory`: append a byte to `log`, wait until `gate` exists, answer.
fn counting_gate(log: &Path, gate: &Path) -> String {
    format!(
        r#"(sb-int:encapsulate 'sbmon-agent::op-memory 'sbmon-test-gate
             (lambda (f &rest args)
               (with-open-file (s {log} :direction :output :if-exists :append
                                        :if-does-not-exist :create)
                 (write-char #\m s))
               (loop until (probe-file {gate}) do (sleep 0.01))
               (apply f args)))"#,
        log = Sexp::string(log.to_string_lossy()),
        gate = Sexp::string(gate.to_string_lossy()),
    )
}

/// `:memory` calls the agent answered or is answering.
fn readings(log: &Path) -> usize {
    std::fs::read(log).map_or(0, |bytes| bytes.len())
}

struct Gate(PathBuf);

impl Gate {
    fn open(&self) {
        std::fs::write(&self.0, "").unwrap();
    }

    fn close(&self) {
        std::fs::remove_file(&self.0).unwrap();
    }
}

/// Lines `sbcl_threads{...,state="STATE"} N` of an exposition, summed.
fn threads_in_state(text: &str, state: &str) -> f64 {
    let label = format!("state=\"{state}\"");
    text.lines()
        .filter(|l| l.starts_with("sbcl_threads{") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn concurrent_probes_share_one_reading() {
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("readings");
    let gate = Gate(scratch.path().join("gate"));
    gate.open();
    let image = Image::start(Setup {
        forms: vec![counting_gate(&log, &gate.0)],
        ..Setup::default()
    })
    .await;
    let sbmon = Sbmon::serve(&image, &[]);
    let base = sbmon.base.clone();
    let client = reqwest::Client::new();
    let get = |path: &'static str| {
        let (client, url) = (client.clone(), format!("{base}{path}"));
        tokio::spawn(async move {
            let response = client.get(url).send().await.expect("request");
            let status = response.status().as_u16();
            (path, status, response.text().await.unwrap_or_default())
        })
    };

    // One request starts a reading, which the closed gate holds in the agent; the others
    // arrive while it is in flight.
    gate.close();
    let before = readings(&log);
    let mut requests = vec![get("/health/ready")];
    let deadline = Instant::now() + Duration::from_secs(30);
    while readings(&log) == before {
        assert!(Instant::now() < deadline, "the first reading never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let paths = [
        "/health",
        "/health/ready",
        "/health/targets/app",
        "/metrics",
        "/metrics?target=app",
    ];
    for path in paths.iter().cycle().take(19) {
        requests.push(get(path));
    }
    // Let them reach sbmon (nothing is measured against this wait).
    tokio::time::sleep(Duration::from_millis(500)).await;
    gate.open();
    let answers = futures::future::join_all(requests).await;
    let taken = readings(&log) - before;

    assert_eq!(answers.len(), 20);
    for answer in &answers {
        let (path, status, body) = answer.as_ref().unwrap();
        assert_eq!(*status, 200, "{path}: {body}");
        if path.starts_with("/metrics") {
            // A scrape needs the thread states of /proc's task files, which a health
            // reading does not read: it never makes do with one.
            assert!(
                threads_in_state(body, "sleeping") >= 1.0,
                "{path} got no task states:\n{body}"
            );
        }
    }
    assert!(
        taken < answers.len() / 2,
        "{} requests cost the image {taken} readings",
        answers.len()
    );

    // Nothing is kept: each later request takes a fresh reading.
    let before = readings(&log);
    assert_eq!(sbmon.get("/health/targets/app").await.0, 200);
    assert_eq!(readings(&log), before + 1);
    assert_eq!(sbmon.get("/metrics?target=app").await.0, 200);
    assert_eq!(readings(&log), before + 2);
}
