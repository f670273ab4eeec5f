//! Where agents listen: target specs (`unix:PATH`, `tcp:HOST:PORT`, `pid:N`), the runtime
//! directory the agent uses by default, and discovery of the agents found there.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// How to reach one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid target {spec:?}: {reason} (use unix:PATH, tcp:HOST:PORT or pid:N)")]
pub struct AddressError {
    pub spec: String,
    pub reason: String,
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(spec: &str) -> Result<Self, AddressError> {
        let fail = |reason: &str| AddressError {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(fail("empty socket path"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = spec.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| fail("missing :PORT"))?;
            let port = port.parse().map_err(|_| fail("port is not a number"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(fail("empty host"));
            }
            return Ok(Address::Tcp {
                host: host.to_string(),
                port,
            });
        }
        if let Some(pid) = spec.strip_prefix("pid:") {
            let pid: i32 = pid.parse().map_err(|_| fail("pid is not a number"))?;
            return Ok(Address::Unix(socket_for_pid(pid)));
        }
        Err(fail("unknown scheme"))
    }
}

/// The directory where agents put their sockets by default, as the agent computes it:
/// `$XDG_RUNTIME_DIR/sbmon`, else `/tmp/sbmon-<uid>`.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join("sbmon"),
        // SAFETY: getuid has no preconditions and cannot fail.
        _ => PathBuf::from(format!("/tmp/sbmon-{}", unsafe { libc::getuid() })),
    }
}

/// The default socket of process `pid` in the runtime directory: `<pid>.sock`, or the
/// `<pid>-<name>.sock` of a named image when there is one.
pub fn socket_for_pid(pid: i32) -> PathBuf {
    let dir = runtime_dir();
    discover_in(&dir)
        .into_iter()
        .find(|f| f.pid == pid)
        .map_or_else(|| dir.join(format!("{pid}.sock")), |f| f.path)
}

/// An agent socket found in the runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub pid: i32,
    /// The image's name, from a socket named `<pid>-<name>.sock`.
    pub name: Option<String>,
    pub path: PathBuf,
    /// False when the process that made the socket no longer exists (a stale socket).
    pub process_alive: bool,
}

/// True for a name `(sbmon-agent:start :name ...)` accepts: 1 to 40 ASCII letters, digits,
/// `.`, `_` or `-`, not starting with `.` or `-`.
pub fn valid_image_name(name: &str) -> bool {
    (1..=40).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with(['.', '-'])
}

/// The pid and name in an agent's default socket file name: `<pid>.sock` or
/// `<pid>-<name>.sock`.
pub fn parse_socket_name(file_name: &str) -> Option<(i32, Option<String>)> {
    let stem = file_name.strip_suffix(".sock")?;
    let (pid, name) = match stem.split_once('-') {
        Some((pid, name)) => (pid, Some(name)),
        None => (stem, None),
    };
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if name.is_some_and(|n| !valid_image_name(n)) {
        return None;
    }
    Some((pid.parse().ok()?, name.map(str::to_string)))
}

/// Agent sockets in `dir`, sorted by pid. Files not named `<pid>.sock` or
/// `<pid>-<name>.sock` are ignored.
pub fn discover_in(dir: &Path) -> Vec<Found> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<Found> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let (pid, name) = parse_socket_name(entry.file_name().to_str()?)?;
            Some(Found {
                pid,
                name,
                path: entry.path(),
                process_alive: crate::process::is_alive(pid),
            })
        })
        .collect();
    found.sort_by_key(|f| f.pid);
    found
}

/// Remove the stale sockets of `dir`: files named as agent sockets, that are sockets, and
/// whose process is gone (checked again just before each removal). Returns those removed.
pub fn prune_in(dir: &Path) -> std::io::Result<Vec<Found>> {
    use std::os::unix::fs::FileTypeExt;
    let mut removed = Vec::new();
    for f in discover_in(dir) {
        if f.process_alive || crate::process::is_alive(f.pid) {
            continue;
        }
        let is_socket = std::fs::symlink_metadata(&f.path)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if is_socket {
            std::fs::remove_file(&f.path)?;
            removed.push(f);
        }
    }
    Ok(removed)
}

pub fn discover() -> Vec<Found> {
    discover_in(&runtime_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            "unix:/tmp/x.sock".parse(),
            Ok(Address::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4010".parse(),
            Ok(Address::Tcp {
                host: "127.0.0.1".into(),
                port: 4010
            })
        );
        assert_eq!(
            "tcp:[::1]:4010".parse(),
            Ok(Address::Tcp {
                host: "::1".into(),
                port: 4010
            })
        );
        assert_eq!(
            "pid:99999998".parse::<Address>().unwrap(),
            Address::Unix(runtime_dir().join("99999998.sock"))
        );
        for bad in ["", "unix:", "tcp:host", "tcp:h:99999", "pid:x", "http://x"] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }

    #[test]
    fn discovery_marks_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        std::fs::write(dir.path().join(format!("{me}.sock")), "").unwrap();
        // Pid numbers above pid_max (at most 2^22) never belong to a live process.
        std::fs::write(dir.path().join("99999999.sock"), "").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "").unwrap();
        std::fs::write(dir.path().join("99999997-orders.sock"), "").unwrap();
        std::fs::write(dir.path().join("x-orders.sock"), "").unwrap();
        let found = discover_in(dir.path());
        assert_eq!(found.len(), 3);
        assert_eq!((found[0].pid, found[0].process_alive), (me, true));
        assert_eq!(
            (found[1].pid, found[1].name.as_deref()),
            (99999997, Some("orders"))
        );
        assert_eq!((found[2].pid, found[2].process_alive), (99999999, false));
    }

    #[test]
    fn socket_names_carry_pid_and_name() {
        assert_eq!(parse_socket_name("42.sock"), Some((42, None)));
        assert_eq!(
            parse_socket_name("42-orders-eu.sock"),
            Some((42, Some("orders-eu".into())))
        );
        for bad in [
            "orders.sock",
            "42-.sock",
            "42-.x.sock",
            "-1.sock",
            "42.socket",
            "42-a b.sock",
        ] {
            assert_eq!(parse_socket_name(bad), None, "{bad}");
        }
        assert!(valid_image_name("orders_1.v2"));
        assert!(!valid_image_name(&"x".repeat(41)));
    }

    #[test]
    fn prune_removes_only_dead_processes_sockets() {
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let _live = UnixListener::bind(dir.path().join(format!("{me}-live.sock"))).unwrap();
        let dead = dir.path().join("99999999-gone.sock");
        drop(UnixListener::bind(&dead).unwrap());
        // Named like a socket of a dead process, but a plain file: not sbmon's to remove.
        let plain = dir.path().join("99999998.sock");
        std::fs::write(&plain, "").unwrap();
        let removed = prune_in(dir.path()).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].path, dead);
        assert!(!dead.exists());
        assert!(plain.exists());
        assert!(dir.path().join(format!("{me}-live.sock")).exists());
    }
}
