//! Flame graphs from a real SBCL: `sbmon profile` in each format against the test's own hot,
//! recursive and allocating functions, each output parsed, not just searched.

mod common;

use std::collections::HashSet;
use std::process::{Command, Output};

use common::{Image, Setup};
use sbmon::audit::Audit;
use sbmon::tools::Allow;
use serde_json::{Value, json};

/// Parse an SVG as XML. inferno's starts with the SVG DOCTYPE, which roxmltree refuses
/// unless told.
fn parse_svg(text: &str) -> Result<roxmltree::Document<'_>, roxmltree::Error> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(text, options)
}

const CONTROL: Allow = Allow {
    control: true,
    eval: false,
};

/// A spinning thread `hot` in HOT-LOOP, a thread `fib` in naive recursion, and a thread
/// `churn` that allocates vectors in ALLOC-CHURN itself (MAKE-ARRAY is inlined).
fn workload() -> Vec<String> {
    vec![
        "(defun sbmon-test::hot-loop () (let ((x 0d0)) (loop (setf x (sqrt (+ x (random 1d0)))))))".into(),
        "(sb-thread:make-thread #'sbmon-test::hot-loop :name \"hot\")".into(),
        "(defun sbmon-test::fib (n) (if (< n 2) n (+ (sbmon-test::fib (- n 1)) (sbmon-test::fib (- n 2)))))".into(),
        "(sb-thread:make-thread (lambda () (loop (sbmon-test::fib 25))) :name \"fib\")".into(),
        "(defvar sbmon-test::*sink* nil)".into(),
        "(defun sbmon-test::alloc-churn () (loop (setf sbmon-test::*sink* (make-array 16))))".into(),
        "(sb-thread:make-thread #'sbmon-test::alloc-churn :name \"churn\")".into(),
    ]
}

