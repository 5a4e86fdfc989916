//! Bad input gets a clear answer and the proxy keeps serving.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use weft_tests::*;

use crate::{config, eps};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
    ] {
        let raw = raw_request(proxy.addr, bad).await.unwrap();
        assert_eq!(
            status_of(&raw),
            400,
            "{:?} -> {raw}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(up.hits(), 0, "nothing malformed was forwarded");
    assert_eq!(
        get(&h1_client(), &proxy.url("/")).await.unwrap().status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunk_sizes_are_refused_before_anything_is_forwarded() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    // Sizes a lenient parser reads as 5 (or as something): each used to reach the upstream
    // as a head, then fail as a 502.
    for size in ["0x5", "-5", "+5", " 5", "5 5", "fffffffffffffffff"] {
        let req = format!(
            "POST /chunked HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n"
        );
        let raw = raw_request(proxy.addr, req.as_bytes()).await.unwrap();
        assert_eq!(status_of(&raw), 400, "{size:?} -> {raw}");
    }
    assert_eq!(
        up.hits(),
        0,
        "a request with bad chunk framing was forwarded"
    );
    // A well-formed chunked body, and a chunked body that is empty, still go through whole.
    let raw = raw_request(
        proxy.addr,
        b"POST /ok HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert!(raw.contains("hello world"), "{raw}");
    let raw = raw_request(
        proxy.addr,
        b"POST /empty HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused_not_forwarded() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    for req in [
        &b"POST /smuggle HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST /smuggle HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        // Second request on a keep-alive connection.
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\nPOST /smuggle HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let raw = raw_request(proxy.addr, req).await.unwrap();
        let last = raw.rfind("HTTP/1.1 ").unwrap();
        assert_eq!(status_of(&raw[last..]), 400, "{raw}");
    }
    assert_eq!(up.hits(), 1, "only the plain GET reached the upstream");
    // Plain chunked requests are fine.
    let raw = raw_request(
        proxy.addr,
        b"POST /ok HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status_of(&raw), 200, "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_blocks_get_431() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let raw = raw_request(proxy.addr, big.as_bytes()).await.unwrap();
    assert_eq!(status_of(&raw), 431, "{}", &raw[..raw.len().min(200)]);

    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let req = format!("GET / HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    let raw = raw_request(proxy.addr, req.as_bytes()).await.unwrap();
    assert_eq!(status_of(&raw), 431, "{raw}");

    // Just under the limits is fine.
    let ok: String = (0..90).map(|i| format!("x-h{i}: v\r\n")).collect();
    let req = format!("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{ok}\r\n");
    assert_eq!(
        status_of(&raw_request(proxy.addr, req.as_bytes()).await.unwrap()),
        200
    );

    // HTTP/2: an oversized header list is refused, and the connection keeps working.
    let client = h2_client();
    let req = Request::get(proxy.url("/"))
        .header("x-big", "a".repeat(70 * 1024))
        .body(Full::new(Bytes::new()))
        .unwrap();
    match send(&client, req).await {
        Ok(got) => assert_eq!(got.status, 431, "{got:?}"),
        Err(e) => assert!(
            e.contains("REFUSED") || e.contains("PROTOCOL") || e.contains("431"),
            "{e}"
        ),
    }
    assert_eq!(get(&client, &proxy.url("/")).await.unwrap().status, 200);
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_is_a_startup_error_naming_file_line_and_field() {
    let good = config("", "", &[("127.0.0.1:1".into(), 1)])
        .replace("{admin}", &format!("127.0.0.1:{}", free_port()))
        .replace("{listen}", &format!("127.0.0.1:{}", free_port()));

    let typo = good.replace("    default_cluster: svc", "    default_clustr: svc");
    let (status, err) = run_proxy_expecting_failure(&typo, "typo.yaml");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("typo.yaml:6:5: listeners[0]: "), "{err}");
    assert!(err.contains("unknown field `default_clustr`"), "{err}");

    let bad_value = good.replace("weight: 1", "weight: lots");
    let (status, err) = run_proxy_expecting_failure(&bad_value, "value.yaml");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("value.yaml:11:"), "{err}");
    assert!(err.contains("clusters[0].endpoints[0].weight"), "{err}");

    let dangling = good.replace("default_cluster: svc", "default_cluster: nope");
    let (status, err) = run_proxy_expecting_failure(&dangling, "ref.yaml");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("ref.yaml: listeners[0].default_cluster: no cluster named `nope`"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_numbers_empty_files_and_yaml_bombs_are_refused_by_field() {
    let good = config("", "", &[("127.0.0.1:1".into(), 1)])
        .replace("{admin}", &format!("127.0.0.1:{}", free_port()))
        .replace("{listen}", &format!("127.0.0.1:{}", free_port()));
    let listener = |field: &str| {
        good.replace(
            "    default_cluster: svc",
            &format!("    default_cluster: svc\n    {field}"),
        )
    };
    let cluster = |field: &str| format!("{good}    {field}\n");
    // Each of these used to start: the first request aborted the process (a 137 GB
    // allocation), or every request got 503.
    for (yaml, field, range) in [
        (
            listener("max_request_headers: 4294967295"),
            "listeners[0].max_request_headers",
            "between 1 and 4096 (got 4294967295)",
        ),
        (
            listener("max_request_header_bytes: 1073741824"),
            "listeners[0].max_request_header_bytes",
            "between 8192 and 1048576",
        ),
        (
            cluster("limits: { max_connections: 0 }"),
            "clusters[0].limits.max_connections",
            "between 1 and 1000000 (got 0)",
        ),
        (
            cluster("limits: { max_requests: 0 }"),
            "clusters[0].limits.max_requests",
            "between 1 and 1000000 (got 0)",
        ),
        (
            cluster("outlier: { base_ejection_ms: 60000, max_ejection_ms: 1000 }"),
            "clusters[0].outlier.max_ejection_ms",
            "between 60000 and 86400000 (got 1000)",
        ),
    ] {
        let (status, err) = run_proxy_expecting_failure(&yaml, "range.yaml");
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("range.yaml: {field}: must be {range}")),
            "{err}"
        );
    }

    // An empty file (or only comments) is not a proxy that serves nothing and says ready.
    let (status, err) = run_proxy_expecting_failure("# nothing yet\n", "empty.yaml");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("empty.yaml: (file): is empty"), "{err}");

    // A "billion laughs" in a filter's config: refused by the parser's limit, at the alias
    // where the expansion starts.
    let mut bomb = String::from("          a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        let refs = vec![format!("*{prev}"); 9].join(", ");
        bomb.push_str(&format!("          {name}: &{name} [{refs}]\n"));
    }
    let yaml = good.replace(
        "    default_cluster: svc",
        &format!(
            "    default_cluster: svc\n    filters:\n      - name: f\n        module: /none.wasm\n        config:\n{bomb}"
        ),
    );
    let line = yaml.lines().position(|l| l.contains("*a")).unwrap() + 1;
    let (status, err) = run_proxy_expecting_failure(&yaml, "bomb.yaml");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("bomb.yaml:{line}:18: repetition limit exceeded")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = config("", "", &[("127.0.0.1:1".into(), 1)])
        .replace("{admin}", &format!("127.0.0.1:{}", free_port()))
        .replace("{listen}", &format!("127.0.0.1:{port}"));
    let (status, err) = run_proxy_expecting_failure(&cfg, "proxy.yaml");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "listener `ingress`: cannot listen on 127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(err.to_lowercase().contains("in use"), "{err}");
    drop(taken);
    // Unused: keep the runtime flavour uniform across tests.
    tokio::time::sleep(Duration::ZERO).await;
}
