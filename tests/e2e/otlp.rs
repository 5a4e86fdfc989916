//! Traces end to end: two real `weft-proxy` sidecars (a caller's outbound, a service's
//! inbound) with the standard telemetry filter, exporting spans to real OTLP receivers on
//! loopback — one over gRPC (`TraceService/Export`, served with tonic from the
//! opentelemetry-proto definitions), one over HTTP/protobuf (`POST /v1/traces`). A request
//! crossing both sidecars is one trace: the service's span is the child of the caller's.
//! A collector that hangs or is gone costs spans, never a request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use weft_tests::*;

/// What a receiver got: (service.name, span) pairs.
type Got = Arc<std::sync::Mutex<Vec<(String, Span)>>>;

fn keep(got: &Got, request: ExportTraceServiceRequest) {
    let mut got = got.lock().expect("lock");
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                any_value::Value::StringValue(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                got.push((service.clone(), span));
            }
        }
    }
}

/// An OTLP/gRPC receiver; `stall` makes every export hang for a minute.
#[derive(Clone)]
struct Receiver {
    got: Got,
    stall: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.stall.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        keep(&self.got, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn grpc_receiver() -> (SocketAddr, Receiver) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let receiver = Receiver {
        got: Got::default(),
        stall: Arc::default(),
    };
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, receiver)
}

