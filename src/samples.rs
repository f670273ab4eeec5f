//! A target's samples over time: what one sample holds ([`Sample`]), and the bounded ring
//! that keeps them ([`History`]), filled by the sampler (`sampler.rs`) and read by windowed
//! answers (`memory_trend`, the `memory.leak` health check).
//!
//! A reading that failed is a gap, never a made-up point: the analysis of `trend.rs` refuses
//! a verdict across one.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::agent::reply::Gc;

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_HISTORY: Duration = Duration::from_secs(3600);
/// Longest history a ring may keep, so that a typo cannot ask for gigabytes.
pub const MAX_HISTORY: Duration = Duration::from_secs(24 * 3600);
/// Generations 0..6 of SBCL's gencgc (6 is pseudo-static).
pub const GENERATIONS: usize = 7;

/// How often to sample and how much to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub interval: Duration,
    pub history: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            interval: DEFAULT_INTERVAL,
            history: DEFAULT_HISTORY,
        }
    }
}

impl Settings {
    /// Checked settings: an interval of 1..60 s and a history of at least one interval and at
    /// most a day.
    pub fn new(interval: Duration, history: Duration) -> Result<Settings, String> {
        if interval < MIN_INTERVAL || interval > MAX_INTERVAL {
            return Err(format!(
                "--sample-interval must be 1..60 seconds, not {}",
                interval.as_secs_f64()
            ));
        }
        if history < interval || history > MAX_HISTORY {
            return Err(format!(
                "--sample-history must be between the sample interval and 86400 seconds, not {}",
                history.as_secs_f64()
            ));
        }
        Ok(Settings { interval, history })
    }

    /// Entries the ring keeps: one per interval over the history.
    pub fn capacity(&self) -> usize {
        (self.history.as_secs_f64() / self.interval.as_secs_f64()).ceil() as usize
    }
}

/// One reading of a target. Plain figures only, no allocation, so the ring's memory is its
/// capacity times `size_of::<Entry>()`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Unix time the reading was taken.
    pub time: f64,
    pub pid: i32,
    pub heap_used: u64,
    pub heap_limit: u64,
    /// The lowest heap size right after a collection, of the collections since the previous
    /// sample; `None` when none happened (or the agent cannot time collections).
    pub retained: Option<u64>,
    /// Collections since the previous sample of this process.
    pub new_collections: u32,
    pub generations: [u64; GENERATIONS],
    pub bytes_consed: u64,
    pub gc_count: Option<u64>,
    pub gc_cpu_seconds: f64,
    pub rss: u64,
    /// Threads (tasks) of the process.
    pub threads: u64,
    /// User + system CPU seconds of the process.
    pub cpu_seconds: f64,
}

/// What a sampling tick left in the ring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Entry {
    Sample(Sample),
    /// The target could not be read at `time`: there is no figure for this interval.
    Gap {
        time: f64,
    },
}

impl Entry {
    pub fn time(&self) -> f64 {
        match self {
            Entry::Sample(s) => s.time,
            Entry::Gap { time } => *time,
        }
    }
}

/// One target's sample ring, and whether a sampler fills it.
#[derive(Default)]
pub struct History {
    ring: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    settings: Option<Settings>,
    entries: VecDeque<Entry>,
    /// The last collection already counted: (pid, sequence number).
    last_collection: Option<(i32, u64)>,
    /// A tick whose reading has not finished yet.
    busy: bool,
}

impl History {
    /// The sampler's settings when one fills this ring; `None` under a one-shot `sbmon call`.
    pub fn settings(&self) -> Option<Settings> {
        self.lock().settings
    }

