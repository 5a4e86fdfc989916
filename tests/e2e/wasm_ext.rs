//! Weft's `weft.*` extensions, called by the `compat_ext` filter (upstream `proxy-wasm` crate
//! only): choosing the cluster, timeouts, and retries executed by the host.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use weft_tests::*;

/// Cluster `svc` over `svc_eps` (round robin, no outlier ejection) and cluster `other` over
/// `other`, with `compat_ext` on the listener.
fn ext_config(svc_eps: &[String], other: &Upstream) -> String {
    let svc_extra = "lb_policy: round_robin, connect_timeout_ms: 500, \
                     outlier: { consecutive_failures: 0 }";
    crate::chain(
        "svc",
        &[crate::filter("ext", &guest_filter("compat_ext"), "")],
        &[
            crate::cluster("svc", svc_eps, svc_extra),
            crate::cluster("other", &[other.address()], ""),
        ],
    )
}

fn request(path: String, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut r = Request::post(path);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Full::new(body.into())).unwrap()
}

/// A proxy running [`ext_config`] (the `compat_ext` filter before upstreams `svc` and
/// `other`), with an HTTP/1 client.
struct ExtProxy {
    proxy: ProxyProcess,
    client: Client<HttpConnector, Full<Bytes>>,
    _upstreams: [Upstream; 2],
}

impl ExtProxy {
    async fn start() -> Self {
        let svc = Upstream::start("svc").await;
        let other = Upstream::start("other").await;
        let proxy = ProxyProcess::start(&ext_config(&[svc.address()], &other)).await;
        Self {
            proxy,
            client: h1_client(),
            _upstreams: [svc, other],
        }
    }

