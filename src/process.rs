//! What Linux /proc says about the target process and its threads.
//!
//! The Lisp agent reports what SBCL itself knows (heap, GC, Lisp threads); sbmon adds what the
//! kernel knows — resident memory, CPU time, file descriptors, per-thread state and the memory
//! limit that actually applies — so the two views can be read side by side.
//!
//! Everything here is called on every scrape, so each function reads only the files it needs,
//! each once, and the system-wide constants (clock ticks, boot time, physical memory) are read
//! once per sbmon process.
//!
//! The reads whose cost the target sets (a `readlink` per open fd, two files per thread) run
//! in a [`blocking::section`](crate::blocking::section), so an image with 100k fds slows its
//! own reading but never the runtime that serves everyone else.

use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use procfs::ProcessCGroup;
use procfs::process::{Process, Stat, Status, Task};
use procfs::{Current, FromRead, ProcError};
use serde::{Deserialize, Serialize};

/// Where cgroup hierarchies are mounted (v2 directly, v1 one directory per controller).
const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// cgroup v1 reports "no limit" as a huge page-aligned number (e.g. 0x7FFFFFFFFFFFF000).
const CGROUP_V1_UNLIMITED: u64 = 1 << 62;
const PHYSICAL_MEMORY_SOURCE: &str = "physical memory (MemTotal)";

/// OS-level figures for one process, taken from `/proc/PID/{stat,status,limits,fd,cgroup}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProcessSnapshot {
    /// Process id.
    pub pid: i32,
    /// Kernel command name (`comm`, at most 15 bytes).
    pub comm: String,
    /// Resident set size (`VmRSS` in /proc/PID/status), in bytes.
    pub rss_bytes: u64,
    /// Peak resident set size (`VmHWM`), in bytes.
    pub rss_peak_bytes: u64,
    /// Virtual memory size (`VmSize` in /proc/PID/status), in bytes.
    pub virtual_bytes: u64,
    /// CPU time spent in user mode, in seconds.
    pub cpu_user_seconds: f64,
    /// CPU time spent in the kernel, in seconds.
    pub cpu_system_seconds: f64,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_unix: f64,
    /// Seconds since the process started.
    pub uptime_seconds: f64,
    /// Number of threads (tasks) in the process.
    pub num_threads: u64,
    /// Number of open file descriptors (entries in /proc/PID/fd).
    pub open_fds: u64,
    /// Soft "Max open files" limit; `None` if unlimited.
    pub max_fds: Option<u64>,
    /// How many of the open file descriptors are sockets.
    pub socket_count: u64,
    /// The memory limit that applies to the process.
    pub memory_limit: MemoryLimit,
}

/// A memory limit and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MemoryLimit {
    /// The limit, in bytes.
    pub bytes: u64,
    /// Where the limit was found, e.g. `cgroup v2 memory.max (/sys/fs/cgroup/system.slice/foo)`,
    /// `cgroup v1 memory.limit_in_bytes (...)` or `physical memory (MemTotal)`.
    pub source: String,
}

/// One task (thread) of a process, from `/proc/PID/task/TID/{stat,wchan}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TaskInfo {
    /// Thread id.
    pub tid: i32,
    /// Thread name (`comm`; set by e.g. `pthread_setname_np`).
    pub comm: String,
    /// Scheduler state in words: "running", "sleeping", "disk wait", "stopped",
    /// "tracing stop", "zombie", "dead", "idle", "parked", ...
    pub state: String,
    /// Scheduler state as the kernel writes it: 'R', 'S', 'D', ...
    pub state_code: char,
    /// CPU time (user + system) used by this thread, in seconds.
    pub cpu_seconds: f64,
    /// Kernel function the thread is waiting in, if known.
    pub wchan: Option<String>,
}

/// Why reading /proc (or the cgroup files) failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("invalid pid {pid}: process ids are positive integers")]
    InvalidPid { pid: i32 },
    #[error("process {pid} does not exist (it may have exited)")]
    NotFound { pid: i32 },
    #[error("thread {tid} of process {pid} does not exist (it may have exited)")]
    TaskNotFound { pid: i32, tid: i32 },
    #[error("{pid} is a thread of process {tgid}, not a process: use pid {tgid}")]
    NotAProcess { pid: i32, tgid: i32 },
    #[error(
        "permission denied reading {}: run sbmon as the same user as the SBCL process (or as root)",
        path.display()
    )]
    PermissionDenied { path: PathBuf },
    #[error("could not read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unexpected contents in {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

/// Reads everything sbmon reports about process `pid`.
pub fn snapshot(pid: i32) -> Result<ProcessSnapshot, ProcessError> {
    let process = open(pid)?;
    let stat = read_parsed::<Stat>(&process, pid, "stat")?;
    let status = read_parsed::<Status>(&process, pid, "status")?;
    if status.tgid != pid {
        // /proc/TID works for any thread id even though it is not listed.
        return Err(ProcessError::NotAProcess {
            pid,
            tgid: status.tgid,
        });
    }
    let max_fds = max_open_files(&process, pid)?;
    let (open_fds, socket_count) = count_fds(pid)?;
    let memory = memory_of(&process, &status)?;
    let times = stat_times(&stat)?;

    Ok(ProcessSnapshot {
        pid,
        comm: stat.comm,
        rss_bytes: memory.rss_bytes,
        rss_peak_bytes: memory.rss_peak_bytes,
        virtual_bytes: memory.virtual_bytes,
        cpu_user_seconds: times.cpu_user_seconds,
        cpu_system_seconds: times.cpu_system_seconds,
        start_time_unix: times.start_time_unix,
        uptime_seconds: times.uptime_seconds,
        num_threads: u64::try_from(stat.num_threads).unwrap_or(0),
        open_fds,
        max_fds,
        socket_count,
        memory_limit: memory.memory_limit,
    })
}

