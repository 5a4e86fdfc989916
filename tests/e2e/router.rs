//! The standard router filter (filters/router, built on weft-sdk) in the real proxy: routing
//! by matcher, weighted splits, rewrites, direct responses.

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use weft_tests::*;

/// The router with `routes` (YAML flow mappings) in front of clusters `v1` and `v2`.
fn router_config(v1: &Upstream, v2: &Upstream, routes: &[&str]) -> String {
    let config = format!("{{ routes: [ {} ] }}", routes.join(", "));
    crate::chain(
        "v1",
        &[crate::filter(
            "router",
            &standard_filter("weft_filter_router"),
            &config,
        )],
        &[
            crate::cluster("v1", &[v1.address()], ""),
            crate::cluster("v2", &[v2.address()], ""),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_clusters_rewrite_and_answer_directly() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let routes = [
        r#"{ match: { path: { exact: "/health" } }, direct_response: { status: 200, body: "fine" } }"#,
        r#"{ match: { headers: [ { name: x-canary, exact: "1" } ] }, cluster: v2 }"#,
        r#"{ match: { host: admin.svc }, cluster: v2 }"#,
        r#"{ match: { path: { prefix: "/v2/" } }, cluster: v2, rewrite: { prefix: "/" } }"#,
        r#"{ match: { path: { regex: "/items/[0-9]+" }, method: GET }, cluster: v1 }"#,
    ];
    let proxy = ProxyProcess::start(&router_config(&v1, &v2, &routes)).await;
    let client = h1_client();

    let got = get(&client, &proxy.url("/health")).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (200, "fine"));
    let req = Request::get(proxy.url("/items/7"))
        .header("x-canary", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&client, req).await.unwrap().header("x-upstream"), "v2");
    let req = Request::get(proxy.url("/items/5"))
        .header("host", "admin.svc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        send(&client, req).await.unwrap().header("x-upstream"),
        "v2",
        "by host"
    );
    let got = get(&client, &proxy.url("/v2/orders?id=3")).await.unwrap();
    assert_eq!(got.header("x-upstream"), "v2");
    assert_eq!(got.echo()["uri"], "/orders?id=3", "prefix rewritten");
    let got = get(&client, &proxy.url("/items/42")).await.unwrap();
    assert_eq!(got.header("x-upstream"), "v1");
    let got = get(&client, &proxy.url("/items/abc")).await.unwrap();
    assert_eq!(got.status, 404, "no route");
    assert_eq!(got.body, "no route\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_is_honoured_within_two_percent_over_10000_requests() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let routes = ["{ split: [ { cluster: v1, weight: 90 }, { cluster: v2, weight: 10 } ] }"];
    let proxy = Arc::new(ProxyProcess::start(&router_config(&v1, &v2, &routes)).await);
    let client = h2_client();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, proxy) = (client.clone(), proxy.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..500 {
                let got = get(&client, &proxy.url("/")).await.expect("response");
                assert_eq!(got.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (a, b) = (v1.hits(), v2.hits());
    assert_eq!(a + b, 10_000);
    assert!((800..=1200).contains(&b), "v2 got {b} of 10000 (10% ± 2%)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_value_that_is_not_utf8_is_routed_not_a_filter_failure() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let routes = [
        r#"{ match: { headers: [ { name: x-canary, exact: "1" } ] }, cluster: v2 }"#,
        r#"{ cluster: v1 }"#,
    ];
    let proxy = ProxyProcess::start(&router_config(&v1, &v2, &routes)).await;
    // obs-text bytes are valid HTTP but not UTF-8; the upstream SDK's header getter panics
    // on them, weft-sdk reads them lossily.
    let mut req = b"GET /x HTTP/1.1\r\nhost: svc\r\nconnection: close\r\nx-canary: ".to_vec();
    req.extend_from_slice(&[0xff, 0xfe]);
    req.extend_from_slice(b"\r\n\r\n");
    let raw = raw_request(proxy.addr, &req).await.unwrap();
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert!(raw.contains("x-upstream: v1"), "{raw}");
    assert!(!proxy.log().contains("filter failed"), "{}", proxy.log());
}
