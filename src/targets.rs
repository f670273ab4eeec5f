//! The SBCL images sbmon watches: each target is a named agent client plus the short history
//! that rate-based health checks need (GC CPU seconds sampled over the last minutes, and the
//! outcomes of the tool calls it served).
//!
//! GC readings enter the history where they arrive, [`Target::read_gc`] and
//! [`Target::snapshot`], whoever asked for them (a health check, a scrape, `gc_stats`);
//! computing the rate only reads the history, so the figure for the last minute does not
//! depend on who else looked at it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::agent::address::Found;
use crate::agent::reply::Gc;
use crate::agent::{Address, AgentClient, AgentError, ClientOptions};
use crate::events::GcFeed;
use crate::samples::History;
use crate::snapshot::{Detail, InFlight, Snapshot};
use crate::thread_cpu::TaskCpu;

use serde::Serialize;

/// Samples older than this are dropped; rates look back one minute.
const HISTORY_SPAN: Duration = Duration::from_secs(300);
const HISTORY_MAX: usize = 512;
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

pub struct Target {
    pub name: String,
    pub client: AgentClient,
    gc_history: Mutex<GcHistory>,
    /// The GC event feed while anyone follows it.
    gc_feed: Mutex<Weak<GcFeed>>,
    /// Tool calls this target served or failed, for the `availability.errors` check.
    pub calls: CallWindow,
    /// Snapshots being taken, which concurrent requests share.
    pub(crate) readings: InFlight,
    /// Samples over time, while a sampler runs (`sbmon serve`).
    pub history: History,
    /// Per-thread CPU at the sampler's last two ticks (`thread_list`'s `cpu_percent`).
    pub task_cpu: TaskCpu,
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
        if outcome == Outcome::Ok {
            self.reached();
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
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

/// GC CPU seconds per wall second between two readings of the last minute.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub ratio: f64,
    pub window_seconds: f64,
}

/// Cumulative GC CPU seconds as read over the last minutes, oldest first.
#[derive(Default)]
struct GcHistory {
    samples: VecDeque<(Instant, f64)>,
}

impl GcHistory {
    fn observe(&mut self, at: Instant, gc_cpu_seconds: f64) {
        if self
            .samples
            .back()
            .is_some_and(|(_, last)| gc_cpu_seconds < *last)
        {
            // The counter went back: the image restarted, and its past says nothing now.
            self.samples.clear();
        }
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) > HISTORY_SPAN)
            || self.samples.len() >= HISTORY_MAX
        {
            self.samples.pop_front();
        }
        self.samples.push_back((at, gc_cpu_seconds));
    }

    /// The GC share of wall time from the oldest to the newest reading taken within
    /// [`RATE_WINDOW`] before `now`.
    fn rate(&self, now: Instant) -> Option<Rate> {
        let recent = |(t, _): &&(Instant, f64)| now.saturating_duration_since(*t) <= RATE_WINDOW;
        let (first_at, first) = *self.samples.iter().find(recent)?;
        let (last_at, last) = *self.samples.back().filter(recent)?;
        let window = last_at.saturating_duration_since(first_at).as_secs_f64();
        // Below a tenth of a second the ratio is noise.
        (window >= 0.1 && last >= first).then(|| Rate {
            ratio: (last - first) / window,
            window_seconds: window,
        })
    }
}

