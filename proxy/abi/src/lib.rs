//! The proxy-wasm ABI 0.2.1 as Weft speaks it, written once for both sides.
//!
//! The host (`weft-wasm`) and the filter SDK (`weft-sdk`) both take their numbers, the map
//! wire format and the encodings of Weft's `weft.*` extensions from this crate, so the two
//! sides cannot drift apart: a number changed here changes on both sides, and the round-trip
//! tests below pin the wire formats.
//!
//! - [`Status`], [`BufferType`], [`MapType`], [`StreamType`], [`MetricType`], [`LogLevel`],
//!   [`Action`]: the ABI's integers as named enums (`from_i32` for what a peer sent).
//! - [`map`]: the header-map wire format (`proxy_get_header_map_pairs` and friends).
//! - [`ext`]: the names and argument encodings of the `weft.*` foreign functions.
//!
//! ```
//! use weft_abi::{map, ext, Status};
//! let wire = map::serialize([(&b"a"[..], &b"1"[..])].into_iter());
//! assert_eq!(map::deserialize(&wire).unwrap(), vec![(&b"a"[..], &b"1"[..])]);
//! assert_eq!(ext::decode_millis(&ext::encode_millis(250)), Ok(250));
//! assert_eq!(Status::from_i32(1), Some(Status::NotFound));
//! ```
#![forbid(unsafe_code)]

