//! Plain round robin: endpoints in turn, weights ignored.

use std::sync::Arc;

use super::LoadBalancer;
use crate::upstream::Endpoint;

/// Endpoints in turn. Weights are ignored; use [`super::SmoothWeighted`] to honour them.
#[derive(Debug)]
pub struct RoundRobin {
    next: usize,
}

impl RoundRobin {
    /// Starts at a random position so that workers do not move in lockstep.
    pub fn new(len: usize) -> Self {
        Self {
            next: if len == 0 { 0 } else { fastrand::usize(..len) },
        }
    }
}

impl LoadBalancer for RoundRobin {
    fn pick(&mut self, endpoints: &[Arc<Endpoint>], now_ms: u64) -> Option<usize> {
        let n = endpoints.len();
        for _ in 0..n {
            let i = self.next % n;
            self.next = i + 1;
            if !endpoints[i].is_ejected(now_ms) {
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::tests::{distribution, endpoints};

    #[test]
    fn visits_every_endpoint_equally_whatever_the_weights() {
        let eps = endpoints(&[1, 5, 1]);
        let mut lb = RoundRobin::new(eps.len());
        assert_eq!(distribution(&mut lb, &eps, 300), vec![100, 100, 100]);
    }
}
