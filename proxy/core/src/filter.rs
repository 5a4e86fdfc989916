//! The seam between the core proxy and a filter chain.
//!
//! The request path calls a listener's chain after the downstream request is decoded and
//! before an upstream is chosen, and again on the response headers. The chain a stream
//! starts with is the chain it finishes with: the listener holds it behind an atomic pointer
//! (`arc-swap`), a stream takes its own reference, and swapping in a new chain affects only
//! streams that start afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{HeaderMap, StatusCode, request, response};

use crate::config::FilterConfig;
use crate::metrics::Metrics;

/// Builds filter chains: loads each filter of a listener's chain and proves it can start (a
/// canary instance), so that a bad module or config is an error before the chain serves a
/// stream. The WASM host (crate `weft-wasm`) implements it; the core never sees what runs
/// behind it.
pub trait FilterHost: Send + Sync {
    /// Builds the chain of `listener` from `filters`; `clusters` are the proxy's clusters as
    /// they are at each moment (a filter may send callouts to them by name; a stream's
    /// requests go to the clusters of [`StreamInfo::clusters`]).
    fn build_chain(
        &self,
        listener: &str,
        filters: &[FilterConfig],
        clusters: &std::sync::Arc<crate::upstream::ClusterTable>,
        metrics: &Metrics,
    ) -> Result<Box<dyn FilterChain>, ChainError>;
}

/// Why a filter chain could not be built: names the listener, the filter and its module.
#[derive(Debug, thiserror::Error)]
#[error("listener `{listener}`: filter `{filter}` ({}): {message}", module.display())]
pub struct ChainError {
    /// The listener.
    pub listener: String,
    /// The filter's name.
    pub filter: String,
    /// The module's path.
    pub module: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// What the chain decided about a request.
pub enum RequestDecision {
    /// Go on to the upstream, to cluster `cluster` (an index into [`StreamInfo::clusters`]) or to
    /// the listener's default cluster when `None`.
    Continue {
        /// The chosen cluster.
        cluster: Option<usize>,
    },
    /// Answer the request locally with this response; nothing goes upstream.
    Respond(LocalReply),
    /// Hold the request until these HTTP callouts are answered, then call
    /// [`FilterStream::resume_request`] with their outcomes.
    Pause(Vec<Callout>),
    /// Hold the request until the filter takes it up again from another context (a tick, a
    /// queue, another stream): wait for [`FilterStream::held`], then call
    /// [`FilterStream::resume_request`] with no outcomes. Nothing goes upstream meanwhile.
    Hold,
}

/// An HTTP request a filter sends to a cluster of the proxy (`proxy_http_call`, and the
/// unary `proxy_grpc_call`).
#[derive(Debug)]
pub struct Callout {
    /// Token the filter got for it.
    pub token: u32,
    /// Name of the cluster to send it to.
    pub cluster: String,
    /// The request (origin-form URI, `host` header set). A request of version HTTP/2 must go
    /// over HTTP/2 (gRPC): to a cluster that speaks HTTP/1.1 it fails.
    pub request: http::Request<Bytes>,
    /// Trailers to send after the body (over HTTP/2; HTTP/1.1 has no way to carry them with
    /// a body of known length).
    pub trailers: Option<HeaderMap>,
    /// Time allowed for the response.
    pub timeout: std::time::Duration,
}

/// How a callout ended.
#[derive(Debug)]
pub struct CalloutOutcome {
    /// The callout's token.
    pub token: u32,
    /// The response, or why there is none.
    pub response: Result<CalloutResponse, String>,
}

/// The whole response to a callout.
#[derive(Debug)]
pub struct CalloutResponse {
    /// Status and headers.
    pub head: response::Parts,
    /// The body (up to the callout body limit).
    pub body: Bytes,
    /// The trailers, if the response had any (gRPC status).
    pub trailers: Option<HeaderMap>,
}

/// A response made by a filter.
#[derive(Debug)]
pub struct LocalReply {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Reset the stream instead of answering (`proxy_close_stream`): HTTP/2 resets the
    /// stream, HTTP/1.1 closes the connection without a response. The other fields are then
    /// unused.
    pub reset: bool,
}

/// What the chain decided about a response.
pub enum ResponseDecision {
    /// Send the (possibly rewritten) response on.
    Continue,
    /// Replace the response with this one.
    Respond(LocalReply),
    /// Hold the response until these HTTP callouts are answered, then call
    /// [`FilterStream::resume_response`] with their outcomes.
    Pause(Vec<Callout>),
    /// Drop this response and make another attempt (the filters before the one that asked
    /// do not see this response).
    Retry(RetryAsk),
    /// Hold the response until the filter takes it up again from another context: wait for
    /// [`FilterStream::held`], then call [`FilterStream::resume_response`] with no outcomes.
    Hold,
}

/// Which way a body flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The request body, downstream to upstream (filters in chain order).
    Request = 0,
    /// The response body, upstream to downstream (filters in reverse order).
    Response = 1,
}

