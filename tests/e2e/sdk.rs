//! A filter built on `weft-sdk` (`examples/filter-template`, built for wasm32-wasip1 with
//! the `filter` profile) in the real proxy: the SDK's own exports and context dispatch —
//! request headers, a callout made from a stream, its answer delivered to that stream among
//! many in flight, a resume or a local reply.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use weft_tests::*;

/// The template with a check against cluster `auth`, in front of cluster `app`.
fn checked(app: &str, auth: &str) -> String {
    crate::chain(
        "app",
        &[crate::filter(
            "template",
            &standard_filter("filter_template"),
            "{ add_header: [x-team, payments], check_cluster: auth, check_timeout_ms: 500 }",
        )],
        &[
            crate::cluster("app", &[app.to_owned()], ""),
            crate::cluster("auth", &[auth.to_owned()], ""),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_filter_waits_for_its_callout_and_acts_on_the_answer() {
    let app = Upstream::start("app").await;
    let auth = Upstream::start("auth").await;
    let proxy = ProxyProcess::start(&checked(&app.address(), &auth.address())).await;
    let client = h1_client();

    // The check answers 200 (the auth server echoes `/items/1`): the request goes on, with
    // the header the filter added.
    let got = get(&client, &proxy.url("/items/1")).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.header("x-upstream"), "app");
    assert_eq!(got.echo()["headers"]["x-team"][0], "payments");
    assert_eq!(auth.hits.load(Ordering::SeqCst), 1, "one check per request");

    // The check answers 401: the filter's own 403, and the app never sees the request.
    let app_before = app.hits.load(Ordering::SeqCst);
    let got = get(&client, &proxy.url("/status/401")).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (403, "denied\n"));
    assert_eq!(app.hits.load(Ordering::SeqCst), app_before);

    // The check takes longer than the filter waits: 503 after about 500 ms.
    let t = Instant::now();
    let got = get(&client, &proxy.url("/delay/3000")).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (503, "no check\n"));
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(app.hits.load(Ordering::SeqCst), app_before);

    // Many streams at once, each waiting on its own callout: every answer reaches the stream
    // that asked (a 401 for one must not deny another).
    let app_before = app.hits.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..60 {
        let (client, path) = if i % 3 == 0 {
            (client.clone(), format!("/status/401?i={i}"))
        } else {
            (client.clone(), format!("/items/{i}"))
        };
        let url = proxy.url(&path);
        tasks.push(tokio::spawn(async move {
            (i, get(&client, &url).await.unwrap())
        }));
    }
    for t in tasks {
        let (i, got) = t.await.unwrap();
        if i % 3 == 0 {
            assert_eq!(got.status, 403, "request {i} is denied");
        } else {
            assert_eq!(got.status, 200, "request {i} passes: {}", got.body);
            assert_eq!(got.echo()["uri"], format!("/items/{i}"));
        }
    }
    assert_eq!(app.hits.load(Ordering::SeqCst) - app_before, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_filter_whose_check_service_is_down_answers_503() {
    let app = Upstream::start("app").await;
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::start(&checked(&app.address(), &dead)).await;
    let client = h1_client();
    for _ in 0..3 {
        let got = get(&client, &proxy.url("/items/1")).await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (503, "no check\n"));
    }
    assert_eq!(app.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_larger_than_the_sdk_scratch_area_reach_the_filter_whole() {
    // The host writes values of up to 1 KiB into the SDK's scratch area and larger ones into
    // memory from the module's allocator: a 3 KB configuration takes the second way, the
    // request's short values the first, and the filter sees both whole.
    let app = Upstream::start("app").await;
    let long: String = (0..3000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let config = crate::chain(
        "app",
        &[crate::filter(
            "template",
            &standard_filter("filter_template"),
            &format!("{{ add_header: [x-team, {long}], require_header: x-pass }}"),
        )],
        &[crate::cluster("app", &[app.address()], "")],
    );
    let proxy = ProxyProcess::start(&config).await;
    let client = h1_client();

    let got = get(&client, &proxy.url("/items/1")).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (403, "missing header\n"));

    let req = http::Request::get(proxy.url("/items/2"))
        .header("x-pass", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&client, req).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.body);
    let echo = got.echo();
    assert_eq!(echo["headers"]["x-team"][0].as_str(), Some(long.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_filter_serves_many_requests_of_every_size_in_little_memory() {
    // The SDK's allocator keeps freed blocks for reuse, by size class, up to 4 KiB, and hands
    // larger ones to dlmalloc. 1,500 requests whose header the filter copies out run from 1
    // byte to 7 KB (every class and past the largest) through an instance capped at 2 MiB of
    // memory, which its stack and data nearly fill: an allocator that never reused a small
    // block ran it out (a memory-limit failure answers 500) at the 597th request.
    let app = Upstream::start("app").await;
    let config = crate::chain(
        "app",
        &[format!(
            "{{ name: template, module: \"{}\", limits: {{ memory_mb: 2 }}, \
             config: {{ add_header: [x-team, payments], require_header: x-pass }} }}",
            standard_filter("filter_template").display()
        )],
        &[crate::cluster("app", &[app.address()], "")],
    );
    let proxy = ProxyProcess::start(&config).await;
    let client = h1_client();

    for i in 0..1500usize {
        let len = 1 + (i * 977) % 7000;
        let value = "p".repeat(len);
        let req = http::Request::get(proxy.url(&format!("/items/{i}")))
            .header("x-pass", value.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let got = send(&client, req).await.unwrap();
        assert_eq!(got.status, 200, "request {i} ({len} bytes): {}", got.body);
        let echo = got.echo();
        assert_eq!(echo["headers"]["x-team"][0].as_str(), Some("payments"));
        assert_eq!(
            echo["headers"]["x-pass"][0].as_str().map(str::len),
            Some(len)
        );
    }
    assert_eq!(app.hits.load(Ordering::SeqCst), 1500);
    let stats = proxy.stats().await;
    let failures: Vec<&str> = stats
        .lines()
        .filter(|l| l.starts_with("weft_filter_failures_total{filter=\"template\""))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
}
