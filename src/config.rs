//! The config file (`--config FILE`, TOML): health thresholds and the bounds of the heap
//! walks. Every key is optional; what is absent keeps the defaults listed in the README
//! ("Health checks and thresholds", "What fills the heap").
//! Unknown keys are an error, so a typo never silently leaves a default in force.
//!
//! ```toml
//! [health.memory]
//! heap = { warning = 0.70, critical = 0.90 }   # heap used / dynamic-space-size
//! rss = { warning = 0.80, critical = 0.95 }    # RSS / memory limit
//! leak = { warning = 4096 }                    # bytes/s the retained heap must grow by to be a leak
//! [health.gc]
//! time = { warning = 0.05, critical = 0.20 }   # GC CPU seconds / wall seconds, last minute
//! [health.threads]
//! count = { warning = 100, critical = 500 }    # Lisp threads
//! stuck = { warning = 60 }                     # seconds seen waiting on one mutex (a deadlock is critical)
//! [health.resources]
//! fds = { warning = 0.80, critical = 0.95 }    # open fds / soft limit
//! [health.availability]
//! agent = { warning = 1.0 }                    # ping round trip, seconds; unreachable is critical
//! errors = { warning = 0.01, critical = 0.10 } # failed tool calls / calls, last minute
//! [heap]
//! max_walk_heap_bytes = 4294967296  # heap_histogram / heap_retainers refuse a larger heap
//! walk_seconds = 10                 # their default time budget for one walk
//! [journal]
//! priority_events = 200             # warning and critical events kept at most ...
//! priority_seconds = 86400          # ... and for at most this long
//! regular_events = 100              # info events kept at most ...
//! regular_seconds = 14400           # ... and for at most this long
//! gc_pause_seconds = 0.1            # a collection pausing the image this long is an event
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub heap: HeapConfig,
    #[serde(default)]
    pub journal: JournalConfig,
}

/// The event journal's bounds (README, "What happened: the event journal").
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Warning and critical events kept at most.
    pub priority_events: usize,
    /// How long warning and critical events are kept (seconds).
    pub priority_seconds: f64,
    /// Info events kept at most.
    pub regular_events: usize,
    /// How long info events are kept (seconds).
    pub regular_seconds: f64,
    /// A collection that paused the image at least this long (seconds) is an event.
    pub gc_pause_seconds: f64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            priority_events: 200,
            priority_seconds: 24.0 * 3600.0,
            regular_events: 100,
            regular_seconds: 4.0 * 3600.0,
            gc_pause_seconds: 0.1,
        }
    }
}

/// Most events one bucket may keep, so that a typo cannot ask for gigabytes (an event takes
/// at most about 3 KiB).
pub const MAX_JOURNAL_EVENTS: usize = 100_000;
/// Longest a bucket may keep an event: 30 days.
pub const MAX_JOURNAL_SECONDS: f64 = 30.0 * 86400.0;

impl JournalConfig {
    fn validate(&self) -> Result<(), String> {
        for (name, events) in [
            ("priority_events", self.priority_events),
            ("regular_events", self.regular_events),
        ] {
            if !(1..=MAX_JOURNAL_EVENTS).contains(&events) {
                return Err(format!(
                    "journal.{name} must be 1..{MAX_JOURNAL_EVENTS}, not {events}"
                ));
            }
        }
        for (name, seconds) in [
            ("priority_seconds", self.priority_seconds),
            ("regular_seconds", self.regular_seconds),
        ] {
            if !(seconds.is_finite() && (1.0..=MAX_JOURNAL_SECONDS).contains(&seconds)) {
                return Err(format!(
                    "journal.{name} must be a number of seconds in 1..{MAX_JOURNAL_SECONDS}, not {seconds}"
                ));
            }
        }
        let pause = self.gc_pause_seconds;
        if !(pause.is_finite() && (0.001..=60.0).contains(&pause)) {
            return Err(format!(
                "journal.gc_pause_seconds must be a number in 0.001..60, not {pause}"
            ));
        }
        Ok(())
    }
}

/// Bounds of the heap walks of `heap_histogram` and `heap_retainers`, which hold off every
/// collection of the image while they run (README, "What fills the heap").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeapConfig {
    /// The walks refuse an image whose heap in use is larger than this (bytes).
    pub max_walk_heap_bytes: u64,
    /// The time budget of one walk when the call gives none (seconds): past it the walk
    /// stops and its result is marked truncated.
    pub walk_seconds: f64,
}

impl Default for HeapConfig {
    fn default() -> Self {
        HeapConfig {
            max_walk_heap_bytes: 4 << 30,
            walk_seconds: 10.0,
        }
    }
}

/// A check's limits: at or above `warning` it is degraded, at or above `critical` critical.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub warning: f64,
    /// `None`: no value is critical by itself (the agent check: only unreachable is).
    #[serde(default)]
    pub critical: Option<f64>,
}

const fn limits(warning: f64, critical: f64) -> Threshold {
    Threshold {
        warning,
        critical: Some(critical),
    }
}

macro_rules! threshold_group {
    ($name:ident { $($field:ident: $default:expr),* $(,)? }) => {
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name { $(pub $field: Threshold),* }
        impl Default for $name {
            fn default() -> Self { $name { $($field: $default),* } }
        }
    };
}

