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
        let n = self.endpoints().list.len();
        let mut max_ejected = ((n * self.outlier.max_ejection_percent as usize) / 100).max(1);
        if !self.outlier.eject_last_healthy {
            // Ejecting the last healthy endpoint would leave nothing to send to.
            max_ejected = max_ejected.min(n.saturating_sub(1));
        }
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
        self.update_panic(now);
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
        cluster_with(n, threshold, percent, "")
    }

    fn cluster_with(n: usize, threshold: u32, percent: u32, extra: &str) -> Cluster {
        let yaml = format!(
            "name: c\nendpoints: [{}]\noutlier: {{ consecutive_failures: {threshold}, base_ejection_ms: 1000, max_ejection_ms: 2500, max_ejection_percent: {percent}{extra} }}",
            (0..n)
                .map(|i| format!("{{ address: \"127.0.0.1:{}\" }}", 9000 + i))
                .collect::<Vec<_>>()
                .join(",")
        );
        let cfg: ClusterConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        Cluster::new(&cfg, ClusterMetrics::detached())
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
        let c = cluster(2, 1, 100);
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

    #[test]
    fn the_last_healthy_endpoint_is_not_ejected_unless_allowed() {
        let c = cluster(1, 1, 100);
        c.record_failure(&c.endpoints().list[0]);
        assert_eq!(
            c.ejected_count(clock::now_ms()),
            0,
            "one endpoint: nowhere else to go"
        );
        let c = cluster(3, 1, 100);
        for ep in &c.endpoints().list {
            c.record_failure(ep);
        }
        assert_eq!(c.ejected_count(clock::now_ms()), 2, "the third stays");
        let c = cluster_with(1, 1, 100, ", eject_last_healthy: true");
        c.record_failure(&c.endpoints().list[0]);
        assert_eq!(c.ejected_count(clock::now_ms()), 1);
    }

    #[test]
    fn too_few_healthy_endpoints_put_the_cluster_in_panic_until_an_ejection_ends() {
        let c = cluster(4, 1, 100);
        let eps = c.endpoints();
        let now = clock::now_ms();
        c.record_failure(&eps.list[0]);
        c.record_failure(&eps.list[1]);
        assert!(
            !c.in_panic(now),
            "2 of 4 healthy: 50% is not below the threshold"
        );
        c.record_failure(&eps.list[2]);
        assert!(c.in_panic(now), "1 of 4 healthy");
        // Once the ejection that tipped it ends, the cluster looks again and leaves panic.
        let first_end = eps.list[0].ejected_until_ms.load(Relaxed);
        assert!(!c.in_panic(first_end.max(now) + 1));
        let c = cluster_with(4, 1, 100, ", panic_threshold_percent: 0");
        for ep in &c.endpoints().list[..3] {
            c.record_failure(ep);
        }
        assert!(!c.in_panic(clock::now_ms()), "threshold 0: never");
    }
}
