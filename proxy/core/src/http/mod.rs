//! The request path: one downstream request in, one response out, as named phases over one
//! request context ([`Exchange`]) with one error funnel ([`Early`]).
//!
//! ```text
//! handle
//!  ├─ admit            HTTP/1 framing verdict (content-length + transfer-encoding → 400)
//!  ├─ request_headers  x-request-id; filter chain on the head, in order; callouts a filter
//!  │                   pauses on are sent (callout.rs) and handed back; a filter may answer
//!  ├─ request_body     body callbacks: the head waits for the first bytes out of the chain
//!  ├─ route            what filters asked: cluster, timeouts, attempts, fault delay
//!  ├─ upstream_head    hop-by-hop, x-forwarded-*, target form for the cluster's protocol
//!  ├─ replay           the request kept whole when a filter asked for attempts
//!  ├─ attempts         upstream::dispatch ─► response_headers (filters, reverse order);
//!  │                   another attempt when a filter asks (weft.retry)  [attempt.rs]
//!  └─ response_body    body callbacks, then the client; a 101 starts the tunnel
//! any phase may end the exchange with an `Early` answer: one funnel turns it into the
//! response. The accounting (`Stream`) travels with the response body and finishes when the
//! body ends or is dropped, or when the request future is dropped.
//! ```

pub mod attempt;
pub mod callout;
pub mod connection;
pub mod framing;
pub mod headers;
pub mod reply;
pub mod stream;
pub mod tunnel;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http::header::{self, HeaderName};
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::upgrade::OnUpgrade;

use crate::body::{
    DownstreamBody, FilteredBody, Inbound, Primed, RequestBody, ResponseBody, prime,
};
use crate::clock;
use crate::filter::{
    self, Direction, LocalReply, RequestDecision, RouteOverrides, SharedFilterStream, StreamInfo,
};
use crate::metrics::{ListenerMetrics, ResponseCounters};
use crate::upstream::{Cluster, Clusters};
pub use connection::ConnShared;
use stream::Stream;

/// `x-weft-overloaded`: names the circuit-breaker limit that refused a request.
pub static X_WEFT_OVERLOADED: HeaderName = HeaderName::from_static("x-weft-overloaded");

/// The longest a filter may hold a stream whose cluster sets no request timeout.
pub const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(60);

/// `x-weft-attempt`: the attempt number, sent upstream on requests that may be retried.
pub static X_WEFT_ATTEMPT: HeaderName = HeaderName::from_static("x-weft-attempt");

/// `x-weft-reason`: why the proxy answered a request itself (no cluster for its authority).
pub static X_WEFT_REASON: HeaderName = HeaderName::from_static("x-weft-reason");

/// What a listener routes with now: its chain, the proxy's clusters and its default
/// cluster. Replaced whole when any of them changes; a stream keeps the one it started with,
/// so the chain it runs through and the cluster indexes it holds stay valid to its end.
pub struct Live {
    /// The filter chain, if the listener has filters.
    pub chain: Option<Arc<Box<dyn filter::FilterChain>>>,
    /// The proxy's clusters.
    pub clusters: Arc<Clusters>,
    /// The default cluster's index; `None`: each request goes to the cluster its authority
    /// names (when no filter chose one).
    pub default_cluster: Option<usize>,
    /// Answered-request counters and golden-metric cells by cluster index, made at a
    /// cluster's first answer; the last one counts requests no cluster was found for.
    requests: Box<[std::sync::OnceLock<Answered>]>,
}

/// Where a listener counts the answers to one cluster's requests.
struct Answered {
    /// Prometheus counters by status class.
    counters: ResponseCounters,
    /// The golden metrics the control service gets.
    golden: crate::golden::ClusterCells,
}

impl Live {
    /// What a listener runs with `chain`, `clusters` and the default cluster named
    /// `default_cluster` (empty: route by authority). A default cluster `clusters` does not
    /// have is an error.
    pub fn new(
        chain: Option<Arc<Box<dyn filter::FilterChain>>>,
        clusters: Arc<Clusters>,
        default_cluster: &str,
    ) -> Result<Self, String> {
        let default_cluster = match default_cluster {
            "" => None,
            name => Some(
                clusters
                    .find(name)
                    .ok_or_else(|| format!("no cluster named `{name}`"))?,
            ),
        };
        let requests = (0..=clusters.list.len())
            .map(|_| std::sync::OnceLock::new())
            .collect();
        Ok(Self {
            chain,
            clusters,
            default_cluster,
            requests,
        })
    }

