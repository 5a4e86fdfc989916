//! The inline HTTP/1.1 upstream codec (`proxy/core/src/upstream/h1.rs`) against a scripted
//! upstream that writes exact bytes: every response framing reaches the client whole, kept-
//! alive connections are reused, bad responses are 502 (or a cut stream) and nothing else
//! breaks, and a pooled connection the upstream dropped is replaced for a request that may be
//! replayed, never for one that may not.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_tests::*;

use crate::config;

/// What the scripted upstream does with a request, by its path.
fn script(path: &str) -> Option<&'static [u8]> {
    Some(match path {
        "/len" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-way: len\r\n\r\nhello",
        // Hop-by-hop fields, one named by `connection`.
        "/hop" => {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive, x-up-secret\r\nx-up-secret: s\r\nkeep-alive: timeout=5\r\nx-kept: yes\r\n\r\nok"
        }
        "/persist" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nConnection: Keep-Alive\r\n\r\nok",
        // Kept alive, then closed by the upstream 200 ms later.
        "/then-close" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        "/chunked" => {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nx-trailer: t\r\n\r\n"
        }
        "/hints" => {
            b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        }
        "/te-and-cl" => {
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nte\r\n0\r\n\r\n"
        }
        "/eof" => b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
        "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
        "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n",
        "/big" => b"HTTP/1.1 200 OK\r\ncontent-length: 300000\r\n\r\n",
        "/garbage" => b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        "/two-lengths" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        "/unasked-101" => b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        "/bad-chunk" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
        "/short" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this",
        // Answers nothing and closes.
        "/hang-up" => b"",
        _ => return None,
    })
}

/// A raw HTTP/1.1 upstream that answers by [`script`], counting the connections it accepted.
/// A connection is closed after `/eof`, `/short`, `/hang-up`, a bad response, or when a
/// request arrives on a connection that already carried `drop_after` requests (without an
/// answer: as an upstream that timed the idle connection out just then).
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl Scripted {
    async fn start(drop_after: usize) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, SeqCst);
                tokio::spawn(serve(s, drop_after));
            }
        });
        Scripted { addr, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(SeqCst)
    }
}

