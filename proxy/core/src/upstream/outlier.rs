//! Passive outlier detection: endpoints that keep failing (5xx, connect failures, resets,
//! timeouts) are ejected for growing periods, within the cluster's ejection cap.

use std::sync::atomic::Ordering::Relaxed;

use super::{Cluster, Endpoint};
use crate::clock;

impl Cluster {
    /// Records a success for outlier detection.
    #[inline]
    pub fn record_success(&self, ep: &Endpoint) {
        if ep.consecutive_failures.load(Relaxed) != 0 {
            ep.consecutive_failures.store(0, Relaxed);
        }
    }

    /// Records a failure (5xx, connect failure, reset, timeout); ejects the endpoint when it
    /// reaches `outlier.consecutive_failures` and the ejection cap allows it.
    pub fn record_failure(&self, ep: &Endpoint) {
        let threshold = self.outlier.consecutive_failures;
        if threshold == 0 {
            return;
        }
        let failures = ep.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if failures < threshold {
            return;
        }
        let now = clock::now_ms();
        if ep.is_ejected(now) {
            return;
        }
        let max_ejected =
            ((self.endpoints().list.len() * self.outlier.max_ejection_percent as usize) / 100)
                .max(1);
        if self.ejected_count(now) >= max_ejected {
            return;
        }
        // A long healthy stretch since the last ejection resets the streak.
        let last_until = ep.ejected_until_ms.load(Relaxed);
        let mut streak = ep.ejection_streak.load(Relaxed);
        if last_until != 0 && now.saturating_sub(last_until) > self.outlier.max_ejection_ms {
            streak = 0;
        }
        streak = streak.saturating_add(1);
        let duration = self
            .outlier
            .base_ejection_ms
            .saturating_mul(streak as u64)
            .min(
                self.outlier
                    .max_ejection_ms
                    .max(self.outlier.base_ejection_ms),
            );
        ep.ejection_streak.store(streak, Relaxed);
        ep.ejected_until_ms.store(now + duration, Relaxed);
        ep.consecutive_failures.store(0, Relaxed);
        ep.ejections_total.fetch_add(1, Relaxed);
        self.metrics.ejections_total.inc();
        tracing::warn!(
            cluster = %self.name,
            endpoint = %ep.address,
            duration_ms = duration,
            "endpoint ejected after {failures} consecutive failures"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterConfig;
    use crate::metrics::ClusterMetrics;

    fn cluster(n: usize, threshold: u32, percent: u32) -> Cluster {
        let yaml = format!(
            "name: c\nendpoints: [{}]\noutlier: {{ consecutive_failures: {threshold}, base_ejection_ms: 1000, max_ejection_ms: 2500, max_ejection_percent: {percent} }}",
            (0..n)
                .map(|i| format!("{{ address: \"127.0.0.1:{}\" }}", 9000 + i))
                .collect::<Vec<_>>()
                .join(",")
        );
        let cfg: ClusterConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        Cluster::new(0, &cfg, ClusterMetrics::detached())
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets_the_count() {
        let c = cluster(4, 3, 50);
        let eps = c.endpoints();
        let ep = &eps.list[0];
        c.record_failure(ep);
        c.record_failure(ep);
        c.record_success(ep);
        c.record_failure(ep);
        c.record_failure(ep);
        assert!(!ep.is_ejected(clock::now_ms()), "a success resets the run");
        c.record_failure(ep);
        assert!(ep.is_ejected(clock::now_ms()));
        assert_eq!(c.ejected_count(clock::now_ms()), 1);
        // Ejection ends after base_ejection_ms.
        assert!(!ep.is_ejected(clock::now_ms() + 1001));
    }

    #[test]
    fn ejection_percent_caps_ejections_but_one_is_always_allowed() {
        let c = cluster(4, 1, 50);
        for ep in &c.endpoints().list {
            c.record_failure(ep);
        }
        assert_eq!(c.ejected_count(clock::now_ms()), 2, "50% of 4");

        let c = cluster(2, 1, 10);
        for ep in &c.endpoints().list {
            c.record_failure(ep);
        }
        assert_eq!(
            c.ejected_count(clock::now_ms()),
            1,
            "10% of 2 still ejects one"
        );
    }

    #[test]
    fn repeated_ejections_last_longer_up_to_the_cap() {
        let c = cluster(1, 1, 100);
        let eps = c.endpoints();
        let ep = &eps.list[0];
        let mut lengths = Vec::new();
        for _ in 0..4 {
            let now = clock::now_ms();
            c.record_failure(ep);
            let until = ep.ejected_until_ms.load(Relaxed);
            lengths.push(until - now);
            // Pretend the ejection ended.
            ep.ejected_until_ms.store(now, Relaxed);
        }
        let approx: Vec<u64> = lengths.iter().map(|l| (l + 50) / 100 * 100).collect();
        assert_eq!(approx, vec![1000, 2000, 2500, 2500]);
    }
}
