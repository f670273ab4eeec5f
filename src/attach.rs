//! Attaching to an image that runs Swank but not the agent: `sbmon attach` writes the agent
//! embedded in this binary to a private directory, asks the image (through Swank) to load it
//! from there and start it, and checks the agent's handshake. `sbmon detach` stops it again
//! through Swank, leaving the image's threads, files and GC functions as before the attach.
//!
//! Only an image on this machine can be attached: it loads the agent from a file sbmon wrote,
//! and sbmon reads the image's `/proc` anyway. Whoever can reach an image's Swank can already
//! evaluate anything in it, so attaching and detaching through Swank gives nobody a power
//! they did not have; the agent itself has no operation that stops it.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::agent::{Address, AgentClient, AgentError, ClientOptions, address};
use crate::launch::{self, AgentAllow, LaunchOptions};
use crate::swank::{Swank, SwankError};
use crate::wire::Sexp;

/// How long Swank may take to answer its first, cheap request.
const FIRST_ANSWER: Duration = Duration::from_secs(10);

/// Where a Swank server listens: `[NAME=]swank:HOST:PORT` on `serve --attach`, `HOST:PORT`
/// on `attach --swank`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwankAddress {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for SwankAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for SwankAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.strip_prefix("swank:").unwrap_or(text);
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?}: give the Swank server as HOST:PORT"))?;
        let port = port
            .parse()
            .map_err(|_| format!("{text:?}: {port:?} is not a port number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{text:?}: empty host"));
        }
        Ok(SwankAddress {
            host: host.to_string(),
            port,
        })
    }
}

/// `[NAME=]swank:HOST:PORT`, as `serve --attach` takes it.
pub fn parse_attach_spec(spec: &str) -> Result<(Option<String>, SwankAddress), String> {
    let (name, rest) = match spec.split_once('=') {
        Some((name, rest)) => (Some(name.to_string()), rest),
        None => (None, spec),
    };
    if !rest.starts_with("swank:") {
        return Err(format!(
            "--attach {spec:?}: give [NAME=]swank:HOST:PORT, e.g. orders=swank:127.0.0.1:4005"
        ));
    }
    if let Some(name) = &name {
        check_name(name)?;
    }
    Ok((name, rest.parse()?))
}

/// An image name the agent accepts.
pub fn check_name(name: &str) -> Result<(), String> {
    if address::valid_image_name(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1 to 40 letters, digits, '.', '_' or '-', not starting \
             with '.' or '-'"
        ))
    }
}

#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub swank: SwankAddress,
    /// The Swank secret; `None` uses `~/.slime-secret` when it exists, as SLIME does.
    pub secret_file: Option<PathBuf>,
    pub name: Option<String>,
    /// Where the agent listens; `None` is its default socket in the image's runtime dir.
    pub socket: Option<PathBuf>,
    pub allow: AgentAllow,
    /// How long loading and starting the agent may take.
    pub timeout: Duration,
}

/// What `attach` found and did.
#[derive(Debug, Clone, Serialize)]
pub struct Attached {
    /// The target spec to watch the image with.
    pub target: String,
    pub pid: i32,
    pub name: Option<String>,
    /// `started`, `replaced` (an agent of another version was stopped first), `running` (this
    /// agent version already ran: nothing changed) or `newer-running` (a newer agent runs:
    /// left alone).
    pub outcome: &'static str,
    pub agent_version: String,
    /// The version that was replaced, with `replaced`.
    pub replaced_version: Option<String>,
    /// Warnings the agent's compilation signalled in the image (none expected).
    pub warnings: Vec<String>,
    /// What loading and starting printed (captured, never the image's own output).
    pub output: String,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Swank(#[from] SwankError),
    #[error(
        "{0} is not on this machine: sbmon attaches only to local images (the image loads the \
         agent from a file sbmon writes, and sbmon reads its /proc)"
    )]
    NotLocal(String),
    #[error(
        "the Swank server at {swank} checks the secret in {image_file}, and {given} holds \
         another: sbmon sent nothing (after a wrong secret, SLIME 2.27's listener stops, and an \
         image with its debugger disabled exits). Pass --secret-file {image_file}"
    )]
    WrongSecret {
        swank: String,
        image_file: String,
        given: String,
    },
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("the image at {addr} is {lisp}, not SBCL")]
    NotSbcl { addr: String, lisp: String },
    #[error("cannot write the agent's files to {dir}: {source}")]
    Files { dir: String, source: std::io::Error },
    #[error("the image could not load or start the agent: {message}{}", output_note(.output))]
    Failed { message: String, output: String },
    #[error("the image answered something unexpected: {0}")]
    Unexpected(String),
    #[error("the agent started at {target} but does not answer: {source}")]
    NoHandshake {
        target: String,
        source: Box<AgentError>,
    },
    #[error(
        "--target {target} is the agent of pid {agent_pid}, but the Swank server at {swank} \
         belongs to pid {swank_pid}"
    )]
    OtherImage {
        target: String,
        agent_pid: i32,
        swank: String,
        swank_pid: i32,
    },
}