    /// Counts an answer (`status` 0: a reset) to a request for `cluster` (by index; `None`:
    /// none was found) matched by `route`, `latency_ns` after it arrived.
    fn count_response(
        &self,
        ctx: &ListenerCtx,
        cluster: Option<usize>,
        route: Option<&str>,
        status: u16,
        latency_ns: u64,
    ) {
        let i = cluster.unwrap_or(self.clusters.list.len());
        let Some(slot) = self.requests.get(i) else {
            return;
        };
        let answered = slot.get_or_init(|| {
            let name = cluster.map_or("", |c| self.clusters.names[c].as_str());
            Answered {
                counters: ctx.metrics.requests(name),
                golden: ctx.metrics.golden(ctx.direction, name),
            }
        });
        if status != 0 {
            crate::metrics::count_response(&answered.counters, status);
        }
        answered.golden.record(route, status, latency_ns);
    }

    /// The cluster `authority` names: a cluster of that exact name, else of its host (the
    /// port left out), else of the host's first label when the rest is a Kubernetes-style
    /// namespace suffix (`echo.default`, `echo.default.svc`,
    /// `echo.default.svc.cluster.local`).
    pub fn cluster_for_authority(&self, authority: &str) -> Option<usize> {
        let c = &self.clusters;
        if let Some(i) = c.find(authority) {
            return Some(i);
        }
        let host = match authority.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') => h,
            _ => authority,
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if let Some(i) = c.find(host) {
            return Some(i);
        }
        let (first, rest) = host.split_once('.')?;
        let namespaced = !rest.is_empty()
            && (!rest.contains('.')
                || rest
                    .strip_suffix(".svc")
                    .is_some_and(|ns| !ns.contains('.'))
                || rest
                    .strip_suffix(".svc.cluster.local")
                    .is_some_and(|ns| !ns.contains('.')));
        if namespaced { c.find(first) } else { None }
    }
}

/// What the request path needs to know about its listener.
pub struct ListenerCtx {
    /// Listener name (metrics, logs).
    pub name: String,
    /// Chain, clusters and default cluster now.
    pub live: arc_swap::ArcSwap<Live>,
    /// Metric handles.
    pub metrics: ListenerMetrics,
    /// Largest request body kept for replay (retries).
    pub replay_limit: usize,
    /// Which way traffic goes through it (Envoy's number: 0 unspecified, 1 inbound, 2
    /// outbound).
    pub direction: u8,
    /// The stream idle timeout, if on.
    pub stream_idle_timeout: Option<std::time::Duration>,
    /// The proxy's overload state (one for all listeners).
    pub overload: Arc<crate::overload::Overload>,
    /// Requests one HTTP/1.1 downstream connection may carry (0: no limit).
    pub max_requests_per_connection: u64,
    /// Requests one HTTP/2 downstream connection may carry (0: no limit).
    pub max_requests_per_http2_connection: u64,
}

/// How an exchange ends before (or instead of) an upstream response: the one error funnel of
/// the request path. [`Exchange::answer`] turns it into the response.
pub enum Early {
    /// The proxy's own answer (`400 bad request body`, `502 upstream reset`, ...).
    Local {
        /// Status.
        status: StatusCode,
        /// Plain-text body.
        text: &'static str,
        /// Whether the HTTP/1 connection must close (the request body was not read to its
        /// end, or its framing cannot be trusted).
        close: bool,
    },
    /// A filter's local reply.
    Filter {
        /// The reply.
        reply: Box<LocalReply>,
        /// Whether the HTTP/1 connection must close (the request body was not read).
        close: bool,
    },
    /// The proxy's answer to a failed attempt, with the head the response filters left.
    Proxy(Box<http::response::Parts>),
    /// No cluster for the request's authority: 404, the authority named in `x-weft-reason`.
    NoCluster {
        /// The authority (or `host`) asked for.
        authority: String,
        /// Whether the HTTP/1 connection must close (the request body was not read).
        close: bool,
    },
}

impl Early {
    /// The request body could not be read (malformed framing, the client went away).
    fn bad_request_body(e: impl std::fmt::Display) -> Self {
        tracing::debug!("reading the request body: {e}");
        Early::Local {
            status: StatusCode::BAD_REQUEST,
            text: "bad request body\n",
            close: true,
        }
    }
}

