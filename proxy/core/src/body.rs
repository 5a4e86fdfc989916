//! Body types of the request path.
//!
//! [`RequestBody`] is what goes upstream; [`ResponseBody`] is what goes downstream. The
//! response body carries a [`StreamGuard`] that finishes the stream's accounting when the
//! body ends or is dropped, and hands a reusable HTTP/1 connection back to the worker's pool
//! only when the upstream response was read to its end.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use http_body_util::Full;
use hyper::body::Incoming;

use crate::filter::{self, BodyDecision, Direction, LocalReply, SharedFilterStream};
use crate::idle::{IdleClock, idle_error};
use crate::upstream::h1;
use pin_project_lite::pin_project;

/// A boxed error crossing the body boundary.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body as the downstream server hands it over: hyper's, or none (a request the
/// inline HTTP/1.1 server read: it serves only requests without a body).
pub enum DownstreamBody {
    /// Read by hyper.
    Hyper(Incoming),
    /// No body.
    Empty,
}

impl DownstreamBody {
    /// Whether nothing more will come of it.
    pub fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(body) => body.is_end_stream(),
            Self::Empty => true,
        }
    }
}

impl From<Incoming> for DownstreamBody {
    fn from(body: Incoming) -> Self {
        Self::Hyper(body)
    }
}

pin_project! {
    /// A body the proxy reads from a peer: hyper's (a downstream request, an upstream
    /// response over HTTP/2 or through hyper's HTTP/1.1 client) or an upstream response read
    /// by the inline HTTP/1.1 codec ([`h1::ResponseBody`]).
    #[project = InboundProj]
    #[allow(missing_docs)] // pin-project-lite takes no docs on variant fields
    pub enum Inbound {
        /// Read by hyper.
        Hyper { #[pin] body: Incoming },
        /// Read inline.
        H1 { body: h1::ResponseBody },
    }
}

impl From<Incoming> for Inbound {
    fn from(body: Incoming) -> Self {
        Self::Hyper { body }
    }
}

impl From<h1::ResponseBody> for Inbound {
    fn from(body: h1::ResponseBody) -> Self {
        Self::H1 { body }
    }
}

impl Body for Inbound {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            InboundProj::Hyper { body } => body.poll_frame(cx).map_err(Into::into),
            InboundProj::H1 { body } => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper { body } => body.is_end_stream(),
            Self::H1 { body } => body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper { body } => body.size_hint(),
            Self::H1 { body } => body.size_hint(),
        }
    }
}