    /// Entries at or after unix time `since`, oldest first.
    pub fn since(&self, since: f64) -> Vec<Entry> {
        let ring = self.lock();
        let start = ring.entries.partition_point(|e| e.time() < since);
        ring.entries.range(start..).copied().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ring's capacity in entries (0 with no sampler).
    pub fn capacity(&self) -> usize {
        self.lock().settings.map_or(0, |s| s.capacity())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn start(&self, settings: Settings) {
        let mut ring = self.lock();
        ring.settings = Some(settings);
        let capacity = settings.capacity();
        while ring.entries.len() > capacity {
            ring.entries.pop_front();
        }
        let missing = capacity.saturating_sub(ring.entries.len());
        ring.entries.reserve(missing);
    }

    /// Claims the next tick; false while the previous one is still reading (a slow target).
    pub fn begin_tick(&self) -> bool {
        !std::mem::replace(&mut self.lock().busy, true)
    }

    pub fn end_tick(&self, entry: Entry) {
        let mut ring = self.lock();
        ring.busy = false;
        let capacity = ring.settings.map_or(1, |s| s.capacity()).max(1);
        push_bounded(&mut ring.entries, entry, capacity);
    }

    /// Records `gc`'s new collections as seen for `pid`; returns how many there were since
    /// the last sample and the lowest heap after any of them.
    pub fn new_collections(&self, pid: i32, gc: &Gc) -> (u32, Option<u64>) {
        let mut ring = self.lock();
        let after = match ring.last_collection {
            Some((p, seq)) if p == pid => Some(seq),
            _ => None,
        };
        let fresh: Vec<_> = gc
            .recent
            .iter()
            .filter(|r| after.is_none_or(|seq| r.seq > seq))
            .collect();
        if let Some(last) = gc.recent.iter().map(|r| r.seq).max() {
            ring.last_collection = Some((pid, last));
        }
        if after.is_none() {
            // The first look at this process: what happened before it is not "since the
            // previous sample", so it counts nothing.
            return (0, None);
        }
        let count = u32::try_from(fresh.len()).unwrap_or(u32::MAX);
        (count, fresh.iter().map(|r| r.heap_after).min())
    }
}

fn push_bounded(entries: &mut VecDeque<Entry>, entry: Entry, capacity: usize) {
    while entries.len() >= capacity {
        entries.pop_front();
    }
    // Consecutive gaps say nothing more than the first one and the last one: keep two.
    if let Entry::Gap { .. } = entry
        && entries.len() >= 2
        && matches!(entries[entries.len() - 1], Entry::Gap { .. })
        && matches!(entries[entries.len() - 2], Entry::Gap { .. })
    {
        entries.pop_back();
    }
    entries.push_back(entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(time: f64) -> Entry {
        Entry::Sample(Sample {
            time,
            pid: 1,
            heap_used: 0,
            heap_limit: 0,
            retained: None,
            new_collections: 0,
            generations: [0; GENERATIONS],
            bytes_consed: 0,
            gc_count: None,
            gc_cpu_seconds: 0.0,
            rss: 0,
            threads: 0,
            cpu_seconds: 0.0,
        })
    }

    #[test]
    fn the_ring_keeps_its_capacity_over_many_samples() {
        let history = History::default();
        let settings = Settings::new(Duration::from_secs(1), Duration::from_secs(60)).unwrap();
        history.start(settings);
        for i in 0..10_000 {
            assert!(history.begin_tick());
            history.end_tick(sample(f64::from(i)));
        }
        assert_eq!(history.len(), 60);
        let kept = history.since(0.0);
        assert_eq!(kept.first().map(Entry::time), Some(9940.0));
        assert_eq!(kept.last().map(Entry::time), Some(9999.0));
        // An hour at the default interval: 720 entries of a fixed size.
        assert_eq!(Settings::default().capacity(), 720);
        assert_eq!(std::mem::size_of::<Entry>(), 160);
    }

    #[test]
    fn a_tick_in_flight_skips_the_next() {
        let history = History::default();
        history.start(Settings::default());
        assert!(history.begin_tick());
        assert!(!history.begin_tick());
        history.end_tick(Entry::Gap { time: 1.0 });
        assert!(history.begin_tick());
    }

    #[test]
    fn a_long_outage_keeps_its_first_and_last_gap() {
        let history = History::default();
        history.start(Settings::default());
        let tick = |e| {
            assert!(history.begin_tick());
            history.end_tick(e);
        };
        tick(sample(0.0));
        for t in 1..100 {
            tick(Entry::Gap { time: f64::from(t) });
        }
        let kept = history.since(0.0);
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[1], Entry::Gap { time: 1.0 });
        assert_eq!(kept[2], Entry::Gap { time: 99.0 });
    }

    #[test]
    fn settings_are_checked() {
        assert!(Settings::new(Duration::from_secs(0), DEFAULT_HISTORY).is_err());
        assert!(Settings::new(Duration::from_secs(61), DEFAULT_HISTORY).is_err());
        assert!(Settings::new(Duration::from_secs(5), Duration::from_secs(2)).is_err());
        assert!(Settings::new(Duration::from_secs(5), Duration::from_secs(90_000)).is_err());
        assert!(Settings::new(Duration::from_secs(1), Duration::from_secs(3600)).is_ok());
    }
}
