//! What a filter asks of the proxy: the [`Host`] trait, implemented over the proxy-wasm ABI
//! in a module and in memory by [`crate::testing`].

use std::time::{Duration, SystemTime};

/// proxy-wasm statuses a call can end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// No such key, map, buffer or function (e.g. a `weft.*` extension on another proxy).
    NotFound,
    /// The arguments were refused.
    BadArgument,
    /// Compare-and-swap lost.
    CasMismatch,
    /// The host failed, or answered a status this SDK does not know.
    InternalFailure,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotFound => "not found",
            Self::BadArgument => "bad argument",
            Self::CasMismatch => "compare-and-swap mismatch",
            Self::InternalFailure => "internal failure",
        })
    }
}

impl std::error::Error for Status {}

/// A header map of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapType {
    /// Request headers, with pseudo-headers.
    RequestHeaders,
    /// Request trailers.
    RequestTrailers,
    /// Response headers, with `:status`.
    ResponseHeaders,
    /// Response trailers.
    ResponseTrailers,
    /// Headers of the callout response being delivered.
    CallResponseHeaders,
}

/// A byte buffer of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BufferType {
    /// The request body (in request body phases).
    RequestBody,
    /// The response body (in response body phases).
    ResponseBody,
    /// The callout response body being delivered.
    CallResponseBody,
}

/// A metric's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Distribution of recorded values.
    Histogram,
}

/// Log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// The proxy, as a filter sees it. Every call returns what the host answered; none panics.
pub trait Host {
    /// All pairs of a map.
    fn map(&self, map: MapType) -> Vec<(String, String)>;
    /// One value of a map (the first, for repeated headers).
    fn map_value(&self, map: MapType, name: &str) -> Option<String>;
    /// Sets (`Some`) or removes (`None`) a value.
    fn set_map_value(&mut self, map: MapType, name: &str, value: Option<&str>);
    /// Adds a value (repeated headers allowed).
    fn add_map_value(&mut self, map: MapType, name: &str, value: &str);
    /// Bytes `start..start + max` of a buffer.
    fn buffer(&self, buffer: BufferType, start: usize, max: usize) -> Option<Vec<u8>>;
    /// Replaces `size` bytes from `start` of a buffer with `value`.
    fn set_buffer(
        &mut self,
        buffer: BufferType,
        start: usize,
        size: usize,
        value: &[u8],
    ) -> Result<(), Status>;
    /// A property (`["request", "path"]`, `["source", "address"]`, …).
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Several properties, in the order asked (`None`: absent). One call each unless the
    /// host reads them together.
    fn properties(&self, paths: &[&[&str]]) -> Vec<Option<Vec<u8>>> {
        paths.iter().map(|p| self.property(p)).collect()
    }
    /// Sets a stream property.
    fn set_property(&mut self, path: &[&str], value: &[u8]);
    /// Answers the stream locally.
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]);
    /// Resumes a paused request (`response == false`) or response.
    fn resume(&mut self, response: bool);
    /// Calls a host extension (`weft.*`).
    fn call_foreign(&mut self, name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status>;
    /// `weft.stream_done`: the filter has nothing more to do for the running callback's
    /// stream ([`crate::Ctx::done_with_stream`]).
    fn stream_done(&mut self) -> Result<(), Status> {
        self.call_foreign(weft_abi::ext::STREAM_DONE, &[]).map(drop)
    }
    /// Sends an HTTP request to a cluster of the proxy; the answer arrives in
    /// [`crate::Filter::on_call_response`] with the returned token.
    fn dispatch_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status>;
    /// Defines (or finds) a metric.
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, Status>;
    /// Adds to a counter or gauge.
    fn increment_metric(&mut self, id: u32, by: i64) -> Result<(), Status>;
    /// Sets a gauge or records a histogram value.
    fn record_metric(&mut self, id: u32, value: u64) -> Result<(), Status>;
    /// A shared-data value and its compare-and-swap version.
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Sets a shared-data value if its version is still `cas` (`None`: unconditionally).
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status>;
    /// Wall-clock time.
    fn now(&self) -> SystemTime;
    /// Writes to the proxy's log.
    fn log(&self, level: LogLevel, message: &str);
}