/// What the chain did with a piece of body or with trailers.
pub enum BodyDecision {
    /// These bytes came out of the end of the chain (empty while a filter buffers); for
    /// trailers, they go before the (possibly rewritten) trailers.
    Continue(Bytes),
    /// End the stream with this response: 413 or 500 for an overflowing buffer, or a filter's
    /// own local response.
    Respond(LocalReply),
    /// A filter holds the body (it paused with a callout out, or waits to be taken up from
    /// another context): wait for [`FilterStream::held`], then call
    /// [`FilterStream::resume_body`]. Nothing of the body goes on meanwhile.
    Hold,
}

/// Why an upstream attempt produced no upstream response (the ABI's enum: filters read it
/// through `weft.attempt`).
pub use weft_abi::ext::AttemptError;

/// One attempt at the upstream, as filters see it in the response phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first attempt, 0 before any.
    pub number: u32,
    /// The response status of this attempt (the proxy's own status when it failed).
    pub status: u16,
    /// Why there was no upstream response, if there was none.
    pub error: AttemptError,
    /// Whether another attempt can be made (attempts and time left, request replayable).
    pub retry_allowed: bool,
}

/// What filters asked of the request's routing during the request phase (Weft's `weft.*`
/// extensions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteOverrides {
    /// Replaces the cluster's request timeout for the whole request (all attempts).
    pub timeout: Option<std::time::Duration>,
    /// Bounds each attempt.
    pub try_timeout: Option<std::time::Duration>,
    /// Attempts the request may get (1: no retries).
    pub max_attempts: u32,
    /// Hold the request this long before it goes upstream (fault injection).
    pub delay: Option<std::time::Duration>,
}

/// A filter's request for another attempt, made in the response phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAsk {
    /// Wait this long first.
    pub delay: std::time::Duration,
    /// Prefer endpoints not tried yet.
    pub exclude_tried: bool,
}

/// Facts about a stream that filters can read (as proxy-wasm properties).
#[derive(Clone, Debug)]
pub struct StreamInfo {
    /// The downstream peer.
    pub source: SocketAddr,
    /// The local address the request arrived on.
    pub destination: SocketAddr,
    /// When the stream started, in [`crate::clock`] nanoseconds.
    pub start_ns: u64,
    /// When the stream started, in nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    /// The downstream connection's id.
    pub connection_id: u64,
    /// The upstream endpoint chosen for the request, once chosen (for a host name, once a
    /// connection reached it).
    pub upstream: Option<SocketAddr>,
    /// The cluster the request goes to (index into `clusters`): the listener's default
    /// until a filter chooses another or the attempt is sent.
    pub cluster: Option<u32>,
    /// The proxy's clusters as of the stream's start: what a filter chooses from.
    pub clusters: std::sync::Arc<crate::upstream::Clusters>,
    /// Which way traffic goes through the listener (0 unspecified, 1 inbound, 2 outbound).
    pub direction: u8,
    /// The attempt whose response is being processed.
    pub attempt: Attempt,
    /// The downstream connection's TLS, when it has TLS.
    pub tls: Option<std::sync::Arc<crate::tls::PeerTls>>,
}

/// A listener's filter chain.
pub trait FilterChain: Send + Sync {
    /// Starts a stream through the chain.
    fn start_stream(&self, info: StreamInfo) -> Box<dyn FilterStream>;
    /// Starts an opaque TCP connection through the chain's network filters (proxy-wasm
    /// `StreamContext`s); `None` when the chain cannot run on connections.
    fn start_connection(&self, _info: StreamInfo) -> Option<Box<dyn ConnectionFilter>> {
        None
    }
    /// Prepares the calling worker's state for the chain ahead of the first stream.
    fn warm(&self) {}
}

