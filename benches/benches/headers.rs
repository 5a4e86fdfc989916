//! What does the proxy's own per-request header rewriting cost on a realistic request
//! (11 browser-like headers, two of them hop-by-hop, an existing `x-forwarded-for`)?
//!
//! - `headers/strip_hop_by_hop`, `headers/set_forwarded`,
//!   `headers/ensure_request_id/{kept,generated}`: each step alone;
//! - `headers/rewrite/{kept_id,new_id}`: the three steps in the order the proxy runs them,
//!   with an incoming `x-request-id` and with one to generate.
//!
//! Each iteration starts from a fresh copy of the request's header map; the copy is made
//! outside the timed section.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use weft_benches::fixtures::request_headers;
use weft_proxy::headers::{ensure_request_id, set_forwarded, strip_hop_by_hop};

/// The downstream peer, as the listener sees it.
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));

/// Everything the proxy does to a request's headers before choosing an upstream.
fn rewrite(h: &mut HeaderMap) {
    strip_hop_by_hop(h, false);
    set_forwarded(h, PEER, "http");
    ensure_request_id(h);
}

fn headers(c: &mut Criterion) {
    let with_id = request_headers(true);
    let without_id = request_headers(false);
    let mut group = c.benchmark_group("headers");
    let mut bench = |name: &str, template: &HeaderMap, f: fn(&mut HeaderMap)| {
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || template.clone(),
                |h| {
                    f(black_box(h));
                },
                BatchSize::SmallInput,
            );
        });
    };
    bench("strip_hop_by_hop", &with_id, |h| strip_hop_by_hop(h, false));
    bench("set_forwarded", &with_id, |h| {
        set_forwarded(h, PEER, "http")
    });
    bench("ensure_request_id/kept", &with_id, |h| {
        black_box(ensure_request_id(h));
    });
    bench("ensure_request_id/generated", &without_id, |h| {
        black_box(ensure_request_id(h));
    });
    bench("rewrite/kept_id", &with_id, rewrite);
    bench("rewrite/new_id", &without_id, rewrite);
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = headers
}
criterion_main!(benches);