fn output_note(output: &str) -> String {
    if output.trim().is_empty() {
        String::new()
    } else {
        format!(
            "\nits output:\n{}",
            crate::echo::clip_to(output.trim(), 2000)
        )
    }
}

/// The directory sbmon writes this agent version's files to: `<runtime dir>/agent-VERSION`,
/// mode 0700 (created so, with the runtime dir, when absent).
pub fn agent_dir() -> PathBuf {
    address::runtime_dir().join(format!("agent-{}", launch::agent_version()))
}

fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The pid of the local process listening on TCP `port` (from /proc/net/tcp{,6} and the
/// processes' fds this user can read), if it can be found.
fn listener_pid(port: u16) -> Option<i32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening = *state == "0A";
            let on_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            if let Ok(link) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| link.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// The secret the Swank server of local process `pid` checks, the first line of its
/// `$HOME/.slime-secret`: `Some(None)` when it has none, `None` when that cannot be read.
fn image_secret(pid: i32) -> Option<Option<(String, PathBuf)>> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let home = environ
        .split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(b"HOME="))
        .map(|h| PathBuf::from(String::from_utf8_lossy(h).into_owned()))?;
    let path = home.join(".slime-secret");
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
        Err(_) => None,
        Ok(_) => crate::swank::read_secret(&path)
            .ok()
            .map(|s| Some((s, path))),
    }
}

/// The secret to send. SLIME 2.27's Swank does not survive a wrong one well (its listener
/// stops; with the debugger disabled the whole image exits), so when the image's own secret
/// can be read, a different one is never sent: the image's is used, or the given one refused.
fn choose_secret(
    swank: &SwankAddress,
    explicit: Option<&Path>,
) -> Result<Option<(String, PathBuf)>, AttachError> {
    let given = match explicit {
        Some(path) => Some((crate::swank::read_secret(path)?, path.to_path_buf())),
        None => None,
    };
    let Some(required) = listener_pid(swank.port).and_then(image_secret) else {
        return match given {
            Some(g) => Ok(Some(g)),
            None => Ok(crate::swank::secret_from(None)?),
        };
    };
    match (required, given) {
        (None, _) => Ok(None),
        (Some(required), None) => Ok(Some(required)),
        (Some((secret, path)), Some((mine, mine_path))) if secret != mine => {
            Err(AttachError::WrongSecret {
                swank: swank.to_string(),
                image_file: path.display().to_string(),
                given: mine_path.display().to_string(),
            })
        }
        (Some(_), Some(given)) => Ok(Some(given)),
    }
}

fn check_local(swank: &SwankAddress) -> Result<(), AttachError> {
    let addrs: Vec<_> = (swank.host.as_str(), swank.port)
        .to_socket_addrs()
        .map_err(|e| AttachError::Resolve(swank.to_string(), e.to_string()))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(AttachError::NotLocal(swank.to_string()));
    }
    Ok(())
}

