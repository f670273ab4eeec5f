//! Starting an SBCL with the agent loaded and started, and stopping it again on every exit
//! path. `sbmon demo` and the integration tests use it. The agent source is embedded in the
//! binary, so a launched image needs nothing but `sbcl` on the machine.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::{Address, AgentClient, ClientOptions, address};
use crate::wire::Sexp;

/// The agent, as shipped in `lisp/sbmon-agent.lisp`.
pub const AGENT_SOURCE: &str = include_str!("../lisp/sbmon-agent.lisp");
/// The agent's heap part, which it loads on first use from the directory it was loaded from
/// (docs/protocol.md, "Heap operations").
pub const AGENT_HEAP_SOURCE: &str = include_str!("../lisp/sbmon-agent-heap.lisp");
/// The agent's control and eval part (gc_run, gc_tune, kill_thread, profile, eval,
/// reload_system), loaded the same way on the first of those calls: an image never asked
/// for them carries none of their code or classes.
pub const AGENT_CONTROL_SOURCE: &str = include_str!("../lisp/sbmon-agent-control.lisp");
/// Every file of the agent, as (file name, source): what `launch` and `attach` write to the
/// directory the image loads the agent from. The agent loads any further part it needs from
/// the directory its own file was loaded from, so a part is one more entry here.
pub const AGENT_FILES: &[(&str, &str)] = &[
    ("sbmon-agent.lisp", AGENT_SOURCE),
    ("sbmon-agent-heap.lisp", AGENT_HEAP_SOURCE),
    ("sbmon-agent-control.lisp", AGENT_CONTROL_SOURCE),
];
/// The file the image loads (the others are loaded by it when needed).
pub const AGENT_MAIN: &str = "sbmon-agent.lisp";

/// The agent version embedded in this binary: `(defparameter *version* "...")` of the source.
pub fn agent_version() -> &'static str {
    const MARK: &str = "(defparameter *version* \"";
    AGENT_SOURCE
        .find(MARK)
        .map(|at| &AGENT_SOURCE[at + MARK.len()..])
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("unknown")
}

/// Write the agent's files into `dir` (which must exist); returns the path of the file to
/// load. Each file is written whole under a temporary name and renamed into place, so an
/// image loading it at the same moment never reads half of one.
pub fn write_agent_files(dir: &Path) -> std::io::Result<PathBuf> {
    for (name, source) in AGENT_FILES {
        let partial = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&partial, source)?;
        std::fs::rename(&partial, dir.join(name))?;
    }
    Ok(dir.join(AGENT_MAIN))
}

/// The form that loads the agent file at `path` into an image: compiled first to a fasl of a
/// name of its own beside it (deleted once loaded), else, when that cannot be written or
/// fails, from source. Code loaded from a fasl costs every later nursery collection of the
/// image far less than the same file loaded as source (README, "The agent's cost to its
/// host"); compiling first takes no longer than loading source, which compiles each form too.
pub fn load_form(path: &Path) -> String {
    const FORM: &str = r#"(let* ((source {{PATH}})
       (fasl (make-pathname :name (format nil "sbmon-agent-~36r"
                                          (random (expt 36 10) (make-random-state t)))
                            :type "fasl" :defaults source)))
  (unwind-protect
       (let ((compiled (ignore-errors
                        (multiple-value-bind (out warnings-p failure-p)
                            ;; the compiler's notes are for the agent's authors; its
                            ;; warnings still reach the caller's handlers
                            (let ((*compile-verbose* nil) (*compile-print* nil)
                                  (*standard-output* (make-broadcast-stream))
                                  (*error-output* (make-broadcast-stream)))
                              (compile-file source :output-file fasl))
                          (declare (ignore warnings-p))
                          (and out (not failure-p) out)))))
         ;; compiling defined the file's macros and compile-time functions already; their
         ;; second definition, from the fasl, is no news
         (let ((redefinition (find-symbol "REDEFINITION-WARNING" "SB-KERNEL")))
           (handler-bind ((warning (lambda (w)
                                     (when (and compiled redefinition (typep w redefinition))
                                       (muffle-warning w)))))
             (load (or compiled source)))))
    (when (probe-file fasl) (delete-file fasl))))"#;
    FORM.replace(
        "{{PATH}}",
        &Sexp::string(path.to_string_lossy()).to_string(),
    )
}