threshold_group!(MemoryThresholds {
    heap: limits(0.70, 0.90),
    rss: limits(0.80, 0.95),
    // Bytes a second: the least growth of the heap retained after GC that can be a leak
    // (about 14 MiB an hour). No growth rate is critical by default.
    leak: Threshold {
        warning: 4096.0,
        critical: None
    },
});
threshold_group!(GcThresholds {
    time: limits(0.05, 0.20)
});
threshold_group!(ThreadThresholds {
    count: limits(100.0, 500.0),
    // Seconds a thread has been seen waiting on one mutex. A deadlock cycle is critical and a
    // thread in the debugger degraded whatever these say.
    stuck: Threshold {
        warning: 60.0,
        critical: None
    },
});
threshold_group!(ResourceThresholds {
    fds: limits(0.80, 0.95)
});
threshold_group!(AvailabilityThresholds {
    agent: Threshold {
        warning: 1.0,
        critical: None
    },
    errors: limits(0.01, 0.10),
});

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub memory: MemoryThresholds,
    pub gc: GcThresholds,
    pub threads: ThreadThresholds,
    pub resources: ResourceThresholds,
    pub availability: AvailabilityThresholds,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: display,
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if !(self.heap.walk_seconds.is_finite() && (0.1..=60.0).contains(&self.heap.walk_seconds)) {
            return Err("heap.walk_seconds must be a number in 0.1..60".into());
        }
        if self.heap.max_walk_heap_bytes == 0 {
            return Err("heap.max_walk_heap_bytes must be at least 1".into());
        }
        self.journal.validate()?;
        let h = &self.health;
        let all = [
            ("memory.heap", h.memory.heap),
            ("memory.rss", h.memory.rss),
            ("memory.leak", h.memory.leak),
            ("gc.time", h.gc.time),
            ("threads.count", h.threads.count),
            ("threads.stuck", h.threads.stuck),
            ("resources.fds", h.resources.fds),
            ("availability.agent", h.availability.agent),
            ("availability.errors", h.availability.errors),
        ];
        for (name, t) in all {
            if !(t.warning.is_finite() && t.warning >= 0.0) {
                return Err(format!("{name}: warning must be a number >= 0"));
            }
            if let Some(c) = t.critical
                && !(c.is_finite() && c >= t.warning)
            {
                return Err(format!("{name}: critical must be a number >= warning"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_files_keep_defaults() {
        let c =
            Config::parse("[health.memory]\nheap = { warning = 0.1, critical = 0.2 }\n").unwrap();
        assert_eq!(c.health.memory.heap, limits(0.1, 0.2));
        assert_eq!(c.health.memory.rss, limits(0.80, 0.95));
        assert_eq!(c.health.threads.count, limits(100.0, 500.0));
        assert_eq!(c.health.threads.stuck.warning, 60.0);
        assert_eq!(c.health.threads.stuck.critical, None);
        let c = Config::parse("[health.threads]\nstuck = { warning = 5 }\n").unwrap();
        assert_eq!(c.health.threads.stuck.warning, 5.0);
        assert_eq!(c.health.threads.count, limits(100.0, 500.0));
        assert_eq!(c.health.availability.agent.critical, None);
    }

    #[test]
    fn refuses_typos_and_inverted_limits() {
        assert!(Config::parse("[health.memory]\nheapp = { warning = 0.1 }").is_err());
        assert!(Config::parse("[health.gc]\ntime = { warning = 0.5, critical = 0.1 }").is_err());
        assert!(Config::parse("[healt]").is_err());
    }

    #[test]
    fn heap_walk_bounds_default_and_are_checked() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.heap.max_walk_heap_bytes, 4 << 30);
        assert_eq!(c.heap.walk_seconds, 10.0);
        let c = Config::parse("[heap]\nmax_walk_heap_bytes = 1000\n").unwrap();
        assert_eq!(c.heap.max_walk_heap_bytes, 1000);
        assert_eq!(c.heap.walk_seconds, 10.0);
        assert!(Config::parse("[heap]\nwalk_seconds = 0").is_err());
        assert!(Config::parse("[heap]\nmax_walk_heap_bytes = 0").is_err());
        assert!(Config::parse("[heap]\nmax_heap = 1").is_err());
    }

    #[test]
    fn journal_bounds_default_and_are_checked() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.journal, JournalConfig::default());
        assert_eq!(c.journal.priority_events, 200);
        assert_eq!(c.journal.regular_seconds, 14400.0);
        let c = Config::parse("[journal]\nregular_events = 5\n").unwrap();
        assert_eq!(c.journal.regular_events, 5);
        assert_eq!(c.journal.priority_events, 200);
        for bad in [
            "regular_events = 0",
            "priority_events = 100001",
            "priority_seconds = 0",
            "regular_seconds = 1e9",
            "gc_pause_seconds = 0",
            "gc_pause = 1",
        ] {
            let err = Config::parse(&format!("[journal]\n{bad}\n")).unwrap_err();
            assert!(
                err.contains("journal") || err.contains("unknown field"),
                "{bad}: {err}"
            );
        }
    }
}
