//! Passive outlier detection: a killed endpoint is ejected, and returns after it recovers.

use std::time::Duration;

use weft_tests::*;

use crate::{config, eps};

async fn statuses(proxy: &ProxyProcess, n: usize) -> Vec<u16> {
    let client = h1_client();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            get(&client, &proxy.url("/"))
                .await
                .map(|g| g.status)
                .unwrap_or(0),
        );
    }
    out
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
        "    outlier: { consecutive_failures: 2, base_ejection_ms: 60000, max_ejection_percent: 50 }",
        &eps(&[&good]),
    );
    let proxy = ProxyProcess::start(&proxy_cfg).await;
    let client = h1_client();
    // The only endpoint answers 503 twice: it is ejected (one endpoint may always be).
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
