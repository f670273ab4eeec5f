//! The agent's cost to the SBCL image that hosts it, in paired rounds: each round runs one
//! fresh SBCL without the agent and one with it loaded and started (read-only, loaded as
//! `launch` and `attach` load it), in alternating order (ABBA), and each image runs the same compiled
//! workloads and reports SBCL's own figures for them:
//! - `alloc`: a loop that allocates short-lived lists and keeps none, so it collects the
//!   nursery a fixed number of times; the figure that matters is GC CPU per collection
//!   (`SB-EXT:*GC-RUN-TIME*` over the runtime's own collection count, `n_gcs`), because every
//!   nursery collection pays for what the image holds;
//! - `cpu`: fixnum arithmetic that conses nothing: CPU and wall time of the loop.
//!
//! CPU is read twice, from `GET-INTERNAL-RUN-TIME` and from the kernel's `/proc/self/stat`
//! (utime + stime, 10 ms ticks), which SBCL does not compute; the report prints both.
//! Images: `bare` (SBCL as started) and `swank` (Debian's cl-swank loaded first, an image as
//! `sbmon attach` meets it). Every figure is recorded with `support::record`; the ratios
//! `<image>.<workload>.gc_per_collection_ratio` (agent over bare, median of the pairs) are what
//! `tools/bench --check` compares.
//!
//! Run: `cargo bench --bench host_cost` (ROUNDS=N pairs per image, default 10; 3 when
//! `SBMON_BENCH_SHORT=1`). IMAGES=bare or IMAGES=swank runs one image only; AGENT_LOAD=source
//! loads the agent with a plain `(load "sbmon-agent.lisp")` instead of as sbmon does.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sbmon::launch::{load_form, write_agent_files};
use sbmon::wire::Sexp;

const SWANK_LOADER: &str = "/usr/share/common-lisp/source/slime/swank-loader.lisp";

/// The workloads, compiled once into a fasl that every image loads before anything else, so
/// the agent's compilation policy cannot change them.
const WORKLOAD: &str = r#"
(defpackage :sbmon-host-cost (:use :cl))
(in-package :sbmon-host-cost)