/// The demo workload, as shipped in `examples/workload.lisp`.
pub const WORKLOAD_SOURCE: &str = include_str!("../examples/workload.lisp");

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The SBCL executable.
    pub sbcl: PathBuf,
    /// SBCL runtime options, e.g. `--dynamic-space-size 512MB`.
    pub runtime_args: Vec<String>,
    /// Where the agent listens (a Unix socket path, or a TCP port on 127.0.0.1); `None`
    /// uses its default `<runtime dir>/<pid>.sock`.
    pub listen: Option<Address>,
    /// Extra environment variables for SBCL (e.g. `HOME`, `XDG_RUNTIME_DIR`).
    pub env: Vec<(String, String)>,
    /// Forms evaluated after the agent is loaded, before it starts.
    pub before_start: Vec<String>,
    /// Forms evaluated after the agent started (the image then idles until stopped).
    pub after_start: Vec<String>,
    /// Further SBCL toplevel options (`--load app.lisp`, `--eval ...`), processed after that.
    pub toplevel_args: Vec<String>,
    /// How long the agent waits for a new connection's hello (`:hello-timeout`); `None`
    /// keeps the agent's default (10 s).
    pub hello_timeout: Option<Duration>,
    /// Classes of operations beyond read that the agent serves (`:allow`); read-only by
    /// default, like sbmon itself.
    pub allow: AgentAllow,
    /// The image's name (`:name`): the target's name, and part of its default socket's.
    pub name: Option<String>,
}

/// What an agent serves beyond its read operations: `(sbmon-agent:start :allow '(:read ...))`
/// (docs/protocol.md, "Operation classes"). The classes are those of sbmon's `--allow`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentAllow {
    /// `:control`: gc-run, gc-tune, kill-thread, profile.
    pub control: bool,
    /// `:eval`: eval, reload-system.
    pub eval: bool,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            sbcl: PathBuf::from("sbcl"),
            runtime_args: Vec::new(),
            listen: None,
            env: Vec::new(),
            before_start: Vec::new(),
            after_start: Vec::new(),
            toplevel_args: Vec::new(),
            hello_timeout: None,
            allow: AgentAllow::default(),
            name: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start {sbcl}: {source} (install SBCL, e.g. with tools/setup, or pass --sbcl)")]
    Spawn {
        sbcl: String,
        source: std::io::Error,
    },
    #[error("cannot prepare a scratch directory: {0}")]
    Scratch(std::io::Error),
    #[error("SBCL exited before its agent answered ({status}); its output ends with:\n{log}")]
    Exited { status: String, log: String },
    #[error(
        "the agent in SBCL pid {pid} did not answer within {timeout:?}; its output ends with:\n{log}"
    )]
    NotReady {
        pid: i32,
        timeout: Duration,
        log: String,
    },
}

/// The `(sbmon-agent:start ...)` form for `options`.
pub fn start_form(options: &LaunchOptions) -> String {
    let mut form = String::from("(sbmon-agent:start");
    if let Some(name) = &options.name {
        form += &format!(" :name {}", Sexp::string(name.as_str()));
    }
    match &options.listen {
        Some(Address::Unix(path)) => {
            form += &format!(" :socket {}", Sexp::string(path.to_string_lossy()))
        }
        Some(Address::Tcp { port, .. }) => form += &format!(" :port {port}"),
        None => {}
    }
    if options.allow.control || options.allow.eval {
        form += " :allow '(:read";
        if options.allow.control {
            form += " :control";
        }
        if options.allow.eval {
            form += " :eval";
        }
        form.push(')');
    }
    if let Some(timeout) = options.hello_timeout {
        form += &format!(" :hello-timeout {}", Sexp::Float(timeout.as_secs_f64()));
    }
    form.push(')');
    form
}

