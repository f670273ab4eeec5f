//! Shared harness for the integration tests: a real SBCL with the real agent, arranged by the
//! test (named threads, a held mutex, a chosen heap size, garbage on demand), and stopped when
//! the test ends, pass or fail (`Sbcl` stops its process on drop).
#![allow(dead_code)]

pub mod swank;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sbmon::agent::{Address, AgentClient, ClientOptions};
use sbmon::config::Config;
use sbmon::launch::{AgentAllow, LaunchOptions, Sbcl};
use sbmon::targets::{Target, Targets};
use sbmon::tools::{Allow, Catalog};
use sbmon::wire::Sexp;
use serde_json::Value;

/// Lisp that the tests rely on, evaluated before the agent starts (two forms, so the package
/// exists before the second is read):
/// - `sbmon-test-sleeper`: a named function a thread can run, easy to find in a backtrace;
/// - a collector thread that, whenever the file `<dir>/collect` appears, makes about 64 MB of
///   garbage, runs a full GC and removes the file (so a test can make the image collect
///   without an eval tool);
const FIXTURE: [&str; 2] = [
    "(defpackage :sbmon-test (:use :cl))",
    r#"(progn
  (defun sbmon-test::sbmon-test-sleeper () (loop (sleep 0.05)))
  (defun sbmon-test::make-garbage (megabytes)
    (let ((keep nil))
      (dotimes (i (* megabytes 16))
        (setf keep (make-array 65536 :element-type '(unsigned-byte 8))))
      (length keep)))
  (defun sbmon-test::start-collector (trigger)
    (sb-thread:make-thread
     (lambda ()
       (loop
         (when (probe-file trigger)
           (sbmon-test::make-garbage 64)
           (sb-ext:gc :full t)
           (delete-file trigger))
         (sleep 0.02)))
     :name "test-collector")))"#,
];

/// Every read tool of the catalog: what a read-only sbmon lists.
pub const READ_TOOLS: [&str; 14] = [
    "health_check",
    "metrics_export",
    "operation_stats",
    "memory_stats",
    "memory_trend",
    "gc_stats",
    "gc_watch",
    "runtime_stats",
    "thread_list",
    "thread_inspect",
    "thread_dump_all",
    "heap_histogram",
    "heap_retainers",
    "events_recent",
];

pub struct Image {
    pub sbcl: Sbcl,
    pub dir: tempfile::TempDir,
}

/// Where the test's agent listens.
#[derive(Default, Clone)]
pub enum Listen {
    /// A socket in the test's own directory.
    #[default]
    TestDir,
    /// The agent's default, `<runtime dir>/<pid>.sock`.
    AgentDefault,
    At(Address),
}

#[derive(Default)]
pub struct Setup {
    pub runtime_args: Vec<String>,
    /// Forms run after the fixture is defined, before the agent starts.
    pub forms: Vec<String>,
    pub listen: Listen,
    pub env: Vec<(String, String)>,
    /// Start the collector thread (see FIXTURE).
    pub collector: bool,
    /// The agent's `:hello-timeout` (its default, 10 s, when `None`).
    pub hello_timeout: Option<Duration>,
    /// Operation classes the agent serves beyond read (`:allow`); read-only by default.
    pub allow: Allow,
}

impl Image {
    pub async fn start(setup: Setup) -> Image {
        let dir = tempfile::Builder::new()
            .prefix("sbmon-test-")
            .tempdir()
            .expect("temp dir");
        let listen = match setup.listen.clone() {
            Listen::TestDir => Some(Address::Unix(dir.path().join("agent.sock"))),
            Listen::AgentDefault => None,
            Listen::At(address) => Some(address),
        };
        let mut before_start: Vec<String> = FIXTURE.iter().map(|f| f.to_string()).collect();
        if setup.collector {
            before_start.push(format!(
                "(sbmon-test::start-collector {})",
                Sexp::string(dir.path().join("collect").to_string_lossy())
            ));
        }
        before_start.extend(setup.forms.iter().cloned());
        let options = LaunchOptions {
            runtime_args: setup.runtime_args,
            listen,
            env: setup.env.clone(),
            before_start,
            hello_timeout: setup.hello_timeout,
            allow: AgentAllow {
                control: setup.allow.control,
                eval: setup.allow.eval,
            },
            ..LaunchOptions::default()
        };
        let mut sbcl = Sbcl::spawn(&options).expect("spawn sbcl");
        let client_options = token_options(&setup.env);
        sbcl.wait_ready(Duration::from_secs(60), &client_options)
            .await
            .expect("agent ready");
        Image { sbcl, dir }
    }

    pub fn pid(&self) -> i32 {
        self.sbcl.pid
    }

    pub fn client(&self) -> AgentClient {
        AgentClient::new(self.sbcl.address.clone(), ClientOptions::default())
    }

    pub fn catalog(&self) -> Catalog {
        self.catalog_with(Config::default())
    }

    pub fn catalog_with(&self, config: Config) -> Catalog {
        let target = Target::new("test", self.sbcl.address.clone(), ClientOptions::default());
        Catalog::new(Arc::new(Targets::new(vec![target])), Arc::new(config))
    }

    /// Ask the collector thread for garbage and a full GC; wait until it is done.
    pub async fn collect(&self) {
        let trigger = self.dir.path().join("collect");
        std::fs::write(&trigger, "").expect("write trigger");
        let deadline = Instant::now() + Duration::from_secs(30);
        while trigger.exists() {
            assert!(Instant::now() < deadline, "the image did not collect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Client options carrying the token of a TCP agent whose HOME the test chose.
pub fn token_options(env: &[(String, String)]) -> ClientOptions {
    let token_file = env
        .iter()
        .find(|(k, _)| k == "HOME")
        .map(|(_, home)| PathBuf::from(home).join(".sbmon-secret"));
    ClientOptions {
        token_file,
        ..ClientOptions::default()
    }
}

/// A field of /proc/PID/status in bytes (the kernel writes kB).
pub fn proc_status_bytes(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .expect("field present");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("number");
    kb * 1024
}

/// User + system CPU seconds of a process (`/proc/PID/stat`) or one of its threads
/// (`/proc/PID/task/TID/stat`).
pub fn proc_cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("comm")
        .1
        .split_whitespace()
        .collect();
    // After the comm: state is field 0, utime 11, stime 12.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The tids in /proc/PID/task.
pub fn proc_tids(pid: i32) -> Vec<i32> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort();
    tids
}

/// Whether process `pid` is still running: a zombie has ended and only waits for its parent
/// (or, orphaned, for an init that may never reap it) to collect its status.
pub fn process_exists(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command name, which ends at the last ')'.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}

/// `(sb-thread:make-thread #'sbmon-test::sbmon-test-sleeper :name NAME)`
pub fn sleeper(name: &str) -> String {
    format!(
        "(sb-thread:make-thread #'sbmon-test::sbmon-test-sleeper :name {})",
        Sexp::string(name)
    )
}

/// A mutex named `mutex` held forever by thread `holder`, and thread `waiter` blocked on it.
pub fn held_mutex(mutex: &str, holder: &str, waiter: &str) -> String {
    format!(
        r#"(let ((m (sb-thread:make-mutex :name {m}))
                 (held (sb-thread:make-semaphore)))
             (sb-thread:make-thread
               (lambda () (sb-thread:with-mutex (m) (sb-thread:signal-semaphore held) (loop (sleep 1))))
               :name {h})
             (sb-thread:wait-on-semaphore held)
             (sb-thread:make-thread (lambda () (sb-thread:with-mutex (m) nil)) :name {w})
             (sleep 0.1))"#,
        m = Sexp::string(mutex),
        h = Sexp::string(holder),
        w = Sexp::string(waiter)
    )
}

/// A lock-order deadlock: t-ab takes lock-a then lock-b, t-ba lock-b then lock-a, each taking
/// its first before either tries its second. `thread(name, body)` makes each thread, so a test
/// can wrap its threads as it needs (SBCL's own debugger, a tid it notes).
pub fn lock_order_deadlock(thread: fn(&str, &str) -> String) -> String {
    format!(
        r#"(let ((a (sb-thread:make-mutex :name "lock-a"))
                 (b (sb-thread:make-mutex :name "lock-b"))
                 (held (sb-thread:make-semaphore))
                 (go (sb-thread:make-semaphore)))
             (declare (ignorable a b))
             {ab}
             {ba}
             (sb-thread:wait-on-semaphore held :n 2)
             (sb-thread:signal-semaphore go 2)
             (sleep 0.5))"#,
        ab = thread(
            "t-ab",
            "(sb-thread:with-mutex (a) (sb-thread:signal-semaphore held) \
             (sb-thread:wait-on-semaphore go) (sb-thread:with-mutex (b) nil))"
        ),
        ba = thread(
            "t-ba",
            "(sb-thread:with-mutex (b) (sb-thread:signal-semaphore held) \
             (sb-thread:wait-on-semaphore go) (sb-thread:with-mutex (a) nil))"
        ),
    )
}

/// A thread that never answers interrupts: it sleeps with interrupts disabled.
pub fn deaf_thread(name: &str) -> String {
    format!(
        "(sb-thread:make-thread (lambda () (sb-sys:without-interrupts (loop (sleep 0.05)))) :name {})",
        Sexp::string(name)
    )
}

/// An `sbmon` child process, killed when dropped.
pub struct Sbmon {
    pub child: Child,
    pub base: String,
}

impl Drop for Sbmon {
    /// SIGTERM first, so that `sbmon launch` stops its SBCL and removes its scratch directory
    /// as a user's Ctrl-C would; SIGKILL only if it has not ended within 5 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sbmon {
    /// GET `path`: status and body text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("{}{path}", self.base))
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// Start `sbmon COMMAND --http 127.0.0.1:0 ARGS` and wait for the address it reports.
    pub fn start(command: &str, args: &[&str], env: &[(&str, &str)]) -> Sbmon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sbmon"))
            .args([command, "--http", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sbmon");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("http://") {
                    let url: String = line[at..].split_whitespace().next().unwrap_or("").into();
                    let _ = tx.send(url);
                }
            }
        });
        let mut sbmon = Sbmon {
            child,
            base: String::new(),
        };
        sbmon.base = rx
            .recv_timeout(Duration::from_secs(90))
            .expect("sbmon reports its address");
        sbmon
    }

    /// `sbmon serve` watching `image` as target `app`, plus the given extra targets.
    pub fn serve(image: &Image, extra_targets: &[&str]) -> Sbmon {
        let app = format!("app={}", image.sbcl.address);
        let mut args = vec!["--target", app.as_str()];
        for t in extra_targets {
            args.extend(["--target", t]);
        }
        Sbmon::start("serve", &args, &[])
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub async fn rpc(&self, body: Value) -> Value {
        self.post("/rpc", body.to_string()).await.1
    }

    pub async fn post(&self, path: &str, body: String) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// `promtool check metrics` accepts `text` without a finding.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by tools/setup");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{said}"
    );
    assert!(said.trim().is_empty(), "promtool lint findings:\n{said}");
}

/// A catalog over the test's image as target `test`, offering `allow` and auditing to `audit`.
pub fn catalog_over(
    image: &Image,
    allow: sbmon::tools::Allow,
    audit: sbmon::audit::Audit,
) -> Catalog {
    let target = Target::new("test", image.sbcl.address.clone(), ClientOptions::default());
    Catalog::with_policy(
        Arc::new(Targets::new(vec![target])),
        Arc::new(Config::default()),
        allow,
        audit,
    )
}

/// Runs the sbmon binary once with `args`, its runtime directory `runtime_dir`.
pub fn sbmon(args: &[&str], runtime_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args(args)
        .env("XDG_RUNTIME_DIR", runtime_dir)
        .output()
        .expect("run sbmon")
}

/// A process's output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
