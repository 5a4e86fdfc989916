//! The request path: one downstream request in, one response out.
//!
//! ```text
//! decoded request ─► framing check ─► filter chain (request) ─► cluster limit ─► balancer
//!   ─► header rewrite ─► pooled connection ─► upstream ─► outlier bookkeeping
//!   ─► filter chain (response) ─► header rewrite ─► downstream; accounting when the body ends
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::body::{FilteredBody, RequestBody, ResponseBody, StreamEnd};
use crate::clock;
use crate::cluster::{Cluster, Limit, RequestPermit};
use crate::config::UpstreamProtocol;
use crate::filter::{
    self, Attempt, AttemptError, BodyDecision, Callout, CalloutOutcome, ChainSlot, Direction,
    LocalReply, RequestDecision, ResponseDecision, SharedFilterStream, StreamInfo,
};
use crate::framing::FramingVerdicts;
use crate::headers;
use crate::metrics::ListenerMetrics;
use crate::upstream::{self, PooledH1, UpstreamError};
use crate::worker;

/// `x-weft-overloaded`: names the circuit-breaker limit that refused a request.
pub static X_WEFT_OVERLOADED: HeaderName = HeaderName::from_static("x-weft-overloaded");

/// What the request path needs to know about its listener.
pub struct ListenerCtx {
    /// Listener name (metrics, logs).
    pub name: String,
    /// Index of the default cluster.
    pub default_cluster: std::sync::atomic::AtomicUsize,
    /// All clusters of the proxy, by index.
    pub clusters: Arc<[Arc<Cluster>]>,
    /// Metric handles.
    pub metrics: ListenerMetrics,
    /// The filter chain.
    pub chain: ChainSlot,
    /// Largest request body kept for replay (retries).
    pub replay_limit: usize,
}

/// State of one downstream connection shared between its IO wrapper, its request handlers
/// and its idle watchdog.
pub struct ConnShared {
    /// The listener it was accepted on.
    pub listener: Arc<ListenerCtx>,
    /// The peer's IP as a header value, for `x-forwarded-for`.
    pub peer_ip: HeaderValue,
    /// The peer.
    pub peer: SocketAddr,
    /// The local address the connection arrived on.
    pub local: SocketAddr,
    /// Unique id of the connection in this process.
    pub id: u64,
    /// Request-framing verdicts published by the IO wrapper (HTTP/1 only).
    pub framing: FramingVerdicts,
    /// HTTP/1 requests handed to the service so far (the index of the next head).
    pub heads: AtomicU64,
    /// Requests in flight on this connection.
    pub in_flight: AtomicU32,
    /// When a request last started or ended, in [`clock`] milliseconds.
    pub last_active_ms: AtomicU64,
}

impl ConnShared {
    /// State for a connection from `peer` accepted on `listener` at `local`.
    pub fn new(listener: Arc<ListenerCtx>, peer: SocketAddr, local: SocketAddr) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            listener,
            peer_ip: headers::ip_header_value(peer.ip()),
            peer,
            local,
            id: NEXT_ID.fetch_add(1, Relaxed),
            framing: FramingVerdicts::default(),
            heads: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(clock::now_ms()),
        }
    }
}