    /// Posts an empty body to `/a` with `headers` (the filter reads its orders there).
    async fn send_with(&self, headers: &[(&str, &str)]) -> Got {
        send(&self.client, request(self.proxy.url("/a"), headers, ""))
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_chooses_the_cluster_and_the_timeout() {
    let svc = Upstream::start("svc").await;
    let other = Upstream::start("other").await;
    let proxy = ProxyProcess::start(&ext_config(&[svc.address()], &other)).await;
    let client = h1_client();
    let got = send(&client, request(proxy.url("/a"), &[], ""))
        .await
        .unwrap();
    assert_eq!(got.header("x-upstream"), "svc");
    let got = send(
        &client,
        request(proxy.url("/a"), &[("x-route-cluster", "other")], ""),
    )
    .await
    .unwrap();
    assert_eq!(got.header("x-upstream"), "other");
    assert_eq!(got.header("x-attempts-made"), "1");
    assert_eq!(got.header("x-code-details"), "via_upstream");
    let got = send(
        &client,
        request(proxy.url("/a"), &[("x-route-cluster", "nope")], ""),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 400, "unknown cluster: NOT_FOUND to the filter");

    // A per-request timeout shorter than the upstream's delay: 504, seen by the filter.
    let started = Instant::now();
    let got = send(
        &client,
        request(proxy.url("/delay/2000"), &[("x-timeout-ms", "100")], ""),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 504);
    assert_eq!(got.header("x-code-details"), "upstream_response_timeout");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_asked_by_a_filter_replay_the_body_and_skip_a_dead_endpoint() {
    let up = Upstream::start("svc").await;
    let other = Upstream::start("other").await;
    // A port with nothing listening: connections are refused.
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::start(&ext_config(&[up.address(), dead], &other)).await;
    let client = h1_client();

    // Without retries, round robin sends some requests to the dead endpoint.
    let mut refused = 0;
    for _ in 0..10 {
        let got = send(&client, request(proxy.url("/x"), &[], ""))
            .await
            .unwrap();
        if got.status == 503 {
            assert_eq!(got.header("x-code-details"), "upstream_connect_failure");
            refused += 1;
        }
    }
    assert!(refused > 0, "the dead endpoint is in rotation");

    // With retries on connect failure, every request succeeds, some on the second attempt.
    let retry = [("x-attempts", "3"), ("x-retry-on", "connect-failure")];
    let mut second = 0;
    for _ in 0..20 {
        let got = send(&client, request(proxy.url("/x"), &retry, "body"))
            .await
            .unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.echo()["body"], "body", "the body is replayed");
        if got.header("x-attempts-made") == "2" {
            second += 1;
            assert_eq!(got.echo()["headers"]["x-weft-attempt"][0], "2");
        }
    }
    assert!(second > 0, "some requests needed a second attempt");
    let stats = proxy.stats().await;
    let retries = metric_value(&stats, r#"weft_upstream_retries_total{cluster="svc"}"#);
    assert_eq!(retries, Some(second as f64), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_5xx_stop_at_the_attempt_limit() {
    let up = Upstream::start("svc").await;
    let other = Upstream::start("other").await;
    let proxy = ProxyProcess::start(&ext_config(&[up.address()], &other)).await;
    let client = h1_client();
    // The upstream fails its first two requests: the third attempt gets through, with the
    // request body intact.
    let retry = [("x-attempts", "3"), ("x-retry-on", "5xx")];
    let got = send(
        &client,
        request(proxy.url("/fail-first/2/x"), &retry, "payload"),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.header("x-attempts-made"), "3");
    let echo = got.echo();
    assert_eq!(echo["body"], "payload");
    assert_eq!(echo["headers"]["x-weft-attempt"][0], "3");
    assert_eq!(up.hits(), 3);

    // Two attempts allowed against an upstream that fails its first eight: the second failure
    // is the answer.
    let retry = [("x-attempts", "2"), ("x-retry-on", "5xx")];
    let got = send(&client, request(proxy.url("/fail-first/8/x"), &retry, "p"))
        .await
        .unwrap();
    assert_eq!(got.status, 503);
    assert_eq!(got.header("x-attempts-made"), "2");
    assert_eq!(up.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_set_on_a_stream_are_shared_by_the_chain_and_not_by_other_streams() {
    let up = Upstream::start("svc").await;
    let yaml = crate::chain(
        "svc",
        &[
            crate::filter("basic", &guest_filter("compat_basic"), ""),
            crate::filter("ext", &guest_filter("compat_ext"), ""),
        ],
        &[crate::cluster("svc", &[up.address()], "")],
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let client = h2_client();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (client, url) = (client.clone(), proxy.url(&format!("/p/{i}")));
        tasks.push(tokio::spawn(async move {
            let got = get(&client, &url).await.unwrap();
            assert_eq!(
                got.header("x-basic-seen"),
                format!("/p/{i}"),
                "own stream's value"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_properties_are_read_in_one_call_with_absent_ones_marked() {
    let up = Upstream::start("svc").await;
    let yaml = crate::chain(
        "svc",
        &[crate::filter("ext", &guest_filter("compat_ext"), "")],
        &[crate::cluster("svc", &[up.address()], "")],
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let got = send(
        &h1_client(),
        request(proxy.url("/p/q?x=1"), &[("x-properties", "1")], ""),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200);
    // What the filter read, as the upstream saw it: the values in order, the absent one
    // marked absent (POST: `request()` here posts).
    assert_eq!(
        got.echo()["headers"]["x-properties"],
        serde_json::json!(["/p/q?x=1|POST|-"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_replay_cap_gets_a_single_attempt() {
    let up = Upstream::start("svc").await;
    let other = Upstream::start("other").await;
    let yaml = ext_config(&[up.address()], &other).replace(
        "    default_cluster: svc\n",
        "    default_cluster: svc\n    replay_buffer_kb: 1\n",
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let client = h1_client();
    let retry = [("x-attempts", "3"), ("x-retry-on", "5xx")];
    // 4 KiB: over the 1 KiB cap, so not kept, so not retried (and still delivered whole).
    let big = "b".repeat(4096);
    let got = send(&client, request(proxy.url("/fail-first/1/x"), &retry, big))
        .await
        .unwrap();
    assert_eq!(got.status, 503);
    assert_eq!(got.header("x-attempts-made"), "1");
    assert_eq!(up.hits(), 1);
    // Under the cap: kept and replayed.
    let got = send(
        &client,
        request(proxy.url("/fail-first/2/x"), &retry, "small"),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.echo()["body"], "small");
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_a_filter_says_it_does_nothing_in_are_not_called_again() {
    let ext = ExtProxy::start().await;
    let (proxy, client) = (&ext.proxy, &ext.client);
    // The upstream echoes the request as JSON: lowercase keys, unless a filter upper-cased it.
    let upper = |body: &str| body == body.to_uppercase();
    let plain = ext.send_with(&[]).await;
    assert!(!upper(&plain.body), "{:?}", plain.body);
    let got = ext.send_with(&[("x-upper-body", "1")]).await;
    assert!(upper(&got.body), "the body callback runs: {:?}", got.body);

    // Not a callback the host can skip: BAD_ARGUMENT, and nothing changes.
    let got = ext
        .send_with(&[("x-unused", "proxy_on_tick"), ("x-upper-body", "1")])
        .await;
    assert_eq!(got.header("x-unused-status"), "bad_argument");
    assert!(upper(&got.body), "{:?}", got.body);

    // The filter says it does nothing in response bodies: from this stream on, bodies pass
    // it by (its response headers callback still runs).
    let got = ext
        .send_with(&[
            ("x-unused", "proxy_on_response_body"),
            ("x-upper-body", "1"),
        ])
        .await;
    assert_eq!(got.header("x-unused-status"), "ok");
    for _ in 0..3 {
        let got = ext.send_with(&[("x-upper-body", "1")]).await;
        assert_eq!(got.status, 200);
        assert!(
            !upper(&got.body),
            "the body passed the filter by: {:?}",
            got.body
        );
        assert!(got.body.contains("\"x-upper-body\""), "{:?}", got.body);
        assert_eq!(got.header("x-attempts-made"), "1");
    }

    // A head paused with a body to come is the body callback's to release, as in Envoy:
    // still so once the filter said it does nothing in request bodies (a skipped callback
    // continues).
    let got = send(
        client,
        request(proxy.url("/a"), &[("x-pause-head", "1")], "payload"),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200);
    ext.send_with(&[("x-unused", "proxy_on_request_body")])
        .await;
    let started = Instant::now();
    let got = send(
        client,
        request(proxy.url("/a"), &[("x-pause-head", "1")], "payload"),
    )
    .await
    .unwrap();
    assert_eq!(
        (got.status, got.echo()["body"].as_str()),
        (200, Some("payload"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Likewise response heads; request heads still go through it (it still routes).
    ext.send_with(&[("x-unused", "proxy_on_response_headers")])
        .await;
    let got = ext.send_with(&[("x-route-cluster", "other")]).await;
    assert_eq!(got.header("x-upstream"), "other");
    assert_eq!(
        got.header("x-attempts-made"),
        "",
        "response heads pass it by"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_done_with_a_stream_is_called_no_more_for_it() {
    let ext = ExtProxy::start().await;
    let upper = |body: &str| body == body.to_uppercase();
    let done_status = |got: &Got| got.echo()["headers"]["x-stream-done-status"].clone();

    // Done at its request head: the response passes the filter by, head and body.
    let got = ext
        .send_with(&[("x-stream-done", "1"), ("x-upper-body", "1")])
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(done_status(&got), serde_json::json!(["ok"]));
    assert!(!upper(&got.body), "no body callback: {:?}", got.body);
    assert_eq!(
        got.header("x-attempts-made"),
        "",
        "no response-head callback"
    );

    // For that stream only: the next one goes through every callback again.
    let got = ext.send_with(&[("x-upper-body", "1")]).await;
    assert_eq!(got.header("x-attempts-made"), "1");
    assert!(upper(&got.body), "{:?}", got.body);

    // A pause after it cannot be resumed by anyone: the stream goes on at once.
    let started = Instant::now();
    let got = ext.send_with(&[("x-stream-done", "pause")]).await;
    assert_eq!(
        (got.status, done_status(&got)),
        (200, serde_json::json!(["ok"]))
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Arguments it does not take: refused, and the filter stays on the stream.
    let got = ext.send_with(&[("x-stream-done", "junk")]).await;
    assert_eq!(done_status(&got), serde_json::json!(["bad_argument"]));
    assert_eq!(got.header("x-attempts-made"), "1");
}

/// The filter's `contexts_created` counter, once it has stopped moving.
async fn contexts_created(proxy: &ProxyProcess) -> f64 {
    let series = "weft_filter_contexts_created_total";
    let mut last = metric_value(&proxy.stats().await, series);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = metric_value(&proxy.stats().await, series);
        if now == last {
            break;
        }
        last = now;
    }
    last.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_with_nothing_left_to_run_costs_later_streams_no_context() {
    // The host creates a stream's context in a filter just before the first callback that
    // runs there. A filter that said it does nothing in every callback it exports is not
    // called at all for later streams: no context created, nothing at their end either.
    let svc = Upstream::start("svc").await;
    let other = Upstream::start("other").await;
    let proxy = ProxyProcess::start(&ext_config(&[svc.address()], &other)).await;
    let client = h1_client();
    let every = "proxy_on_request_headers, proxy_on_response_headers, proxy_on_request_body, \
                 proxy_on_response_body, proxy_on_request_trailers, proxy_on_response_trailers, \
                 proxy_on_done, proxy_on_log";
    let got = send(
        &client,
        request(proxy.url("/a"), &[("x-unused", every)], ""),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(contexts_created(&proxy).await, 1.0);
    for i in 0..20 {
        let got = send(&client, request(proxy.url(&format!("/b/{i}")), &[], "x"))
            .await
            .unwrap();
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(got.echo()["body"].as_str(), Some("x"));
        assert_eq!(
            got.header("x-attempts-made"),
            "",
            "its response callback is skipped"
        );
    }
    assert_eq!(
        contexts_created(&proxy).await,
        1.0,
        "no stream after the first created a context in the filter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_skips_request_heads_gets_its_context_for_the_response() {
    // The request headers callback is skipped from the first stream on; the response headers
    // callback still runs, on a context created just before it.
    let svc = Upstream::start("svc").await;
    let other = Upstream::start("other").await;
    let proxy = ProxyProcess::start(&ext_config(&[svc.address()], &other)).await;
    let client = h1_client();
    let got = send(
        &client,
        request(
            proxy.url("/a"),
            &[("x-unused", "proxy_on_request_headers")],
            "",
        ),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.header("x-unused-status"), "ok");
    assert_eq!(got.header("x-attempts-made"), "1");
    for i in 0..5 {
        let got = send(
            &client,
            request(
                proxy.url(&format!("/b/{i}")),
                &[("x-route-cluster", "other")],
                "",
            ),
        )
        .await
        .unwrap();
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(
            got.header("x-attempts-made"),
            "1",
            "its response callback ran"
        );
        // Its request headers callback no longer runs: a route asked for there is not taken.
        assert_eq!(got.header("x-upstream"), "svc");
    }
    assert_eq!(contexts_created(&proxy).await, 6.0, "one context a stream");
}
