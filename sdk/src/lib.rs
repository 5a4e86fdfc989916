//! `weft-sdk`: write HTTP filters for Weft in Rust.
//!
//! A filter is a type implementing [`Filter`]: one value per HTTP stream, created from the
//! filter's configuration (any `serde` type, parsed once when the proxy configures the
//! filter; a bad configuration refuses the chain with a clear error). Each phase gets a
//! [`Ctx`] through which it reads and edits the request and response, answers locally,
//! calls other services, counts metrics, and uses Weft's routing extensions
//! ([`Ctx::set_cluster`], [`Ctx::retry`], …).
//!
//! Built for `wasm32-wasip1`, [`export_filter!`] turns the type into a proxy-wasm module
//! (ABI 0.2.1) that runs in `weft-proxy` — and, minus the `weft.*` extensions, in any
//! proxy-wasm host. Built for the host target, the same filter runs under
//! [`testing::Harness`], so it is unit-tested with plain `cargo test`, no proxy needed.
//!
//! ```
//! use weft_sdk::{Action, Ctx, Filter};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { header: String }
//!
//! struct Tag { header: String }
//!
//! impl Filter for Tag {
//!     type Config = Config;
//!     fn new(config: &std::rc::Rc<Config>) -> Self { Tag { header: config.header.clone() } }
//!     fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
//!         cx.set_request_header(&self.header, Some("1"));
//!         Action::Continue
//!     }
//! }
//!
//! let mut h = weft_sdk::testing::Harness::<Tag>::new(r#"{"header":"x-tagged"}"#).unwrap();
//! let mut stream = h.stream();
//! stream.request("GET", "/", &[("host", "svc")]);
//! assert_eq!(stream.request_headers(true), Action::Continue);
//! assert_eq!(stream.request_header("x-tagged").as_deref(), Some("1"));
//! ```

use std::rc::Rc;

pub mod alloc;
mod ctx;
#[cfg(target_arch = "wasm32")]
mod ffi;
mod host;
pub mod testing;
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm;

/// The module's allocator ([`alloc::Pool`]); the `allocator` feature (on by default) sets it.
#[cfg(all(target_arch = "wasm32", feature = "allocator"))]
#[global_allocator]
static ALLOCATOR: alloc::Pool = alloc::Pool::new();

pub use ctx::{Attempt, AttemptError, Ctx, Metric, Property, PropertySet, PropertyValues};
pub use host::{BufferType, Host, LogLevel, MapType, MetricKind, Status};

/// What a phase tells the proxy to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Go on to the next filter (or the upstream / the client).
    Continue,
    /// Stop here: wait for a callout (headers), or buffer the body until more arrives.
    Pause,
}

/// An HTTP filter: one value per stream.
///
/// Every phase has a default that continues, so a filter implements only the phases it
/// needs; on Weft, a phase left to its default costs nothing after the first stream (the
/// default tells the host it need not call it). Response phases run in reverse chain
/// order.
///
/// That word holds for the whole module: a filter that hands a phase on to another
/// [`Filter`] value (a wrapper, a choice of filters per stream) implements that phase
/// itself and calls the inner one's, never the inner one's default alone.
pub trait Filter: Sized + 'static {
    /// The filter's configuration, parsed from the JSON the proxy hands to `on_configure`
    /// (a YAML map in the proxy's config arrives as JSON).
    type Config: serde::de::DeserializeOwned + 'static;

    /// Checks a parsed configuration beyond what its type says; an error refuses the chain
    /// (the proxy logs it and reports `on_configure` returning false).
    fn validate(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }

    /// Creates the state of one stream; keep the `Rc` to read the configuration later.
    /// Weft calls it just before the stream's first callback that runs: a stream for which
    /// every phase the filter has is a default (the host stops calling those, see
    /// `docs/filter-abi.md`) gets no value at all.
    fn new(config: &Rc<Self::Config>) -> Self;

    /// Request headers (`:method`, `:path`, `:authority`, `:scheme` included).
    fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        cx.unused("proxy_on_request_headers");
        Action::Continue
    }

    /// A piece of request body; `body_size` is what is buffered so far ([`Ctx::request_body`]).
    fn on_request_body(
        &mut self,
        cx: &mut Ctx<'_>,
        _body_size: usize,
        _end_of_stream: bool,
    ) -> Action {
        cx.unused("proxy_on_request_body");
        Action::Continue
    }

    /// Response headers (`:status` included). Also called for the proxy's own answer to a
    /// failed upstream attempt (see [`Ctx::attempt`]).
    fn on_response_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        cx.unused("proxy_on_response_headers");
        Action::Continue
    }

    /// A piece of response body.
    fn on_response_body(
        &mut self,
        cx: &mut Ctx<'_>,
        _body_size: usize,
        _end_of_stream: bool,
    ) -> Action {
        cx.unused("proxy_on_response_body");
        Action::Continue
    }

    /// Request trailers (they end the request body).
    fn on_request_trailers(&mut self, cx: &mut Ctx<'_>) -> Action {
        cx.unused("proxy_on_request_trailers");
        Action::Continue
    }

    /// Response trailers (gRPC's `grpc-status` arrives here).
    fn on_response_trailers(&mut self, cx: &mut Ctx<'_>) -> Action {
        cx.unused("proxy_on_response_trailers");
        Action::Continue
    }

    /// How often [`Filter::on_tick`] runs on each worker, if at all.
    fn tick_period(_config: &Self::Config) -> Option<std::time::Duration> {
        None
    }

    /// A timer tick on a worker (not tied to a stream): refresh caches, flush aggregates.
    fn on_tick(_config: &Rc<Self::Config>, _cx: &mut Ctx<'_>) {}

    /// The answer to a callout made with [`Ctx::dispatch_call`]: `status` is `None` when the
    /// callout failed or timed out.
    fn on_call_response(&mut self, _cx: &mut Ctx<'_>, _token: u32, _status: Option<u16>) {}

    /// The stream has ended (access logs, metrics): the request and response read as they
    /// went out.
    fn on_log(&mut self, cx: &mut Ctx<'_>) {
        cx.unused("proxy_on_log");
    }
}

/// Turns a [`Filter`] into a proxy-wasm module when built for `wasm32`; expands to nothing
/// on other targets (where the filter runs under [`testing::Harness`]).
///
/// ```
/// struct MyFilter;
/// impl weft_sdk::Filter for MyFilter {
///     type Config = Option<()>;
///     fn new(_: &std::rc::Rc<Option<()>>) -> Self { MyFilter }
/// }
/// weft_sdk::export_filter!(MyFilter);
/// ```
#[macro_export]
macro_rules! export_filter {
    ($filter:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        const _: () = {
            $crate::__weft_exports!($filter);
        };
    };
}

/// Parses and validates a filter's configuration. No configuration at all parses as JSON
/// `null`, else as `{}`, so that `Option` configs and structs whose fields all have
/// defaults accept it.
pub fn parse_config<F: Filter>(bytes: &[u8]) -> Result<F::Config, String> {
    let config: F::Config = if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_slice(b"null").or_else(|_| serde_json::from_slice(b"{}"))
    } else {
        serde_json::from_slice(bytes)
    }
    .map_err(|e| format!("bad filter configuration: {e}"))?;
    F::validate(&config).map_err(|e| format!("bad filter configuration: {e}"))?;
    Ok(config)
}
