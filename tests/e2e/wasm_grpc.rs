//! gRPC from filters (`compat_grpc`, built with the upstream proxy-wasm SDK) to a real tonic
//! gRPC server on loopback that serves `weft.control.v1.Registry` (unary) and
//! `weft.control.v1.Discovery/Subscribe` (bidirectional streaming): calls that pause a
//! request until their answer (ext_authz-style), statuses with their messages, timeouts,
//! metadata both ways, streams from request and root contexts, and cancellation.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};
use weft_proto::v1;
use weft_tests::*;

use crate::{chain, cluster, filter};

/// The token the server wants (`authorization: Bearer secret`).
const TOKEN: &str = "secret";

/// What the gRPC server saw.
#[derive(Default)]
struct Seen {
    /// Unary calls answered.
    calls: AtomicUsize,
    /// Streams the client reset before they ended.
    resets: AtomicUsize,
}

/// The test's gRPC server: `Registry/Register` and `Discovery/Subscribe`, both wanting the
/// token.
#[derive(Clone)]
struct Server {
    seen: Arc<Seen>,
}

fn authorized(metadata: &MetadataMap) -> Result<(), Status> {
    match metadata.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(v) if v == format!("Bearer {TOKEN}") => Ok(()),
        _ => Err(Status::unauthenticated("missing token")),
    }
}