async fn serve(mut s: TcpStream, drop_after: usize) {
    let mut buf = Vec::new();
    let mut served = 0;
    loop {
        let Some(end) = find(&buf, b"\r\n\r\n") else {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        if served == drop_after {
            return;
        }
        served += 1;
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        let Some(answer) = script(&path) else {
            let body = format!("{head}\r\n");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            continue;
        };
        if s.write_all(answer).await.is_err() {
            return;
        }
        if path == "/big" {
            let _ = s.write_all(&vec![b'x'; 300_000]).await;
        }
        if path == "/then-close" {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        if matches!(
            path.as_str(),
            "/eof"
                | "/short"
                | "/hang-up"
                | "/garbage"
                | "/two-lengths"
                | "/unasked-101"
                | "/bad-chunk"
                | "/te-and-cl"
        ) {
            return;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn endpoint(up: &Scripted) -> Vec<(String, u32)> {
    vec![(up.addr.to_string(), 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_response_framing_reaches_the_client_whole() {
    let up = Scripted::start(usize::MAX).await;
    let proxy = ProxyProcess::start_with(&config("", "", &endpoint(&up)), 1).await;
    for (downstream, client) in [("h1", h1_client()), ("h2", h2_client())] {
        let got = get(&client, &proxy.url("/len")).await.unwrap();
        assert_eq!(
            (got.status, got.body.as_str()),
            (200, "hello"),
            "{downstream}"
        );
        assert_eq!(got.header("x-way"), "len");

        let got = get(&client, &proxy.url("/chunked")).await.unwrap();
        assert_eq!(
            (got.status, got.body.as_str()),
            (200, "abcdefg"),
            "{downstream}"
        );
        if downstream == "h2" {
            // HTTP/2 carries the upstream's trailers on.
            let trailers = got.trailers.expect("trailers over h2");
            assert_eq!(trailers["x-trailer"], "t");
        }

        let got = get(&client, &proxy.url("/hints")).await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, "ok"), "{downstream}");

        // transfer-encoding wins over content-length, which is not passed on.
        let got = get(&client, &proxy.url("/te-and-cl")).await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, "te"), "{downstream}");
        assert!(got.headers.get("content-length").is_none_or(|v| v == "2"));

        let got = get(&client, &proxy.url("/eof")).await.unwrap();
        assert_eq!(
            (got.status, got.body.as_str()),
            (200, "until the end"),
            "{downstream}"
        );

        let got = get(&client, &proxy.url("/empty")).await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (204, ""), "{downstream}");

        let req = Request::head(proxy.url("/head"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let got = send(&client, req).await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, ""), "{downstream}");
        assert_eq!(got.header("content-length"), "7", "{downstream}");

        let got = get(&client, &proxy.url("/big")).await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.body.len(), 300_000, "{downstream}");
        assert!(got.body.bytes().all(|b| b == b'x'));

        // The request head arrives as sent, with the proxy's headers.
        let req = Request::delete(proxy.url("/echo?a=1"))
            .header("x-custom", "v1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let got = send(&client, req).await.unwrap();
        assert_eq!(got.status, 200);
        assert!(
            got.body.starts_with("DELETE /echo?a=1 HTTP/1.1\r\n"),
            "{}",
            got.body
        );
        assert!(got.body.contains("\r\nx-custom: v1\r\n"), "{}", got.body);
        assert!(
            got.body.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"),
            "{}",
            got.body
        );
    }

    // Kept-alive responses leave their connection in the pool: twenty more requests of
    // every kept-alive framing open no new connection.
    let client = h1_client();
    get(&client, &proxy.url("/len")).await.unwrap();
    let before = up.connections();
    for i in 0..20 {
        let path = ["/len", "/chunked", "/hints", "/empty", "/big"][i % 5];
        let got = get(&client, &proxy.url(path)).await.unwrap();
        assert_eq!(got.status, if path == "/empty" { 204 } else { 200 });
    }
    assert_eq!(
        up.connections(),
        before,
        "a kept-alive connection was not reused"
    );
    // An HTTP/1.0 client's request goes on as HTTP/1.1 (as Envoy sends it), on the pooled
    // connection.
    let before = up.connections();
    let raw = raw_request(proxy.addr, b"GET /echo HTTP/1.0\r\nhost: svc\r\n\r\n")
        .await
        .unwrap();
    assert!(raw.starts_with("HTTP/1.0 200 OK\r\n"), "{raw}");
    assert!(raw.contains("GET /echo HTTP/1.1\r\n"), "{raw}");
    assert_eq!(
        up.connections(),
        before,
        "a kept-alive connection was not reused"
    );
    // A request with a body goes through hyper's client, on the same pool.
    let req = Request::post(proxy.url("/echo"))
        .body(Full::new(Bytes::from("payload")))
        .unwrap();
    let got = send(&client, req).await.unwrap();
    assert!(got.body.starts_with("POST /echo HTTP/1.1"), "{}", got.body);
    assert!(got.body.contains("content-length: 7"), "{}", got.body);
    let got = get(&client, &proxy.url("/len")).await.unwrap();
    assert_eq!(got.body, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upstream_responses_are_502_and_the_proxy_keeps_serving() {
    let up = Scripted::start(usize::MAX).await;
    let proxy = ProxyProcess::start_with(&config("", "", &endpoint(&up)), 1).await;
    let client = h1_client();
    for path in ["/garbage", "/two-lengths", "/unasked-101", "/hang-up"] {
        let got = get(&client, &proxy.url(path)).await.unwrap();
        assert_eq!(got.status, 502, "{path}: {got:?}");
        assert_eq!(got.body, "upstream reset\n", "{path}");
        let got = get(&client, &proxy.url("/len")).await.unwrap();
        assert_eq!(
            (got.status, got.body.as_str()),
            (200, "hello"),
            "after {path}"
        );
    }
    // A body that breaks its framing, or ends early, cuts the client's stream: the client
    // never takes a part for the whole.
    for path in ["/bad-chunk", "/short"] {
        let got = get(&client, &proxy.url(path)).await;
        assert!(got.is_err(), "{path}: a cut body read as whole: {got:?}");
        let got = get(&client, &proxy.url("/len")).await.unwrap();
        assert_eq!(
            (got.status, got.body.as_str()),
            (200, "hello"),
            "after {path}"
        );
    }
    let stats = proxy.stats().await;
    assert!(
        metric_value(&stats, "weft_upstream_resets_total{cluster=\"svc\"}").unwrap_or(0.0) >= 4.0,
        "resets not counted: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_dropped_is_replaced_for_a_replayable_request() {
    // Every connection carries one request; the upstream reads the second and closes
    // without answering, as one that timed the connection out at that moment.
    let up = Scripted::start(1).await;
    let proxy = ProxyProcess::start_with(&config("", "", &endpoint(&up)), 1).await;
    let client = h1_client();
    for i in 0..5 {
        let got = get(&client, &proxy.url("/len")).await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, "hello"), "GET {i}");
    }
    // A POST with an empty body may not be sent twice: the upstream may have acted on it.
    let req = Request::post(proxy.url("/len"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&client, req).await.unwrap();
    assert_eq!(got.status, 502, "a POST was replayed: {got:?}");
    let stats = proxy.stats().await;
    assert_eq!(
        metric_value(&stats, "weft_upstream_resets_total{cluster=\"svc\"}"),
        Some(1.0),
        "only the POST failed: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_the_upstream_closed_gives_its_slot_back_without_a_request() {
    let up = Scripted::start(usize::MAX).await;
    let proxy = ProxyProcess::start_with(&config("", "", &endpoint(&up)), 1).await;
    let client = h1_client();
    let got = get(&client, &proxy.url("/then-close")).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (200, "ok"));
    let active = |stats: &str| {
        metric_value(stats, "weft_upstream_connections_active{cluster=\"svc\"}").unwrap_or(-1.0)
    };
    // Nothing reads an idle inline connection; the worker's sweep sees the close (within a
    // second or two) and lets the connection and its `max_connections` slot go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stats = proxy.stats().await;
        if active(&stats) == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed idle connection is still counted: {}",
            active(&stats)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = get(&client, &proxy.url("/len")).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (200, "hello"));
    assert_eq!(up.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_field_is_hop_by_hop_and_its_connection_is_kept() {
    // `connection` from the upstream never reaches the client, nor what it names, nor
    // `keep-alive`; a `keep-alive` answer keeps the upstream connection for the next request.
    let up = Scripted::start(usize::MAX).await;
    let proxy = ProxyProcess::start_with(&config("", "", &endpoint(&up)), 1).await;
    let client = h1_client();
    for path in ["/persist", "/hop", "/persist", "/hop"] {
        let got = get(&client, &proxy.url(path)).await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, "ok"), "{path}");
        for gone in ["connection", "x-up-secret", "keep-alive"] {
            assert!(
                got.headers.get(gone).is_none(),
                "{path}: {gone} reached the client"
            );
        }
        if path == "/hop" {
            assert_eq!(got.header("x-kept"), "yes");
        }
    }
    assert_eq!(up.connections(), 1, "one upstream connection for all four");
}
