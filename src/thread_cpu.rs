//! CPU use per thread over an interval: the user + system seconds of each task of the
//! process (`/proc/PID/task/TID/stat`) read twice, divided by the wall time between the reads.
//!
//! Under `sbmon serve` the sampler reads the tasks every `--sample-interval` and a target keeps
//! its last two readings ([`TaskCpu`]: two maps, one entry per task, so bounded by the process's
//! threads, outside the fixed-size sample ring). A call without a sampler behind it (a one-shot
//! `sbmon call`), or whose sampler's readings are stale, measures over [`OWN_INTERVAL`] itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Serialize;

use crate::process::{self, ProcessError, TaskInfo};

/// How long a call measures by itself when no sampler reading serves.
pub const OWN_INTERVAL: Duration = Duration::from_millis(500);

/// Most tasks kept per reading (a process with more is cut, its highest tids left out).
const MAX_TASKS: usize = 10_000;

/// CPU seconds of each task at one moment.
#[derive(Debug, Clone)]
pub struct Reading {
    pub pid: i32,
    pub at: Instant,
    pub cpu_seconds: HashMap<i32, f64>,
}

impl Reading {
    pub fn of(pid: i32, at: Instant, tasks: &[TaskInfo]) -> Reading {
        Reading {
            pid,
            at,
            cpu_seconds: tasks
                .iter()
                .take(MAX_TASKS)
                .map(|t| (t.tid, t.cpu_seconds))
                .collect(),
        }
    }

    /// Read the tasks of `pid` now.
    pub fn take(pid: i32) -> Result<Reading, ProcessError> {
        let tasks = process::tasks(pid)?;
        Ok(Reading::of(pid, Instant::now(), &tasks))
    }
}

/// Where the figures of an interval came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The last two readings of the sampler of `sbmon serve`.
    Sampler,
    /// This call read the tasks twice, [`OWN_INTERVAL`] apart.
    ThisCall,
}

/// CPU percent per task over one interval (100 = one CPU all the time).
#[derive(Debug, Clone)]
pub struct Interval {
    pub seconds: f64,
    pub source: Source,
    pub percent: HashMap<i32, f64>,
    /// Seconds from the end of the interval to when it was asked for.
    pub age_seconds: f64,
}

/// The percent of each task present in both readings; `None` unless `after` is a later
/// reading of the same process.
pub fn between(before: &Reading, after: &Reading, source: Source) -> Option<Interval> {
    let seconds = after.at.checked_duration_since(before.at)?.as_secs_f64();
    if before.pid != after.pid || seconds <= 0.0 {
        return None;
    }
    let percent = after
        .cpu_seconds
        .iter()
        .filter_map(|(tid, now)| {
            let then = before.cpu_seconds.get(tid)?;
            Some((*tid, ((now - then).max(0.0) / seconds * 100.0)))
        })
        .collect();
    Some(Interval {
        seconds,
        source,
        percent,
        age_seconds: after.at.elapsed().as_secs_f64(),
    })
}

/// A target's last two task readings, recorded by the sampler.
#[derive(Default)]
pub struct TaskCpu {
    last_two: Mutex<(Option<Reading>, Option<Reading>)>,
}

impl TaskCpu {
    pub fn record(&self, reading: Reading) {
        let mut last = self.last_two.lock().unwrap_or_else(|p| p.into_inner());
        let newest = last.1.take();
        *last = (newest, Some(reading));
    }

    /// The interval between the last two readings of process `pid`, if the newer is at most
    /// `max_age` old.
    pub fn last_interval(&self, pid: i32, max_age: Duration) -> Option<Interval> {
        let last = self.last_two.lock().unwrap_or_else(|p| p.into_inner());
        let (Some(before), Some(after)) = (&last.0, &last.1) else {
            return None;
        };
        if after.pid != pid || after.at.elapsed() > max_age {
            return None;
        }
        between(before, after, Source::Sampler)
    }
}

/// The sampler's last interval when it is fresh (its newer reading at most two sample
/// intervals old), else one measured now over [`OWN_INTERVAL`].
pub async fn recent(
    cpu: &TaskCpu,
    pid: i32,
    sample_interval: Option<Duration>,
) -> Result<Interval, ProcessError> {
    if let Some(interval) = sample_interval
        && let Some(found) = cpu.last_interval(pid, interval * 2)
    {
        return Ok(found);
    }
    let before = crate::blocking::run(move || Reading::take(pid)).await?;
    tokio::time::sleep(OWN_INTERVAL).await;
    let after = crate::blocking::run(move || Reading::take(pid)).await?;
    Ok(
        between(&before, &after, Source::ThisCall).unwrap_or(Interval {
            seconds: 0.0,
            source: Source::ThisCall,
            percent: HashMap::new(),
            age_seconds: 0.0,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(pid: i32, at: Instant, cpu: &[(i32, f64)]) -> Reading {
        Reading {
            pid,
            at,
            cpu_seconds: cpu.iter().copied().collect(),
        }
    }

    #[test]
    fn percent_is_cpu_delta_over_wall_delta() {
        let t0 = Instant::now() - Duration::from_secs(5);
        let a = reading(1, t0, &[(1, 10.0), (2, 3.0), (3, 1.0)]);
        let b = reading(
            1,
            t0 + Duration::from_secs(2),
            &[(1, 12.0), (2, 3.1), (4, 9.0)],
        );
        let i = between(&a, &b, Source::Sampler).unwrap();
        assert_eq!(i.seconds, 2.0);
        assert!((i.percent[&1] - 100.0).abs() < 1e-9);
        assert!((i.percent[&2] - 5.0).abs() < 1e-9);
        // Task 3 ended, task 4 is new: neither has an interval.
        assert_eq!(i.percent.len(), 2);
    }

    #[test]
    fn no_interval_across_processes_or_backwards() {
        let t0 = Instant::now();
        let a = reading(1, t0, &[(1, 1.0)]);
        let b = reading(2, t0 + Duration::from_secs(1), &[(1, 2.0)]);
        assert!(between(&a, &b, Source::Sampler).is_none());
        assert!(between(&b, &a, Source::Sampler).is_none());
    }

    #[test]
    fn keeps_the_last_two_readings_and_refuses_stale_ones() {
        let cpu = TaskCpu::default();
        let t0 = Instant::now() - Duration::from_secs(30);
        cpu.record(reading(7, t0, &[(7, 0.0)]));
        assert!(cpu.last_interval(7, Duration::from_secs(60)).is_none());
        cpu.record(reading(7, t0 + Duration::from_secs(10), &[(7, 1.0)]));
        cpu.record(reading(7, t0 + Duration::from_secs(20), &[(7, 6.0)]));
        let i = cpu.last_interval(7, Duration::from_secs(60)).unwrap();
        assert_eq!(i.seconds, 10.0);
        assert!((i.percent[&7] - 50.0).abs() < 1e-9);
        // The newest reading is 10 s old: too old for a 5 s freshness bound.
        assert!(cpu.last_interval(7, Duration::from_secs(5)).is_none());
        assert!(cpu.last_interval(8, Duration::from_secs(60)).is_none());
    }
}
