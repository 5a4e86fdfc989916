//! Requests the client gives up on give back everything they took: a cluster's connection,
//! pending and request slots and an endpoint's active count are released when the request is
//! dropped at any await — while connecting, queued for a connection, waiting for the
//! response, or waiting for a filter's callout — and new requests are admitted afterwards.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use weft_tests::*;

use crate::{chain, cluster, config, eps, filter};

/// A listening socket whose accept queue is full, so that connects to its port hang (the
/// kernel drops their SYNs) until the connector gives up: an endpoint that cannot be reached
/// and does not refuse.
struct Blackhole {
    _listener: Socket,
    _queued: Vec<std::net::TcpStream>,
}

impl Blackhole {
    fn at(addr: SocketAddr) -> Blackhole {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        listener.set_reuse_address(true).unwrap();
        // The killed upstream lets go of the port a moment after `kill`.
        let deadline = Instant::now() + Duration::from_secs(3);
        while let Err(e) = listener.bind(&addr.into()) {
            assert!(Instant::now() < deadline, "bind {addr}: {e}");
            std::thread::sleep(Duration::from_millis(20));
        }
        listener.listen(0).unwrap();
        // With a backlog of 0 the kernel still queues one connection: fill the queue.
        let mut queued = Vec::new();
        for _ in 0..3 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => queued.push(s),
                Err(_) => break,
            }
        }
        // The premise of the tests: one more connect hangs.
        assert!(
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
            "a connect to the full accept queue should hang"
        );
        Blackhole {
            _listener: listener,
            _queued: queued,
        }
    }
}

/// `/clusters` counts of cluster `name`: (open connections, pending, active, the first
/// endpoint's active requests).
async fn counts(proxy: &ProxyProcess, name: &str) -> (u64, u64, u64, u64) {
    let clusters = proxy.clusters().await;
    let c = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone();
    (
        c["open_connections"].as_u64().unwrap(),
        c["pending_requests"].as_u64().unwrap(),
        c["active_requests"].as_u64().unwrap(),
        c["endpoints"][0]["active_requests"].as_u64().unwrap(),
    )
}

/// Waits (at most 3 s) until cluster `name` holds nothing; returns the last counts.
async fn settled(proxy: &ProxyProcess, name: &str) -> (u64, u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let c = counts(proxy, name).await;
        if c == (0, 0, 0, 0) || Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` GETs of `path` over one HTTP/2 connection, each abandoned after `after` (the client
/// resets the stream); returns how many were answered before that.
async fn abandon(proxy: &ProxyProcess, path: &str, n: usize, after: Duration) -> usize {
    let client = h2_client();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, url) = (client.clone(), proxy.url(path));
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(after, get(&client, &url)).await
        }));
    }
    let mut answered = 0;
    for t in tasks {
        if let Ok(Ok(got)) = t.await.unwrap() {
            // Only the proxy's own overflow answers can come back this fast.
            assert_eq!(got.status, 503, "{got:?}");
            answered += 1;
        }
    }
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_abandoned_while_connecting_or_queued_release_their_slots() {
    let mut up = Upstream::start("svc").await;
    up.kill();
    let hole = Blackhole::at(up.addr);
    let cfg = config(
        "",
        "    connect_timeout_ms: 10000\n    limits: { max_connections: 4, max_pending_requests: 4 }",
        &eps(&[&up]),
    );
    let proxy = ProxyProcess::start(&cfg).await;

    // 4 requests connect (and hang), 4 wait as pending, the rest overflow at once; then the
    // client resets every stream still open.
    let answered = abandon(&proxy, "/", 24, Duration::from_millis(400)).await;
    assert_eq!(
        answered, 16,
        "only the requests over both limits were answered"
    );
    assert_eq!(
        settled(&proxy, "svc").await,
        (0, 0, 0, 0),
        "abandoned requests hold no connection, pending or request slot"
    );

    // The endpoint recovers: every new request is admitted and answered.
    drop(hole);
    up.restart().await;
    for _ in 0..12 {
        let got = tokio::time::timeout(Duration::from_secs(3), get(&h1_client(), &proxy.url("/")))
            .await
            .expect("answered in time")
            .unwrap();
        assert_eq!(got.status, 200, "{got:?}");
    }
    assert_eq!(settled(&proxy, "svc").await.1, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_abandoned_while_waiting_for_the_response_release_their_counts() {
    let up = Upstream::start_slow("svc", Duration::from_secs(3)).await;
    let cfg = config("", "    limits: { max_requests: 6 }", &eps(&[&up]));
    let proxy = ProxyProcess::start(&cfg).await;
    assert_eq!(abandon(&proxy, "/", 6, Duration::from_millis(300)).await, 0);
    // Released when the streams are reset, not when the upstream would have answered.
    let (_, pending, active, endpoint_active) = settled(&proxy, "svc").await;
    assert_eq!((pending, active, endpoint_active), (0, 0, 0));
    // All six request slots are free again.
    let answered = abandon(&proxy, "/", 6, Duration::from_millis(300)).await;
    assert_eq!(answered, 0, "no request was refused by max_requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_abandoned_during_a_filter_callout_release_the_callout_counts() {
    let svc = Upstream::start("svc").await;
    let auth = Upstream::start_slow("auth", Duration::from_secs(3)).await;
    let yaml = chain(
        "svc",
        &[filter("authz", &guest_filter("compat_callout"), "auth")],
        &[
            cluster("svc", &[svc.address()], ""),
            cluster("auth", &[auth.address()], "limits: { max_requests: 4 }"),
        ],
    );
    let proxy = ProxyProcess::start(&yaml).await;
    assert_eq!(
        abandon(&proxy, "/orders", 4, Duration::from_millis(400)).await,
        0
    );
    let c = settled(&proxy, "auth").await;
    assert_eq!(
        (c.1, c.2, c.3),
        (0, 0, 0),
        "the callouts' request slots and endpoint counts are released"
    );
    assert_eq!(settled(&proxy, "svc").await, (0, 0, 0, 0));
    // The auth cluster admits callouts again (4 would overflow if any slot had leaked).
    assert_eq!(
        abandon(&proxy, "/orders", 4, Duration::from_millis(400)).await,
        0
    );
    assert_eq!(auth.hits(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_closes_its_connection_mid_request_cancels_it() {
    // Three HTTP/1.1 GETs on connections of their own (served by the inline server), each
    // closed by its client 300 ms in, while the upstream takes 3 s to answer.
    let up = Upstream::start_slow("svc", Duration::from_secs(3)).await;
    let cfg = config("", "", &eps(&[&up]));
    let proxy = ProxyProcess::start(&cfg).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let req = format!("GET /slow/{i} HTTP/1.1\r\nhost: svc\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
            .await
            .unwrap();
        clients.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, _, active, _) = counts(&proxy, "svc").await;
    assert_eq!(active, 3, "the requests did not reach the cluster");
    let left = Instant::now();
    drop(clients);
    // Released when the clients leave, not when the upstream would have answered.
    let (_, pending, active, endpoint_active) = settled(&proxy, "svc").await;
    assert_eq!((pending, active, endpoint_active), (0, 0, 0));
    assert!(
        left.elapsed() < Duration::from_secs(2),
        "released only after {:?}",
        left.elapsed()
    );
}