/// The memory figures of one process, from `/proc/PID/status` and the cgroup files alone.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessMemory {
    /// Resident set size (`VmRSS`), in bytes.
    pub rss_bytes: u64,
    /// Peak resident set size (`VmHWM`), in bytes.
    pub rss_peak_bytes: u64,
    /// Virtual memory size (`VmSize`), in bytes.
    pub virtual_bytes: u64,
    /// The memory limit that applies to the process.
    pub memory_limit: MemoryLimit,
}

/// What `memory_stats` needs of process `pid`: a third of the files [`snapshot`] reads (no
/// fd directory walk), so a memory reading costs little more than its agent round trip.
pub fn memory(pid: i32) -> Result<ProcessMemory, ProcessError> {
    let process = open(pid)?;
    let status = read_parsed::<Status>(&process, pid, "status")?;
    memory_of(&process, &status)
}

fn memory_of(process: &Process, status: &Status) -> Result<ProcessMemory, ProcessError> {
    let kib = |v: Option<u64>| v.unwrap_or(0).saturating_mul(1024);
    Ok(ProcessMemory {
        rss_bytes: kib(status.vmrss),
        rss_peak_bytes: kib(status.vmhwm),
        virtual_bytes: kib(status.vmsize),
        memory_limit: process_memory_limit(process)?,
    })
}

/// CPU time and age of one process, from `/proc/PID/stat` alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessTimes {
    /// CPU time spent in user mode, in seconds.
    pub cpu_user_seconds: f64,
    /// CPU time spent in the kernel, in seconds.
    pub cpu_system_seconds: f64,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_unix: f64,
    /// Seconds since the process started.
    pub uptime_seconds: f64,
}

/// What `gc_stats` needs of process `pid` (its CPU time and age), from one file.
pub fn times(pid: i32) -> Result<ProcessTimes, ProcessError> {
    let process = open(pid)?;
    let stat = read_parsed::<Stat>(&process, pid, "stat")?;
    stat_times(&stat)
}

fn stat_times(stat: &Stat) -> Result<ProcessTimes, ProcessError> {
    let ticks = ticks_per_second();
    let start_time_unix = boot_time()? as f64 + stat.starttime as f64 / ticks;
    Ok(ProcessTimes {
        cpu_user_seconds: stat.utime as f64 / ticks,
        cpu_system_seconds: stat.stime as f64 / ticks,
        start_time_unix,
        uptime_seconds: (now_unix() - start_time_unix).max(0.0),
    })
}

/// What the sampler reads of process `pid` each interval: two small files, no cgroup and no
/// fd walk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    pub rss_bytes: u64,
    /// Threads (tasks) of the process.
    pub threads: u64,
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
}

pub fn sample(pid: i32) -> Result<ProcessSample, ProcessError> {
    let process = open(pid)?;
    let stat = read_parsed::<Stat>(&process, pid, "stat")?;
    let status = read_parsed::<Status>(&process, pid, "status")?;
    Ok(ProcessSample {
        rss_bytes: status.vmrss.unwrap_or(0).saturating_mul(1024),
        threads: u64::try_from(stat.num_threads).unwrap_or(0),
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks_per_second(),
    })
}

/// Every task (thread) of process `pid`, ordered by thread id. A task that exits while the list
/// is being read is left out.
pub fn tasks(pid: i32) -> Result<Vec<TaskInfo>, ProcessError> {
    crate::blocking::section(|| tasks_of(pid))
}

fn tasks_of(pid: i32) -> Result<Vec<TaskInfo>, ProcessError> {
    let process = open(pid)?;
    let gone = || ProcessError::NotFound { pid };
    let iter = process
        .tasks()
        .map_err(|e| from_proc(e, proc_path(pid, "task"), gone))?;
    let mut out = Vec::new();
    for task in iter {
        // The iterator already skips tasks whose directory vanished; an error here is from
        // reading the task directory itself.
        let task = task.map_err(|e| from_proc(e, proc_path(pid, "task"), gone))?;
        let tid = task.tid;
        match task_info(&task) {
            Ok(info) => out.push(info),
            Err(ProcError::NotFound(_)) => continue,
            Err(ProcError::Io(e, _)) if e.raw_os_error() == Some(libc::ESRCH) => continue,
            Err(e) => {
                return Err(from_proc(e, task_path(pid, tid, "stat"), || {
                    ProcessError::TaskNotFound { pid, tid }
                }));
            }
        }
    }
    out.sort_by_key(|t| t.tid);
    Ok(out)
}

/// One task (thread) `tid` of process `pid`.
pub fn task(pid: i32, tid: i32) -> Result<TaskInfo, ProcessError> {
    let process = open(pid)?;
    if tid <= 0 {
        return Err(ProcessError::TaskNotFound { pid, tid });
    }
    let task_gone = || ProcessError::TaskNotFound { pid, tid };
    let task = process
        .task_from_tid(tid)
        .map_err(|e| from_proc(e, task_path(pid, tid, ""), task_gone))?;
    task_info(&task).map_err(|e| from_proc(e, task_path(pid, tid, "stat"), task_gone))
}

/// True if process `pid` exists and is neither a zombie nor dead.
pub fn is_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(file) = std::fs::File::open(proc_path(pid, "stat")) else {
        return false;
    };
    match read_all(file, 512).map(|b| Stat::from_read(b.as_slice())) {
        Ok(Ok(stat)) => !matches!(stat.state, 'Z' | 'X' | 'x'),
        _ => false,
    }
}

