//! What do WASM filters cost per request?
//!
//! Each iteration is one stream through a chain, as the request path runs it for a GET: start
//! the stream, request headers, response headers, the response body in one piece (only when
//! the chain wants bodies, as the core asks it: a chain none of whose filters reads bodies
//! has the body streamed past it), finish (on_done, on_log, on_delete).
//!
//! - `filter_chain/baseline`: building the request and response heads only (subtract it);
//! - `filter_chain/noop_x1`, `noop_x4`: one and four no-op filters (upstream proxy-wasm SDK);
//! - `filter_chain/hostcalls_x100`: one filter reading a request header 100 times through
//!   `proxy_get_header_map_value`; (this − noop_x1) / 100 is one host call;
//! - `filter_chain/std_{telemetry,router,fault,retry}`: each standard filter alone, configured
//!   as the load benchmark's `weftstd` configures it;
//! - `filter_chain/std_chain`: the four of them as one chain, as `weftstd` runs it.
//!
//! The guests come from `tests/filters/` built for wasm32-wasip1 (`tests/run.sh` or
//! `benches/load/run.sh` build them), the standard filters from `filters/` (profile `filter`).

use std::hint::black_box;

mod common;

use criterion::{Criterion, criterion_group, criterion_main};
use weft_core::config::{FailurePolicy, FilterConfig, FilterLimits};
use weft_core::filter::{Direction, FilterChain, StreamInfo};

/// The response body of the benchmark stream (40 bytes).
static BODY: bytes::Bytes =
    bytes::Bytes::from_static(b"{\"items\":[1,2,3],\"page\":2,\"more\":false}\n");
use weft_core::metrics::Metrics;
use weft_wasm::{WasmChain, WasmRuntime};

/// `target/wasm32-wasip1/{profile}/{name}.wasm`, which must exist.
fn wasm(profile: &str, name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let target = exe.ancestors().nth(3).expect("target dir");
    let path = target.join(format!("wasm32-wasip1/{profile}/{name}.wasm"));
    assert!(
        path.exists(),
        "{} missing: build tests/filters (release) and filters/ (profile filter) for \
         wasm32-wasip1 first (tests/run.sh does)",
        path.display()
    );
    path
}

fn filter(name: String, module: std::path::PathBuf, config: serde_json::Value) -> FilterConfig {
    FilterConfig {
        name,
        module,
        root_id: String::new(),
        vm_id: String::new(),
        config,
        vm_config: serde_json::Value::Null,
        failure_policy: FailurePolicy::FailClosed,
        limits: FilterLimits::default(),
    }
}

fn chain(rt: &WasmRuntime, metrics: &Metrics, module: &str, n: usize) -> WasmChain {
    let filters: Vec<FilterConfig> = (0..n)
        .map(|i| {
            let path = wasm("release", module);
            filter(format!("{module}-{i}"), path, serde_json::Value::Null)
        })
        .collect();
    rt.build_chain("bench", &filters, &Default::default(), metrics)
        .expect("chain")
}

/// The standard filters as the load benchmark's `weftstd` configures them, in its order.
fn standard(which: &[&str]) -> Vec<FilterConfig> {
    let config = |name: &str| match name {
        "telemetry" => serde_json::json!({ "access_log": false }),
        "router" => serde_json::json!({ "routes": [
            { "name": "origin", "match": { "path": { "prefix": "/" } }, "cluster": "origin" } ] }),
        "fault" => serde_json::json!({ "default": {
            "delay": { "percent": 0, "ms": 100 }, "abort": { "percent": 0 } } }),
        "retry" => serde_json::json!({ "default": { "attempts": 2 } }),
        other => panic!("no standard filter {other}"),
    };
    which
        .iter()
        .map(|&name| {
            let path = wasm("filter", &format!("weft_filter_{name}"));
            filter(name.to_owned(), path, config(name))
        })
        .collect()
}

fn heads() -> (http::request::Parts, http::response::Parts) {
    let (req, ()) = http::Request::get("/api/v1/items?page=2")
        .header("host", "service2:8080")
        .header("user-agent", "bench/1.0")
        .header("accept", "application/json")
        .header("x-request-id", "6b1f7a2e-4c3d-4e5f-8a9b-0c1d2e3f4a5b")
        .header("x-forwarded-for", "10.1.2.3")
        .body(())
        .expect("request")
        .into_parts();
    let (resp, ()) = http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("content-length", "40")
        .body(())
        .expect("response")
        .into_parts();
    (req, resp)
}

