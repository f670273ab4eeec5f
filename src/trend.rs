//! Memory over a window of samples: is the heap stable, growing, or leaking?
//!
//! A leak shows in the heap *retained* after collections, not in the heap itself, which rises
//! between collections whatever the program keeps. And in SBCL's generational collector not
//! every collection tells what is retained: a nursery collection promotes what it cannot free
//! at that moment (objects in flight, whole pages pinned by conservative stack roots) into
//! generation 1, where it stays until generation 1 is collected. So the heap after nursery
//! collections (`survivors`) climbs in a program that keeps nothing, and falls back when an
//! older generation is collected. The figure a leak moves is the heap right after a
//! collection of an older generation (`retained`, the floor): seen when, between two samples,
//! an older generation shrank or passed its survivors on to the next.
//!
//! A leak is suspected when that floor rose at least `min_growth` bytes a second across the
//! older collections of the window (at least [`MIN_FLOORS`] of them, on a straight line with
//! R² ≥ [`MIN_FIT`]), the heap after nursery collections rose steadily too, and the
//! last floor is still higher than the one before: a cache that filled and stopped is not a
//! leak once it has stopped, and a program that allocates and frees is not one at all.
//!
//! No verdict is given across a restart (the series starts again), with the target
//! unreachable at the end of the window, or from fewer than [`MIN_SAMPLES`] samples over
//! [`MIN_SPAN`] seconds.

use schemars::JsonSchema;
use serde::Serialize;

use crate::figures::unix_now;
use crate::samples::{Entry, History, Sample};

/// The window `memory_trend` and the `memory.leak` health check look back over by default.
pub const DEFAULT_WINDOW: f64 = 600.0;

/// The trend of the last `window` seconds of `history`.
pub fn recent(history: &History, window: f64, min_growth: f64) -> Trend {
    analyse(&history.since(unix_now() - window), min_growth)
}

/// Fewest samples, and shortest time they span, for any verdict.
pub const MIN_SAMPLES: usize = 10;
pub const MIN_SPAN: f64 = 30.0;
/// Least fit (coefficient of determination) of a line for growth to count as steady.
pub const MIN_FIT: f64 = 0.6;
/// Collections of older generations needed in the window to judge what is retained.
pub const MIN_FLOORS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Neither the heap nor the heap retained after collections keeps growing.
    Stable,
    /// The heap, or what survives nursery collections, keeps growing, but too few older
    /// collections (or too unsteady a rise) to call it retained.
    Growing,
    /// The heap after collections of older generations rose through the window and still
    /// rises.
    LeakSuspected,
    /// Too few samples, a restart, or the target unreachable: no verdict.
    InsufficientData,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Stable => "stable",
            Verdict::Growing => "growing",
            Verdict::LeakSuspected => "leak_suspected",
            Verdict::InsufficientData => "insufficient_data",
        }
    }
}

/// A least-squares line through (seconds, bytes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
pub struct Fit {
    /// Bytes per second.
    pub slope: f64,
    /// Coefficient of determination, 0..1 (1: every point on the line).
    pub r2: f64,
    pub points: usize,
}

/// Heap figures over the window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
pub struct Span {
    pub first: u64,
    pub last: u64,
    pub min: u64,
    pub max: u64,
}

/// What the window showed and what is concluded from it.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Trend {
    pub verdict: Verdict,
    /// The evidence in one sentence.
    pub reason: String,
    /// Seconds of samples used (first to last), at most the window asked for.
    pub covered_seconds: f64,
    /// Samples used, and readings in the window that failed (the target did not answer).
    pub samples: usize,
    pub gaps: usize,
    /// Collections in the window (from the GC count; else as the agent recorded them).
    pub collections: u64,
    /// Samples that saw a collection of any generation since the one before.
    pub collection_samples: usize,
    /// Samples that saw a collection of an older generation: the points of the retained line.
    pub older_collection_samples: usize,
    /// Heap in use (first, last, min, max), when there are samples.
    pub heap: Option<Span>,
    /// Heap after collections of older generations: what the program retains.
    pub retained: Option<Span>,
    /// Heap after nursery collections (the lowest between two samples).
    pub survivors: Option<Span>,
    /// Bytes allocated per second over the window.
    pub allocation_bytes_per_second: Option<f64>,
    /// GC CPU seconds per wall second over the window.
    pub gc_time_ratio: Option<f64>,
    /// The line through the heap in use.
    pub heap_growth: Option<Fit>,
    /// The line through the retained heap: the figure a leak moves.
    pub retained_growth: Option<Fit>,
    /// The line through the heap after nursery collections.
    pub survivor_growth: Option<Fit>,
    /// At the retained heap's growth rate, seconds until the heap limit (when leaking).
    pub seconds_to_heap_limit: Option<f64>,
    /// Growth below this many bytes a second counts as flat.
    pub min_growth_bytes_per_second: f64,
}

