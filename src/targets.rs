//! The SBCL images sbmon watches: each target is a named agent client plus the short history
//! that rate-based health checks need (GC CPU seconds sampled over the last minutes, and the
//! outcomes of the tool calls it served).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::agent::address::Found;
use crate::agent::{Address, AgentClient, AgentError, ClientOptions};
use crate::events::GcFeed;

use serde::Serialize;

/// Samples older than this are dropped; rates look back one minute.
const HISTORY_SPAN: Duration = Duration::from_secs(300);
const HISTORY_MAX: usize = 512;
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

pub struct Target {
    pub name: String,
    pub client: AgentClient,
    gc_samples: Mutex<VecDeque<(Instant, f64)>>,
    /// The GC event feed while anyone follows it.
    gc_feed: Mutex<Weak<GcFeed>>,
    /// Tool calls this target served or failed, for the `availability.errors` check.
    pub calls: CallWindow,
}

/// How a tool call went, as far as the target is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The target failed: its agent answered with an error that is not the caller's.
    Failed,
    /// The target could not be reached (down, hung, connection lost).
    Unreachable,
}

/// The outcomes of the last minute's tool calls on one target. A caller's own mistakes
/// (unknown thread, bad arguments, unknown target) are never recorded here, so no client can
/// make a healthy image look broken; and failures to reach the target are forgotten as soon
/// as it answers again, so recovery shows at once.
#[derive(Default)]
pub struct CallWindow {
    recent: Mutex<VecDeque<(Instant, Outcome)>>,
}

const CALL_WINDOW_MAX: usize = 10_000;

impl CallWindow {
    pub fn record(&self, outcome: Outcome) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if outcome == Outcome::Ok {
            recent.retain(|(_, o)| *o != Outcome::Unreachable);
        }
        if recent.len() >= CALL_WINDOW_MAX {
            recent.pop_front();
        }
        recent.push_back((Instant::now(), outcome));
    }

    /// The target answered (a health probe's ping): earlier failures to reach it are over.
    pub fn reached(&self) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|(_, o)| *o != Outcome::Unreachable);
    }

    /// (failed, total) over the last minute.
    pub fn last_minute(&self) -> (usize, usize) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while recent
            .front()
            .is_some_and(|(t, _)| t.elapsed() > RATE_WINDOW)
        {
            recent.pop_front();
        }
        let failed = recent.iter().filter(|(_, o)| *o != Outcome::Ok).count();
        (failed, recent.len())
    }
}

/// GC CPU seconds per wall second between an earlier sample and now.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub ratio: f64,
    pub window_seconds: f64,
}

impl Target {
    pub fn new(name: impl Into<String>, address: Address, options: ClientOptions) -> Self {
        Target {
            name: name.into(),
            client: AgentClient::new(address, options),
            gc_samples: Mutex::new(VecDeque::new()),
            gc_feed: Mutex::new(Weak::new()),
            calls: CallWindow::default(),
        }
    }

    /// The GC events of this image as they happen; followers share one feed (and one agent
    /// connection), which ends when the last of them drops it.
    pub fn gc_feed(&self) -> Arc<GcFeed> {
        let mut feed = self
            .gc_feed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(live) = feed.upgrade() {
            return live;
        }
        let started = Arc::new(GcFeed::start(&self.name, &self.client));
        *feed = Arc::downgrade(&started);
        started
    }

    /// The pid of the image, as the agent reported it in its welcome.
    pub async fn pid(&self) -> Result<i32, AgentError> {
        Ok(self.client.welcome().await?.pid)
    }