/// One downstream request on its way through the phases.
pub struct Exchange {
    conn: Arc<ConnShared>,
    /// Accounting, finished when the response body ends or is dropped (or when the exchange
    /// is dropped first: the client went away).
    stream: Option<Box<Stream>>,
    /// When the request started, in [`clock`] nanoseconds.
    t0: u64,
    /// The HTTP version the client speaks.
    version: Version,
    /// What the listener routes with, as of the request's start.
    live: Arc<Live>,
    /// The cluster the request goes to (index into `live.clusters`), once known.
    cluster: Option<usize>,
    /// The stream through the filter chain, if the listener has one.
    filters: Option<SharedFilterStream>,
    /// The client takes trailers (HTTP/2, or HTTP/1.1 with `te: trailers`): otherwise the
    /// HTTP/1.1 codec drops them, and the response must not announce any.
    accepts_trailers: bool,
    /// The last request its connection may carry (`max_requests_per_connection`).
    last: bool,
    /// What a live tap keeps of the request, when one samples it.
    tap: Option<Box<crate::tap::Probe>>,
    /// What its span keeps, when tracing is on.
    span: Option<Box<crate::otlp::SpanProbe>>,
    /// Set when no filter can change the request head after the proxy stripped it: whether
    /// it asks for an upgrade and has an `expect` header (`upstream_head` then needs no
    /// second scan).
    clean_head: Option<(bool, bool)>,
}

/// A filter reset the stream (`proxy_close_stream`): the connection's server resets it
/// (HTTP/2 `RST_STREAM`) or closes the connection (HTTP/1.1) instead of answering.
#[derive(Debug, thiserror::Error)]
#[error("stream reset by a filter")]
pub struct StreamReset;

/// Proxies one request arriving on `conn`: its response, or [`StreamReset`] when a filter
/// reset the stream.
pub async fn handle(
    conn: Arc<ConnShared>,
    req: Request<DownstreamBody>,
) -> Result<Response<ResponseBody>, StreamReset> {
    let mut ex = Exchange::start(conn, req.version());
    let resp = match ex.run(req).await {
        Ok(resp) => resp,
        Err(Early::Filter { reply, .. }) if reply.reset => {
            ex.count_response(0);
            // The accounting (and the filters' `on_log`) ends here, with no response.
            drop(ex.take_stream());
            return Err(StreamReset);
        }
        Err(early) => ex.answer(early),
    };
    // The connection's last request, or keep-alive off under overload: HTTP/1.1 closes.
    let closing = ex.last || ex.ctx().overload.keepalive_off();
    let resp = if closing && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        reply::close_connection(resp, ex.version)
    } else {
        resp
    };
    ex.count_response(resp.status().as_u16());
    Ok(resp)
}

impl Drop for Exchange {
    /// An exchange dropped with its accounting still in hand never answered: its client
    /// cancelled it (an HTTP/2 reset, or a connection closed mid-request).
    fn drop(&mut self) {
        if self.stream.is_some() {
            self.conn
                .request_cancelled(clock::now_ns().saturating_sub(self.t0));
        }
    }
}

impl Exchange {
    /// Starts the accounting of a request.
    fn start(conn: Arc<ConnShared>, version: Version) -> Self {
        let t0 = clock::now_ns();
        let live = conn.listener.live.load_full();
        let cluster = match &conn.route_to {
            // Gone since the connection was routed (removed live): by authority instead.
            Some(name) => live.clusters.find(name),
            None => live.default_cluster,
        };
        let stream = Stream::begin(conn.clone(), clock::ns_to_ms(t0));
        let last = conn.request_started(version);
        Self {
            last,
            conn,
            stream: Some(stream),
            t0,
            version,
            live,
            cluster,
            filters: None,
            accepts_trailers: version >= Version::HTTP_2,
            tap: None,
            span: None,
            clean_head: None,
        }
    }

    fn ctx(&self) -> &ListenerCtx {
        &self.conn.listener
    }

    /// Counts the answer (`status` 0: a reset), with the route a filter matched; hands it to
    /// the taps sampling it.
    fn count_response(&mut self, status: u16) {
        let latency = clock::now_ns().saturating_sub(self.t0);
        let filters = self.filters.as_ref().map(filter::lock);
        let route = filters.as_ref().and_then(|f| f.route_name());
        self.live
            .count_response(self.ctx(), self.cluster, route, status, latency);
        if let Some(span) = self.span.take() {
            crate::otlp::end(
                span,
                crate::otlp::Answered {
                    inbound: self.ctx().direction == 1,
                    listener: &self.conn.listener.name,
                    cluster: self
                        .cluster
                        .and_then(|c| self.live.clusters.names.get(c))
                        .map_or("", |n| n.as_str()),
                    route,
                    status,
                    peer: self.conn.peer,
                },
            );
        }
        if let Some(probe) = self.tap.take() {
            let conn = &self.conn;
            crate::tap::emit(
                &probe,
                crate::tap::Answered {
                    listener: &conn.listener.name,
                    status,
                    latency_ns: latency,
                    source: conn.peer,
                    source_identity: conn
                        .tls
                        .as_ref()
                        .and_then(|t| t.peer_id.as_ref())
                        .map(|id| id.to_string()),
                    destination: self
                        .cluster
                        .and_then(|c| self.live.clusters.names.get(c))
                        .map_or("", |n| n.as_str()),
                    route,
                },
            );
        }
    }

