//! How long does the core load balancer take to pick one endpoint, per policy, for a small
//! (3) and a large (32) cluster? Group `lb_pick/{policy}/{endpoints}`.
//!
//! One balancer per (policy, size), as a worker owns one per cluster; no endpoint is
//! ejected, no request is in flight and no latency has been observed, so the figures are
//! the cost of the selection itself.

use std::hint::black_box;

mod common;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use weft_benches::fixtures::endpoints;
use weft_core::clock;
use weft_core::config::LbPolicy;
use weft_core::upstream::lb::new_balancer;

/// Every policy, with the name used in the benchmark id.
const POLICIES: [(&str, LbPolicy); 5] = [
    ("round_robin", LbPolicy::RoundRobin),
    ("weighted", LbPolicy::Weighted),
    ("least_request", LbPolicy::LeastRequest),
    ("peak_ewma", LbPolicy::PeakEwma),
    ("random", LbPolicy::Random),
];

fn lb_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("lb_pick");
    for (name, policy) in POLICIES {
        for n in [3usize, 32] {
            let eps = endpoints(n);
            let mut lb = new_balancer(policy, &eps);
            let now_ms = clock::now_ms();
            group.bench_with_input(BenchmarkId::new(name, n), &eps, |b, eps| {
                b.iter(|| lb.pick(black_box(eps), black_box(now_ms)));
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::quick();
    targets = lb_pick
}
criterion_main!(benches);