(defun proc-cpu-seconds ()
  "utime + stime of this process from /proc/self/stat, seconds."
  (with-open-file (s "/proc/self/stat")
    (let* ((line (read-line s))
           (rest (subseq line (+ 2 (position #\) line :from-end t))))
           (fields (let ((out '()) (start 0))
                     (loop for space = (position #\Space rest :start start)
                           do (push (subseq rest start space) out)
                              (if space (setf start (1+ space)) (return)))
                     (nreverse out))))
      ;; after the command: state(0) ppid pgrp session tty tpgid flags minflt cminflt
      ;; majflt cmajflt utime(11) stime(12)
      (/ (+ (parse-integer (nth 11 fields)) (parse-integer (nth 12 fields))) 100d0))))

(defun n-gcs () (sb-alien:extern-alien "n_gcs" sb-alien:int))

(defvar *sink* nil)

(defun alloc-work (n)
  (declare (fixnum n))
  (dotimes (i n) (setf *sink* (make-list 64))))

(defun cpu-work (n)
  (declare (fixnum n) (optimize speed))
  (let ((acc 0))
    (declare (type (unsigned-byte 24) acc))
    (dotimes (i n acc)
      (setf acc (logand (+ acc (logand (* i 7) #xffff)) #xffffff)))))

(defun measure (kind n)
  (sb-ext:gc :full t)
  (let ((g0 sb-ext:*gc-run-time*) (n0 (n-gcs)) (r0 (get-internal-run-time))
        (w0 (get-internal-real-time)) (p0 (proc-cpu-seconds)))
    (if (eq kind :alloc) (alloc-work n) (cpu-work n))
    (let ((g1 sb-ext:*gc-run-time*) (n1 (n-gcs)) (r1 (get-internal-run-time))
          (w1 (get-internal-real-time)) (p1 (proc-cpu-seconds))
          (u (float internal-time-units-per-second 1d0)))
      (format t "~&RESULT ~(~a~) ~d ~,6f ~,6f ~,6f ~,3f~%" kind (- n1 n0)
              (/ (- g1 g0) u) (/ (- r1 r0) u) (/ (- w1 w0) u) (- p1 p0))
      (finish-output))))
"#;

#[derive(Clone, Copy, PartialEq)]
enum Image {
    Bare,
    Swank,
}

impl Image {
    fn name(self) -> &'static str {
        match self {
            Image::Bare => "bare",
            Image::Swank => "swank",
        }
    }
}

/// One workload's figures from one image.
#[derive(Clone, Copy, Debug)]
struct Run {
    collections: u32,
    gc_s: f64,
    cpu_s: f64,
    wall_s: f64,
    proc_cpu_s: f64,
}

impl Run {
    fn gc_per_collection_ms(&self) -> f64 {
        self.gc_s * 1e3 / f64::from(self.collections.max(1))
    }
}

/// What one image reported: its two workloads and, with the agent, the agent's load time.
struct Outcome {
    alloc: Run,
    cpu: Run,
    load_s: Option<f64>,
}

struct Setup {
    dir: tempfile::TempDir,
    workload_fasl: PathBuf,
    agent: PathBuf,
    swank_fasl: Option<PathBuf>,
    from_source: bool,
    alloc_n: u64,
    cpu_n: u64,
}

fn sbcl() -> Command {
    let mut cmd = Command::new("sbcl");
    cmd.args(["--noinform", "--end-runtime-options"]).args([
        "--no-sysinit",
        "--no-userinit",
        "--non-interactive",
    ]);
    cmd
}

fn run_checked(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run sbcl: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn swank_form(fasl: &Path) -> String {
    format!(
        "(progn (load {}) (setf (symbol-value (find-symbol \"*FASL-DIRECTORY*\" \"SWANK-LOADER\")) {}) (funcall (find-symbol \"INIT\" \"SWANK-LOADER\")))",
        Sexp::string(SWANK_LOADER),
        Sexp::string(format!("{}/", fasl.display()))
    )
}

impl Setup {
    fn new(short: bool, swank: bool) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("sbmon-host-cost-")
            .tempdir()
            .expect("scratch directory");
        let source = dir.path().join("workload.lisp");
        std::fs::write(&source, WORKLOAD).unwrap();
        let workload_fasl = dir.path().join("workload.fasl");
        run_checked(
            sbcl().arg("--eval").arg(format!(
                "(compile-file {} :output-file {})",
                Sexp::string(source.to_string_lossy()),
                Sexp::string(workload_fasl.to_string_lossy())
            )),
            "compiling the workload",
        );
        let agent_dir = dir.path().join("agent");
        std::fs::create_dir(&agent_dir).unwrap();
        let agent = write_agent_files(&agent_dir).expect("write the agent's files");
        let swank_fasl = swank.then(|| {
            assert!(
                Path::new(SWANK_LOADER).exists(),
                "{SWANK_LOADER} is missing: tools/setup installs Debian's cl-swank (or run with IMAGES=bare)"
            );
            let fasl = dir.path().join("swank-fasl");
            std::fs::create_dir(&fasl).unwrap();
            run_checked(
                sbcl().arg("--eval").arg(swank_form(&fasl)),
                "compiling Swank",
            );
            fasl
        });
        Setup {
            dir,
            workload_fasl,
            agent,
            swank_fasl,
            from_source: std::env::var("AGENT_LOAD").is_ok_and(|v| v == "source"),
            alloc_n: if short { 3_000_000 } else { 10_000_000 },
            cpu_n: if short { 300_000_000 } else { 400_000_000 },
        }
    }

    /// Start one image, run both workloads in it, and read its figures.
    fn run(&self, image: Image, with_agent: bool, round: usize) -> Outcome {
        let mut cmd = sbcl();
        if image == Image::Swank {
            cmd.arg("--eval")
                .arg(swank_form(self.swank_fasl.as_ref().unwrap()));
        }
        cmd.arg("--load").arg(&self.workload_fasl);
        if with_agent {
            let socket = self.dir.path().join(format!("agent-{round}.sock"));
            // as `launch` and `attach` load it (compiled to a fasl first), or from source
            let load = if self.from_source {
                format!("(load {})", Sexp::string(self.agent.to_string_lossy()))
            } else {
                load_form(&self.agent)
            };
            cmd.arg("--eval").arg(format!(
                "(let ((t0 (get-internal-real-time))) {load} (funcall (find-symbol \"START\" \"SBMON-AGENT\") :socket {}) (format t \"~&LOADED ~,6f~%\" (/ (- (get-internal-real-time) t0) internal-time-units-per-second)))",
                Sexp::string(socket.to_string_lossy()),
            ));
        }
        cmd.arg("--eval")
            .arg(format!(
                "(sbmon-host-cost::measure :alloc {})",
                self.alloc_n
            ))
            .arg("--eval")
            .arg(format!("(sbmon-host-cost::measure :cpu {})", self.cpu_n));
        let what = format!(
            "{} image{}",
            image.name(),
            if with_agent { " with the agent" } else { "" }
        );
        let out = run_checked(&mut cmd, &what);
        parse_outcome(&out).unwrap_or_else(|| panic!("{what}: no figures in its output:\n{out}"))
    }
}

fn parse_outcome(out: &str) -> Option<Outcome> {
    let mut alloc = None;
    let mut cpu = None;
    let mut load_s = None;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["LOADED", s] => load_s = s.parse().ok(),
            ["RESULT", kind, n, gc, cpu_s, wall, proc_cpu] => {
                let run = Run {
                    collections: n.parse().ok()?,
                    gc_s: gc.parse().ok()?,
                    cpu_s: cpu_s.parse().ok()?,
                    wall_s: wall.parse().ok()?,
                    proc_cpu_s: proc_cpu.parse().ok()?,
                };
                match *kind {
                    "alloc" => alloc = Some(run),
                    "cpu" => cpu = Some(run),
                    _ => return None,
                }
            }
            _ => {}
        }
    }
    Some(Outcome {
        alloc: alloc?,
        cpu: cpu?,
        load_s,
    })
}

/// Median, minimum and maximum of `values`.
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn first_load_average() -> f64 {
    load_average()
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// A figure of both arms over the rounds: medians, the pairs' ratios, and their spread.
fn compare(
    image: &str,
    workload: &str,
    metric: &str,
    unit: &str,
    bare: &[f64],
    agent: &[f64],
) -> f64 {
    let ratios: Vec<f64> = bare
        .iter()
        .zip(agent)
        .map(|(b, a)| if *b > 0.0 { a / b } else { f64::NAN })
        .filter(|r| r.is_finite())
        .collect();
    let (b, bmin, bmax) = spread(bare);
    let (a, amin, amax) = spread(agent);
    let (r, rmin, rmax) = if ratios.is_empty() {
        (f64::NAN, f64::NAN, f64::NAN)
    } else {
        spread(&ratios)
    };
    println!(
        "  {workload:5} {metric:24} bare {b:9.4} [{bmin:.4}-{bmax:.4}]  agent {a:9.4} [{amin:.4}-{amax:.4}] {unit}  agent/bare {r:.3} [{rmin:.3}-{rmax:.3}]  overhead {:+.1} %",
        (r - 1.0) * 100.0
    );
    let name = format!("{image}.{workload}.{metric}");
    support::record("host_cost", &format!("{name}.bare"), b, unit);
    support::record("host_cost", &format!("{name}.agent"), a, unit);
    support::record("host_cost", &format!("{name}_ratio"), r, "ratio");
    support::record("host_cost", &format!("{name}_ratio.min"), rmin, "ratio");
    support::record("host_cost", &format!("{name}_ratio.max"), rmax, "ratio");
    support::record(
        "host_cost",
        &format!("{name}.overhead"),
        (r - 1.0) * 100.0,
        "percent",
    );
    r
}

fn main() {
    let short = support::short();
    let rounds = support::iterations(if short { 3 } else { 10 });
    let rounds = std::env::var("ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(rounds)
        .max(1);
    let images: Vec<Image> = match std::env::var("IMAGES").as_deref() {
        Ok("bare") => vec![Image::Bare],
        Ok("swank") => vec![Image::Swank],
        _ => vec![Image::Bare, Image::Swank],
    };
    let setup = Setup::new(short, images.contains(&Image::Swank));
    println!(
        "host_cost: {rounds} paired rounds per image, alloc {} lists of 64, cpu {} iterations; load average before: {}",
        setup.alloc_n,
        setup.cpu_n,
        load_average()
    );
    let began = Instant::now();
    let mut loads = Vec::new();
    for image in images {
        let mut bare = Vec::new();
        let mut agent = Vec::new();
        for round in 0..rounds {
            // ABBA: the arm that runs first alternates, so a drift in machine load between
            // the two runs of a pair does not always favour the same arm
            let agent_first = round % 2 == 1;
            for with_agent in [agent_first, !agent_first] {
                loads.push(first_load_average());
                let outcome = setup.run(image, with_agent, round);
                if with_agent {
                    agent.push(outcome);
                } else {
                    bare.push(outcome);
                }
            }
        }
        let name = image.name();
        println!("{name} image:");
        for workload in ["alloc", "cpu"] {
            let pick = |o: &Outcome| if workload == "alloc" { o.alloc } else { o.cpu };
            let b: Vec<Run> = bare.iter().map(pick).collect();
            let a: Vec<Run> = agent.iter().map(pick).collect();
            let figure = |runs: &[Run], f: fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<_>>();
            if workload == "alloc" {
                let (n, _, _) = spread(&figure(&b, |r| f64::from(r.collections)));
                println!("  alloc collections per run: {n:.0}");
                support::record(
                    "host_cost",
                    &format!("{name}.alloc.collections"),
                    n,
                    "count",
                );
                compare(
                    name,
                    workload,
                    "gc_per_collection",
                    "ms",
                    &figure(&b, Run::gc_per_collection_ms),
                    &figure(&a, Run::gc_per_collection_ms),
                );
                compare(
                    name,
                    workload,
                    "gc_cpu",
                    "s",
                    &figure(&b, |r| r.gc_s),
                    &figure(&a, |r| r.gc_s),
                );
            }
            compare(
                name,
                workload,
                "cpu",
                "s",
                &figure(&b, |r| r.cpu_s),
                &figure(&a, |r| r.cpu_s),
            );
            compare(
                name,
                workload,
                "proc_cpu",
                "s",
                &figure(&b, |r| r.proc_cpu_s),
                &figure(&a, |r| r.proc_cpu_s),
            );
            compare(
                name,
                workload,
                "wall",
                "s",
                &figure(&b, |r| r.wall_s),
                &figure(&a, |r| r.wall_s),
            );
        }
        let load_times: Vec<f64> = agent.iter().filter_map(|o| o.load_s).collect();
        if !load_times.is_empty() {
            let (m, lo, hi) = spread(&load_times);
            println!("  agent load + start: {m:.3} s [{lo:.3}-{hi:.3}]");
            support::record("host_cost", &format!("{name}.agent_load"), m, "s");
        }
    }
    let (l, lmin, lmax) = spread(&loads);
    println!(
        "load average (1 min) over the runs: median {l:.2} [{lmin:.2}-{lmax:.2}]; took {:.0} s",
        began.elapsed().as_secs_f64()
    );
    support::record("host_cost", "load_average", l, "count");
}