/// The words for a scheduler state letter from /proc/PID/stat.
pub fn state_name(code: char) -> String {
    let name = match code {
        'R' => "running",
        'S' => "sleeping",
        'D' => "disk wait",
        'T' => "stopped",
        't' => "tracing stop",
        'Z' => "zombie",
        'X' | 'x' => "dead",
        'I' => "idle",
        'P' => "parked",
        other => {
            return match procfs::process::ProcState::from_char(other) {
                Some(state) => format!("{state:?}").to_lowercase(),
                None => "unknown".to_owned(),
            };
        }
    };
    name.to_owned()
}

// ---------------------------------------------------------------------------------------------
// Internals

/// The /proc directory of process `pid`, or why it cannot be read.
fn open(pid: i32) -> Result<Process, ProcessError> {
    check_pid(pid)?;
    let gone = || ProcessError::NotFound { pid };
    Process::new(pid).map_err(|e| from_proc(e, proc_path(pid, ""), gone))
}

fn check_pid(pid: i32) -> Result<(), ProcessError> {
    if pid <= 0 {
        Err(ProcessError::InvalidPid { pid })
    } else {
        Ok(())
    }
}

fn proc_path(pid: i32, file: &str) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/{pid}"));
    if !file.is_empty() {
        p.push(file);
    }
    p
}

fn task_path(pid: i32, tid: i32, file: &str) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/{pid}/task/{tid}"));
    if !file.is_empty() {
        p.push(file);
    }
    p
}

/// Turns a procfs error into a `ProcessError`; `path` is used when procfs did not say which
/// file it was reading, `gone` builds the error for "the process/task no longer exists".
fn from_proc(e: ProcError, path: PathBuf, gone: impl FnOnce() -> ProcessError) -> ProcessError {
    match e {
        ProcError::NotFound(_) => gone(),
        ProcError::PermissionDenied(p) => ProcessError::PermissionDenied {
            path: p.unwrap_or(path),
        },
        ProcError::Io(source, p) => {
            if source.raw_os_error() == Some(libc::ESRCH) {
                gone()
            } else {
                ProcessError::Io {
                    path: p.unwrap_or(path),
                    source,
                }
            }
        }
        ProcError::Incomplete(p) => ProcessError::Parse {
            path: p.unwrap_or(path),
            message: "the file was incomplete (the process may be exiting); try again".to_owned(),
        },
        ProcError::Other(message) => ProcessError::Parse { path, message },
        ProcError::InternalError(inner) => ProcessError::Parse {
            path,
            message: inner.to_string(),
        },
    }
}

/// Turns an I/O error on a file under /proc/PID into a `ProcessError`.
fn from_io(e: io::Error, path: &Path, pid: i32) -> ProcessError {
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        ProcessError::NotFound { pid }
    } else if e.kind() == io::ErrorKind::PermissionDenied {
        ProcessError::PermissionDenied {
            path: path.to_owned(),
        }
    } else {
        ProcessError::Io {
            path: path.to_owned(),
            source: e,
        }
    }
}

/// Reads `/proc/PID/<file>` relative to the open process directory and parses it.
fn read_parsed<T: FromRead>(process: &Process, pid: i32, file: &str) -> Result<T, ProcessError> {
    let gone = || ProcessError::NotFound { pid };
    let Raw(bytes) = process
        .read(file)
        .map_err(|e| from_proc(e, proc_path(pid, file), gone))?;
    T::from_read(bytes.as_slice()).map_err(|e| from_proc(e, proc_path(pid, file), gone))
}

fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| match procfs::ticks_per_second() {
        0 => 100.0, // sysconf failed; 100 is what Linux uses for USER_HZ everywhere
        t => t as f64,
    })
}