/// Least squares over `points`; `None` with fewer than 2 points or no spread in time (two
/// points fit their line exactly).
pub fn fit(points: &[(f64, f64)]) -> Option<Fit> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), p| (x + p.0 / n, y + p.1 / n));
    let (mut sxx, mut sxy, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in points {
        let (dx, dy) = (x - mx, y - my);
        sxx += dx * dx;
        sxy += dx * dy;
        syy += dy * dy;
    }
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    // A flat series is fit perfectly by a flat line.
    let r2 = if syy > 0.0 {
        (sxy * sxy / (sxx * syy)).clamp(0.0, 1.0)
    } else {
        1.0
    };
    Some(Fit {
        slope,
        r2,
        points: points.len(),
    })
}

fn span(values: impl Iterator<Item = u64> + Clone) -> Option<Span> {
    Some(Span {
        first: values.clone().next()?,
        last: values.clone().last()?,
        min: values.clone().min()?,
        max: values.max()?,
    })
}

fn steady(f: Option<Fit>, min_growth: f64) -> bool {
    // Two points always fit their line: steadiness needs a third.
    f.is_some_and(|f| f.slope >= min_growth && f.points >= 3 && f.r2 >= MIN_FIT)
}

/// Whether an older generation (1 and up) was collected between two samples: one shrank (only
/// a collection frees), or one beyond generation 1 grew (only a collection of the generation
/// below promotes into it).
fn older_collected(before: &Sample, after: &Sample) -> bool {
    let g = (&before.generations, &after.generations);
    (1..g.0.len()).any(|i| g.1[i] < g.0[i]) || (2..g.0.len() - 1).any(|i| g.1[i] > g.0[i])
}