/// What the image says before anything is changed.
#[derive(Debug)]
struct ImageState {
    pid: i32,
    lisp: String,
    agent_version: Option<String>,
    agent_name: Option<String>,
    agent_address: Option<String>,
}

const STATE_FORM: &str = r#"(let ((p (find-package "SBMON-AGENT")))
  (flet ((value (name) (let ((s (and p (find-symbol name p)))) (and s (boundp s) (symbol-value s)))))
    (list :pid (let ((u (find-package "SB-UNIX")))
                 (if u (funcall (find-symbol "UNIX-GETPID" u)) 0))
          :lisp (lisp-implementation-type)
          :agent (value "*VERSION*")
          :name (value "*NAME*")
          :address (let ((s (and p (find-symbol "ADDRESS" p))))
                     (and s (fboundp s) (funcall s))))))"#;

/// The value printed by Swank, read back.
fn read_value(printed: &str) -> Result<Sexp, AttachError> {
    Sexp::parse(printed).map_err(|e| AttachError::Unexpected(format!("{e}: {printed}")))
}

fn string_of(value: &Sexp, key: &str) -> Option<String> {
    value.get(key).and_then(Sexp::as_str).map(str::to_string)
}

async fn image_state(swank: &mut Swank) -> Result<ImageState, AttachError> {
    let value = read_value(&swank.eval(STATE_FORM, FIRST_ANSWER).await?)?;
    Ok(ImageState {
        pid: value.get("pid").and_then(Sexp::as_int).unwrap_or(0) as i32,
        lisp: string_of(&value, "lisp").unwrap_or_default(),
        agent_version: string_of(&value, "agent"),
        agent_name: string_of(&value, "name"),
        agent_address: string_of(&value, "address"),
    })
}

/// Load the agent from `path` into the image, replacing an agent of another version (stopped,
/// its package deleted, so that nothing is redefined over it), and start it with `start`.
/// Everything it prints is captured and every warning collected, never shown to the host.
fn install_form(path: &Path, start: &str) -> String {
    const FORM: &str = r#"(let ((out (make-string-output-stream)) (warnings '()) (replaced nil))
  (flet ((result (&rest more)
           (list* :warnings (reverse warnings) :output (get-output-stream-string out) more)))
    (handler-case
        (let ((*standard-output* out) (*error-output* out) (*trace-output* out)
              (*load-verbose* nil) (*load-print* nil)
              (*compile-verbose* nil) (*compile-print* nil))
          (let ((old (find-package "SBMON-AGENT")))
            (when old
              (let ((v (find-symbol "*VERSION*" old)))
                (unless (and v (boundp v) (equal (symbol-value v) {{VERSION}}))
                  (setf replaced (if (and v (boundp v)) (princ-to-string (symbol-value v)) "unknown"))
                  (let ((stop (find-symbol "STOP" old)))
                    (when (and stop (fboundp stop)) (funcall stop)))
                  (delete-package old)))))
          (unless (find-package "SBMON-AGENT")
            (handler-bind ((warning (lambda (w)
                                      (push (princ-to-string w) warnings)
                                      (muffle-warning w))))
              {{LOAD}}))
          (result :ok {{START}} :replaced replaced))
      (serious-condition (c) (result :error (princ-to-string c))))))"#;
    let start = start.replacen(
        "(sbmon-agent:start",
        "(funcall (find-symbol \"START\" \"SBMON-AGENT\")",
        1,
    );
    FORM.replace(
        "{{VERSION}}",
        &Sexp::string(launch::agent_version()).to_string(),
    )
    .replace("{{LOAD}}", &launch::load_form(path))
    .replace("{{START}}", &start)
}

/// Dotted version numbers, compared number by number; `None` for anything else.
fn version_key(version: &str) -> Option<Vec<u64>> {
    version.split('.').map(|n| n.parse().ok()).collect()
}

fn is_newer(running: &str, ours: &str) -> bool {
    matches!((version_key(running), version_key(ours)), (Some(a), Some(b)) if a > b)
}

