//! What the benchmarks share: sequential timing with a warm-up, and latency percentiles.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

/// ITERATIONS from the environment, else `default`.
pub fn iterations(default: usize) -> usize {
    std::env::var("ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// Time `iterations` sequential calls of `f`, after a tenth as many unmeasured ones.
pub async fn sequential<F, Fut>(iterations: usize, mut f: F) -> Latencies
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..iterations / 10 {
        f().await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        f().await;
        samples.push(start.elapsed());
    }
    Latencies::new(samples)
}

/// Sorted call latencies.
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        Latencies(samples)
    }

    /// The `p` quantile, microseconds.
    pub fn micros(&self, p: f64) -> f64 {
        let i = ((self.0.len() as f64 * p) as usize).min(self.0.len() - 1);
        self.0[i].as_secs_f64() * 1e6
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Calls per second when made one after another.
    pub fn rate(&self) -> f64 {
        self.0.len() as f64 / self.0.iter().sum::<Duration>().as_secs_f64()
    }
}
