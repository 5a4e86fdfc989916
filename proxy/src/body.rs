//! Body types of the request path.
//!
//! [`RequestBody`] is what goes upstream; [`ResponseBody`] is what goes downstream. The
//! response body carries a [`StreamGuard`] that finishes the stream's accounting when the
//! body ends or is dropped, and hands a reusable HTTP/1 connection back to the worker's pool
//! only when the upstream response was read to its end.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

/// A boxed error crossing the body boundary.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// A request body sent upstream: the downstream body streamed through, or a body a
    /// filter produced.
    #[project = RequestBodyProj]
    #[allow(missing_docs)] // pin-project-lite takes no docs on variant fields
    pub enum RequestBody {
        /// Streamed from downstream.
        Incoming { #[pin] body: Incoming },
        /// Fully buffered.
        Full { #[pin] body: Full<Bytes> },
    }
}

impl RequestBody {
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
            RequestBodyProj::Incoming { body } => body.poll_frame(cx).map_err(Into::into),
            RequestBodyProj::Full { body } => body.poll_frame(cx).map_err(|e| match e {}),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            Self::Incoming { body } => body.is_end_stream(),
            Self::Full { body } => body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Incoming { body } => body.size_hint(),
            Self::Full { body } => body.size_hint(),
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
        Upstream { #[pin] body: Incoming },
        Local { #[pin] body: Full<Bytes> },
    }
}

impl ResponseInner {
    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { body } => body.is_end_stream(),
            Self::Local { body } => body.is_end_stream(),
        }
    }
}

impl ResponseBody {
    /// An upstream response body streamed through.
    pub fn upstream(body: Incoming, end: Option<Box<dyn StreamEnd>>) -> Self {
        Self {
            inner: ResponseInner::Upstream { body },
            end,
        }
    }

    /// A body produced by the proxy itself.
    pub fn local(bytes: impl Into<Bytes>, end: Option<Box<dyn StreamEnd>>) -> Self {
        Self {
            inner: ResponseInner::Local {
                body: Full::new(bytes.into()),
            },
            end,
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
            ResponseInnerProj::Upstream { body } => body.poll_frame(cx).map_err(BoxError::from),
            ResponseInnerProj::Local { body } => body.poll_frame(cx).map_err(|e| match e {}),
        };
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
        }
    }
}
