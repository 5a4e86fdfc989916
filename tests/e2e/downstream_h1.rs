//! The inline HTTP/1.1 server (`proxy/core/src/downstream/h1.rs`): requests without a body
//! are served by the connection's own task until one needs hyper's server, which then takes
//! the connection from that request's head on. Pipelined requests survive the hand-off in
//! order, and the framing scanner judges the handed-off heads as before (a request with both
//! `content-length` and `transfer-encoding` is refused, never forwarded).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_tests::*;

use crate::{config, eps};

/// Writes `bytes` on a new connection to `proxy` and reads until the proxy closes it.
async fn exchange(proxy: &ProxyProcess, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the proxy closed the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_across_the_hand_off_to_hyper() {
    let up = Upstream::start("svc").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    // Sent in one write: two served inline, a POST with a body (hyper's from here on, with
    // what followed it already read), and a last GET that closes the connection.
    let out = exchange(
        &proxy,
        b"GET /one HTTP/1.1\r\nhost: svc\r\n\r\n\
          HEAD /two HTTP/1.1\r\nhost: svc\r\n\r\n\
          POST /three HTTP/1.1\r\nhost: svc\r\ncontent-length: 7\r\n\r\npayload\
          GET /four HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 4, "{out}");
    let at = |needle: &str| {
        out.find(needle)
            .unwrap_or_else(|| panic!("no {needle} in {out}"))
    };
    assert!(at("\"/one\"") < at("\"/three\""), "{out}");
    assert!(at("\"/three\"") < at("\"/four\""), "{out}");
    assert!(
        !out.contains("\"/two\""),
        "a HEAD response carried a body: {out}"
    );
    assert!(out.contains("payload"), "the POST body was lost: {out}");
    // Every answer has a date; the last says it closes.
    assert_eq!(out.matches("\r\ndate: ").count(), 4, "{out}");
    let last = &out[at("\"/three\"")..];
    assert!(last.contains("\r\nconnection: close\r\n"), "{out}");
    assert_eq!(up.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_after_requests_served_inline_is_refused_and_never_forwarded() {
    let up = Upstream::start("svc").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    // Two requests served inline, then one carrying both content-length and
    // transfer-encoding: hyper and the framing scanner take over at its head.
    let out = exchange(
        &proxy,
        b"GET /a HTTP/1.1\r\nhost: svc\r\n\r\n\
          GET /b HTTP/1.1\r\nhost: svc\r\n\r\n\
          POST /smuggle HTTP/1.1\r\nhost: svc\r\ncontent-length: 4\r\n\
          transfer-encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /hidden HTTP/1.1\r\nhost: svc\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
    assert!(out.contains("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert!(
        !out.contains("/smuggle") && !out.contains("/hidden"),
        "{out}"
    );
    assert_eq!(
        up.hits(),
        2,
        "the ambiguous request (or what followed) went upstream"
    );
    // The same on a connection's first request (hyper from the start).
    let out = exchange(
        &proxy,
        b"POST /smuggle HTTP/1.1\r\nhost: svc\r\ncontent-length: 4\r\n\
          transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_dribbled_after_requests_served_inline_is_cut_at_the_request_headers_timeout() {
    let up = Upstream::start("svc").await;
    let cfg = config("    request_headers_timeout_ms: 600", "", &eps(&[&up]));
    let proxy = ProxyProcess::start(&cfg).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: svc\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut seen, "\"/a\"").await;
    // The next head, a few bytes every 200 ms: cut 600 ms after its first byte.
    let started = std::time::Instant::now();
    let mut cut = false;
    for piece in [
        "GET /b HT",
        "TP/1.1\r\n",
        "host: s",
        "vc\r\n",
        "x-a: 1\r\n",
        "x-b: 2\r\n",
    ] {
        if s.write_all(piece.as_bytes()).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        cut || matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "the connection stayed open"
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains("\"/b\""),
        "the slow head was served"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let stats = proxy.stats().await;
    assert_eq!(
        metric_value(
            &stats,
            "weft_downstream_request_headers_timeouts_total{listener=\"ingress\"}"
        ),
        Some(1.0),
        "{stats}"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_with_more_fields_than_the_listener_allows_is_431_and_never_forwarded() {
    let up = Upstream::start("svc").await;
    let proxy = ProxyProcess::start(&config("    max_request_headers: 4", "", &eps(&[&up]))).await;
    let out = exchange(
        &proxy,
        b"GET /few HTTP/1.1\r\nhost: svc\r\n\r\n\
          GET /many HTTP/1.1\r\nhost: svc\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\ne: 5\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        out.contains("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{out}"
    );
    assert!(!out.contains("/many"), "{out}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_request_handed_to_hyper_after_a_slow_one_gets_its_own_head_time() {
    // The first answer takes longer than the request-headers timeout; the POST behind it
    // (already read) must not be cut as a head that took that long.
    let up = Upstream::start("svc").await;
    let cfg = config("    request_headers_timeout_ms: 500", "", &eps(&[&up]));
    let proxy = ProxyProcess::start(&cfg).await;
    let out = exchange(
        &proxy,
        b"GET /delay/900 HTTP/1.1\r\nhost: svc\r\n\r\n\
          POST /after HTTP/1.1\r\nhost: svc\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
    assert!(out.contains("hello"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_during_a_streamed_response_releases_the_upstream_at_once() {
    // An upstream that sends a head and one chunk, then nothing: it notes when the proxy
    // closes its connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        read_until(&mut s, &mut seen, "\r\n\r\n").await;
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        let _ = closed_tx.send(matches!(closed, Ok(Ok(0) | Err(_))));
    });
    let proxy = ProxyProcess::start(&config("", "", &[(addr.to_string(), 1)])).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /events HTTP/1.1\r\nhost: svc\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut seen, "abc").await;
    let left = std::time::Instant::now();
    drop(s);
    let closed = tokio::time::timeout(Duration::from_secs(5), closed_rx)
        .await
        .expect("the upstream connection was still open 5 s after the client left")
        .unwrap();
    assert!(closed, "the upstream connection was not closed");
    assert!(
        left.elapsed() < Duration::from_secs(2),
        "{:?}",
        left.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_with_part_of_a_head_closes_at_the_idle_timeout() {
    // No request-headers timeout: the idle timeout is what ends a connection that stalls
    // partway through its next head.
    let up = Upstream::start("svc").await;
    let cfg = config(
        "    request_headers_timeout_ms: 0\n    idle_timeout_ms: 500",
        "",
        &eps(&[&up]),
    );
    let proxy = ProxyProcess::start(&cfg).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: svc\r\n\r\nGET /b HTTP/1.1\r\nx-half:")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut seen, "\"/a\"").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "still open 5 s after a 500 ms idle timeout");
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_field_served_inline_is_hop_by_hop_and_still_decides_persistence() {
    // Requests the inline server answers: `connection` never goes upstream, nor what it
    // names; `keep-alive` keeps the connection for the next request, `close` ends it.
    let up = Upstream::start("svc").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    let out = exchange(
        &proxy,
        b"GET /one HTTP/1.1\r\nhost: svc\r\nconnection: keep-alive, x-secret\r\nx-secret: 1\r\nx-kept: a\r\n\r\n\
          GET /two HTTP/1.1\r\nhost: svc\r\nConnection: Keep-Alive\r\nx-kept: b\r\n\r\n\
          GET /three HTTP/1.1\r\nhost: svc\r\nconnection: close\r\nx-kept: c\r\n\r\n",
    )
    .await;
    let answers: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 3, "three answers on one connection: {out}");
    for (answer, kept) in answers.iter().zip(["a", "b", "c"]) {
        assert!(answer.starts_with("200"), "{answer}");
        let echo: serde_json::Value =
            serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
        let h = echo["headers"].as_object().unwrap();
        assert_eq!(h["x-kept"][0], kept, "{echo}");
        for gone in ["connection", "x-secret"] {
            assert!(!h.contains_key(gone), "{gone} was forwarded: {echo}");
        }
    }
    assert!(
        answers[2]
            .to_ascii_lowercase()
            .contains("connection: close"),
        "the last answer says the connection ends: {}",
        answers[2]
    );
}
