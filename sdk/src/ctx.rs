//! [`Ctx`]: what a filter phase works with.

use std::time::{Duration, SystemTime};

use weft_abi::ext;

use crate::host::{BufferType, Host, LogLevel, MapType, MetricKind, Status};

/// One property's value as read by [`Ctx::properties`] (absent: `None` inside).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Property(pub Option<Vec<u8>>);

impl Property {
    /// As text (bytes that are not UTF-8 replaced), if present.
    pub fn text(self) -> Option<String> {
        self.0.map(|b| {
            String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        })
    }

    /// As an integer (8-byte little-endian, as Envoy and Weft encode them), if present and
    /// 8 bytes long.
    pub fn int(&self) -> Option<i64> {
        Some(i64::from_le_bytes(self.0.as_deref()?.try_into().ok()?))
    }
}

/// Property paths a filter reads together on every stream (telemetry's metric labels in
/// `on_log`), encoded once for Weft's `weft.properties`: build it with the filter's
/// configuration and read it with [`Ctx::read`], one host call for the whole set.
#[derive(Debug)]
pub struct PropertySet<const N: usize> {
    paths: [&'static [&'static str]; N],
    encoded: Vec<u8>,
    /// Whether the host answered `weft.properties` (cleared on the first refusal).
    pub(crate) batched: std::cell::Cell<bool>,
}

impl<const N: usize> PropertySet<N> {
    /// The set of `paths` (each a list of segments, as [`Ctx::properties`] takes them).
    pub fn new(paths: [&'static [&'static str]; N]) -> Self {
        const { assert!(N <= ext::MAX_PROPERTIES, "weft.properties reads at most 64") };
        PropertySet {
            paths,
            encoded: ext::encode_property_paths(&paths),
            batched: std::cell::Cell::new(true),
        }
    }
}

/// A [`PropertySet`]'s values for one stream, by index in the set's order.
#[derive(Debug)]
pub struct PropertyValues<const N: usize> {
    bytes: Vec<u8>,
    spans: [Option<std::ops::Range<usize>>; N],
}

impl<const N: usize> PropertyValues<N> {
    /// The `i`th value's bytes, if present.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        self.bytes.get(self.spans.get(i)?.clone()?)
    }

    /// The `i`th value as text (bytes that are not UTF-8 replaced), if present.
    pub fn text(&self, i: usize) -> Option<std::borrow::Cow<'_, str>> {
        self.get(i).map(String::from_utf8_lossy)
    }

    /// The `i`th value as an integer (8-byte little-endian), if present and 8 bytes long.
    pub fn int(&self, i: usize) -> Option<i64> {
        Some(i64::from_le_bytes(self.get(i)?.try_into().ok()?))
    }
}

/// The stream a phase runs for: typed access to the request, the response, bodies,
/// properties, local replies, callouts, metrics and Weft's routing extensions.
pub struct Ctx<'a> {
    host: &'a mut dyn Host,
}

/// Why an upstream attempt produced no upstream response (the ABI's own enum).
pub use weft_abi::ext::AttemptError;

/// The upstream attempt whose response is being processed (`weft.attempt`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// Its status (the proxy's own, when it failed).
    pub status: u16,
    /// Why there was no upstream response, if there was none.
    pub error: AttemptError,
}

impl Attempt {
    /// Parses `weft.attempt`'s answer.
    pub fn from_bytes(b: &[u8]) -> Option<Attempt> {
        let a = weft_abi::ext::AttemptInfo::decode(b).ok()?;
        Some(Attempt {
            number: a.number,
            status: a.status,
            error: a.error,
        })
    }

    /// Encodes it as `weft.attempt` answers.
    pub fn to_bytes(self) -> [u8; 7] {
        weft_abi::ext::AttemptInfo {
            number: self.number,
            status: self.status,
            error: self.error,
        }
        .encode()
    }
}

/// A metric handle (defined on first use, cheap to keep).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric(u32);

impl<'a> Ctx<'a> {
    /// A context over `host`.
    pub fn new(host: &'a mut dyn Host) -> Self {
        Self { host }
    }

