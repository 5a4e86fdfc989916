//! The seam between the core proxy and a filter chain.
//!
//! The request path calls a listener's chain after the downstream request is decoded and
//! before an upstream is chosen, and again on the response headers. The chain a stream
//! starts with is the chain it finishes with: the listener holds it behind an atomic pointer
//! (`arc-swap`), a stream takes its own reference, and swapping in a new chain affects only
//! streams that start afterwards.

use http::{request, response};

use crate::body::ResponseBody;

/// What the chain decided about a request.
pub enum RequestDecision {
    /// Go on to the upstream, to cluster `cluster` (an index into the proxy's clusters) or to
    /// the listener's default cluster when `None`.
    Continue {
        /// The chosen cluster.
        cluster: Option<usize>,
    },
    /// Answer the request locally with this response; nothing goes upstream.
    Respond(http::Response<ResponseBody>),
}

/// A listener's filter chain.
pub trait FilterChain: Send + Sync {
    /// Called with the request head, in chain order; may rewrite it or answer locally.
    fn on_request_headers(&self, head: &mut request::Parts) -> RequestDecision;
    /// Called with the response head, in reverse chain order; may rewrite it.
    fn on_response_headers(&self, head: &mut response::Parts);
}

/// The chain slot of a listener: `None` when the listener has no filters.
pub type ChainSlot = arc_swap::ArcSwapOption<Box<dyn FilterChain>>;