/// A few streams through `chain` before it is measured: this worker's instances are made
/// and callbacks the filters do nothing in are known, as in a proxy that has run a while.
/// (Not named `one_stream*`: `chain/callgrind.sh` counts only inside `one_stream`.)
fn primed(chain: WasmChain, info: &StreamInfo) -> WasmChain {
    for _ in 0..3 {
        let (mut req, mut resp) = heads();
        let mut stream = chain.start_stream(info.clone());
        stream.on_request_headers(&mut req, true);
        stream.on_response_headers(&mut resp, false);
        stream.on_body(Direction::Response, BODY.clone(), true);
        stream.finish();
    }
    chain
}

fn one_stream(chain: &WasmChain, info: &StreamInfo) {
    let (mut req, mut resp) = heads();
    let mut stream = chain.start_stream(info.clone());
    black_box(stream.on_request_headers(&mut req, true));
    black_box(stream.on_response_headers(&mut resp, false));
    // A 40-byte body of known length cannot end with trailers.
    if stream.wants_body(Direction::Response, false) {
        black_box(stream.on_body(Direction::Response, BODY.clone(), true));
    }
    stream.finish();
}

fn filter_chain(c: &mut Criterion) {
    let cache = std::env::temp_dir().join("weft-bench-module-cache");
    let rt = WasmRuntime::new(Some(cache)).expect("runtime");
    let metrics = Metrics::new();
    let info = StreamInfo {
        source: "10.1.2.3:40000".parse().expect("addr"),
        destination: "127.0.0.1:15001".parse().expect("addr"),
        start_ns: 0,
        start_unix_ns: 0,
        connection_id: 1,
        upstream: None,
        cluster: None,
        clusters: Default::default(),
        direction: 0,
        attempt: Default::default(),
        tls: None,
    };
    let origin: weft_core::config::ClusterConfig =
        serde_json::from_value(serde_json::json!({ "name": "origin" })).expect("cluster");
    let clusters = std::sync::Arc::new(weft_core::upstream::Clusters::new(vec![
        std::sync::Arc::new(weft_core::upstream::Cluster::new(
            &origin,
            metrics.cluster("origin"),
        )),
    ]));
    let table = std::sync::Arc::new(weft_core::upstream::ClusterTable::from(clusters.clone()));
    let info = StreamInfo {
        cluster: Some(0),
        clusters,
        ..info
    };
    let std_chain = |which: &[&str]| {
        let chain = rt
            .build_chain("bench", &standard(which), &table, &metrics)
            .expect("standard chain");
        primed(chain, &info)
    };
    let noop1 = primed(chain(&rt, &metrics, "compat_noop", 1), &info);
    let noop4 = primed(chain(&rt, &metrics, "compat_noop", 4), &info);
    let calls = primed(chain(&rt, &metrics, "compat_hostcalls", 1), &info);

    let mut group = c.benchmark_group("filter_chain");
    group.bench_function("baseline", |b| b.iter(|| black_box(heads())));
    group.bench_function("noop_x1", |b| b.iter(|| one_stream(&noop1, &info)));
    group.bench_function("noop_x4", |b| b.iter(|| one_stream(&noop4, &info)));
    group.bench_function("hostcalls_x100", |b| b.iter(|| one_stream(&calls, &info)));
    for name in ["telemetry", "router", "fault", "retry"] {
        let alone = std_chain(&[name]);
        group.bench_function(format!("std_{name}"), |b| {
            b.iter(|| one_stream(&alone, &info))
        });
    }
    // The router alone with n routes, the request's the last: `/r{i}/` prefixes, then
    // `/api/v1/` (what a scan of every route would try last).
    for n in [10, 1_000, 10_000] {
        let routes: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                let prefix = if i + 1 == n { "/api/v1/".to_owned() } else { format!("/r{i}/") };
                serde_json::json!({ "match": { "path": { "prefix": prefix } }, "cluster": "origin" })
            })
            .collect();
        let router = filter(
            "router".to_owned(),
            wasm("filter", "weft_filter_router"),
            serde_json::json!({ "routes": routes }),
        );
        let chain = rt
            .build_chain("bench", &[router], &table, &metrics)
            .expect("router chain");
        let chain = primed(chain, &info);
        group.bench_function(format!("router_routes_{n}"), |b| {
            b.iter(|| one_stream(&chain, &info))
        });
    }
    let all = std_chain(&["telemetry", "router", "fault", "retry"]);
    group.bench_function("std_chain", |b| b.iter(|| one_stream(&all, &info)));
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::quick();
    targets = filter_chain
}
criterion_main!(benches);