#[tonic::async_trait]
impl v1::registry_server::Registry for Server {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        authorized(request.metadata())?;
        self.seen.calls.fetch_add(1, Ordering::SeqCst);
        let r = request.into_inner();
        match r.service.as_str() {
            "deny" => return Err(Status::permission_denied("denied: policy 100% says no")),
            "slow" => tokio::time::sleep(Duration::from_secs(3)).await,
            _ => {}
        }
        Ok(Response::new(v1::Instance {
            id: format!("{}/{}", r.service, r.address),
            service: r.service,
            address: r.address,
            ..Default::default()
        }))
    }

    async fn heartbeat(
        &self,
        _: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn deregister(
        &self,
        _: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn list_services(
        &self,
        _: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<v1::Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl v1::discovery_server::Discovery for Server {
    type SubscribeStream = SnapshotStream;

    /// Answers each request with `version * 10` and its hash (and, for a hash `push…`, keeps
    /// sending answers every 20 ms until the client goes away); once the client ends its side,
    /// ends with OK, message `done` and trailing metadata `x-summary: <requests>`. Sends
    /// `x-echo: <authorization>` as initial metadata.
    async fn subscribe(
        &self,
        request: Request<Streaming<v1::DiscoveryRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        authorized(request.metadata())?;
        let echo = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        let mut inbound = request.into_inner();
        let seen = self.seen.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                match inbound.message().await {
                    Ok(Some(r)) => {
                        n += 1;
                        let push = r.hash.starts_with("push");
                        let reply = v1::Snapshot {
                            version: r.version * 10,
                            hash: r.hash,
                            ..Default::default()
                        };
                        if tx.send(Ok(reply)).await.is_err() {
                            seen.resets.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        // `push…`: keep answering every 20 ms until the client goes away.
                        if push {
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                for k in 0..500u64 {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    let more = v1::Snapshot {
                                        version: 1000 + k,
                                        ..Default::default()
                                    };
                                    if tx.send(Ok(more)).await.is_err() {
                                        return;
                                    }
                                }
                            });
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        seen.resets.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
            let mut md = MetadataMap::new();
            md.insert("x-summary", n.to_string().parse().unwrap());
            let _ = tx
                .send(Err(Status::with_metadata(Code::Ok, "done", md)))
                .await;
        });
        let mut response = Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as SnapshotStream
        );
        response
            .metadata_mut()
            .insert("x-echo", echo.parse().unwrap());
        Ok(response)
    }

    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type TapsStream = Pin<Box<dyn Stream<Item = Result<v1::TapCommand, Status>> + Send>>;

    async fn taps(
        &self,
        _: Request<Streaming<v1::TapEvent>>,
    ) -> Result<Response<Self::TapsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// A running gRPC server on a loopback port.
struct GrpcServer {
    addr: std::net::SocketAddr,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcServer {
    async fn start() -> GrpcServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let server = Server { seen: seen.clone() };
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(v1::registry_server::RegistryServer::new(server.clone()))
                .add_service(v1::discovery_server::DiscoveryServer::new(server))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        GrpcServer { addr, seen, task }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A proxy running `compat_grpc` (with `config`) in front of `up`, with cluster `grpc` (over
/// `protocol`) to `server`.
async fn grpc_proxy(
    up: &Upstream,
    server: &GrpcServer,
    config: &str,
    protocol: &str,
) -> ProxyProcess {
    let yaml = chain(
        "svc",
        &[filter("grpc", &guest_filter("compat_grpc"), config)],
        &[
            cluster("svc", &[up.address()], ""),
            cluster(
                "grpc",
                &[server.addr.to_string()],
                &format!("protocol: {protocol}"),
            ),
        ],
    );
    ProxyProcess::start(&yaml).await
}

/// GET `path` with `headers`.
async fn get_with(proxy: &ProxyProcess, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = http::Request::get(proxy.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    send(&h1_client(), req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_grpc_call_decides_a_paused_request() {
    let up = Upstream::start("svc").await;
    let server = GrpcServer::start().await;
    let proxy = grpc_proxy(&up, &server, "", "http2").await;

    // Allowed: the answer's id reaches the upstream, added while the request waited.
    let got = get_with(&proxy, "/call/orders", &[("x-token", TOKEN)]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(
        got.echo()["headers"]["x-instance-id"][0],
        "orders/10.0.0.1:80"
    );
    assert_eq!(server.seen.calls.load(Ordering::SeqCst), 1);

    // The metadata is what the server checks: without the token, UNAUTHENTICATED (16) with
    // its message, and the request never reaches the upstream.
    let got = get_with(&proxy, "/call/orders", &[]).await;
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.header("x-grpc-status"), "16");
    assert_eq!(got.header("x-grpc-message"), "missing token");

    // A status from the handler, its message percent-decoded as sent.
    let got = get_with(&proxy, "/call/deny", &[("x-token", TOKEN)]).await;
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.header("x-grpc-status"), "7");
    assert_eq!(got.header("x-grpc-message"), "denied: policy 100% says no");
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_past_its_timeout_is_deadline_exceeded() {
    let up = Upstream::start("svc").await;
    let server = GrpcServer::start().await;
    let proxy = grpc_proxy(&up, &server, "", "http2").await;
    let t0 = Instant::now();
    let got = get_with(
        &proxy,
        "/call/slow",
        &[("x-token", TOKEN), ("x-timeout-ms", "300")],
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.header("x-grpc-status"), "4", "{got:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_that_cannot_go_say_why() {
    let up = Upstream::start("svc").await;
    let server = GrpcServer::start().await;
    // An unknown cluster is refused at the call (the SDK gets INTERNAL_FAILURE, not a
    // token that never answers).
    let proxy = grpc_proxy(&up, &server, "", "http2").await;
    let got = get_with(&proxy, "/call-unknown", &[]).await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (502, "Err(InternalFailure)\n")
    );
    drop(proxy);

    // A cluster that speaks HTTP/1.1 cannot carry gRPC: the call fails with UNAVAILABLE and
    // says why, and nothing reaches the server.
    let proxy = grpc_proxy(&up, &server, "", "http1").await;
    let got = get_with(&proxy, "/call/orders", &[("x-token", TOKEN)]).await;
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.header("x-grpc-status"), "14");
    assert!(got.header("x-grpc-message").contains("http2"), "{got:?}");
    assert_eq!(server.seen.calls.load(Ordering::SeqCst), 0);

    // A dead server: UNAVAILABLE.
    let dead = GrpcServer::start().await;
    let addr = dead.addr;
    drop(dead);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let yaml = chain(
        "svc",
        &[filter("grpc", &guest_filter("compat_grpc"), "")],
        &[
            cluster("svc", &[up.address()], ""),
            cluster("grpc", &[addr.to_string()], "protocol: http2"),
        ],
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let got = get_with(&proxy, "/call/orders", &[("x-token", TOKEN)]).await;
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.header("x-grpc-status"), "14");
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_delivers_metadata_messages_trailers_and_status_in_order() {
    let up = Upstream::start("svc").await;
    let server = GrpcServer::start().await;
    let proxy = grpc_proxy(&up, &server, "", "http2").await;
    let got = get_with(&proxy, "/stream/3", &[("x-token", TOKEN)]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(
        got.body,
        "initial Bearer secret\nmessage 10 h1\nmessage 20 h2\nmessage 30 h3\n\
         trailing 3\nclose 0 done\n"
    );
    // Closing its side at once with nothing sent.
    let got = get_with(&proxy, "/stream/0", &[("x-token", TOKEN)]).await;
    assert_eq!(
        got.body,
        "initial Bearer secret\ntrailing 0\nclose 0 done\n"
    );
    assert_eq!(up.hits(), 0, "the filter answered every request itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_grpc_stream_closes_with_its_status() {
    let up = Upstream::start("svc").await;
    let server = GrpcServer::start().await;
    let proxy = grpc_proxy(&up, &server, "", "http2").await;
    // Without the token the server refuses the stream at once (a trailers-only response):
    // no initial metadata, no message, the status and its message.
    let got = get_with(&proxy, "/stream/2", &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, "close 16 missing token\n");
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_grpc_stream_is_reset_and_calls_back_no_more() {
    let up = Upstream::start("svc").await;
    let server = GrpcServer::start().await;
    let proxy = grpc_proxy(&up, &server, "", "http2").await;
    // The filter cancels on the first answer while the server keeps answering every 20 ms,
    // and lets the request go on to an upstream that takes 800 ms: the server must see the
    // reset while the request is still in flight (not only when its context ends), and no
    // callback may follow the cancel.
    let url = proxy.url("/delay/800/stream-cancel");
    let request = tokio::spawn(async move {
        let req = http::Request::get(url)
            .header("x-token", TOKEN)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        send(&h1_client(), req).await.unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.seen.resets.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the stream was not reset");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !request.is_finished(),
        "the reset came only with the end of the request"
    );
    let got = request.await.unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.echo()["headers"]["x-cancelled-after"][0], "10 push1");
    let stats = proxy.stats().await;
    assert!(!stats.contains("grpc_after_cancel"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_context_streams_with_no_traffic() {
    let up = Upstream::start("svc").await;
    let server = GrpcServer::start().await;
    let yaml = chain(
        "svc",
        &[filter(
            "grpc",
            &guest_filter("compat_grpc"),
            "\"root-stream:secret\"",
        )],
        &[
            cluster("svc", &[up.address()], ""),
            cluster("grpc", &[server.addr.to_string()], "protocol: http2"),
        ],
    );
    let proxy = ProxyProcess::start_with(&yaml, 2).await;
    // One stream per worker's instance (two workers), opened from on_tick; no request is
    // sent.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = proxy.stats().await;
        let messages = metric_value(&stats, "weft_filter_grpc_root_messages_total");
        let closed = metric_value(&stats, "weft_filter_grpc_root_closed_0_total");
        if closed == Some(2.0) {
            assert_eq!(messages, Some(6.0), "three answers per stream:\n{stats}");
            break;
        }
        assert!(Instant::now() < deadline, "no stream closed:\n{stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.hits(), 0);
}
