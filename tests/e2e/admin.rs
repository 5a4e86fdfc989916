//! The admin endpoint's content.

use weft_tests::*;

use crate::config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_stats_clusters_and_config() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let cfg = config(
        "",
        "    lb_policy: weighted",
        &[(a.address(), 1), (b.address(), 3)],
    );
    let proxy = ProxyProcess::start(&cfg).await;
    assert_eq!(
        proxy.admin_get("/ready").await.unwrap(),
        (200, "LIVE\n".into())
    );

    let client = h1_client();
    for path in ["/", "/", "/", "/status/404", "/status/503"] {
        get(&client, &proxy.url(path)).await.unwrap();
    }

    let stats = proxy.stats().await;
    for line in [
        "weft_requests_total{listener=\"ingress\",cluster=\"svc\",status_class=\"2xx\"} 3",
        "weft_requests_total{listener=\"ingress\",cluster=\"svc\",status_class=\"4xx\"} 1",
        "weft_requests_total{listener=\"ingress\",cluster=\"svc\",status_class=\"5xx\"} 1",
        "weft_upstream_request_duration_seconds_count{cluster=\"svc\"} 5",
        "weft_downstream_requests_active{listener=\"ingress\"} 0",
        "weft_upstream_requests_active{cluster=\"svc\"} 0",
        "weft_outlier_ejections_total{cluster=\"svc\"} 0",
        "# TYPE weft_upstream_request_duration_seconds histogram",
    ] {
        assert!(stats.contains(line), "missing {line:?} in\n{stats}");
    }
    // The client's keep-alive connections are open; the proxy holds pooled upstream ones.
    let gauge = |stats: &str, name: &str| {
        metric_value(stats, name).unwrap_or_else(|| panic!("no {name} in\n{stats}"))
    };
    let downstream = "weft_downstream_connections_active{listener=\"ingress\"}";
    assert!(gauge(&stats, downstream) >= 1.0, "{stats}");
    assert!(gauge(&stats, "weft_upstream_connections_active{cluster=\"svc\"}") >= 1.0);
    drop(client);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while gauge(&proxy.stats().await, downstream) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "closed connections still counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let clusters = proxy.clusters().await;
    let c = &clusters["clusters"][0];
    assert_eq!(c["name"], "svc");
    assert_eq!(c["lb_policy"], "weighted");
    let eps = c["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2);
    assert_eq!(eps[1]["address"], b.address());
    assert_eq!(eps[1]["weight"], 3);
    assert_eq!(eps[1]["healthy"], true);
    let total: u64 = eps
        .iter()
        .map(|e| e["total_requests"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 5);

    let (status, dump) = proxy.admin_get("/config_dump").await.unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["config"]["listeners"][0]["name"], "ingress");
    assert_eq!(dump["config"]["clusters"][0]["endpoints"][1]["weight"], 3);
    assert_eq!(dump["listening"][0]["address"], proxy.addr.to_string());

    assert_eq!(proxy.admin_get("/nope").await.unwrap().0, 404);
}
