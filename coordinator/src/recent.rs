//! The last few minutes of the commits this replica led, for its operator page: ten-second
//! buckets of outcomes and a coarse latency histogram, so that the page shows throughput and
//! percentiles on its own, without a Prometheus server to ask.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const BUCKET_SECS: u64 = 10;
/// Five minutes of buckets.
const KEEP: usize = 30;
/// Upper bounds of the latency classes, in ms; a last class holds everything slower.
const BOUNDS_MS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
];

#[derive(Debug, Clone, Default)]
struct Bucket {
    start_s: u64,
    committed: u64,
    aborted: u64,
    failed: u64,
    latency: [u64; BOUNDS_MS.len() + 1],
}

/// One ten-second bucket as the page shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Unix time, seconds, at the bucket's start.
    pub start_s: u64,
    pub committed: u64,
    pub aborted: u64,
    /// Commit calls that ended without an outcome (unknown to the caller).
    pub failed: u64,
    /// Upper bounds of the classes holding the median and the 99th percentile, in ms.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Default)]
pub struct Recent {
    buckets: Mutex<VecDeque<Bucket>>,
}

#[derive(Debug, Clone, Copy)]
pub enum Ended {
    Committed,
    Aborted,
    Failed,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Recent {
    pub fn record(&self, ended: Ended, latency: Duration) {
        self.record_at(now_s(), ended, latency);
    }

    fn record_at(&self, now_s: u64, ended: Ended, latency: Duration) {
        let start_s = now_s - now_s % BUCKET_SECS;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.back().is_none_or(|b| b.start_s != start_s) {
            buckets.push_back(Bucket {
                start_s,
                ..Bucket::default()
            });
            while buckets.len() > KEEP {
                buckets.pop_front();
            }
        }
        let Some(b) = buckets.back_mut() else { return };
        match ended {
            Ended::Committed => b.committed += 1,
            Ended::Aborted => b.aborted += 1,
            Ended::Failed => b.failed += 1,
        }
        let ms = latency.as_secs_f64() * 1000.0;
        let class = BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(BOUNDS_MS.len());
        b.latency[class] += 1;
    }

    /// The buckets of the last five minutes that saw any commit, oldest first.
    pub fn rows(&self) -> Vec<Row> {
        self.rows_at(now_s())
    }

    fn rows_at(&self, now_s: u64) -> Vec<Row> {
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .iter()
            .filter(|b| b.start_s + BUCKET_SECS * KEEP as u64 > now_s)
            .map(|b| Row {
                start_s: b.start_s,
                committed: b.committed,
                aborted: b.aborted,
                failed: b.failed,
                p50_ms: quantile(&b.latency, 0.5),
                p99_ms: quantile(&b.latency, 0.99),
            })
            .collect()
    }
}

fn quantile(classes: &[u64], q: f64) -> Option<f64> {
    let total: u64 = classes.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in classes.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(BOUNDS_MS.get(i).copied().unwrap_or(f64::INFINITY));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_outcomes_and_bound_latencies() {
        let r = Recent::default();
        for _ in 0..98 {
            r.record_at(1_000_003, Ended::Committed, Duration::from_millis(3));
        }
        r.record_at(1_000_004, Ended::Aborted, Duration::from_millis(40));
        r.record_at(1_000_009, Ended::Failed, Duration::from_secs(11));
        r.record_at(1_000_012, Ended::Committed, Duration::from_micros(500));
        let rows = r.rows_at(1_000_015);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (
                rows[0].start_s,
                rows[0].committed,
                rows[0].aborted,
                rows[0].failed
            ),
            (1_000_000, 98, 1, 1)
        );
        assert_eq!(rows[0].p50_ms, Some(5.0));
        assert_eq!(rows[0].p99_ms, Some(50.0));
        assert_eq!(rows[1].p99_ms, Some(1.0));
    }

    #[test]
    fn only_five_minutes_are_kept() {
        let r = Recent::default();
        for i in 0..100u64 {
            r.record_at(
                2_000_000 + i * BUCKET_SECS,
                Ended::Committed,
                Duration::ZERO,
            );
        }
        let now = 2_000_000 + 99 * BUCKET_SECS;
        let rows = r.rows_at(now);
        assert_eq!(rows.len(), KEEP);
        assert_eq!(
            rows.first().map(|r| r.start_s),
            Some(now - 29 * BUCKET_SECS)
        );
        // Nothing for a while: old buckets drop out of the page, not just off the end.
        assert!(r.rows_at(now + 10 * 60).is_empty());
    }
}