/// Boot time in seconds since the epoch (`btime` in /proc/stat), read once.
///
/// procfs caches this per thread only, so sbmon keeps its own process-wide copy.
fn boot_time() -> Result<u64, ProcessError> {
    static BOOT: OnceLock<u64> = OnceLock::new();
    if let Some(b) = BOOT.get() {
        return Ok(*b);
    }
    let b = procfs::boot_time_secs().map_err(|e| {
        from_proc(e, PathBuf::from("/proc/stat"), || ProcessError::Io {
            path: PathBuf::from("/proc/stat"),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
    })?;
    Ok(*BOOT.get_or_init(|| b))
}

/// Physical memory (`MemTotal` in /proc/meminfo), in bytes, read once.
fn mem_total() -> Result<u64, ProcessError> {
    static TOTAL: OnceLock<u64> = OnceLock::new();
    if let Some(t) = TOTAL.get() {
        return Ok(*t);
    }
    let path = PathBuf::from("/proc/meminfo");
    let t = procfs::Meminfo::current()
        .map_err(|e| {
            from_proc(e, path.clone(), || ProcessError::Io {
                path: path.clone(),
                source: io::Error::from(io::ErrorKind::NotFound),
            })
        })?
        .mem_total;
    Ok(*TOTAL.get_or_init(|| t))
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A whole /proc or sysfs file as bytes, read with plain `read(2)` calls.
///
/// std's `read_to_end` on a `File` first does `statx` + `lseek` to size its buffer, which is
/// wasted on /proc (files report size 0) and costs two syscalls per file on every scrape.
struct Raw(Vec<u8>);

impl FromRead for Raw {
    fn from_read<R: Read>(r: R) -> procfs::ProcResult<Self> {
        Ok(Raw(read_all(r, 4096)?))
    }
}

fn read_all<R: Read>(mut r: R, hint: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; hint.max(16)];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match r.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

fn task_info(task: &Task) -> Result<TaskInfo, ProcError> {
    let Raw(stat) = task.read("stat")?;
    let stat = Stat::from_read(stat.as_slice())?;
    // wchan is "0" for a running task and may be unreadable without ptrace access.
    let wchan = match task.read("wchan") {
        Ok(Raw(s)) => {
            let s = String::from_utf8_lossy(&s);
            let s = s.trim();
            (!s.is_empty() && s != "0").then(|| s.to_owned())
        }
        Err(_) => None,
    };
    let ticks = ticks_per_second();
    Ok(TaskInfo {
        tid: task.tid,
        comm: stat.comm,
        state: state_name(stat.state),
        state_code: stat.state,
        cpu_seconds: stat.utime.saturating_add(stat.stime) as f64 / ticks,
        wchan,
    })
}

/// Soft "Max open files" from /proc/PID/limits (`None` if unlimited).
///
/// Parsed here rather than with `procfs::process::Limits`, which needs all sixteen rows to be
/// present and can panic (debug builds) on a short line; we only want one row.
fn max_open_files(process: &Process, pid: i32) -> Result<Option<u64>, ProcessError> {
    let path = proc_path(pid, "limits");
    let Raw(text) = process
        .read("limits")
        .map_err(|e| from_proc(e, path.clone(), || ProcessError::NotFound { pid }))?;
    parse_max_open_files(&String::from_utf8_lossy(&text)).ok_or_else(|| ProcessError::Parse {
        path,
        message: "no readable \"Max open files\" line".to_owned(),
    })
}

/// `Some(None)` = unlimited, `Some(Some(n))` = limit, `None` = line missing or malformed.
fn parse_max_open_files(text: &str) -> Option<Option<u64>> {
    let rest = text
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?;
    let soft = rest.split_whitespace().next()?;
    if soft == "unlimited" {
        Some(None)
    } else {
        soft.parse().ok().map(Some)
    }
}

/// Counts entries of /proc/PID/fd and how many of them are sockets: one `readlink` per fd.
fn count_fds(pid: i32) -> Result<(u64, u64), ProcessError> {
    crate::blocking::section(|| count_fds_in(pid))
}

fn count_fds_in(pid: i32) -> Result<(u64, u64), ProcessError> {
    let dir = proc_path(pid, "fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| from_io(e, &dir, pid))?;
    let mut link = dir.clone();
    let (mut open, mut sockets) = (0u64, 0u64);
    for entry in entries {
        let entry = entry.map_err(|e| from_io(e, &dir, pid))?;
        link.push(entry.file_name());
        let target = std::fs::read_link(&link);
        link.pop();
        match target {
            Ok(target) => {
                open += 1;
                if target.as_os_str().as_bytes().starts_with(b"socket:[") {
                    sockets += 1;
                }
            }
            // Closed between listing and readlink: it is no longer open.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(from_io(e, &dir, pid)),
        }
    }
    Ok((open, sockets))
}

fn process_memory_limit(process: &Process) -> Result<MemoryLimit, ProcessError> {
    let total = mem_total()?;
    // No cgroup file (kernel without cgroups, or the process just exited): physical memory.
    let groups = process.cgroups().map(|g| g.0).unwrap_or_default();
    Ok(memory_limit_from(&groups, Path::new(CGROUP_MOUNT), total))
}

/// The smallest memory limit among the cgroup(s) of the process and their ancestors, capped at
/// physical memory `mem_total`. `mount` is where cgroup filesystems are mounted.
fn memory_limit_from(groups: &[ProcessCGroup], mount: &Path, mem_total: u64) -> MemoryLimit {
    let mut best: Option<(u64, String)> = None;
    let mut consider = |bytes: u64, source: String| {
        if best.as_ref().is_none_or(|(b, _)| bytes < *b) {
            best = Some((bytes, source));
        }
    };
    for group in groups {
        if group.hierarchy == 0 && group.controllers.is_empty() {
            // cgroup v2: `0::/path`
            for dir in cgroup_dirs(mount, &group.pathname) {
                if let Some(text) = read_small(&dir.join("memory.max"))
                    && let Ok(bytes) = text.trim().parse::<u64>()
                {
                    consider(bytes, format!("cgroup v2 memory.max ({})", dir.display()));
                }
            }
        } else if group.controllers.iter().any(|c| c == "memory") {
            // cgroup v1: `N:memory:/path` (possibly with other controllers on the line)
            let v1_mount = mount.join("memory");
            for dir in cgroup_dirs(&v1_mount, &group.pathname) {
                if let Some(text) = read_small(&dir.join("memory.limit_in_bytes"))
                    && let Ok(bytes) = text.trim().parse::<u64>()
                    && bytes < CGROUP_V1_UNLIMITED
                {
                    consider(
                        bytes,
                        format!("cgroup v1 memory.limit_in_bytes ({})", dir.display()),
                    );
                }
            }
        }
    }
    match best {
        Some((bytes, source)) if bytes <= mem_total => MemoryLimit { bytes, source },
        _ => MemoryLimit {
            bytes: mem_total,
            source: PHYSICAL_MEMORY_SOURCE.to_owned(),
        },
    }
}

/// The directory of cgroup `pathname` under `mount` and all its ancestors up to `mount` itself,
/// deepest first. Empty if the path leaves our cgroup namespace (`/../..`): we cannot see it.
fn cgroup_dirs(mount: &Path, pathname: &str) -> Vec<PathBuf> {
    let parts: Vec<&str> = pathname.split('/').filter(|s| !s.is_empty()).collect();
    if parts.iter().any(|p| *p == ".." || *p == ".") {
        return Vec::new();
    }
    let mut dir = mount.to_path_buf();
    let mut dirs = vec![dir.clone()];
    for part in parts {
        dir.push(part);
        dirs.push(dir.clone());
    }
    dirs.reverse();
    dirs
}

/// A small sysfs file as text, or `None` if it is missing or unreadable.
fn read_small(path: &Path) -> Option<String> {
    let bytes = read_all(std::fs::File::open(path).ok()?, 64).ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Kills and reaps the child when dropped, so a failing assertion does not leak it.
    struct ChildGuard(Child);

    impl ChildGuard {
        fn pid(&self) -> i32 {
            i32::try_from(self.0.id()).expect("pid fits in i32")
        }
    }

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Spawns `sleep 30` and waits until it has exec'd (comm is the test binary's until then).
    fn spawn_sleep() -> ChildGuard {
        let child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let guard = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", guard.pid())).expect("child stat");
            // Wait for exec and for sleep to actually be sleeping (its RSS is then stable).
            if stat.contains("(sleep) S") {
                break;
            }
            assert!(Instant::now() < deadline, "sleep never started: {stat}");
            std::thread::sleep(Duration::from_millis(10));
        }
        guard
    }

    /// A pid that certainly does not exist now: a child that was spawned, killed and reaped.
    fn dead_pid() -> i32 {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid fits in i32");
        child.kill().expect("kill");
        child.wait().expect("reap");
        pid
    }

    /// `Key:   N kB` from a status file, in kB.
    fn status_kb(status: &str, key: &str) -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("{key} missing from status"));
        line.split_whitespace()
            .nth(1)
            .expect("value")
            .parse()
            .expect("number")
    }

    /// Fields of /proc/PID/stat after the command name, numbered as in proc(5) (state = 3).
    fn stat_fields(stat: &str) -> Vec<String> {
        let close = stat.rfind(')').expect("comm end");
        let mut v = vec![String::new(), String::new()];
        v.extend(stat[close + 2..].split_whitespace().map(str::to_owned));
        v
    }

    fn stat_u64(fields: &[String], n: usize) -> u64 {
        fields[n - 1].parse().expect("numeric stat field")
    }

    fn sysconf_ticks() -> f64 {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        assert!(t > 0);
        t as f64
    }

    fn btime() -> u64 {
        let s = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .expect("btime")
            .trim()
            .parse()
            .expect("btime number")
    }

    fn meminfo_total_bytes() -> u64 {
        let s = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
        status_kb(&s, "MemTotal") * 1024
    }

    fn gettid() -> i32 {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }

    fn self_pid() -> i32 {
        i32::try_from(std::process::id()).expect("pid fits in i32")
    }

    #[test]
    fn snapshot_of_child_matches_proc_files() {
        let child = spawn_sleep();
        let pid = child.pid();
        let snap = snapshot(pid).expect("snapshot of running child");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let f = stat_fields(&stat);
        let ticks = sysconf_ticks();

        assert_eq!(snap.pid, pid);
        assert_eq!(snap.comm, "sleep");
        assert_eq!(snap.rss_bytes, status_kb(&status, "VmRSS") * 1024);
        assert_eq!(snap.rss_peak_bytes, status_kb(&status, "VmHWM") * 1024);
        assert!(snap.rss_bytes > 0 && snap.rss_bytes <= snap.rss_peak_bytes);
        assert_eq!(snap.virtual_bytes, stat_u64(&f, 23));
        assert_eq!(snap.cpu_user_seconds, stat_u64(&f, 14) as f64 / ticks);
        assert_eq!(snap.cpu_system_seconds, stat_u64(&f, 15) as f64 / ticks);
        assert_eq!(snap.num_threads, stat_u64(&f, 20));
        assert_eq!(snap.num_threads, 1);

        let start = btime() as f64 + stat_u64(&f, 22) as f64 / ticks;
        assert!(
            (snap.start_time_unix - start).abs() < 1e-6,
            "{} vs {start}",
            snap.start_time_unix
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        // btime is whole seconds, so allow a second of slack either way.
        assert!(snap.uptime_seconds >= 0.0 && snap.uptime_seconds < 30.0);
        assert!((now - start - snap.uptime_seconds).abs() < 1.5);

        // fds: compare with our own listing, and with the rlimit the child inherited.
        let mut fds = 0;
        let mut socks = 0;
        for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir") {
            let target = std::fs::read_link(e.expect("entry").path()).expect("readlink");
            fds += 1;
            if target.to_string_lossy().starts_with("socket:") {
                socks += 1;
            }
        }
        assert_eq!(snap.open_fds, fds);
        assert!(snap.open_fds >= 3, "stdin/stdout/stderr are open");
        assert_eq!(snap.socket_count, socks);
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: rl is a valid, writable rlimit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }, 0);
        let expected = (rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur);
        assert_eq!(snap.max_fds, expected);

        assert!(snap.memory_limit.bytes > 0);
        assert!(snap.memory_limit.bytes <= meminfo_total_bytes());

        // The lean readers agree with the files and with the full snapshot.
        let mem = memory(pid).expect("memory of running child");
        assert_eq!(mem.rss_bytes, status_kb(&status, "VmRSS") * 1024);
        assert_eq!(mem.rss_peak_bytes, status_kb(&status, "VmHWM") * 1024);
        assert_eq!(mem.virtual_bytes, stat_u64(&f, 23));
        assert_eq!(mem.memory_limit, snap.memory_limit);
        let times = times(pid).expect("times of running child");
        assert_eq!(times.cpu_user_seconds, snap.cpu_user_seconds);
        assert_eq!(times.cpu_system_seconds, snap.cpu_system_seconds);
        assert_eq!(times.start_time_unix, snap.start_time_unix);
    }

    /// The busy child of `busy_child_rss_peak_and_cpu`: it grows its RSS by 64 MiB and gives
    /// it back (so VmRSS < VmHWM), burns 0.3 s of user CPU (so utime != stime), then sleeps
    /// until killed. Python's large objects are mmap'd, so freeing one unmaps it at once.
    const BUSY_CHILD: &str = "\
import os, time
b = b'x' * (64 << 20)
del b
while os.times().user < 0.3:
    sum(range(10000))