    /// A clock for one of this stream's bodies under the stream idle timeout, if it is on.
    fn idle_clock(&self) -> Option<crate::idle::IdleClock> {
        let ctx = self.ctx();
        ctx.stream_idle_timeout.map(|limit| {
            crate::idle::IdleClock::new(limit).counted(ctx.metrics.stream_idle_timeouts.clone())
        })
    }

    /// The phases, in order.
    async fn run(&mut self, req: Request<DownstreamBody>) -> Result<Response<ResponseBody>, Early> {
        let (mut head, body) = req.into_parts();
        self.admit(&head)?;
        self.tap = crate::tap::probe(&head);
        self.span = crate::otlp::begin(&head);
        self.request_headers(&mut head, body.is_end_stream())
            .await?;
        if let Some(span) = &mut self.span {
            span.filtered(&head);
        }
        let body = self.request_body(&mut head, body).await?;
        let route = self.route().await;
        let (head, upgrade) = self.upstream_head(head)?;
        // Retries need the request again: kept whole if it fits the replay cap.
        let sendable = if route.max_attempts > 1 && upgrade.is_none() {
            self.replay(&head, body).await?
        } else {
            attempt::Sendable::Once(body)
        };
        let (rhead, rbody) = self.attempts(head, sendable, &route).await?;
        self.response_body(rhead, rbody, upgrade).await
    }

    /// Refuses what must not be forwarded: an HTTP/1 request whose framing is ambiguous
    /// (both `content-length` and `transfer-encoding`), which hyper would have normalised.
    fn admit(&self, head: &http::request::Parts) -> Result<(), Early> {
        if self.version <= Version::HTTP_11 {
            let n = self.conn.heads.fetch_add(1, Relaxed);
            if head.headers.contains_key(header::TRANSFER_ENCODING)
                && self.conn.framing.has_conflict(n) == Some(true)
            {
                return Err(Early::Local {
                    status: StatusCode::BAD_REQUEST,
                    text: "request has both content-length and transfer-encoding\n",
                    close: true,
                });
            }
        }
        Ok(())
    }