/// Generates an ABI enum with its `from_i32`.
macro_rules! abi_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(i32)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl $name {
            /// Every value, in ABI order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)*];

            /// The value for an ABI integer, `None` for one the ABI does not define.
            pub fn from_i32(v: i32) -> Option<Self> {
                match v {
                    $($value => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

abi_enum! {
    /// The status every host call returns (`WasmResult`).
    Status {
        /// Success.
        Ok = 0,
        /// No such key, map, buffer, queue, function or property.
        NotFound = 1,
        /// An argument is out of range or malformed.
        BadArgument = 2,
        /// A value could not be serialised.
        SerializationFailure = 3,
        /// A value could not be parsed.
        ParseFailure = 4,
        /// An expression could not be evaluated.
        BadExpression = 5,
        /// A guest pointer or length is outside its memory.
        InvalidMemoryAccess = 6,
        /// A queue is empty.
        Empty = 7,
        /// Compare-and-swap lost.
        CasMismatch = 8,
        /// A result had an unexpected type.
        ResultMismatch = 9,
        /// The host could not do it.
        InternalFailure = 10,
        /// The connection is gone.
        BrokenConnection = 11,
        /// Not implemented by this host.
        Unimplemented = 12,
    }
}

abi_enum! {
    /// The byte buffers a filter can read and write (`proxy_get_buffer_bytes`).
    BufferType {
        /// The HTTP request body (request body callbacks).
        HttpRequestBody = 0,
        /// The HTTP response body (response body callbacks).
        HttpResponseBody = 1,
        /// Bytes from the downstream peer (network filters).
        DownstreamData = 2,
        /// Bytes from the upstream peer (network filters).
        UpstreamData = 3,
        /// The body of the HTTP callout response being delivered.
        HttpCallResponseBody = 4,
        /// The gRPC message being delivered.
        GrpcReceiveBuffer = 5,
        /// The VM configuration (`on_vm_start`).
        VmConfiguration = 6,
        /// The plugin configuration (`on_configure`).
        PluginConfiguration = 7,
    }
}

abi_enum! {
    /// The header maps a filter can read and write (`proxy_get_header_map_pairs`).
    MapType {
        /// Request headers, with `:method`, `:path`, `:authority` and `:scheme`.
        HttpRequestHeaders = 0,
        /// Request trailers.
        HttpRequestTrailers = 1,
        /// Response headers, with `:status`.
        HttpResponseHeaders = 2,
        /// Response trailers.
        HttpResponseTrailers = 3,
        /// Initial metadata of a gRPC call.
        GrpcReceiveInitialMetadata = 4,
        /// Trailing metadata of a gRPC call.
        GrpcReceiveTrailingMetadata = 5,
        /// Headers of the HTTP callout response being delivered.
        HttpCallResponseHeaders = 6,
        /// Trailers of the HTTP callout response being delivered.
        HttpCallResponseTrailers = 7,
    }
}

abi_enum! {
    /// Which stream `proxy_continue_stream` and `proxy_close_stream` mean.
    StreamType {
        /// The HTTP request.
        HttpRequest = 0,
        /// The HTTP response.
        HttpResponse = 1,
        /// The downstream connection (network filters).
        Downstream = 2,
        /// The upstream connection (network filters).
        Upstream = 3,
    }
}

abi_enum! {
    /// A filter-defined metric's kind (`proxy_define_metric`).
    MetricType {
        /// Only goes up.
        Counter = 0,
        /// Goes up and down.
        Gauge = 1,
        /// A distribution of recorded values.
        Histogram = 2,
    }
}

abi_enum! {
    /// Log levels (`proxy_log`, `proxy_get_log_level`).
    LogLevel {
        /// Trace.
        Trace = 0,
        /// Debug.
        Debug = 1,
        /// Info.
        Info = 2,
        /// Warn.
        Warn = 3,
        /// Error.
        Error = 4,
        /// Critical.
        Critical = 5,
    }
}

abi_enum! {
    /// What a stream callback returns (`FilterHeadersStatus`, `FilterDataStatus`, …).
    Action {
        /// Go on to the next filter.
        Continue = 0,
        /// Stop here until the filter resumes the stream.
        Pause = 1,
    }
}

/// The exports that name the ABI version a module speaks, newest first.
pub const ABI_VERSION_EXPORTS: &[(&str, &str)] = &[
    ("proxy_abi_version_0_2_1", "0.2.1"),
    ("proxy_abi_version_0_2_0", "0.2.0"),
    ("proxy_abi_version_0_1_0", "0.1.0"),
];

/// Weft's scratch-area export (an extension: other hosts never call it). A module that
/// exports it, `() -> i64`, returns the address of an area of its memory in the upper 32 bits
/// and the area's size in the lower; the host then writes each value it returns that fits
/// there, instead of into memory from `proxy_on_memory_allocate`, and the module copies the
/// value out before its next host call. One call into the module fewer per value read.
pub const SCRATCH_AREA_EXPORT: &str = "weft_scratch_area_v1";

/// Weft's implicit stream contexts export (an extension: other hosts never look for it). A
/// module that exports it, `() -> ()` (never called), creates a stream's context itself at the
/// first callback the host makes on a context id it does not know, as a child of its one
/// configured root context; the host then does not call `proxy_on_context_create` for stream
/// contexts on an instance that runs a single filter (one root), saving a call into the
/// module per stream. With several filters on an instance, or for network contexts, the host
/// creates every context as the ABI says.
pub const IMPLICIT_CONTEXTS_EXPORT: &str = "weft_implicit_stream_contexts_v1";

/// Weft's stream-done-by-return export (an extension: other hosts never call it). A module
/// that exports it, `() -> ()`, is called once after it starts: the host says so that it takes
/// [`STREAM_DONE_ACTION`] as the return value of the module's stream callbacks (request and
/// response headers, bodies and trailers). A module that was not called must not return it.
pub const STREAM_DONE_RETURN_EXPORT: &str = "weft_stream_done_by_return_v1";

/// What a stream callback returns, on a host that called [`STREAM_DONE_RETURN_EXPORT`], to
/// continue and say in the same breath that the filter is done with the stream: as a
/// `weft.stream_done` call made in the callback followed by `Continue`, without the host call.
pub const STREAM_DONE_ACTION: u32 = 0x5746_0D01;

/// The import modules a filter may import functions from: the proxy-wasm ABI (`env`) and WASI
/// preview 1. The host links these (with stubs for functions it lacks) and refuses any other.
pub const IMPORT_MODULES: &[&str] = &["env", "wasi_snapshot_preview1", "wasi_unstable"];

/// The WASI import modules: preview 1 and its predecessor `wasi_unstable` (which older
/// toolchains, AssemblyScript among them, import), linked to the same functions.
pub const WASI_MODULES: &[&str] = &["wasi_snapshot_preview1", "wasi_unstable"];

/// The proxy-wasm header-map wire format: a little-endian `u32` pair count, then a
/// (key length, value length) `u32` pair per entry, then each key and each value followed by
/// a NUL byte.
pub mod map {
    /// Serialises pairs.
    pub fn serialize<'a, K, V>(pairs: impl Iterator<Item = (&'a K, &'a V)> + Clone) -> Vec<u8>
    where
        K: AsRef<[u8]> + ?Sized + 'a,
        V: AsRef<[u8]> + ?Sized + 'a,
    {
        let (mut n, mut size) = (0u32, 4usize);
        for (k, v) in pairs.clone() {
            n += 1;
            size += 8 + k.as_ref().len() + v.as_ref().len() + 2;
        }
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(&n.to_le_bytes());
        for (k, v) in pairs.clone() {
            out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k.as_ref());
            out.push(0);
            out.extend_from_slice(v.as_ref());
            out.push(0);
        }
        out
    }

    /// Parses the format, borrowing from `bytes`; `None` when it is malformed (truncated,
    /// lengths past the end). Empty input is an empty map.
    pub fn deserialize(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
        if bytes.is_empty() {
            return Some(Vec::new());
        }
        let u32_at = |i: usize| -> Option<usize> {
            Some(u32::from_le_bytes(bytes.get(i..i.checked_add(4)?)?.try_into().ok()?) as usize)
        };
        let n = u32_at(0)?;
        let mut data = 4usize.checked_add(n.checked_mul(8)?)?;
        if data > bytes.len() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (kl, vl) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
            let k = bytes.get(data..data.checked_add(kl)?)?;
            data = data.checked_add(kl)?.checked_add(1)?;
            let v = bytes.get(data..data.checked_add(vl)?)?;
            data = data.checked_add(vl)?.checked_add(1)?;
            out.push((k, v));
        }
        // Every key and value is followed by its NUL.
        (data <= bytes.len()).then_some(out)
    }
}

/// Weft's extensions: `proxy_call_foreign_function` names under `weft.` and their argument and
/// result encodings (all integers little-endian). Another host answers `NOT_FOUND` to them.
pub mod ext {
    /// `weft.set_cluster`: the cluster's name as UTF-8 (request headers phase).
    pub const SET_CLUSTER: &str = "weft.set_cluster";
    /// `weft.set_timeout`: milliseconds for the whole request, all attempts (0: none).
    pub const SET_TIMEOUT: &str = "weft.set_timeout";
    /// `weft.set_try_timeout`: milliseconds for each attempt (0: none).
    pub const SET_TRY_TIMEOUT: &str = "weft.set_try_timeout";
    /// `weft.set_attempts`: a `u32`, the attempts a request may get (at least 1).
    pub const SET_ATTEMPTS: &str = "weft.set_attempts";
    /// `weft.delay`: milliseconds to hold the request before it goes upstream.
    pub const DELAY: &str = "weft.delay";
    /// `weft.attempt`: no arguments; answers an [`AttemptInfo`] (7 bytes).
    pub const ATTEMPT: &str = "weft.attempt";
    /// `weft.retry`: a [`RetryArgs`] (9 bytes); response headers phase.
    pub const RETRY: &str = "weft.retry";
    /// `weft.unused`: the export name of a stream callback (one of [`SKIPPABLE`]) as UTF-8. The
    /// filter's implementation of it does nothing but continue (an SDK's default), so the
    /// host may stop calling it for this filter: a call saved per stream and phase. Any
    /// phase; answers nothing.
    pub const UNUSED: &str = "weft.unused";
    /// `weft.properties`: several properties in one call, any phase. Arguments: a `u32`
    /// count, then each property path (its segments joined by NULs, as
    /// `proxy_get_property` takes it) as a `u32` length and the bytes
    /// ([`encode_property_paths`]). Answer: each value in the same order, as a `u32` length
    /// and the bytes, [`ABSENT`] as the length of one the host does not have
    /// ([`decode_property_values`]).
    pub const PROPERTIES: &str = "weft.properties";
    /// `weft.stream_done`: no arguments, answers nothing; stream callbacks only (request and
    /// response heads, bodies, trailers, callout answers). The filter has nothing more to do
    /// for this stream: the host calls none of its callbacks for the stream after this one,
    /// `on_done`, `on_log` and `on_delete` included, and forgets the stream's context; the
    /// module drops its own state for the stream when this callback returns. This callback's
    /// `Pause` is taken as `Continue` (nothing could resume the stream); callouts it sent
    /// still go out, and their answers are dropped. A pure saving: a filter whose later
    /// callbacks would do nothing says it, so that hosts without the extension, which go on
    /// calling them, see the same behaviour.
    pub const STREAM_DONE: &str = "weft.stream_done";

    /// The length [`PROPERTIES`] answers for a property that is not there.
    pub const ABSENT: u32 = u32::MAX;

    /// Most paths one [`PROPERTIES`] call may ask for.
    pub const MAX_PROPERTIES: usize = 64;

    /// The callbacks [`UNUSED`] can name, in the order of their bits in a mask.
    pub const SKIPPABLE: &[&str] = &[
        "proxy_on_request_headers",
        "proxy_on_response_headers",
        "proxy_on_request_body",
        "proxy_on_response_body",
        "proxy_on_request_trailers",
        "proxy_on_response_trailers",
        "proxy_on_done",
        "proxy_on_log",
    ];

    /// The bit of callback `export` in a mask of [`SKIPPABLE`] callbacks.
    pub fn skippable_bit(export: &str) -> Option<u16> {
        SKIPPABLE.iter().position(|&n| n == export).map(|i| 1 << i)
    }

    /// Every extension name.
    pub const ALL: &[&str] = &[
        SET_CLUSTER,
        SET_TIMEOUT,
        SET_TRY_TIMEOUT,
        SET_ATTEMPTS,
        DELAY,
        ATTEMPT,
        RETRY,
        UNUSED,
        PROPERTIES,
        STREAM_DONE,
    ];

    /// Reads a `u32` length and that many bytes from the front of `b`.
    fn take_chunk<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], BadEncoding> {
        let (len, rest) = b.split_first_chunk::<4>().ok_or(BadEncoding)?;
        let len = u32::from_le_bytes(*len) as usize;
        let chunk = rest.get(..len).ok_or(BadEncoding)?;
        *b = rest.get(len..).ok_or(BadEncoding)?;
        Ok(chunk)
    }

    /// [`PROPERTIES`]' arguments for `paths` (each a list of segments).
    pub fn encode_property_paths(paths: &[&[&str]]) -> Vec<u8> {
        let size: usize = paths
            .iter()
            .map(|p| 4 + p.iter().map(|s| s.len() + 1).sum::<usize>())
            .sum();
        let mut out = Vec::with_capacity(4 + size);
        out.extend_from_slice(&(paths.len() as u32).to_le_bytes());
        for path in paths {
            let len = path.iter().map(|s| s.len()).sum::<usize>() + path.len().saturating_sub(1);
            out.extend_from_slice(&(len as u32).to_le_bytes());
            for (i, segment) in path.iter().enumerate() {
                if i > 0 {
                    out.push(0);
                }
                out.extend_from_slice(segment.as_bytes());
            }
        }
        out
    }

    /// Reads [`encode_property_paths`]' bytes: each path's bytes (segments NUL-joined). More
    /// than [`MAX_PROPERTIES`] paths, or bytes left over, is a bad encoding.
    pub fn decode_property_paths(mut b: &[u8]) -> Result<Vec<&[u8]>, BadEncoding> {
        let (count, rest) = b.split_first_chunk::<4>().ok_or(BadEncoding)?;
        let count = u32::from_le_bytes(*count) as usize;
        if count > MAX_PROPERTIES {
            return Err(BadEncoding);
        }
        b = rest;
        let paths = (0..count)
            .map(|_| take_chunk(&mut b))
            .collect::<Result<Vec<_>, _>>()?;
        b.is_empty().then_some(paths).ok_or(BadEncoding)
    }

    /// Appends one value of a [`PROPERTIES`] answer (`None`: absent).
    pub fn encode_property_value(out: &mut Vec<u8>, value: Option<&[u8]>) {
        match value {
            Some(v) => {
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&ABSENT.to_le_bytes()),
        }
    }

    /// Reads a [`PROPERTIES`] answer holding `count` values.
    pub fn decode_property_values(
        b: &[u8],
        count: usize,
    ) -> Result<Vec<Option<Vec<u8>>>, BadEncoding> {
        let mut spans = vec![None; count];
        property_value_spans(b, &mut spans)?;
        Ok(spans
            .into_iter()
            .map(|s| s.map(|r| b[r].to_vec()))
            .collect())
    }

    /// Reads a [`PROPERTIES`] answer holding `spans.len()` values without copying them:
    /// where each value lies in `b` (`None`: absent).
    pub fn property_value_spans(
        b: &[u8],
        spans: &mut [Option<std::ops::Range<usize>>],
    ) -> Result<(), BadEncoding> {
        let mut at = 0;
        for span in spans {
            let len = b
                .get(at..at + 4)
                .and_then(|l| <[u8; 4]>::try_from(l).ok())
                .map(u32::from_le_bytes)
                .ok_or(BadEncoding)?;
            at += 4;
            *span = if len == ABSENT {
                None
            } else {
                let end = at.checked_add(len as usize).ok_or(BadEncoding)?;
                if end > b.len() {
                    return Err(BadEncoding);
                }
                let value = at..end;
                at = end;
                Some(value)
            };
        }
        (at == b.len()).then_some(()).ok_or(BadEncoding)
    }

    /// Most attempts `weft.set_attempts` grants a request.
    pub const MAX_ATTEMPTS: u32 = 10;

    /// Arguments that do not have the extension's encoding.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct BadEncoding;

    /// A duration in milliseconds (`u64`, 8 bytes).
    pub fn encode_millis(ms: u64) -> [u8; 8] {
        ms.to_le_bytes()
    }

    /// Reads [`encode_millis`]' bytes.
    pub fn decode_millis(b: &[u8]) -> Result<u64, BadEncoding> {
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| BadEncoding)?))
    }

    /// An attempt count (`u32`, 4 bytes).
    pub fn encode_attempts(n: u32) -> [u8; 4] {
        n.to_le_bytes()
    }

    /// Reads [`encode_attempts`]' bytes.
    pub fn decode_attempts(b: &[u8]) -> Result<u32, BadEncoding> {
        Ok(u32::from_le_bytes(b.try_into().map_err(|_| BadEncoding)?))
    }

    /// Why an upstream attempt produced no upstream response (the last byte of
    /// [`AttemptInfo`]).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    #[repr(u8)]
    pub enum AttemptError {
        /// It did not fail: the response came from the upstream.
        #[default]
        None = 0,
        /// The connection to the endpoint could not be made.
        ConnectFailure = 1,
        /// The connection failed or was reset before a response.
        Reset = 2,
        /// No response before the (per-try) timeout.
        Timeout = 3,
        /// A circuit-breaker limit refused it.
        Overflow = 4,
        /// The cluster had no healthy endpoint.
        NoHealthyUpstream = 5,
    }

    impl AttemptError {
        /// Every value.
        pub const ALL: &'static [Self] = &[
            Self::None,
            Self::ConnectFailure,
            Self::Reset,
            Self::Timeout,
            Self::Overflow,
            Self::NoHealthyUpstream,
        ];

        /// From its byte; an unknown byte reads as `None` (a newer host's reason).
        pub fn from_u8(b: u8) -> Self {
            Self::ALL.get(b as usize).copied().unwrap_or_default()
        }

        /// Envoy's `response.code_details` for a response ending this way.
        pub fn code_details(self) -> &'static str {
            match self {
                Self::None => "via_upstream",
                Self::ConnectFailure => "upstream_connect_failure",
                Self::Reset => "upstream_reset_before_response_started",
                Self::Timeout => "upstream_response_timeout",
                Self::Overflow => "upstream_overflow",
                Self::NoHealthyUpstream => "no_healthy_upstream",
            }
        }
    }

    /// `weft.attempt`'s answer: `number` (`u32`), `status` (`u16`), `error` (`u8`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct AttemptInfo {
        /// 1 for the first attempt.
        pub number: u32,
        /// Its status (the proxy's own when it failed).
        pub status: u16,
        /// Why there was no upstream response, if there was none.
        pub error: AttemptError,
    }

    impl AttemptInfo {
        /// The 7 bytes.
        pub fn encode(self) -> [u8; 7] {
            let n = self.number.to_le_bytes();
            let s = self.status.to_le_bytes();
            [n[0], n[1], n[2], n[3], s[0], s[1], self.error as u8]
        }

        /// Reads [`AttemptInfo::encode`]'s bytes.
        pub fn decode(b: &[u8]) -> Result<Self, BadEncoding> {
            let [n0, n1, n2, n3, s0, s1, e] = *b else {
                return Err(BadEncoding);
            };
            Ok(Self {
                number: u32::from_le_bytes([n0, n1, n2, n3]),
                status: u16::from_le_bytes([s0, s1]),
                error: AttemptError::from_u8(e),
            })
        }
    }

    /// `weft.retry`'s arguments: the delay in milliseconds (`u64`), then flags (`u8`, bit 0:
    /// prefer endpoints not tried yet).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RetryArgs {
        /// Wait this long before the next attempt.
        pub delay_ms: u64,
        /// Prefer endpoints not tried yet.
        pub exclude_tried: bool,
    }

    impl RetryArgs {
        /// The 9 bytes.
        pub fn encode(self) -> [u8; 9] {
            let mut out = [0u8; 9];
            out[..8].copy_from_slice(&self.delay_ms.to_le_bytes());
            out[8] = u8::from(self.exclude_tried);
            out
        }

        /// Reads [`RetryArgs::encode`]'s bytes.
        pub fn decode(b: &[u8]) -> Result<Self, BadEncoding> {
            if b.len() != 9 {
                return Err(BadEncoding);
            }
            Ok(Self {
                delay_ms: decode_millis(&b[..8])?,
                exclude_tried: b[8] & 1 == 1,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_and_have_the_abi_numbers() {
        for s in Status::ALL {
            assert_eq!(Status::from_i32(*s as i32), Some(*s));
        }
        assert_eq!(Status::ALL.len(), 13);
        assert_eq!(Status::Unimplemented as i32, 12);
        assert_eq!(Status::InvalidMemoryAccess as i32, 6);
        assert_eq!(Status::from_i32(13), None);
        assert_eq!(BufferType::PluginConfiguration as i32, 7);
        assert_eq!(BufferType::HttpCallResponseBody as i32, 4);
        assert_eq!(MapType::HttpCallResponseHeaders as i32, 6);
        assert_eq!(MapType::HttpResponseTrailers as i32, 3);
        assert_eq!(MetricType::Histogram as i32, 2);
        assert_eq!(LogLevel::Critical as i32, 5);
        assert_eq!(StreamType::HttpResponse as i32, 1);
        for m in MapType::ALL {
            assert_eq!(MapType::from_i32(*m as i32), Some(*m));
        }
        for b in BufferType::ALL {
            assert_eq!(BufferType::from_i32(*b as i32), Some(*b));
        }
        assert_eq!(MapType::from_i32(-1), None);
    }

    #[test]
    fn map_format_round_trips_and_rejects_truncation() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"GET"),
            (b"x-empty", b""),
            (b"", b"v"),
            (b"bin", &[0xff, 0x00, 0x80]),
        ];
        let wire = map::serialize(pairs.iter().map(|(k, v)| (*k, *v)));
        assert_eq!(map::deserialize(&wire).unwrap(), pairs);
        // The layout itself: count, lengths, then NUL-terminated keys and values.
        let one = map::serialize([("k", "vv")].iter().map(|(k, v)| (*k, *v)));
        assert_eq!(one, b"\x01\0\0\0\x01\0\0\0\x02\0\0\0k\0vv\0");
        for cut in 1..wire.len() {
            assert!(map::deserialize(&wire[..cut]).is_none(), "cut at {cut}");
        }
        assert_eq!(map::deserialize(b"").unwrap(), vec![]);
        // A count that would overflow or exceed the input is refused without allocating.
        assert!(map::deserialize(&u32::MAX.to_le_bytes()).is_none());
        assert!(map::deserialize(b"\xff\xff\xff\x0f\0\0\0\0").is_none());
    }

    #[test]
    fn extension_encodings_round_trip() {
        for ms in [0, 1, 250, u64::MAX] {
            assert_eq!(ext::decode_millis(&ext::encode_millis(ms)), Ok(ms));
        }
        assert_eq!(ext::decode_millis(&[1, 2, 3]), Err(ext::BadEncoding));
        assert_eq!(ext::decode_attempts(&ext::encode_attempts(3)), Ok(3));
        for e in ext::AttemptError::ALL {
            let a = ext::AttemptInfo {
                number: 70_000,
                status: 503,
                error: *e,
            };
            assert_eq!(ext::AttemptInfo::decode(&a.encode()), Ok(a));
        }
        assert_eq!(
            ext::AttemptInfo {
                number: 2,
                status: 504,
                error: ext::AttemptError::Timeout
            }
            .encode(),
            [2, 0, 0, 0, 0xf8, 0x01, 3]
        );
        assert!(ext::AttemptInfo::decode(&[0; 6]).is_err());
        for r in [
            ext::RetryArgs {
                delay_ms: 25,
                exclude_tried: true,
            },
            ext::RetryArgs::default(),
        ] {
            assert_eq!(ext::RetryArgs::decode(&r.encode()), Ok(r));
        }
        assert!(ext::RetryArgs::decode(&[0; 8]).is_err());
        assert!(ext::ALL.iter().all(|n| n.starts_with("weft.")));
    }

    #[test]
    fn property_batches_round_trip_and_refuse_what_is_malformed() {
        let paths: [&[&str]; 3] = [&["request", "path"], &["weft", "route"], &[]];
        let args = ext::encode_property_paths(&paths);
        let decoded = ext::decode_property_paths(&args).unwrap();
        assert_eq!(decoded, [&b"request\0path"[..], b"weft\0route", b""]);
        assert!(ext::decode_property_paths(&args[..args.len() - 1]).is_err());
        assert!(ext::decode_property_paths(&[args.as_slice(), b"x"].concat()).is_err());
        let too_many = vec![&["a"][..]; ext::MAX_PROPERTIES + 1];
        assert!(ext::decode_property_paths(&ext::encode_property_paths(&too_many)).is_err());
        assert!(ext::decode_property_paths(&u32::MAX.to_le_bytes()).is_err());

        let mut answer = Vec::new();
        ext::encode_property_value(&mut answer, Some(b"/items"));
        ext::encode_property_value(&mut answer, None);
        ext::encode_property_value(&mut answer, Some(b""));
        let values = ext::decode_property_values(&answer, 3).unwrap();
        assert_eq!(values, [Some(b"/items".to_vec()), None, Some(Vec::new())]);
        assert!(ext::decode_property_values(&answer, 4).is_err());
        assert!(ext::decode_property_values(&answer, 2).is_err());
        assert!(ext::decode_property_values(&answer[..answer.len() - 1], 3).is_err());
    }
}
