//! The standard chain — telemetry, router, fault, retry (filters/, built on weft-sdk) — in
//! the real proxy: labelled metrics in `/stats/prometheus`, JSON access logs, trace context
//! propagated upstream.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use weft_tests::*;

/// The standard chain in front of clusters `catalog` (`up`) and `broken` (a dead port).
fn standard_chain(up: &Upstream, broken: &str) -> String {
    let routes = "{ routes: [ \
        { name: items, match: { path: { prefix: /items } }, cluster: catalog }, \
        { name: broken, match: { path: { prefix: /broken } }, cluster: broken } ] }";
    let retry = "{ default: { attempts: 2, backoff: { base_ms: 1, max_ms: 2 } } }";
    let f = |name: &str, config: &str| {
        crate::filter(
            name,
            &standard_filter(&format!("weft_filter_{name}")),
            config,
        )
    };
    crate::chain(
        "catalog",
        &[
            f("telemetry", ""),
            f("router", routes),
            f("fault", "{ headers: true }"),
            f("retry", retry),
        ],
        &[
            crate::cluster("catalog", &[up.address()], ""),
            crate::cluster("broken", &[broken.to_owned()], "connect_timeout_ms: 300"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_chain_counts_logs_and_traces_requests() {
    let up = Upstream::start("catalog").await;
    let broken = format!("127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::start(&standard_chain(&up, &broken)).await;
    let client = h1_client();

    // A continued trace: same trace id upstream, a new span for the hop.
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = Request::get(proxy.url("/items/1"))
        .header("traceparent", parent)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&client, req).await.unwrap();
    assert_eq!(got.status, 200);
    let echo = got.echo();
    let upstream_tp = echo["headers"]["traceparent"][0].as_str().unwrap();
    assert!(
        upstream_tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{upstream_tp}"
    );
    assert!(
        !upstream_tp.contains("00f067aa0ba902b7"),
        "new span id: {upstream_tp}"
    );
    // No trace in: one is started.
    let got = get(&client, &proxy.url("/items/2")).await.unwrap();
    assert_eq!(
        got.echo()["headers"]["traceparent"][0]
            .as_str()
            .unwrap()
            .len(),
        55
    );

    // A fault by header, a route to a dead cluster (retried once, then 503), and no route.
    let req = Request::get(proxy.url("/items/3"))
        .header("x-weft-fault-abort", "429")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&client, req).await.unwrap().status, 429);
    assert_eq!(
        get(&client, &proxy.url("/broken")).await.unwrap().status,
        503
    );
    assert_eq!(
        get(&client, &proxy.url("/nowhere")).await.unwrap().status,
        404
    );

    // Metrics, labelled. Streams end (and log) just after their responses: wait briefly.
    let series = r#"weft_filter_requests_total{cluster="catalog",method="GET",route="items",status_class="2xx"}"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut stats = proxy.stats().await;
    while metric_value(&stats, series) != Some(2.0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        stats = proxy.stats().await;
    }
    assert_eq!(metric_value(&stats, series), Some(2.0), "{stats}");
    let broken_series = r#"weft_filter_requests_total{cluster="broken",method="GET",route="broken",status_class="5xx"}"#;
    assert_eq!(metric_value(&stats, broken_series), Some(1.0), "{stats}");
    assert_eq!(
        metric_value(&stats, r#"weft_upstream_retries_total{cluster="broken"}"#),
        Some(1.0)
    );
    assert!(stats.contains("# TYPE weft_filter_request_duration_ms histogram"));

    // Access log lines: JSON with the request's facts.
    let log = proxy.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| l.find("{\"").map(|i| &l[i..]))
        // The JSON object, then the log's own ` filter="telemetry"` tag.
        .filter_map(|j| {
            serde_json::Deserializer::from_str(j)
                .into_iter::<serde_json::Value>()
                .next()?
                .ok()
        })
        .filter(|v: &serde_json::Value| v.get("status").is_some())
        .collect();
    let first = lines
        .iter()
        .find(|v| v["path"] == "/items/1")
        .unwrap_or_else(|| panic!("no access log line for /items/1 in\n{log}"));
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "items");
    assert_eq!(first["cluster"], "catalog");
    assert_eq!(first["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(first["upstream"], up.address());
    // The fields read in `on_log` from the stream's properties.
    assert_eq!(first["method"], "GET");
    assert_eq!(first["protocol"], "HTTP/1.1");
    assert_eq!(
        first["request_id"].as_str().map(str::len),
        Some(36),
        "{first}"
    );
    assert!(
        first["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1:")),
        "{first}"
    );
    assert!(
        first["start_ms"]
            .as_i64()
            .is_some_and(|t| t > 1_700_000_000_000),
        "{first}"
    );
    let broken_line = lines
        .iter()
        .find(|v| v["path"] == "/broken")
        .expect("broken logged");
    assert_eq!(broken_line["code_details"], "upstream_connect_failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_streams_on_one_worker_are_each_logged_with_their_own_request() {
    // Eight 1 MB responses at once on one worker: their bodies stream side by side, so the
    // end of one stream (on_log) comes between other streams' callbacks on the same
    // instance, and must still read its own request and response.
    let up = Upstream::start("catalog").await;
    let routes =
        "{ routes: [ { name: bytes, match: { path: { prefix: /bytes } }, cluster: catalog } ] }";
    let f = |name: &str, config: &str| {
        crate::filter(
            name,
            &standard_filter(&format!("weft_filter_{name}")),
            config,
        )
    };
    let yaml = crate::chain(
        "catalog",
        &[f("telemetry", ""), f("router", routes)],
        &[crate::cluster("catalog", &[up.address()], "")],
    );
    let proxy = ProxyProcess::start_with(&yaml, 1).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = proxy.url("/bytes/1000000");
        tasks.push(tokio::spawn(async move {
            get(&h1_client(), &url).await.unwrap()
        }));
    }
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!((got.status, got.body.len()), (200, 1_000_000));
    }
    let series = r#"weft_filter_requests_total{cluster="catalog",method="GET",route="bytes",status_class="2xx"}"#;
    let stats = proxy.stats().await;
    assert_eq!(metric_value(&stats, series), Some(8.0), "{stats}");
}
