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

/// Write the agent's files into `dir` (which must exist), and beside each its fasl, compiled
/// by the `sbcl` on the PATH; returns the path of the file to load. See
/// [`write_agent_files_for`].
pub fn write_agent_files(dir: &Path) -> std::io::Result<PathBuf> {
    write_agent_files_for(dir, Path::new("sbcl"))
}

/// Write the agent's files into `dir` (which must exist) and, beside each, its fasl compiled
/// by `sbcl` in a process of its own (once per `sbcl` per process; none when that fails);
/// returns the path of the file to load. Each file is written whole under a temporary name
/// and renamed into place, so an image loading it at the same moment never reads half of one.
///
/// The fasls exist because compiling costs the image that does it: the compiler's caches and
/// interned types, kept in tables SBCL scans, make each of that image's later nursery
/// collections slower, by as much as the rest of the agent together (README, "The agent's
/// cost to its host"). An image whose SBCL cannot load a fasl (another version) loads the
/// source instead ([`load_form`], and the agent's parts likewise).
pub fn write_agent_files_for(dir: &Path, sbcl: &Path) -> std::io::Result<PathBuf> {
    let write = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let partial = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, dir.join(name))
    };
    for (name, source) in AGENT_FILES {
        write(name, source.as_bytes())?;
    }
    if let Some(fasls) = compiled_agent(sbcl) {
        for (name, bytes) in fasls.iter() {
            write(name, bytes)?;
        }
    }
    Ok(dir.join(AGENT_MAIN))
}

/// The file name of the fasl of agent file `name`.
fn fasl_name(name: &str) -> String {
    format!("{}.fasl", name.trim_end_matches(".lisp"))
}

type Fasls = Vec<(String, Vec<u8>)>;

/// The agent's files compiled by `sbcl`, (fasl name, bytes), made once per process; `None`
/// when `sbcl` could not compile them (then images load the sources).
fn compiled_agent(sbcl: &Path) -> Option<std::sync::Arc<Fasls>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Option<Arc<Fasls>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(sbcl.to_path_buf())
        .or_insert_with(|| compile_agent(sbcl).map(Arc::new))
        .clone()
}

fn compile_agent(sbcl: &Path) -> Option<Fasls> {
    let dir = tempfile::Builder::new()
        .prefix("sbmon-compile-")
        .tempdir()
        .ok()?;
    for (name, source) in AGENT_FILES {
        std::fs::write(dir.path().join(name), source).ok()?;
    }
    // The parts are compiled in an image that has loaded the agent: they use its macros.
    let mut form = String::from("(progn");
    for (i, (name, _)) in AGENT_FILES.iter().enumerate() {
        let source = dir.path().join(name);
        let fasl = dir.path().join(fasl_name(name));
        form += &format!(
            " (multiple-value-bind (out warnings-p failure-p) (compile-file {} :output-file {}) (declare (ignore warnings-p)) (unless (and out (not failure-p)) (sb-ext:exit :code 1 :abort t)) {})",
            Sexp::string(source.to_string_lossy()),
            Sexp::string(fasl.to_string_lossy()),
            if i == 0 { "(load out)" } else { "" }
        );
    }
    form += ")";
    let status = Command::new(sbcl)
        .args(["--noinform", "--end-runtime-options"])
        .args(["--no-sysinit", "--no-userinit", "--non-interactive"])
        .args(["--eval", &form])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    if !status.success() {
        tracing::debug!(
            "{} could not compile the agent; images load its source",
            sbcl.display()
        );
        return None;
    }
    AGENT_FILES
        .iter()
        .map(|(name, _)| {
            let fasl = fasl_name(name);
            std::fs::read(dir.path().join(&fasl))
                .ok()
                .map(|b| (fasl, b))
        })
        .collect()
}

/// The form that loads the agent file at `path` into an image: its fasl beside it when there
/// is one and this SBCL loads it, else the source. A fasl SBCL refuses (another version's) is
/// refused before it defines anything.
pub fn load_form(path: &Path) -> String {
    const FORM: &str = r#"(let* ((source {{PATH}})
       (fasl (make-pathname :type "fasl" :defaults source)))
  (unless (and (probe-file fasl)
               (ignore-errors (load fasl) t))
    (load source)))"#;
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

/// Scratch directories are `sbmon-launch-PID-XXXXXX`, PID being the sbmon that made them.
const SCRATCH_PREFIX: &str = "sbmon-launch-";

/// Remove the scratch directories in `tmp` that an sbmon no longer running left behind: one
/// that was SIGKILLed never dropped its own. Only this user's, and only where the PID in the
/// name is gone; a directory whose name has no PID (an older sbmon's) is left alone.
fn prune_scratch(tmp: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    let uid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let owned = entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if owned && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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
        let tmp = std::env::temp_dir();
        prune_scratch(&tmp);
        let scratch = tempfile::Builder::new()
            .prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id()))
            .tempdir_in(&tmp)
            .map_err(LaunchError::Scratch)?;
        let agent_path =
            write_agent_files_for(scratch.path(), &options.sbcl).map_err(LaunchError::Scratch)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_removes_only_a_gone_sbmons_scratch() {
        let tmp = tempfile::tempdir().unwrap();
        // A pid that has just exited, and so is gone.
        let mut done = Command::new("true").spawn().unwrap();
        let gone = done.id();
        done.wait().unwrap();
        let dead = tmp.path().join(format!("{SCRATCH_PREFIX}{gone}-abc"));
        let live = tmp
            .path()
            .join(format!("{SCRATCH_PREFIX}{}-abc", std::process::id()));
        let old_style = tmp.path().join(format!("{SCRATCH_PREFIX}Xy12Ab"));
        for dir in [&dead, &live, &old_style] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("sbcl.log"), "").unwrap();
        }
        prune_scratch(tmp.path());
        assert!(!dead.exists(), "a gone sbmon's scratch is removed");
        assert!(live.exists(), "a running sbmon's scratch stays");
        assert!(old_style.exists(), "a name without a pid is left alone");
    }
}