    /// Remember a reading of the cumulative GC CPU time, and return the GC share of wall time
    /// since the oldest reading within the last minute (None without an older reading).
    pub fn gc_rate(&self, gc_cpu_seconds: f64) -> Option<Rate> {
        let now = Instant::now();
        let mut samples = self
            .gc_samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > HISTORY_SPAN)
            || samples.len() >= HISTORY_MAX
        {
            samples.pop_front();
        }
        let base = samples
            .iter()
            .find(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .copied();
        samples.push_back((now, gc_cpu_seconds));
        let (then, earlier) = base?;
        let window = now.duration_since(then).as_secs_f64();
        // Below a tenth of a second the ratio is noise; a restarted image resets the counter.
        (window >= 0.1 && gc_cpu_seconds >= earlier).then(|| Rate {
            ratio: (gc_cpu_seconds - earlier) / window,
            window_seconds: window,
        })
    }
}

/// A name for a target given without one: `pid-N` for `<dir>/N.sock`, else the address.
pub fn default_name(address: &Address) -> String {
    if let Address::Unix(path) = address
        && let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".sock"))
            .filter(|n| n.parse::<i32>().is_ok())
    {
        return format!("pid-{pid}");
    }
    address.to_string()
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TargetError {
    #[error(
        "no target: no live agent was found in {0}; start one with (sbmon-agent:start) or pass --target"
    )]
    None(String),
    #[error("several targets are watched ({0}); pass \"target\" with one of their names")]
    Ambiguous(String),
    #[error("unknown target {name:?}; known targets: {known}")]
    Unknown { name: String, known: String },
}

/// The set of watched targets.
#[derive(Default)]
pub struct Targets {
    list: RwLock<Vec<Arc<Target>>>,
}

impl Targets {
    pub fn new(targets: Vec<Target>) -> Self {
        Targets {
            list: RwLock::new(targets.into_iter().map(Arc::new).collect()),
        }
    }