/// Attach to the image behind a Swank server; see the module doc.
pub async fn attach(options: &AttachOptions) -> Result<Attached, AttachError> {
    let began = Instant::now();
    check_local(&options.swank)?;
    let secret = choose_secret(&options.swank, options.secret_file.as_deref())?;
    let mut swank = Swank::connect(
        &options.swank.host,
        options.swank.port,
        secret,
        FIRST_ANSWER,
    )
    .await?;
    let state = image_state(&mut swank).await?;
    if state.lisp != "SBCL" {
        return Err(AttachError::NotSbcl {
            addr: options.swank.to_string(),
            lisp: state.lisp,
        });
    }
    let ours = launch::agent_version();
    let running = state.agent_address.is_some();
    let done = |outcome, address: String, version: String| Attached {
        target: format!("unix:{address}"),
        pid: state.pid,
        name: state.agent_name.clone(),
        outcome,
        agent_version: version,
        replaced_version: None,
        warnings: Vec::new(),
        output: String::new(),
        seconds: began.elapsed().as_secs_f64(),
    };
    if let (true, Some(version), Some(address)) =
        (running, &state.agent_version, &state.agent_address)
    {
        if version == ours {
            return Ok(done("running", address.clone(), version.clone()));
        }
        if is_newer(version, ours) {
            return Ok(done("newer-running", address.clone(), version.clone()));
        }
    }
    let dir = agent_dir();
    let path = private_dir(&dir)
        .and_then(|()| launch::write_agent_files(&dir))
        .map_err(|source| AttachError::Files {
            dir: dir.display().to_string(),
            source,
        })?;
    let start = launch::start_form(&LaunchOptions {
        listen: options.socket.clone().map(Address::Unix),
        allow: options.allow,
        name: options.name.clone(),
        ..LaunchOptions::default()
    });
    let value = read_value(
        &swank
            .eval(&install_form(&path, &start), options.timeout)
            .await?,
    )?;
    let warnings: Vec<String> = value
        .get("warnings")
        .and_then(Sexp::as_list)
        .unwrap_or_default()
        .iter()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect();
    let output = string_of(&value, "output").unwrap_or_default();
    if let Some(message) = string_of(&value, "error") {
        return Err(AttachError::Failed { message, output });
    }
    let address = string_of(&value, "ok")
        .ok_or_else(|| AttachError::Unexpected(crate::echo::clip(&value.to_string())))?;
    let replaced_version = string_of(&value, "replaced");
    let target = format!("unix:{address}");
    // The handshake: the agent answers at the address it gave, for this very image.
    let client = AgentClient::new(Address::Unix(address.into()), ClientOptions::default());
    let welcome = client
        .welcome()
        .await
        .map_err(|source| AttachError::NoHandshake {
            target: target.clone(),
            source: Box::new(source),
        })?;
    if welcome.pid != state.pid {
        return Err(AttachError::Unexpected(format!(
            "the agent at {target} is pid {}, the image is pid {}",
            welcome.pid, state.pid
        )));
    }
    Ok(Attached {
        target,
        pid: state.pid,
        name: welcome.name.clone(),
        outcome: if replaced_version.is_some() {
            "replaced"
        } else {
            "started"
        },
        agent_version: welcome.agent_version.clone(),
        replaced_version,
        warnings,
        output,
        seconds: began.elapsed().as_secs_f64(),
    })
}

/// What `detach` did.
#[derive(Debug, Clone, Serialize)]
pub struct Detached {
    pub pid: i32,
    /// `stopped`, `not-running` (the agent was loaded but stopped) or `absent` (never loaded).
    pub outcome: String,
}

const DETACH_FORM: &str = r#"(let ((p (find-package "SBMON-AGENT")) (out (make-string-output-stream)))
  (handler-case
      (let ((*standard-output* out) (*error-output* out) (*trace-output* out))
        (if p
            (let* ((stop (find-symbol "STOP" p))
                   (was (and stop (fboundp stop) (funcall stop))))
              (delete-package p)
              (list :ok (if was "stopped" "not-running")))
            (list :ok "absent")))
    (serious-condition (c)
      (list :error (princ-to-string c) :output (get-output-stream-string out)))))"#;