    /// The request id, then the filter chain on the request head (with the callouts a filter
    /// pauses on); a filter may choose the cluster or answer.
    async fn request_headers(
        &mut self,
        head: &mut http::request::Parts,
        end_of_stream: bool,
    ) -> Result<(), Early> {
        // As in Envoy, filters see the request with its hop-by-hop headers gone (so a
        // client's `connection:` cannot remove what the proxy adds next) and with the request
        // id and x-forwarded-* already set.
        let hop = headers::HopByHop::scan(&head.headers);
        let upgrade = self.version == Version::HTTP_11 && hop.wants_upgrade(&head.headers);
        self.accepts_trailers |= hop.has_te()
            && head.headers.get_all(header::TE).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("trailers"))
            });
        hop.strip(&mut head.headers, upgrade);
        // Without filters nothing changes the head before `upstream_head`: what this scan
        // found is still true there.
        if self.live.chain.is_none() {
            self.clean_head = Some((upgrade, hop.has_expect()));
        }
        headers::ensure_request_id(&mut head.headers);
        let proto = if self.conn.tls.is_some() {
            "https"
        } else {
            "http"
        };
        headers::set_forwarded(&mut head.headers, &self.conn.peer_ip, proto);
        let Some(chain) = self.live.chain.clone() else {
            return self.route_by_authority(head, end_of_stream);
        };
        let info = StreamInfo {
            source: self.conn.peer,
            destination: self.conn.local,
            start_ns: self.t0,
            start_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            connection_id: self.conn.id,
            upstream: None,
            // The listener's default cluster until a filter or the attempt says otherwise
            // (Envoy knows the route's cluster in the request phase).
            cluster: self.cluster.map(|c| c as u32),
            clusters: self.live.clusters.clone(),
            direction: self.ctx().direction,
            attempt: Default::default(),
            tls: self.conn.tls.clone(),
        };
        let filters: SharedFilterStream = Arc::new(std::sync::Mutex::new(chain.start_stream(info)));
        self.filters = Some(filters.clone());
        self.stream_mut().filters = Some(filters.clone());
        let mut decision = filter::lock(&filters).on_request_headers(head, end_of_stream);
        loop {
            match decision {
                RequestDecision::Continue { cluster: Some(c) }
                    if c < self.live.clusters.list.len() =>
                {
                    self.cluster = Some(c);
                    return Ok(());
                }
                RequestDecision::Continue { .. } => {
                    return self.route_by_authority(head, end_of_stream);
                }
                RequestDecision::Respond(reply) => {
                    return Err(Early::Filter {
                        reply: Box::new(reply),
                        close: false,
                    });
                }
                RequestDecision::Pause(callouts) => {
                    let outcomes = callout::run_all(&self.live.clusters, callouts).await;
                    decision = filter::lock(&filters).resume_request(head, end_of_stream, outcomes);
                }
                RequestDecision::Hold => {
                    self.hold(&filters, !end_of_stream).await?;
                    decision = filter::lock(&filters).resume_request(head, end_of_stream, vec![]);
                }
            }
        }
    }

    /// With no cluster chosen (no default cluster, no filter's choice), the cluster the
    /// request's authority names; none is a 404 that names the authority.
    fn route_by_authority(
        &mut self,
        head: &http::request::Parts,
        end_of_stream: bool,
    ) -> Result<(), Early> {
        if self.cluster.is_some() {
            return Ok(());
        }
        let authority = headers::request_authority(head);
        match self.live.cluster_for_authority(authority) {
            Some(c) => {
                self.cluster = Some(c);
                Ok(())
            }
            None => Err(Early::NoCluster {
                authority: authority.to_owned(),
                close: !end_of_stream,
            }),
        }
    }

    /// Body callbacks see the request body before anything goes upstream: the head waits
    /// until the first bytes come out of the chain, or the whole body if a filter buffers it.
    async fn request_body(
        &mut self,
        head: &mut http::request::Parts,
        body: DownstreamBody,
    ) -> Result<RequestBody, Early> {
        let mut body = match body {
            DownstreamBody::Hyper(body) => body,
            DownstreamBody::Empty => return Ok(RequestBody::empty()),
        };
        let filters = match &self.filters {
            Some(f)
                if !body.is_end_stream()
                    && filter::lock(f)
                        .wants_body(Direction::Request, may_have_trailers(self.version, &body)) =>
            {
                f.clone()
            }
            // An HTTP/1 chunked body: its first chunk is read before anything goes upstream,
            // so that malformed chunk framing (`0x5`, `-5`) is a 400 with nothing forwarded,
            // like every other framing error of the head, rather than a 502 after the head
            // went out. (The filter path below reads it first anyway.)
            // (Its `transfer-encoding` is gone by now, as hop-by-hop: an HTTP/1 request body
            // of no known length is chunked.)
            _ if self.version <= Version::HTTP_11
                && body.size_hint().exact().is_none()
                && !body.is_end_stream() =>
            {
                let first = match self.ctx().stream_idle_timeout {
                    Some(limit) => match tokio::time::timeout(limit, body.frame()).await {
                        Ok(first) => first,
                        Err(_) => {
                            self.ctx().metrics.stream_idle_timeouts.inc();
                            return Err(Early::Local {
                                status: StatusCode::REQUEST_TIMEOUT,
                                text: "request body idle past the stream idle timeout\n",
                                close: true,
                            });
                        }
                    },
                    None => body.frame().await,
                };
                return match first {
                    Some(Ok(first)) => Ok(RequestBody::Prefixed {
                        first: Some(first),
                        rest: Box::new(RequestBody::incoming(body, self.idle_clock())),
                    }),
                    None => Ok(RequestBody::empty()),
                    Some(Err(e)) => Err(Early::bad_request_body(e)),
                };
            }
            _ => {
                // An empty body has nothing to stall on: no clock.
                let idle = (!body.is_end_stream()).then(|| self.idle_clock()).flatten();
                return Ok(RequestBody::incoming(body, idle));
            }
        };
        match prime(&filters, Direction::Request, body.into(), self.hold_limit()).await {
            Ok(Primed::Reply(reply)) => Err(Early::Filter {
                reply: Box::new(reply),
                close: true,
            }),
            Ok(Primed::Whole(data, trailers)) => {
                reply::set_body_length(&mut head.headers, &data, trailers.is_some());
                Ok(RequestBody::Filtered {
                    body: FilteredBody::whole(data, trailers, Direction::Request),
                })
            }
            Ok(Primed::Streaming(first, rest)) => Ok(RequestBody::Filtered {
                body: FilteredBody::streaming(
                    first,
                    rest,
                    filters,
                    Direction::Request,
                    self.hold_limit(),
                ),
            }),
            Err(e) => Err(Early::bad_request_body(e)),
        }
    }

    /// What the filters asked of the request's routing; a fault delay is served here.
    async fn route(&self) -> RouteOverrides {
        let route = self
            .filters
            .as_ref()
            .map(|f| filter::lock(f).route())
            .unwrap_or_default();
        // A fault a filter injected: the request waits before it goes anywhere.
        if let Some(delay) = route.delay.filter(|d| !d.is_zero()) {
            tokio::time::sleep(delay).await;
        }
        route
    }

    /// Rewrites the head for the upstream hop; returns it with the downstream side of an
    /// upgrade the client asked for.
    fn upstream_head(
        &self,
        mut head: http::request::Parts,
    ) -> Result<(http::request::Parts, Option<OnUpgrade>), Early> {
        let (upgrade, expect) = match self.clean_head {
            Some(seen) => seen,
            None => {
                // Again: hop-by-hop headers a filter may have added do not go upstream.
                let hop = headers::HopByHop::scan(&head.headers);
                let upgrade = self.version == Version::HTTP_11 && hop.wants_upgrade(&head.headers);
                hop.strip(&mut head.headers, upgrade);
                (upgrade, hop.has_expect())
            }
        };
        let downstream_upgrade = if upgrade {
            head.extensions.remove::<OnUpgrade>()
        } else {
            None
        };
        // The proxy answers `expect: 100-continue` itself when it starts reading the body.
        if expect {
            head.headers.remove(header::EXPECT);
        }
        let protocol = self.target()?.protocol;
        attempt::set_upstream_target(&mut head, protocol).map_err(|(status, text)| {
            Early::Local {
                status,
                text,
                close: false,
            }
        })?;
        Ok((head, downstream_upgrade))
    }

    /// Keeps the request whole for more attempts, if its body fits the replay cap.
    async fn replay(
        &self,
        head: &http::request::Parts,
        body: RequestBody,
    ) -> Result<attempt::Sendable, Early> {
        match attempt::Replay::buffer(head, body, self.ctx().replay_limit).await {
            Ok(Ok(r)) => Ok(attempt::Sendable::Replay(Box::new(r))),
            Ok(Err(body)) => Ok(attempt::Sendable::Once(body)),
            Err(e) => Err(Early::bad_request_body(e)),
        }
    }

    /// The upstream response on its way to the client: a protocol upgrade starts its tunnel;
    /// body callbacks see the body first (the head waits for the first bytes out of the
    /// chain, so a filter buffering the whole body can still replace the response or fix its
    /// length).
    async fn response_body(
        &mut self,
        mut rhead: http::response::Parts,
        rbody: Inbound,
        downstream_upgrade: Option<OnUpgrade>,
    ) -> Result<Response<ResponseBody>, Early> {
        let switching = rhead.status == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            if let (Some(down), Some(up)) =
                (downstream_upgrade, rhead.extensions.remove::<OnUpgrade>())
            {
                tokio::spawn(tunnel::tunnel(
                    down,
                    up,
                    tunnel::Open::new(self.conn.clone()),
                    self.target()?.clone(),
                    self.ctx().stream_idle_timeout,
                ));
            }
            if let Some(up) = self.stream_mut().upstream.as_mut() {
                up.reusable = false;
            }
        }
        rhead.version = self.version;
        if !self.accepts_trailers {
            rhead.headers.remove(header::TRAILER);
        }
        let filters = match &self.filters {
            Some(f)
                if !rbody.is_end_stream()
                    && !switching
                    && filter::lock(f).wants_body(
                        Direction::Response,
                        may_have_trailers(rhead.version, &rbody),
                    ) =>
            {
                f.clone()
            }
            _ => {
                // An empty body has nothing to stall on: no clock.
                let idle = (!rbody.is_end_stream())
                    .then(|| self.idle_clock())
                    .flatten();
                return Ok(Response::from_parts(
                    rhead,
                    ResponseBody::upstream(rbody, Some(self.take_stream())).watched(idle),
                ));
            }
        };
        let body = match prime(&filters, Direction::Response, rbody, self.hold_limit()).await {
            Ok(Primed::Reply(reply)) => {
                return Err(Early::Filter {
                    reply: Box::new(reply),
                    close: false,
                });
            }
            Ok(Primed::Whole(data, trailers)) => {
                reply::set_body_length(&mut rhead.headers, &data, trailers.is_some());
                FilteredBody::whole(data, trailers, Direction::Response)
            }
            Ok(Primed::Streaming(first, rest)) => FilteredBody::streaming(
                first,
                rest,
                filters,
                Direction::Response,
                self.hold_limit(),
            ),
            Err(e) => {
                let cluster = self.target()?;
                tracing::debug!(cluster = %cluster.name, "reading the response body: {e}");
                cluster.metrics.resets.inc();
                return Err(Early::Local {
                    status: StatusCode::BAD_GATEWAY,
                    text: "upstream reset\n",
                    close: false,
                });
            }
        };
        Ok(Response::from_parts(
            rhead,
            ResponseBody::filtered(body, Some(self.take_stream())).watched(self.idle_clock()),
        ))
    }

    /// Waits while a filter holds the stream, at most the request's timeout (the cluster's,
    /// else [`MAX_HOLD`]): past it the request ends with 504 and never goes upstream.
    /// `unread`: the request body was not read (an HTTP/1 connection then closes).
    async fn hold(&self, filters: &SharedFilterStream, unread: bool) -> Result<(), Early> {
        let held = filter::lock(filters).held();
        tokio::time::timeout(self.hold_limit(), held)
            .await
            .map_err(|_| Early::Local {
                status: StatusCode::GATEWAY_TIMEOUT,
                text: "held by a filter past the request timeout\n",
                close: unread,
            })
    }

    /// How long a filter may hold the stream or its body: the cluster's request timeout,
    /// else [`MAX_HOLD`].
    fn hold_limit(&self) -> std::time::Duration {
        self.target()
            .ok()
            .and_then(|c| c.request_timeout)
            .unwrap_or(MAX_HOLD)
    }

    /// The cluster the request goes to: known once the request phase has passed (a request
    /// with none has ended with [`Early::NoCluster`] there).
    fn target(&self) -> Result<&Arc<Cluster>, Early> {
        self.cluster
            .and_then(|c| self.live.clusters.list.get(c))
            .ok_or_else(|| Early::NoCluster {
                authority: String::new(),
                close: true,
            })
    }

    /// The one funnel: an early end of the exchange as its response.
    fn answer(&mut self, early: Early) -> Response<ResponseBody> {
        let stream = self.take_stream();
        let (resp, close) = match early {
            Early::Local {
                status,
                text,
                close,
            } => (reply::local_reply(status, text, stream), close),
            Early::Filter { reply, close } => (reply::filter_reply(*reply, stream), close),
            Early::Proxy(head) => (reply::proxy_answer(*head, stream), false),
            Early::NoCluster { authority, close } => {
                let mut resp = reply::local_reply(
                    StatusCode::NOT_FOUND,
                    "no cluster for this authority\n",
                    stream,
                );
                let reason = format!("no cluster for authority \"{authority}\"");
                if let Ok(v) = http::HeaderValue::from_str(&reason) {
                    resp.headers_mut().insert(X_WEFT_REASON.clone(), v);
                }
                (resp, close)
            }
        };
        if close {
            reply::close_connection(resp, self.version)
        } else {
            resp
        }
    }

    /// The accounting, while the exchange holds it.
    fn stream_mut(&mut self) -> &mut Stream {
        self.stream
            .as_mut()
            .expect("the stream leaves the exchange only with its response")
    }

    /// The accounting, handed to the response (body) that finishes it.
    fn take_stream(&mut self) -> Box<Stream> {
        self.stream
            .take()
            .expect("the stream leaves the exchange only with its response")
    }
}

