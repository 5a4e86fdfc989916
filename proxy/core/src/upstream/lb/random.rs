//! Weighted random.

use std::sync::Arc;

use super::LoadBalancer;
use crate::upstream::Endpoint;

/// Picks an available endpoint at random, in proportion to its weight.
#[derive(Debug, Default)]
pub struct Random;

impl LoadBalancer for Random {
    fn pick(&mut self, endpoints: &[Arc<Endpoint>], now_ms: u64) -> Option<usize> {
        let total: u64 = endpoints
            .iter()
            .filter(|e| !e.is_ejected(now_ms))
            .map(|e| e.weight as u64)
            .sum();
        if total == 0 {
            return None;
        }
        let mut ticket = fastrand::u64(..total);
        for (i, ep) in endpoints.iter().enumerate() {
            if ep.is_ejected(now_ms) {
                continue;
            }
            let w = ep.weight as u64;
            if ticket < w {
                return Some(i);
            }
            ticket -= w;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::tests::{distribution, endpoints};

    #[test]
    fn picks_in_proportion_to_weight() {
        let eps = endpoints(&[1, 3]);
        let d = distribution(&mut Random, &eps, 20_000);
        let share = d[0] as f64 / 20_000.0;
        assert!((share - 0.25).abs() < 0.02, "{d:?}");
    }
}