/// Stop the agent in the image behind a Swank server and forget its package: its threads,
/// socket, exit hook and GC wrappers go (`sbmon-agent:stop`), and the image is as it was
/// before the attach. With `target`, first check that it is the agent of that same image.
pub async fn detach(
    swank_addr: &SwankAddress,
    secret_file: Option<&Path>,
    target: Option<&Address>,
    timeout: Duration,
) -> Result<Detached, AttachError> {
    check_local(swank_addr)?;
    let secret = choose_secret(swank_addr, secret_file)?;
    let mut swank = Swank::connect(&swank_addr.host, swank_addr.port, secret, FIRST_ANSWER).await?;
    let state = image_state(&mut swank).await?;
    if let Some(target) = target {
        let client = AgentClient::new(target.clone(), ClientOptions::default());
        let welcome = client
            .welcome()
            .await
            .map_err(|source| AttachError::NoHandshake {
                target: target.to_string(),
                source: Box::new(source),
            })?;
        if welcome.pid != state.pid {
            return Err(AttachError::OtherImage {
                target: target.to_string(),
                agent_pid: welcome.pid,
                swank: swank_addr.to_string(),
                swank_pid: state.pid,
            });
        }
    }
    let value = read_value(&swank.eval(DETACH_FORM, timeout).await?)?;
    if let Some(message) = string_of(&value, "error") {
        return Err(AttachError::Failed {
            message,
            output: string_of(&value, "output").unwrap_or_default(),
        });
    }
    Ok(Detached {
        pid: state.pid,
        outcome: string_of(&value, "ok").unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_swank_addresses_and_attach_specs() {
        let a: SwankAddress = "127.0.0.1:4005".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 4005));
        assert_eq!(
            "swank:[::1]:4005".parse::<SwankAddress>().unwrap().host,
            "::1"
        );
        assert!("localhost".parse::<SwankAddress>().is_err());
        assert!("h:99999".parse::<SwankAddress>().is_err());
        let (name, addr) = parse_attach_spec("orders=swank:localhost:4005").unwrap();
        assert_eq!(name.as_deref(), Some("orders"));
        assert_eq!(addr.port, 4005);
        assert!(parse_attach_spec("localhost:4005").is_err());
        assert!(parse_attach_spec("a/b=swank:localhost:4005").is_err());
    }

    #[test]
    fn newer_versions_are_left_alone() {
        assert!(is_newer("0.2.0", "0.1.0"));
        assert!(is_newer("0.10.0", "0.9.1"));
        assert!(!is_newer("0.1.0", "0.1.0"));
        assert!(!is_newer("0.0.9", "0.1.0"));
        assert!(!is_newer("dev", "0.1.0"));
    }

    #[test]
    fn the_install_form_names_no_agent_symbol_before_the_load() {
        let form = install_form(
            Path::new("/x/sbmon-agent.lisp"),
            "(sbmon-agent:start :name \"o\")",
        );
        // Swank reads the whole form before the agent's package exists.
        assert!(!form.contains("sbmon-agent:"), "{form}");
        // the fasl sbmon wrote beside the source, else the source
        assert!(form.contains("\"/x/sbmon-agent.lisp\""), "{form}");
        assert!(
            form.contains("(load fasl)") && form.contains("(load source)"),
            "{form}"
        );
        assert!(form.contains(&format!("\"{}\"", launch::agent_version())));
    }

    #[test]
    fn localhost_is_local_and_other_hosts_are_not() {
        assert!(check_local(&"127.0.0.1:1".parse().unwrap()).is_ok());
        assert!(check_local(&"[::1]:1".parse().unwrap()).is_ok());
        assert!(matches!(
            check_local(&"192.0.2.1:1".parse().unwrap()),
            Err(AttachError::NotLocal(_))
        ));
    }
}

#[cfg(test)]
mod listener_tests {
    #[test]
    fn finds_the_process_listening_on_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(super::listener_pid(port), Some(std::process::id() as i32));
        drop(listener);
    }
}
