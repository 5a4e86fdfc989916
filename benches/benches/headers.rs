//! What does the proxy's own per-request header rewriting cost on a realistic request
//! (12 browser-like headers, two of them hop-by-hop, an existing `x-forwarded-for`)?
//!
//! - `headers/strip_hop_by_hop`, `headers/set_forwarded`,
//!   `headers/ensure_request_id/{kept,generated}`: each step alone;
//! - `headers/rewrite/{kept_id,new_id}`: the three steps in the order the proxy runs them,
//!   with an incoming `x-request-id` and with one to generate (11 headers then);
//! - `headers/build_only/{with_id,without_id}`: the baselines to subtract (`without_id` for
//!   `generated` and `new_id`, `with_id` for the rest).
//!
//! Each iteration builds the request's header map as hyper does ([`as_parsed`]), rewrites
//! it and drops it, like the proxy does once per request. Building outside the timed
//! section (`iter_batched`) would be cleaner on paper but measures something the proxy never
//! does: with a batch of maps alive at once, every map that must grow (adding
//! `x-forwarded-proto` to a full 12-header map) gets fresh pages from the allocator, which
//! costs ~1 µs instead of ~50 ns.

use std::hint::black_box;

mod common;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use weft_benches::fixtures::{as_parsed, request_headers};
use weft_core::http::headers::{ensure_request_id, set_forwarded, strip_hop_by_hop};

/// The downstream peer, formatted once per connection as the listener does.
static PEER: HeaderValue = HeaderValue::from_static("10.1.2.3");

/// Everything the proxy does to a request's headers before choosing an upstream.
fn rewrite(h: &mut HeaderMap) {
    strip_hop_by_hop(h, false);
    set_forwarded(h, &PEER, "http");
    ensure_request_id(h);
}

fn headers(c: &mut Criterion) {
    let with_id = request_headers(true);
    let without_id = request_headers(false);
    let mut group = c.benchmark_group("headers");
    let mut bench = |name: &str, template: &HeaderMap, f: fn(&mut HeaderMap)| {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut h = as_parsed(black_box(template));
                f(&mut h);
                h
            });
        });
    };
    bench("build_only/with_id", &with_id, |_| {});
    bench("build_only/without_id", &without_id, |_| {});
    bench("strip_hop_by_hop", &with_id, |h| strip_hop_by_hop(h, false));
    bench("set_forwarded", &with_id, |h| {
        set_forwarded(h, &PEER, "http")
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

criterion_group! {
    name = benches;
    config = common::quick();
    targets = headers
}
criterion_main!(benches);
