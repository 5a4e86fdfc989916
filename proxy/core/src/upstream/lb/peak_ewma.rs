//! Peak-EWMA: linkerd's latency-aware balancer.

use std::sync::Arc;

use super::{LoadBalancer, two_choices};
use crate::clock;
use crate::upstream::Endpoint;

/// Draws two random endpoints and picks the one with the lower cost, where cost is a
/// peak-sensitive moving average of response latency times (active requests + 1), per unit
/// of weight. A latency spike counts at once; recovery is averaged in over ~10 s.
#[derive(Debug, Default)]
pub struct PeakEwma;

impl LoadBalancer for PeakEwma {
    fn pick(&mut self, endpoints: &[Arc<Endpoint>], now_ms: u64) -> Option<usize> {
        let (a, b) = two_choices(endpoints, now_ms)?;
        if a == b {
            return Some(a);
        }
        let now = clock::now_ns();
        Some(
            if endpoints[b].ewma_cost(now) < endpoints[a].ewma_cost(now) {
                b
            } else {
                a
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::tests::{distribution, endpoints};

    #[test]
    fn a_slow_endpoint_gets_little_traffic() {
        let eps = endpoints(&[1, 1, 1]);
        let now = clock::now_ns();
        eps[0].observe_latency(now, 200_000_000);
        eps[1].observe_latency(now, 1_000_000);
        eps[2].observe_latency(now, 1_000_000);
        let mut lb = PeakEwma;
        let d = distribution(&mut lb, &eps, 3000);
        // Endpoint 0 only wins when drawn twice, which two_choices never does.
        assert_eq!(d[0], 0, "{d:?}");
        assert!(d[1] > 1200 && d[2] > 1200, "{d:?}");
    }
}
