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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_refuses_rebinding_hosts_answers_head_redacts_and_times_out() {
    let up = weft_tests::Upstream::start("u").await;
    let module = guest_filter("compat_basic");
    let cfg = config(
        &format!(
            "    filters:\n      - {{ name: basic, module: \"{}\", config: {{ greeting: hi, api_token: s3cr3t-value, auth: {{ client_secret: also-secret }} }} }}",
            module.display()
        ),
        "",
        &crate::eps(&[&up]),
    )
    .replace(
        "admin: { address: \"{admin}\" }",
        "admin: { address: \"{admin}\", allowed_hosts: [weft-admin], timeout_ms: 500 }",
    )
    .replace(
        "drain: { timeout_ms: 5000 }",
        &format!(
            "drain: {{ timeout_ms: 5000 }}\nwasm: {{ cache_dir: \"{}\" }}",
            shared_module_cache().display()
        ),
    );
    let proxy = ProxyProcess::start(&cfg).await;
    let ask = |head: String| {
        let admin = proxy.admin;
        async move { raw_request(admin, head.as_bytes()).await.unwrap() }
    };
    let port = proxy.admin.port();
    // A page on a rebinding domain names that domain: refused. IPs, localhost and the
    // allowed name are served.
    for (host, status) in [
        (format!("evil.example:{port}"), 403),
        ("evil.example".to_owned(), 403),
        (format!("127.0.0.1:{port}"), 200),
        (format!("localhost:{port}"), 200),
        (format!("[::1]:{port}"), 200),
        (format!("WEFT-ADMIN:{port}"), 200),
    ] {
        let raw = ask(format!(
            "GET /ready HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
        ))
        .await;
        assert_eq!(status_of(&raw), status, "{host}: {raw}");
    }
    // HEAD: the status and headers of GET, no body.
    let raw = ask(format!(
        "HEAD /ready HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\r\n"
    ))
    .await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert!(raw.ends_with("\r\n\r\n"), "a body came with HEAD: {raw:?}");
    // Secrets in a filter's configuration do not leave through /config_dump.
    let (status, dump) = proxy.admin_get("/config_dump").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        !dump.contains("s3cr3t-value") && !dump.contains("also-secret"),
        "{dump}"
    );
    assert!(dump.contains("\"api_token\": \"[redacted]\""), "{dump}");
    assert!(dump.contains("\"greeting\": \"hi\""), "{dump}");
    // A slow admin client is cut at admin.timeout_ms.
    let mut slow = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /ready HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut slow, &mut buf),
    )
    .await;
    assert!(closed.is_ok(), "a half-sent admin request was held for 5 s");
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_endpoint_beyond_loopback_is_warned_about() {
    let up = weft_tests::Upstream::start("u").await;
    let port = free_port();
    let cfg = config("", "", &crate::eps(&[&up])).replace(
        "admin: { address: \"{admin}\" }",
        &format!("admin: {{ address: \"0.0.0.0:{port}\" }}"),
    );
    let proxy = ProxyProcess::try_start_args(&cfg, 2, &[], port, free_port())
        .await
        .unwrap();
    assert!(
        proxy
            .log()
            .contains("the admin endpoint listens beyond loopback and is unauthenticated"),
        "{}",
        proxy.log()
    );
}
