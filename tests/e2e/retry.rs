//! The standard retry filter (filters/retry, built on weft-sdk) in the real proxy: an
//! endpoint dying under load costs no idempotent request, and nothing else is retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use weft_tests::*;

fn retry_config(endpoints: &[String], policy: &str) -> String {
    crate::chain(
        "svc",
        &[crate::filter(
            "retry",
            &standard_filter("weft_filter_retry"),
            policy,
        )],
        &[crate::cluster("svc", endpoints, "connect_timeout_ms: 500")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_dying_under_load_fails_no_idempotent_request() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut c = Upstream::start("c").await;
    let policy = "{ default: { attempts: 3, retry_on: [connect-failure, reset, gateway-error], \
                  backoff: { base_ms: 5, max_ms: 20 } } }";
    let yaml = retry_config(&[a.address(), b.address(), c.address()], policy);
    let proxy = Arc::new(ProxyProcess::start(&yaml).await);
    let client = h1_client();
    let sent = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, proxy, sent) = (client.clone(), proxy.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for _ in 0..250 {
                sent.fetch_add(1, Ordering::SeqCst);
                // Slow enough answers that requests are in flight when `c` dies.
                let got = get(&client, &proxy.url("/delay/2/x")).await;
                match got {
                    Ok(g) if g.status == 200 => {}
                    other => failed.push(format!("{other:?}")),
                }
            }
            failed
        }));
    }
    // Kill `c` a quarter of the way in: in-flight requests on it are reset, and later
    // connections to it are refused.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sent.load(Ordering::SeqCst) < 500 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    c.kill();
    let mut failed = Vec::new();
    for t in tasks {
        failed.extend(t.await.unwrap());
    }
    assert!(
        failed.is_empty(),
        "{} of 2000 failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let stats = proxy.stats().await;
    let retries =
        metric_value(&stats, r#"weft_upstream_retries_total{cluster="svc"}"#).unwrap_or(0.0);
    assert!(
        retries >= 1.0,
        "the dead endpoint cost retries, not failures: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_not_retried_and_a_get_stops_at_its_attempts() {
    let up = Upstream::start("svc").await;
    let policy =
        "{ default: { attempts: 3, retry_on: [5xx], backoff: { base_ms: 1, max_ms: 2 } } }";
    let proxy = ProxyProcess::start(&retry_config(&[up.address()], policy)).await;
    let client = h1_client();
    let req = Request::post(proxy.url("/status/503"))
        .body(Full::new(Bytes::from_static(b"order")))
        .unwrap();
    assert_eq!(send(&client, req).await.unwrap().status, 503);
    assert_eq!(up.hits(), 1, "a POST is sent once");
    let got = get(&client, &proxy.url("/status/503")).await.unwrap();
    assert_eq!(got.status, 503);
    assert_eq!(up.hits(), 4, "a GET gets its 3 attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_a_retry_storm() {
    let up = Upstream::start("svc").await;
    // Every answer is a 503: unbounded, 3 attempts would triple the load on the failing
    // service. The budget allows retries for 10% of requests (each worker its own share).
    let policy = "{ default: { attempts: 3, retry_on: [5xx], backoff: { base_ms: 1, max_ms: 2 } }, \
                  budget: { ratio: 0.1, min_per_second: 0, window_s: 60 } }";
    // No outlier ejection: every request must reach the failing service.
    let yaml = crate::chain(
        "svc",
        &[crate::filter(
            "retry",
            &standard_filter("weft_filter_retry"),
            policy,
        )],
        &[crate::cluster(
            "svc",
            &[up.address()],
            "outlier: { consecutive_failures: 0 }",
        )],
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let client = h1_client();
    for _ in 0..200 {
        assert_eq!(
            get(&client, &proxy.url("/status/503"))
                .await
                .unwrap()
                .status,
            503
        );
    }
    let retries = up.hits() - 200;
    assert!(
        (16..=20).contains(&retries),
        "{retries} retries for 200 failing requests"
    );
    let stats = proxy.stats().await;
    let refused = metric_value(&stats, "weft_filter_retry_budget_exhausted_total").unwrap_or(0.0);
    assert!(refused >= 180.0, "{stats}");
}