/// Whether `body` may end with trailers: an HTTP/1 body of known length cannot (trailers
/// need chunked coding there); an HTTP/2 body always may.
fn may_have_trailers(version: Version, body: &impl http_body::Body) -> bool {
    version >= Version::HTTP_2 || body.size_hint().exact().is_none()
}

#[cfg(test)]
mod tests {
    //! Phases tested on their own, on an exchange built without a connection.

    use http::HeaderValue;

    use super::*;
    use crate::config::ClusterConfig;
    use crate::metrics::Metrics;

    #[test]
    fn authorities_name_clusters_with_or_without_port_and_namespace() {
        let metrics = Metrics::new();
        let cluster = |name: &str| {
            let cfg: ClusterConfig = serde_yaml_ng::from_str(&format!("name: {name}")).unwrap();
            Arc::new(Cluster::new(&cfg, metrics.cluster(name)))
        };
        let clusters = Clusters::new(vec![cluster("echo"), cluster("api.example.com")]);
        let live = Live::new(None, Arc::new(clusters), "").unwrap();
        for hit in [
            "echo",
            "echo:80",
            "echo.default",
            "echo.prod:8080",
            "echo.default.svc",
            "echo.default.svc.cluster.local",
            "echo.default.svc.cluster.local.:80",
        ] {
            assert_eq!(live.cluster_for_authority(hit), Some(0), "{hit}");
        }
        assert_eq!(live.cluster_for_authority("api.example.com:443"), Some(1));
        for miss in [
            "",
            "other",
            "echo.a.b",
            "echo.default.svc.cluster.other",
            "echox",
            "[::1]:80",
        ] {
            assert_eq!(live.cluster_for_authority(miss), None, "{miss}");
        }
        assert!(Live::new(None, live.clusters.clone(), "nope").is_err());
    }

