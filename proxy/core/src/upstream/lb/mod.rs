//! Load balancing: one small trait, one file per policy.
//!
//! Each worker owns one balancer per cluster, so a balancer's own state (a round-robin
//! position, smooth-weighted-round-robin credits) needs no synchronisation. What all workers
//! must agree on (active requests, latency estimates, ejections) lives in the shared
//! [`Endpoint`]s and is read with relaxed atomics.

mod least_request;
mod peak_ewma;
mod random;
mod round_robin;
mod weighted;

use std::sync::Arc;

pub use least_request::LeastRequest;
pub use peak_ewma::PeakEwma;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

use crate::config::LbPolicy;
use crate::upstream::Endpoint;

/// Picks an endpoint for each request.
pub trait LoadBalancer: Send {
    /// Returns the index of the chosen endpoint among `endpoints`, skipping those ejected at
    /// `now_ms`; `None` when every endpoint is ejected (or there are none).
    fn pick(&mut self, endpoints: &[Arc<Endpoint>], now_ms: u64) -> Option<usize>;
}

/// A new balancer for `policy` over `endpoints`.
pub fn new_balancer(policy: LbPolicy, endpoints: &[Arc<Endpoint>]) -> Box<dyn LoadBalancer> {
    match policy {
        LbPolicy::RoundRobin => Box::new(RoundRobin::new(endpoints.len())),
        LbPolicy::Weighted => Box::new(SmoothWeighted::new(endpoints)),
        LbPolicy::LeastRequest => Box::new(LeastRequest),
        LbPolicy::PeakEwma => Box::new(PeakEwma),
        LbPolicy::Random => Box::new(Random),
    }
}

/// Two distinct random available endpoints (power of two choices), or one if only one is
/// available. Tries a few random draws before falling back to a scan, so the common case
/// costs two random numbers.
pub(crate) fn two_choices(endpoints: &[Arc<Endpoint>], now_ms: u64) -> Option<(usize, usize)> {
    let n = endpoints.len();
    match n {
        0 => return None,
        1 => return (!endpoints[0].is_ejected(now_ms)).then_some((0, 0)),
        _ => {}
    }
    let available = |i: usize| !endpoints[i].is_ejected(now_ms);
    for _ in 0..4 {
        let a = fastrand::usize(..n);
        let mut b = fastrand::usize(..n - 1);
        if b >= a {
            b += 1;
        }
        match (available(a), available(b)) {
            (true, true) => return Some((a, b)),
            (true, false) => return Some((a, a)),
            (false, true) => return Some((b, b)),
            (false, false) => continue,
        }
    }
    let first = (0..n).find(|&i| available(i))?;
    Some((first, first))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::upstream::EndpointAddress;

    /// Endpoints with the given weights on made-up addresses.
    pub fn endpoints(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let addr = EndpointAddress::parse(&format!("127.0.0.1:{}", 10_000 + i)).unwrap();
                Arc::new(Endpoint::new(addr, *w))
            })
            .collect()
    }

    /// How many of `n` picks each endpoint got.
    pub fn distribution(lb: &mut dyn LoadBalancer, eps: &[Arc<Endpoint>], n: usize) -> Vec<usize> {
        let mut counts = vec![0; eps.len()];
        for _ in 0..n {
            counts[lb.pick(eps, 1).expect("an endpoint")] += 1;
        }
        counts
    }

    #[test]
    fn every_policy_skips_ejected_endpoints_and_reports_none_when_all_are() {
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Weighted,
            LbPolicy::LeastRequest,
            LbPolicy::PeakEwma,
            LbPolicy::Random,
        ] {
            let eps = endpoints(&[1, 1, 1]);
            let cluster_eject = |i: usize| eps[i].test_eject_until(u64::MAX);
            cluster_eject(1);
            let mut lb = new_balancer(policy, &eps);
            for _ in 0..300 {
                assert_ne!(
                    lb.pick(&eps, 1),
                    Some(1),
                    "{policy:?} picked an ejected endpoint"
                );
            }
            cluster_eject(0);
            cluster_eject(2);
            assert_eq!(lb.pick(&eps, 1), None, "{policy:?}");
            assert_eq!(new_balancer(policy, &[]).pick(&[], 1), None, "{policy:?}");
        }
    }
}
