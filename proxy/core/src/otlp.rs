//! Spans of traced requests, exported to an OpenTelemetry collector over OTLP (gRPC or
//! HTTP/protobuf), batched, sampled, never in the way of a request.
//!
//! A span is this proxy's hop of a trace, as the W3C context a filter propagates says it:
//! the request's `traceparent` after the chain's request-headers callbacks (the telemetry
//! filter gives each hop a new span id) is the span, the `traceparent` it arrived with is
//! its parent. A request whose context no filter changed is not this proxy's span (it has
//! none of its own to give the next hop), and none is made.
//!
//! The request path pays one relaxed load when tracing is off. When on: a clock read and a
//! header parse per request, and a `try_send` of the finished span into a bounded queue: a
//! full queue drops the span (counted in `weft_otlp_spans_dropped_total`), so a slow or dead
//! collector costs spans, never requests. The exporter task sends a batch every `flush_ms`
//! (or once `max_batch` spans wait), each export bounded by `timeout_ms`.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use tokio::sync::mpsc;

use crate::config::tracing::{OtlpProtocol, TracingConfig};
use crate::metrics::OtlpMetrics;

/// A W3C trace context (`traceparent`, version 00).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id.
    pub trace_id: [u8; 16],
    /// The span id.
    pub span_id: [u8; 8],
    /// The sampled flag.
    pub sampled: bool,
}