/// One stream's passage through a chain. It lives on the worker thread that started it.
pub trait FilterStream: Send {
    /// Called with the request head, in chain order; may rewrite it or answer locally.
    fn on_request_headers(
        &mut self,
        head: &mut request::Parts,
        end_of_stream: bool,
    ) -> RequestDecision;
    /// Called with the outcomes of the callouts a [`RequestDecision::Pause`] asked for;
    /// carries on along the chain from the filter that paused.
    fn resume_request(
        &mut self,
        head: &mut request::Parts,
        end_of_stream: bool,
        outcomes: Vec<CalloutOutcome>,
    ) -> RequestDecision;
    /// Called with the response head, in reverse chain order; may rewrite or replace it.
    fn on_response_headers(
        &mut self,
        head: &mut response::Parts,
        end_of_stream: bool,
    ) -> ResponseDecision;
    /// Called with the outcomes of the callouts a [`ResponseDecision::Pause`] asked for;
    /// carries on along the chain (in reverse order) from the filter that paused.
    fn resume_response(
        &mut self,
        _head: &mut response::Parts,
        _end_of_stream: bool,
        _outcomes: Vec<CalloutOutcome>,
    ) -> ResponseDecision {
        ResponseDecision::Continue
    }
    /// Whether the chain wants to see the body (and trailers) flowing in `direction`;
    /// `trailers`: the body may end with trailers (an HTTP/1 body of known length cannot).
    /// When false, the body streams through untouched.
    fn wants_body(&self, _direction: Direction, _trailers: bool) -> bool {
        false
    }
    /// Passes a piece of body through the chain. `end_of_stream` is set on the last piece
    /// (which may be empty); pieces a filter holds back come out with a later call.
    fn on_body(
        &mut self,
        _direction: Direction,
        data: Bytes,
        _end_of_stream: bool,
    ) -> BodyDecision {
        BodyDecision::Continue(data)
    }
    /// Passes trailers through the chain (which ends the body): each filter first releases
    /// what it buffered.
    fn on_trailers(&mut self, _direction: Direction, _trailers: &mut HeaderMap) -> BodyDecision {
        BodyDecision::Continue(Bytes::new())
    }
    /// Called once the body a filter held ([`BodyDecision::Hold`]) was taken up again;
    /// `trailers` are those that came with the piece that was held. Carries on along the
    /// chain from the filter that held it.
    fn resume_body(
        &mut self,
        _direction: Direction,
        _trailers: Option<&mut HeaderMap>,
    ) -> BodyDecision {
        BodyDecision::Continue(Bytes::new())
    }
    /// Ends a body hold that went past its time with `reply`: the filter's hold is dropped
    /// and the stream ends as if the filter had answered (for a request whose head already
    /// went upstream, the reply is kept for [`FilterStream::take_reply`]).
    fn end_hold(&mut self, _direction: Direction, reply: LocalReply) -> BodyDecision {
        BodyDecision::Respond(reply)
    }
    /// Resolves when the filter holding the stream ([`RequestDecision::Hold`],
    /// [`ResponseDecision::Hold`], [`BodyDecision::Hold`]) takes it up again, however it
    /// does (resumes, answers, fails). The request path bounds the wait with the request's
    /// timeout.
    fn held(&mut self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(std::future::ready(()))
    }
    /// A local reply the chain decided on while the request body was already streaming
    /// upstream (the upstream exchange is then abandoned).
    fn take_reply(&mut self) -> Option<LocalReply> {
        None
    }
    /// Tells the stream which cluster (by index) and endpoint the request goes to: its socket
    /// address (for a host name, the one its connection reached; called again once known).
    fn set_upstream(&mut self, _cluster: usize, _address: Option<SocketAddr>) {}
    /// What the filters asked of the request's routing (read after the request phase).
    fn route(&self) -> RouteOverrides {
        RouteOverrides::default()
    }
    /// Tells the stream how the current attempt ended, before its response callbacks.
    fn set_attempt(&mut self, _attempt: Attempt) {}
    /// The name of the route a router filter matched (its `weft.route` property), for the
    /// golden metrics.
    fn route_name(&self) -> Option<&str> {
        None
    }

    /// Called once when the stream has ended (for logging and cleanup).
    fn finish(&mut self);
}

/// A stream's passage through its chain, shared between the request task and the body
/// streams it feeds. All of them run on the stream's worker thread and never hold the lock
/// across an await, so it is never contended.
pub type SharedFilterStream = std::sync::Arc<std::sync::Mutex<Box<dyn FilterStream>>>;

/// Locks a shared stream (a panic while it was held does not make it unusable).
pub fn lock(stream: &SharedFilterStream) -> std::sync::MutexGuard<'_, Box<dyn FilterStream>> {
    stream
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The chain slot of a listener: `None` when the listener has no filters.
pub type ChainSlot = arc_swap::ArcSwapOption<Box<dyn FilterChain>>;

/// Which way bytes of an opaque connection go through network filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// From the client towards the upstream (`proxy_on_downstream_data`, buffer 2).
    Downstream,
    /// From the upstream back to the client (`proxy_on_upstream_data`, buffer 3).
    Upstream,
}

/// What the network filters say of bytes they were given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkAction {
    /// Pass on what the filters made of them.
    Continue,
    /// A filter holds them until more arrive (they are given to it again with the rest).
    Pause,
    /// Close the connection (a failed filter under `fail_closed`).
    Close,
}

/// One opaque connection's passage through a chain of network filters. It lives on the
/// worker thread that accepted the connection.
pub trait ConnectionFilter: Send {
    /// The connection is up (`proxy_on_new_connection`, chain order).
    fn on_new_connection(&mut self) -> NetworkAction;
    /// Bytes read from one side, in `flow`'s order (downstream: chain order; upstream:
    /// reverse); `data` becomes what goes on (empty while a filter pauses).
    fn on_data(&mut self, flow: Flow, data: &mut Vec<u8>, end_of_stream: bool) -> NetworkAction;
    /// A side closed (`proxy_on_downstream_connection_close` /
    /// `proxy_on_upstream_connection_close`).
    fn on_close(&mut self, flow: Flow);
    /// The connection ended: `on_done`, `on_log`, `on_delete`.
    fn finish(&mut self);
}
