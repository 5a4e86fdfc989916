//! Graceful drain on SIGTERM.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use weft_tests::*;

use crate::{config, eps};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let up = Upstream::start("u").await;
    let mut proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let url = proxy.url("/delay/800");
        tasks.push(tokio::spawn(async move {
            // Half on HTTP/1.1, half on HTTP/2.
            let client = if i % 2 == 0 { h1_client() } else { h2_client() };
            get(&client, &url).await
        }));
    }
    // A connection that has not said anything yet has nothing to finish.
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    proxy.sigterm();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_millis(500), silent.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection is closed at the drain: {read:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Draining: not ready any more, and not accepting.
    assert_eq!(proxy.admin_get("/ready").await.unwrap().0, 503);
    assert!(tokio::net::TcpStream::connect(proxy.addr).await.is_err());

    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap().expect("in-flight request completed");
        assert_eq!(got.status, 200, "{got:?}");
        if i % 2 == 0 {
            assert_eq!(got.header("connection"), "close", "HTTP/1.1 answer closes");
        }
    }
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_cuts_off_stragglers() {
    let up = Upstream::start("u").await;
    let cfg = config("", "", &eps(&[&up])).replace("timeout_ms: 5000", "timeout_ms: 300");
    let mut proxy = ProxyProcess::start(&cfg).await;
    let url = proxy.url("/delay/5000");
    let task = tokio::spawn(async move { get(&h1_client(), &url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    proxy.sigterm();
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(task.await.unwrap().is_err(), "the straggler was cut off");
}