/// The trend of `entries` (oldest first, all inside the window), with growth under
/// `min_growth` bytes a second counting as flat.
pub fn analyse(entries: &[Entry], min_growth: f64) -> Trend {
    let gaps = entries
        .iter()
        .filter(|e| matches!(e, Entry::Gap { .. }))
        .count();
    let mut t = Trend {
        verdict: Verdict::InsufficientData,
        reason: String::new(),
        covered_seconds: 0.0,
        samples: 0,
        gaps,
        collections: 0,
        collection_samples: 0,
        older_collection_samples: 0,
        heap: None,
        retained: None,
        survivors: None,
        allocation_bytes_per_second: None,
        gc_time_ratio: None,
        heap_growth: None,
        retained_growth: None,
        survivor_growth: None,
        seconds_to_heap_limit: None,
        min_growth_bytes_per_second: min_growth,
    };
    if let Some(Entry::Gap { time }) = entries.last() {
        t.reason = format!(
            "the target could not be read at the end of the window (unix time {time:.0}): no \
             verdict across a gap"
        );
        return t;
    }
    let samples = current_run(entries);
    let restarted = samples.len() < entries.len() - gaps;
    t.samples = samples.len();
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        t.reason = "no samples in the window yet".into();
        return t;
    };
    let seconds = last.time - first.time;
    t.covered_seconds = seconds;
    t.heap = span(samples.iter().map(|s| s.heap_used));
    // The first sample's collections happened before the window.
    let pairs = samples.windows(2).map(|w| (&w[0], &w[1]));
    let survivors: Vec<(f64, u64)> = pairs
        .clone()
        .filter_map(|(_, s)| s.retained.map(|r| (s.time, r)))
        .collect();
    let floors: Vec<(f64, u64)> = pairs
        .filter(|(before, after)| older_collected(before, after))
        .filter_map(|(_, s)| s.retained.map(|r| (s.time, r)))
        .collect();
    t.collection_samples = survivors.len();
    t.older_collection_samples = floors.len();
    t.survivors = span(survivors.iter().map(|p| p.1));
    t.retained = span(floors.iter().map(|p| p.1));
    t.collections = match (first.gc_count, last.gc_count) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => samples
            .iter()
            .skip(1)
            .map(|s| u64::from(s.new_collections))
            .sum(),
    };
    if seconds > 0.0 {
        t.allocation_bytes_per_second =
            Some(last.bytes_consed.saturating_sub(first.bytes_consed) as f64 / seconds);
        t.gc_time_ratio = Some(((last.gc_cpu_seconds - first.gc_cpu_seconds) / seconds).max(0.0));
    }
    if samples.len() < MIN_SAMPLES || seconds < MIN_SPAN {
        t.reason = format!(
            "{} samples over {seconds:.0} s{}; a verdict needs {MIN_SAMPLES} over {MIN_SPAN:.0} s",
            samples.len(),
            if restarted {
                " since the image restarted"
            } else {
                ""
            }
        );
        return t;
    }

    let as_points = |v: &[(f64, u64)]| -> Vec<(f64, f64)> {
        v.iter()
            .map(|(time, bytes)| (time - first.time, *bytes as f64))
            .collect()
    };
    let heap: Vec<(f64, u64)> = samples.iter().map(|s| (s.time, s.heap_used)).collect();
    t.heap_growth = fit(&as_points(&heap));
    t.survivor_growth = fit(&as_points(&survivors));
    t.retained_growth = fit(&as_points(&floors));

    if floors.len() < MIN_FLOORS {
        let growing = steady(t.heap_growth, min_growth) || steady(t.survivor_growth, min_growth);
        t.verdict = if growing {
            Verdict::Growing
        } else {
            Verdict::Stable
        };
        t.reason = format!(
            "{} collection(s) of an older generation in the window ({MIN_FLOORS} are needed to \
             tell what is retained from garbage promoted out of the nursery); the heap after \
             nursery collections {}, the heap {}",
            floors.len(),
            describe(t.survivor_growth, min_growth),
            describe(t.heap_growth, min_growth)
        );
        return t;
    }

    let still_rising = match floors.as_slice() {
        [.., (t0, a), (t1, b)] => (*b as f64 - *a as f64) >= min_growth / 2.0 * (t1 - t0),
        _ => false,
    };
    if steady(t.retained_growth, min_growth)
        && steady(t.survivor_growth, min_growth)
        && still_rising
    {
        t.verdict = Verdict::LeakSuspected;
        let rate = t.retained_growth.map_or(0.0, |f| f.slope);
        if let Some(r) = t.retained {
            t.seconds_to_heap_limit = Some(last.heap_limit.saturating_sub(r.last) as f64 / rate);
        }
        t.reason = format!(
            "the heap after collections of older generations {} across {} of them and is \
             still rising; the heap after nursery collections {}",
            describe(t.retained_growth, min_growth),
            floors.len(),
            describe(t.survivor_growth, min_growth)
        );
    } else if steady(t.retained_growth, min_growth) && !still_rising {
        t.verdict = Verdict::Stable;
        t.reason = format!(
            "the heap after collections of older generations grew ({}) but has stopped: the \
             last of {} is no higher than the one before",
            describe(t.retained_growth, min_growth),
            floors.len()
        );
    } else if steady(t.retained_growth, min_growth) || steady(t.heap_growth, min_growth) {
        t.verdict = Verdict::Growing;
        t.reason = format!(
            "the heap after collections of older generations {}, after nursery collections \
             {}, the heap {}",
            describe(t.retained_growth, min_growth),
            describe(t.survivor_growth, min_growth),
            describe(t.heap_growth, min_growth)
        );
    } else {
        t.verdict = Verdict::Stable;
        t.reason = format!(
            "the heap after collections of older generations {} across {} of them",
            describe(t.retained_growth, min_growth),
            floors.len()
        );
    }
    t
}

/// The samples since the last restart in `entries` (a new pid, or a byte counter that went
/// back), gaps left out.
fn current_run(entries: &[Entry]) -> Vec<Sample> {
    let mut run: Vec<Sample> = Vec::new();
    for e in entries {
        if let Entry::Sample(s) = e {
            if run
                .last()
                .is_some_and(|p| p.pid != s.pid || s.bytes_consed < p.bytes_consed)
            {
                run.clear();
            }
            run.push(*s);
        }
    }
    run
}