/// Proxies one request arriving on `conn`.
pub async fn handle(conn: Arc<ConnShared>, req: Request<Incoming>) -> Response<ResponseBody> {
    let ctx = &conn.listener;
    let t0 = clock::now_ns();
    let now_ms = clock::ns_to_ms(t0);
    ctx.metrics.requests_active.inc();
    conn.in_flight.fetch_add(1, Relaxed);
    conn.last_active_ms.store(now_ms, Relaxed);
    let mut stream = Box::new(Stream {
        conn: conn.clone(),
        upstream: None,
        filters: None,
        complete: false,
    });

    let (mut head, body) = req.into_parts();
    let downstream_version = head.version;

    if downstream_version <= Version::HTTP_11 {
        let n = conn.heads.fetch_add(1, Relaxed);
        if head.headers.contains_key(header::TRANSFER_ENCODING)
            && conn.framing.has_conflict(n) == Some(true)
        {
            let mut resp = local_reply(
                StatusCode::BAD_REQUEST,
                "request has both content-length and transfer-encoding\n",
                stream,
            );
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return finish(ctx, ctx.default_cluster.load(Relaxed), resp);
        }
    }

    // The request id exists before filters run, as in Envoy.
    headers::ensure_request_id(&mut head.headers);
    let mut cluster_idx = ctx.default_cluster.load(Relaxed);
    if let Some(chain) = ctx.chain.load_full() {
        let info = StreamInfo {
            source: conn.peer,
            destination: conn.local,
            start_ns: t0,
            start_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            connection_id: conn.id,
            upstream: None,
            cluster: None,
            attempt: Default::default(),
        };
        let end_of_stream = body.is_end_stream();
        let filters = stream
            .filters
            .insert(Arc::new(std::sync::Mutex::new(chain.start_stream(info))));
        let mut decision = filter::lock(filters).on_request_headers(&mut head, end_of_stream);
        loop {
            match decision {
                RequestDecision::Continue { cluster: Some(c) } if c < ctx.clusters.len() => {
                    cluster_idx = c
                }
                RequestDecision::Continue { .. } => {}
                RequestDecision::Respond(reply) => {
                    return finish(ctx, cluster_idx, filter_reply(reply, stream));
                }
                RequestDecision::Pause(callouts) => {
                    let mut outcomes = Vec::with_capacity(callouts.len());
                    for callout in callouts {
                        outcomes.push(run_callout(ctx, callout).await);
                    }
                    let filters = stream.filters.as_ref().expect("set above");
                    decision =
                        filter::lock(filters).resume_request(&mut head, end_of_stream, outcomes);
                    continue;
                }
            }
            break;
        }
    }
    // Body callbacks see the request body before anything goes upstream: the head waits
    // until the first bytes come out of the chain, or the whole body if a filter buffers it.
    let up_body = match &stream.filters {
        Some(filters)
            if !body.is_end_stream() && filter::lock(filters).wants_body(Direction::Request) =>
        {
            match prime(filters, Direction::Request, body).await {
                Ok(Primed::Reply(reply)) => {
                    let resp = unread_body(filter_reply(reply, stream), downstream_version);
                    return finish(ctx, cluster_idx, resp);
                }
                Ok(Primed::Whole(data, trailers)) => {
                    set_body_length(&mut head.headers, &data, trailers.is_some());
                    RequestBody::Filtered {
                        body: FilteredBody::whole(data, trailers, Direction::Request),
                    }
                }
                Ok(Primed::Streaming(first, rest)) => RequestBody::Filtered {
                    body: FilteredBody::streaming(first, rest, filters.clone(), Direction::Request),
                },
                Err(e) => {
                    tracing::debug!("reading the request body: {e}");
                    let resp = local_reply(StatusCode::BAD_REQUEST, "bad request body\n", stream);
                    return finish(ctx, cluster_idx, unread_body(resp, downstream_version));
                }
            }
        }
        _ => RequestBody::Incoming { body },
    };
    let cluster = &ctx.clusters[cluster_idx];
    let filters = stream.filters.clone();
    let route = filters
        .as_ref()
        .map(|f| filter::lock(f).route())
        .unwrap_or_default();

    // A fault a filter injected: the request waits before it goes anywhere.
    if let Some(delay) = route.delay.filter(|d| !d.is_zero()) {
        tokio::time::sleep(delay).await;
    }

    // Rewrite the head for the upstream hop.
    let upgrade = downstream_version == Version::HTTP_11 && headers::wants_upgrade(&head.headers);
    let downstream_upgrade = if upgrade {
        head.extensions.remove::<OnUpgrade>()
    } else {
        None
    };
    headers::strip_hop_by_hop(&mut head.headers, upgrade);
    // The proxy answers `expect: 100-continue` itself when it starts reading the body.
    head.headers.remove(header::EXPECT);
    headers::set_forwarded(&mut head.headers, &conn.peer_ip, "http");
    if let Err(resp) = set_upstream_target(&mut head, cluster.protocol) {
        return finish(ctx, cluster_idx, local_reply(resp.0, resp.1, stream));
    }

    // Retries need the request again: the head is kept, and the body if it fits.
    let mut replay = None;
    let mut up_body = Some(up_body);
    if route.max_attempts > 1 && downstream_upgrade.is_none() {
        let body = up_body.take().expect("set above");
        match Replay::buffer(&head, body, ctx.replay_limit).await {
            Ok(Ok(r)) => replay = Some(r),
            Ok(Err(body)) => up_body = Some(body),
            Err(e) => {
                tracing::debug!("reading the request body: {e}");
                let resp = local_reply(StatusCode::BAD_REQUEST, "bad request body\n", stream);
                return finish(ctx, cluster_idx, unread_body(resp, downstream_version));
            }
        }
    }
    let max_attempts = if replay.is_some() {
        route.max_attempts
    } else {
        1
    };
    let timeout = match route.timeout {
        Some(t) if t.is_zero() => None,
        Some(t) => Some(t),
        None => cluster.request_timeout,
    };
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let try_timeout = route.try_timeout.filter(|t| !t.is_zero());
    let mut head = Some(head);
    let mut tried: Vec<u64> = Vec::new();
    let mut attempt = 0u32;

    let (mut rhead, rbody) = loop {
        attempt += 1;
        let (mut h, b) = match &replay {
            // The first attempt takes the original head; only retries need copies.
            Some(r) => (head.take().unwrap_or_else(|| r.head()), r.body()),
            None => (
                head.take().expect("one attempt without replay"),
                up_body.take().expect("one attempt without replay"),
            ),
        };
        if replay.is_some() {
            h.headers
                .insert(X_WEFT_ATTEMPT.clone(), HeaderValue::from(attempt));
        }
        let limit = match (deadline, try_timeout) {
            (Some(d), Some(t)) => Some(d.min(tokio::time::Instant::now() + t)),
            (d, t) => d.or_else(|| t.map(|t| tokio::time::Instant::now() + t)),
        };
        let outcome = attempt_once(ctx, &mut stream, cluster, now_ms, &tried, h, b, limit).await;
        let (mut rhead, rbody, error) = match outcome {
            Attempted::Response(rhead, rbody) => (rhead, Some(rbody), AttemptError::None),
            Attempted::Failed(failure) => {
                // A body callback may have ended the stream while the body streamed upstream.
                if let Some(reply) = filters.as_ref().and_then(|f| filter::lock(f).take_reply()) {
                    let resp = unread_body(filter_reply(reply, stream), downstream_version);
                    return finish(ctx, cluster_idx, resp);
                }
                let (rhead, error) = failure.into_head();
                (rhead, None, error)
            }
        };
        if let Some(up) = stream.upstream.as_ref() {
            tried.push(up.endpoint.id);
        }
        let Some(filters) = filters.as_ref() else {
            break (rhead, rbody);
        };
        let time_left = deadline.is_none_or(|d| d > tokio::time::Instant::now());
        filter::lock(filters).set_attempt(Attempt {
            number: attempt,
            status: rhead.status.as_u16(),
            error,
            retry_allowed: attempt < max_attempts && time_left,
        });
        let end_of_stream = rbody.as_ref().is_none_or(|b| b.is_end_stream());
        let mut decision = filter::lock(filters).on_response_headers(&mut rhead, end_of_stream);
        loop {
            match decision {
                ResponseDecision::Continue => break,
                ResponseDecision::Respond(reply) => {
                    // The upstream body is dropped unread, so its connection is not reused.
                    return finish(ctx, cluster_idx, filter_reply(reply, stream));
                }
                ResponseDecision::Pause(callouts) => {
                    let mut outcomes = Vec::with_capacity(callouts.len());
                    for callout in callouts {
                        outcomes.push(run_callout(ctx, callout).await);
                    }
                    decision =
                        filter::lock(filters).resume_response(&mut rhead, end_of_stream, outcomes);
                }
                ResponseDecision::Retry(ask) => {
                    cluster.metrics.retries.inc();
                    if let Some(up) = stream.upstream.take() {
                        up.release(false);
                    }
                    if !ask.exclude_tried {
                        tried.clear();
                    }
                    let wake = tokio::time::Instant::now() + ask.delay;
                    tokio::time::sleep_until(deadline.map_or(wake, |d| wake.min(d))).await;
                    break;
                }
            }
        }
        if matches!(decision, ResponseDecision::Retry(_)) {
            continue;
        }
        break (rhead, rbody);
    };

    let Some(rbody) = rbody else {
        // The proxy's own answer to a failed attempt, as the filters left it.
        return finish(ctx, cluster_idx, proxy_answer(rhead, stream));
    };
    if rhead.status == StatusCode::SWITCHING_PROTOCOLS {
        if let (Some(down), Some(up)) = (downstream_upgrade, rhead.extensions.remove::<OnUpgrade>())
        {
            tokio::spawn(tunnel(down, up));
        }
        if let Some(up) = stream.upstream.as_mut() {
            up.reusable = false;
        }
    }
    rhead.version = downstream_version;
    let Some(filters) = filters else {
        let resp = Response::from_parts(rhead, ResponseBody::upstream(rbody, Some(stream)));
        return finish(ctx, cluster_idx, resp);
    };
    if rbody.is_end_stream()
        || rhead.status == StatusCode::SWITCHING_PROTOCOLS
        || !filter::lock(&filters).wants_body(Direction::Response)
    {
        let resp = Response::from_parts(rhead, ResponseBody::upstream(rbody, Some(stream)));
        return finish(ctx, cluster_idx, resp);
    }
    // The head waits until the first bytes come out of the chain's body callbacks, so that a
    // filter buffering the whole body can still replace the response or fix its length.
    let body = match prime(&filters, Direction::Response, rbody).await {
        Ok(Primed::Reply(reply)) => return finish(ctx, cluster_idx, filter_reply(reply, stream)),
        Ok(Primed::Whole(data, trailers)) => {
            set_body_length(&mut rhead.headers, &data, trailers.is_some());
            FilteredBody::whole(data, trailers, Direction::Response)
        }
        Ok(Primed::Streaming(first, rest)) => {
            FilteredBody::streaming(first, rest, filters.clone(), Direction::Response)
        }
        Err(e) => {
            tracing::debug!(cluster = %cluster.name, "reading the response body: {e}");
            cluster.metrics.resets.inc();
            let resp = local_reply(StatusCode::BAD_GATEWAY, "upstream reset\n", stream);
            return finish(ctx, cluster_idx, resp);
        }
    };
    let resp = Response::from_parts(rhead, ResponseBody::filtered(body, Some(stream)));
    finish(ctx, cluster_idx, resp)
}