impl Target {
    pub fn new(name: impl Into<String>, address: Address, options: ClientOptions) -> Self {
        Target {
            name: name.into(),
            client: AgentClient::new(address, options),
            gc_history: Mutex::new(GcHistory::default()),
            gc_feed: Mutex::new(Weak::new()),
            calls: CallWindow::default(),
            readings: InFlight::default(),
            history: History::default(),
            task_cpu: TaskCpu::default(),
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

    /// The agent's GC figures, recorded in the history the GC-time rate is computed from.
    /// Every reading of `:gc` for this target goes through here or [`Target::snapshot`].
    pub async fn read_gc(&self) -> Result<Gc, AgentError> {
        let gc = self.client.gc().await?;
        self.observe_gc(Instant::now(), gc.gc_cpu_seconds);
        Ok(gc)
    }

    /// A reading of the image and its process with at least `detail`: the one in flight for
    /// this target if there is one that covers `detail`, else a new one that requests arriving
    /// meanwhile share, so a burst of probes costs the image one reading.
    pub async fn snapshot(&self, detail: Detail) -> Arc<Snapshot> {
        self.readings
            .share(detail, |detail| async move {
                let snapshot = Snapshot::read(&self.client, detail).await;
                if let Some(readings) = &snapshot.image {
                    self.calls.reached();
                    if let Ok(gc) = &readings.gc {
                        self.observe_gc(Instant::now(), gc.gc_cpu_seconds);
                    }
                }
                snapshot
            })
            .await
    }

    fn observe_gc(&self, at: Instant, gc_cpu_seconds: f64) {
        self.gc_history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .observe(at, gc_cpu_seconds);
    }

    /// The GC share of wall time over the readings of the last minute (`None` until two
    /// readings at least a tenth of a second apart exist). Changes nothing.
    pub fn gc_rate_last_minute(&self) -> Option<Rate> {
        self.gc_history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .rate(Instant::now())
    }
}

/// A name for a target given without one: the image's name for `<dir>/N-NAME.sock` (what
/// `(sbmon-agent:start :name "NAME")` makes), `pid-N` for `<dir>/N.sock`, else the address.
pub fn default_name(address: &Address) -> String {
    if let Address::Unix(path) = address
        && let Some((pid, name)) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(crate::agent::address::parse_socket_name)
    {
        return name.unwrap_or_else(|| format!("pid-{pid}"));
    }
    address.to_string()
}

/// The name of a newly found image: its own, or `NAME@PID` when a watched image of another
/// process already has that name. Two images with one name are both watched, and reported.
fn unique_name(list: &[Arc<Target>], found: &Found, address: &Address) -> String {
    let name = default_name(address);
    if list.iter().any(|t| t.name == name) {
        let unique = format!("{name}@{}", found.pid);
        tracing::warn!(
            "two live images are named {name:?}: watching {address} as {unique:?}; give each \
             image its own (sbmon-agent:start :name ...)"
        );
        return unique;
    }
    name
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
                let name = unique_name(&list, f, &address);
                tracing::info!("watching {address} as {name}");
                list.push(Arc::new(Target::new(name, address, options.clone())));
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

    fn target() -> Target {
        Target::new(
            "x",
            "unix:/nonexistent".parse().unwrap(),
            ClientOptions::default(),
        )
    }

    #[test]
    fn gc_rate_needs_two_readings_a_tenth_of_a_second_apart() {
        let t0 = Instant::now();
        let mut h = GcHistory::default();
        assert!(h.rate(t0).is_none());
        h.observe(t0, 1.0);
        assert!(h.rate(t0).is_none());
        h.observe(t0 + Duration::from_millis(50), 1.01);
        assert!(h.rate(t0 + Duration::from_millis(50)).is_none());
        h.observe(t0 + Duration::from_secs(2), 1.5);
        let rate = h.rate(t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(rate.window_seconds, 2.0);
        assert!((rate.ratio - 0.25).abs() < 1e-12, "{rate:?}");
    }

    #[test]
    fn gc_rate_looks_back_one_minute_only() {
        let t0 = Instant::now();
        let mut h = GcHistory::default();
        h.observe(t0, 0.0);
        h.observe(t0 + Duration::from_secs(30), 10.0);
        h.observe(t0 + Duration::from_secs(70), 12.0);
        // The reading at 0 s is out of the window; 30 s .. 70 s remain.
        let rate = h.rate(t0 + Duration::from_secs(70)).unwrap();
        assert_eq!(rate.window_seconds, 40.0);
        assert!((rate.ratio - 0.05).abs() < 1e-12, "{rate:?}");
        // Nothing read in the last minute: no rate.
        assert!(h.rate(t0 + Duration::from_secs(200)).is_none());
    }

    #[test]
    fn a_restarted_image_starts_a_new_history() {
        let t0 = Instant::now();
        let mut h = GcHistory::default();
        h.observe(t0, 5.0);
        h.observe(t0 + Duration::from_secs(1), 5.5);
        h.observe(t0 + Duration::from_secs(2), 0.1);
        assert!(h.rate(t0 + Duration::from_secs(2)).is_none());
        h.observe(t0 + Duration::from_secs(4), 0.3);
        let rate = h.rate(t0 + Duration::from_secs(4)).unwrap();
        assert_eq!(rate.window_seconds, 2.0);
        assert!((rate.ratio - 0.1).abs() < 1e-12, "{rate:?}");
    }

    #[test]
    fn reading_the_rate_records_nothing() {
        let t = target();
        let t0 = Instant::now() - Duration::from_secs(10);
        t.observe_gc(t0, 1.0);
        t.observe_gc(t0 + Duration::from_secs(5), 2.0);
        let first = t.gc_rate_last_minute().unwrap();
        for _ in 0..3 {
            let again = t.gc_rate_last_minute().unwrap();
            assert_eq!(again.window_seconds, first.window_seconds);
            assert_eq!(again.ratio, first.ratio);
        }
        assert_eq!(first.window_seconds, 5.0);
        assert_eq!(t.gc_history.lock().unwrap().samples.len(), 2);
    }

    #[test]
    fn follows_discovered_agents() {
        let found = |pid: i32, alive: bool| Found {
            pid,
            name: None,
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
    fn named_images_keep_their_names_and_duplicates_are_told_apart() {
        let named = |pid: i32, name: &str| Found {
            pid,
            name: Some(name.into()),
            path: format!("/run/sbmon/{pid}-{name}.sock").into(),
            process_alive: true,
        };
        let ts = Targets::default();
        let options = ClientOptions::default();
        ts.sync_discovered(&[named(10, "orders"), named(11, "orders")], &options);
        let names = |ts: &Targets| ts.all().iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ts), ["orders", "orders@11"]);
        // The first one exits; a restart of it under a new pid gets the name back only once
        // the name is free again.
        ts.sync_discovered(&[named(11, "orders")], &options);
        assert_eq!(names(&ts), ["orders@11"]);
        ts.sync_discovered(&[named(11, "orders"), named(12, "billing")], &options);
        assert_eq!(names(&ts), ["billing", "orders@11"]);
        let a: Address = "unix:/tmp/sbmon-0/123-orders.sock".parse().unwrap();
        assert_eq!(default_name(&a), "orders");
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
