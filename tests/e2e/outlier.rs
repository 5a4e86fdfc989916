//! Passive outlier detection: a killed endpoint is ejected, and returns after it recovers.

use std::time::Duration;

use weft_tests::*;

use crate::{config, eps};

async fn statuses(proxy: &ProxyProcess, n: usize) -> Vec<u16> {
    statuses_of(proxy, "/", n).await
}

fn endpoint<'a>(clusters: &'a serde_json::Value, addr: &str) -> &'a serde_json::Value {
    clusters["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == addr)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_endpoint_is_ejected_and_comes_back_after_restart() {
    let a = Upstream::start("a").await;
    let mut b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let cluster = "    outlier: { consecutive_failures: 3, base_ejection_ms: 1500, max_ejection_percent: 50 }";
    let proxy = ProxyProcess::start(&config("", cluster, &eps(&[&a, &b, &c]))).await;

    assert!(statuses(&proxy, 30).await.iter().all(|s| *s == 200));
    assert!(b.hits() > 0);

    b.kill();
    let after_kill = statuses(&proxy, 60).await;
    let failures = after_kill.iter().filter(|s| **s != 200).count();
    assert!(
        failures <= 3,
        "at most the threshold fails before ejection: {after_kill:?}"
    );
    assert!(after_kill[30..].iter().all(|s| *s == 200), "{after_kill:?}");
    let clusters = proxy.clusters().await;
    let eb = endpoint(&clusters, &b.address());
    assert_eq!(eb["healthy"], false, "{clusters}");
    assert_eq!(eb["ejections"], 1);
    assert_eq!(endpoint(&clusters, &a.address())["healthy"], true);
    assert!(
        proxy
            .stats()
            .await
            .contains("weft_outlier_ejections_total{cluster=\"svc\"} 1"),
        "{}",
        proxy.stats().await
    );
    assert!(
        proxy
            .stats()
            .await
            .contains("weft_endpoints_ejected{cluster=\"svc\"} 1")
    );

    b.restart().await;
    let before = b.hits();
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert!(statuses(&proxy, 60).await.iter().all(|s| *s == 200));
    assert!(
        b.hits() >= before + 15,
        "restarted endpoint is back in rotation"
    );
    let clusters = proxy.clusters().await;
    assert_eq!(
        endpoint(&clusters, &b.address())["healthy"],
        true,
        "{clusters}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_too() {
    let good = Upstream::start("good").await;
    let proxy_cfg = config(
        "",
        "    outlier: { consecutive_failures: 2, base_ejection_ms: 60000, max_ejection_percent: 50, eject_last_healthy: true, panic_threshold_percent: 0 }",
        &eps(&[&good]),
    );
    let proxy = ProxyProcess::start(&proxy_cfg).await;
    let client = h1_client();
    // The only endpoint answers 503 twice: it is ejected, as this cluster allows (by default
    // the last healthy endpoint stays, and a cluster with too few healthy ones panics).
    for _ in 0..2 {
        assert_eq!(
            get(&client, &proxy.url("/status/503"))
                .await
                .unwrap()
                .status,
            503
        );
    }
    let got = get(&client, &proxy.url("/")).await.unwrap();
    assert_eq!(got.status, 503);
    assert_eq!(got.body, "no healthy upstream\n");
    assert_eq!(good.hits(), 2, "nothing reached the ejected endpoint");
}

/// `n` GETs of `path`, their statuses.
async fn statuses_of(proxy: &ProxyProcess, path: &str, n: usize) -> Vec<u16> {
    let client = h1_client();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            get(&client, &proxy.url(path))
                .await
                .map(|g| g.status)
                .unwrap_or(0),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_endpoint_cluster_survives_its_own_500s() {
    // A sidecar's inbound cluster: one endpoint. Its application's 500s used to eject it,
    // and then every request got 503 "no healthy upstream" for 30 s or more.
    let app = Upstream::start("app").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&app]))).await;
    assert!(
        statuses_of(&proxy, "/status/500", 10)
            .await
            .iter()
            .all(|s| *s == 500)
    );
    assert!(statuses_of(&proxy, "/", 5).await.iter().all(|s| *s == 200));
    let clusters = proxy.clusters().await;
    assert_eq!(
        endpoint(&clusters, &app.address())["healthy"],
        true,
        "{clusters}"
    );
    assert_eq!(endpoint(&clusters, &app.address())["ejections"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_failures_only_leave_application_500s_alone() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let cluster =
        "    outlier: { consecutive_failures: 2, failures: gateway, max_ejection_percent: 50 }";
    let proxy = ProxyProcess::start(&config("", cluster, &eps(&[&a, &b]))).await;
    assert!(
        statuses_of(&proxy, "/status/500", 10)
            .await
            .iter()
            .all(|s| *s == 500)
    );
    let stats = proxy.stats().await;
    assert!(
        stats.contains("weft_outlier_ejections_total{cluster=\"svc\"} 0"),
        "application 500s ejected an endpoint: {stats}"
    );
    // 503s are gateway failures: one of the two is ejected.
    assert!(
        statuses_of(&proxy, "/status/503", 10)
            .await
            .iter()
            .all(|s| *s == 503)
    );
    let stats = proxy.stats().await;
    assert!(
        stats.contains("weft_outlier_ejections_total{cluster=\"svc\"} 1"),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_too_few_healthy_endpoints_the_cluster_panics_and_uses_them_all() {
    // Both endpoints may be ejected; with none healthy (below the 50% threshold) the
    // balancer ignores ejections, as Envoy's does, instead of answering 503.
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let cluster = "    outlier: { consecutive_failures: 1, base_ejection_ms: 60000, max_ejection_percent: 100, eject_last_healthy: true }";
    let proxy = ProxyProcess::start(&config("", cluster, &eps(&[&a, &b]))).await;
    assert!(
        statuses_of(&proxy, "/status/500", 6)
            .await
            .iter()
            .all(|s| *s == 500)
    );
    let clusters = proxy.clusters().await;
    for up in [&a, &b] {
        assert_eq!(
            endpoint(&clusters, &up.address())["healthy"],
            false,
            "{clusters}"
        );
    }
    assert_eq!(clusters["clusters"][0]["panic"], true, "{clusters}");
    let (ha, hb) = (a.hits(), b.hits());
    assert!(statuses_of(&proxy, "/", 20).await.iter().all(|s| *s == 200));
    assert!(
        a.hits() > ha && b.hits() > hb,
        "both endpoints serve in panic"
    );
    let stats = proxy.stats().await;
    let picks =
        metric_value(&stats, "weft_upstream_panic_picks_total{cluster=\"svc\"}").unwrap_or(0.0);
    assert!(picks >= 20.0, "{stats}");
}