/// `x-weft-attempt`: the attempt number, sent upstream on requests that may be retried.
pub static X_WEFT_ATTEMPT: HeaderName = HeaderName::from_static("x-weft-attempt");

/// A request kept whole so that it can be sent again.
struct Replay {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replay {
    /// Reads `body` to its end if it fits in `limit` bytes: `Ok(Ok(replay))`, or
    /// `Ok(Err(body))` with a body that yields what was read and then the rest.
    async fn buffer(
        head: &http::request::Parts,
        mut body: RequestBody,
        limit: usize,
    ) -> Result<Result<Replay, RequestBody>, crate::body::BoxError> {
        let mut data = bytes::BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(d) => {
                    data.extend_from_slice(&d);
                    if data.len() > limit {
                        return Ok(Err(RequestBody::Prefixed {
                            first: Some(data.freeze()),
                            rest: Box::new(body),
                        }));
                    }
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        Ok(Ok(Replay {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            headers: head.headers.clone(),
            body: data.freeze(),
            trailers,
        }))
    }

    /// A copy of the head for one more attempt.
    fn head(&self) -> http::request::Parts {
        let (mut head, ()) = Request::new(()).into_parts();
        head.method = self.method.clone();
        head.uri = self.uri.clone();
        head.version = self.version;
        head.headers = self.headers.clone();
        head
    }

    /// The body for an attempt (shared bytes, not copied).
    fn body(&self) -> RequestBody {
        let body =
            FilteredBody::whole(self.body.clone(), self.trailers.clone(), Direction::Request);
        RequestBody::Filtered { body }
    }
}

/// How one attempt ended.
enum Attempted {
    /// The upstream answered.
    Response(http::response::Parts, Incoming),
    /// It did not.
    Failed(AttemptFailure),
}

/// Why an attempt got no upstream response (bookkeeping already done).
struct AttemptFailure {
    status: StatusCode,
    text: &'static str,
    error: AttemptError,
    overflow: Option<Limit>,
}

impl AttemptFailure {
    /// The head of the proxy's answer, for the response callbacks.
    fn into_head(self) -> (http::response::Parts, AttemptError) {
        let (mut head, ()) = Response::new(()).into_parts();
        head.status = self.status;
        head.headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        if let Some(limit) = self.overflow {
            head.headers.insert(
                X_WEFT_OVERLOADED.clone(),
                HeaderValue::from_static(limit.as_str()),
            );
        }
        head.extensions.insert(LocalText(self.text));
        (head, self.error)
    }
}

/// The body text of a proxy answer, carried in its head's extensions.
#[derive(Clone, Copy)]
struct LocalText(&'static str);

/// A response the proxy made for a failed attempt, with the head the filters left.
fn proxy_answer(mut head: http::response::Parts, stream: Box<Stream>) -> Response<ResponseBody> {
    let text = head.extensions.remove::<LocalText>().map_or("", |t| t.0);
    Response::from_parts(
        head,
        ResponseBody::local(Bytes::from_static(text.as_bytes()), Some(stream)),
    )
}

/// One attempt: admission, endpoint choice (avoiding `tried` when it can), the exchange
/// under `limit`, and the outlier and latency bookkeeping. The attempt's upstream state is
/// left in `stream.upstream`.
#[allow(clippy::too_many_arguments)]
async fn attempt_once(
    ctx: &ListenerCtx,
    stream: &mut Stream,
    cluster: &Arc<Cluster>,
    now_ms: u64,
    tried: &[u64],
    head: http::request::Parts,
    body: RequestBody,
    limit: Option<tokio::time::Instant>,
) -> Attempted {
    let _ = ctx;
    let failed = |status, text, error, overflow| {
        Attempted::Failed(AttemptFailure {
            status,
            text,
            error,
            overflow,
        })
    };
    let permit = match cluster.admit_request() {
        Ok(p) => p,
        Err(limit) => {
            return failed(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream overflow\n",
                AttemptError::Overflow,
                Some(limit),
            );
        }
    };
    let mut pick = worker::pick(cluster, now_ms);
    for _ in 0..tried.len().min(4) {
        match pick {
            Some(ep) if tried.contains(&ep.id) => pick = worker::pick(cluster, now_ms),
            _ => break,
        }
    }
    let Some(endpoint) = pick else {
        return failed(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream\n",
            AttemptError::NoHealthyUpstream,
            None,
        );
    };
    if let Some(filters) = stream.filters.as_ref() {
        let addr = match &endpoint.address {
            crate::cluster::EndpointAddress::Ip(addr) => Some(*addr),
            _ => None,
        };
        filter::lock(filters).set_upstream(cluster.index, addr);
    }
    cluster.begin_endpoint_request(&endpoint);
    stream.upstream = Some(UpstreamStream {
        cluster: cluster.clone(),
        endpoint: endpoint.clone(),
        _permit: permit,
        pooled: None,
        reusable: true,
    });

    let started = clock::now_ns();
    let exchange = upstream::send(cluster, &endpoint, Request::from_parts(head, body));
    let outcome = match limit {
        Some(at) => match tokio::time::timeout_at(at, exchange).await {
            Ok(r) => r.map_err(Failure::Upstream),
            Err(_) => Err(Failure::Timeout),
        },
        None => exchange.await.map_err(Failure::Upstream),
    };
    let (resp, pooled) = match outcome {
        Ok(ok) => ok,
        Err(failure) => return Attempted::Failed(classify_failure(cluster, &endpoint, failure)),
    };
    let done = clock::now_ns();
    let latency = done.saturating_sub(started);
    cluster.metrics.latency.observe_ns(latency);
    endpoint.observe_latency(done, latency);

    let (mut rhead, rbody) = resp.into_parts();
    if rhead.status.is_server_error() {
        cluster.record_failure(&endpoint);
    } else {
        cluster.record_success(&endpoint);
    }
    if let Some(up) = stream.upstream.as_mut() {
        up.pooled = pooled;
    }
    if rhead.status != StatusCode::SWITCHING_PROTOCOLS {
        headers::strip_hop_by_hop(&mut rhead.headers, false);
    }
    Attempted::Response(rhead, rbody)
}

/// How far [`prime`] got with a body.
enum Primed {
    /// A filter ended the stream.
    Reply(LocalReply),
    /// The whole body went through the chain: its bytes and trailers.
    Whole(Bytes, Option<HeaderMap>),
    /// The first bytes came out of the chain; the rest is still to read.
    Streaming(Bytes, Incoming),
}

/// Reads `body` through the chain's body callbacks until something comes out of the chain,
/// the body ends, or a filter answers.
async fn prime(
    filters: &SharedFilterStream,
    direction: Direction,
    mut body: Incoming,
) -> Result<Primed, hyper::Error> {
    loop {
        let polled = body.frame().await.transpose()?;
        let ended = body.is_end_stream();
        let Some(passed) = crate::body::pass_frame(filters, direction, polled, ended) else {
            continue;
        };
        match passed.decision {
            BodyDecision::Respond(reply) => return Ok(Primed::Reply(reply)),
            BodyDecision::Continue(data) if passed.ended => {
                return Ok(Primed::Whole(data, passed.trailers));
            }
            BodyDecision::Continue(data) if !data.is_empty() => {
                return Ok(Primed::Streaming(data, body));
            }
            BodyDecision::Continue(_) => {}
        }
    }
}

/// Sets `content-length` for a body known whole (drops it when trailers follow, which need
/// chunked framing on HTTP/1.1).
fn set_body_length(headers: &mut HeaderMap, data: &Bytes, trailers: bool) {
    headers.remove(header::TRANSFER_ENCODING);
    if trailers {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
    }
}

/// Marks an HTTP/1 response given before the request body was read to its end
/// `connection: close`: the connection cannot carry another request, and the client must not
/// reuse it.
fn unread_body(mut resp: Response<ResponseBody>, version: Version) -> Response<ResponseBody> {
    if version <= Version::HTTP_11 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Counts the response by status class and returns it.
#[inline]
fn finish(
    ctx: &ListenerCtx,
    cluster: usize,
    resp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    ctx.metrics.count_response(cluster, resp.status().as_u16());
    resp
}

/// Points the request at the upstream: origin-form with a `host` header for HTTP/1.1,
/// absolute form (`:authority`) for HTTP/2.
fn set_upstream_target(
    head: &mut http::request::Parts,
    protocol: UpstreamProtocol,
) -> Result<(), (StatusCode, &'static str)> {
    let authority: Option<HeaderValue> = head.headers.get(header::HOST).cloned().or_else(|| {
        head.uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let path = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    match protocol {
        UpstreamProtocol::Http1 => {
            head.version = Version::HTTP_11;
            if head.uri.authority().is_some() {
                head.uri =
                    Uri::try_from(path).map_err(|_| (StatusCode::BAD_REQUEST, "bad path\n"))?;
            }
            match authority {
                Some(a) => {
                    head.headers.insert(header::HOST, a);
                }
                None => return Err((StatusCode::BAD_REQUEST, "missing host\n")),
            }
        }
        UpstreamProtocol::Http2 => {
            head.version = Version::HTTP_2;
            let Some(a) = authority else {
                return Err((StatusCode::BAD_REQUEST, "missing host\n"));
            };
            let uri = Uri::builder()
                .scheme("http")
                .authority(a.as_bytes())
                .path_and_query(path)
                .build()
                .map_err(|_| (StatusCode::BAD_REQUEST, "bad authority\n"))?;
            head.uri = uri;
            head.headers.remove(header::HOST);
        }
    }
    Ok(())
}

/// Why no upstream response arrived.
enum Failure {
    Upstream(UpstreamError),
    Timeout,
}

/// Counts a failed exchange against the endpoint and says what the client gets.
fn classify_failure(
    cluster: &Cluster,
    endpoint: &crate::cluster::Endpoint,
    failure: Failure,
) -> AttemptFailure {
    let (status, text, error, overflow) = match failure {
        Failure::Timeout => {
            cluster.metrics.timeouts.inc();
            cluster.record_failure(endpoint);
            (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout\n",
                AttemptError::Timeout,
                None,
            )
        }
        Failure::Upstream(UpstreamError::Overflow(limit)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream overflow\n",
            AttemptError::Overflow,
            Some(limit),
        ),
        Failure::Upstream(e) => {
            if e.is_endpoint_failure() {
                cluster.record_failure(endpoint);
            }
            tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.address, "{e}");
            match e {
                UpstreamError::Connect(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error\n",
                    AttemptError::ConnectFailure,
                    None,
                ),
                _ => {
                    cluster.metrics.resets.inc();
                    (
                        StatusCode::BAD_GATEWAY,
                        "upstream reset\n",
                        AttemptError::Reset,
                        None,
                    )
                }
            }
        }
    };
    AttemptFailure {
        status,
        text,
        error,
        overflow,
    }
}

/// Largest callout response body kept for the filter.
const CALLOUT_BODY_LIMIT: usize = 1024 * 1024;

/// Sends a filter's HTTP callout to its cluster (balanced, pooled and limited like any
/// request) and reads the whole response within the callout's timeout.
async fn run_callout(ctx: &ListenerCtx, callout: Callout) -> CalloutOutcome {
    let token = callout.token;
    let response = async {
        let cluster = ctx
            .clusters
            .iter()
            .find(|c| c.name == callout.cluster)
            .ok_or_else(|| format!("no cluster `{}`", callout.cluster))?;
        let _permit = cluster
            .admit_request()
            .map_err(|l| format!("overflow: {}", l.as_str()))?;
        let endpoint = worker::pick(cluster, clock::now_ms()).ok_or("no healthy upstream")?;
        let (mut head, body) = callout.request.into_parts();
        set_upstream_target(&mut head, cluster.protocol).map_err(|(_, why)| why.trim())?;
        let req = Request::from_parts(head, RequestBody::Full { body: body.into() });
        cluster.begin_endpoint_request(&endpoint);
        let result = async {
            let (resp, pooled) = upstream::send(cluster, &endpoint, req)
                .await
                .map_err(|e| e.to_string())?;
            let (head, body) = resp.into_parts();
            let limited = http_body_util::Limited::new(body, CALLOUT_BODY_LIMIT);
            let bytes = http_body_util::BodyExt::collect(limited)
                .await
                .map_err(|e| format!("callout body: {e}"))?
                .to_bytes();
            if let Some(p) = pooled {
                p.release();
            }
            Ok::<_, String>((head, bytes))
        }
        .await;
        cluster.end_endpoint_request(&endpoint);
        match &result {
            Ok((head, _)) if !head.status.is_server_error() => cluster.record_success(&endpoint),
            _ => cluster.record_failure(&endpoint),
        }
        result
    };
    let response = match tokio::time::timeout(callout.timeout, response).await {
        Ok(r) => r,
        Err(_) => Err("callout timed out".to_owned()),
    };
    CalloutOutcome { token, response }
}

/// A response a filter made.
fn filter_reply(reply: LocalReply, stream: Box<Stream>) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::local(reply.body, Some(stream)));
    *resp.status_mut() = reply.status;
    *resp.headers_mut() = reply.headers;
    if !resp.headers().contains_key(header::CONTENT_TYPE) {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    resp
}

/// A response the proxy makes itself.
fn local_reply(
    status: StatusCode,
    text: &'static str,
    stream: Box<Stream>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::local(
        Bytes::from_static(text.as_bytes()),
        Some(stream),
    ));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// Relays bytes both ways once both sides of an upgrade (e.g. WebSocket) completed.
async fn tunnel(down: OnUpgrade, up: OnUpgrade) {
    match tokio::join!(down, up) {
        (Ok(down), Ok(up)) => {
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                tracing::debug!("upgraded connection ended: {e}");
            }
        }
        (d, u) => tracing::debug!(
            downstream_ok = d.is_ok(),
            upstream_ok = u.is_ok(),
            "upgrade failed"
        ),
    }
}

/// Accounting of one stream, finished when its response body ends or is dropped.
///
/// The accounting runs in `Drop`, so it also runs when the request future is dropped before
/// any response body exists (the client went away while the upstream or a callout was
/// pending); [`StreamEnd::finish`] only records whether the body was read to its end.
struct Stream {
    conn: Arc<ConnShared>,
    upstream: Option<UpstreamStream>,
    filters: Option<SharedFilterStream>,
    /// The response body was read to its end.
    complete: bool,
}

struct UpstreamStream {
    cluster: Arc<Cluster>,
    endpoint: Arc<crate::cluster::Endpoint>,
    _permit: RequestPermit,
    pooled: Option<PooledH1>,
    reusable: bool,
}

impl UpstreamStream {
    /// Ends the attempt's accounting; a connection whose response was read to its end goes
    /// back to the pool.
    fn release(self, complete: bool) {
        self.cluster.end_endpoint_request(&self.endpoint);
        if let Some(pooled) = self.pooled
            && complete
            && self.reusable
        {
            pooled.release();
            self.cluster.connection_freed.notify_one();
        }
    }
}

impl StreamEnd for Stream {
    fn finish(mut self: Box<Self>, complete: bool) {
        self.complete = complete;
        // Dropping runs the accounting.
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(filters) = self.filters.take() {
            filter::lock(&filters).finish();
        }
        let conn = &self.conn;
        conn.listener.metrics.requests_active.dec();
        conn.in_flight.fetch_sub(1, Relaxed);
        conn.last_active_ms.store(clock::now_ms(), Relaxed);
        if let Some(up) = self.upstream.take() {
            up.release(self.complete);
        }
    }
}