/// A running SBCL that this process started; stopped when dropped.
pub struct Sbcl {
    child: Child,
    pub pid: i32,
    pub address: Address,
    scratch: tempfile::TempDir,
}

impl Sbcl {
    /// Start SBCL; call `wait_ready` before using its agent.
    pub fn spawn(options: &LaunchOptions) -> Result<Sbcl, LaunchError> {
        let scratch = tempfile::Builder::new()
            .prefix("sbmon-launch-")
            .tempdir()
            .map_err(LaunchError::Scratch)?;
        let agent_path = write_agent_files(scratch.path()).map_err(LaunchError::Scratch)?;
        let log =
            std::fs::File::create(scratch.path().join("sbcl.log")).map_err(LaunchError::Scratch)?;
        let log_err = log.try_clone().map_err(LaunchError::Scratch)?;

        let start = start_form(options);
        let mut cmd = Command::new(&options.sbcl);
        cmd.envs(options.env.iter().map(|(k, v)| (k, v)))
            .args(&options.runtime_args)
            .args(["--noinform", "--end-runtime-options"])
            .args(["--no-sysinit", "--no-userinit", "--disable-debugger"])
            .arg("--eval")
            .arg(load_form(&agent_path));
        let forms = options
            .before_start
            .iter()
            .chain(std::iter::once(&start))
            .chain(&options.after_start);
        for form in forms {
            cmd.arg("--eval").arg(form);
        }
        cmd.args(&options.toplevel_args)
            .args(["--eval", "(loop (sleep 3600))"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // If sbmon dies without running its cleanup (SIGKILL, a crash), the kernel kills the
        // SBCL it started: an image launched by sbmon never outlives it.
        // SAFETY: prctl is async-signal-safe and touches only the child being set up.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            sbcl: options.sbcl.display().to_string(),
            source,
        })?;
        let pid = child.id() as i32;
        let address = match &options.listen {
            Some(Address::Tcp { port, .. }) => Address::Tcp {
                host: "127.0.0.1".into(),
                port: *port,
            },
            Some(unix) => unix.clone(),
            // The agent computes its directory from SBCL's environment, which may differ.
            None => {
                let runtime_dir = options
                    .env
                    .iter()
                    .find(|(k, _)| k == "XDG_RUNTIME_DIR")
                    .map(|(_, v)| Path::new(v).join("sbmon"))
                    .unwrap_or_else(address::runtime_dir);
                let file = match &options.name {
                    Some(name) => format!("{pid}-{name}.sock"),
                    None => format!("{pid}.sock"),
                };
                Address::Unix(runtime_dir.join(file))
            }
        };
        Ok(Sbcl {
            child,
            pid,
            address,
            scratch,
        })
    }

    /// Where this SBCL's own output goes.
    pub fn log_path(&self) -> PathBuf {
        self.scratch.path().join("sbcl.log")
    }

    /// The last lines SBCL printed, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Wait until the agent answers a handshake (`options` carries a TCP agent's token).
    pub async fn wait_ready(
        &mut self,
        timeout: Duration,
        options: &ClientOptions,
    ) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        let options = ClientOptions {
            connect_timeout: Duration::from_secs(1),
            ..options.clone()
        };
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LaunchError::Exited {
                    status: status.to_string(),
                    log: self.log_tail(),
                });
            }
            let ready = match &self.address {
                Address::Unix(path) => std::fs::symlink_metadata(path).is_ok(),
                Address::Tcp { .. } => true,
            };
            if ready {
                let client = AgentClient::new(self.address.clone(), options.clone());
                if client.welcome().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::NotReady {
                    pid: self.pid,
                    timeout,
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stop SBCL: SIGTERM, then SIGKILL if it has not exited within a second. Idempotent.
    pub fn stop(&mut self) {
        if self.is_running() {
            // SAFETY: kill(2) on our own child's pid; it has not been reaped yet.
            unsafe { libc::kill(self.pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(1);
            while self.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.is_running() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        // A killed image cannot remove its socket; do it so no stale socket is left behind.
        if let Address::Unix(path) = &self.address {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for Sbcl {
    fn drop(&mut self) {
        self.stop();
    }
}