fn hex_into(out: &mut [u8], text: &[u8]) -> Option<()> {
    if text.len() != out.len() * 2 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(text.chunks(2)) {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` (lower case); `None` for anything else or all-zero
    /// ids, as the W3C spec says to.
    pub fn parse(v: &[u8]) -> Option<Self> {
        let mut parts = v.split(|b| *b == b'-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != b"00" || parts.next().is_some() {
            return None;
        }
        let mut tp = TraceParent {
            trace_id: [0; 16],
            span_id: [0; 8],
            sampled: false,
        };
        hex_into(&mut tp.trace_id, trace)?;
        hex_into(&mut tp.span_id, span)?;
        let mut f = [0u8; 1];
        hex_into(&mut f, flags)?;
        tp.sampled = f[0] & 1 == 1;
        (tp.trace_id != [0; 16] && tp.span_id != [0; 8]).then_some(tp)
    }

    fn of(head: &http::request::Parts) -> Option<Self> {
        Self::parse(head.headers.get("traceparent")?.as_bytes())
    }
}

/// What a traced request keeps until it is answered.
pub struct SpanProbe {
    start_unix_ns: u64,
    incoming: Option<TraceParent>,
    own: Option<TraceParent>,
    method: String,
    path: String,
    authority: String,
}

/// A finished span on its way to the exporter.
pub struct SpanData {
    probe: Box<SpanProbe>,
    end_unix_ns: u64,
    inbound: bool,
    listener: String,
    cluster: String,
    route: String,
    status: u16,
    peer: String,
}

struct Tracer {
    tx: mpsc::Sender<SpanData>,
    /// Traces whose id's low 64 bits are below this are exported.
    threshold: u64,
    metrics: OtlpMetrics,
}

static TRACER: OnceLock<Tracer> = OnceLock::new();

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Starts following a request, when tracing is on.
#[inline]
pub fn begin(head: &http::request::Parts) -> Option<Box<SpanProbe>> {
    TRACER.get()?;
    let authority = crate::http::headers::request_authority(head).to_owned();
    Some(Box::new(SpanProbe {
        start_unix_ns: unix_ns(),
        incoming: TraceParent::of(head),
        own: None,
        method: head.method.as_str().to_owned(),
        path: head.uri.path().to_owned(),
        authority,
    }))
}

impl SpanProbe {
    /// Records the context the chain gave the request (after its request-headers
    /// callbacks).
    pub fn filtered(&mut self, head: &http::request::Parts) {
        self.own = TraceParent::of(head);
    }
}

/// What the request path knows of a traced request once it is answered.
pub struct Answered<'a> {
    /// The listener goes inbound (a server span) or not (a client span).
    pub inbound: bool,
    /// The listener.
    pub listener: &'a str,
    /// The cluster ("" when none).
    pub cluster: &'a str,
    /// The route a router matched.
    pub route: Option<&'a str>,
    /// The status (0: reset).
    pub status: u16,
    /// The peer.
    pub peer: std::net::SocketAddr,
}

/// Ends a traced request: its span goes to the exporter if it is this proxy's, sampled, and
/// the queue has room.
pub fn end(probe: Box<SpanProbe>, a: Answered<'_>) {
    let Some(tracer) = TRACER.get() else { return };
    let Some(own) = probe.own else { return };
    if !own.sampled || probe.incoming.is_some_and(|i| i.span_id == own.span_id) {
        return;
    }
    let low = u64::from_be_bytes(own.trace_id[8..].try_into().expect("8 bytes"));
    if low > tracer.threshold {
        return;
    }
    let span = SpanData {
        probe,
        end_unix_ns: unix_ns(),
        inbound: a.inbound,
        listener: a.listener.to_owned(),
        cluster: a.cluster.to_owned(),
        route: a.route.unwrap_or_default().to_owned(),
        status: a.status,
        peer: a.peer.ip().to_string(),
    };
    if tracer.tx.try_send(span).is_err() {
        tracer.metrics.dropped.inc();
    }
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

impl SpanData {
    fn into_span(self) -> Span {
        let p = self.probe;
        let own = p.own.expect("only spans with their own context are queued");
        let parent = p
            .incoming
            .filter(|i| i.trace_id == own.trace_id)
            .map(|i| i.span_id.to_vec())
            .unwrap_or_default();
        let mut attributes = vec![
            text("http.request.method", p.method.clone()),
            text("url.path", p.path),
            text("server.address", p.authority),
            text("client.address", self.peer),
            kv(
                "http.response.status_code",
                any_value::Value::IntValue(self.status.into()),
            ),
            text("weft.listener", self.listener),
        ];
        if !self.cluster.is_empty() {
            attributes.push(text("weft.cluster", self.cluster));
        }
        if !self.route.is_empty() {
            attributes.push(text("http.route", self.route.clone()));
        }
        let name = match self.route.as_str() {
            "" => p.method,
            route => format!("{} {route}", p.method),
        };
        let failed = self.status == 0 || self.status >= 500;
        Span {
            trace_id: own.trace_id.to_vec(),
            span_id: own.span_id.to_vec(),
            parent_span_id: parent,
            flags: 1,
            name,
            kind: if self.inbound {
                SpanKind::Server
            } else {
                SpanKind::Client
            } as i32,
            start_time_unix_nano: p.start_unix_ns,
            end_time_unix_nano: self.end_unix_ns.max(p.start_unix_ns),
            attributes,
            status: Some(Status {
                message: if self.status == 0 {
                    "reset".into()
                } else {
                    String::new()
                },
                code: if failed {
                    StatusCode::Error
                } else {
                    StatusCode::Unset
                } as i32,
            }),
            ..Default::default()
        }
    }
}

/// The spans' resource: who exported them.
#[derive(Clone, Debug)]
pub struct ResourceInfo {
    /// `service.name`.
    pub service_name: String,
    /// The proxy's id (`service.instance.id`), when it has one.
    pub proxy_id: Option<String>,
    /// The proxy's workload (its `app` label), when it has one.
    pub workload: Option<String>,
}

/// Turns tracing on: spans go to `config`'s collector. Returns the exporter task to spawn
/// (on any runtime); `None` when tracing was already on.
pub fn start(
    config: &TracingConfig,
    resource: ResourceInfo,
    metrics: OtlpMetrics,
) -> Option<impl Future<Output = ()> + use<>> {
    let (tx, rx) = mpsc::channel(config.max_queue as usize);
    let threshold = if config.sample_percent >= 100.0 {
        u64::MAX
    } else {
        (config.sample_percent / 100.0 * u64::MAX as f64) as u64
    };
    TRACER
        .set(Tracer {
            tx,
            threshold,
            metrics: metrics.clone(),
        })
        .ok()?;
    Some(export(config.clone(), resource, metrics, rx))
}

/// Sends batches until the proxy ends.
async fn export(
    config: TracingConfig,
    resource: ResourceInfo,
    metrics: OtlpMetrics,
    mut rx: mpsc::Receiver<SpanData>,
) {
    let mut attributes = vec![
        text("service.name", resource.service_name),
        text("telemetry.sdk.name", "weft-proxy"),
        text("telemetry.sdk.language", "rust"),
    ];
    if let Some(id) = resource.proxy_id {
        attributes.push(text("service.instance.id", id.clone()));
        attributes.push(text("weft.proxy.id", id));
    }
    if let Some(w) = resource.workload {
        attributes.push(text("weft.workload", w));
    }
    let resource = Resource {
        attributes,
        ..Default::default()
    };
    let timeout = Duration::from_millis(config.timeout_ms);
    let mut client = match config.protocol {
        OtlpProtocol::Grpc => {
            match tonic::transport::Endpoint::from_shared(config.endpoint.clone()) {
                Ok(e) => Some(TraceServiceClient::new(
                    e.connect_timeout(timeout).timeout(timeout).connect_lazy(),
                )),
                Err(e) => {
                    tracing::error!(endpoint = %config.endpoint, "tracing off: {e}");
                    return;
                }
            }
        }
        OtlpProtocol::HttpProtobuf => None,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(config.flush_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<Span> = Vec::new();
    let mut last_warning: Option<tokio::time::Instant> = None;
    tracing::info!(endpoint = %config.endpoint, protocol = ?config.protocol, "exporting spans over OTLP");
    loop {
        let full = tokio::select! {
            span = rx.recv() => match span {
                Some(s) => {
                    batch.push(s.into_span());
                    batch.len() >= config.max_batch as usize
                }
                None => true,
            },
            _ = tick.tick() => !batch.is_empty(),
        };
        if !full {
            continue;
        }
        let spans = std::mem::take(&mut batch);
        let n = spans.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "weft-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let sent = match &mut client {
            Some(c) => tokio::time::timeout(timeout, c.export(request))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map(|_| ()).map_err(|s| s.message().to_owned())),
            None => tokio::time::timeout(timeout, post(&config.endpoint, request.encode_to_vec()))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r),
        };
        match sent {
            Ok(()) => {
                metrics.exported.inc_by(n);
            }
            Err(e) => {
                metrics.failures.inc();
                metrics.dropped.inc_by(n);
                // Said once a minute at most: a dead collector is one problem, not thousands.
                if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(endpoint = %config.endpoint, spans = n, "span export failed: {e}; spans are dropped until the collector answers");
                    last_warning = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}

/// `POST <endpoint>/v1/traces` with a protobuf body, over a new HTTP/1.1 connection.
async fn post(endpoint: &str, body: Vec<u8>) -> Result<(), String> {
    let authority = endpoint
        .strip_prefix("http://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = http::Request::post("/v1/traces")
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {}", response.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_as_the_w3c_spec_says() {
        let tp = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(tp.trace_id[0], 0x4b);
        assert_eq!(tp.span_id[7], 0xb7);
        assert!(tp.sampled);
        assert!(
            !TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .sampled
        );
        for bad in [
            &b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"garbage",
        ] {
            assert_eq!(
                TraceParent::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