time.sleep(30)
";

    #[test]
    fn busy_child_rss_peak_and_cpu() {
        let child = Command::new("python3")
            .args(["-c", BUSY_CHILD])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the busy child");
        let child = ChildGuard(child);
        let pid = child.pid();
        let ticks = sysconf_ticks();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Every thread must be asleep (the state in /proc/PID/stat is the main thread's).
            let all_asleep = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|dir| {
                    dir.flatten().all(|t| {
                        std::fs::read_to_string(t.path().join("stat"))
                            .is_ok_and(|s| s.contains(") S "))
                    })
                })
                .unwrap_or(false);
            let ready = all_asleep
                && stat_u64(&stat_fields(&stat), 14) as f64 / ticks >= 0.2
                && status_kb(&status, "VmHWM") >= status_kb(&status, "VmRSS") + (32 << 10);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the busy child never got ready:\n{status}\n{stat}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        // The child is asleep, but the interpreter might still stir: retry until the files
        // read just before and just after the snapshot agree.
        for _ in 0..20 {
            let status_before =
                std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
            let stat_before = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
            let snap = snapshot(pid).expect("snapshot of the busy child");
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
            if status != status_before || stat != stat_before {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let f = stat_fields(&stat);
            assert_eq!(snap.rss_bytes, status_kb(&status, "VmRSS") * 1024);
            assert_eq!(snap.rss_peak_bytes, status_kb(&status, "VmHWM") * 1024);
            assert!(snap.rss_peak_bytes >= snap.rss_bytes + (32 << 20));
            assert_eq!(snap.virtual_bytes, stat_u64(&f, 23));
            assert_eq!(snap.cpu_user_seconds, stat_u64(&f, 14) as f64 / ticks);
            assert_eq!(snap.cpu_system_seconds, stat_u64(&f, 15) as f64 / ticks);
            assert!(snap.cpu_user_seconds >= 0.1);
            assert_eq!(snap.num_threads, stat_u64(&f, 20));
            let t = tasks(pid).expect("tasks of the busy child");
            assert_eq!(t.len() as u64, snap.num_threads);
            let total: f64 = t.iter().map(|t| t.cpu_seconds).sum();
            let proc_total = snap.cpu_user_seconds + snap.cpu_system_seconds;
            // Threads that already exited still count in the process totals, so the threads'
            // sum is at most that — give or take the kernel rounding each figure to ticks.
            let slack = 2.0 * t.len() as f64 / ticks;
            assert!(total <= proc_total + slack, "{total} > {proc_total}");
            assert!(
                total >= 0.2,
                "the spinning thread's CPU time is listed: {t:?}"
            );
            return;
        }
        panic!("the busy child's /proc files kept changing");
    }

    #[test]
    fn fds_and_sockets_count_exactly_what_we_open() {
        let pid = self_pid();
        // Other tests in this binary open and close fds concurrently, so retry a few times:
        // a correct count matches on some attempt, a wrong one on none.
        let mut last = None;
        for _ in 0..20 {
            let before = snapshot(pid).expect("snapshot before");
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let files: Vec<std::fs::File> = (0..3)
                .map(|_| std::fs::File::open("/dev/null").expect("open /dev/null"))
                .collect();
            let after = snapshot(pid).expect("snapshot after");
            drop(listener);
            drop(files);
            let diff = (
                after.open_fds as i64 - before.open_fds as i64,
                after.socket_count as i64 - before.socket_count as i64,
            );
            if diff == (4, 1) {
                assert!(after.socket_count >= 1);
                return;
            }
            last = Some(diff);
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("open_fds/socket_count should rise by (4, 1), last saw {last:?}");
    }

    #[test]
    fn tasks_lists_named_sleeping_threads() {
        let pid = self_pid();
        let names = ["sbmon-test-a", "sbmon-test-b"];
        let (tid_tx, tid_rx) = mpsc::channel();
        let mut stops = Vec::new();
        let mut handles = Vec::new();
        for name in names {
            let (stop_tx, stop_rx) = mpsc::channel::<()>();
            let tid_tx = tid_tx.clone();
            let h = std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    let _ = tid_tx.send((name, gettid()));
                    let _ = stop_rx.recv();
                })
                .expect("spawn thread");
            stops.push(stop_tx);
            handles.push(h);
        }
        let tids: Vec<(&str, i32)> = (0..2)
            .map(|_| tid_rx.recv_timeout(Duration::from_secs(5)).expect("tid"))
            .collect();

        // The threads may still be on their way into recv(); wait until both sleep.
        let deadline = Instant::now() + Duration::from_secs(5);
        let list = loop {
            let list = tasks(pid).expect("tasks of self");
            let asleep = tids
                .iter()
                .all(|(_, tid)| list.iter().any(|t| t.tid == *tid && t.state == "sleeping"));
            if asleep || Instant::now() > deadline {
                break list;
            }
            std::thread::sleep(Duration::from_millis(10));
        };

        assert!(list.iter().any(|t| t.tid == pid), "main thread listed");
        assert!(
            list.windows(2).all(|w| w[0].tid < w[1].tid),
            "sorted by tid"
        );
        for (name, tid) in &tids {
            let t = list
                .iter()
                .find(|t| t.tid == *tid)
                .unwrap_or_else(|| panic!("thread {name} ({tid}) not in {list:?}"));
            assert_eq!(t.comm, *name);
            assert_eq!(t.state, "sleeping");
            assert_eq!(t.state_code, 'S');
            assert!(t.cpu_seconds >= 0.0 && t.cpu_seconds.is_finite());
            assert_ne!(t.wchan.as_deref(), Some("0"));
            assert_ne!(t.wchan.as_deref(), Some(""));

            let one = task(pid, *tid).expect("task by tid");
            assert_eq!(one.tid, *tid);
            assert_eq!(one.comm, *name);
            assert_eq!(one.state, "sleeping");

            // /proc/TID is reachable for a thread, but it is not a process.
            match snapshot(*tid) {
                Err(ProcessError::NotAProcess { pid: p, tgid }) => {
                    assert_eq!((p, tgid), (*tid, pid));
                }
                other => panic!("snapshot(thread id) gave {other:?}"),
            }
        }

        drop(stops);
        for h in handles {
            h.join().expect("thread exits");
        }
    }

    #[test]
    fn running_thread_has_no_wchan() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static STOP: AtomicBool = AtomicBool::new(false);
        let (tid_tx, tid_rx) = mpsc::channel();
        let h = std::thread::Builder::new()
            .name("sbmon-test-spin".to_owned())
            .spawn(move || {
                let _ = tid_tx.send(gettid());
                let mut x = 0u64;
                while !STOP.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
            .expect("spawn thread");
        let tid = tid_rx.recv_timeout(Duration::from_secs(5)).expect("tid");
        let deadline = Instant::now() + Duration::from_secs(5);
        let info = loop {
            let info = task(self_pid(), tid).expect("spinning task");
            if info.state_code == 'R' || Instant::now() > deadline {
                break info;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        STOP.store(true, Ordering::Relaxed);
        h.join().expect("thread exits");
        assert_eq!(info.comm, "sbmon-test-spin");
        assert_eq!(info.state, "running");
        assert_eq!(
            info.wchan, None,
            "the kernel reports wchan 0 for a running task"
        );
    }

    #[test]
    fn task_of_another_process_is_not_found() {
        let child = spawn_sleep();
        let err = task(self_pid(), child.pid()).expect_err("child is not our thread");
        assert!(
            matches!(err, ProcessError::TaskNotFound { .. }),
            "got {err:?}"
        );
        let main = task(child.pid(), child.pid()).expect("main task of child");
        assert_eq!(main.comm, "sleep");
        assert_eq!(main.state_code, 'S');
        let all = tasks(child.pid()).expect("tasks of child");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0], main);
    }

    #[test]
    fn dead_process_is_reported_as_not_existing() {
        let pid = dead_pid();
        let err = snapshot(pid).expect_err("dead pid");
        assert!(
            matches!(err, ProcessError::NotFound { pid: p } if p == pid),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("process {pid} does not exist (it may have exited)")
        );
        assert!(matches!(tasks(pid), Err(ProcessError::NotFound { .. })));
        assert!(matches!(task(pid, pid), Err(ProcessError::NotFound { .. })));
        assert!(matches!(memory(pid), Err(ProcessError::NotFound { .. })));
        assert!(matches!(times(pid), Err(ProcessError::NotFound { .. })));
        assert!(!is_alive(pid));
    }

    #[test]
    fn is_alive_follows_the_child_lifecycle() {
        let mut child = spawn_sleep();
        let pid = child.pid();
        assert!(is_alive(pid));
        assert!(is_alive(self_pid()));

        child.0.kill().expect("kill");
        // Killed but not reaped: a zombie, which is not alive but still has a snapshot.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "child never became a zombie");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!is_alive(pid));
        let zombie = snapshot(pid).expect("zombie snapshot");
        assert_eq!(zombie.rss_bytes, 0);
        let t = task(pid, pid).expect("zombie task");
        assert_eq!((t.state.as_str(), t.state_code), ("zombie", 'Z'));

        child.0.wait().expect("reap");
        assert!(!is_alive(pid));
    }

    #[test]
    fn invalid_ids_are_errors_not_panics() {
        for pid in [0, -1, i32::MIN] {
            assert!(matches!(
                snapshot(pid),
                Err(ProcessError::InvalidPid { .. })
            ));
            assert!(matches!(tasks(pid), Err(ProcessError::InvalidPid { .. })));
            assert!(matches!(task(pid, 1), Err(ProcessError::InvalidPid { .. })));
            assert!(!is_alive(pid));
        }
        let me = self_pid();
        for tid in [0, -1, i32::MIN, i32::MAX] {
            assert!(
                matches!(task(me, tid), Err(ProcessError::TaskNotFound { .. })),
                "tid {tid}"
            );
        }
        assert!(matches!(
            snapshot(i32::MAX),
            Err(ProcessError::NotFound { .. })
        ));
        assert!(!is_alive(i32::MAX));
    }

    #[test]
    fn memory_limit_of_self_is_within_physical_memory() {
        let snap = snapshot(self_pid()).expect("snapshot self");
        let total = meminfo_total_bytes();
        assert!(snap.memory_limit.bytes > 0);
        assert!(snap.memory_limit.bytes <= total);
        assert!(
            snap.memory_limit.source == PHYSICAL_MEMORY_SOURCE
                || snap.memory_limit.source.starts_with("cgroup v"),
            "{}",
            snap.memory_limit.source
        );
        if snap.memory_limit.source == PHYSICAL_MEMORY_SOURCE {
            assert_eq!(snap.memory_limit.bytes, total);
        }
    }

    fn group(hierarchy: u32, controllers: &[&str], path: &str) -> ProcessCGroup {
        ProcessCGroup {
            hierarchy,
            controllers: controllers.iter().map(|s| (*s).to_owned()).collect(),
            pathname: path.to_owned(),
        }
    }

    fn write(root: &Path, rel: &str, file: &str, content: &str) {
        let dir = root.join(rel);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(file), content).expect("write");
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn cgroup_v2_smallest_limit_on_the_path_wins() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        write(r, "a", "memory.max", "3221225472\n"); // 3 GiB
        write(r, "a/b", "memory.max", "max\n");
        write(r, "a/b/c", "memory.max", "4294967296\n"); // 4 GiB
        write(r, "other", "memory.max", "1\n"); // not on the path
        let groups = [group(0, &[], "/a/b/c")];
        let limit = memory_limit_from(&groups, r, 16 * GIB);
        assert_eq!(limit.bytes, 3 * GIB);
        assert_eq!(
            limit.source,
            format!("cgroup v2 memory.max ({})", r.join("a").display())
        );

        // Only "max" everywhere: physical memory.
        let root2 = tempfile::tempdir().expect("tempdir");
        write(root2.path(), "x", "memory.max", "max\n");
        let limit = memory_limit_from(&[group(0, &[], "/x")], root2.path(), 16 * GIB);
        assert_eq!(limit.bytes, 16 * GIB);
        assert_eq!(limit.source, PHYSICAL_MEMORY_SOURCE);
    }

    #[test]
    fn cgroup_limit_above_physical_memory_is_capped() {
        let root = tempfile::tempdir().expect("tempdir");
        write(root.path(), "big", "memory.max", "68719476736\n"); // 64 GiB
        let limit = memory_limit_from(&[group(0, &[], "/big")], root.path(), 8 * GIB);
        assert_eq!(limit.bytes, 8 * GIB);
        assert_eq!(limit.source, PHYSICAL_MEMORY_SOURCE);
    }

    #[test]
    fn cgroup_v1_memory_controller_and_unlimited_sentinel() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        write(
            r,
            "memory",
            "memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        write(
            r,
            "memory/docker",
            "memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        write(
            r,
            "memory/docker/abc",
            "memory.limit_in_bytes",
            "536870912\n",
        );
        let groups = [
            group(3, &["cpu", "cpuacct"], "/docker/abc"),
            group(4, &["memory"], "/docker/abc"),
            group(0, &[], "/"),
        ];
        let limit = memory_limit_from(&groups, r, 16 * GIB);
        assert_eq!(limit.bytes, 512 << 20);
        assert_eq!(
            limit.source,
            format!(
                "cgroup v1 memory.limit_in_bytes ({})",
                r.join("memory/docker/abc").display()
            )
        );

        // Only the unlimited sentinel: physical memory, even if that is larger than it.
        let groups = [group(4, &["memory"], "/docker")];
        let limit = memory_limit_from(&groups, r, 16 * GIB);
        assert_eq!(limit.bytes, 16 * GIB);
        let limit = memory_limit_from(&groups, r, u64::MAX);
        assert_eq!(limit.bytes, u64::MAX);
        assert_eq!(limit.source, PHYSICAL_MEMORY_SOURCE);
    }

    #[test]
    fn cgroup_paths_we_cannot_see_and_missing_files_fall_back() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        write(r, "", "memory.max", "1048576\n");
        // Outside our cgroup namespace: the namespace root's limit does not apply to it.
        let limit = memory_limit_from(&[group(0, &[], "/../sibling")], r, 16 * GIB);
        assert_eq!(limit.source, PHYSICAL_MEMORY_SOURCE);
        // Inside it: the namespace root is an ancestor, so its limit applies.
        let limit = memory_limit_from(&[group(0, &[], "/no/such/dir")], r, 16 * GIB);
        assert_eq!(limit.bytes, 1 << 20);
        // Garbage in the file is ignored.
        write(r, "junk", "memory.max", "lots\n");
        let limit = memory_limit_from(&[group(0, &[], "/junk")], r, 16 * GIB);
        assert_eq!(limit.bytes, 1 << 20);
        assert_eq!(memory_limit_from(&[], r, 7).bytes, 7);
    }

    #[test]
    fn max_open_files_parsing() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             127431               127431               processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_open_files(text), Some(Some(1024)));
        let unl = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_open_files(unl), Some(None));
        assert_eq!(parse_max_open_files(""), None);
        assert_eq!(parse_max_open_files("Max open files"), None);
        assert_eq!(parse_max_open_files("Max open files  x y z"), None);
    }

    #[test]
    fn state_names() {
        let cases = [
            ('R', "running"),
            ('S', "sleeping"),
            ('D', "disk wait"),
            ('T', "stopped"),
            ('t', "tracing stop"),
            ('Z', "zombie"),
            ('X', "dead"),
            ('I', "idle"),
            ('P', "parked"),
            ('K', "wakekill"),
            ('W', "waking"),
            ('?', "unknown"),
        ];
        for (code, name) in cases {
            assert_eq!(state_name(code), name, "{code}");
        }
    }

    #[test]
    fn results_serialize_with_snake_case_fields() {
        let snap = snapshot(self_pid()).expect("snapshot self");
        let v = serde_json::to_value(&snap).expect("json");
        for key in [
            "pid",
            "comm",
            "rss_bytes",
            "rss_peak_bytes",
            "virtual_bytes",
            "cpu_user_seconds",
            "cpu_system_seconds",
            "start_time_unix",
            "uptime_seconds",
            "num_threads",
            "open_fds",
            "max_fds",
            "socket_count",
            "memory_limit",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        assert!(v["memory_limit"]["bytes"].is_u64());
        assert!(v["memory_limit"]["source"].is_string());
        let back: ProcessSnapshot = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, snap);

        let t = task(self_pid(), self_pid()).expect("main task");
        let tv = serde_json::to_value(&t).expect("json");
        assert_eq!(tv["state_code"].as_str().map(str::len), Some(1));

        let schema = serde_json::to_value(schemars::schema_for!(ProcessSnapshot)).expect("schema");
        assert!(schema["properties"]["rss_bytes"].is_object(), "{schema}");
        let schema = serde_json::to_value(schemars::schema_for!(TaskInfo)).expect("schema");
        assert!(schema["properties"]["wchan"].is_object(), "{schema}");
    }
}
