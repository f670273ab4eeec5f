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

pub fn socket_for_pid(pid: i32) -> PathBuf {
    runtime_dir().join(format!("{pid}.sock"))
}

/// An agent socket found in the runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub pid: i32,
    pub path: PathBuf,
    /// False when the process that made the socket no longer exists (a stale socket).
    pub process_alive: bool,
}

/// Agent sockets in `dir`, sorted by pid. Files not named `<pid>.sock` are ignored.
pub fn discover_in(dir: &Path) -> Vec<Found> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<Found> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name();
            let pid: i32 = name.to_str()?.strip_suffix(".sock")?.parse().ok()?;
            Some(Found {
                pid,
                path: entry.path(),
                process_alive: crate::process::is_alive(pid),
            })
        })
        .collect();
    found.sort_by_key(|f| f.pid);
    found
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
            "pid:42".parse::<Address>().unwrap(),
            Address::Unix(runtime_dir().join("42.sock"))
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
        let found = discover_in(dir.path());
        assert_eq!(found.len(), 2);
        assert_eq!((found[0].pid, found[0].process_alive), (me, true));
        assert_eq!((found[1].pid, found[1].process_alive), (99999999, false));
    }
}
