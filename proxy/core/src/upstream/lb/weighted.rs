//! Smooth weighted round robin (nginx's algorithm).
//!
//! Every pick adds each available endpoint's weight to its credit, picks the endpoint with
//! the most credit and takes the total weight off it. Over any window of `sum(weights)` picks
//! the proportions are exact, and heavy endpoints are interleaved rather than bunched.

use std::sync::Arc;

use super::LoadBalancer;
use crate::upstream::Endpoint;

/// Smooth weighted round robin.
#[derive(Debug)]
pub struct SmoothWeighted {
    credit: Vec<i64>,
}

impl SmoothWeighted {
    /// A balancer with no credit yet.
    pub fn new(endpoints: &[Arc<Endpoint>]) -> Self {
        Self {
            credit: vec![0; endpoints.len()],
        }
    }
}

impl LoadBalancer for SmoothWeighted {
    fn pick(&mut self, endpoints: &[Arc<Endpoint>], now_ms: u64) -> Option<usize> {
        if self.credit.len() != endpoints.len() {
            self.credit = vec![0; endpoints.len()];
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, ep) in endpoints.iter().enumerate() {
            if ep.is_ejected(now_ms) {
                continue;
            }
            let w = ep.weight as i64;
            self.credit[i] += w;
            total += w;
            if best.is_none_or(|b| self.credit[i] > self.credit[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.credit[b] -= total;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::tests::{distribution, endpoints};

    #[test]
    fn proportions_are_exact_over_a_cycle() {
        let eps = endpoints(&[1, 3]);
        let mut lb = SmoothWeighted::new(&eps);
        assert_eq!(distribution(&mut lb, &eps, 2000), vec![500, 1500]);
        let eps = endpoints(&[5, 1, 1]);
        let mut lb = SmoothWeighted::new(&eps);
        assert_eq!(distribution(&mut lb, &eps, 700), vec![500, 100, 100]);
    }

    #[test]
    fn heavy_endpoints_are_interleaved_not_bunched() {
        let eps = endpoints(&[5, 1, 1]);
        let mut lb = SmoothWeighted::new(&eps);
        let seq: Vec<usize> = (0..7).map(|_| lb.pick(&eps, 1).unwrap()).collect();
        // nginx's documented sequence for weights 5,1,1: a a b a c a a.
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }
}