pin_project! {
    /// A request body sent upstream: the downstream body streamed through, or a body a
    /// filter produced.
    #[project = RequestBodyProj]
    #[allow(missing_docs)] // pin-project-lite takes no docs on variant fields
    pub enum RequestBody {
        /// Streamed from downstream, ended if it stalls for the stream idle timeout.
        Incoming { #[pin] body: Incoming, idle: Option<IdleClock> },
        /// Fully buffered.
        Full { #[pin] body: Full<Bytes> },
        /// Streamed from downstream through the filter chain's body callbacks.
        Filtered { body: FilteredBody },
        /// A frame already read, then the rest of a body.
        Prefixed { first: Option<Frame<Bytes>>, rest: Box<RequestBody> },
        /// Pieces sent on a channel as they are made (a filter's gRPC stream): `Some` is
        /// data, `None` the end. A sender dropped before the end fails the body, so the
        /// upstream stream is reset rather than ended cleanly.
        Channel { rx: tokio::sync::mpsc::UnboundedReceiver<Option<Bytes>>, ended: bool },
    }
}

/// What a body poll becomes under its idle clock: a frame is activity; waiting past the
/// limit ends the body with an error (the stream idle timeout).
#[inline]
fn watch_idle(
    polled: Poll<Option<Result<Frame<Bytes>, BoxError>>>,
    idle: &mut Option<IdleClock>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    let Some(clock) = idle else {
        return polled;
    };
    match polled {
        Poll::Ready(Some(Ok(_))) => clock.touch(),
        Poll::Pending if clock.poll_idle(cx).is_ready() => {
            clock.expired();
            return Poll::Ready(Some(Err(idle_error(clock.limit()).into())));
        }
        _ => {}
    }
    polled
}

impl RequestBody {
    /// A body streamed from downstream, ended if it stalls for `idle` (if any).
    pub fn incoming(body: Incoming, idle: Option<IdleClock>) -> Self {
        Self::Incoming { body, idle }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::Full {
            body: Full::new(Bytes::new()),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            RequestBodyProj::Incoming { body, idle } => {
                let polled = body.poll_frame(cx).map_err(Into::into);
                watch_idle(polled, idle, cx)
            }
            RequestBodyProj::Full { body } => body.poll_frame(cx).map_err(|e| match e {}),
            RequestBodyProj::Filtered { body } => Pin::new(body).poll_frame(cx),
            RequestBodyProj::Prefixed { first, rest } => match first.take() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => Pin::new(rest.as_mut()).poll_frame(cx),
            },
            RequestBodyProj::Channel { rx, ended } => {
                if *ended {
                    return Poll::Ready(None);
                }
                match std::task::ready!(rx.poll_recv(cx)) {
                    Some(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    Some(None) => {
                        *ended = true;
                        Poll::Ready(None)
                    }
                    None => Poll::Ready(Some(Err("the stream was cancelled".into()))),
                }
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            Self::Incoming { body, .. } => body.is_end_stream(),
            Self::Full { body } => body.is_end_stream(),
            Self::Filtered { body } => body.is_end_stream(),
            Self::Prefixed { first, rest } => first.is_none() && rest.is_end_stream(),
            Self::Channel { ended, .. } => *ended,
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Incoming { body, .. } => body.size_hint(),
            Self::Full { body } => body.size_hint(),
            Self::Filtered { body } => body.size_hint(),
            Self::Prefixed { .. } | Self::Channel { .. } => SizeHint::default(),
        }
    }
}

/// Runs when a stream ends. `complete` is true when the response body was read to its end,
/// false when it was abandoned or failed.
pub trait StreamEnd: Send {
    /// Finishes the stream's accounting.
    fn finish(self: Box<Self>, complete: bool);
}

pin_project! {
    /// A response body sent downstream.
    pub struct ResponseBody {
        #[pin]
        inner: ResponseInner,
        end: Option<Box<dyn StreamEnd>>,
        idle: Option<IdleClock>,
    }

    impl PinnedDrop for ResponseBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(end) = this.end.take() {
                // A body the server never polled because it was empty still completed.
                end.finish(this.inner.is_end_stream());
            }
        }
    }
}

pin_project! {
    #[project = ResponseInnerProj]
    enum ResponseInner {
        Upstream { #[pin] body: Inbound },
        Local { #[pin] body: Full<Bytes> },
        Filtered { body: FilteredBody },
    }
}

impl ResponseInner {
    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { body } => body.is_end_stream(),
            Self::Local { body } => body.is_end_stream(),
            Self::Filtered { body } => body.is_end_stream(),
        }
    }
}

impl ResponseBody {
    /// An upstream response body streamed through.
    pub fn upstream(body: Inbound, end: Option<Box<dyn StreamEnd>>) -> Self {
        Self {
            inner: ResponseInner::Upstream { body },
            end,
            idle: None,
        }
    }

    /// A body coming out of the filter chain's body callbacks.
    pub fn filtered(body: FilteredBody, end: Option<Box<dyn StreamEnd>>) -> Self {
        Self {
            inner: ResponseInner::Filtered { body },
            end,
            idle: None,
        }
    }

    /// Ends the body with an error if it stalls for `idle` (the stream idle timeout).
    pub fn watched(mut self, idle: Option<IdleClock>) -> Self {
        self.idle = idle;
        self
    }

    /// A body produced by the proxy itself.
    pub fn local(bytes: impl Into<Bytes>, end: Option<Box<dyn StreamEnd>>) -> Self {
        Self {
            inner: ResponseInner::Local {
                body: Full::new(bytes.into()),
            },
            end,
            idle: None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = match this.inner.project() {
            ResponseInnerProj::Upstream { body } => body.poll_frame(cx),
            ResponseInnerProj::Local { body } => body.poll_frame(cx).map_err(|e| match e {}),
            ResponseInnerProj::Filtered { body } => Pin::new(body).poll_frame(cx),
        };
        let polled = watch_idle(polled, this.idle, cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(end) = this.end.take() {
                    end.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(end) = this.end.take() {
                    end.finish(false);
                }
            }
            _ => {}
        }
        polled
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            ResponseInner::Upstream { body } => body.size_hint(),
            ResponseInner::Local { body } => body.size_hint(),
            ResponseInner::Filtered { body } => body.size_hint(),
        }
    }
}

/// One read of a body after the filter chain saw it.
pub struct Passed {
    /// What the chain did.
    pub decision: BodyDecision,
    /// The trailers, as the chain left them, when the read brought trailers.
    pub trailers: Option<HeaderMap>,
    /// The body ended with this read.
    pub ended: bool,
}

/// Passes what one read of a body brought through the chain: its end (`None`), a piece of
/// data (`ended`: the body says it is the last), or trailers. `None` for a frame that is
/// neither data nor trailers.
pub fn pass_frame(
    filters: &SharedFilterStream,
    direction: Direction,
    polled: Option<Frame<Bytes>>,
    ended: bool,
) -> Option<Passed> {
    let Some(frame) = polled else {
        let decision = filter::lock(filters).on_body(direction, Bytes::new(), true);
        return Some(Passed {
            decision,
            trailers: None,
            ended: true,
        });
    };
    match frame.into_data() {
        Ok(data) => Some(Passed {
            decision: filter::lock(filters).on_body(direction, data, ended),
            trailers: None,
            ended,
        }),
        Err(frame) => {
            let mut trailers = frame.into_trailers().ok()?;
            let decision = filter::lock(filters).on_trailers(direction, &mut trailers);
            Some(Passed {
                decision,
                trailers: Some(trailers),
                ended: true,
            })
        }
    }
}

/// Waits out a [`BodyDecision::Hold`]: until the filter takes the body up again (bounded by
/// `limit`, past which the stream ends with 504), then carries on along the chain; returns
/// the first decision that is not a hold, with the trailers as the chain left them.
pub async fn settle(
    filters: SharedFilterStream,
    direction: Direction,
    mut decision: BodyDecision,
    mut trailers: Option<HeaderMap>,
    limit: std::time::Duration,
) -> (BodyDecision, Option<HeaderMap>) {
    while let BodyDecision::Hold = decision {
        let held = filter::lock(&filters).held();
        if tokio::time::timeout(limit, held).await.is_err() {
            let reply = LocalReply {
                status: http::StatusCode::GATEWAY_TIMEOUT,
                headers: HeaderMap::new(),
                body: Bytes::from_static(b"body held by a filter past the request timeout\n"),
                reset: false,
            };
            let decision = filter::lock(&filters).end_hold(direction, reply);
            return (decision, trailers);
        }
        decision = filter::lock(&filters).resume_body(direction, trailers.as_mut());
    }
    (decision, trailers)
}

/// A body passed through a filter chain's body callbacks as it streams: each piece read from
/// `inner` goes through [`FilterStream::on_body`](crate::filter::FilterStream::on_body), and
/// what comes out of the chain is yielded. A local reply decided mid-stream ends the body with
/// an error (the peer sees a reset); for requests the reply is kept for the request path.
pub struct FilteredBody {
    /// The body being read; `None` once it ended.
    inner: Option<Inbound>,
    /// Frames ready to yield.
    ready: VecDeque<Frame<Bytes>>,
    /// The stream's chain (absent for a body that was filtered whole before it was sent).
    filters: Option<SharedFilterStream>,
    direction: Direction,
    /// A filter holds the body: what it resolves to, with whether the held read ended it.
    holding: Option<(Holding, bool)>,
    /// How long a filter may hold the body.
    hold_limit: std::time::Duration,
}

/// [`settle`], boxed.
type Holding = Pin<Box<dyn Future<Output = (BodyDecision, Option<HeaderMap>)> + Send>>;

impl FilteredBody {
    /// Streams the rest of `inner` through `filters`, after `first` (what already came out
    /// of the chain).
    /// A filter may hold the body up to `hold_limit`.
    pub fn streaming(
        first: Bytes,
        inner: Inbound,
        filters: SharedFilterStream,
        direction: Direction,
        hold_limit: std::time::Duration,
    ) -> Self {
        let mut ready = VecDeque::new();
        if !first.is_empty() {
            ready.push_back(Frame::data(first));
        }
        Self {
            inner: Some(inner),
            ready,
            filters: Some(filters),
            direction,
            holding: None,
            hold_limit,
        }
    }

    /// A body the chain has already seen whole: `data`, then `trailers` if any.
    pub fn whole(data: Bytes, trailers: Option<HeaderMap>, direction: Direction) -> Self {
        let mut ready = VecDeque::new();
        if !data.is_empty() {
            ready.push_back(Frame::data(data));
        }
        if let Some(t) = trailers {
            ready.push_back(Frame::trailers(t));
        }
        Self {
            inner: None,
            ready,
            filters: None,
            direction,
            holding: None,
            hold_limit: std::time::Duration::ZERO,
        }
    }

    /// Takes what the chain decided about a read (`ended`: the body ended with it): frames to
    /// yield, a hold to wait out, or the end of the stream (an error: the peer sees a reset).
    fn take(
        &mut self,
        decision: BodyDecision,
        trailers: Option<HeaderMap>,
        ended: bool,
    ) -> Result<(), BoxError> {
        match decision {
            BodyDecision::Continue(data) => {
                if !data.is_empty() {
                    self.ready.push_back(Frame::data(data));
                }
                if let Some(trailers) = trailers {
                    self.ready.push_back(Frame::trailers(trailers));
                }
                Ok(())
            }
            BodyDecision::Respond(_) => {
                self.inner = None;
                Err("a filter ended the stream".into())
            }
            BodyDecision::Hold => {
                if let Some(filters) = &self.filters {
                    let settling = settle(
                        filters.clone(),
                        self.direction,
                        BodyDecision::Hold,
                        trailers,
                        self.hold_limit,
                    );
                    self.holding = Some((Box::pin(settling), ended));
                }
                Ok(())
            }
        }
    }
}

impl Body for FilteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(frame) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if let Some((holding, ended)) = this.holding.as_mut() {
                let (decision, trailers) = std::task::ready!(holding.as_mut().poll(cx));
                let ended = *ended;
                this.holding = None;
                if let Err(e) = this.take(decision, trailers, ended) {
                    return Poll::Ready(Some(Err(e)));
                }
                continue;
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            let polled = std::task::ready!(Pin::new(&mut *inner).poll_frame(cx));
            let ended = inner.is_end_stream();
            let Some(filters) = this.filters.as_ref() else {
                this.inner = None;
                continue;
            };
            let polled = match polled {
                Some(Err(e)) => {
                    this.inner = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Ok(frame)) => Some(frame),
                None => None,
            };
            let Some(passed) = pass_frame(filters, this.direction, polled, ended) else {
                continue;
            };
            if passed.ended {
                this.inner = None;
            }
            if let Err(e) = this.take(passed.decision, passed.trailers, passed.ended) {
                return Poll::Ready(Some(Err(e)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none() && self.ready.is_empty() && self.holding.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.inner.is_none() && self.holding.is_none() {
            let n = self
                .ready
                .iter()
                .filter_map(Frame::data_ref)
                .map(|d| d.len() as u64)
                .sum();
            return SizeHint::with_exact(n);
        }
        SizeHint::default()
    }
}

/// How far [`prime`] got with a body.
pub enum Primed {
    /// A filter ended the stream.
    Reply(LocalReply),
    /// The whole body went through the chain: its bytes and trailers.
    Whole(Bytes, Option<HeaderMap>),
    /// The first bytes came out of the chain; the rest is still to read.
    Streaming(Bytes, Inbound),
}

/// Reads `body` through the chain's body callbacks until something comes out of the chain,
/// the body ends, or a filter answers.
pub async fn prime(
    filters: &SharedFilterStream,
    direction: Direction,
    mut body: Inbound,
    hold_limit: std::time::Duration,
) -> Result<Primed, BoxError> {
    loop {
        let polled = body.frame().await.transpose()?;
        let ended = body.is_end_stream();
        let Some(passed) = pass_frame(filters, direction, polled, ended) else {
            continue;
        };
        let (decision, trailers) = match passed.decision {
            BodyDecision::Hold => {
                let filters = filters.clone();
                settle(
                    filters,
                    direction,
                    BodyDecision::Hold,
                    passed.trailers,
                    hold_limit,
                )
                .await
            }
            decision => (decision, passed.trailers),
        };
        match decision {
            BodyDecision::Respond(reply) => return Ok(Primed::Reply(reply)),
            BodyDecision::Continue(data) if passed.ended => {
                return Ok(Primed::Whole(data, trailers));
            }
            BodyDecision::Continue(data) if !data.is_empty() => {
                return Ok(Primed::Streaming(data, body));
            }
            BodyDecision::Continue(_) | BodyDecision::Hold => {}
        }
    }
}
