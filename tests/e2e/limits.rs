//! Circuit-breaker limits, timeouts and dead upstreams.

use std::time::{Duration, Instant};

use weft_tests::*;

use crate::{config, eps};

/// `n` concurrent GETs of `path`, each on its own connection; returns the responses.
async fn burst(proxy: &ProxyProcess, path: &str, n: usize) -> Vec<Got> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = proxy.url(path);
        tasks.push(tokio::spawn(async move {
            // Stagger a little so arrival order is the spawn order.
            tokio::time::sleep(Duration::from_millis(i as u64 * 20)).await;
            get(&h1_client(), &url).await.unwrap()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn overloaded(got: &[Got], limit: &str) -> usize {
    got.iter()
        .filter(|g| g.status == 503 && g.header("x-weft-overloaded") == limit)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_overflow_is_503_naming_the_limit() {
    let up = Upstream::start("u").await;
    let cfg = config("", "    limits: { max_requests: 2 }", &eps(&[&up]));
    let proxy = ProxyProcess::start(&cfg).await;
    let got = burst(&proxy, "/delay/600", 6).await;
    let ok = got.iter().filter(|g| g.status == 200).count();
    assert_eq!(ok, 2, "{got:?}");
    assert_eq!(overloaded(&got, "max_requests"), 4, "{got:?}");
    assert!(proxy.stats().await.contains(
        "weft_circuit_breaker_overflows_total{cluster=\"svc\",limit=\"max_requests\"} 4"
    ));
    // Once the burst is over, requests flow again.
    assert_eq!(
        get(&h1_client(), &proxy.url("/")).await.unwrap().status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_requests_wait_for_a_connection_within_their_limit() {
    let up = Upstream::start("u").await;
    let cfg = config(
        "",
        "    connect_timeout_ms: 5000\n    limits: { max_connections: 1, max_pending_requests: 1 }",
        &eps(&[&up]),
    );
    // One worker, so the pending request waits on the same pool the connection returns to.
    let proxy = ProxyProcess::start_with(&cfg, 1).await;
    let got = burst(&proxy, "/delay/400", 4).await;
    let statuses: Vec<u16> = got.iter().map(|g| g.status).collect();
    // First gets the connection, second waits for it, the rest overflow the queue.
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(overloaded(&got, "max_pending_requests"), 2, "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_request_gives_up_after_the_connect_timeout() {
    let up = Upstream::start("u").await;
    let cfg = config(
        "",
        "    connect_timeout_ms: 300\n    limits: { max_connections: 1, max_pending_requests: 10 }",
        &eps(&[&up]),
    );
    let proxy = ProxyProcess::start_with(&cfg, 1).await;
    let got = burst(&proxy, "/delay/1500", 2).await;
    assert_eq!(got[0].status, 200, "{got:?}");
    assert_eq!(overloaded(&got, "max_connections"), 1, "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gets_504_at_the_request_timeout() {
    let up = Upstream::start("u").await;
    let cfg = config("", "    request_timeout_ms: 300", &eps(&[&up]));
    let proxy = ProxyProcess::start(&cfg).await;
    let started = Instant::now();
    let got = get(&h1_client(), &proxy.url("/delay/3000")).await.unwrap();
    assert_eq!(got.status, 504, "{got:?}");
    assert_eq!(got.body, "upstream request timeout\n");
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert!(
        proxy
            .stats()
            .await
            .contains("weft_upstream_request_timeouts_total{cluster=\"svc\"} 1")
    );
    // A fast request on the same proxy is unaffected.
    assert_eq!(
        get(&h1_client(), &proxy.url("/")).await.unwrap().status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_upstream_gets_503_connect_error() {
    let dead = format!("127.0.0.1:{}", free_port());
    let cfg = config("", "    outlier: { consecutive_failures: 0 }", &[(dead, 1)]);
    let proxy = ProxyProcess::start(&cfg).await;
    for _ in 0..3 {
        let got = get(&h1_client(), &proxy.url("/")).await.unwrap();
        assert_eq!(got.status, 503, "{got:?}");
        assert_eq!(got.body, "upstream connect error\n");
    }
    assert!(
        proxy
            .stats()
            .await
            .contains("weft_upstream_connect_failures_total{cluster=\"svc\"} 3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresponsive_endpoint_hits_the_connect_timeout() {
    // A listener that never accepts, with its accept queue filled: the kernel drops further
    // SYNs, so a connect to it hangs, as to a dead host.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let cfg = config(
        "",
        "    connect_timeout_ms: 300\n    outlier: { consecutive_failures: 0 }",
        &[(addr.to_string(), 1)],
    );
    let proxy = ProxyProcess::start(&cfg).await;
    let started = Instant::now();
    let got = get(&h1_client(), &proxy.url("/")).await.unwrap();
    let took = started.elapsed();
    assert_eq!(got.status, 503, "{got:?}");
    assert_eq!(got.body, "upstream connect error\n");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(900),
        "{took:?}"
    );
    drop(fillers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_downstream_connections_are_closed() {
    let up = Upstream::start("u").await;
    let cfg = config("    idle_timeout_ms: 300", "", &eps(&[&up]));
    let proxy = ProxyProcess::start(&cfg).await;
    let started = Instant::now();
    // A connection that never sends anything is closed after the idle timeout.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut s, &mut buf),
    )
    .await
    .expect("closed within 5 s")
    .unwrap_or(0);
    assert_eq!(n, 0);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_request_releases_everything_it_held() {
    let up = Upstream::start("u").await;
    let cfg = config("", "    lb_policy: least_request", &eps(&[&up]));
    let proxy = ProxyProcess::start(&cfg).await;
    // Three clients send a slow request and hang up before the answer.
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /delay/800 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = proxy.stats().await;
    assert!(
        stats.contains("weft_downstream_requests_active{listener=\"ingress\"} 0"),
        "{stats}"
    );
    assert!(
        stats.contains("weft_upstream_requests_active{cluster=\"svc\"} 0"),
        "{stats}"
    );
    let clusters = proxy.clusters().await;
    assert_eq!(
        clusters["clusters"][0]["endpoints"][0]["active_requests"], 0,
        "{clusters}"
    );
}