/// An OTLP/HTTP receiver (protobuf bodies on `POST /v1/traces`), stopped by aborting its
/// task.
async fn http_receiver(got: Got) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let got = got.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let got = got.clone();
                        async move {
                            let ok = req.method() == http::Method::POST
                                && req.uri().path() == "/v1/traces"
                                && req.headers().get("content-type").map(|v| v.as_bytes())
                                    == Some(b"application/x-protobuf");
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let status = match (ok, body) {
                                (true, Ok(b)) => match ExportTraceServiceRequest::decode(b) {
                                    Ok(r) => {
                                        keep(&got, r);
                                        200
                                    }
                                    Err(_) => 400,
                                },
                                _ => 400,
                            };
                            let mut resp = http::Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() =
                                http::StatusCode::from_u16(status).expect("status");
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

fn telemetry() -> String {
    crate::filter(
        "telemetry",
        &standard_filter("weft_filter_telemetry"),
        "{ access_log: false }",
    )
}

fn tracing(endpoint: SocketAddr, protocol: &str, service: &str) -> String {
    format!(
        "tracing: {{ endpoint: \"http://{endpoint}\", protocol: {protocol}, service_name: {service}, flush_ms: 100, timeout_ms: 300 }}\n"
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Waits until `got` holds `n` spans (at most 20 s).
async fn spans(got: &Got, n: usize) -> Vec<(String, Span)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = got.lock().expect("lock").clone();
        if now.len() >= n {
            return now;
        }
        assert!(Instant::now() < deadline, "{} of {n} spans came", now.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_two_sidecars_is_one_trace_and_a_dead_collector_fails_no_request() {
    let app = Upstream::start("api").await;
    let (grpc_addr, grpc) = grpc_receiver().await;
    let http_got = Got::default();
    let (http_addr, http_task) = http_receiver(http_got.clone()).await;
    // The service's sidecar: inbound, exporting over gRPC.
    let api_yaml = format!(
        "admin: {{ address: \"{{admin}}\" }}
wasm: {{ cache_dir: \"{cache}\" }}
listeners:
  - name: inbound
    address: \"{{listen}}\"
    direction: inbound
    default_cluster: local
    filters:
      - {telemetry}
clusters:
  - {{ name: local, endpoints: [ {{ address: \"{app}\" }} ] }}
{tracing}",
        cache = shared_module_cache().display(),
        telemetry = telemetry(),
        app = app.address(),
        tracing = tracing(grpc_addr, "grpc", "api"),
    );
    let api = ProxyProcess::start_with(&api_yaml, 1).await;
    // The caller's sidecar: outbound to the service's, exporting over HTTP/protobuf.
    let web_yaml = format!(
        "admin: {{ address: \"{{admin}}\" }}
wasm: {{ cache_dir: \"{cache}\" }}
listeners:
  - name: outbound
    address: \"{{listen}}\"
    direction: outbound
    default_cluster: api
    filters:
      - {telemetry}
clusters:
  - {{ name: api, endpoints: [ {{ address: \"{api}\" }} ] }}
{tracing}",
        cache = shared_module_cache().display(),
        telemetry = telemetry(),
        api = api.addr,
        tracing = tracing(http_addr, "http_protobuf", "web"),
    );
    let web = ProxyProcess::start_with(&web_yaml, 1).await;

    // Ten new traces, and one the client started.
    let client = h1_client();
    for _ in 0..10 {
        let got = get(&client, &web.url("/items")).await.expect("request");
        assert_eq!(got.status, 200, "{got:?}");
    }
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let req = http::Request::get(web.url("/items/7"))
        .header(
            "traceparent",
            format!("00-{client_trace}-00f067aa0ba902b7-01"),
        )
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(&client, req).await.expect("request").status, 200);

    let web_spans = spans(&http_got, 11).await;
    let api_spans = spans(&grpc.got, 11).await;
    assert!(
        web_spans.iter().all(|(s, _)| s == "web"),
        "resource service.name"
    );
    assert!(api_spans.iter().all(|(s, _)| s == "api"));
    // Each caller span has its child in the service: one trace across two sidecars.
    for (_, w) in &web_spans {
        assert_eq!(w.kind, 3, "the caller's hop is a client span: {w:?}");
        let child = api_spans
            .iter()
            .map(|(_, s)| s)
            .find(|s| s.trace_id == w.trace_id)
            .unwrap_or_else(|| panic!("no service span in trace {}", hex(&w.trace_id)));
        assert_eq!(child.kind, 2, "the service's hop is a server span");
        assert_eq!(
            hex(&child.parent_span_id),
            hex(&w.span_id),
            "the service span's parent is the caller span"
        );
        assert!(child.start_time_unix_nano >= w.start_time_unix_nano);
        assert!(w.end_time_unix_nano >= child.end_time_unix_nano);
        let attr = |s: &Span, k: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key == k)
                .and_then(|kv| kv.value.as_ref()?.value.clone())
        };
        assert_eq!(
            attr(child, "http.response.status_code"),
            Some(any_value::Value::IntValue(200))
        );
        assert_eq!(
            attr(w, "weft.cluster"),
            Some(any_value::Value::StringValue("api".into()))
        );
    }
    // The client's own trace is kept, and the caller's span is the child of its span.
    let (_, w) = web_spans
        .iter()
        .find(|(_, s)| hex(&s.trace_id) == client_trace)
        .expect("the client's trace");
    assert_eq!(hex(&w.parent_span_id), "00f067aa0ba902b7");

    // The gRPC collector hangs: every request still goes through at once.
    grpc.stall.store(true, Ordering::SeqCst);
    // And the HTTP collector is gone.
    http_task.abort();
    let _ = http_task.await;
    let started = Instant::now();
    for _ in 0..200 {
        let got = tokio::time::timeout(Duration::from_secs(5), get(&client, &web.url("/items")))
            .await
            .expect("a request waited on the collector")
            .expect("request");
        assert_eq!(got.status, 200);
    }
    let took = started.elapsed();
    // Both proxies say what they dropped.
    for (proxy, name) in [(&api, "api"), (&web, "web")] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, stats) = proxy.admin_get("/stats/prometheus").await.expect("stats");
            let failed = metric_value(&stats, "weft_otlp_export_failures_total").unwrap_or(0.0);
            if failed >= 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: no failed export counted:\n{stats}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("200 requests with the collectors hung or gone: {took:?}");

    // The gRPC collector answers again: spans flow again.
    grpc.stall.store(false, Ordering::SeqCst);
    let before = grpc.got.lock().expect("lock").len();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = get(&client, &web.url("/again")).await.expect("request");
        assert_eq!(got.status, 200);
        let now = grpc.got.lock().expect("lock").clone();
        if now[before..].iter().any(|(_, s)| {
            s.attributes
                .iter()
                .any(|kv| kv.key == "url.path" && format!("{:?}", kv.value).contains("/again"))
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "spans did not flow again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
