//! A fixed-bucket latency histogram with atomic counters, cheap enough to update on every
//! agent call and tool call; exported as Prometheus histograms.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, seconds: 50 µs .. 10 s, enough for agent round trips and tool calls.
pub const LATENCY_BOUNDS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket, not cumulative; the last counts values above the last bound.
    counts: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A consistent-enough copy for exposition: cumulative counts per bound, total, sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub cumulative: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn read(&self) -> Reading {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(LATENCY_BOUNDS.len());
        for (bound, count) in LATENCY_BOUNDS.iter().zip(&self.counts) {
            total += count.load(Ordering::Relaxed);
            cumulative.push((*bound, total));
        }
        total += self.counts[LATENCY_BOUNDS.len()].load(Ordering::Relaxed);
        Reading {
            cumulative,
            count: total,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_with_an_overflow() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_secs(20));
        let r = h.read();
        assert_eq!(r.count, 3);
        assert_eq!(r.cumulative[0], (0.00005, 1));
        assert_eq!(r.cumulative[3], (0.0005, 2));
        assert_eq!(r.cumulative.last(), Some(&(10.0, 2)));
        assert!((r.sum_seconds - 20.00034).abs() < 1e-9);
    }
}