fn sbmon(image: &Image, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .arg("profile")
        .args(args)
        .args(["--target", &image.sbcl.address.to_string()])
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "sbmon profile failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `stack count` lines: (frames, count).
fn folded_lines(text: &str) -> Vec<(Vec<String>, u64)> {
    text.lines()
        .map(|line| {
            let (stack, count) = line.rsplit_once(' ').expect("`stack count`");
            assert!(!stack.is_empty(), "{line:?}");
            (
                stack.split(';').map(str::to_string).collect(),
                count.parse().expect("a count"),
            )
        })
        .collect()
}

#[tokio::test]
async fn profile_draws_flame_graphs_of_the_test_functions() {
    let image = Image::start(Setup {
        forms: workload(),
        allow: CONTROL,
        ..Setup::default()
    })
    .await;
    let dir = image.dir.path();

    // Without --allow control the CLI refuses, naming the flag.
    let refused = sbmon(&image, &["--seconds", "0.2"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--allow control"));

    // SVG: well-formed XML naming the hot function.
    let svg_path = dir.join("cpu.svg");
    ok(&sbmon(
        &image,
        &[
            "--allow",
            "control",
            "--seconds",
            "1",
            "-o",
            svg_path.to_str().unwrap(),
        ],
    ));
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let doc = parse_svg(&svg).expect("the SVG is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let titles: Vec<&str> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "title")
        .filter_map(|n| n.text())
        .collect();
    assert!(
        titles.iter().any(|t| t.contains("SBMON-TEST::HOT-LOOP")),
        "{titles:?}"
    );

    // Folded: `stack count` lines adding up to the samples sbmon reports.
    let folded = sbmon(
        &image,
        &["--allow", "control", "--seconds", "1", "--format", "folded"],
    );
    let text = ok(&folded);
    let lines = folded_lines(&text);
    let total: u64 = lines.iter().map(|(_, n)| n).sum();
    let said = String::from_utf8_lossy(&folded.stderr);
    assert!(
        said.contains(&format!("{total} samples")),
        "{said} vs {total}"
    );
    assert!(total > 10, "{text}");
    assert!(
        lines
            .iter()
            .any(|(f, _)| f.last().is_some_and(|l| l == "SBMON-TEST::HOT-LOOP")),
        "{text}"
    );
    // Runtime frames are folded away by default.
    for (frames, _) in &lines {
        for f in frames {
            assert!(
                !f.contains("foreign function") && f != "SB-THREAD::RUN" && !f.contains("-TRAMP"),
                "runtime frame {f:?} in {text}"
            );
        }
    }
    let base = dir.join("base.folded");
    std::fs::write(&base, &text).unwrap();

    // Speedscope: the fields its file format requires, with consistent indices.
    let file: Value = serde_json::from_str(&ok(&sbmon(
        &image,
        &[
            "--allow",
            "control",
            "--seconds",
            "0.5",
            "--format",
            "speedscope",
        ],
    )))
    .unwrap();
    assert_eq!(
        file["$schema"],
        "https://www.speedscope.app/file-format-schema.json"
    );
    let frames = file["shared"]["frames"].as_array().unwrap();
    assert!(frames.iter().all(|f| f["name"].is_string()));
    let profiles = file["profiles"].as_array().unwrap();
    assert_eq!(profiles.len(), 1);
    let p = &profiles[0];
    assert_eq!(p["type"], "sampled");
    assert!(p["name"].is_string());
    assert!(
        [
            "none",
            "nanoseconds",
            "microseconds",
            "milliseconds",
            "seconds",
            "bytes"
        ]
        .contains(&p["unit"].as_str().unwrap())
    );
    let samples = p["samples"].as_array().unwrap();
    let weights = p["weights"].as_array().unwrap();
    assert_eq!(samples.len(), weights.len());
    assert!(!samples.is_empty());
    for s in samples {
        for i in s.as_array().unwrap() {
            assert!((i.as_u64().unwrap() as usize) < frames.len());
        }
    }
    let weight: u64 = weights.iter().map(|w| w.as_u64().unwrap()).sum();
    assert_eq!(p["startValue"], 0);
    assert_eq!(p["endValue"].as_u64().unwrap(), weight);

    // A differential flame graph against the folded profile taken before.
    let diff_path = dir.join("diff.svg");
    ok(&sbmon(
        &image,
        &[
            "--allow",
            "control",
            "--seconds",
            "0.5",
            "--diff",
            base.to_str().unwrap(),
            "-o",
            diff_path.to_str().unwrap(),
        ],
    ));
    let diff = std::fs::read_to_string(&diff_path).unwrap();
    parse_svg(&diff).expect("the differential SVG is well-formed XML");
    assert!(diff.contains("SBMON-TEST::HOT-LOOP"));
    let bad = sbmon(
        &image,
        &["--allow", "control", "--diff", "/nonexistent.folded"],
    );
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test]
async fn shares_count_a_function_once_and_alloc_profiles_name_the_allocator() {
    let image = Image::start(Setup {
        forms: workload(),
        allow: CONTROL,
        ..Setup::default()
    })
    .await;
    let c = common::catalog_over(&image, CONTROL, Audit::default());
    let profile = c
        .call(
            "profile_cpu",
            json!({"seconds": 1.0, "max_rows": 200, "max_stacks": 1000}),
        )
        .await
        .unwrap();
    let samples = profile["samples"].as_u64().unwrap();
    assert!(samples > 10, "{profile}");
    let rows = profile["rows"].as_array().unwrap();
    let fib = rows
        .iter()
        .find(|r| r["function"] == "SBMON-TEST::FIB")
        .unwrap_or_else(|| panic!("FIB not among the rows: {profile}"));
    // FIB is many frames deep on each of its samples; counted once, it stays within 100 %,
    // and matches the samples whose stacks have it.
    let cumulative = fib["cumulative_percent"].as_f64().unwrap();
    assert!(cumulative > 0.0 && cumulative <= 100.0, "{fib}");
    let stacks = profile["stacks"].as_array().unwrap();
    let with_fib: u64 = stacks
        .iter()
        .filter(|s| {
            s["stack"]
                .as_str()
                .unwrap()
                .split(';')
                .any(|f| f == "SBMON-TEST::FIB")
        })
        .map(|s| s["samples"].as_u64().unwrap())
        .sum();
    assert!(
        (cumulative - 100.0 * with_fib as f64 / samples as f64).abs() < 1e-6,
        "{cumulative} vs {with_fib}/{samples}"
    );
    assert!(
        stacks.iter().any(|s| s["stack"]
            .as_str()
            .unwrap()
            .matches("SBMON-TEST::FIB")
            .count()
            > 3),
        "FIB's stacks are not recursive: {profile}"
    );
    for r in rows {
        assert!(
            r["cumulative_percent"].as_f64().unwrap() <= 100.0 + 1e-9,
            "{r}"
        );
    }
    // `samples` is the sum over threads, and the stacks' counts add up to it.
    let per_thread: u64 = profile["thread_samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["samples"].as_u64().unwrap())
        .sum();
    assert_eq!(per_thread, samples);
    let stacked: u64 = stacks.iter().map(|s| s["samples"].as_u64().unwrap()).sum();
    assert_eq!(stacked, samples);
    let names: HashSet<&str> = profile["thread_samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["thread"].as_str())
        .collect();
    assert!(names.contains("hot") && names.contains("fib"), "{names:?}");

    // Allocation: the leaf of the heaviest stack is the test's allocating function, not a
    // trampoline; with keep_runtime_frames the trampoline comes back.
    let alloc = c
        .call("profile_cpu", json!({"seconds": 1.0, "mode": "alloc"}))
        .await
        .unwrap();
    assert_eq!(alloc["runtime_frames"], "folded");
    assert_eq!(
        alloc["rows"][0]["function"], "SBMON-TEST::ALLOC-CHURN",
        "{alloc}"
    );
    let top = alloc["stacks"][0]["stack"].as_str().unwrap();
    assert_eq!(
        top.rsplit(';').next(),
        Some("SBMON-TEST::ALLOC-CHURN"),
        "{alloc}"
    );
    let kept = c
        .call(
            "profile_cpu",
            json!({"seconds": 0.5, "mode": "alloc", "keep_runtime_frames": true}),
        )
        .await
        .unwrap();
    assert_eq!(kept["runtime_frames"], "kept");
    let top = kept["stacks"][0]["stack"].as_str().unwrap();
    assert!(
        top.rsplit(';').next().unwrap().contains("ALLOC-TRAMP"),
        "{kept}"
    );
    assert!(top.contains("SB-THREAD::RUN"), "{kept}");
}