    fn exchange(protocol: &str) -> Exchange {
        let metrics = Metrics::new();
        let cfg: ClusterConfig = serde_yaml_ng::from_str(&format!(
            "name: svc\nprotocol: {protocol}\nendpoints: [{{ address: \"127.0.0.1:9\" }}]"
        ))
        .unwrap();
        let cluster = Arc::new(Cluster::new(&cfg, metrics.cluster("svc")));
        let clusters = Arc::new(Clusters::new(vec![cluster]));
        let ctx = Arc::new(ListenerCtx {
            name: "ingress".into(),
            live: arc_swap::ArcSwap::from_pointee(Live::new(None, clusters, "svc").unwrap()),
            direction: 0,
            metrics: metrics.listener("ingress"),
            replay_limit: 1024,
            max_requests_per_connection: 0,
            max_requests_per_http2_connection: 0,
            stream_idle_timeout: None,
            overload: Arc::new(crate::overload::Overload::new(
                0,
                80,
                Default::default(),
                Default::default(),
            )),
        });
        let peer = "10.1.2.3:5555".parse().unwrap();
        let conn = Arc::new(ConnShared::new(
            ctx,
            peer,
            "127.0.0.1:15001".parse().unwrap(),
            None,
        ));
        Exchange::start(conn, Version::HTTP_11)
    }