    /// The host, for calls this type does not wrap.
    pub fn host(&mut self) -> &mut dyn Host {
        self.host
    }

    // --- request and response ---------------------------------------------------------

    /// A request header (`:method`, `:path`, `:authority` and `:scheme` included).
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.host.map_value(MapType::RequestHeaders, name)
    }

    /// All request headers, pseudo-headers first.
    pub fn request_headers(&self) -> Vec<(String, String)> {
        self.host.map(MapType::RequestHeaders)
    }

    /// Sets (`Some`) or removes (`None`) a request header; `:path` and `:authority` rewrite
    /// the request.
    pub fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        self.host
            .set_map_value(MapType::RequestHeaders, name, value);
    }

    /// Adds a request header value.
    pub fn add_request_header(&mut self, name: &str, value: &str) {
        self.host
            .add_map_value(MapType::RequestHeaders, name, value);
    }

    /// The request method.
    pub fn method(&self) -> String {
        self.request_header(":method").unwrap_or_default()
    }

    /// The request path with its query.
    pub fn path(&self) -> String {
        self.request_header(":path").unwrap_or_default()
    }

    /// The request authority (host).
    pub fn authority(&self) -> String {
        self.request_header(":authority").unwrap_or_default()
    }

    /// A response header (`:status` included).
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.host.map_value(MapType::ResponseHeaders, name)
    }

    /// Sets or removes a response header.
    pub fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        self.host
            .set_map_value(MapType::ResponseHeaders, name, value);
    }

    /// Adds a response header value.
    pub fn add_response_header(&mut self, name: &str, value: &str) {
        self.host
            .add_map_value(MapType::ResponseHeaders, name, value);
    }

    /// The response status (0 when there is no response yet).
    pub fn status(&self) -> u16 {
        self.response_header(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// A request trailer (in the request trailers phase).
    pub fn request_trailer(&self, name: &str) -> Option<String> {
        self.host.map_value(MapType::RequestTrailers, name)
    }

    /// Sets or removes a request trailer.
    pub fn set_request_trailer(&mut self, name: &str, value: Option<&str>) {
        self.host
            .set_map_value(MapType::RequestTrailers, name, value);
    }

    /// A response trailer (in the response trailers phase).
    pub fn response_trailer(&self, name: &str) -> Option<String> {
        self.host.map_value(MapType::ResponseTrailers, name)
    }

    /// Sets or removes a response trailer.
    pub fn set_response_trailer(&mut self, name: &str, value: Option<&str>) {
        self.host
            .set_map_value(MapType::ResponseTrailers, name, value);
    }

    /// The request body buffered so far (in request body phases).
    pub fn request_body(&self) -> Vec<u8> {
        self.host
            .buffer(BufferType::RequestBody, 0, usize::MAX)
            .unwrap_or_default()
    }

    /// Replaces the buffered request body.
    pub fn set_request_body(&mut self, body: &[u8]) -> Result<(), Status> {
        self.host
            .set_buffer(BufferType::RequestBody, 0, usize::MAX, body)
    }

    /// The response body buffered so far (in response body phases).
    pub fn response_body(&self) -> Vec<u8> {
        self.host
            .buffer(BufferType::ResponseBody, 0, usize::MAX)
            .unwrap_or_default()
    }

    /// Replaces the buffered response body.
    pub fn set_response_body(&mut self, body: &[u8]) -> Result<(), Status> {
        self.host
            .set_buffer(BufferType::ResponseBody, 0, usize::MAX, body)
    }

    /// Answers the stream locally with `status`, `headers` and `body`; return
    /// [`crate::Action::Pause`] from the phase.
    pub fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        self.host.send_response(status, headers, body);
    }

    /// Resumes the request after a callout.
    pub fn resume_request(&mut self) {
        self.host.resume(false);
    }

    /// Resumes the response after a callout.
    pub fn resume_response(&mut self) {
        self.host.resume(true);
    }

    // --- properties -----------------------------------------------------------------------

    /// A property as text (`["source", "address"]`, `["request", "id"]`, …).
    pub fn property(&self, path: &[&str]) -> Option<String> {
        Property(self.host.property(path)).text()
    }

    /// Sets a property on the stream: every filter of the chain can read it (the router
    /// sets `weft.route` to the name of the route that matched).
    pub fn set_property(&mut self, path: &[&str], value: &str) {
        self.host.set_property(path, value.as_bytes());
    }

    /// An integer property (8-byte little-endian, as Envoy and Weft encode them).
    pub fn property_int(&self, path: &[&str]) -> Option<i64> {
        Property(self.host.property(path)).int()
    }

    /// Several properties at once, in the order asked (one host call each: for a set read
    /// on every stream, [`PropertySet`] and [`Ctx::read`] take one call for all).
    pub fn properties<const N: usize>(&self, paths: [&[&str]; N]) -> [Property; N] {
        let mut values = self.host.properties(&paths).into_iter();
        std::array::from_fn(|_| Property(values.next().flatten()))
    }

    /// The properties of `set`, in its order: one call to Weft's `weft.properties`, the
    /// values borrowed from its answer. On a host without the extension (Envoy), one
    /// `proxy_get_property` each, and the set remembers to go that way from then on.
    pub fn read<const N: usize>(&mut self, set: &PropertySet<N>) -> PropertyValues<N> {
        let mut spans = std::array::from_fn(|_| None);
        if set.batched.get() {
            match self.host.call_foreign(ext::PROPERTIES, &set.encoded) {
                Ok(Some(bytes)) if ext::property_value_spans(&bytes, &mut spans).is_ok() => {
                    return PropertyValues { bytes, spans };
                }
                _ => set.batched.set(false),
            }
        }
        let mut bytes = Vec::new();
        for (path, span) in set.paths.iter().zip(&mut spans) {
            *span = self.host.property(path).map(|v| {
                bytes.extend_from_slice(&v);
                bytes.len() - v.len()..bytes.len()
            });
        }
        PropertyValues { bytes, spans }
    }

    // --- callouts, metrics, shared data, time, logs -----------------------------------------

    /// Sends an HTTP request to `cluster` (`headers` must include `:method`, `:path` and
    /// `:authority`); pause the phase, and the answer arrives in
    /// [`crate::Filter::on_call_response`].
    pub fn dispatch_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        self.host.dispatch_call(cluster, headers, body, timeout)
    }

    /// A header of the callout response being delivered.
    pub fn call_response_header(&self, name: &str) -> Option<String> {
        self.host.map_value(MapType::CallResponseHeaders, name)
    }

    /// The body of the callout response being delivered.
    pub fn call_response_body(&self) -> Vec<u8> {
        self.host
            .buffer(BufferType::CallResponseBody, 0, usize::MAX)
            .unwrap_or_default()
    }

    /// A counter named `name` (defined on first use).
    pub fn counter(&mut self, name: &str) -> Option<Metric> {
        self.host
            .define_metric(MetricKind::Counter, name)
            .ok()
            .map(Metric)
    }

    /// A histogram named `name`.
    pub fn histogram(&mut self, name: &str) -> Option<Metric> {
        self.host
            .define_metric(MetricKind::Histogram, name)
            .ok()
            .map(Metric)
    }

    /// A gauge named `name`.
    pub fn gauge(&mut self, name: &str) -> Option<Metric> {
        self.host
            .define_metric(MetricKind::Gauge, name)
            .ok()
            .map(Metric)
    }

    /// Adds `by` to a counter or gauge.
    pub fn increment(&mut self, metric: Metric, by: i64) {
        let _ = self.host.increment_metric(metric.0, by);
    }

    /// Records a histogram value or sets a gauge.
    pub fn record(&mut self, metric: Metric, value: u64) {
        let _ = self.host.record_metric(metric.0, value);
    }

    /// A shared-data value (shared by every worker of the proxy) and its version.
    pub fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.host.shared_data(key)
    }

    /// Sets a shared-data value if its version is still `cas`.
    pub fn set_shared_data(
        &mut self,
        key: &str,
        value: &[u8],
        cas: Option<u32>,
    ) -> Result<(), Status> {
        self.host.set_shared_data(key, value, cas)
    }

    /// Wall-clock time.
    pub fn now(&self) -> SystemTime {
        self.host.now()
    }

    /// Logs at `level`.
    pub fn log(&self, level: LogLevel, message: &str) {
        self.host.log(level, message);
    }

    // --- Weft extensions ----------------------------------------------------------------------

    /// Tells the host that this filter does nothing in callback `export` (one of
    /// [`weft_abi::ext::SKIPPABLE`]), so that it can stop calling it (`weft.unused`). The
    /// [`crate::Filter`] defaults say it; a filter never needs to. Hosts without the
    /// extension ignore it.
    #[doc(hidden)]
    pub fn unused(&mut self, export: &str) {
        let _ = self.host.call_foreign(ext::UNUSED, export.as_bytes());
    }

    /// Says that this filter has nothing more to do for this stream (`weft.stream_done`): on
    /// Weft, none of its callbacks runs for the stream after this one (`on_log` included),
    /// and its value for the stream is dropped when this callback returns. This callback's
    /// [`Action::Pause`](crate::Action::Pause) counts as `Continue`; callouts it made still
    /// go out, their answers are dropped. A saving only: on a host without the extension the
    /// later callbacks still run, so they must do nothing for such a stream. Request and
    /// response phases only (heads, bodies, trailers, callout answers); elsewhere the host
    /// refuses it (`BadArgument`) and nothing changes. In a head, body or trailers phase on
    /// a host that takes it, it is said by the phase's return value, without a host call.
    pub fn done_with_stream(&mut self) -> Result<(), Status> {
        self.host.stream_done()
    }

    /// Sends the request to `cluster` (`weft.set_cluster`; request headers phase).
    /// `NotFound` for a cluster the proxy does not have, or on a host without Weft's
    /// extensions.
    pub fn set_cluster(&mut self, cluster: &str) -> Result<(), Status> {
        self.host
            .call_foreign(ext::SET_CLUSTER, cluster.as_bytes())
            .map(drop)
    }

    /// Bounds the whole request, all attempts together (`weft.set_timeout`); zero: none.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), Status> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.host
            .call_foreign(ext::SET_TIMEOUT, &ext::encode_millis(ms))
            .map(drop)
    }

    /// Bounds each attempt (`weft.set_try_timeout`); zero: none.
    pub fn set_try_timeout(&mut self, timeout: Duration) -> Result<(), Status> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.host
            .call_foreign(ext::SET_TRY_TIMEOUT, &ext::encode_millis(ms))
            .map(drop)
    }

    /// Lets the request have up to `attempts` attempts (`weft.set_attempts`): the proxy
    /// keeps it whole so it can be sent again.
    pub fn set_attempts(&mut self, attempts: u32) -> Result<(), Status> {
        self.host
            .call_foreign(ext::SET_ATTEMPTS, &ext::encode_attempts(attempts))
            .map(drop)
    }

    /// Holds the request for `delay` before it goes upstream (`weft.delay`; request
    /// phase): fault injection.
    pub fn delay(&mut self, delay: Duration) -> Result<(), Status> {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.host
            .call_foreign(ext::DELAY, &ext::encode_millis(ms))
            .map(drop)
    }

    /// The attempt whose response is being processed (`weft.attempt`).
    pub fn attempt(&mut self) -> Option<Attempt> {
        let bytes = self.host.call_foreign(ext::ATTEMPT, &[]).ok()??;
        Attempt::from_bytes(&bytes)
    }

    /// Asks for another attempt after `delay` (`weft.retry`; response headers phase),
    /// preferring endpoints not tried yet when `other_endpoints`. `BadArgument` when no
    /// attempt is left or the request cannot be replayed.
    pub fn retry(&mut self, delay: Duration, other_endpoints: bool) -> Result<(), Status> {
        let args = ext::RetryArgs {
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            exclude_tried: other_endpoints,
        };
        self.host.call_foreign(ext::RETRY, &args.encode()).map(drop)
    }
}
