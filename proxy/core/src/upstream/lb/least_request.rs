//! Least request with power of two choices.

use std::sync::Arc;

use super::{LoadBalancer, two_choices};
use crate::upstream::Endpoint;

/// Draws two random endpoints and picks the one with fewer active requests per unit of
/// weight (ties go to the first draw). Active requests are counted across all workers.
#[derive(Debug, Default)]
pub struct LeastRequest;

impl LoadBalancer for LeastRequest {
    fn pick(&mut self, endpoints: &[Arc<Endpoint>], now_ms: u64) -> Option<usize> {
        let (a, b) = two_choices(endpoints, now_ms)?;
        let (ea, eb) = (&endpoints[a], &endpoints[b]);
        // b is lighter when b.active / b.weight < a.active / a.weight, compared without division.
        let b_lighter = u64::from(eb.active_requests()) * u64::from(ea.weight)
            < u64::from(ea.active_requests()) * u64::from(eb.weight);
        Some(if b_lighter { b } else { a })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Endpoint;
    use crate::upstream::lb::tests::endpoints;

    fn load(ep: &Endpoint, n: u32) {
        for _ in 0..n {
            ep.test_begin_request();
        }
    }

    #[test]
    fn prefers_the_less_loaded_endpoint() {
        let eps = endpoints(&[1, 1]);
        load(&eps[0], 10);
        let mut lb = LeastRequest;
        for _ in 0..100 {
            assert_eq!(lb.pick(&eps, 1), Some(1));
        }
    }

    #[test]
    fn the_most_loaded_of_many_is_never_chosen() {
        // With two choices the busiest endpoint loses every comparison it is in.
        let eps = endpoints(&[1, 1, 1, 1]);
        load(&eps[2], 5);
        let mut lb = LeastRequest;
        for _ in 0..500 {
            assert_ne!(lb.pick(&eps, 1), Some(2));
        }
    }

    #[test]
    fn weight_scales_the_load() {
        // 5 active on weight 4 (1.25 per unit) is busier than 1 on weight 1 (1.0).
        let eps = endpoints(&[4, 1]);
        load(&eps[0], 5);
        load(&eps[1], 1);
        let mut lb = LeastRequest;
        for _ in 0..100 {
            assert_eq!(lb.pick(&eps, 1), Some(1));
        }
        let eps = endpoints(&[4, 1]);
        load(&eps[0], 3);
        load(&eps[1], 1);
        for _ in 0..100 {
            assert_eq!(lb.pick(&eps, 1), Some(0), "3/4 < 1/1");
        }
    }
}
