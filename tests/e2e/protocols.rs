//! Both protocols each way, forwarding headers, bodies, 100-continue, gRPC trailers and
//! upgrades.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use weft_tests::*;

use crate::{config, eps};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_pair_proxies_with_forwarding_headers() {
    let up = Upstream::start("u1").await;
    for upstream in ["http1", "http2"] {
        let cluster = format!("    protocol: {upstream}");
        let proxy = ProxyProcess::start(&config("", &cluster, &eps(&[&up]))).await;
        for (downstream, client) in [("h1", h1_client()), ("h2", h2_client())] {
            let what = format!("{downstream} -> {upstream}");
            let got = get(&client, &proxy.url("/hello?x=1")).await.unwrap();
            assert_eq!(got.status, 200, "{what}: {got:?}");
            assert_eq!(got.header("x-upstream"), "u1", "{what}");
            let echo = got.echo();
            assert!(
                echo["uri"].as_str().unwrap().ends_with("/hello?x=1"),
                "{what}: {echo}"
            );
            let version = if upstream == "http1" {
                "HTTP/1.1"
            } else {
                "HTTP/2.0"
            };
            assert_eq!(echo["version"], version, "{what}");
            let h = &echo["headers"];
            assert_eq!(h["x-forwarded-for"][0], "127.0.0.1", "{what}");
            assert_eq!(h["x-forwarded-proto"][0], "http", "{what}");
            assert_eq!(
                h["x-request-id"][0].as_str().unwrap().len(),
                36,
                "{what}: a UUID"
            );
            if upstream == "http1" {
                assert_eq!(h["host"][0], proxy.addr.to_string(), "{what}");
            }

            // A request id from downstream is kept; x-forwarded-for is appended to.
            let req = Request::get(proxy.url("/again"))
                .header("x-request-id", "keep-me")
                .header("x-forwarded-for", "10.1.2.3")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let echo = send(&client, req).await.unwrap().echo();
            assert_eq!(echo["headers"]["x-request-id"][0], "keep-me", "{what}");
            assert_eq!(
                echo["headers"]["x-forwarded-for"][0], "10.1.2.3, 127.0.0.1",
                "{what}"
            );

            // Request bodies go through both ways.
            let req = Request::post(proxy.url("/echo"))
                .body(Full::new(Bytes::from("x".repeat(100_000))))
                .unwrap();
            let echo = send(&client, req).await.unwrap().echo();
            assert_eq!(echo["body"].as_str().unwrap().len(), 100_000, "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let up = Upstream::start("u1").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    let raw = raw_request(
        proxy.addr,
        b"GET /h HTTP/1.1\r\nhost: svc\r\nconnection: close, x-secret\r\nx-secret: 1\r\n\
keep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nte: gzip\r\nx-kept: yes\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status_of(&raw), 200, "{raw}");
    let body = raw.split_once("\r\n\r\n").unwrap().1;
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    let h = echo["headers"].as_object().unwrap();
    for gone in ["x-secret", "keep-alive", "proxy-connection", "te"] {
        assert!(!h.contains_key(gone), "{gone} was forwarded: {echo}");
    }
    assert_eq!(h["x-kept"][0], "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_with_100_continue_reaches_the_upstream() {
    let up = Upstream::start("u1").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\
expect: 100-continue\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut seen, "100 Continue").await;
    s.write_all(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, &mut seen, "\"body\"").await;
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("200 OK"), "{text}");
    assert!(text.contains("\"body\":\"hello world\""), "{text}");
    assert!(
        !text.contains("\"expect\""),
        "expect is answered by the proxy: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2_keeps_its_trailers() {
    let up = Upstream::start("grpc").await;
    let proxy = ProxyProcess::start(&config("", "    protocol: http2", &eps(&[&up]))).await;
    let req = Request::post(proxy.url("/grpc"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02yo")))
        .unwrap();
    let got = send(&h2_client(), req).await.unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.header("content-type"), "application/grpc");
    assert_eq!(got.body.as_bytes(), b"\0\0\0\0\x02hi");
    let trailers = got.trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_tunnelled_both_ways() {
    let up = Upstream::start("ws").await;
    let proxy = ProxyProcess::start(&config("", "", &eps(&[&up]))).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: svc\r\nconnection: upgrade\r\nupgrade: weft-echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut seen, "\r\n\r\n").await;
    let head = String::from_utf8_lossy(&seen).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: weft-echo"), "{head}");
    for msg in ["ping", "a longer second message"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        read_until(&mut s, &mut got, msg).await;
    }
    // The proxy keeps serving ordinary requests alongside the tunnel.
    assert_eq!(
        get(&h1_client(), &proxy.url("/")).await.unwrap().status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailer_header_is_kept_only_where_the_trailers_go() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&crate::config("", "", &crate::eps(&[&up]))).await;
    // An HTTP/1.1 client that did not ask for trailers (`te: trailers`) gets none, so it
    // must not be told to expect them.
    let raw = raw_request(
        proxy.addr,
        b"GET /grpc HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status_of(&raw), 200, "{raw}");
    let head = raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(!head.contains("\r\ntrailer:"), "{raw}");
    assert!(!raw.contains("grpc-status"), "{raw}");
    // One that asked gets the trailers and their announcement.
    let raw = raw_request(
        proxy.addr,
        b"GET /grpc HTTP/1.1\r\nhost: a\r\nte: trailers\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let lower = raw.to_ascii_lowercase();
    assert!(
        lower.contains("\r\ntrailer: grpc-status, grpc-message"),
        "{raw}"
    );
    assert!(lower.contains("grpc-status: 0"), "{raw}");
}
