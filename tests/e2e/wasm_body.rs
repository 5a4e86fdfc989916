//! Body and trailer callbacks of the proxy-wasm ABI, with the `compat_body` filter (written
//! only against the upstream `proxy-wasm` crate): rewrites with buffering, streaming, buffer
//! limits, local replies from body callbacks, and trailers both ways.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_tests::*;

/// One listener running `compat_body` (buffer limit 64 KiB) in front of `up`, over
/// `protocol` towards the upstream.
fn body_config(up: &Upstream, protocol: &str) -> String {
    let module = guest_filter("compat_body");
    crate::chain(
        "svc",
        &[format!(
            "{{ name: body, module: \"{}\", limits: {{ buffer_kb: 64 }} }}",
            module.display()
        )],
        &[crate::cluster(
            "svc",
            &[up.address()],
            &format!("protocol: {protocol}"),
        )],
    )
}

fn post(url: String, mode: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("x-body-mode", mode)
        .body(Full::new(body.into()))
        .unwrap()
}

fn get_with_mode(url: String, mode: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("x-body-mode", mode)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_rewrites_whole_bodies_both_ways_and_the_length_follows() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&body_config(&up, "http1")).await;
    for client in [h1_client(), h2_client()] {
        // Request: buffered to the end, upper-cased, one byte longer.
        let got = send(&client, post(proxy.url("/echo"), "upper", "hello body"))
            .await
            .unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        let echo = got.echo();
        assert_eq!(echo["body"], "HELLO BODY!");
        assert_eq!(echo["headers"]["content-length"][0], "11");

        // Response: buffered to the end and wrapped; the client reads exactly that.
        let got = send(&client, get_with_mode(proxy.url("/status/201"), "wrap"))
            .await
            .unwrap();
        assert_eq!(got.status, 201);
        assert_eq!(got.body, "<wrapped>status 201\n</wrapped>");
        assert_eq!(got.header("content-length"), got.body.len().to_string());

        // A body callback answering locally: nothing reaches the upstream.
        let before = up.hits();
        let got = send(
            &client,
            post(proxy.url("/echo"), "upper", "this is forbidden"),
        )
        .await
        .unwrap();
        assert_eq!(got.status, 403);
        assert_eq!(got.header("x-denied-by"), "body");
        assert_eq!(got.body, "no\n");
        assert_eq!(up.hits(), before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_the_buffer_limit_stream_through_a_filter_that_does_not_hold_them() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&body_config(&up, "http1")).await;
    let client = h1_client();
    let n = 3_000_000;
    let got = get(&client, &proxy.url(&format!("/bytes/{n}")))
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), n);
    assert!(
        got.body
            .bytes()
            .enumerate()
            .all(|(i, b)| b == b'0' + (i % 10) as u8),
        "bytes arrive intact and in order"
    );
    let stats = proxy.stats().await;
    let seen = metric_value(&stats, "weft_filter_body_bytes_seen_total").unwrap_or(0.0);
    let pieces = metric_value(&stats, "weft_filter_body_pieces_seen_total").unwrap_or(0.0);
    assert!(seen >= n as f64, "the filter saw every byte: {seen}");
    assert!(pieces > 1.0, "in pieces, not one buffer: {pieces}");

    // A 1 MiB request body streams upstream the same way.
    let big: String = "abcdefgh".repeat(128 * 1024);
    let got = send(&client, post(proxy.url("/echo"), "", big.clone()))
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.echo()["body"].as_str().unwrap().len(), big.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffering_past_the_limit_gets_413_for_requests_and_500_for_responses() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&body_config(&up, "http1")).await;
    let client = h1_client();
    let before = up.hits();
    let got = send(
        &client,
        post(proxy.url("/echo"), "hold", vec![b'x'; 300_000]),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 413, "{}", got.body);
    assert_eq!(
        got.header("connection"),
        "close",
        "the body was not read: the connection cannot be reused"
    );
    assert!(
        got.body.contains("buffer limit of filter `body`"),
        "{}",
        got.body
    );
    assert_eq!(up.hits(), before, "nothing went upstream");

    let got = send(&client, get_with_mode(proxy.url("/bytes/300000"), "hold"))
        .await
        .unwrap();
    assert_eq!(got.status, 500, "{}", got.body);

    // Under the limit, a held body goes on whole once it ends.
    let got = send(
        &client,
        post(proxy.url("/echo"), "hold", vec![b'y'; 10_000]),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.echo()["body"].as_str().unwrap(), "y".repeat(10_000));
    let got = send(&client, get_with_mode(proxy.url("/bytes/50000"), "hold"))
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), 50_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_callback_that_traps_fails_its_stream_only() {
    let up = Upstream::start("u").await;
    let yaml = body_config(&up, "http1").replace(
        "limits: { buffer_kb: 64 } }",
        "limits: { buffer_kb: 64 }, failure_policy: reload }",
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let client = h1_client();
    let before = up.hits();
    let got = send(&client, post(proxy.url("/echo"), "panic", "boom"))
        .await
        .unwrap();
    assert_eq!(got.status, 503);
    assert_eq!(got.header("x-weft-filter-failed"), "body");
    assert_eq!(up.hits(), before, "the failed request did not go upstream");
    let stats = proxy.stats().await;
    let traps = metric_value(
        &stats,
        r#"weft_filter_failures_total{filter="body",kind="trap"}"#,
    );
    assert_eq!(traps, Some(1.0), "{stats}");
    // `reload` replaces the instance: later bodies go through the filter again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = send(&client, post(proxy.url("/echo"), "upper", "again"))
            .await
            .unwrap();
        if got.status == 200 {
            assert_eq!(got.echo()["body"], "AGAIN!");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no reload: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        proxy.log().contains("proxy_on_request_body"),
        "the log names the callback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_callback_can_end_a_request_whose_body_is_already_streaming() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&body_config(&up, "http1")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nhost: svc\r\nx-body-mode: watch\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    // The first piece passes the filter, so the head goes upstream.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while up.hits() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.hits(),
        1,
        "the request reached the upstream while streaming"
    );
    s.write_all(b"9\r\nforbidden\r\n0\r\n\r\n").await.unwrap();
    // Read until the local reply's body ("no\n") arrived; the connection may stay open.
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !out.ends_with(b"\r\n\r\nno\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("x-denied-by: watch"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_go_through_the_filter_both_ways() {
    let up = Upstream::start("grpc").await;
    let proxy = ProxyProcess::start(&body_config(&up, "http2")).await;
    let client: Client<_, BoxBody<Bytes, Infallible>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client", "1".parse().unwrap());
    let body = BodyExt::boxed(FramesBody::new(vec![
        Frame::data(Bytes::from_static(b"ping")),
        Frame::trailers(trailers),
    ]));
    let req = Request::post(proxy.url("/echo")).body(body).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap()
        .unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let echo: serde_json::Value = serde_json::from_slice(&collected.to_bytes()).unwrap();
    assert_eq!(echo["body"], "ping");
    assert_eq!(echo["trailers"]["x-client"], "1");
    assert_eq!(echo["trailers"]["x-wasm-trailer"], "req", "{echo}");

    // gRPC response trailers: read and extended by the filter.
    let req = Request::post(proxy.url("/grpc"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap();
    let got = send(&h2_client(), req).await.unwrap();
    assert_eq!(got.status, 200);
    let trailers = got.trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-wasm-grpc-status"], "0");
    assert_eq!(trailers["x-wasm-trailer"], "resp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_gets_400_and_reaches_nothing() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&body_config(&up, "http1")).await;
    let raw = raw_request(
        proxy.addr,
        b"POST /echo HTTP/1.1\r\nhost: svc\r\nx-body-mode: upper\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nnot a chunk\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status_of(&raw), 400, "{raw}");
    assert!(raw.contains("bad request body"), "{raw}");
    assert_eq!(up.hits(), 0, "nothing went upstream");
    // The proxy keeps serving.
    let got = send(&h1_client(), post(proxy.url("/echo"), "upper", "ok"))
        .await
        .unwrap();
    assert_eq!(got.echo()["body"], "OK!");
}

/// `compat_body` in front of `up` (over `protocol`), with cluster `scanner` to `scanner`.
fn scan_config(up: &Upstream, scanner: &Upstream, protocol: &str) -> String {
    crate::chain(
        "svc",
        &[crate::filter("body", &guest_filter("compat_body"), "")],
        &[
            crate::cluster("svc", &[up.address()], &format!("protocol: {protocol}")),
            crate::cluster("scanner", &[scanner.address()], ""),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_callback_waits_for_its_callout_and_rewrites_the_held_body() {
    let up = Upstream::start("u").await;
    let scanner = Upstream::start_slow("scanner", Duration::from_millis(200)).await;
    let proxy = ProxyProcess::start(&scan_config(&up, &scanner, "http1")).await;
    for client in [h1_client(), h2_client()] {
        // The body waits for the scanner's answer (200 ms), then goes on as rewritten from
        // the answer's callback: nothing reached the upstream before.
        let got = send(&client, post(proxy.url("/echo"), "scan", "hello body"))
            .await
            .unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.echo()["body"], "[scanned]hello body");
    }
    assert_eq!(scanner.hits(), 2);
    assert_eq!(up.hits(), 2);
    // The scanner refuses: the filter answers instead, and the upstream never sees it.
    let req = Request::post(proxy.url("/echo"))
        .header("x-body-mode", "scan")
        .header("x-scan-status", "403")
        .body(Full::new(Bytes::from_static(b"bad")))
        .unwrap();
    let got = send(&h1_client(), req).await.unwrap();
    assert_eq!(
        (got.status, got.body.as_str()),
        (403, "blocked by scanner\n")
    );
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_waits_for_its_callout() {
    let up = Upstream::start("u").await;
    let scanner = Upstream::start("scanner").await;
    let proxy = ProxyProcess::start(&scan_config(&up, &scanner, "http1")).await;
    let got = send(
        &h1_client(),
        get_with_mode(proxy.url("/echo"), "scan-response"),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.body.starts_with("[scanned]{"), "{got:?}");
    assert_eq!(got.header("content-length"), got.body.len().to_string());
    let req = Request::get(proxy.url("/echo"))
        .header("x-body-mode", "scan-response")
        .header("x-scan-status", "503")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&h1_client(), req).await.unwrap();
    assert_eq!(
        (got.status, got.body.as_str()),
        (502, "blocked by scanner\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailers_callback_waits_for_its_callout() {
    let up = Upstream::start("u").await;
    let scanner = Upstream::start("scanner").await;
    let proxy = ProxyProcess::start(&scan_config(&up, &scanner, "http2")).await;
    let client: Client<_, BoxBody<Bytes, Infallible>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for (status, expect) in [("200", 200), ("403", 403)] {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-client", "1".parse().unwrap());
        let body = BodyExt::boxed(FramesBody::new(vec![
            Frame::data(Bytes::from_static(b"ping")),
            Frame::trailers(trailers),
        ]));
        let req = Request::post(proxy.url("/echo"))
            .header("x-body-mode", "scan-trailers")
            .header("x-scan-status", status)
            .body(body)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .unwrap()
            .unwrap();
        let got_status = resp.status().as_u16();
        let collected = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got_status, expect, "{collected:?}");
        if expect == 200 {
            let echo: serde_json::Value = serde_json::from_slice(&collected).unwrap();
            assert_eq!(echo["body"], "ping");
            assert_eq!(echo["trailers"]["x-wasm-trailer"], "req", "{echo}");
        }
    }
    assert_eq!(scanner.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_never_taken_up_again_ends_at_the_request_timeout() {
    let up = Upstream::start("u").await;
    let scanner = Upstream::start("scanner").await;
    let yaml = scan_config(&up, &scanner, "http1").replace(
        &format!("{{ name: svc, endpoints: [ {{ address: \"{}\" }} ], protocol: http1 }}", up.address()),
        &format!(
            "{{ name: svc, endpoints: [ {{ address: \"{}\" }} ], protocol: http1, request_timeout_ms: 300 }}",
            up.address()
        ),
    );
    assert!(yaml.contains("request_timeout_ms: 300"), "{yaml}");
    let proxy = ProxyProcess::start(&yaml).await;
    // Waiting on a callout it then ignores, or paused at the end of the body with nothing
    // outstanding (as in Envoy, the body stays held: it used to go on).
    for mode in ["scan-ignore", "hold-end"] {
        let t0 = std::time::Instant::now();
        let got = send(&h1_client(), post(proxy.url("/echo"), mode, "held"))
            .await
            .unwrap();
        assert_eq!(got.status, 504, "{mode}: {got:?}");
        assert_eq!(got.body, "body held by a filter past the request timeout\n");
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    }
    assert_eq!(scanner.hits(), 1);
    assert_eq!(up.hits(), 0);
}