fn describe(f: Option<Fit>, min_growth: f64) -> String {
    match f {
        None => "has too few points for a line".into(),
        Some(f) if f.slope.abs() < min_growth => format!(
            "is flat ({:+.1} KiB/s, under {:.1} KiB/s)",
            f.slope / 1024.0,
            min_growth / 1024.0
        ),
        Some(f) if f.r2 < MIN_FIT => format!(
            "moves without a steady line ({:+.1} KiB/s, fit R² {:.2} < {MIN_FIT})",
            f.slope / 1024.0,
            f.r2
        ),
        Some(f) => format!(
            "{} {:.1} KiB/s (fit R² {:.2})",
            if f.slope > 0.0 { "grows" } else { "shrinks" },
            f.slope.abs() / 1024.0,
            f.r2
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::GENERATIONS;

    const MIN: f64 = 1024.0;

    /// A sample at `time`: heap in use, the heap after the nursery collections since the last
    /// sample (if any), and whether an older generation was collected too.
    fn at(time: f64, heap: u64, after: Option<u64>, older: bool) -> Entry {
        let mut generations = [0; GENERATIONS];
        // Generation 1 grows by promotion and empties when it is collected.
        generations[1] = if older { 0 } else { (time as u64 + 1) * 1000 };
        Entry::Sample(Sample {
            time,
            pid: 7,
            heap_used: heap,
            heap_limit: 1 << 30,
            retained: after,
            new_collections: u32::from(after.is_some()),
            generations,
            bytes_consed: (time * 1e6) as u64,
            gc_count: None,
            gc_cpu_seconds: 0.0,
            rss: 0,
            threads: 1,
            cpu_seconds: 0.0,
        })
    }

    fn series(n: usize, f: impl Fn(f64) -> (u64, Option<u64>, bool)) -> Vec<Entry> {
        (0..n)
            .map(|i| {
                let t = i as f64;
                let (h, r, older) = f(t);
                at(t, h, r, older)
            })
            .collect()
    }

    /// Garbage promoted out of the nursery piles up at `junk` bytes a second and is freed
    /// by an older collection every `period` seconds; `kept(t)` is what the program keeps.
    fn service(n: usize, junk: f64, period: u64, kept: impl Fn(f64) -> f64) -> Vec<Entry> {
        series(n, |t| {
            let since_older = (t as u64 % period) as f64;
            let after = 20e6 + kept(t) + junk * since_older;
            (
                (after + 15e6) as u64,
                Some(after as u64),
                since_older == 0.0 && t > 0.0,
            )
        })
    }

    #[test]
    fn a_line_is_fit_exactly() {
        let f = fit(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]).unwrap();
        assert!((f.slope - 2.0).abs() < 1e-9 && (f.r2 - 1.0).abs() < 1e-9);
        assert!(fit(&[(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)]).is_none());
        assert!(fit(&[(1.0, 1.0)]).is_none());
    }

    #[test]
    fn a_rising_floor_is_a_leak() {
        let e = service(60, 100e3, 12, |t| t * 102_400.0);
        let t = analyse(&e, MIN);
        assert_eq!(t.verdict, Verdict::LeakSuspected, "{}", t.reason);
        assert_eq!(t.older_collection_samples, 4);
        let slope = t.retained_growth.unwrap().slope;
        assert!((slope - 102_400.0).abs() < 1.0, "{slope}");
        assert!(t.seconds_to_heap_limit.unwrap() > 0.0);
    }

    #[test]
    fn garbage_promoted_and_then_freed_is_not_a_leak() {
        // The heap after nursery collections climbs 100 KB/s between older collections.
        let e = service(60, 100e3, 15, |_| 0.0);
        let t = analyse(&e, MIN);
        assert_eq!(t.verdict, Verdict::Stable, "{}", t.reason);
        assert!(t.survivor_growth.unwrap().slope.abs() < 100e3);
    }

    #[test]
    fn without_older_collections_there_is_no_leak_verdict() {
        let e = service(60, 100e3, 1000, |t| t * 102_400.0);
        let t = analyse(&e, MIN);
        assert_eq!(t.verdict, Verdict::Growing, "{}", t.reason);
        assert!(t.reason.contains("older generation"), "{}", t.reason);
    }

    #[test]
    fn a_cache_that_stopped_filling_is_not_a_leak() {
        let e = service(60, 50e3, 12, |t| t.min(25.0) * 400_000.0);
        let t = analyse(&e, MIN);
        assert_eq!(t.verdict, Verdict::Stable, "{}", t.reason);
        assert!(t.reason.contains("stopped"), "{}", t.reason);
    }

    #[test]
    fn no_verdict_across_a_gap_a_restart_or_from_a_few_samples() {
        let mut e = service(60, 0.0, 10, |t| t * 1e5);
        e.push(Entry::Gap { time: 61.0 });
        let t = analyse(&e, MIN);
        assert_eq!(t.verdict, Verdict::InsufficientData);
        assert_eq!(t.gaps, 1);

        let mut e = service(60, 0.0, 10, |t| t * 1e5);
        if let Entry::Sample(s) = &mut e[55] {
            s.pid = 8;
        }
        let t = analyse(&e, MIN);
        assert_eq!(t.verdict, Verdict::InsufficientData);
        assert!(t.reason.contains("restarted"), "{}", t.reason);

        let e = service(5, 0.0, 2, |_| 0.0);
        assert_eq!(analyse(&e, MIN).verdict, Verdict::InsufficientData);
    }
}
