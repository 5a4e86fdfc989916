//! What a hostile or broken client does to the front door: slow heads (slowloris) over
//! HTTP/1.1 and HTTP/2, silent connections.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_tests::*;

use crate::{config, eps};

/// Reads and drops what `s` receives until the peer closes it; how long that took, or `None`
/// if it is still open after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// An HTTP/2 frame on stream `stream`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_at_the_request_headers_timeout() {
    let up = Upstream::start("u").await;
    let cfg = config("    request_headers_timeout_ms: 600", "", &eps(&[&up]));
    let proxy = ProxyProcess::start(&cfg).await;

    // HTTP/1.1 slowloris: a head that never ends, a byte every 100 ms. Before the timeout it
    // would be held until the idle timeout (an hour by default).
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let mut cut = None;
    for _ in 0..50 {
        if slow.write_all(b"a").await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
        if let Some(after) = closed_within(&mut slow, Duration::from_millis(100)).await {
            cut = Some(started.elapsed().max(after));
            break;
        }
    }
    let cut = cut.expect("the dribbling client was never cut (5 s)");
    assert!(
        cut >= Duration::from_millis(500) && cut < Duration::from_secs(3),
        "cut after {cut:?}"
    );

    // A connection that sends nothing at all: its first head is due from the accept.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let after = closed_within(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent connection is closed");
    assert!(after >= Duration::from_millis(500), "{after:?}");

    // HTTP/2: a header block that never ends (HEADERS without END_HEADERS).
    let mut h2 = TcpStream::connect(proxy.addr).await.unwrap();
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
    bytes.extend(h2_frame(0x1, 0x1, 1, &[0x82, 0x86])); // HEADERS, END_STREAM only
    h2.write_all(&bytes).await.unwrap();
    let after = closed_within(&mut h2, Duration::from_secs(5))
        .await
        .expect("an unfinished HTTP/2 header block is cut");
    assert!(after >= Duration::from_millis(400), "{after:?}");

    // Idle is not slow: an HTTP/2 connection that only said hello, and an HTTP/1.1
    // keep-alive connection after a whole request, both outlive the timeout.
    let mut idle_h2 = TcpStream::connect(proxy.addr).await.unwrap();
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(h2_frame(0x4, 0, 0, &[]));
    idle_h2.write_all(&hello).await.unwrap();
    let client = h1_client();
    assert_eq!(get(&client, &proxy.url("/a")).await.unwrap().status, 200);
    assert_eq!(
        closed_within(&mut idle_h2, Duration::from_millis(1500)).await,
        None,
        "an idle HTTP/2 connection was closed"
    );
    // The same pooled connection serves the next request.
    assert_eq!(get(&client, &proxy.url("/b")).await.unwrap().status, 200);

    let stats = proxy.stats().await;
    // slow, silent, h2, idle_h2 and the keep-alive client's one connection.
    assert_eq!(
        metric_value(
            &stats,
            "weft_downstream_connections_total{listener=\"ingress\"}"
        ),
        Some(5.0),
        "{stats}"
    );
    assert_eq!(
        metric_value(
            &stats,
            "weft_downstream_request_headers_timeouts_total{listener=\"ingress\"}"
        ),
        Some(3.0),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_after_its_request_cap() {
    let up = Upstream::start("u").await;
    let cfg = config(
        "    max_requests_per_connection: 5\n    max_requests_per_http2_connection: 5",
        "",
        &eps(&[&up]),
    );
    let proxy = ProxyProcess::start(&cfg).await;
    // HTTP/1.1, on one connection: the fifth response says `connection: close`, and the
    // connection ends there.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut seen = Vec::new();
    for i in 1..=5 {
        s.write_all(format!("GET /{i} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_until(&mut s, &mut seen, &format!("\"/{i}\"")).await;
    }
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert_eq!(text.matches("http/1.1 200").count(), 5, "{text}");
    let last = text.rfind("http/1.1 200").unwrap();
    assert!(text[last..].contains("connection: close"), "{text}");
    assert!(!text[..last].contains("connection: close"), "{text}");
    let _ = s.write_all(b"GET /6 HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(
        closed_within(&mut s, Duration::from_secs(2))
            .await
            .is_some(),
        "the connection outlived its cap"
    );
    // HTTP/2: GOAWAY after the fifth stream; a client carries on over a new connection.
    let h2 = h2_client();
    for i in 1..=10 {
        assert_eq!(
            get(&h2, &proxy.url("/")).await.unwrap().status,
            200,
            "h2 request {i}"
        );
    }
    let stats = proxy.stats().await;
    assert_eq!(
        metric_value(
            &stats,
            "weft_downstream_connections_total{listener=\"ingress\"}"
        ),
        Some(3.0),
        "one HTTP/1.1 connection, two HTTP/2 ones: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_its_streams_right_away_is_cut_off() {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    // The upstream takes a while, so every stream is still waiting when its client resets
    // it: HTTP/2 "rapid reset", slowed down to get past the codec's own guard (5 ms between
    // HEADERS and RST_STREAM).
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    for _ in 0..2000 {
        if sender.ready().await.is_err() {
            break;
        }
        let req = http::Request::get(proxy.url("/delay/300"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let pending = sender.send_request(req);
        sent += 1;
        // Dropping the response future resets the stream (RST_STREAM, CANCEL).
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(5), pending).await {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        sent < 200,
        "{sent} streams before the proxy closed the connection"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    eprintln!(
        "rapid reset: {sent} streams sent, {} reached the upstream",
        up.hits()
    );
    assert!(
        up.hits() < 150,
        "{} requests reached the upstream",
        up.hits()
    );
    let stats = proxy.stats().await;
    assert_eq!(
        metric_value(
            &stats,
            "weft_downstream_premature_reset_closes_total{listener=\"ingress\"}"
        ),
        Some(1.0),
        "{stats}"
    );
    // An honest client on its own connection is served.
    assert_eq!(
        get(&h2_client(), &proxy.url("/")).await.unwrap().status,
        200
    );
}

/// An upstream that answers its first request with a head and 5 of the 100 body bytes it
/// announced, then says nothing more (the connection stays open).
async fn stalling_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..4 {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut seen = Vec::new();
            read_until(&mut s, &mut seen, "\r\n\r\n").await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello")
                .await;
            held.push(s);
        }
        std::future::pending::<()>().await;
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_stall_are_ended_at_the_stream_idle_timeout() {
    // An upstream that stalls after its head used to hold the client forever.
    let (stalling, task) = stalling_upstream().await;
    let cfg = config(
        "    stream_idle_timeout_ms: 500",
        "",
        &[(stalling.to_string(), 1)],
    );
    let proxy = ProxyProcess::start(&cfg).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut seen, "hello").await;
    let after = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("the stalled response was never ended");
    assert!(after >= Duration::from_millis(400), "{after:?}");
    task.abort();

    // A client that stalls mid-upload: with no request timeout to end it, only the idle
    // timeout does (the upstream waits for the whole body).
    let up = Upstream::start("u").await;
    let cfg = config(
        "    stream_idle_timeout_ms: 500",
        "    request_timeout_ms: 0",
        &eps(&[&up]),
    );
    let proxy2 = ProxyProcess::start(&cfg).await;
    let mut s = TcpStream::connect(proxy2.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\nhello")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
        .await
        .expect("the stalled upload was never ended")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 5"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(400));

    // A chunked upload whose first chunk never comes: 408, nothing forwarded.
    let hits = up.hits();
    let mut s = TcpStream::connect(proxy2.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut seen, "\r\n\r\n").await;
    assert!(
        seen.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(up.hits(), hits);

    for (p, ended) in [(&proxy, 1.0), (&proxy2, 2.0)] {
        let stats = p.stats().await;
        assert_eq!(
            metric_value(
                &stats,
                "weft_stream_idle_timeouts_total{listener=\"ingress\"}"
            ),
            Some(ended),
            "{stats}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_counted_idled_out_and_drained() {
    let up = Upstream::start("ws").await;
    let cfg = config("    stream_idle_timeout_ms: 700", "", &eps(&[&up]))
        .replace("drain: { timeout_ms: 5000 }", "drain: { timeout_ms: 1500 }");
    let mut proxy = ProxyProcess::start(&cfg).await;
    let open = |proxy: &ProxyProcess| {
        let addr = proxy.addr;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /ws HTTP/1.1\r\nhost: svc\r\nconnection: upgrade\r\nupgrade: weft-echo\r\n\r\n")
                .await
                .unwrap();
            let mut seen = Vec::new();
            read_until(&mut s, &mut seen, "\r\n\r\n").await;
            assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 101"));
            s
        }
    };
    // An idle tunnel is closed at the stream idle timeout; a busy one is not.
    let mut idle = open(&proxy).await;
    let mut busy = open(&proxy).await;
    let stats = proxy.stats().await;
    assert_eq!(
        metric_value(
            &stats,
            "weft_downstream_tunnels_active{listener=\"ingress\"}"
        ),
        Some(2.0),
        "{stats}"
    );
    for i in 0..6 {
        let msg = format!("ping{i}");
        busy.write_all(msg.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        read_until(&mut busy, &mut got, &msg).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        closed_within(&mut idle, Duration::from_millis(100))
            .await
            .is_some(),
        "the idle tunnel is still open"
    );
    let stats = proxy.stats().await;
    assert_eq!(
        metric_value(
            &stats,
            "weft_downstream_tunnels_active{listener=\"ingress\"}"
        ),
        Some(1.0),
        "{stats}"
    );
    assert_eq!(
        metric_value(
            &stats,
            "weft_downstream_tunnels_total{listener=\"ingress\"}"
        ),
        Some(2.0),
        "{stats}"
    );
    // The open tunnel counts as one of the cluster's connections.
    assert_eq!(proxy.clusters().await["clusters"][0]["open_connections"], 1);

    // SIGTERM: the tunnel keeps working through the drain (1.5 s), and is closed at its
    // deadline. (Each message is within the idle timeout of the one before.)
    busy.write_all(b"before").await.unwrap();
    read_until(&mut busy, &mut Vec::new(), "before").await;
    proxy.sigterm();
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let msg = format!("draining{i}");
        busy.write_all(msg.as_bytes()).await.unwrap();
        read_until(&mut busy, &mut Vec::new(), &msg).await;
    }
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        closed_within(&mut busy, Duration::from_secs(1))
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_connection_flood_the_proxy_sheds_and_keeps_serving() {
    let up = Upstream::start("u").await;
    let cfg = config("", "", &eps(&[&up])).replace(
        "drain: { timeout_ms: 5000 }",
        "drain: { timeout_ms: 5000 }\noverload: { max_connections: 20, keepalive_off_percent: 50 }",
    );
    let proxy = ProxyProcess::start(&cfg).await;
    let stat = |stats: &str, name: &str| metric_value(stats, name).unwrap_or(-1.0);

    // Half the budget held by idle connections: keep-alive goes off, responses close.
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = get(&h1_client(), &proxy.url("/")).await.unwrap();
    assert_eq!((got.status, got.header("connection")), (200, "close"));

    // A flood of idle connections, five times the budget (the usual file limit attack):
    // past the budget new ones are shed at once, and the idle ones are closed after a second
    // (the idle timeout while shedding), so clients with work get through.
    for i in 0..100 {
        if let Ok(mut s) = TcpStream::connect(proxy.addr).await {
            // Half of them start a head and stop (a graceful close would wait for it).
            if i % 2 == 0 {
                let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n").await;
            }
            idle.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut ok = 0;
    for _ in 0..20 {
        if let Ok(got) = get(&h1_client(), &proxy.url("/")).await
            && got.status == 200
        {
            ok += 1;
        }
    }
    assert_eq!(ok, 20, "legitimate requests under the flood");
    let mut closed = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(50)).await.is_some() {
            closed += 1;
        }
    }
    assert!(
        closed >= 90,
        "only {closed} of {} idle connections closed",
        idle.len()
    );
    let stats = proxy.stats().await;
    assert!(
        stat(&stats, "weft_overload_shed_connections_total") >= 1.0,
        "{stats}"
    );
    drop(idle);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = proxy.stats().await;
    assert_eq!(
        stat(&stats, "weft_overload_level"),
        0.0,
        "back to normal: {stats}"
    );

    // Connections with work in flight are not shed; one more past the budget is.
    let active = "weft_downstream_connections_active{listener=\"ingress\"}";
    let settled = |want: f64| {
        let proxy = &proxy;
        async move {
            for _ in 0..150 {
                if stat(&proxy.stats().await, active) == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("{active} never reached {want}");
        }
    };
    settled(0.0).await;
    let mut busy = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /delay/1500 HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        busy.push(s);
    }
    settled(20.0).await;
    let mut extra = TcpStream::connect(proxy.addr).await.unwrap();
    let after = closed_within(&mut extra, Duration::from_millis(500)).await;
    assert!(after.is_some(), "the connection past the budget was kept");
    for s in &mut busy {
        let mut seen = Vec::new();
        read_until(s, &mut seen, "HTTP/1.1 200").await;
    }
}

/// The proxy's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_cost_only_their_accept_until_they_speak() {
    let up = Upstream::start("svc").await;
    let proxy = ProxyProcess::start_with(&config("", "", &eps(&[&up])), 1).await;
    // Warm: the worker's first request allocates what every later one reuses.
    raw_request(
        proxy.addr,
        b"GET /warm HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(proxy.pid());
    let mut silent = Vec::new();
    for _ in 0..400 {
        silent.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_conn = (rss_kib(proxy.pid()).saturating_sub(before) * 1024) / 400;
    // An accept task and its socket are a few KB; the HTTP server's state (a request's
    // future, read buffers) is over 10 KB, and must wait for the first bytes.
    assert!(per_conn < 6 * 1024, "{per_conn} bytes a silent connection");
    // They are served once they speak.
    for s in silent.iter_mut().take(5) {
        s.write_all(b"GET /late HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(closed_within(s, Duration::from_secs(5)).await.is_some());
    }
    assert_eq!(up.hits(), 6);
}