    fn head(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut req = Request::get(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn upstream_head_rewrites_for_an_http1_cluster() {
        let ex = exchange("http1");
        let h = head(
            "http://example.com/a?b=1",
            &[
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("expect", "100-continue"),
            ],
        );
        let (h, upgrade) = ex.upstream_head(h).ok().unwrap();
        assert!(upgrade.is_none());
        assert_eq!(h.uri, "/a?b=1", "origin form");
        assert_eq!(h.headers["host"], "example.com");
        for gone in ["connection", "x-secret", "keep-alive", "expect"] {
            assert!(!h.headers.contains_key(gone), "{gone} forwarded");
        }
    }

    #[tokio::test]
    async fn filters_see_the_request_without_hop_by_hop_headers_and_with_forwarding_set() {
        let mut ex = exchange("http1");
        let mut h = head(
            "/a",
            &[
                ("host", "example.com"),
                // A client naming the proxy's own headers hop-by-hop cannot remove them.
                ("connection", "x-forwarded-for, x-request-id, x-secret"),
                ("x-secret", "1"),
                ("x-forwarded-for", "192.0.2.9"),
            ],
        );
        ex.request_headers(&mut h, true).await.ok().unwrap();
        assert!(!h.headers.contains_key("connection"));
        assert!(!h.headers.contains_key("x-secret"));
        // The client's own x-forwarded-for was named hop-by-hop (dropped); the proxy's is set.
        assert_eq!(h.headers["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h.headers["x-forwarded-proto"], "http");
        assert_eq!(h.headers["x-request-id"].len(), 36);
    }

    #[test]
    fn upstream_head_uses_the_authority_for_an_http2_cluster_and_needs_a_host() {
        let ex = exchange("http2");
        let (h, _) = ex
            .upstream_head(head("/p", &[("host", "svc.local:8080")]))
            .ok()
            .unwrap();
        assert_eq!(h.version, Version::HTTP_2);
        assert_eq!(h.uri, "http://svc.local:8080/p");
        assert!(!h.headers.contains_key("host"));
        match ex.upstream_head(head("/p", &[])) {
            Err(Early::Local { status, text, .. }) => {
                assert_eq!((status, text), (StatusCode::BAD_REQUEST, "missing host\n"));
            }
            _ => panic!("a request without a host is refused"),
        }
    }

    #[test]
    fn answers_carry_the_status_and_close_http1_connections_when_asked() {
        let mut ex = exchange("http1");
        let resp = ex.answer(Early::Local {
            status: StatusCode::BAD_REQUEST,
            text: "bad request body\n",
            close: true,
        });
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(resp.headers()["connection"], "close");
        assert_eq!(resp.headers()["content-type"], "text/plain");
        // The accounting travels with the response: the listener counts it active until the
        // body is done.
        assert!(ex.stream.is_none());

        let mut ex = exchange("http1");
        let mut headers = http::HeaderMap::new();
        headers.insert("x-why", HeaderValue::from_static("policy"));
        let reply = LocalReply {
            status: StatusCode::FORBIDDEN,
            headers,
            body: "no\n".into(),
            reset: false,
        };
        let resp = ex.answer(Early::Filter {
            reply: Box::new(reply),
            close: false,
        });
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()["x-why"], "policy");
        assert!(!resp.headers().contains_key("connection"));
    }
}