    pub fn all(&self) -> Vec<Arc<Target>> {
        self.list
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Make the set follow the agents found in a runtime directory: add new live sockets,
    /// drop targets whose process is gone, keep the rest (and their connections) as they are.
    pub fn sync_discovered(&self, found: &[Found], options: &ClientOptions) {
        let live: Vec<&Found> = found.iter().filter(|f| f.process_alive).collect();
        let mut list = self
            .list
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        list.retain(|t| {
            live.iter()
                .any(|f| t.client.address() == &Address::Unix(f.path.clone()))
        });
        for f in live {
            let address = Address::Unix(f.path.clone());
            if !list.iter().any(|t| t.client.address() == &address) {
                tracing::info!("watching {address}");
                list.push(Arc::new(Target::new(
                    default_name(&address),
                    address,
                    options.clone(),
                )));
            }
        }
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }

    fn names(list: &[Arc<Target>]) -> String {
        list.iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The target called `name`, or the only one when no name is given.
    pub fn resolve(&self, name: Option<&str>) -> Result<Arc<Target>, TargetError> {
        let list = self.all();
        match name {
            Some(name) => list
                .iter()
                .find(|t| t.name == name)
                .cloned()
                .ok_or_else(|| TargetError::Unknown {
                    name: crate::echo::clip(name),
                    known: Self::names(&list),
                }),
            None => match list.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(TargetError::None(
                    crate::agent::address::runtime_dir().display().to_string(),
                )),
                _ => Err(TargetError::Ambiguous(Self::names(&list))),
            },
        }
    }
}

/// How long a listing waits for each agent's welcome: a hung image must not stall the
/// listing; it is reported as not answering.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One image as listings show it (`sbmon targets`, the MCP resource `sbmon://targets`).
#[derive(Debug, Serialize)]
pub struct Listing {
    /// The target name, for a watched target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub pid: Option<i32>,
    pub address: String,
    /// "live", "stale" (its process is gone) or "not answering".
    pub status: &'static str,
    pub lisp_version: Option<String>,
    pub agent_version: Option<String>,
    pub error: Option<String>,
}

impl Listing {
    /// Ask the agent at `client` who it is (`pid` as known beforehand; `alive: false` for a
    /// socket whose process is gone, which is not asked at all).
    pub async fn probe(
        name: Option<String>,
        client: &AgentClient,
        pid: Option<i32>,
        alive: bool,
    ) -> Listing {
        let mut row = Listing {
            name,
            pid,
            address: client.address().to_string(),
            status: "stale",
            lisp_version: None,
            agent_version: None,
            error: None,
        };
        if !alive {
            return row;
        }
        match tokio::time::timeout(PROBE_TIMEOUT, client.welcome()).await {
            Ok(Ok(w)) => {
                row.status = "live";
                row.pid = Some(w.pid);
                row.lisp_version = Some(w.lisp_version);
                row.agent_version = Some(w.agent_version);
            }
            Ok(Err(e)) => {
                row.status = "not answering";
                row.error = Some(e.to_string());
            }
            Err(_) => {
                row.status = "not answering";
                row.error = Some(format!("the agent did not answer within {PROBE_TIMEOUT:?}"));
            }
        }
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_targets_by_pid() {
        let a: Address = "unix:/tmp/sbmon-0/123.sock".parse().unwrap();
        assert_eq!(default_name(&a), "pid-123");
        let b: Address = "unix:/tmp/app.sock".parse().unwrap();
        assert_eq!(default_name(&b), "unix:/tmp/app.sock");
    }

    #[test]
    fn gc_rate_needs_an_earlier_sample() {
        let t = Target::new(
            "x",
            "unix:/nonexistent".parse().unwrap(),
            ClientOptions::default(),
        );
        assert!(t.gc_rate(1.0).is_none());
        std::thread::sleep(Duration::from_millis(150));
        let rate = t.gc_rate(1.03).unwrap();
        assert!(rate.window_seconds >= 0.15);
        assert!(
            rate.ratio > 0.0 && rate.ratio <= 0.03 / 0.15 + 1e-9,
            "{rate:?}"
        );
        // A counter that went backwards (image restarted) gives no rate.
        std::thread::sleep(Duration::from_millis(150));
        assert!(t.gc_rate(0.5).is_none());
    }

    #[test]
    fn follows_discovered_agents() {
        let found = |pid: i32, alive: bool| Found {
            pid,
            path: format!("/run/sbmon/{pid}.sock").into(),
            process_alive: alive,
        };
        let ts = Targets::default();
        let options = ClientOptions::default();
        ts.sync_discovered(&[found(1, true), found(2, false)], &options);
        let names = |ts: &Targets| ts.all().iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ts), ["pid-1"]);
        let first = ts.resolve(Some("pid-1")).unwrap();
        ts.sync_discovered(&[found(1, true), found(3, true)], &options);
        assert_eq!(names(&ts), ["pid-1", "pid-3"]);
        // The surviving target is the same object, so its connection and history stay.
        assert!(Arc::ptr_eq(&first, &ts.resolve(Some("pid-1")).unwrap()));
        ts.sync_discovered(&[found(3, true)], &options);
        assert_eq!(names(&ts), ["pid-3"]);
    }

    #[test]
    fn call_window_forgets_unreachability_once_the_target_answers() {
        let w = CallWindow::default();
        w.record(Outcome::Unreachable);
        w.record(Outcome::Unreachable);
        w.record(Outcome::Failed);
        assert_eq!(w.last_minute(), (3, 3));
        w.reached();
        assert_eq!(w.last_minute(), (1, 1));
        w.record(Outcome::Unreachable);
        w.record(Outcome::Ok);
        assert_eq!(w.last_minute(), (1, 2));
    }

    #[test]
    fn resolves_names() {
        let ts = Targets::new(vec![]);
        assert!(matches!(ts.resolve(None), Err(TargetError::None(_))));
        let mk = |n: &str| Target::new(n, "unix:/x".parse().unwrap(), ClientOptions::default());
        let ts = Targets::new(vec![mk("a"), mk("b")]);
        assert!(matches!(ts.resolve(None), Err(TargetError::Ambiguous(_))));
        assert_eq!(ts.resolve(Some("b")).unwrap().name, "b");
        assert!(matches!(
            ts.resolve(Some("c")),
            Err(TargetError::Unknown { .. })
        ));
    }
}
