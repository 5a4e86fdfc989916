//! The standard fault filter (filters/fault, built on weft-sdk) in the real proxy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use weft_tests::*;

fn fault_config(up: &Upstream, config: &str) -> String {
    crate::chain(
        "svc",
        &[crate::filter(
            "fault",
            &standard_filter("weft_filter_fault"),
            config,
        )],
        &[crate::cluster("svc", &[up.address()], "")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborts_hit_their_share_and_header_faults_delay_or_abort() {
    let up = Upstream::start("svc").await;
    let config =
        "{ headers: true, default: { abort: { percent: 20, status: 503, grpc_status: 14 } } }";
    let proxy = Arc::new(ProxyProcess::start(&fault_config(&up, config)).await);
    let client = h2_client();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (client, proxy) = (client.clone(), proxy.clone());
        tasks.push(tokio::spawn(async move {
            let mut aborted = 0;
            for _ in 0..200 {
                let got = get(&client, &proxy.url("/")).await.unwrap();
                match got.status {
                    200 => {}
                    503 => {
                        assert_eq!(got.body, "fault filter abort\n");
                        aborted += 1;
                    }
                    s => panic!("unexpected {s}"),
                }
            }
            aborted
        }));
    }
    let mut aborted = 0;
    for t in tasks {
        aborted += t.await.unwrap();
    }
    assert!(
        (320..=480).contains(&aborted),
        "20% of 2000 ± 4%: {aborted}"
    );
    assert_eq!(
        up.hits(),
        2000 - aborted,
        "aborted requests never reach the upstream"
    );

    // A delay asked by header: the request waits, then goes through.
    let started = Instant::now();
    let req = Request::get(proxy.url("/"))
        .header("x-weft-fault-delay-ms", "300")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&client, req).await.unwrap();
    assert_eq!(got.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    // A gRPC abort by header: a gRPC status, not an HTTP error.
    let req = Request::post(proxy.url("/pkg.Svc/Call"))
        .header("content-type", "application/grpc")
        .header("x-weft-fault-abort-grpc", "14")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&client, req).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.header("grpc-status"), "14");
}
